"""The normalizer, driven directly: every vendor format to its exact event, every kind of
bad input to its dead-letter reason, and hypothesis throwing garbage at it."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings

from cityops.registry import Fleet, Sensor, load_fleet
from cityops.settings import Settings
from ingest import samples
from ingest.contract import DEADLETTER_REASONS, Event, Quality, event_id
from ingest.dedup import DuplicateWindow
from ingest.normalize import InboundMessage, Normalizer

T = 1_795_312_800_123  # 2026-11-22T02:00:00.123Z, a reading time
RECV = T + 1_500  # received 1.5 s later


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(Settings().fleet_file)


@pytest.fixture(scope="module")
def norm(fleet: Fleet) -> Normalizer:
    return Normalizer(fleet, Settings())


def sensor(fleet: Fleet, vendor: str, typ: str) -> Sensor:
    return samples.one_of_each(fleet)[(vendor, typ)]


def msg(s: Sensor, doc: dict | str | bytes, recv: int = RECV) -> InboundMessage:
    payload = doc if isinstance(doc, bytes) else samples.encode(doc)
    return InboundMessage(samples.topic_of(s), payload, recv)


def only_event(norm: Normalizer, m: InboundMessage) -> Event:
    events, dead = norm.normalize([m])
    assert dead == [], dead
    assert len(events) == 1
    return events[0]


def check_identity(ev: Event, s: Sensor, t: int) -> None:
    assert (ev.sensor_id, ev.domain, ev.type, ev.district, ev.landmark, ev.vendor) == (
        s.sensor_id, s.domain, s.type, s.district, s.landmark, s.vendor)
    assert (ev.lat, ev.lon) == (s.lat, s.lon)
    assert ev.event_time == t
    assert ev.receive_time == RECV
    assert ev.event_id == event_id(s.sensor_id, t, ev.kind, ev.incident)
    assert ev.v == 1


TRAFFIC = {"count_motorbike": 120.0, "count_car": 14.0, "count_truck": 2.0, "count_bus": 1.0,
           "flow": 137.0}


# -- every vendor format -------------------------------------------------------------------
def test_saomai_lane_detector(norm: Normalizer, fleet: Fleet) -> None:
    s = sensor(fleet, "saomai", "lane_detector")
    ev = only_event(norm, msg(s, samples.saomai_lane(s.sensor_id, T)))
    check_identity(ev, s, T)
    assert ev.kind == "reading" and ev.incident is None and ev.interval_s == 60
    assert ev.measurements == {**TRAFFIC, "speed_kmh": 32.5, "occupancy": 0.18}
    assert ev.quality == Quality.OK


def test_saomai_signal_and_signal_fault_incident(norm: Normalizer, fleet: Fleet) -> None:
    s = sensor(fleet, "saomai", "traffic_signal")
    ev = only_event(norm, msg(s, samples.saomai_signal(s.sensor_id, T, "green", False)))
    check_identity(ev, s, T)
    assert (ev.kind, ev.measurements) == ("reading", {"signal_state": 1.0, "signal_fault": 0.0})
    fault = only_event(norm, msg(s, samples.saomai_signal(s.sensor_id, T, "amber", True)))
    check_identity(fault, s, T)
    assert (fault.kind, fault.incident) == ("incident", "signal_fault")
    assert fault.measurements == {"signal_state": 2.0, "signal_fault": 1.0}
    assert fault.event_id != ev.event_id


def test_mekongflow_iso_offset_and_si_units(norm: Normalizer, fleet: Fleet) -> None:
    s = sensor(fleet, "mekongflow", "traffic_camera")
    doc = {"deviceId": s.sensor_id, "time": "2026-11-22T09:00:00.123+07:00", "period": "PT30S",
           "flow": {"mc": 120, "car": 14, "hgv": 2, "bus": 1}, "avgSpeedMs": 9.03, "occ": 0.18}
    ev = only_event(norm, msg(s, doc))
    check_identity(ev, s, T)  # 09:00 at +07:00 is 02:00Z
    assert ev.interval_s == 30
    assert ev.measurements == {**TRAFFIC, "speed_kmh": pytest.approx(32.508, abs=1e-9),
                               "occupancy": 0.18}


def test_compact_traffic_and_footfall(norm: Normalizer, fleet: Fleet) -> None:
    s = sensor(fleet, "compact", "lane_detector")
    ev = only_event(norm, msg(s, f"C1|{s.sensor_id}|1795312800|60|T|120,14,2,1|32.5|18"))
    check_identity(ev, s, 1_795_312_800_000)  # epoch seconds -> ms
    assert ev.measurements == {**TRAFFIC, "speed_kmh": 32.5, "occupancy": 0.18}
    f = sensor(fleet, "compact", "footfall_counter")
    ev = only_event(norm, msg(f, f"C1|{f.sensor_id}|1795312800|60|F|340,310"))
    assert ev.measurements == {"footfall_in": 340.0, "footfall_out": 310.0}
    assert ev.interval_s == 60


def test_guardeye_stats_and_event(norm: Normalizer, fleet: Fleet) -> None:
    s = sensor(fleet, "guardeye", "cctv")
    ev = only_event(norm, msg(s, samples.guardeye_stats(s.sensor_id, T)))
    check_identity(ev, s, T)
    assert ev.kind == "reading"
    assert ev.measurements == {"people_count": 140.0, "crowd_density": 1.8}
    ev = only_event(norm, msg(s, samples.guardeye_event(s.sensor_id, T, "loitering")))
    assert (ev.kind, ev.incident) == ("incident", "loitering")
    assert ev.measurements == {"people_count": 3.0, "crowd_density": 0.1, "confidence": 0.92}
    d = sensor(fleet, "guardeye", "door_sensor")
    ev = only_event(norm, msg(d, {"camera": d.sensor_id, "ts": T, "kind": "event",
                                  "event": "door_forced", "confidence": 1.0}))
    assert ev.incident == "door_forced" and ev.measurements == {"confidence": 1.0}


def test_safecity_incidents_and_heartbeat(norm: Normalizer, fleet: Fleet) -> None:
    s = sensor(fleet, "safecity", "door_sensor")
    ev = only_event(norm, msg(s, {"device_id": s.sensor_id,
                                  "occurred_at": "2026-11-22T02:00:00.123Z", "type": "DOOR_OPEN",
                                  "severity": 2, "data": {"door_open": True}}))
    check_identity(ev, s, T)
    assert (ev.kind, ev.incident, ev.measurements) == ("incident", "door_open",
                                                       {"door_open": 1.0})
    c = sensor(fleet, "safecity", "cctv")
    ev = only_event(norm, msg(c, samples.safecity(c.sensor_id, T, "CROWD")))
    assert ev.incident == "crowd_density" and ev.measurements == {"people_count": 12.0}
    ev = only_event(norm, msg(c, {"device_id": c.sensor_id, "occurred_at": samples.iso(T),
                                  "type": "HEARTBEAT"}))
    assert ev.kind == "reading" and ev.measurements == {}
    p = sensor(fleet, "safecity", "panic_button")
    ev = only_event(norm, msg(p, samples.safecity(p.sensor_id, T, "PANIC")))
    assert ev.incident == "panic"


def test_visitcount_footfall_boats_hotel(norm: Normalizer, fleet: Fleet) -> None:
    f = sensor(fleet, "visitcount", "footfall_counter")
    ev = only_event(norm, msg(f, samples.visitcount_footfall(f.sensor_id, T)))
    check_identity(ev, f, T)
    assert ev.measurements == {"footfall_in": 34.0, "footfall_out": 20.0}
    b = sensor(fleet, "visitcount", "boat_counter")
    ev = only_event(norm, msg(b, samples.visitcount_boats(b.sensor_id, T)))
    assert ev.measurements == {"boats": 42.0} and ev.interval_s == 120
    h = sensor(fleet, "visitcount", "hotel")
    ev = only_event(norm, msg(h, samples.visitcount_hotel(h.sensor_id, T)))
    assert ev.measurements == {"hotel_occupancy": 0.75, "rooms_occupied": 90.0}


def test_probenet_windows_and_countries(norm: Normalizer, fleet: Fleet) -> None:
    w = sensor(fleet, "probenet", "wifi_probe")
    ev = only_event(norm, msg(w, samples.probenet_probe(w.sensor_id, T)))
    check_identity(ev, w, T)  # event time = window end
    assert ev.interval_s == 300
    m = ev.measurements
    assert m["visitors_total"] == 540.0
    assert (m["visitors_vn"], m["visitors_kr"], m["visitors_cn"], m["visitors_us"]) == (
        400.0, 40.0, 30.0, 20.0)
    assert m["visitors_other"] == 50.0 and m["visitors_jp"] == 0.0  # XX -> other
    h = sensor(fleet, "probenet", "hotel")
    ev = only_event(norm, msg(h, samples.probenet_hotel(h.sensor_id, T)))
    assert ev.measurements == {"hotel_occupancy": 61 / 80, "rooms_occupied": 61.0}
    assert ev.interval_s == 3600
    f = sensor(fleet, "probenet", "footfall_counter")
    ev = only_event(norm, msg(f, samples.probenet_footfall(f.sensor_id, T)))
    assert ev.measurements == {"footfall_in": 34.0, "footfall_out": 20.0}


def test_gateway_batch_becomes_many_events(norm: Normalizer, fleet: Fleet) -> None:
    for gw, members in fleet.gateways().items():
        topic, payload = samples.gateway_message(gw, members, T, sent_at=T + 400)
        events, dead = norm.normalize([InboundMessage(topic, payload, RECV)])
        assert dead == []
        assert [e.sensor_id for e in events] == [s.sensor_id for s in members]
        assert all(e.event_time == (T // 1000 * 1000 if s.vendor == "compact" else T)
                   for e, s in zip(events, members, strict=True))


# -- dead letters ---------------------------------------------------------------------------
def bad_cases(fleet: Fleet, t: int = T) -> list[tuple[str, str, bytes, str]]:
    """(name, topic, payload, expected reason) for readings taken around ``t``."""
    T = t  # the cases below read like the module's other examples
    sa = sensor(fleet, "saomai", "lane_detector")
    me = sensor(fleet, "mekongflow", "traffic_camera")
    co = sensor(fleet, "compact", "lane_detector")
    ge = sensor(fleet, "guardeye", "cctv")
    t_sa = samples.topic_of(sa)
    lane = samples.saomai_lane(sa.sensor_id, T)
    return [
        ("not json", t_sa, b"{not json", "bad_json"),
        ("binary", t_sa, b"\xff\xfe\x00garbage", "bad_encoding"),
        ("ts is a string", t_sa, json.dumps({**lane, "ts": "yesterday"}).encode(), "wrong_type"),
        ("json array", t_sa, b"[1, 2, 3]", "wrong_type"),
        ("no ts", t_sa, json.dumps({k: v for k, v in lane.items() if k != "ts"}).encode(),
         "missing_field"),
        ("no counts", t_sa, json.dumps({"sensor": sa.sensor_id, "ts": T}).encode(),
         "missing_field"),
        ("speed way out", t_sa, json.dumps({**lane, "speed_kmh": 900}).encode(), "out_of_range"),
        ("negative count", t_sa, json.dumps({**lane, "counts": {
            "motorbike": -5000, "car": 1, "truck": 0, "bus": 0}}).encode(), "out_of_range"),
        ("unknown sensor", "city/ninh_kieu/traffic/lane_detector/nobody-ld-sa999",
         samples.encode(samples.saomai_lane("nobody-ld-sa999", T)), "unknown_sensor"),
        ("compact garbage", samples.topic_of(co), b"HELLO|there", "unknown_format"),
        ("compact type Z", samples.topic_of(co),
         f"C1|{co.sensor_id}|{T // 1000}|60|Z|1".encode(), "unknown_format"),
        ("compact short", samples.topic_of(co), f"C1|{co.sensor_id}|{T // 1000}|60|T|1,2,3,4"
         .encode(), "missing_field"),
        ("too old", t_sa, samples.encode(samples.saomai_lane(sa.sensor_id, T - 25 * 3600_000)),
         "too_old"),
        ("in future", t_sa, samples.encode(samples.saomai_lane(sa.sensor_id, T + 600_000)),
         "in_future"),
        ("topic/payload mismatch", samples.topic_of(ge),
         samples.encode(samples.guardeye_stats("other_camera", T)), "not_owner"),
        ("wrong district", t_sa.replace(sa.district, "cai_rang"), samples.encode(lane),
         "bad_topic"),
        ("short topic", "city/ninh_kieu", samples.encode(lane), "bad_topic"),
        ("too large", t_sa, b"{" + b" " * 300_000 + b"}", "too_large"),
        ("naive iso time", samples.topic_of(me), json.dumps({
            **samples.mekongflow(me.sensor_id, T), "time": "2026-11-22T11:40:00"}).encode(),
         "wrong_type"),
        ("bad period", samples.topic_of(me), json.dumps({
            **samples.mekongflow(me.sensor_id, T), "period": "one minute"}).encode(),
         "wrong_type"),
        ("unknown guardeye event", samples.topic_of(ge), json.dumps({
            **samples.guardeye_event(ge.sensor_id, T), "event": "alien"}).encode(), "wrong_type"),
    ]


def test_each_malformed_input_has_its_reason_and_spares_its_neighbours(
        norm: Normalizer, fleet: Fleet) -> None:
    cases = bad_cases(fleet)
    good = [samples.one_of_each(fleet)[k] for k in (("saomai", "lane_detector"),
                                                     ("mekongflow", "traffic_camera"),
                                                     ("compact", "lane_detector"))]
    batch: list[InboundMessage] = []
    for _, topic, payload, _ in cases:  # good, bad, good, bad, ... in one batch
        for s in good:
            batch.append(InboundMessage(*samples.device_message(s, T), RECV))
        batch.append(InboundMessage(topic, payload, RECV))
    events, dead = norm.normalize(batch)
    assert len(events) == len(cases) * len(good)
    assert [(d.mqtt_topic, d.reason) for d in dead] == [(t, r) for _, t, _, r in cases]
    for d, (name, _, payload, _) in zip(dead, cases, strict=True):
        assert d.reason in DEADLETTER_REASONS
        assert d.detail, name
        assert d.received_at == RECV
        raw = payload if d.payload_encoding == "utf-8" else None
        if raw is not None:
            assert d.payload.encode() == payload, name
    binary = next(d for d in dead if d.payload_encoding == "base64")
    import base64
    assert base64.b64decode(binary.payload) == b"\xff\xfe\x00garbage"


def test_one_bad_gateway_element_is_dead_lettered_alone(norm: Normalizer, fleet: Fleet) -> None:
    gw, members = next((g, m) for g, m in fleet.gateways().items()
                       if m[0].vendor == "mekongflow")
    docs: list = [samples.reading(s, T) for s in members]
    docs[1] = {**docs[1], "avgSpeedMs": "fast"}
    docs[3] = {**docs[3], "deviceId": "ghost-ld-me999"}
    docs.append(42)
    topic, payload = samples.gateway_message(gw, members, T, readings=docs)
    events, dead = norm.normalize([InboundMessage(topic, payload, RECV)])
    assert [e.sensor_id for e in events] == [s.sensor_id for i, s in enumerate(members)
                                             if i not in (1, 3)]
    # One letter for the message (issue 14: no amplification), first element's reason.
    assert len(dead) == 1
    d = dead[0]
    assert (d.reason, d.bad_readings, d.mqtt_topic) == ("wrong_type", 3, topic)
    assert [r.split(":")[0] for r in d.reasons] == [
        "#1 wrong_type", "#3 unknown_sensor", f"#{len(members)} unknown_format"]
    assert f"3 of {len(members) + 1} readings refused" in d.detail
    assert json.loads(d.payload)["readings"][1]["avgSpeedMs"] == "fast"  # the whole message
    # A broken envelope refuses the whole message.
    _, dead = norm.normalize([InboundMessage(topic, b'{"gateway": "x"', RECV)])
    assert [d.reason for d in dead] == ["bad_json"]
    _, dead = norm.normalize([InboundMessage(topic, json.dumps(
        {"gateway": "gw-elsewhere", "readings": []}).encode(), RECV)])
    assert [d.reason for d in dead] == ["bad_topic"]


def test_time_and_range_quality_flags(norm: Normalizer, fleet: Fleet) -> None:
    s = sensor(fleet, "saomai", "lane_detector")
    lane = samples.saomai_lane(s.sensor_id, T)
    late = only_event(norm, msg(s, lane, recv=T + 3 * 60_000))
    assert late.quality == Quality.LATE
    skewed = only_event(norm, msg(s, lane, recv=T - 10_000))
    assert skewed.quality == Quality.CLOCK_SKEWED
    clamped = only_event(norm, msg(s, {**lane, "speed_kmh": 210.0, "occupancy_pct": -3}))
    assert clamped.quality == Quality.CLAMPED
    assert clamped.measurements["speed_kmh"] == 200.0
    assert clamped.measurements["occupancy"] == 0.0
    assert clamped.measurements["flow"] == 137.0  # untouched neighbours in the same row
    _, dead = norm.normalize([msg(s, {**lane, "speed_kmh": 221.0})])
    assert dead[0].reason == "out_of_range" and "speed_kmh" in dead[0].detail


def test_joined_fast_path_cannot_merge_two_broken_payloads(norm: Normalizer,
                                                           fleet: Fleet) -> None:
    """Two invalid payloads that would join into a valid JSON array of two readings."""
    s = sensor(fleet, "saomai", "signal" if False else "traffic_signal")
    a = b'{"sensor": "%s", "ts": %d, "phase": "red", "x": "}' % (s.sensor_id.encode(), T)
    b = b'{"}, {"sensor": "%s", "ts": %d, "phase": "red"}' % (s.sensor_id.encode(), T + 1)
    joined = json.loads(b"[" + a + b"," + b + b"]")
    assert len(joined) == 2  # the trap is real
    events, dead = norm.normalize([msg(s, a), msg(s, b)])
    assert events == [] and [d.reason for d in dead] == ["bad_json", "bad_json"]


def test_duplicate_window_drops_resends_and_stays_bounded(norm: Normalizer,
                                                          fleet: Fleet) -> None:
    s = sensor(fleet, "saomai", "lane_detector")
    events, _ = norm.normalize([msg(s, samples.saomai_lane(s.sensor_id, T + i)) for i in range(5)])
    window = DuplicateWindow(window_s=60, max_ids=1000)
    kept, dropped = window.filter(events, RECV)
    assert (len(kept), dropped) == (5, 0)
    kept, dropped = window.filter(events[:3] + events[:1], RECV + 1000)
    assert (kept, dropped) == ([], 4)
    kept, dropped = window.filter(events[:2], RECV + 61_000 + 15_000)  # window has passed
    assert (len(kept), dropped) == (2, 0)
    small = DuplicateWindow(window_s=60, max_ids=10)
    many, _ = norm.normalize([msg(s, samples.saomai_lane(s.sensor_id, T + i))
                              for i in range(100)])
    for k in range(0, 100, 5):
        small.filter(many[k:k + 5], RECV + k * 4000)
    assert len(small) <= small.capacity == 32  # a fixed table: 2x max_ids, rounded up


def test_duplicate_window_is_one_fixed_table_that_forgets_the_oldest_first() -> None:
    """The window's memory is taken at start and never grows; past its capacity it
    forgets its oldest keys, never one it saw last; within the window nothing is
    forgotten while it has room."""
    window = DuplicateWindow(window_s=600, max_ids=50_000)
    nbytes = window._keys.nbytes + window._seen.nbytes
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 2**62, 500, dtype=np.int64) for _ in range(60)]
    for i, b in enumerate(batches):  # 30,000 keys, 1 s apart: all inside the window
        assert window.keep_keys(b, RECV + i * 1000).size == b.size
    assert len(window) == 30_000
    for i, b in enumerate(batches):  # every one of them is still a duplicate
        assert window.keep_keys(b, RECV + 60_000 + i).size == 0
    # In-batch repeats: the first is kept.
    fresh = rng.integers(0, 2**62, 10, dtype=np.int64)
    assert window.keep_keys(np.r_[fresh, fresh[:3]], RECV + 61_000).tolist() == list(range(10))
    # 10x more keys than it holds: the newest batch is always remembered, memory fixed.
    for i in range(1000):
        b = rng.integers(0, 2**62, 500, dtype=np.int64)
        window.keep_keys(b, RECV + 100_000 + i * 10)
    assert window.keep_keys(b, RECV + 120_000).size == 0
    assert window._keys.nbytes + window._seen.nbytes == nbytes
    assert len(window) <= window.capacity
    # Past the window, everything is new again.
    assert window.keep_keys(b, RECV + 120_000 + 600_001).size == b.size


# -- poison messages (issue 14): nothing one message holds stops the batch ----------------
def _lane_bytes(fleet: Fleet, t: int = T) -> tuple[str, bytes]:
    sa = sensor(fleet, "saomai", "lane_detector")
    return samples.topic_of(sa), json.dumps(samples.saomai_lane(sa.sensor_id, t)).encode()


def _with_extra(payload: bytes, extra: bytes) -> bytes:
    """The JSON object ``payload`` with ``extra`` (``"key": value`` bytes) appended."""
    return payload[:-1] + b", " + extra + b"}"


def poison_elements(fleet: Fleet, t: int = T) -> list[tuple[str, bytes, str]]:
    """(name, one saomai lane payload, expected reason): inputs that escaped the adapters'
    error handling (or were stored) before issue 14. Each fits in a gateway element too."""
    _, lane = _lane_bytes(fleet, t)
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("100k-deep array in an unknown field", _with_extra(lane, b'"extra": ' + deep),
         "too_deep"),
        ("33-deep objects in an unknown field", _with_extra(lane, b'"extra": ' + b'{"a":' * 33
                                                           + b"1" + b"}" * 33), "too_deep"),
        ("invalid UTF-8 in the sensor id", lane.replace(b'"sensor": "', b'"sensor": "\xff'),
         "bad_encoding"),
        ("invalid UTF-8 in an unknown field", _with_extra(lane, b'"note": "caf\xe9"'),
         "bad_encoding"),
        ("invalid UTF-8 in a key", _with_extra(lane, b'"\xc3\x28": 1'), "bad_encoding"),
        ("400-digit count", lane.replace(b'"motorbike": 120', b'"motorbike": ' + b"9" * 400),
         "number_out_of_range"),
        ("400-digit event time", lane.replace(str(t).encode(), b"9" * 400),
         "number_out_of_range"),
        ("400-digit interval", lane.replace(b'"interval_s": 60', b'"interval_s": ' + b"9" * 400),
         "number_out_of_range"),
        ("-400-digit interval", lane.replace(b'"interval_s": 60',
                                             b'"interval_s": -' + b"9" * 400),
         "number_out_of_range"),
        ("speed 1e400", lane.replace(b'"speed_kmh": 32.5', b'"speed_kmh": 1e400'),
         "number_out_of_range"),
        ("400-digit number in an unknown field", _with_extra(lane, b'"x": ' + b"7" * 400),
         "number_out_of_range"),
        ("duplicate key", _with_extra(lane, b'"speed_kmh": 99'), "duplicate_key"),
        ("duplicate nested key", lane.replace(b'"car": 14', b'"car": 14, "car": 15'),
         "duplicate_key"),
        ("duplicate key spelled with an escape", _with_extra(lane, b'"speed_km\\u0068": 99'),
         "duplicate_key"),
        ("small negative count", lane.replace(b'"motorbike": 120', b'"motorbike": -3'),
         "out_of_range"),
    ]


def gateway_bytes(gw: str, t: int, elements: list[bytes], sep: bytes = b", ") -> bytes:
    """A gateway message around raw element bytes (which ``json.dumps`` could not write)."""
    return (b'{"gateway": "%s", "sent_at": %d, "readings": [' % (gw.encode(), t)
            + sep.join(elements) + b"]}")


def test_poison_payloads_are_dead_lettered_with_their_own_reason(norm: Normalizer,
                                                                 fleet: Fleet) -> None:
    topic, _ = _lane_bytes(fleet)
    good = [samples.one_of_each(fleet)[k] for k in (("saomai", "lane_detector"),
                                                     ("probenet", "wifi_probe"))]
    cases = poison_elements(fleet)
    batch: list[InboundMessage] = []
    for _, payload, _ in cases:
        batch += [InboundMessage(*samples.device_message(s, T), RECV) for s in good]
        batch.append(InboundMessage(topic, payload, RECV))
    events, dead = norm.normalize(batch)
    assert [(d.mqtt_topic, d.reason) for d in dead] == [(topic, r) for *_, r in cases], \
        [(name, d.reason, d.detail[:120]) for (name, *_), d in zip(cases, dead, strict=False)]
    assert len(events) == len(cases) * len(good)
    for d, (name, payload, _) in zip(dead, cases, strict=True):
        assert d.reason in DEADLETTER_REASONS and d.detail, name
        raw = d.payload.encode() if d.payload_encoding == "utf-8" else \
            __import__("base64").b64decode(d.payload)
        assert raw == payload, name  # the raw bytes, intact


def test_poison_gateway_elements_are_dead_lettered_and_the_rest_goes_on(fleet: Fleet) -> None:
    sa = sensor(fleet, "saomai", "lane_detector")
    gw = "gw-poison-test"
    # The lane sensor sits behind this gateway here, so only the poison decides (an
    # element of a sensor not behind its gateway is refused as not_owner first).
    behind = dataclasses.replace(sa, gateway=gw)
    fleet = dataclasses.replace(fleet, sensors=tuple(
        behind if s.sensor_id == sa.sensor_id else s for s in fleet))
    norm = Normalizer(fleet, Settings())
    topic = f"city/{sa.district}/gateway/{gw}"
    for name, element, reason in poison_elements(fleet):
        good = samples.encode(samples.saomai_lane(sa.sensor_id, T + 1))
        payload = gateway_bytes(gw, T, [good, element, good.replace(b"%d" % (T + 1),
                                                                    b"%d" % (T + 2))])
        if len(payload) > 256 * 1024:
            continue
        events, dead = norm.normalize([InboundMessage(topic, payload, RECV)])
        if name.startswith("100k-deep"):  # deeper than msgspec can even skip: the
            assert events == [] and [d.reason for d in dead] == ["too_deep"]  # whole message
            continue
        assert [e.event_time for e in events] == [T + 1, T + 2], name
        assert [d.reason for d in dead] == [reason], (name, [d.detail[:200] for d in dead])
        assert dead[0].bad_readings == 1 and "#1" in dead[0].detail, name


def test_poison_in_the_gateway_envelope_refuses_the_message(norm: Normalizer,
                                                           fleet: Fleet) -> None:
    sa = sensor(fleet, "saomai", "lane_detector")
    topic = f"city/{sa.district}/gateway/gw-env"
    good = samples.encode(samples.saomai_lane(sa.sensor_id, T))
    env = gateway_bytes("gw-env", T, [good])
    cases = [
        (_with_extra(env, b'"extra": ' + b"[" * 50_000 + b"]" * 50_000), "too_deep"),
        (_with_extra(env, b'"note": "\xff"'), "bad_encoding"),
        (_with_extra(env, b'"gateway": "gw-env"'), "duplicate_key"),
        (env.replace(b'"sent_at": %d' % T, b'"sent_at": ' + b"9" * 400), "number_out_of_range"),
    ]
    for payload, reason in cases:
        events, dead = norm.normalize([InboundMessage(topic, payload, RECV)])
        assert events == [] and [d.reason for d in dead] == [reason], dead


def test_any_exception_while_decoding_one_message_dead_letters_only_it(
        norm: Normalizer, fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever an adapter or the batch-wide checks raise: that message becomes a dead
    letter naming the exception, and the rest of the batch goes on."""
    s = sensor(fleet, "saomai", "lane_detector")
    adapter = norm.adapters["saomai"]
    real_rows = adapter.rows

    def rows(rec):  # type: ignore[no-untyped-def]
        if rec.ts == T + 13:
            raise ZeroDivisionError("boom in rows")
        return real_rows(rec)

    monkeypatch.setattr(adapter, "rows", rows)
    batch = [msg(s, samples.saomai_lane(s.sensor_id, T + i)) for i in range(20)]
    events, dead = norm.normalize(batch)
    assert len(events) == 19 and [d.reason for d in dead] == ["decode_failed"]
    assert "ZeroDivisionError: boom in rows" in dead[0].detail
    monkeypatch.undo()

    real_check = Normalizer._check_and_build

    def check(self, messages, *rest):  # type: ignore[no-untyped-def]
        if any(m.payload.endswith(b"poison") for m in messages):
            raise MemoryError("the batch-wide step failed")
        return real_check(self, messages, *rest)

    monkeypatch.setattr(Normalizer, "_check_and_build", check)
    batch.insert(7, msg(s, b'{"sensor": "x"} poison'))
    events, dead = norm.normalize(batch)
    assert len(events) == 20
    assert [d.reason for d in dead] == ["decode_failed"]
    assert "MemoryError: the batch-wide step failed" in dead[0].detail


