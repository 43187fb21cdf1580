"""Event contract v2 (columnar batches) and ``decode_batches``, without servers: the
readings of real normalized traffic come back the same through v1 records, v2 records
and any mix of them, and every kind of broken record is refused on its own."""

from __future__ import annotations

import struct

import hypothesis.strategies as st
import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings

from cityops.registry import Fleet, load_fleet
from cityops.settings import Settings
from ingest import samples
from ingest.contract import (
    BATCH_VERSION,
    MAX_TIME_MS,
    METRICS,
    Columns,
    Event,
    EventBatch,
    Quality,
    batch_of,
    decode_batches,
    decode_each,
    encode_batch,
    encode_event,
    event_id,
)
from ingest.normalize import InboundMessage, Normalizer

T = 1_795_312_800_123
RECV = T + 1_500


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(Settings().fleet_file)


@pytest.fixture(scope="module")
def traffic(fleet: Fleet) -> list[list[Event]]:
    """The events of each message of a realistic mix: every vendor and type as device
    messages, every gateway, incidents, a heartbeat without measurements, a clamped and a
    late reading; each message received at its own time."""
    direct = [s for s in fleet if s.gateway is None]
    msgs = [InboundMessage(*samples.device_message(s, T + i), RECV + i)
            for i, s in enumerate(direct)]
    msgs += [InboundMessage(*samples.gateway_message(gw, m, T + k), RECV + 7 * k)
             for k, (gw, m) in enumerate(fleet.gateways().items())]
    cam = next(s for s in direct if s.vendor == "guardeye")
    door = next(s for s in direct if s.vendor == "safecity" and s.type == "door_sensor")
    lane = next(s for s in direct if s.vendor == "saomai" and s.type == "lane_detector")
    msgs += [
        InboundMessage(samples.topic_of(cam), samples.encode(
            samples.guardeye_event(cam.sensor_id, T + 5)), RECV),
        InboundMessage(samples.topic_of(door), samples.encode(
            samples.safecity(door.sensor_id, T + 6, "DOOR_FORCED")), RECV),
        InboundMessage(samples.topic_of(door), samples.encode(
            {"device_id": door.sensor_id, "occurred_at": samples.iso(T + 7),
             "type": "HEARTBEAT"}), RECV),
        InboundMessage(samples.topic_of(lane), samples.encode(
            {**samples.saomai_lane(lane.sensor_id, T + 8), "speed_kmh": 210.0}), RECV),
        InboundMessage(samples.topic_of(lane), samples.encode(
            samples.saomai_lane(lane.sensor_id, T + 9)), T + 9 + 3 * 60_000),
    ]
    norm = Normalizer(fleet, Settings())
    out = []
    for m in msgs:
        events, dead = norm.normalize([m])
        assert dead == [] and events, (m, dead)
        out.append(events)
    kinds = {(e.kind, bool(e.measurements), e.quality) for g in out for e in g}
    assert {("incident", True, 0), ("reading", False, 0), ("reading", True, Quality.CLAMPED),
            ("reading", True, Quality.LATE)} <= kinds  # the fixture holds what it says
    return out


