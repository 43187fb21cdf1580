"""The rules over contract-v2 columns give exactly the signals of the per-event path.

In process (no servers). Two engines with the same rules and fleet read the same polls:
one the way the service used to (``decode_values``: one ``Event`` per row, places of v2
rows from the registry), one the way it does now (``decode_rows``: columns, sensors
learned once per poll). A poll mixes v2 records (gateway batches as ingest encodes them,
coalesced single readings, incidents inside batches, a sensor the registry lacks) with v1
records (one of them placing a registry sensor somewhere else), over two partitions, for
long enough that every rule type raises and clears. Every signal, in order, must match.
"""

from __future__ import annotations

import random
import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from alerts.decode import decode_rows, decode_values
from alerts.engine import Engine
from alerts.model import Signal
from alerts.rows import Rows
from alerts.ruleset import parse_rules
from alerts.testing import make_event
from cityops.registry import SensorGroup, expand
from ingest.contract import Event, encode_batch, encode_event
from ingest.kafka import v2_records

RULES = """
version: 1
rules:
  - id: slow
    type: threshold
    severity: major
    match: {domains: [traffic]}
    metric: speed_kmh
    op: "<"
    value: 12
    for_s: 60
    clear_value: 20
  - id: slow_minutes
    type: threshold
    severity: major
    match: {domains: [traffic]}
    input: rollup_1m
    metric: speed_kmh
    op: "<"
    value: 15
  - id: slow_minutes_p95
    type: threshold
    severity: minor
    match: {domains: [traffic]}
    input: rollup_1m
    stat: p95
    metric: speed_kmh
    op: "<"
    value: 20
  - id: speed_jump
    type: anomaly
    severity: warning
    match: {domains: [traffic]}
    metric: speed_kmh
    method: rate
    max_rate_per_s: 0.3
    clear_after_n: 2
  - id: footfall
    type: anomaly
    severity: minor
    match: {domains: [tourism]}
    metric: footfall_in
    alpha: 0.2
    z: 2
    clear_z: 1
    min_samples: 4
    clear_after_n: 2
  - id: offline
    type: absence
    severity: warning
    factor: 2
  - id: intrusions
    type: count
    severity: critical
    match: {domains: [security]}
    incidents: [intrusion]
    count: 2
    window_s: 300
    per: landmark
  - id: panic
    type: count
    severity: critical
    incidents: [panic]
    count: 1
    window_s: 600
  - id: hall_zone
    type: geofence
    severity: critical
    zone: {landmarks: [city_hall]}
    incidents: [intrusion]
    metric: crowd_density
    op: ">="
    value: 3
    clear_after_s: 120
"""
MIN = 60_000
T0 = 1_700_000_000_000 // MIN * MIN
FLEET = expand("columns", (
    SensorGroup("traffic", "lane_detector", "acme", "street_30_4", 10, 60, 5),
    SensorGroup("security", "cctv", "acme", "city_hall", 4, 60),
    SensorGroup("tourism", "footfall_counter", "acme", "ninh_kieu_wharf", 3, 60),
))
STRANGER = "not-in-the-registry"
LONER = "v2-only-not-in-the-registry"  # its interval is its own: absence's limit


def _event(sid: str, t: int, rng: random.Random, minute: int) -> Event:
    s = FLEET.get(sid)
    assert s is not None
    kw: dict[str, Any] = {"landmark": s.landmark, "domain": s.domain, "type": s.type,
                          "lat": s.lat, "lon": s.lon, "receive_ms": t + 700}
    if s.domain == "traffic":
        slow = 5 <= minute < 11 and sid.endswith(("1", "2", "3"))
        return make_event(sid, t, speed_kmh=rng.uniform(4, 11) if slow else
                          rng.uniform(25, 60), occupancy=rng.random(), **kw)
    if s.domain == "security":
        if rng.random() < 0.15:
            inc = rng.choice(["intrusion", "intrusion", "panic", "door_forced"])
            extra = {"crowd_density": 3.5} if rng.random() < 0.5 else {}
            return make_event(sid, t, incident=inc, **kw, **extra)
        return make_event(sid, t, crowd_density=rng.uniform(0, 4), **kw)
    spike = minute in (9, 10) and sid.endswith("1")
    return make_event(sid, t, footfall_in=rng.uniform(200, 300) if spike else
                      rng.uniform(10, 20), **kw)


def _part(key: str) -> int:
    return zlib.crc32(key.encode()) % 2