def test_gateway_bad_readings_become_one_dead_letter_per_message(norm: Normalizer,
                                                                fleet: Fleet) -> None:
    """Amplification: a 200 kB gateway message of bad readings is one dead letter (with the
    count and the first reasons), not 100,000; its good readings still go on."""
    gw, members = next(iter(fleet.gateways().items()))
    docs = [samples.reading(s, T) for s in members]
    good = [json.dumps(d).encode() for d in docs]
    elements = good[:1] + [b"0"] * 100_000 + good[1:]
    payload = gateway_bytes(gw, T, elements, b",")
    assert 200_000 < len(payload) < 256 * 1024
    topic = samples.gateway_topic(members[0].district, gw)
    events, dead = norm.normalize([InboundMessage(topic, payload, RECV)])
    assert [e.sensor_id for e in events] == [s.sensor_id for s in members]
    assert len(dead) == 1
    d = dead[0]
    assert d.reason == "unknown_format" and d.bad_readings == 100_000
    assert len(d.reasons) == 5 and all(r.startswith("#") for r in d.reasons)
    assert d.reasons[0].startswith("#1 unknown_format")
    assert "100000 of 100" in d.detail.replace(",", "")
    assert d.payload.encode() == payload  # the whole message, intact


def test_negative_count_is_refused_but_a_noisy_ratio_is_still_clamped(
        norm: Normalizer, fleet: Fleet) -> None:
    """Counts are exact: -1 vehicles is impossible, not noise (no vendor documents sending
    it), so it is refused. Measured quantities near their bound keep the clamp."""
    s = sensor(fleet, "saomai", "lane_detector")
    lane = samples.saomai_lane(s.sensor_id, T)
    for counts in ({"motorbike": -1, "car": 0, "truck": 0, "bus": 0},
                   {"motorbike": 10, "car": 0, "truck": -1, "bus": 0}):
        events, dead = norm.normalize([msg(s, {**lane, "counts": counts})])
        assert events == [] and [d.reason for d in dead] == ["out_of_range"]
        assert "negative" in dead[0].detail
    v = sensor(fleet, "visitcount", "footfall_counter")
    _, dead = norm.normalize([msg(v, {**samples.visitcount_footfall(v.sensor_id, T),
                                      "out": -2})])
    assert [d.reason for d in dead] == ["out_of_range"]
    ev = only_event(norm, msg(s, {**lane, "occupancy_pct": -3}))
    assert ev.quality == Quality.CLAMPED and ev.measurements["occupancy"] == 0.0


