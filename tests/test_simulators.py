"""The simulators without a broker: determinism, shards, vendor formats, scenarios, faults.

Every payload is checked against a strict per-vendor schema written here from
``simulators/PAYLOADS.md`` (not imported from the simulators), and every ground-truth
claim (event time, normalized measurements, malformed reason) is checked against what
the payload itself says.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections import Counter, defaultdict
from typing import Any, Literal

import msgspec
import numpy as np
import pytest

from cityops.registry import load_fleet
from cityops.settings import DEFAULT_FLEET
from ingest.contract import METRICS, NATIONALITIES
from simulators.clock import local_hour, parse_start
from simulators.groundtruth import GroundTruthWriter, Reading, Truth, read_ground_truth
from simulators.scenarios import ScenarioError, parse_scenario
from simulators.simulation import Sent, Simulation

FLEET = load_fleet(DEFAULT_FLEET)
MONDAY_7H = parse_start("2026-11-23T07:00")  # a Monday, no holiday, Can Tho local time


# --- vendor schemas, from PAYLOADS.md ------------------------------------------------------
class Strict(msgspec.Struct, forbid_unknown_fields=True):
    pass


class SaomaiCounts(Strict):
    motorbike: int
    car: int
    truck: int
    bus: int


class SaomaiTraffic(Strict):
    sensor: str
    ts: int
    interval_s: int
    counts: SaomaiCounts
    speed_kmh: float
    occupancy_pct: float


class SaomaiSignal(Strict):
    sensor: str
    ts: int
    phase: Literal["off", "green", "amber", "red", "flashing"]
    fault: bool


class MekongFlowCounts(Strict):
    mc: int
    car: int
    hgv: int
    bus: int


class MekongFlow(Strict):
    deviceId: str
    time: str
    period: Literal["PT30S", "PT1M", "PT2M", "PT5M", "PT1H"]
    flow: MekongFlowCounts
    avgSpeedMs: float
    occ: float


EVENTS = Literal["intrusion", "crowd_density", "loitering", "abandoned_object", "fight",
                 "door_forced", "door_open", "door_closed"]


class GuardeyeStats(Strict):
    camera: str
    ts: int
    kind: Literal["stats"]
    people: int
    density: float


class GuardeyeEvent(Strict):
    camera: str
    ts: int
    kind: Literal["event"]
    event: EVENTS
    confidence: float
    people: int
    density: float


class SafecityData(Strict):
    door_open: bool | None = None
    people: int | None = None
    density: float | None = None


class Safecity(Strict):
    device_id: str
    occurred_at: str
    type: Literal["HEARTBEAT", "PANIC", "DOOR_OPEN", "DOOR_CLOSED", "DOOR_FORCED", "INTRUSION",
                  "LOITERING", "ABANDONED_OBJECT", "FIGHT", "CROWD"]
    severity: int
    data: SafecityData


class VisitFootfall(Strict):
    sensor: str
    ts: int
    interval_s: int
    in_: int = msgspec.field(name="in")
    out: int


class VisitBoats(Strict):
    sensor: str
    ts: int
    interval_s: int
    boats: int


class VisitHotel(Strict):
    sensor: str
    ts: int
    rooms: int
    occupied: int


class ProbeWindow(Strict):
    start: str
    end: str


class ProbeVisitors(Strict):
    probe: str
    window: ProbeWindow
    unique_devices: int
    by_country: dict[str, int]


class ProbeFootfall(Strict):
    probe: str
    window: ProbeWindow
    entries: int
    exits: int


class ProbeHotel(Strict):
    probe: str
    window: ProbeWindow
    rooms_total: int
    rooms_occupied: int


class Gateway(Strict):
    gateway: str
    sent_at: int
    readings: list[Any]


COMPACT = re.compile(r"^C1\|([a-z0-9_]+-[a-z]{2}-[a-z]{2}\d{3})\|(\d{10})\|(\d+)\|"
                     r"(?:T\|(\d+),(\d+),(\d+),(\d+)\|(\d+(?:\.\d+)?)\|(\d+(?:\.\d+)?)"
                     r"|F\|(\d+),(\d+))$")

JSON_SCHEMAS: dict[str, list[type[Strict]]] = {
    "saomai": [SaomaiTraffic, SaomaiSignal],
    "mekongflow": [MekongFlow],
    "guardeye": [GuardeyeStats, GuardeyeEvent],
    "safecity": [Safecity],
    "visitcount": [VisitFootfall, VisitBoats, VisitHotel],
    "probenet": [ProbeVisitors, ProbeFootfall, ProbeHotel],
}


def iso_ms(text: str) -> int:
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert when.tzinfo is not None, f"time without offset: {text}"
    return round(when.timestamp() * 1000)


def parse_payload(vendor: str, element: Any) -> tuple[str, int, dict[str, float], str | None]:
    """Decode one device payload with its vendor schema and normalize it the way the
    contract says: (sensor id, event time ms, measurements, incident)."""
    if vendor == "compact":
        assert isinstance(element, str), "compact payloads are text lines"
        m = COMPACT.match(element)
        assert m, f"compact line does not parse: {element!r}"
        g = m.groups()
        if g[3] is not None:
            mc, car, truck, bus = (int(x) for x in g[3:7])
            return g[0], int(g[1]) * 1000, {
                "count_motorbike": mc, "count_car": car, "count_truck": truck, "count_bus": bus,
                "flow": mc + car + truck + bus, "speed_kmh": float(g[7]),
                "occupancy": float(g[8]) / 100}, None
        return g[0], int(g[1]) * 1000, {"footfall_in": int(g[9]), "footfall_out": int(g[10])}, None
    raw = element if isinstance(element, dict) else json.loads(element)
    errors = []
    for schema in JSON_SCHEMAS[vendor]:
        try:
            obj = msgspec.convert(raw, schema, strict=True)
        except msgspec.ValidationError as exc:
            errors.append(str(exc))
            continue
        return _normalize(obj)
    raise AssertionError(f"{vendor} payload fits none of its schemas: {raw} ({errors})")


def _normalize(o: Strict) -> tuple[str, int, dict[str, float], str | None]:
    match o:
        case SaomaiTraffic():
            c = o.counts
            return o.sensor, o.ts, {
                "count_motorbike": c.motorbike, "count_car": c.car, "count_truck": c.truck,
                "count_bus": c.bus, "flow": c.motorbike + c.car + c.truck + c.bus,
                "speed_kmh": o.speed_kmh, "occupancy": o.occupancy_pct / 100}, None
        case SaomaiSignal():
            states = {"off": 0, "green": 1, "amber": 2, "red": 3, "flashing": 4}
            return o.sensor, o.ts, {"signal_state": states[o.phase],
                                    "signal_fault": int(o.fault)}, \
                "signal_fault" if o.fault else None
        case MekongFlow():
            f = o.flow
            return o.deviceId, iso_ms(o.time), {
                "count_motorbike": f.mc, "count_car": f.car, "count_truck": f.hgv,
                "count_bus": f.bus, "flow": f.mc + f.car + f.hgv + f.bus,
                "speed_kmh": o.avgSpeedMs * 3.6, "occupancy": o.occ}, None
        case GuardeyeStats():
            return o.camera, o.ts, {"people_count": o.people, "crowd_density": o.density}, None
        case GuardeyeEvent():
            return o.camera, o.ts, {"confidence": o.confidence, "people_count": o.people,
                                    "crowd_density": o.density}, o.event
        case Safecity():
            meas: dict[str, float] = {}
            if o.data.people is not None:
                meas["people_count"] = o.data.people
            if o.data.density is not None:
                meas["crowd_density"] = o.data.density
            if o.data.door_open is not None:
                meas["door_open"] = int(o.data.door_open)
            incident = None if o.type == "HEARTBEAT" else \
                {"CROWD": "crowd_density"}.get(o.type, o.type.lower())
            return o.device_id, iso_ms(o.occurred_at), meas, incident
        case VisitFootfall():
            return o.sensor, o.ts, {"footfall_in": o.in_, "footfall_out": o.out}, None
        case VisitBoats():
            return o.sensor, o.ts, {"boats": o.boats}, None
        case VisitHotel():
            return o.sensor, o.ts, {"hotel_occupancy": o.occupied / o.rooms,
                                    "rooms_occupied": o.occupied}, None
        case ProbeVisitors():
            meas = {"visitors_total": o.unique_devices}
            for cc, n in o.by_country.items():
                assert cc == cc.upper()
                key = cc.lower() if cc.lower() in NATIONALITIES else "other"
                meas[f"visitors_{key}"] = meas.get(f"visitors_{key}", 0) + n
            return o.probe, iso_ms(o.window.end), meas, None
        case ProbeFootfall():
            return o.probe, iso_ms(o.window.end), {"footfall_in": o.entries,
                                                   "footfall_out": o.exits}, None
        case ProbeHotel():
            return o.probe, iso_ms(o.window.end), {
                "hotel_occupancy": o.rooms_occupied / o.rooms_total,
                "rooms_occupied": o.rooms_occupied}, None
    raise AssertionError(o)


def elements(sent: Sent) -> list[tuple[str, Any]]:
    """(vendor, element) for every reading in a message, gateway batches unpacked."""
    if sent.truth.gateway:
        batch = msgspec.json.decode(sent.payload, type=Gateway, strict=True)
        assert sent.topic.endswith("/gateway/" + batch.gateway)
        return [(FLEET.get(r.sensor_id).vendor if FLEET.get(r.sensor_id) else sent.truth.vendor,
                 e) for r, e in zip(sent.truth.readings, batch.readings, strict=True)]
    vendor = sent.truth.vendor
    text = sent.payload.decode()
    return [(vendor, text if vendor == "compact" else json.loads(text))]


# --- helpers -----------------------------------------------------------------------------
def run_until(sim: Simulation, hours: float) -> list[Sent]:
    """Every message sent in the first ``hours`` of simulated time."""
    end = sim.start_ms + int(hours * 3_600_000)
    out: list[Sent] = []
    for batch in sim.batches():
        out.extend(m for m in batch if m.truth.send_time < end)
        if batch and batch[-1].truth.send_time >= end:
            return out
        if not batch and sim.start_ms + sim._window * sim.window_ms > end + 3_600_000:
            return out


def readings(msgs: list[Sent]) -> list[Reading]:
    return [r for m in msgs for r in m.truth.readings]


def by_sensor(msgs: list[Sent], prefix: str, metric: str, t_from: int = 0,
              t_to: int = 1 << 62) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for r in readings(msgs):
        if (r.sensor_id.startswith(prefix) and metric in r.measurements
                and t_from <= r.true_time < t_to and r.kind == "reading"):
            out[r.sensor_id].append(r.measurements[metric])
    return out


def mean_of(values: dict[str, list[float]]) -> float:
    flat = [v for vs in values.values() for v in vs]
    assert flat, "no readings matched"
    return float(np.mean(flat))


# --- determinism and shards ---------------------------------------------------------------
def test_same_seed_same_bytes_and_another_seed_differs() -> None:
    a = Simulation(FLEET, seed=11, start_ms=MONDAY_7H, malformed_share=0.02,
                   scenarios=["duplicates", "disorder", "skew"]).messages(6000)
    b = Simulation(DEFAULT_FLEET, seed=11, start_ms=MONDAY_7H, malformed_share=0.02,
                   scenarios=["duplicates", "disorder", "skew"]).messages(6000)
    c = Simulation(FLEET, seed=12, start_ms=MONDAY_7H, malformed_share=0.02,
                   scenarios=["duplicates", "disorder", "skew"]).messages(6000)
    assert [(m.topic, m.payload) for m in a] == [(m.topic, m.payload) for m in b]
    assert [m.truth for m in a] == [m.truth for m in b]
    same = sum(x.payload == y.payload for x, y in zip(a, c, strict=True))
    assert same < len(a) * 0.2, "another seed must give another stream"


def test_messages_continue_the_stream() -> None:
    whole = Simulation(FLEET, seed=5, start_ms=MONDAY_7H).messages(3000)
    sim = Simulation(FLEET, seed=5, start_ms=MONDAY_7H)
    parts = sim.messages(1000) + sim.messages(2000)
    assert [m.payload for m in parts] == [m.payload for m in whole]
    assert [m.truth.seq for m in parts] == list(range(3000))


def test_shards_split_the_fleet_without_overlap() -> None:
    n = 3
    sims = [Simulation(FLEET, seed=2, start_ms=MONDAY_7H, shard=(i, n),
                       malformed_share=0.01, scenarios=["duplicates"]) for i in range(n)]
    sets = [set(s.sensors) for s in sims]
    assert all(sets), "every shard gets devices"
    for i in range(n):
        for j in range(i + 1, n):
            assert not sets[i] & sets[j]
    assert set().union(*sets) == {s.sensor_id for s in FLEET}
    # gateways stay whole: all devices behind one gateway are in the same shard
    for members in FLEET.gateways().values():
        assert sum(any(m.sensor_id in s for m in members) for s in sets) == 1
    # and the shards' streams are exactly the whole fleet's stream, split
    whole = run_until(Simulation(FLEET, seed=2, start_ms=MONDAY_7H, malformed_share=0.01,
                                 scenarios=["duplicates"]), 1.0)
    parts = [run_until(s, 1.0) for s in sims]
    assert Counter(m.payload for m in whole) == Counter(m.payload for p in parts for m in p)
    for s, p in zip(sets, parts, strict=True):
        assert {r.sensor_id for m in p for r in m.truth.readings if not r.malformed} <= s


# --- payload formats ---------------------------------------------------------------------
def test_every_payload_parses_with_its_vendor_schema_and_matches_ground_truth() -> None:
    sim = Simulation(FLEET, seed=4, start_ms=parse_start("2026-11-28T19:00"),  # a Saturday
                     scenarios=["festival", "intrusion:after=2h", "skew"])
    msgs = run_until(sim, 3.5)
    seen_vendors: Counter[str] = Counter()
    seen_incidents: Counter[str] = Counter()
    gateway_msgs = 0
    for m in msgs:
        gateway_msgs += m.truth.gateway
        els = elements(m)
        assert len(els) == len(m.truth.readings)
        for (vendor, element), r in zip(els, m.truth.readings, strict=True):
            sid, event_time, meas, incident = parse_payload(vendor, element)
            seen_vendors[vendor] += 1
            assert sid == r.sensor_id
            sensor = FLEET.get(sid)
            assert sensor is not None and sensor.vendor == vendor
            if not m.truth.gateway:
                assert m.topic == f"city/{sensor.topic_suffix}"
            assert event_time == r.event_time
            assert abs(event_time - (r.true_time + r.skew_ms)) < 1000
            assert incident == r.incident
            assert (r.kind == "incident") == (incident is not None)
            assert set(meas) == set(r.measurements), (vendor, element)
            for key, value in meas.items():
                assert math.isclose(value, r.measurements[key], rel_tol=1e-9, abs_tol=1e-9)
                lo, hi = METRICS[key].lo, METRICS[key].hi
                assert lo <= value <= hi, f"{key}={value} outside {lo}..{hi}"
            if incident:
                seen_incidents[incident] += 1
            if "visitors_total" in meas:
                assert meas["visitors_total"] == sum(
                    v for k, v in meas.items() if k != "visitors_total")
    assert set(seen_vendors) == {"saomai", "mekongflow", "compact", "guardeye", "safecity",
                                 "visitcount", "probenet"}
    assert gateway_msgs > 0
    assert {"intrusion", "door_forced", "crowd_density", "door_open"} <= set(seen_incidents)


def test_malformed_payloads_appear_at_the_requested_share_with_their_reasons() -> None:
    share = 0.05
    sim = Simulation(FLEET, seed=9, start_ms=MONDAY_7H, malformed_share=share)
    msgs = sim.messages(20_000)
    bad = [m for m in msgs if m.truth.bad]
    assert abs(len(bad) / len(msgs) - share) < 0.006
    reasons: Counter[str] = Counter()
    for m in bad:
        r = next((r for r in m.truth.readings if r.malformed), None)
        reason = m.truth.malformed or (r.malformed if r else None)
        assert reason in {"bad_json", "wrong_type", "out_of_range", "unknown_sensor"}
        reasons[reason] += 1
        if reason == "bad_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(m.payload)
            continue
        if m.truth.gateway:
            batch = msgspec.json.decode(m.payload, type=Gateway)
            element = batch.readings[0]
            vendor = m.truth.vendor
            assert r is m.truth.readings[0]
            # the rest of the batch is intact
            for e, rr in zip(batch.readings[1:], m.truth.readings[1:], strict=True):
                assert parse_payload(vendor, e)[0] == rr.sensor_id
        else:
            vendor = m.truth.vendor
            element = m.payload.decode()
            if vendor != "compact":
                element = json.loads(element)
        if reason == "wrong_type":
            with pytest.raises(AssertionError):
                parse_payload(vendor, element)
        elif reason == "unknown_sensor":
            sid = parse_payload(vendor, element)[0]
            assert FLEET.get(sid) is None and r is not None and r.sensor_id == sid
            if not m.truth.gateway:
                assert m.topic.endswith("/" + sid)
        else:  # out_of_range: well-formed, but a value far beyond the contract's range
            _, _, meas, _ = parse_payload(vendor, element)
            assert any(v > METRICS[k].hi * 1.1 or v < METRICS[k].lo - 0.1 * METRICS[k].hi
                       for k, v in meas.items()), (vendor, element)
    assert set(reasons) == {"bad_json", "wrong_type", "out_of_range", "unknown_sensor"}
    # the good ones still parse
    for m in msgs[:3000]:
        if not m.truth.bad:
            for vendor, element in elements(m):
                parse_payload(vendor, element)


def test_ground_truth_file_round_trips(tmp_path: Any) -> None:
    msgs = Simulation(FLEET, seed=1, start_ms=MONDAY_7H, malformed_share=0.1).messages(500)
    path = tmp_path / "gt.jsonl"
    with GroundTruthWriter(path) as w:
        for m in msgs:
            w.write(m.truth)
    back = read_ground_truth(path)
    assert back == [m.truth for m in msgs]
    assert isinstance(back[0], Truth)


# --- behaviour -------------------------------------------------------------------------------
def test_daily_rhythms_look_like_can_tho() -> None:
    sim = Simulation(FLEET, seed=6, start_ms=parse_start("2026-11-23T00:00"))
    rs = [r for r in readings(run_until(sim, 24.0)) if r.kind == "reading"]
    hours = local_hour(np.array([r.true_time for r in rs]))
    ids = np.array([r.sensor_id for r in rs])

    def mean(metric: str, prefix: str, h0: float, h1: float) -> float:
        pick = np.flatnonzero(np.char.startswith(ids, prefix) & (hours >= h0) & (hours < h1))
        vals = [rs[i].measurements[metric] for i in pick if metric in rs[i].measurements]
        assert vals
        return float(np.mean(vals))

    # motorbike rush hours vs the quiet night, on the city's arterials
    for prefix in ("street_30_4-ld", "nguyen_van_cu", "street_3_2"):
        assert mean("count_motorbike", prefix, 7, 8) > 5 * mean("count_motorbike", prefix, 2, 4)
        assert mean("count_motorbike", prefix, 17, 18) > 1.3 * mean("count_motorbike", prefix,
                                                                    13, 14)
        assert mean("speed_kmh", prefix, 7, 8) < mean("speed_kmh", prefix, 2, 4)
    # evening crowds at the wharf and the night market, dawn boats at Cai Rang
    assert mean("people_count", "ninh_kieu_wharf-cv", 19, 21) > 3 * mean(
        "people_count", "ninh_kieu_wharf-cv", 8, 10)
    assert mean("footfall_in", "night_market-ff", 19, 21) > 5 * mean(
        "footfall_in", "night_market-ff", 9, 11)
    assert mean("boats", "cai_rang_market-bc", 5, 8) > 4 * mean("boats", "cai_rang_market-bc",
                                                                14, 17)


def test_nearby_sensors_move_together() -> None:
    """Detectors on one arterial share a latent state: their 10-minute deviations from
    their own trend correlate strongly, unlike detectors in another district."""
    sim = Simulation(FLEET, seed=8, start_ms=parse_start("2026-11-23T09:00"))
    msgs = run_until(sim, 8.0)
    series: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(48))
    for r in readings(msgs):
        if "count_motorbike" in r.measurements:
            half = "a" if r.sensor_id[-3:] < "009" else "b"  # two halves of one arterial
            key = r.sensor_id.rsplit("-", 1)[0] + half
            series[key][(r.true_time - sim.start_ms) // 600_000] += r.measurements[
                "count_motorbike"]

    def residual(key: str) -> np.ndarray:
        x = series[key][:46]
        return (x / np.convolve(x, np.ones(5) / 5, "same"))[3:-3]

    near = np.corrcoef(residual("street_30_4-lda"), residual("street_30_4-ldb"))[0, 1]
    far = np.corrcoef(residual("street_30_4-lda"), residual("thot_not_ql91-lda"))[0, 1]
    assert near > 0.7
    assert near > far + 0.4


# --- scenarios -------------------------------------------------------------------------------
def pair(scenario: str, start: int, hours: float, seed: int = 21
         ) -> tuple[list[Sent], list[Sent]]:
    base = run_until(Simulation(FLEET, seed=seed, start_ms=start), hours)
    with_it = run_until(Simulation(FLEET, seed=seed, start_ms=start, scenarios=[scenario]),
                        hours)
    return base, with_it


def test_gridlock_slows_the_arterial_in_the_rush_hour() -> None:
    base, jam = pair("gridlock", MONDAY_7H, 2.0)
    t0, t1 = MONDAY_7H + 900_000, MONDAY_7H + 6_300_000  # 07:15 - 08:45
    for metric in ("speed_kmh", "occupancy", "flow"):
        b = mean_of(by_sensor(base, "street_30_4-ld", metric, t0, t1))
        j = mean_of(by_sensor(jam, "street_30_4-ld", metric, t0, t1))
        if metric == "speed_kmh":
            assert j < 0.35 * b and j < 12
        elif metric == "occupancy":
            assert j > 0.7 and j > b + 0.3
        else:
            assert j < 0.75 * b
    # another arterial is untouched
    other_b = mean_of(by_sensor(base, "street_3_2", "speed_kmh", t0, t1))
    other_j = mean_of(by_sensor(jam, "street_3_2", "speed_kmh", t0, t1))
    assert other_j == pytest.approx(other_b, rel=0.1)
    assert any("gridlock" in r.tags for r in readings(jam))


def test_accident_congestion_spreads_upstream() -> None:
    start = parse_start("2026-11-23T10:00")
    base, acc = pair("accident:after=5m,duration=40m", start, 1.5)
    prefix = "nguyen_van_cu-tc-me"
    mid = 6  # 12 cameras: the crash is at rank 6 (id ...007)

    def first_slow(sent: list[Sent], sid: str) -> int:
        baseline = np.median(by_sensor(base, sid, "speed_kmh")[sid])
        for r in sorted((r for r in readings(sent) if r.sensor_id == sid),
                        key=lambda r: r.true_time):
            if r.measurements.get("speed_kmh", 1e9) < 0.5 * baseline:
                return r.true_time
        raise AssertionError(f"{sid} never slowed down")

    at_crash = f"{prefix}{mid + 1:03d}"
    upstream = f"{prefix}{mid - 3 + 1:03d}"
    assert first_slow(acc, upstream) > first_slow(acc, at_crash) + 4 * 60_000
    during = (start + 25 * 60_000, start + 45 * 60_000)
    b = mean_of(by_sensor(base, at_crash, "speed_kmh", *during))
    a = mean_of(by_sensor(acc, at_crash, "speed_kmh", *during))
    assert a < 0.3 * b
    # cleared and recovered by the end
    late = (start + 65 * 60_000, start + 90 * 60_000)
    assert mean_of(by_sensor(acc, at_crash, "speed_kmh", *late)) == pytest.approx(
        mean_of(by_sensor(base, at_crash, "speed_kmh", *late)), rel=0.15)


def test_festival_packs_the_wharf() -> None:
    start = parse_start("2026-11-23T17:00")
    base, fest = pair("festival", start, 4.0)
    t0, t1 = start + 3_600_000, start + 4 * 3_600_000
    b = mean_of(by_sensor(base, "ninh_kieu_wharf-cv", "crowd_density", t0, t1))
    f = mean_of(by_sensor(fest, "ninh_kieu_wharf-cv", "crowd_density", t0, t1))
    assert f > 3.5 * b and f > 4.0
    assert mean_of(by_sensor(fest, "ninh_kieu_wharf-ff", "footfall_in", t0, t1)) > 3 * mean_of(
        by_sensor(base, "ninh_kieu_wharf-ff", "footfall_in", t0, t1))
    crowd_alarms = [r for r in readings(fest) if r.incident == "crowd_density"
                    and r.sensor_id.startswith(("ninh_kieu_wharf", "night_market"))]
    base_alarms = [r for r in readings(base) if r.incident == "crowd_density"]
    assert len(crowd_alarms) > 20 and len(crowd_alarms) > 5 * max(1, len(base_alarms))
    # far away, nothing changed
    assert mean_of(by_sensor(fest, "airport-cv", "people_count", t0, t1)) == pytest.approx(
        mean_of(by_sensor(base, "airport-cv", "people_count", t0, t1)), rel=0.05)


def test_intrusion_at_night_at_the_public_building() -> None:
    start = parse_start("2026-11-23T20:00")
    base, night = pair("intrusion", start, 4.0)

    def incidents(sent: list[Sent]) -> list[Reading]:
        return [r for r in readings(sent) if r.sensor_id.startswith("city_hall")
                and r.incident in ("intrusion", "door_forced")]

    assert not incidents(base)
    found = incidents(night)
    kinds = Counter(r.incident for r in found)
    assert kinds["door_forced"] == 1 and kinds["intrusion"] >= 5
    hours = local_hour(np.array([r.true_time for r in found]))
    assert ((hours >= 22) | (hours < 5)).all()
    assert all("intrusion" in r.tags for r in found)
    # the forced door reports itself open while the intruders are inside
    door = next(r.sensor_id for r in found if r.incident == "door_forced")
    forced_at = next(r.true_time for r in found if r.incident == "door_forced")
    after = [r for r in readings(night) if r.sensor_id == door and r.kind == "reading"
             and forced_at <= r.true_time < forced_at + 15 * 60_000]
    assert after and all(r.measurements["door_open"] == 1 for r in after)


def test_offline_sensors_go_silent() -> None:
    sim = Simulation(FLEET, seed=3, start_ms=MONDAY_7H,
                     scenarios=["offline:share=0.1,after=10m"])
    chosen = {FLEET.sensors[i].sensor_id for i in sim.scenarios[0].sensors}
    assert len(chosen) == round(0.1 * len(FLEET))
    msgs = run_until(sim, 1.0)
    cut = MONDAY_7H + 600_000
    before = {r.sensor_id for r in readings(msgs) if r.true_time < cut}
    after = {r.sensor_id for r in readings(msgs) if r.true_time >= cut}
    frequent = {s for s in chosen if FLEET.get(s).interval_s <= 300}  # type: ignore[union-attr]
    assert frequent and frequent <= before
    assert not chosen & after
    assert len(after) >= len(FLEET) - len(chosen) - 20  # hourly hotels may not report yet


def test_stuck_sensors_repeat_their_values() -> None:
    sim = Simulation(FLEET, seed=3, start_ms=MONDAY_7H, scenarios=["stuck:share=0.2,after=5m"])
    chosen = {FLEET.sensors[i].sensor_id for i in sim.scenarios[0].sensors}
    msgs = run_until(sim, 1.0)
    cut = MONDAY_7H + 300_000
    checked = 0
    for sid in chosen:
        rs = sorted((r for r in readings(msgs) if r.sensor_id == sid and r.kind == "reading"),
                    key=lambda r: r.true_time)
        stuck = [r.measurements for r in rs if r.true_time >= cut]
        if len(stuck) >= 3:
            checked += 1
            assert all(m == stuck[0] for m in stuck), sid
            assert all("stuck" in r.tags for r in rs if r.true_time >= cut)
            assert len({r.event_time for r in rs if r.true_time >= cut}) == len(stuck)
    assert checked >= 10
    # a healthy detector's values move
    healthy = by_sensor(msgs, "street_30_4-ld", "speed_kmh")
    assert any(len(set(v)) > 3 for s, v in healthy.items() if s not in chosen)


def test_skewed_clocks_shift_the_written_time() -> None:
    sim = Simulation(FLEET, seed=3, start_ms=MONDAY_7H, scenarios=["skew:share=0.2"])
    msgs = run_until(sim, 0.5)
    skewed = [(m, r) for m in msgs for r in m.truth.readings if r.skew_ms]
    chosen = {FLEET.sensors[i].sensor_id for i in sim.scenarios[0].sensors}
    assert len(chosen) == round(0.2 * len(FLEET))
    assert {r.sensor_id for _, r in skewed} <= chosen
    assert len({r.sensor_id for _, r in skewed}) > 0.8 * len(chosen)
    assert {r.skew_ms for _, r in skewed} == {45_000, 150_000, -240_000, -900_000}
    for m, r in skewed:
        for (vendor, element), rr in zip(elements(m), m.truth.readings, strict=True):
            if rr is r:
                _, written, _, _ = parse_payload(vendor, element)
                assert abs(written - r.true_time - r.skew_ms) < 1000
    clean = [r for r in readings(msgs) if not r.skew_ms]
    assert all(abs(r.event_time - r.true_time) < 1000 for r in clean)


def test_disorder_sends_late_and_out_of_order_readings() -> None:
    sim = Simulation(FLEET, seed=3, start_ms=MONDAY_7H, scenarios=["disorder:share=0.05"])
    msgs = run_until(sim, 2.0)
    sends = [m.truth.send_time for m in msgs]
    assert sends == sorted(sends), "messages leave in send-time order"
    late = [r for r in readings(msgs) if r.late]
    assert 0.03 < len(late) / len(readings(msgs)) < 0.07
    # out_of_order is exactly "an older reading after a newer one of the same sensor"
    newest: dict[str, int] = {}
    flagged = 0
    for m in msgs:
        for r in m.truth.readings:
            expect = r.event_time < newest.get(r.sensor_id, -1)
            assert r.out_of_order == expect
            flagged += expect
            newest[r.sensor_id] = max(newest.get(r.sensor_id, -1), r.event_time)
    assert flagged > 20
    assert all(r.late for r in readings(msgs) if r.out_of_order)


def test_duplicates_repeat_messages_byte_for_byte() -> None:
    sim = Simulation(FLEET, seed=3, start_ms=MONDAY_7H, scenarios=["duplicates:share=0.05"])
    msgs = sim.messages(10_000)
    by_seq = {m.truth.seq: m for m in msgs}
    dups = [m for m in msgs if m.truth.duplicate_of is not None]
    assert 0.035 < len(dups) / len(msgs) < 0.065
    for d in dups:
        orig = by_seq[d.truth.duplicate_of]
        assert d.payload == orig.payload and d.topic == orig.topic
        assert 0 < d.truth.send_time - orig.truth.send_time <= 5000
        assert all("duplicates" in r.tags for r in d.truth.readings)


def test_bad_scenarios_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ScenarioError, match="unknown scenario 'flood'"):
        parse_scenario("flood")
    with pytest.raises(ScenarioError, match="unknown parameter"):
        parse_scenario("gridlock:lanes=3")
    with pytest.raises(ScenarioError, match="unknown landmark"):
        Simulation(FLEET, seed=1, scenarios=["gridlock:target=saigon"])
    with pytest.raises(ScenarioError, match="no traffic sensors"):
        Simulation(FLEET, seed=1, scenarios=["gridlock:target=airport"])
    with pytest.raises(ScenarioError, match="bad duration"):
        Simulation(FLEET, seed=1, scenarios=["accident:after=soon"])
    with pytest.raises(ValueError, match="bad shard"):
        Simulation(FLEET, seed=1, shard=(2, 2))