# -- what the decoder must return, computed straight from the events --------------------------
def expected(events: list[Event]) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(readings, rows, incidents) of ``events`` in stream order, with plain Python."""
    readings, rows, incidents = [], [], []
    for ev in events:
        if ev.kind == "incident":
            incidents.append((ev.sensor_id, ev.event_id, ev.event_time, ev.receive_time,
                              ev.incident, ev.measurements, ev.quality, ev.vendor))
            continue
        rows.append((ev.sensor_id, ev.event_time, ev.receive_time, ev.interval_s, ev.quality))
        for metric, value in ev.measurements.items():
            readings.append((ev.sensor_id, metric, ev.event_time, value, ev.quality))
    return readings, rows, incidents


def got(cols: Columns) -> tuple[list[tuple], list[tuple], list[tuple]]:
    sid = cols.sensor_id().tolist()
    metric = cols.metric_name().tolist()
    readings = list(zip(sid, metric, cols.time.tolist(), cols.value.tolist(),
                        cols.quality.tolist(), strict=True))
    rows = [(cols.sensor_ids[s], t, r, i, q) for s, t, r, i, q in zip(
        cols.row_sensor.tolist(), cols.row_time.tolist(), cols.row_receive_time.tolist(),
        cols.row_interval_s.tolist(), cols.row_quality.tolist(), strict=True)]
    incidents = [(i.sensor_id, i.event_id, i.event_time, i.receive_time, i.incident,
                  i.measurements, i.quality, i.vendor) for i in cols.incidents]
    return readings, rows, incidents


def encoded(groups: list[list[Event]], versions: list[int]) -> tuple[list[bytes], list[int]]:
    """Each message's events as v1 records (one per event) or one v2 record, by
    ``versions`` (cycled); and, per record, the message it came from."""
    values, origin = [], []
    for k, g in enumerate(groups):
        if versions[k % len(versions)] == 1:
            values += [encode_event(e) for e in g]
            origin += [k] * len(g)
        else:
            values.append(encode_batch(g))
            origin.append(k)
    return values, origin


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("versions", [[1], [2], [1, 2], [2, 2, 1], [1, 1, 2, 1]])
def test_v1_v2_and_mixed_decode_to_the_same_readings(traffic: list[list[Event]],
                                                      versions: list[int]) -> None:
    events = [e for g in traffic for e in g]
    values, origin = encoded(traffic, versions)
    cols = decode_batches(values)
    readings, rows, incidents = got(cols)
    want_readings, want_rows, want_incidents = expected(events)
    assert readings == want_readings
    assert rows == want_rows
    assert incidents == want_incidents
    assert len(cols) == len(want_readings) > 500
    # Codes are distinct per name, and every record index points at the right record.
    assert len(set(cols.sensor_ids)) == len(cols.sensor_ids)
    assert len(set(cols.metric_names)) == len(cols.metric_names)
    assert set(cols.metric_names) <= set(METRICS)
    by_sensor = {e.sensor_id: e.vendor for e in events}
    assert cols.vendors == [by_sensor[s] for s in cols.sensor_ids]
    row_origin = [origin[r] for r in cols.row_record.tolist()]
    want_origin = [k for k, g in enumerate(traffic) for e in g if e.kind != "incident"]
    assert row_origin == want_origin
    assert [origin[r] for r in cols.incident_record.tolist()] == [
        k for k, g in enumerate(traffic) for e in g if e.kind == "incident"]
    assert np.array_equal(cols.record, cols.row_record[cols.row])
    assert cols.time.dtype == np.int64 and cols.value.dtype == np.float64


def test_a_heartbeat_stays_a_row_without_readings(traffic: list[list[Event]]) -> None:
    beat = next(g for g in traffic if g[0].kind == "reading" and not g[0].measurements)
    for value in (encode_event(beat[0]), encode_batch(beat)):
        cols = decode_batches([value])
        assert (len(cols), cols.row_sensor.size) == (0, 1)
        assert cols.sensor_ids == [beat[0].sensor_id]
        assert int(cols.row_time[0]) == beat[0].event_time


def test_a_gateway_message_is_one_record_smaller_than_its_v1_records(
        traffic: list[list[Event]]) -> None:
    gateway = max(traffic, key=len)
    assert len(gateway) >= 4
    v2 = encode_batch(gateway)
    assert len(v2) < sum(len(encode_event(e)) for e in gateway) / 2
    b = msgspec.msgpack.decode(v2, type=EventBatch)
    assert b.v == BATCH_VERSION
    # No dimension text: it lives in the registry (ids may contain a landmark code).
    rest = v2
    for sid in {e.sensor_id for e in gateway}:
        rest = rest.replace(sid.encode(), b"")
    for e in gateway:
        for text in (e.district, e.landmark, e.domain, e.type):
            assert text.encode() not in rest


def test_empty_inputs() -> None:
    cols = decode_batches([])
    assert len(cols) == 0 and cols.row_sensor.size == 0 and cols.incidents == []
    cols = decode_batches([encode_batch([])])
    assert len(cols) == 0 and cols.sensor_ids == []


@hyp_settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(
    st.sampled_from(["a-1", "b-2", "c-3", "d-4"]),
    st.integers(0, MAX_TIME_MS - 60_000),
    st.dictionaries(st.sampled_from(sorted(METRICS)),
                    st.floats(allow_nan=False, allow_infinity=False), max_size=6),
    st.integers(0, 31), st.integers(0, 7 * 86_400), st.booleans()), max_size=30),
    min_size=1, max_size=8), st.lists(st.sampled_from([1, 2]), min_size=1, max_size=4))
def test_any_events_round_trip(groups: list[list[tuple]], versions: list[int]) -> None:
    evs = [[Event(event_id=event_id(sid, t), sensor_id=sid, domain="traffic",
                  type="lane_detector", district="d", landmark="l", lat=1.0, lon=2.0,
                  event_time=t, receive_time=t + 1, interval_s=iv, measurements=m, quality=q,
                  kind="incident" if inc else "reading", incident="fight" if inc else None,
                  vendor=sid[0]) for sid, t, m, q, iv, inc in g] for g in groups]
    values, _ = encoded(evs, versions)
    assert got(decode_batches(values)) == expected([e for g in evs for e in g])


# -- broken records ---------------------------------------------------------------------------
def _tampered(base: EventBatch, **changes: object) -> bytes:
    return msgspec.msgpack.encode(msgspec.structs.replace(base, **changes))


def broken_records(traffic: list[list[Event]]) -> list[tuple[str, bytes, str]]:
    """(what, value, words the error must contain)."""
    gateway = max(traffic, key=len)
    b = batch_of(gateway)
    good = encode_batch(gateway)
    n = len(gateway)
    return [
        ("truncated", good[:-3], ""),
        ("not msgpack", b"\xc1\xc1\xc1", ""),
        ("msgpack, not a map", msgspec.msgpack.encode([1, 2, 3]), "Expected `object`"),
        ("future version", _tampered(b, v=3), "version 3"),
        ("odd column", _tampered(b, time=b.time + b"\0"), "column lengths"),
        ("short value column", _tampered(b, value=b.value[:-8]), "column lengths"),
        ("missing vendor", _tampered(b, vendors=b.vendors[:-1]), "vendors"),
        ("sensor index out of range", _tampered(
            b, sensor=struct.pack(f"<{n}H", *([len(b.sensors)] * n))), "sensor #"),
        ("metric index out of range", _tampered(
            b, metric=bytes([len(b.metrics)]) * len(b.metric)), "metric #"),
        ("counts disagree", _tampered(b, count=struct.pack(f"<{n}H", *([1] * n))),
         "row counts"),
        ("NaN value", _tampered(b, value=struct.pack("<d", float("nan")) + b.value[8:]),
         "finite"),
        ("infinite value", _tampered(b, value=b.value[:-8] + struct.pack("<d", float("inf"))),
         "finite"),
        ("time past year 9999", _tampered(b, time=struct.pack("<q", MAX_TIME_MS + 1)
                                          + b.time[8:]), "time 253402300800000 is outside"),
        ("negative time", _tampered(b, time=b.time[:-8] + struct.pack("<q", -5)),
         "time -5 is outside"),
        ("quality past 15 bits", _tampered(b, quality=struct.pack("<H", 0x8000)
                                           + b.quality[2:]), "quality 32768 is outside"),
        ("negative interval", _tampered(b, interval_s=struct.pack("<i", -1)
                                        + b.interval_s[4:]), "interval_s -1 is outside"),
        ("wrong field type", msgspec.msgpack.encode({"v": 2, "sensors": "x"}), "Expected"),
        ("v1 not JSON", b"{not json", ""),
        ("v1 wrong version", encode_event(msgspec.structs.replace(gateway[0], v=7)),
         "version 7"),
        ("empty", b"", ""),
    ]


def test_each_broken_record_is_refused_clearly(traffic: list[list[Event]]) -> None:
    for what, value, words in broken_records(traffic):
        with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)) as exc:
            decode_batches([value])
        assert words in str(exc.value), (what, str(exc.value))


def test_one_broken_record_fails_the_batch_and_decode_each_isolates_it(
        traffic: list[list[Event]]) -> None:
    values, _ = encoded(traffic, [1, 2])
    good_readings = got(decode_batches(values))[0]
    cases = broken_records(traffic)
    mixed: list[bytes | None] = []
    bad_at: dict[int, str] = {}
    for k, v in enumerate(values):
        mixed.append(v)
        if k < len(cases):
            bad_at[len(mixed)] = cases[k][0]
            mixed.append(cases[k][1])
    mixed.append(None)  # a tombstone
    bad_at[len(mixed) - 1] = "tombstone"
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        decode_batches([v for v in mixed if v is not None])
    cols, bad = decode_each(mixed)
    assert [k for k, _ in bad] == sorted(bad_at)
    assert all(reason for _, reason in bad)
    assert got(cols)[0] == good_readings
    # record indices still point into the list given, past the refused ones
    good_positions = [k for k in range(len(mixed)) if k not in bad_at]
    assert set(cols.row_record.tolist()) <= set(good_positions)
    first_v2 = next(k for k in good_positions if mixed[k][:1] != b"{")  # type: ignore[index]
    assert first_v2 in cols.row_record.tolist()


def test_errors_name_the_record_in_a_batch(traffic: list[list[Event]]) -> None:
    gateway = max(traffic, key=len)
    b = batch_of(gateway)
    values = [encode_batch(g) for g in traffic[:5]]
    values.insert(3, _tampered(b, v=9))
    with pytest.raises(msgspec.ValidationError, match=r"record 3\)"):
        decode_batches(values)
