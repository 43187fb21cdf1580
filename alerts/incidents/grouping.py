"""Which incident an alert belongs to: its rule's ``group`` (``alerts.ruleset.Group``).

The group key is the rule and the values of the grouping fields, e.g.
``speed_drop|landmark=street_30_4``: every speed-drop alert on 30/4 street, whichever
sensor, joins one incident while it is open. Keys are plain text so the database's
one-open-incident-per-key index keeps N alerts workers from opening two for one cause.
"""

from __future__ import annotations

from dataclasses import dataclass

from alerts.model import Alert
from alerts.ruleset import Group, Rule, RuleSet

DEFAULT_GROUP = Group()


@dataclass(frozen=True, slots=True)
class Grouped:
    key: str
    fields: dict[str, str]  # the grouping fields and their values
    place: str  # the field that names the place: landmark, district, gateway or sensor


def group_config(rules: RuleSet | None) -> dict[str, Group]:
    """Each rule's grouping (rules without one get the default)."""
    return {r.id: r.group for r in rules.rules} if rules else {}


def fields_of(alert: Alert, gateways: dict[str, str]) -> dict[str, str]:
    sensor = alert.sensor_id or ""
    return {"landmark": alert.landmark, "district": alert.district, "domain": alert.domain,
            "sensor": sensor, "gateway": gateways.get(sensor, "")
            or str(alert.details.get("gateway", "") if alert.details else "")}


def group_of(alert: Alert, group: Group, gateways: dict[str, str]) -> Grouped:
    """The group of ``alert``: by the rule's fields, or (none given) by landmark, else
    district, else the alert's own source."""
    values = fields_of(alert, gateways)
    by: tuple[str, ...] = tuple(group.by)
    if not by:
        by = ("landmark",) if alert.landmark else ("district",) if alert.district else ()
    chosen = {f: values[f] for f in by}
    if not by or not any(chosen.values()):  # nothing to group by: the alert alone
        chosen = {"source": alert.source}
    key = alert.rule_id + "|" + ",".join(f"{k}={v}" for k, v in chosen.items())
    place = next((f for f in ("landmark", "gateway", "district", "sensor") if chosen.get(f)),
                 "source")
    return Grouped(key, chosen, place)


def rule_of(rules: RuleSet | None, rule_id: str) -> Rule | None:
    return rules.by_id.get(rule_id) if rules else None
