"""The alerts engine's memory stays bounded over simulated time (in-process, no servers).

A soak (250 msg/s, the x4 load fleet) showed the alerts worker growing ~35 MiB/min: the
rollup merger kept every window of every metric of every sensor the processors publish
(1-minute windows for 3 minutes back, 1-hour windows for 3 hours back), although the
rules read one metric of one domain from the 1-minute windows. Here many simulated hours
of rollup partials for many sensors go through the real ``Engine``; what it holds must
depend on what the rules read and on the expiry horizon, not on the fleet's metrics, the
other resolution, or how long it ran.
"""

from __future__ import annotations

import time
from pathlib import Path

from alerts.engine import Engine
from alerts.ruleset import load_rules
from processors.rollup import WINDOWS_MS, Rollup

RULES = """
version: 1
rules:
  - id: slow_minutes
    type: threshold
    severity: major
    match: {domains: [traffic]}
    input: rollup_1m
    metric: speed_kmh
    op: "<"
    value: 10
    for_s: 120
"""
TRAFFIC, SECURITY = 50, 50
METRICS = {"traffic": ("speed_kmh", "volume", "occupancy_pct"),
           "security": ("crowd_density", "noise_db")}
HOURS = 5


def _held(engine: Engine) -> int:
    """(window, sensor, bucket) entries the merger holds (either layout)."""
    m = engine.merger
    if hasattr(m, "buckets"):
        return sum(len(v) for v in m.buckets.values())
    return len(m.windows)  # type: ignore[attr-defined]  # the layout before the bound


def _partials(minute_ms: int, sensors: list[tuple[str, str]], speed: float) -> list[Rollup]:
    """Two processor batches' partials per window, like the processors publish them."""
    out = []
    for half in range(2):
        for sid, domain in sensors:
            for metric in METRICS[domain]:
                for window, wms in WINDOWS_MS.items():
                    out.append(Rollup(scope="sensor", window=window, bucket=minute_ms // wms * wms,
                                      sensor_id=sid, district="ninh_kieu", domain=domain,
                                      metric=metric, n=1, sum=speed + half, min=speed,
                                      max=speed + half, mean=speed, p95=speed + half))
    return out


def test_rollup_windows_stay_bounded_over_simulated_hours(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    engine = Engine(load_rules(rules))
    sensors = [(f"mem-t{i}", "traffic") for i in range(TRAFFIC)] + \
        [(f"mem-s{i}", "security") for i in range(SECURITY)]
    # simulated time in the past, ending now (as the load simulator places its runs)
    start = (int(time.time() * 1000) - HOURS * 3_600_000) // 3_600_000 * 3_600_000
    held_per_hour = []
    peak = 0
    for minute in range(HOURS * 60):
        engine.evaluate_rollups(_partials(start + minute * 60_000, sensors, 20.0))
        peak = max(peak, _held(engine))
        if minute % 60 == 59:
            held_per_hour.append(_held(engine))
    # Only what a rule reads: traffic sensors' 1-minute windows, a few minutes back.
    keep_1m = 3 + 2  # the 3-minute horizon plus the current window, one spare
    assert peak <= keep_1m * TRAFFIC, (peak, held_per_hour)
    # and it does not grow with time: the last hours hold what the first one did
    assert max(held_per_hour[1:]) <= held_per_hour[0], held_per_hour


def test_windows_still_merge_next_to_a_sensor_with_a_clock_in_the_future(
        tmp_path: Path) -> None:
    """Expiry follows event time, but a sensor ahead of the wall clock must not expire
    everyone's current window (ingest accepts events up to 5 minutes in the future)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    engine = Engine(load_rules(rules))
    now = int(time.time() * 1000) // 60_000 * 60_000
    sensors = [("skew-ok", "traffic")]
    first = [r for r in _partials(now - 60_000, sensors, 8.0) if r.window == "1m"]
    ahead = [r for r in _partials(now + 5 * 60_000, [("skew-ahead", "traffic")], 30.0)
             if r.window == "1m"]
    engine.evaluate_rollups(first[: len(first) // 2])
    engine.evaluate_rollups(ahead)
    out = engine.merger.merge(first[len(first) // 2:])
    ev = [e for e in out["rollup_1m"] if e.sensor_id == "skew-ok"]
    assert ev and ev[-1].measurements["speed_kmh:n"] == 2.0  # both partials merged
