"""Translations: one catalog per language and namespace, shared by the browser and Python.

``alerts/i18n/<lang>/<namespace>.json`` holds i18next-format messages: nested keys,
``{name}`` placeholders (single braces, the same syntax as the rules file's titles, so a
rule title is one template whichever side renders it) and plural forms as ``key_one`` /
``key_other`` (Vietnamese has only ``_other``). The console sends the merged catalog of a
language to the browser (``GET /api/i18n/{lang}``), where i18next renders it; webhooks and
API clients get texts rendered here by ``translate``, which implements the subset of the
format the catalogs use. Rule titles come from the ``rules`` namespace (``rules.<id>``) or,
for a rule the catalogs do not know, from the rules file (``titles: {vi: ..., en: ...}``,
else ``title``).
"""

from __future__ import annotations

import json
import string
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
LANGS: tuple[str, ...] = ("vi", "en")
DEFAULT_LANG = "vi"
_PLURAL = {"en": lambda n: "one" if n == 1 else "other", "vi": lambda n: "other"}


@cache
def catalog(lang: str) -> dict[str, dict[str, Any]]:
    """Every namespace of ``lang``: {namespace: messages}. KeyError for a language we lack."""
    if lang not in LANGS:
        raise KeyError(lang)
    return {p.stem: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted((HERE / lang).glob("*.json"))}


def _lookup(messages: dict[str, Any], path: str) -> str | None:
    node: Any = messages
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, str) else None


class _Keep(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill(template: str, values: dict[str, Any]) -> str:
    """``{name}`` placeholders filled; unknown ones are left as they are."""
    return string.Formatter().vformat(template, (), _Keep(values))


def translate(lang: str, key: str, values: dict[str, Any] | None = None,
              default: str | None = None) -> str:
    """``namespace:path.to.key`` (namespace ``common`` when omitted) in ``lang``, with the
    plural form for ``values['count']``; ``default`` (or the key) when there is none."""
    values = values or {}
    ns, _, path = key.rpartition(":")
    messages = catalog(lang).get(ns or "common", {})
    text = None
    if "count" in values:
        try:
            form = _PLURAL[lang](int(values["count"]))
        except (TypeError, ValueError):
            form = "other"
        text = _lookup(messages, f"{path}_{form}") or _lookup(messages, f"{path}_other")
    text = text or _lookup(messages, path)
    if text is None:
        return default if default is not None else key
    return fill(text, values)


def translations(lang: str, rule_titles: dict[str, dict[str, str]] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """The catalog of ``lang`` as the browser gets it, with the rules file's titles merged
    into ``rules.title``: a rule's own ``titles[lang]`` wins over the catalog (the file is
    what the center edits), its ``title`` fills in for a rule the catalog does not know."""
    out = {ns: dict(messages) for ns, messages in catalog(lang).items()}
    rules = dict(out.get("rules", {}))
    titles = dict(rules.get("title", {}))
    for rule_id, text in (rule_titles or {}).get("*", {}).items():
        titles.setdefault(rule_id, text)
    titles.update((rule_titles or {}).get(lang, {}))
    rules["title"] = titles
    out["rules"] = rules
    return out


def rule_title(lang: str, rule_id: str, args: dict[str, Any], fallback: str = "",
               rule_titles: dict[str, dict[str, str]] | None = None) -> str:
    """A rule's title in ``lang`` for these template values (place names translated)."""
    rules = translations(lang, rule_titles)["rules"]["title"]
    template = rules.get(rule_id)
    if template is None:
        return fallback or rule_id
    return fill(template, place_values(lang, args))


def place_values(lang: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with ``landmark_name`` / ``district_name`` in ``lang`` (from the codes)."""
    places = catalog(lang).get("places", {})
    out = dict(args)
    if args.get("landmark"):
        out["landmark_name"] = places.get("landmarks", {}).get(args["landmark"],
                                                               args.get("landmark_name", ""))
    if args.get("district"):
        out["district_name"] = places.get("districts", {}).get(args["district"],
                                                               args.get("district_name", ""))
    return out
