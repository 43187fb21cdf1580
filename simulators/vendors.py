"""Payload encoders: one per vendor format of ``PAYLOADS.md``, plus gateway batches and
deliberate corruption (the malformed share).

Each encoder takes the columns of one batch of readings (Python lists, already rounded)
and returns, per reading, the payload bytes, the event time ingest will read from them
(epoch ms; the compact format and the probe windows only carry whole seconds) and the
measurements the contract should normalize them to. Encoding is f-strings over lists: the
payloads are small and fixed-shape, and this is several times faster than a generic JSON
encoder while staying byte-for-byte deterministic.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

# (payload bytes, event time ms as ingest reads it, expected normalized measurements)
Encoded = tuple[bytes, int, dict[str, float]]

NATIONALITY_CODES = ("vn", "kr", "cn", "us", "fr", "de", "au", "jp", "th", "other")


# --- time formats ------------------------------------------------------------------------
@lru_cache(maxsize=1 << 16)
def _utc_second(sec: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))


@lru_cache(maxsize=1 << 16)
def _local_second(sec: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec + 7 * 3600))


def iso_utc_ms(ms: int) -> str:
    """``2026-11-22T04:15:00.500Z``"""
    s, r = divmod(ms, 1000)
    return f"{_utc_second(s)}.{r:03d}Z"


def iso_local_ms(ms: int) -> str:
    """``2026-11-22T11:15:00.123+07:00`` (Can Tho local time with its offset)."""
    s, r = divmod(ms, 1000)
    return f"{_local_second(s)}.{r:03d}+07:00"


def iso_utc_s(sec: int) -> str:
    """``2026-11-22T04:15:00Z``"""
    return f"{_utc_second(sec)}Z"


def iso_duration(seconds: int) -> str:
    """``PT1M``, ``PT30S``, ``PT5M``, ``PT1H30M``."""
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "PT" + (f"{h}H" if h else "") + (f"{m}M" if m else "") + (f"{s}S" if s or not
                                                                       (h or m) else "")


def _b(x: bool) -> str:
    return "true" if x else "false"


# --- traffic -----------------------------------------------------------------------------
def _traffic_meas(mc: int, car: int, truck: int, bus: int, kmh: float,
                  occ: float) -> dict[str, float]:
    return {"count_motorbike": mc, "count_car": car, "count_truck": truck, "count_bus": bus,
            "flow": mc + car + truck + bus, "speed_kmh": kmh, "occupancy": occ}


def saomai_traffic(ids: Sequence[str], ts: Sequence[int], interval: Sequence[int],
                   mc: Sequence[int], car: Sequence[int], truck: Sequence[int],
                   bus: Sequence[int], kmh: Sequence[float], occ: Sequence[float]
                   ) -> list[Encoded]:
    out: list[Encoded] = []
    for i, t, iv, a, b, c, d, v, o in zip(ids, ts, interval, mc, car, truck, bus, kmh, occ,
                                          strict=True):
        v = round(v, 1)
        pct = round(o * 100, 1)
        p = (f'{{"sensor":"{i}","ts":{t},"interval_s":{iv},"counts":{{"motorbike":{a},'
             f'"car":{b},"truck":{c},"bus":{d}}},"speed_kmh":{v},"occupancy_pct":{pct}}}')
        out.append((p.encode(), t, _traffic_meas(a, b, c, d, v, pct / 100)))
    return out


def mekongflow_traffic(ids: Sequence[str], ts: Sequence[int], interval: Sequence[int],
                       mc: Sequence[int], car: Sequence[int], truck: Sequence[int],
                       bus: Sequence[int], kmh: Sequence[float], occ: Sequence[float]
                       ) -> list[Encoded]:
    out: list[Encoded] = []
    for i, t, iv, a, b, c, d, v, o in zip(ids, ts, interval, mc, car, truck, bus, kmh, occ,
                                          strict=True):
        ms = round(v / 3.6, 2)
        o = round(o, 3)
        p = (f'{{"deviceId":"{i}","time":"{iso_local_ms(t)}","period":"{iso_duration(iv)}",'
             f'"flow":{{"mc":{a},"car":{b},"hgv":{c},"bus":{d}}},"avgSpeedMs":{ms},"occ":{o}}}')
        out.append((p.encode(), t, _traffic_meas(a, b, c, d, ms * 3.6, o)))
    return out


def compact_traffic(ids: Sequence[str], ts: Sequence[int], interval: Sequence[int],
                    mc: Sequence[int], car: Sequence[int], truck: Sequence[int],
                    bus: Sequence[int], kmh: Sequence[float], occ: Sequence[float]
                    ) -> list[Encoded]:
    out: list[Encoded] = []
    for i, t, iv, a, b, c, d, v, o in zip(ids, ts, interval, mc, car, truck, bus, kmh, occ,
                                          strict=True):
        sec = t // 1000
        v = round(v, 1)
        pct = round(o * 100)
        p = f"C1|{i}|{sec}|{iv}|T|{a},{b},{c},{d}|{v}|{pct}"
        out.append((p.encode(), sec * 1000, _traffic_meas(a, b, c, d, v, pct / 100)))
    return out


SIGNAL_STATES = {"off": 0, "green": 1, "amber": 2, "red": 3, "flashing": 4}


def saomai_signal(ids: Sequence[str], ts: Sequence[int], phase: Sequence[str],
                  fault: Sequence[bool]) -> list[Encoded]:
    out: list[Encoded] = []
    for i, t, ph, f in zip(ids, ts, phase, fault, strict=True):
        p = f'{{"sensor":"{i}","ts":{t},"phase":"{ph}","fault":{_b(f)}}}'
        out.append((p.encode(), t, {"signal_state": SIGNAL_STATES[ph], "signal_fault": int(f)}))
    return out


# --- security ----------------------------------------------------------------------------
def guardeye_stats(ids: Sequence[str], ts: Sequence[int], people: Sequence[int],
                   density: Sequence[float]) -> list[Encoded]:
    out: list[Encoded] = []
    for i, t, n, d in zip(ids, ts, people, density, strict=True):
        d = round(d, 2)
        p = f'{{"camera":"{i}","ts":{t},"kind":"stats","people":{n},"density":{d}}}'
        out.append((p.encode(), t, {"people_count": n, "crowd_density": d}))
    return out


def guardeye_event(ids: Sequence[str], ts: Sequence[int], event: Sequence[str],
                   confidence: Sequence[float], people: Sequence[int],
                   density: Sequence[float]) -> list[Encoded]:
    out: list[Encoded] = []
    for i, t, e, c, n, d in zip(ids, ts, event, confidence, people, density, strict=True):
        c, d = round(c, 2), round(d, 2)
        p = (f'{{"camera":"{i}","ts":{t},"kind":"event","event":"{e}","confidence":{c},'
             f'"people":{n},"density":{d}}}')
        out.append((p.encode(), t, {"confidence": c, "people_count": n, "crowd_density": d}))
    return out


SAFECITY_TYPES = {
    "intrusion": "INTRUSION", "crowd_density": "CROWD", "loitering": "LOITERING",
    "abandoned_object": "ABANDONED_OBJECT", "fight": "FIGHT", "panic": "PANIC",
    "door_forced": "DOOR_FORCED", "door_open": "DOOR_OPEN", "door_closed": "DOOR_CLOSED",
}
SAFECITY_SEVERITY = {"HEARTBEAT": 1, "INTRUSION": 4, "CROWD": 3, "LOITERING": 2,
                     "ABANDONED_OBJECT": 3, "FIGHT": 4, "PANIC": 5, "DOOR_FORCED": 4,
                     "DOOR_OPEN": 2, "DOOR_CLOSED": 1}


def safecity(ids: Sequence[str], ts: Sequence[int], types: Sequence[str],
             data: Sequence[dict[str, object]]) -> list[Encoded]:
    """``types`` are contract incident names, or ``"HEARTBEAT"`` for a periodic reading.

    ``data`` holds ``people``/``density`` (cameras) or ``door_open`` (doors); panic buttons
    send an empty object.
    """
    out: list[Encoded] = []
    for i, t, typ, d in zip(ids, ts, types, data, strict=True):
        name = typ if typ == "HEARTBEAT" else SAFECITY_TYPES[typ]
        parts: list[str] = []
        meas: dict[str, float] = {}
        if "people" in d:
            parts.append(f'"people":{d["people"]}')
            meas["people_count"] = int(d["people"])  # type: ignore[call-overload]
        if "density" in d:
            dens = round(float(d["density"]), 2)  # type: ignore[arg-type]
            parts.append(f'"density":{dens}')
            meas["crowd_density"] = dens
        if "door_open" in d:
            parts.append(f'"door_open":{_b(bool(d["door_open"]))}')
            meas["door_open"] = int(bool(d["door_open"]))
        p = (f'{{"device_id":"{i}","occurred_at":"{iso_utc_ms(t)}","type":"{name}",'
             f'"severity":{SAFECITY_SEVERITY[name]},"data":{{{",".join(parts)}}}}}')
        out.append((p.encode(), t, meas))
    return out


# --- tourism -----------------------------------------------------------------------------
def visitcount_footfall(ids: Sequence[str], ts: Sequence[int], interval: Sequence[int],
                        n_in: Sequence[int], n_out: Sequence[int]) -> list[Encoded]:
    return [(f'{{"sensor":"{i}","ts":{t},"interval_s":{iv},"in":{a},"out":{b}}}'.encode(), t,
             {"footfall_in": a, "footfall_out": b})
            for i, t, iv, a, b in zip(ids, ts, interval, n_in, n_out, strict=True)]


def compact_footfall(ids: Sequence[str], ts: Sequence[int], interval: Sequence[int],
                     n_in: Sequence[int], n_out: Sequence[int]) -> list[Encoded]:
    return [(f"C1|{i}|{t // 1000}|{iv}|F|{a},{b}".encode(), t // 1000 * 1000,
             {"footfall_in": a, "footfall_out": b})
            for i, t, iv, a, b in zip(ids, ts, interval, n_in, n_out, strict=True)]


def _window(t: int, iv: int) -> tuple[str, int]:
    end = t // 1000
    return f'"window":{{"start":"{iso_utc_s(end - iv)}","end":"{iso_utc_s(end)}"}}', end * 1000


def probenet_footfall(ids: Sequence[str], ts: Sequence[int], interval: Sequence[int],
                      n_in: Sequence[int], n_out: Sequence[int]) -> list[Encoded]:
    out: list[Encoded] = []
    for i, t, iv, a, b in zip(ids, ts, interval, n_in, n_out, strict=True):
        w, end = _window(t, iv)
        p = f'{{"probe":"{i}",{w},"entries":{a},"exits":{b}}}'
        out.append((p.encode(), end, {"footfall_in": a, "footfall_out": b}))
    return out


def visitcount_boats(ids: Sequence[str], ts: Sequence[int], interval: Sequence[int],
                     boats: Sequence[int]) -> list[Encoded]:
    return [(f'{{"sensor":"{i}","ts":{t},"interval_s":{iv},"boats":{n}}}'.encode(), t,
             {"boats": n})
            for i, t, iv, n in zip(ids, ts, interval, boats, strict=True)]


def visitcount_hotel(ids: Sequence[str], ts: Sequence[int], rooms: Sequence[int],
                     occupied: Sequence[int]) -> list[Encoded]:
    return [(f'{{"sensor":"{i}","ts":{t},"rooms":{r},"occupied":{o}}}'.encode(), t,
             {"hotel_occupancy": o / r, "rooms_occupied": o})
            for i, t, r, o in zip(ids, ts, rooms, occupied, strict=True)]


def probenet_hotel(ids: Sequence[str], ts: Sequence[int], interval: Sequence[int],
                   rooms: Sequence[int], occupied: Sequence[int]) -> list[Encoded]:
    out: list[Encoded] = []
    for i, t, iv, r, o in zip(ids, ts, interval, rooms, occupied, strict=True):
        w, end = _window(t, iv)
        p = f'{{"probe":"{i}",{w},"rooms_total":{r},"rooms_occupied":{o}}}'
        out.append((p.encode(), end, {"hotel_occupancy": o / r, "rooms_occupied": o}))
    return out


def probenet_probe(ids: Sequence[str], ts: Sequence[int], interval: Sequence[int],
                   by_country: Sequence[Sequence[tuple[str, int]]]) -> list[Encoded]:
    """``by_country`` per reading: (ISO code upper case, devices) pairs with devices > 0."""
    out: list[Encoded] = []
    for i, t, iv, pairs in zip(ids, ts, interval, by_country, strict=True):
        w, end = _window(t, iv)
        total = sum(n for _, n in pairs)
        body = ",".join(f'"{cc}":{n}' for cc, n in pairs)
        p = f'{{"probe":"{i}",{w},"unique_devices":{total},"by_country":{{{body}}}}}'
        meas: dict[str, float] = {"visitors_total": total}
        for cc, n in pairs:
            key = cc.lower() if cc.lower() in NATIONALITY_CODES else "other"
            meas[f"visitors_{key}"] = meas.get(f"visitors_{key}", 0) + n
        out.append((p.encode(), end, meas))
    return out


# --- gateway batches -----------------------------------------------------------------------
def gateway_batch(gateway: str, sent_at: int, elements: Sequence[bytes],
                  compact: Sequence[bool]) -> bytes:
    """A gateway message; compact-format elements travel as JSON strings."""
    body = b",".join(b'"' + e + b'"' if c else e for e, c in zip(elements, compact, strict=True))
    return b'{"gateway":"' + gateway.encode() + b'","sent_at":' + str(sent_at).encode() + \
        b',"readings":[' + body + b"]}"


# --- deliberate corruption ---------------------------------------------------------------
MALFORMATIONS = ("bad_json", "wrong_type", "out_of_range", "unknown_sensor")

# vendor -> (a numeric field to turn into a string, (field, absurd value) for out of range)
# Out-of-range values are far beyond the contract range (more than the 10 % clamp margin).
_JSON_FIELDS: dict[str, tuple[bytes, list[tuple[bytes, bytes]]]] = {
    "saomai": (b"ts", [(b"speed_kmh", b"950.0")]),
    "mekongflow": (b"avgSpeedMs", [(b"avgSpeedMs", b"400.0"), (b"occ", b"7.5")]),
    "guardeye": (b"people", [(b"density", b"99.0"), (b"people", b"990000")]),
    "safecity": (b"severity", [(b"density", b"99.0"), (b"people", b"990000")]),
    "visitcount": (b"ts", [(b"in", b"9900000"), (b"boats", b"99000"),
                           (b"occupied", b"99000")]),
    "probenet": (b"unique_devices", [(b"unique_devices", b"99000000"),
                                     (b"entries", b"9900000"), (b"rooms_occupied", b"99000")]),
}


def _field_value(key: bytes) -> re.Pattern[bytes]:
    return re.compile(rb'"' + re.escape(key) + rb'":(-?[0-9.]+|true|false)')


def supported_malformations(vendor: str, payload: bytes, in_gateway: bool) -> tuple[str, ...]:
    """Which corruptions make sense for this payload (bad JSON is not a thing in a text line,
    and a single gateway element cannot be half a JSON document)."""
    kinds: list[str] = ["unknown_sensor"]
    if vendor == "compact":
        kinds += ["wrong_type", "out_of_range"]
        return tuple(kinds)
    if not in_gateway:
        kinds.append("bad_json")
    wrong, ranges = _JSON_FIELDS[vendor]
    if _field_value(wrong).search(payload) or (vendor == "safecity"):
        kinds.append("wrong_type")
    if any(_field_value(k).search(payload) for k, _ in ranges):
        kinds.append("out_of_range")
    return tuple(sorted(kinds))


def malform(vendor: str, payload: bytes, reason: str, sensor_id: str, fake_id: str) -> bytes:
    """Corrupt ``payload`` so ingest must dead-letter it with ``reason``."""
    if reason == "unknown_sensor":
        return payload.replace(sensor_id.encode(), fake_id.encode(), 1)
    if vendor == "compact":
        fields = payload.split(b"|")
        if reason == "wrong_type":
            fields[5] = b"x" + fields[5]  # a count that is not a number
        else:  # out_of_range
            if fields[4] == b"T":
                fields[6] = b"950.0"
            else:
                fields[5] = b"9900000," + fields[5].split(b",")[1]
        return b"|".join(fields)
    if reason == "bad_json":
        return payload[: max(1, len(payload) // 2)]
    wrong, ranges = _JSON_FIELDS[vendor]
    if reason == "wrong_type":
        if vendor == "safecity":
            return re.sub(rb'"occurred_at":"[^"]*"', b'"occurred_at":' + b"1795312800",
                          payload, count=1)
        return _field_value(wrong).sub(lambda m: b'"' + wrong + b'":"' + m.group(1) + b'"',
                                       payload, count=1)
    if reason == "out_of_range":
        for key, value in ranges:
            pat = _field_value(key)
            if pat.search(payload):
                return pat.sub(b'"' + key + b'":' + value, payload, count=1)
    raise ValueError(f"cannot make a {reason!r} payload of vendor {vendor!r}")


TRAFFIC_ENCODERS: dict[str, Callable[..., list[Encoded]]] = {
    "saomai": saomai_traffic, "mekongflow": mekongflow_traffic, "compact": compact_traffic,
}
FOOTFALL_ENCODERS: dict[str, Callable[..., list[Encoded]]] = {
    "visitcount": visitcount_footfall, "compact": compact_footfall,
    "probenet": probenet_footfall,
}
