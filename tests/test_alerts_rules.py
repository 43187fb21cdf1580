"""Rules files: validation errors name the rule and the field; reloads keep the last good set."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from alerts.engine import Engine
from alerts.ruleset import RuleError, RulesFile, load_rules, parse_rules
from alerts.testing import make_event
from cityops.settings import DEFAULT_RULES

GOOD = """
rules:
  - id: slow
    type: threshold
    metric: speed_kmh
    op: "<"
    value: 10
"""


def error_of(text: str) -> str:
    with pytest.raises(RuleError) as exc:
        parse_rules(text, "rules.yaml")
    return str(exc.value)


def test_default_rules_file_is_valid_and_covers_every_type() -> None:
    rules = load_rules(DEFAULT_RULES)
    kinds = {type(r).__struct_config__.tag for r in rules.rules}
    assert kinds == {"threshold", "count", "anomaly", "absence", "correlation", "geofence",
                     "outage"}


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace("speed_kmh", "speed_mph"),
     "rules.yaml: rule 'slow': field 'metric': unknown metric 'speed_mph'"),
    (GOOD.replace("value: 10", "value: ten"),
     "rules.yaml: rule 'slow': field 'value': Expected `float`, got `str`"),
    (GOOD.replace('    op: "<"\n', ""),
     "rules.yaml: rule 'slow': field 'op': missing required field"),
    (GOOD.replace("type: threshold", "type: thresold"),
     "rules.yaml: rule 'slow': field 'type': must be one of threshold, count"),
    (GOOD + "    colour: red\n", "rules.yaml: rule 'slow': field 'colour': unknown field"),
    (GOOD.replace("value: 10", "value: 10\n    clear_value: 5"),
     "rules.yaml: rule 'slow': field 'clear_value': must be on the normal side"),
    (GOOD + "    severity: catastrophic\n", "rules.yaml: rule 'slow': field 'severity'"),
    (GOOD + "    match: {districts: [hanoi]}\n",
     "rules.yaml: rule 'slow': field 'match.districts': unknown value 'hanoi'"),
    (GOOD + GOOD.replace("rules:\n", ""), "rules.yaml: rule 'slow': field 'id': duplicate"),
    (GOOD + "    title: 'Slow at {street}'\n",
     "rules.yaml: rule 'slow': field 'title': unknown placeholder {street}"),
    (GOOD + "    stat: max\n", "rules.yaml: rule 'slow': field 'stat': applies to rollup"),
    ("rules:\n  - id: burst\n    type: count\n    incidents: [alien]\n    count: 3\n"
     "    window_s: 60\n", "rule 'burst': field 'incidents': unknown incident 'alien'"),
    ("rules:\n  - id: burst\n    type: count\n    incidents: [intrusion]\n    count: 0\n"
     "    window_s: 60\n", "rule 'burst': field 'count': Expected `int` >= 1"),
    (GOOD + "  - id: both\n    type: correlation\n    rules: [slow, missing]\n",
     "rule 'both': field 'rules': no rule with id 'missing'"),
    ("rules:\n  - id: night\n    type: geofence\n    zone: {landmarks: [city_hall]}\n"
     "    incidents: [intrusion]\n    schedule: {start: '25:00', end: '05:00'}\n",
     "rule 'night': field 'schedule.start': use HH:MM"),
    ("rules:\n  - id: night\n    type: geofence\n    zone: {}\n    incidents: [intrusion]\n",
     "rule 'night': field 'zone': give landmarks, districts, a circle or a polygon"),
    ("rules:\n  - id: odd\n    type: anomaly\n    metric: flow\n    method: rate\n",
     "rule 'odd': field 'max_rate_per_s': required when method is 'rate'"),
    ("rules: [", "rules.yaml: not valid YAML"),
    ("rules:\n  - type: threshold\n    metric: flow\n    op: '>'\n    value: 1\n",
     "rules.yaml: rule #1: field 'id': missing required field"),
])
def test_errors_name_rule_and_field(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_bad_reload_keeps_last_good_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    watched = RulesFile(path)
    first = watched.load()
    engine = Engine(first)
    assert watched.poll() is None  # unchanged
    time.sleep(0.01)
    path.write_text(GOOD.replace("speed_kmh", "nonsense"))
    assert watched.poll() is None
    assert watched.last_error is not None and "field 'metric'" in watched.last_error
    assert watched.current is first and list(engine.evaluators) == ["slow"]
    path.write_text(GOOD.replace("value: 10", "value: 12"))
    new = watched.poll()
    assert new is not None and watched.last_error is None
    # a changed definition starts fresh; the state of unchanged rules is kept
    assert engine.set_rules(new) == ["slow"]


def test_state_of_unchanged_rules_survives_reload() -> None:
    two = GOOD + """  - id: slower
    type: threshold
    metric: speed_kmh
    op: "<"
    value: 5
    for_s: 600
"""
    engine = Engine(parse_rules(two))
    engine.evaluate([make_event("s1", 1_000_000, speed_kmh=3)])
    kept = engine.evaluators["slower"]
    assert kept.state["s1"]["since"] == 1_000_000
    dropped = engine.set_rules(parse_rules(two.replace("value: 10", "value: 11")))
    assert dropped == ["slow"] and engine.evaluators["slower"] is kept
