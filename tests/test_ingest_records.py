"""What ingest hands Kafka in each contract version, without servers: the normalizer says
where each event came from, ``v1_records``/``v2_records`` make the records, and the
partition of every v2 record is the one murmur2 of its sensors' keys picks."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2

from cityops.registry import Fleet, load_fleet
from cityops.settings import Settings
from ingest import samples
from ingest.contract import Event, decode_batches, decode_event
from ingest.dedup import DuplicateWindow
from ingest.kafka import COALESCE_MAX_ROWS, v1_records, v2_records
from ingest.normalize import InboundMessage, Normalizer
from tests.support import decoded, readings

T = 1_795_312_800_123
RECV = T + 1_500
PARTITIONS = list(range(6))


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(Settings().fleet_file)


@pytest.fixture()
def norm(fleet: Fleet) -> Normalizer:
    return Normalizer(fleet, Settings())


def partition_of(key: str) -> int:
    return DefaultPartitioner()(key.encode(), PARTITIONS, PARTITIONS)


def test_murmur2_is_the_java_clients() -> None:
    """The partitioner ingest routes with hashes as Kafka's Java client does (its own
    test vectors for ``Utils.murmur2``), so any producer or reader agrees on partitions."""
    java = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
            b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}
    for key, want in java.items():
        got = murmur2(key)
        assert (got - (1 << 32) if got >= 1 << 31 else got) == want
        assert partition_of(key.decode()) == (want & 0x7FFFFFFF) % len(PARTITIONS)


def test_gateway_with_one_bad_reading_is_one_record_and_one_dead_letter(
        norm: Normalizer, fleet: Fleet) -> None:
    gw, members = max(fleet.gateways().items(), key=lambda gm: len(gm[1]))
    docs: list = [samples.reading(s, T) for s in members]
    docs[2] = {**docs[2], "avgSpeedMs": "fast"} if isinstance(docs[2], dict) else "C1|x"
    topic, payload = samples.gateway_message(gw, members, T, readings=docs)
    single = next(s for s in fleet if s.gateway is None and s.vendor == "saomai")
    msgs = [InboundMessage(*samples.device_message(single, T), RECV),
            InboundMessage(topic, payload, RECV + 1)]
    out = norm.normalize_batch(msgs)
    good = [s.sensor_id for i, s in enumerate(members) if i != 2]
    assert [e.sensor_id for e in out.events] == [single.sensor_id, *good]
    assert out.origin == [0] + [1] * len(good)
    assert out.keys == {0: single.sensor_id, 1: gw}
    assert len(out.dead) == 1 and out.dead[0].bad_readings == 1
    assert out.dead[0].reasons[0].startswith("#2 ")
    assert json.loads(out.dead[0].payload)["gateway"] == gw  # the whole message is kept
    records = v2_records(out.events, out.origin, out.keys)
    assert [(r.key, r.partition, r.timestamp) for r in records] == [
        (single.sensor_id, None, RECV), (gw, None, RECV + 1)]
    assert decoded([records[1].value]) == readings(out.events[1:])
    assert decoded([r.value for r in records]) == readings(out.events)
    # v1: one record per event, keyed by sensor
    v1 = v1_records(out.events)
    assert [r.key for r in v1] == [e.sensor_id for e in out.events]
    assert [decode_event(r.value) for r in v1] == out.events


def test_a_sensor_behind_a_gateway_publishing_directly_keeps_its_gateways_key(
        norm: Normalizer, fleet: Fleet) -> None:
    gw, members = next(iter(fleet.gateways().items()))
    out = norm.normalize_batch([InboundMessage(*samples.device_message(members[0], T), RECV)])
    assert out.keys == {0: gw}


def test_single_reading_messages_coalesce_per_partition_in_order(
        norm: Normalizer, fleet: Fleet) -> None:
    direct = [s for s in fleet if s.gateway is None]
    gws = list(fleet.gateways().items())
    msgs: list[InboundMessage] = []
    for i in range(3 * len(direct)):  # every sensor three times, gateways in between
        msgs.append(InboundMessage(*samples.device_message(direct[i % len(direct)], T + i),
                                   RECV + i))
        if i % 50 == 0:
            gw, members = gws[(i // 50) % len(gws)]
            msgs.append(InboundMessage(*samples.gateway_message(gw, members, T + i), RECV + i))
    out = norm.normalize_batch(msgs)
    assert out.dead == []
    records = v2_records(out.events, out.origin, out.keys, partition_of)
    gateway_msgs = sum(1 for m in msgs if "/gateway/" in m.topic)
    coalesced = [r for r in records if r.partition is not None]
    assert len(records) == gateway_msgs + len(coalesced)
    assert len(coalesced) == len({partition_of(out.keys[m]) for m, ev in
                                  Counter(out.origin).items() if ev == 1})
    assert len(records) < len(msgs) / 10
    # every sensor's rows are on the partition of its key, in arrival order
    seen: dict[str, list[int]] = {}
    for r in records:
        part = r.partition if r.partition is not None else partition_of(r.key)
        assert partition_of(r.key) == part  # the key of a coalesced record hashes there too
        cols = decode_batches([r.value])
        for s, t in zip(cols.row_sensor.tolist(), cols.row_time.tolist(), strict=True):
            sid = cols.sensor_ids[s]
            sensor = fleet.get(sid)
            assert sensor is not None
            assert partition_of(sensor.gateway or sid) == part
            seen.setdefault(sid, []).append(t)
    assert all(times == sorted(times) for times in seen.values())
    # per partition, the records hold exactly the events in arrival order
    by_part: dict[int, list[Event]] = {}
    for e, m in zip(out.events, out.origin, strict=True):
        by_part.setdefault(partition_of(out.keys[m]), []).append(e)
    for p, evs in by_part.items():
        mine = [r.value for r in records
                if (r.partition if r.partition is not None else partition_of(r.key)) == p]
        assert sorted(decoded(mine)) == sorted(readings(evs))


def test_coalesced_records_stay_bounded(norm: Normalizer, fleet: Fleet) -> None:
    s = next(s for s in fleet if s.gateway is None and s.vendor == "visitcount")
    msgs = [InboundMessage(*samples.device_message(s, T + i), RECV)
            for i in range(COALESCE_MAX_ROWS + 10)]
    out = norm.normalize_batch(msgs)
    records = v2_records(out.events, out.origin, out.keys, partition_of)
    assert [len(decode_batches([r.value]).row_time) for r in records] == [
        COALESCE_MAX_ROWS, 10]


def test_dedup_keeps_positions_so_origins_follow(norm: Normalizer, fleet: Fleet) -> None:
    s = next(s for s in fleet if s.gateway is None and s.vendor == "saomai")
    gw, members = next(iter(fleet.gateways().items()))
    msgs = [InboundMessage(*samples.device_message(s, T), RECV),
            InboundMessage(*samples.gateway_message(gw, members, T), RECV),
            InboundMessage(*samples.device_message(s, T), RECV + 5)]  # a resend
    out = norm.normalize_batch(msgs)
    window = DuplicateWindow(60, 1000)
    kept = window.keep(out.events, RECV)
    assert kept == list(range(1 + len(members)))  # the resend is dropped
    events = [out.events[k] for k in kept]
    records = v2_records(events, [out.origin[k] for k in kept], out.keys)
    assert [r.key for r in records] == [s.sensor_id, gw]
    again = window.keep(norm.normalize_batch(msgs[1:2]).events, RECV + 10)
    assert again == []  # the gateway resent whole: nothing new
