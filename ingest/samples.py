"""Example payloads in every vendor format of ``simulators/PAYLOADS.md``.

Tests, the benchmark and anyone debugging a sensor use these to build well-formed
messages (and, by editing them, malformed ones) without the simulators. Each builder
takes the sensor and the reading time in epoch ms and returns ``(topic, payload)``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from cityops.registry import Fleet, Sensor

ICT = timezone(timedelta(hours=7))  # Indochina Time, what MekongFlow devices report in


def iso(ms: int, tz: timezone = UTC) -> str:
    """ISO-8601 with milliseconds; UTC as ``Z``."""
    text = datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def topic_of(sensor: Sensor, root: str = "city") -> str:
    return f"{root}/{sensor.topic_suffix}"


def gateway_topic(district: str, gateway: str, root: str = "city") -> str:
    return f"{root}/{district}/gateway/{gateway}"


def saomai_lane(sid: str, ms: int) -> dict:
    return {"sensor": sid, "ts": ms, "interval_s": 60,
            "counts": {"motorbike": 120, "car": 14, "truck": 2, "bus": 1},
            "speed_kmh": 32.5, "occupancy_pct": 18.0}


def saomai_signal(sid: str, ms: int, phase: str = "red", fault: bool = False) -> dict:
    return {"sensor": sid, "ts": ms, "phase": phase, "fault": fault}


def mekongflow(sid: str, ms: int) -> dict:
    return {"deviceId": sid, "time": iso(ms, ICT), "period": "PT1M",
            "flow": {"mc": 120, "car": 14, "hgv": 2, "bus": 1}, "avgSpeedMs": 9.0, "occ": 0.18}


def compact_traffic(sid: str, ms: int) -> str:
    return f"C1|{sid}|{ms // 1000}|60|T|120,14,2,1|32.5|18"


def compact_footfall(sid: str, ms: int) -> str:
    return f"C1|{sid}|{ms // 1000}|60|F|340,310"


def guardeye_stats(sid: str, ms: int) -> dict:
    return {"camera": sid, "ts": ms, "kind": "stats", "people": 140, "density": 1.8}


def guardeye_event(sid: str, ms: int, event: str = "intrusion") -> dict:
    return {"camera": sid, "ts": ms, "kind": "event", "event": event, "confidence": 0.92,
            "people": 3, "density": 0.1}


def safecity(sid: str, ms: int, typ: str = "DOOR_OPEN") -> dict:
    data: dict = {"door_open": True} if typ.startswith("DOOR") else {"people": 12}
    return {"device_id": sid, "occurred_at": iso(ms), "type": typ, "severity": 2, "data": data}


def visitcount_footfall(sid: str, ms: int) -> dict:
    return {"sensor": sid, "ts": ms, "interval_s": 60, "in": 34, "out": 20}


def visitcount_boats(sid: str, ms: int) -> dict:
    return {"sensor": sid, "ts": ms, "interval_s": 120, "boats": 42}


def visitcount_hotel(sid: str, ms: int) -> dict:
    return {"sensor": sid, "ts": ms, "rooms": 120, "occupied": 90}


def _window(ms: int, minutes: int = 5) -> dict:
    return {"start": iso(ms - minutes * 60_000), "end": iso(ms)}


def probenet_probe(sid: str, ms: int) -> dict:
    return {"probe": sid, "window": _window(ms), "unique_devices": 540,
            "by_country": {"VN": 400, "KR": 40, "CN": 30, "US": 20, "XX": 50}}


def probenet_footfall(sid: str, ms: int) -> dict:
    return {"probe": sid, "window": _window(ms, 1), "entries": 34, "exits": 20}


def probenet_hotel(sid: str, ms: int) -> dict:
    return {"probe": sid, "window": _window(ms, 60), "rooms_total": 80, "rooms_occupied": 61}


def reading(sensor: Sensor, ms: int) -> dict | str:
    """A typical well-formed periodic reading of ``sensor`` in its vendor's format."""
    v, t, sid = sensor.vendor, sensor.type, sensor.sensor_id
    if v == "saomai":
        return saomai_signal(sid, ms) if t == "traffic_signal" else saomai_lane(sid, ms)
    if v == "mekongflow":
        return mekongflow(sid, ms)
    if v == "compact":
        return compact_footfall(sid, ms) if t == "footfall_counter" else compact_traffic(sid, ms)
    if v == "guardeye":
        return guardeye_stats(sid, ms)
    if v == "safecity":
        return safecity(sid, ms, "HEARTBEAT")
    if v == "visitcount":
        return {"boat_counter": visitcount_boats, "hotel": visitcount_hotel}.get(
            t, visitcount_footfall)(sid, ms)
    if v == "probenet":
        return {"wifi_probe": probenet_probe, "hotel": probenet_hotel}.get(
            t, probenet_footfall)(sid, ms)
    raise ValueError(f"no sample for vendor {v!r}")


def encode(doc: dict | str) -> bytes:
    """A device payload: JSON, or the compact line as plain text."""
    return doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()


def device_message(sensor: Sensor, ms: int, root: str = "city") -> tuple[str, bytes]:
    return topic_of(sensor, root), encode(reading(sensor, ms))


def gateway_message(gateway: str, sensors: list[Sensor], ms: int, sent_at: int | None = None,
                    root: str = "city", readings: list | None = None) -> tuple[str, bytes]:
    """A gateway batch: one element per sensor (compact lines as JSON strings)."""
    docs = readings if readings is not None else [reading(s, ms) for s in sensors]
    body = {"gateway": gateway, "sent_at": sent_at or ms, "readings": docs}
    return gateway_topic(sensors[0].district, gateway, root), json.dumps(body).encode()


def one_of_each(fleet: Fleet) -> dict[tuple[str, str], Sensor]:
    """The first sensor of every (vendor, type) pair in the fleet."""
    out: dict[tuple[str, str], Sensor] = {}
    for s in fleet:
        out.setdefault((s.vendor, s.type), s)
    return out