# -- hypothesis: garbage never escapes the dead-letter path --------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["sensor", "ts", "interval_s", "counts", "deviceId",
                                       "time", "period", "flow", "camera", "kind", "event",
                                       "device_id", "occurred_at", "type", "data", "probe",
                                       "window", "readings", "gateway", "in", "out", "rooms",
                                       "occupied", "by_country", "mc", "start", "end"])
                      | st.text(max_size=8), children, max_size=6),
    max_leaves=20)


def _assert_accounted(norm: Normalizer, messages: list[InboundMessage]) -> None:
    events, dead = norm.normalize(messages)
    for d in dead:
        assert d.reason in DEADLETTER_REASONS
    for m in messages:
        if "/gateway/" in m.topic:
            continue
        mine = [e for e in events if e.receive_time == m.received_at]
        mine_dead = [d for d in dead if d.received_at == m.received_at]
        assert bool(mine) != bool(mine_dead), (m, events, dead)  # one or the other, never both
        assert len(mine_dead) <= 1


@hyp_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
       which=st.integers(min_value=0, max_value=10_000))
def test_arbitrary_bytes_never_raise(norm: Normalizer, fleet: Fleet, payloads: list[bytes],
                                     which: int) -> None:
    sensors = list(samples.one_of_each(fleet).values())
    msgs = [InboundMessage(samples.topic_of(sensors[(which + i) % len(sensors)]), p, RECV + i)
            for i, p in enumerate(payloads)]
    msgs.append(InboundMessage("city/ninh_kieu/gateway/gw-x", payloads[0], RECV + 99))
    _assert_accounted(norm, msgs)


