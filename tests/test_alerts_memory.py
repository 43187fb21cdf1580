"""The alerts engine's memory stays bounded over simulated time (in-process, no servers).

A soak (250 msg/s, the x4 load fleet) once showed the alerts worker growing ~35 MiB/min:
the rollup merger kept every window of every metric of every sensor. The engine now
computes the windows its rules read itself (``alerts/windows.py``): arrays indexed by
sensor, only for the (resolution, metric) some rule reads and the sensors it matches.
Here many simulated hours of events for many sensors go through the real ``Engine``;
what it holds must depend on the sensors the rules match, not on the fleet's metrics or
how long it ran.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from alerts.engine import Engine
from alerts.ruleset import load_rules
from alerts.testing import make_event

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
HOURS = 5


def test_windows_stay_bounded_over_simulated_hours(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    engine = Engine(load_rules(rules))
    start = (int(time.time() * 1000) - HOURS * 3_600_000) // 3_600_000 * 3_600_000
    traffic = [f"mem-t{i}" for i in range(TRAFFIC)]
    security = [f"mem-s{i}" for i in range(SECURITY)]
    assert list(engine.windows.sets) == [("1m", "speed_kmh")]  # only what a rule reads
    ws = engine.windows.sets[("1m", "speed_kmh")]
    emitted = 0
    for minute in range(HOURS * 60):
        t = start + minute * 60_000
        evs = [make_event(s, t + 30_000 * h, speed_kmh=20.0, volume=3.0)
               for h in range(2) for s in traffic]
        evs += [make_event(s, t, landmark="ctu", domain="security", crowd_density=1.0,
                           speed_kmh=5.0) for s in security]
        engine.clock.observe(0, t + 30_000, t + 60_000)
        before = int((ws.arrays.arr["done_b"] > 0).sum())
        engine.evaluate(evs, "events", np.zeros(len(evs), np.int32))
        emitted += int((ws.arrays.arr["done_b"] > 0).sum()) - before
    # one row per sensor ever seen, whatever the hours; only matched sensors have windows
    assert ws.arrays.arr["cur_b"].size <= 2 * (TRAFFIC + SECURITY) + 64
    used = np.flatnonzero(ws.arrays.arr["used"])
    assert {engine.index.ids[c] for c in used} == set(traffic)
    assert ws.late == 0 and ws.values is None
