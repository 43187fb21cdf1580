"""The engine's side of the scale-out, in process (no servers): which worker judges what,
and how state is checkpointed, dropped and loaded per partition (``alerts/scope.py``).
The whole path through Kafka and PostgreSQL is ``tests/test_alerts_scale.py``."""

from __future__ import annotations

import numpy as np

from alerts.engine import Engine
from alerts.model import SignalKind
from alerts.ruleset import parse_rules
from alerts.scope import Ownership, decode_input, encode_input
from alerts.testing import make_event
from ingest.contract import Event

RULES = """
version: 1
rules:
  - id: intrusions
    type: count
    severity: major
    incidents: [intrusion]
    count: 2
    window_s: 600
    per: landmark
  - id: ff
    type: anomaly
    severity: minor
    match: {domains: [tourism]}
    metric: footfall_in
    min_samples: 3
  - id: offline
    type: absence
    severity: warning
    match: {domains: [traffic]}
    silence_s: 5
"""
T0 = 1_700_000_000_000


def worker(events: set[int], scope: set[int], n: int = 2) -> Engine:
    e = Engine(parse_rules(RULES))
    own = Ownership(e.index)
    own.set_counts(n, n)
    own.events, own.scope = set(events), set(scope)
    e.own(own, "ev", "sc")
    return e


def feed(e: Engine, events: list[Event], partition: int) -> list:  # type: ignore[type-arg]
    e.clock.observe(partition, max(ev.event_time for ev in events), T0 + 3_600_000)
    return e.evaluate(events, "events", np.full(len(events), partition, np.int32))


def test_landmark_counts_go_through_the_scope_owner_and_replays_count_once() -> None:
    a, b = worker({0}, {0}), worker({1}, {1})
    key = "landmark:ctu"
    owner = a if a.ownership.owns_scope(key) else b  # type: ignore[union-attr]
    one = make_event("cam-1", T0, domain="security", landmark="ctu", incident="intrusion")
    two = make_event("cam-2", T0 + 1, domain="security", landmark="ctu", incident="intrusion")
    assert feed(a, [one], 0) == [] and feed(b, [two], 1) == []  # neither judges it alone
    inputs = [decode_input(encode_input(i)) for i in a.take_outbox() + b.take_outbox()]
    assert [i.key for i in inputs] == [key, key]
    got = owner.on_scoped(inputs[:1] + inputs[:1])  # a replayed input counts once
    assert got == []
    got = owner.on_scoped(inputs[1:])
    assert [(s.kind, s.source) for s in got] == [(SignalKind.RAISE, key)]
    rows = owner.snapshot()
    assert [(r[2], r[4], r[5]) for r in rows] == [(key, "sc", owner.ownership.scope_of(key))]  # type: ignore[union-attr]


def test_absence_judges_only_the_sensors_of_owned_partitions() -> None:
    a = worker({0}, {0})
    feed(a, [make_event("lane-0", T0, speed_kmh=30.0)], 0)
    feed(a, [make_event("lane-1", T0, speed_kmh=30.0)], 1)  # not a's: must never be judged
    a.clock.observe(0, T0 + 60_000, T0 + 3_600_000)
    a.clock.observe(1, T0 + 60_000, T0 + 3_600_000)
    assert {s.source for s in a.tick(0) if s.rule_id == "offline"} == {"lane-0"}


def test_array_state_is_written_per_partition_and_moves_with_it() -> None:
    a = worker({0, 1}, {0, 1})
    for k in range(5):
        feed(a, [make_event("ff-0", T0 + k, domain="tourism", footfall_in=10.0 + k)], 0)
        feed(a, [make_event("ff-1", T0 + k, domain="tourism", footfall_in=20.0 + k)], 1)
    blobs = [b for b in a.snapshot_blobs() if b[0] == "ff"]
    assert sorted(b[2] for b in blobs) == [0, 1]
    # a gives partition 1 away: its rows are forgotten, and never written again
    a.drop({1}, {1})
    a.ownership.events, a.ownership.scope = {0}, {0}  # type: ignore[union-attr]
    arr = a.evaluators["ff"].arrays  # type: ignore[attr-defined]
    assert arr.get(a.index.codes["ff-1"])["n"] == 0
    assert arr.get(a.index.codes["ff-0"])["n"] == 5
    feed(a, [make_event("ff-0", T0 + 9, domain="tourism", footfall_in=14.0)], 0)
    assert {b[2] for b in a.snapshot_blobs() if b[0] == "ff"} == {0}
    # b takes partition 1 from the checkpoint: the history of ff-1 and nothing of ff-0
    b = worker({1}, {1})
    b.assigned({1})
    b.restore_blobs([(r, h, p, blob) for r, h, p, blob, _ in blobs if p == 1], {1})
    brr = b.evaluators["ff"].arrays  # type: ignore[attr-defined]
    assert brr.get(b.index.codes["ff-1"])["n"] == 5
    assert "ff-0" not in b.index.codes
    assert int(b.clock.part[b.index.codes["ff-1"]]) == 1


def test_a_registry_sensor_not_heard_from_belongs_to_its_gateways_partition() -> None:
    """Ingest keys a contract-v2 record by the sensor's gateway (``ingest.normalize``), v1
    records by the sensor: absence of a registry sensor is judged where it will arrive."""
    from dataclasses import replace

    from alerts.scope import scope_partition
    from alerts.service import route_keys
    from cityops.registry import Fleet, Sensor
    from cityops.settings import Settings

    fleet = Fleet(name="t", groups=(), sensors=(
        Sensor("s-behind", "traffic", "lane_detector", "v", "ninh_kieu", "ctu", 0.0, 0.0, 60,
               gateway="gw-7"),
        Sensor("s-alone", "traffic", "lane_detector", "v", "ninh_kieu", "ctu", 0.0, 0.0, 60)))
    v2 = route_keys(fleet, replace(Settings(), ingest_contract_version=2))
    assert v2 == {"s-behind": "gw-7"}
    assert route_keys(fleet, replace(Settings(), ingest_contract_version=1)) == {}
    e = Engine(parse_rules(RULES))
    own = Ownership(e.index, v2)
    own.set_counts(24, 24)
    codes = np.array([e.index.code("s-behind"), e.index.code("s-alone")])
    assert own.parts_of(codes).tolist() == [scope_partition("gw-7", 24),
                                            scope_partition("s-alone", 24)]
    e.clock.learn(codes[:1], np.array([5], np.int32))  # seen: where it was read wins
    assert int(own.parts_of(codes[:1])[0]) == 5
