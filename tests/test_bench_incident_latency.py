"""The incident-latency bench's arithmetic and set-up (``bench/incident_latency.py``),
without servers: the rules it writes must make each press a new incident and change
nothing else, its group key must be the one the incident store builds, and a leg with a
missing stamp must be left out, not counted as zero."""

from __future__ import annotations

from pathlib import Path

from alerts.incidents.grouping import group_of
from alerts.model import Alert
from alerts.ruleset import load_rules
from bench.incident_latency import (
    NEW_INCIDENT_GROUP,
    Press,
    breakdown,
    frame_summary,
    group_key,
    new_incident_rules,
    ratio,
    spread,
)
from cityops.registry import load_fleet
from cityops.settings import DEFAULT_RULES, PROJECT_ROOT


def test_rules_group_panic_by_sensor_and_leave_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(new_incident_rules(Path(DEFAULT_RULES).read_text()))
    got, default = load_rules(path), load_rules(DEFAULT_RULES)
    assert got.by_id["panic_button"].group.by == ["sensor"]
    assert got.by_id["panic_button"].group.wait_s == NEW_INCIDENT_GROUP["wait_s"] == 0
    assert [r.id for r in got.rules] == [r.id for r in default.rules]
    assert [r for r in got.rules if r.id != "panic_button"] == \
        [r for r in default.rules if r.id != "panic_button"]
    assert got.inhibit == default.inhibit


def test_group_key_is_the_incident_stores(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(new_incident_rules(Path(DEFAULT_RULES).read_text()))
    group = load_rules(path).by_id["panic_button"].group
    keys = set()
    for sid in ("ninh_kieu_wharf-pb-sa001", "ninh_kieu_wharf-pb-sa002"):
        alert = Alert(alert_id=1, rule_id="panic_button", source=sid, severity="critical",
                      state="active", acknowledged=False, title="t", sensor_id=sid,
                      landmark="ninh_kieu_wharf", district="ninh_kieu", raised_at=0,
                      updated_at=0)
        key = group_of(alert, group, {}).key
        assert key == group_key(sid)
        keys.add(key)
    assert len(keys) == 2  # two buttons at one wharf: two incidents


def test_ratio_refuses_missing_or_zero() -> None:
    assert ratio(900.0, 450.0) == 2.0
    assert ratio(None, 450.0) is None
    assert ratio(900.0, None) is None
    assert ratio(900.0, 0.0) is None


def test_breakdown_skips_presses_without_both_stamps() -> None:
    presses = [Press("a", 10.0, puback=10.01, created=10.2, committed=10.25, kafka=10.3,
                     feed=10.32, browser=10.4),
               Press("b", 20.0, created=20.5, browser=None)]
    b = breakdown(presses)
    assert b["publish_to_browser"]["n"] == 1
    assert b["publish_to_browser"]["p50"] == 400.0
    assert b["publish_to_created"]["n"] == 2
    assert b["publish_to_created"]["max"] == 500.0
    assert b["created_to_browser"]["n"] == 1
    assert b["browser_to_listed"]["n"] == 0 and b["browser_to_listed"]["p99"] is None


def test_spread_takes_every_landmark_in_turn() -> None:
    fleet = load_fleet(PROJECT_ROOT / "simulators" / "fleets" / "load.toml")
    buttons = [s for s in fleet if s.type == "panic_button"]
    picked = spread(buttons, 6)
    assert len({s.sensor_id for s in picked}) == 6
    assert {s.landmark for s in picked[:2]} == {"night_market", "ninh_kieu_wharf"}
    assert len(spread(buttons[:3], 10)) == 3



def test_frame_summary_adds_scripts_up_across_frames() -> None:
    frames = [{"t": 1.0, "duration": 300.0, "layout": 120.0, "scripts": [
                  {"what": "FrameRequestCallback render app.js", "duration": 150.0}]},
              {"t": 2.0, "duration": 100.0, "layout": 10.0, "scripts": [
                  {"what": "FrameRequestCallback render app.js", "duration": 60.0},
                  {"what": "event-listener incident", "duration": 1.0}]}]
    got = frame_summary(frames)
    assert got["count"] == 2 and got["total_ms"] == 400.0 and got["longest_ms"] == 300.0
    assert got["style_layout_ms"] == 130.0
    assert next(iter(got["scripts_ms"])) == "FrameRequestCallback render app.js"
    assert got["scripts_ms"]["FrameRequestCallback render app.js"] == 210.0
    assert frame_summary([])["count"] == 0
