"""The translation catalogs (alerts/i18n/<lang>/<namespace>.json) agree across languages.

A key present in one language and missing in the other shows up in the console as the key
itself (i18next has no fallback language here, on purpose: a Vietnamese operator must
never get an English label silently), so every namespace must hold the same keys in
every language, and each message the same placeholders. No server needed.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from alerts.i18n import HERE, LANGS

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            assert isinstance(value, str), f"{path}: messages are strings, not {type(value)}"
            out[path] = value
    return out


def load(lang: str, namespace: str) -> dict[str, str]:
    return flatten(json.loads((HERE / lang / f"{namespace}.json").read_text(encoding="utf-8")))


NAMESPACES = sorted({p.stem for lang in LANGS for p in (HERE / lang).glob("*.json")})


def test_every_language_has_every_namespace() -> None:
    for lang in LANGS:
        assert sorted(p.stem for p in (HERE / lang).glob("*.json")) == NAMESPACES, lang
    # the console's own namespaces are among them
    assert {"common", "console", "incident", "login", "sensor"} <= set(NAMESPACES)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_languages_have_the_same_keys_and_placeholders(namespace: str) -> None:
    catalogs = {lang: load(lang, namespace) for lang in LANGS}
    first, *others = LANGS
    for lang in others:
        assert set(catalogs[lang]) == set(catalogs[first]), (
            f"{namespace}: only in {first}: {sorted(set(catalogs[first]) - set(catalogs[lang]))}; "
            f"only in {lang}: {sorted(set(catalogs[lang]) - set(catalogs[first]))}")
        for key, text in catalogs[first].items():
            assert set(PLACEHOLDER.findall(catalogs[lang][key])) == set(
                PLACEHOLDER.findall(text)), f"{namespace}:{key} placeholders differ"
    for lang, messages in catalogs.items():
        empty = [k for k, v in messages.items() if not v.strip()]
        assert not empty, f"{lang}/{namespace}: empty messages {empty}"


def test_vietnamese_is_written_with_its_diacritics() -> None:
    """The console's own Vietnamese catalogs are real Vietnamese, not ASCII transliteration
    (a cheap guard: nearly every message of three words or more carries a Vietnamese
    letter or tone mark)."""
    marks = re.compile(r"[àáảãạăằắẳẵặâầấẩẫậđèéẻẽẹêềếểễệìíỉĩịòóỏõọôồốổỗộơờớởỡợùúủũụưừứửữựỳýỷỹỵ]",
                       re.IGNORECASE)
    for namespace in ("common", "console", "incident", "login", "sensor"):
        words = [PLACEHOLDER.sub("", v) for v in load("vi", namespace).values()]
        messages = [v for v in words if len(re.findall(r"[^\W\d_]+", v)) >= 3]
        with_marks = [v for v in messages if marks.search(v)]
        assert len(with_marks) >= 0.9 * len(messages), (namespace, set(messages) - set(with_marks))
