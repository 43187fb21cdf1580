"""The cityops event contract, version 1: the one shape every vendor payload becomes.

Ingest produces these events on the Kafka events topic (one event per Kafka message,
keyed by sensor id, JSON-encoded so other agencies can read the stream without our
code). Everything downstream (processors, alerts, console) imports the contract from
here and nowhere else.

Fields
------
``v``             schema version (``SCHEMA_VERSION``); readers reject versions they do not know.
``event_id``      32 hex chars, a hash of (sensor id, event time, kind, incident): a resend of
                  the same reading carries the same id, so downstream stores can drop it.
``sensor_id``     the registry id (see ``cityops.registry``).
``domain``        ``traffic`` | ``security`` | ``tourism``.
``type``          the sensor type (``lane_detector``, ``cctv``, ``wifi_probe``...).
``district``      district code; ``landmark`` the landmark code the sensor belongs to.
``lat``/``lon``   WGS84 position of the sensor.
``event_time``    when the reading was taken, epoch milliseconds UTC (sensor clock,
                  corrected where the sensor's skew is known).
``receive_time``  when ingest received it, epoch milliseconds UTC. Both times lie in
                  [0, ``MAX_TIME_MS``]; a reader refuses anything else.
``kind``          ``reading`` (periodic measurements) or ``incident`` (a discrete event:
                  intrusion, panic, door forced...).
``incident``      the incident type for ``kind == "incident"``, else ``None``.
``interval_s``    the period a count covers (counts are "per interval"); 0 for instants.
``measurements``  metric name -> value, units normalized (see ``METRICS``).
``quality``       bit flags (``Quality``) describing what ingest noticed or corrected,
                  at most ``MAX_QUALITY`` (stored as a 16-bit integer).
``vendor``        the payload format it came in, for tracing.
"""

from __future__ import annotations

import hashlib
from enum import IntFlag, StrEnum
from typing import Annotated

import msgspec

SCHEMA_VERSION = 1

#: Latest instant an event may carry, epoch ms (9999-12-31T23:59:59.999Z): what every
#: consumer can turn into a timestamp (PostgreSQL's microseconds since 2000 included).
MAX_TIME_MS = 253_402_300_799_999
#: Quality flags fit a 16-bit column with room to grow (``Quality`` uses 5 bits).
MAX_QUALITY = 0x7FFF
EpochMs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIME_MS)]


class Domain(StrEnum):
    TRAFFIC = "traffic"
    SECURITY = "security"
    TOURISM = "tourism"


class Kind(StrEnum):
    READING = "reading"
    INCIDENT = "incident"


class Quality(IntFlag):
    """What ingest noticed about a reading; stored with it so nobody trusts it blindly."""

    OK = 0
    LATE = 1  # arrived long after its event time (still inside the accepted window)
    CLOCK_SKEWED = 2  # event time ahead of receive time beyond tolerance, or gateway skew
    CLAMPED = 4  # a value was outside its physical range by a small margin and was clamped
    OUT_OF_ORDER = 8  # older than a reading already seen from the same sensor
    ESTIMATED = 16  # a value was derived (e.g. flow from per-class counts)


INCIDENT_TYPES: frozenset[str] = frozenset({
    "intrusion", "crowd_density", "loitering", "abandoned_object", "fight",
    "panic", "door_forced", "door_open", "door_closed", "signal_fault",
})

# Nationalities the Wi-Fi/BLE probes report (ISO 3166 alpha-2, lower case); others -> "other".
NATIONALITIES: tuple[str, ...] = ("vn", "kr", "cn", "us", "fr", "de", "au", "jp", "th", "other")


class Metric(msgspec.Struct, frozen=True):
    """A normalized measurement: its unit and the physically possible range.

    ``exact`` marks counts: a count has no measurement noise, so a value below ``lo``
    (a negative count) is impossible and refused, never clamped like a noisy speed or
    ratio a little past its bound.
    """

    unit: str
    lo: float
    hi: float
    doc: str
    exact: bool = False