@hyp_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(json_values, min_size=1, max_size=6),
       which=st.integers(min_value=0, max_value=10_000))
def test_arbitrary_json_never_raises(norm: Normalizer, fleet: Fleet, docs: list,
                                     which: int) -> None:
    sensors = list(samples.one_of_each(fleet).values())
    msgs = [InboundMessage(samples.topic_of(sensors[(which + i) % len(sensors)]),
                           json.dumps(d).encode(), RECV + i) for i, d in enumerate(docs)]
    gw, members = next(iter(fleet.gateways().items()))
    topic, payload = samples.gateway_message(gw, members, T, readings=docs)
    msgs.append(InboundMessage(topic, payload, RECV + 99))
    _assert_accounted(norm, msgs)


@hyp_settings(max_examples=200, deadline=None)
@given(ts=st.integers(min_value=-(2**63), max_value=2**64 - 1),
       speed=st.floats(allow_nan=False), occ=st.floats(allow_nan=False),
       interval=st.integers(min_value=-(2**63), max_value=2**64 - 1))
def test_arbitrary_numbers_in_a_valid_shape(norm: Normalizer, fleet: Fleet, ts: int,
                                            speed: float, occ: float, interval: int) -> None:
    s = sensor(fleet, "saomai", "lane_detector")
    doc = {**samples.saomai_lane(s.sensor_id, T), "ts": ts, "speed_kmh": speed,
           "occupancy_pct": occ, "interval_s": interval}
    c = sensor(fleet, "compact", "lane_detector")
    line = f"C1|{c.sensor_id}|{ts}|{interval}|T|1,2,3,4|{speed}|{occ}"
    _assert_accounted(norm, [msg(s, json.dumps(doc).encode()), msg(c, line, RECV + 1)])


def test_utc_epoch_sanity() -> None:
    assert datetime.fromtimestamp(T / 1000, UTC).isoformat() == "2026-11-22T02:00:00.123000+00:00"
