"""The alerts engine's own windows and event-time clocks, in process (no servers).

The window rules (``input: rollup_1m``) used to read the processors' rollup partials; now
the engine computes the windows from the events (``alerts/windows.py``). Absence judges
silence by partition watermarks (``alerts/watermark.py``), not by the wall clock. And the
array state is checkpointed as deltas (``alerts/slots.py``).
"""

from __future__ import annotations

import numpy as np

from alerts.engine import Engine
from alerts.model import Signal, SignalKind
from alerts.ruleset import parse_rules
from alerts.slots import FULL_EVERY
from alerts.testing import make_event
from ingest.contract import Event

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
  - id: offline
    type: absence
    severity: warning
    match: {domains: [security]}
    factor: 3
"""
MIN = 60_000
T0 = 1_700_000_000_000 // MIN * MIN  # a minute boundary, far in the past


def engine() -> Engine:
    return Engine(parse_rules(RULES), lateness_ms=10_000)


def feed(e: Engine, events: list[Event], partition: int = 0,
         now_ms: int | None = None) -> list[Signal]:
    """What the service does with one poll of one partition: clock first, then rules."""
    wall = now_ms if now_ms is not None else max(ev.event_time for ev in events) + 600_000
    e.clock.observe(partition, max(ev.event_time for ev in events), wall)
    e.clock.advance(wall, {partition: False})
    return e.evaluate(events, "events", np.full(len(events), partition, np.int32))


def slow(signals: list[Signal]) -> list[Signal]:
    return [s for s in signals if s.rule_id == "slow_minutes"]


def test_congestion_fires_from_raw_speed_events_through_one_minute_windows() -> None:
    e = engine()
    out: list[Signal] = []
    # minute 0: one slow and one fast reading, mean 24: not slow (each reading alone
    # would have started the slow spell). Minutes 1-4: 6 km/h on average.
    speeds = {0: [8.0, 40.0], 1: [5.0, 7.0], 2: [6.0, 6.0], 3: [4.0, 8.0], 4: [6.0, 6.0],
              5: [30.0, 30.0]}
    for minute, vals in speeds.items():
        evs = [make_event("lane-1", T0 + minute * MIN + 5_000 + 30_000 * k, speed_kmh=v)
               for k, v in enumerate(vals)]
        for ev in evs:  # one reading per poll, like a live stream
            out += feed(e, [ev])
    raised = [s for s in slow(out) if s.kind == SignalKind.RAISE]
    # windows end at T0+2min (first slow), +3, +4 -> 120 s of slow minutes at minute 3's end
    assert len(raised) == 1
    assert raised[0].at_ms == T0 + 4 * MIN and raised[0].value == 6.0
    ws = e.windows.sets[("1m", "speed_kmh")]
    assert ws.late == 0
    # one value per (sensor, minute): minutes 0..4 closed once each (5 is still open)
    assert int(ws.arrays.arr["done_b"][e.index.codes["lane-1"]]) == T0 + 4 * MIN


def test_late_and_out_of_order_readings_inside_the_lateness_are_counted() -> None:
    e = engine()
    windows: list[Event] = []
    real_run = e._run

    def spy(batch, source, out):  # type: ignore[no-untyped-def]
        if source == "rollup_1m":
            windows.extend(batch.events)
        real_run(batch, source, out)

    e._run = spy  # type: ignore[method-assign]
    s = "lane-2"
    feed(e, [make_event(s, T0 + 10_000, speed_kmh=10.0)])
    feed(e, [make_event(s, T0 + MIN + 2_000, speed_kmh=50.0)])  # minute 1 begins
    # out of order, minute 0, but 8 s after its end by the sensor's clock: still counted
    feed(e, [make_event(s, T0 + 50_000, speed_kmh=20.0)])
    assert windows == []  # minute 0 is still open (lateness 10 s)
    feed(e, [make_event(s, T0 + MIN + 15_000, speed_kmh=50.0)])  # past end + lateness
    assert [w.measurements["speed_kmh"] for w in windows] == [15.0]
    assert windows[0].measurements["speed_kmh:n"] == 2.0
    assert windows[0].event_time == T0 + MIN
    # too late now: dropped and counted, minute 0 is not emitted twice
    feed(e, [make_event(s, T0 + 55_000, speed_kmh=1.0)])
    ws = e.windows.sets[("1m", "speed_kmh")]
    assert ws.late == 1 and len(windows) == 1
    # a quiet stream: the watermark follows the wall clock once the partition is read to
    # its end, and the open minute closes on the tick
    wall = T0 + 55_000 + 600_000  # the wall clock of the last poll (``feed``)
    e.clock.advance(wall + 5 * MIN, {0: True})
    e.tick(wall + 5 * MIN)
    assert [w.event_time for w in windows] == [T0 + MIN, T0 + 2 * MIN]
    assert windows[1].measurements["speed_kmh"] == 50.0


def _security(sid: str, t: int) -> Event:
    return make_event(sid, t, landmark="ctu", domain="security", interval_s=30,
                      crowd_density=1.0)


def test_replay_of_an_old_stream_does_not_flap_and_a_stopped_sensor_raises_once() -> None:
    """Event times 10 minutes old, read at high speed: the wall clock would call every
    sensor offline at first sight and clear it at the next reading. The watermark does
    not; a sensor that really stops while the others go on is raised exactly once."""
    e = engine()
    sensors = [f"cam-{i}" for i in range(20)]
    start = T0
    wall = T0 + 600_000  # the wall clock, 10 minutes ahead of the replayed events
    signals: list[Signal] = []
    for step in range(40):  # 20 simulated minutes in 40 polls, 0.1 s of wall time each
        t = start + step * 30_000
        live = [s for s in sensors if not (s == "cam-7" and step >= 10)]
        wall += 100
        for part in (0, 1):  # a sensor's events all live in one partition (keyed by id)
            evs = [_security(s, t + k) for k, s in enumerate(live)
                   if int(s.split("-")[1]) % 2 == part]
            signals += feed(e, evs, partition=part, now_ms=wall)
        signals += e.tick(wall)
    offline = [s for s in signals if s.rule_id == "offline"]
    assert [(s.kind, s.source) for s in offline] == [(SignalKind.RAISE, "cam-7")]
    # raised after 3 intervals of event time, not at once
    assert offline[0].details["silent_s"] > 90


def test_a_stream_that_stops_raises_offline_by_the_wall_clock_only_when_read_to_its_end(
        ) -> None:
    e = engine()
    t = T0
    feed(e, [_security("cam-a", t)], now_ms=t + 600_000)
    # a backlog still to read: the watermark stays with the events
    e.clock.advance(t + 900_000, {0: False})
    assert [s for s in e.tick(t + 900_000) if s.rule_id == "offline"] == []
    # read to the end and nothing since: wall time counts from the last records
    e.clock.advance(t + 600_000 + 60_000, {0: True})
    assert [s for s in e.tick(0) if s.rule_id == "offline"] == []
    e.clock.advance(t + 600_000 + 91_000, {0: True})
    got = [s for s in e.tick(0) if s.rule_id == "offline"]
    assert [s.source for s in got] == ["cam-a"]


def test_checkpoints_write_only_the_changed_rows_and_restore_base_plus_deltas() -> None:
    e = engine()
    many = [_security(f"cam-{i}", T0 + i) for i in range(2000)]
    feed(e, many)
    base = {rid: (blob, full) for rid, _, _, blob, full in e.snapshot_blobs()}
    assert base["offline"][1] is True  # the first write of a rule is a base
    assert e.snapshot_blobs() == []  # nothing changed since
    feed(e, [_security("cam-3", T0 + 40_000), _security("cam-9", T0 + 40_000)])
    rows = e.snapshot_blobs()
    delta = {rid: (blob, full) for rid, _, _, blob, full in rows}
    assert delta["offline"][1] is False
    assert len(delta["offline"][0]) < len(base["offline"][0]) / 20
    # a new process restores base then delta: the same state
    again = engine()
    hashes = {rid: h for rid, h, *_ in rows}
    again.restore_blobs([("offline", hashes["offline"], -1, base["offline"][0]),
                         ("offline", hashes["offline"], -1, delta["offline"][0])])
    for sid in ("cam-3", "cam-9", "cam-100"):
        a = e.evaluators["offline"].arrays  # type: ignore[attr-defined]
        b = again.evaluators["offline"].arrays  # type: ignore[attr-defined]
        assert a.get(e.index.codes[sid]) == b.get(again.index.codes[sid])
    # every FULL_EVERY deltas a base again (so the deltas to replay stay bounded)
    fulls = 0
    for k in range(FULL_EVERY + 1):
        feed(e, [_security("cam-5", T0 + 50_000 + k)])
        fulls += sum(full for rid, *_, full in e.snapshot_blobs() if rid == "offline")
    assert fulls == 1


def test_open_windows_survive_a_restart() -> None:
    e = engine()
    s = "lane-3"
    feed(e, [make_event(s, T0 + 5_000, speed_kmh=4.0)])
    blobs = [(rid, h, p, blob) for rid, h, p, blob, _ in e.snapshot_blobs()]
    again = engine()
    assert again.restore_blobs(blobs) >= 1
    again.clock.restore(e.clock.snapshot(), T0 + 600_000)
    seen: list[Event] = []
    real_run = again._run

    def spy(batch, source, out):  # type: ignore[no-untyped-def]
        if source == "rollup_1m":
            seen.extend(batch.events)
        real_run(batch, source, out)

    again._run = spy  # type: ignore[method-assign]
    feed(again, [make_event(s, T0 + 35_000, speed_kmh=8.0)])
    feed(again, [make_event(s, T0 + MIN + 20_000, speed_kmh=30.0)])
    assert [w.measurements["speed_kmh:n"] for w in seen] == [2.0]
    assert seen[0].measurements["speed_kmh"] == 6.0