METRICS: dict[str, Metric] = {
    # traffic
    "count_motorbike": Metric("vehicles/interval", 0, 20_000, "motorbikes counted", exact=True),
    "count_car": Metric("vehicles/interval", 0, 10_000, "cars counted", exact=True),
    "count_truck": Metric("vehicles/interval", 0, 5_000, "trucks (HGV) counted", exact=True),
    "count_bus": Metric("vehicles/interval", 0, 2_000, "buses counted", exact=True),
    "flow": Metric("vehicles/interval", 0, 40_000, "all vehicles counted", exact=True),
    "speed_kmh": Metric("km/h", 0, 200, "mean speed"),
    "occupancy": Metric("ratio", 0, 1, "share of time the detector was occupied"),
    "signal_state": Metric("enum", 0, 4, "0 off, 1 green, 2 amber, 3 red, 4 flashing"),
    "signal_fault": Metric("bool", 0, 1, "controller reports a fault"),
    # security
    "crowd_density": Metric("persons/m2", 0, 12, "estimated crowd density"),
    "people_count": Metric("persons", 0, 50_000, "people in view", exact=True),
    "confidence": Metric("ratio", 0, 1, "analytics confidence of an incident"),
    "door_open": Metric("bool", 0, 1, "door open"),
    # tourism
    "footfall_in": Metric("persons/interval", 0, 100_000, "people entering", exact=True),
    "footfall_out": Metric("persons/interval", 0, 100_000, "people leaving", exact=True),
    "boats": Metric("boats", 0, 2_000, "boats present", exact=True),
    "visitors_total": Metric("devices", 0, 500_000, "unique devices seen in the window",
                             exact=True),
    **{f"visitors_{cc}": Metric("devices", 0, 500_000, f"unique devices, nationality {cc}",
                                exact=True) for cc in NATIONALITIES},
    "hotel_occupancy": Metric("ratio", 0, 1, "rooms occupied / rooms available"),
    "rooms_occupied": Metric("rooms", 0, 10_000, "rooms occupied", exact=True),
}


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One normalized sensor reading or incident (schema version 1)."""

    v: int = SCHEMA_VERSION
    event_id: str
    sensor_id: str
    domain: str
    type: str
    district: str
    landmark: str
    lat: float
    lon: float
    event_time: EpochMs
    receive_time: EpochMs
    kind: str = Kind.READING.value
    incident: str | None = None
    interval_s: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 0
    measurements: dict[str, float] = {}
    quality: Annotated[int, msgspec.Meta(ge=0, le=MAX_QUALITY)] = 0
    vendor: str = ""


def event_id(sensor_id: str, event_time_ms: int, kind: str = "reading",
             incident: str | None = None) -> str:
    """Stable id of a reading: the same sensor, time and kind always hash to the same id."""
    key = f"{sensor_id}|{event_time_ms}|{kind}|{incident or ''}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)
_batch_decoder = msgspec.json.Decoder(list[Event])


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    """Decode one Kafka value; raises ``msgspec.ValidationError``/``DecodeError`` when bad."""
    ev = _decoder.decode(data)
    if ev.v != SCHEMA_VERSION:
        raise msgspec.ValidationError(f"unsupported event schema version {ev.v}")
    return ev


def decode_events(values: list[bytes]) -> list[Event]:
    """Decode many Kafka values in one parser call (the hot path's batch decoder)."""
    if not values:
        return []
    events = _batch_decoder.decode(b"[" + b",".join(values) + b"]")
    for ev in events:
        if ev.v != SCHEMA_VERSION:
            raise msgspec.ValidationError(f"unsupported event schema version {ev.v}")
    return events


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A payload ingest refused, with why: what the dead-letter topic carries."""

    reason: str  # short machine code: bad_json, wrong_type, missing_field, out_of_range, ...
    detail: str  # human-readable: which field, which value, which bound
    mqtt_topic: str
    payload: str  # the raw payload; base64 when ``payload_encoding == "base64"``
    payload_encoding: str = "utf-8"
    received_at: int  # epoch ms
    sensor_id: str | None = None
    service: str = "ingest"
    # A gateway message's refused elements share ONE letter (``payload`` is the whole
    # message, ``reason`` the first refused element's): how many were refused, and the
    # first few as "#element reason: detail". 0 and [] for a payload refused whole.
    bad_readings: int = 0
    reasons: list[str] = []


DEADLETTER_REASONS: tuple[str, ...] = (
    "bad_json", "wrong_type", "missing_field", "out_of_range", "unknown_sensor",
    "unknown_format", "too_old", "in_future", "bad_topic", "too_large", "unsupported_version",
    # strict decoding (ingest/strict.py): what msgspec alone would let through
    "bad_encoding",  # bytes that are not UTF-8, anywhere in the payload
    "duplicate_key",  # a JSON object repeats a key (parsers disagree on which value counts)
    "too_deep",  # JSON nested deeper than ingest.strict.MAX_DEPTH (32) levels
    "number_out_of_range",  # a number beyond int64/double: 20+ digits, or exponent >= 100
    "decode_failed",  # any other exception while decoding one payload: class and message
    # The payload names a sensor its topic's device does not own: a sensor reporting for
    # another, or a gateway for a sensor not behind it in the registry.
    "not_owner",
)

_dl_encoder = msgspec.json.Encoder()
_dl_decoder = msgspec.json.Decoder(DeadLetter)


def encode_deadletter(dl: DeadLetter) -> bytes:
    return _dl_encoder.encode(dl)


def decode_deadletter(data: bytes) -> DeadLetter:
    return _dl_decoder.decode(data)
