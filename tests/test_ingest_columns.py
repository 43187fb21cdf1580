"""Issue 15, item 1: ingest's columnar path. The records ``v2_records_of`` encodes straight
from the normalizer's columns are byte for byte the records the v1-event path
(``v2_records`` over ``Normalized.events``) makes of the same input, and decode
(``decode_batches``) to exactly the readings the v1 events hold: over a realistic mixed
batch, with bad payloads, bad gateway elements, incidents, heartbeats, clamps, late
readings, resends and every coalescing case."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings

from cityops.registry import Fleet, load_fleet
from cityops.settings import Settings
from ingest import samples
from ingest.contract import decode_batches
from ingest.dedup import DuplicateWindow
from ingest.kafka import COALESCE_MAX_ROWS, v2_records, v2_records_of
from ingest.normalize import InboundMessage, Normalizer
from tests.support import decoded, readings

T = 1_795_312_800_123
RECV = T + 1_500
PARTITIONS = list(range(6))


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(Settings().fleet_file)


def partition_of(key: str) -> int:
    return DefaultPartitioner()(key.encode(), PARTITIONS, PARTITIONS)


def mixed(fleet: Fleet, t: int = T, recv: int = RECV) -> list[InboundMessage]:
    """Every direct sensor, every gateway (one with two bad elements), incidents, a
    heartbeat, a clamped and a late reading, bad payloads, a resend."""
    direct = [s for s in fleet if s.gateway is None]
    msgs = [InboundMessage(*samples.device_message(s, t + i), recv + i)
            for i, s in enumerate(direct)]
    for k, (gw, members) in enumerate(fleet.gateways().items()):
        docs: list = [samples.reading(s, t + k) for s in members]
        if k == 1:
            docs[0] = 42
            docs[-1] = {**docs[-1], "deviceId": "ghost"} if isinstance(docs[-1], dict) else "x"
        msgs.insert(3 * k, InboundMessage(*samples.gateway_message(gw, members, t + k,
                                                                   readings=docs), recv + k))
    cam = next(s for s in direct if s.vendor == "guardeye")
    door = next(s for s in direct if s.vendor == "safecity" and s.type == "door_sensor")
    lane = next(s for s in direct if s.vendor == "saomai" and s.type == "lane_detector")
    msgs += [
        InboundMessage(samples.topic_of(cam), samples.encode(
            samples.guardeye_event(cam.sensor_id, t + 5)), recv),
        InboundMessage(samples.topic_of(door), samples.encode(
            samples.safecity(door.sensor_id, t + 6, "DOOR_FORCED")), recv),
        InboundMessage(samples.topic_of(door), samples.encode(
            {"device_id": door.sensor_id, "occurred_at": samples.iso(t + 7),
             "type": "HEARTBEAT"}), recv),
        InboundMessage(samples.topic_of(lane), samples.encode(
            {**samples.saomai_lane(lane.sensor_id, t + 8), "speed_kmh": 210.0}), recv),
        InboundMessage(samples.topic_of(lane), samples.encode(
            samples.saomai_lane(lane.sensor_id, t + 9)), t + 9 + 3 * 60_000),
        InboundMessage(samples.topic_of(lane), b"{not json", recv),
        InboundMessage(samples.topic_of(lane), samples.encode(
            {**samples.saomai_lane(lane.sensor_id, t + 10), "speed_kmh": 900}), recv),
        msgs[0],  # a resend
    ]
    return msgs


@pytest.mark.parametrize("coalesce", [False, True])
def test_columns_encode_the_records_the_event_path_made(fleet: Fleet, coalesce: bool) -> None:
    norm = Normalizer(fleet, Settings())
    out = norm.normalize_batch(mixed(fleet))
    assert len(out.dead) == 3  # bad json, out of range, one letter for the bad gateway
    assert sum(d.bad_readings for d in out.dead) == 2
    events = out.events
    assert {e.kind for e in events} == {"reading", "incident"}
    p = partition_of if coalesce else None
    new = v2_records_of(out, p)
    old = v2_records(events, out.origin, out.keys, p)
    assert new == old  # keys, partitions, timestamps and the bytes themselves
    got = decoded([r.value for r in new])
    # Coalescing regroups single-reading messages by partition: same readings, and each
    # sensor's in order (a sensor is on one partition).
    assert (sorted(got) if coalesce else got) == (sorted(readings(events)) if coalesce
                                                  else readings(events))
    for sid in {e.sensor_id for e in events}:
        assert [g for g in got if g[0] == sid] == [r for r in readings(events) if r[0] == sid]
    cols = decode_batches([r.value for r in new])
    assert [i.event_id for i in cols.incidents] == [e.event_id for e in events
                                                    if e.kind == "incident"]


def test_dedup_over_columns_keeps_what_the_event_ids_kept(fleet: Fleet) -> None:
    norm = Normalizer(fleet, Settings())
    msgs = mixed(fleet)
    out = norm.normalize_batch(msgs)
    by_columns, by_events = DuplicateWindow(60, 100_000), DuplicateWindow(60, 100_000)
    kept = by_columns.keep_keys(out.row_key, RECV)
    assert kept.tolist() == by_events.keep(out.events, RECV)
    assert len(kept) == len(out) - len(norm.normalize_batch(msgs[-1:]))  # the resend
    fresh = out.take(kept)
    assert [e.event_id for e in fresh.events] == [out.events[k].event_id for k in kept]
    assert v2_records_of(fresh, partition_of) == v2_records(
        fresh.events, fresh.origin, fresh.keys, partition_of)
    # The same batch again (an MQTT redelivery): nothing new, either way.
    again = norm.normalize_batch(msgs)
    assert by_columns.keep_keys(again.row_key, RECV + 1000).size == 0
    assert by_events.keep(again.events, RECV + 1000) == []
    # The same reading a millisecond later is a different reading.
    later = norm.normalize_batch(mixed(fleet, T + 1))
    assert by_columns.keep_keys(later.row_key, RECV + 2000).size > len(later) / 2


def test_dedup_keys_tell_apart_what_event_ids_tell_apart(fleet: Fleet) -> None:
    """Same sensor and time as a reading and as an incident, a millisecond later, the
    farthest time the window can hold, another sensor: all distinct; a resend collides.
    Times exactly ``2**_time_bits`` apart would share a key, which is why that span is
    more than four times what the window can hold of one sensor."""
    st_ = Settings()
    norm = Normalizer(fleet, st_)
    span = st_.ingest_too_old_ms + st_.ingest_future_ms + st_.ingest_dedup_window_s * 1000
    assert 1 << norm._time_bits > 4 * span
    signals = [x for x in fleet if x.gateway is None and x.vendor == "saomai"
               and x.type == "traffic_signal"]
    s, other = signals[0], signals[1]
    cases = ((s, T, False, RECV), (s, T, True, RECV), (s, T + 1, False, RECV),
             (s, T - st_.ingest_too_old_ms + 2_000, False, RECV),
             (other, T, False, RECV), (s, T, False, RECV + 5))
    keys = []
    for sensor, t, fault, recv in cases:
        out = norm.normalize_batch([InboundMessage(samples.topic_of(sensor), samples.encode(
            samples.saomai_signal(sensor.sensor_id, t, "red", fault)), recv)])
        assert out.dead == [] and len(out) == 1
        keys.append(int(out.row_key[0]))
    assert len(set(keys[:-1])) == len(keys) - 1 and keys[-1] == keys[0]


def test_coalesced_columns_stay_bounded(fleet: Fleet) -> None:
    norm = Normalizer(fleet, Settings())
    s = next(s for s in fleet if s.gateway is None and s.vendor == "visitcount")
    msgs = [InboundMessage(*samples.device_message(s, T + i), RECV)
            for i in range(COALESCE_MAX_ROWS + 10)]
    out = norm.normalize_batch(msgs)
    records = v2_records_of(out, partition_of)
    assert [len(decode_batches([r.value]).row_time) for r in records] == [
        COALESCE_MAX_ROWS, 10]
    assert records == v2_records(out.events, out.origin, out.keys, partition_of)


def test_fallback_one_message_at_a_time_gives_the_same_columns(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the batch-wide step fails, the messages are done one by one and joined: the
    records are those of the batch-wide path, less the message that failed."""
    norm = Normalizer(fleet, Settings())
    msgs = mixed(fleet)
    want = norm.normalize_batch(msgs)
    real = Normalizer._check_and_build

    def check(self, messages, *rest):  # type: ignore[no-untyped-def]
        if len(messages) > 1:
            raise MemoryError("batch-wide step failed")
        return real(self, messages, *rest)

    monkeypatch.setattr(Normalizer, "_check_and_build", check)
    got = norm.normalize_batch(msgs)
    assert [(d.reason, d.mqtt_topic) for d in got.dead] == [
        (d.reason, d.mqtt_topic) for d in want.dead]
    assert got.keys == want.keys
    assert v2_records_of(got, partition_of) == v2_records_of(want, partition_of)
    assert np.array_equal(got.row_key, want.row_key)


@hyp_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pick=st.lists(st.integers(0, 10_000), min_size=1, max_size=40),
       shift=st.lists(st.integers(-30 * 3600_000, 600_000), min_size=1, max_size=40),
       coalesce=st.booleans())
def test_any_subset_encodes_as_the_event_path(fleet: Fleet, pick: list[int], shift: list[int],
                                               coalesce: bool) -> None:
    """Any choice of messages from the mix, some shifted out of the accepted time window
    or bent out of range: the columnar records equal the event path's."""
    norm = Normalizer(fleet, Settings())
    pool = mixed(fleet)
    msgs = []
    for k, i in enumerate(pick):
        m = pool[i % len(pool)]
        d = shift[k % len(shift)]
        msgs.append(InboundMessage(m.topic, m.payload, m.received_at - d))
    out = norm.normalize_batch(msgs)
    p = partition_of if coalesce else None
    records = v2_records_of(out, p)
    assert records == v2_records(out.events, out.origin, out.keys, p)
    assert sorted(decoded([r.value for r in records])) == sorted(readings(out.events))