def _polls(seed: int) -> list[tuple[int, dict[int, list[bytes]]]]:
    """(wall ms, partition -> record values) per poll: 20 minutes of the fleet."""
    rng = random.Random(seed)
    polls = []
    ids = [s.sensor_id for s in FLEET]
    for minute in range(20):
        t = T0 + minute * MIN
        events, origin, keys = [], [], {}
        for k, sid in enumerate(ids):
            if minute >= 12 and sid == ids[-2]:
                continue  # a sensor goes silent: absence
            events.append(_event(sid, t + 1_000 * k, rng, minute))
            s = FLEET.get(sid)
            gw = s.gateway if s else None
            origin.append(zlib.crc32(gw.encode()) if gw else k)
            keys[origin[-1]] = gw or sid
        # a sensor the registry lacks, in a v2 record and as a v1 event
        stranger = make_event(STRANGER, t + 30_000, domain="security", landmark="city_hall",
                              crowd_density=3.2 + minute % 2, receive_ms=t + 31_000)
        records = [r.value for r in v2_records(events, origin, keys, partition_of=_part)]
        values: dict[int, list[bytes]] = {0: [], 1: []}
        for j, v in enumerate(records):
            values[j % 2].append(v)
        # v1 records between the v2 ones: the same sensors again, later readings
        again = [_event(sid, t + 45_000 + k, rng, minute) for k, sid in enumerate(ids[::3])]
        for j, ev in enumerate(again):
            values[j % 2].insert(rng.randrange(len(values[j % 2]) + 1), encode_event(ev))
        values[0].append(encode_batch([stranger]))
        if minute < 10:
            values[1].append(encode_batch([make_event(
                LONER, t + 40_000, domain="tourism", landmark="ctu", interval_s=25,
                footfall_in=1.0, receive_ms=t + 40_500)]))
        values[1].append(encode_event(stranger))
        if minute == 7:  # a registry sensor placed elsewhere by a v1 event, then v2 again
            moved = make_event(ids[0], t + 50_000, landmark="city_hall", domain="traffic",
                               speed_kmh=30.0, receive_ms=t + 50_500)
            values[0].insert(1, encode_event(moved))
        polls.append((t + MIN + 5_000, values))
    return polls


def _run(engine: Engine, per_event: bool, polls: list[tuple[int, dict[int, list[bytes]]]]
         ) -> list[Signal]:
    """What ``AlertService._batch`` does with each poll, through one of the two paths."""
    out: list[Signal] = []
    for wall, by_part in polls:
        got: list[Any] = []
        parts = []
        for p, values in by_part.items():
            if per_event:
                evs = decode_values(values, engine.index.registry)
                n, newest = len(evs), max(e.event_time for e in evs)
                got += evs
            else:
                rows = decode_rows(values)
                assert all(isinstance(r, Rows) for r in rows)
                n = sum(len(r) for r in rows)
                newest = max(int(r.time.max()) for r in rows)
                got += rows
            parts.append(np.full(n, p, np.int32))
            engine.clock.observe(p, newest, wall)
        engine.clock.advance(wall, {0: False, 1: False})
        out += engine.evaluate(got, "events", np.concatenate(parts))
        out += engine.tick(wall)
    engine.clock.advance(polls[-1][0] + 30 * MIN, {0: True, 1: True})
    out += engine.tick(polls[-1][0] + 30 * MIN)
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_columns_and_per_event_paths_raise_the_same_signals(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # closed windows are stamped with the wall clock as their receive time: one clock
    monkeypatch.setattr("alerts.windows.time", SimpleNamespace(time=lambda: 1.7e9))
    polls = _polls(seed)
    old = _run(Engine(parse_rules(RULES), FLEET), True, polls)
    new_engine = Engine(parse_rules(RULES), FLEET)
    new = _run(new_engine, False, polls)
    # the stream exercises every rule, raising and clearing
    kinds = {(s.rule_id, str(s.kind)) for s in old}
    for rule in ("slow", "slow_minutes", "slow_minutes_p95", "speed_jump", "footfall",
                 "offline", "intrusions", "panic", "hall_zone"):
        assert (rule, "raise") in kinds, rule
    assert {r for r, k in kinds if k == "clear"} >= {"slow", "speed_jump", "hall_zone"}
    assert {STRANGER, LONER} <= {s.source for s in old}
    assert len(new) == len(old)
    for a, b in zip(old, new, strict=True):
        assert a == b
    # and the sensors were learned alike: same codes, same places
    ref = Engine(parse_rules(RULES), FLEET)
    _run(ref, True, polls)
    assert new_engine.index.ids == ref.index.ids
    assert new_engine.index.places == ref.index.places
