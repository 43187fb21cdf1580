"""An incident's heading in every language: the rule's group name (or its title) and the
place, from the catalogs of ``alerts.i18n``. The console renders the same templates in the
browser; this is for the English ``title`` column, API clients and webhook receivers."""

from __future__ import annotations

from typing import Any

from alerts.i18n import LANGS, rule_title, translate
from alerts.incidents.model import Incident


def incident_title(lang: str, rule_id: str, args: dict[str, Any], place_field: str,
                   fallback: str = "") -> str:
    """The incident's heading: the rule's group name (or title) and the place."""
    group_name = translate(lang, f"rules:group.{rule_id}", default="")
    rule_text = group_name or rule_title(lang, rule_id, args, fallback)
    if place_field in ("landmark", "district"):
        place = translate(lang, f"places:{place_field}s.{args.get(place_field, '')}",
                          default=str(args.get(place_field, "")))
    else:
        place = str(args.get(place_field) or args.get("source") or "")
    if not place or place in rule_text:  # "Panic button pressed at <place>" says it already
        return rule_text
    return translate(lang, "incidents:title", {"rule_title": rule_text, "place": place})


def incident_titles(inc: Incident) -> dict[str, str]:
    """{language: heading} of a stored incident."""
    args = inc.title_args or {}
    place = str(args.get("place_field", "landmark"))
    return {lang: incident_title(lang, inc.rule_id, args, place, inc.title) for lang in LANGS}
