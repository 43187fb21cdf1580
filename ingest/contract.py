"""The cityops event contract: the shapes every vendor payload becomes on the events topic.

Two versions travel on the same topic during a rolling upgrade (consumers first, then
ingest's ``ingest_contract_version`` setting): readers tell them apart by the record's
first byte (``{`` is a v1 JSON event, anything else a v2 msgpack batch) and
``decode_batches`` takes both, mixed, in one call. Everything downstream (processors,
alerts, console) imports the contract from here and nowhere else.

Version 1: one event per Kafka record (``Event``)
-------------------------------------------------
JSON, keyed by sensor id, so other agencies can read the stream without our code. Every
record repeats the sensor's dimension text; a gateway message of 25 readings is 25
records.

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

Version 2: one columnar batch per Kafka record (``EventBatch``)
---------------------------------------------------------------
What ingest produces with ``ingest_contract_version = 2``: at most one record per MQTT
message. A gateway message is ONE record keyed by the gateway id; a device message one
record keyed by its sensor id, or by its gateway's id if the registry puts the sensor
behind one (it may still publish directly): every reading of a sensor, by either path,
lands on one partition, in order. The single-reading messages of one ingest batch (what
arrives within ingest's linger) that land on the same partition share ONE record, keyed
by the first one's key (``ingest.kafka.v2_records``): a record may hold many sensors,
and a consumer must not take its key for the only sensor in it.

A batch holds *rows* (one per reading event: a sensor's sample at one time, the v1
``Event`` of kind ``reading``) and *readings* (one per measurement of a row: the natural
key is (sensor, metric, event time)). Row fields belong to the sample, so they are not
repeated per metric (4-7 metrics per row in this city); a row with no measurement (a
heartbeat) stays a row, which absence rules count as the sensor being alive.

Encoding: msgpack (msgspec) of a map whose column fields are little-endian raw buffers
(msgpack ``bin``), chosen by measuring against msgpack/JSON lists of numbers, a
positional msgpack array and Arrow IPC on records of 1, 25 and 500 rows
(``bench/contract.py``, figures in ``bench/results/contract.json``). Decoding is one
``np.frombuffer`` per column for a whole poll, with no Python object per reading, and
any language with a msgpack library reads it with the dtypes below. Per reading, against
v1: a 25-sensor gateway record decodes to arrays in ~0.22x the CPU and takes ~0.13x the
Kafka bytes (zstd); 500 rows in one record ~0.16x and ~0.11x; a one-row record costs
~1.3x to decode (msgspec's per-record cost, no longer shared by 7 readings at most) for
0.2x the bytes. Lists of numbers decode 2-3x slower (a Python object per value); Arrow
IPC repeats its schema in every record (208 bytes per reading for one-row records) and
was no faster where records are large, so it is not a dependency. A map, not a
positional array: 8% more Kafka bytes for one-row records, none for gateways, and a
reader can tell the fields apart and new optional fields can be added.

Ingest encodes v2 straight from its columns (``encode_columns``, since issue 15): each
record's name lists and index columns come from numpy over the whole batch, each
column is a slice of one buffer, and no ``Event`` is built per reading. ``batch_of`` /
``encode_batch`` encode the same bytes from v1 events (tests, tools, the v1 reader's
counterpart); the two are tested byte-identical, which is what keeps the wire contract
fixed while ingest's internals changed.

``v``             ``BATCH_VERSION`` (2).
``sensors``       the distinct sensor ids of the batch (registry ids); rows index it.
``vendors``       parallel to ``sensors``: the payload format each sensor's readings came in.
``metrics``       the distinct metric names of the batch (``METRICS`` keys); readings index
                  it. Names, not codes of a global table: a record explains itself, a
                  producer that learns a new metric cannot be misread by an older consumer,
                  and reordering ``METRICS`` can never silently remap values. It costs a
                  few bytes per record (the 4-7 names of a gateway's sensors).
Row columns (``n`` rows):
``sensor``        ``<u2`` x n: index into ``sensors``.
``time``          ``<i8`` x n: event time, epoch ms UTC (as v1 ``event_time``).
``receive_time``  ``<i8`` x n: when ingest received the row's MQTT message, epoch ms UTC.
``interval_s``    ``<i4`` x n: as v1.
``quality``       ``<u2`` x n: ``Quality`` bit flags, as v1.
``count``         ``<u2`` x n: how many readings the row has; a row's readings follow the
                  previous rows' (row ``r`` owns readings ``sum(count[:r])`` onwards).
Reading columns (``m = sum(count)`` readings):
``metric``        ``u1`` x m: index into ``metrics``.
``value``         ``<f8`` x m: the value in the metric's contract unit (finite).
``incidents``     incidents are rare: they stay structs (``Incident``), a v1 event of kind
                  ``incident`` without the dimension text, keeping its ``event_id``.

Dimension text (district, domain, type, landmark, lat, lon) is NOT in v2: consumers take
it from the fleet registry (``cityops.registry.Fleet``), the same file ingest validates
every sensor against (an unknown sensor never reaches the topic: dead letter
``unknown_sensor``). Readings carry no event id: a resend has the same natural key.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntFlag, StrEnum
from itertools import chain
from operator import attrgetter
from typing import Annotated, Any

import msgspec
import numpy as np
import numpy.typing as npt

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


# -- version 2: columnar batches ------------------------------------------------------------
BATCH_VERSION = 2
# A v2 row indexes its sensor with an unsigned 16-bit integer: a record holds at most
# this many distinct sensors (a 256 kB gateway payload holds far fewer).
MAX_BATCH_SENSORS = 1 << 16
MAX_BATCH_METRICS = 1 << 8  # readings index their metric with one byte
# Per row a reading count of 16 bits: a row holds at most this many readings.
MAX_ROW_READINGS = (1 << 16) - 1
# What a v1 JSON record may start with; a v2 msgpack map never starts with these bytes.
_JSON_FIRST = frozenset(b"{ \t\r\n")
_INCIDENT = "incident"  # Kind.INCIDENT.value, without the enum lookup per event
_BIG_ENDIAN = sys.byteorder == "big"
if [array.array(t).itemsize for t in "HqiBd"] != [2, 8, 4, 1, 8]:  # C types of this platform
    raise ImportError("array typecodes H q i B d are not 2, 8, 4, 1, 8 bytes here")


class Incident(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An incident inside a v2 batch: a v1 ``incident`` event without the dimension text.

    Incidents are rare (a few per hour per camera), so they stay structs; they keep the
    v1 ``event_id`` because the incidents table and the operators refer to them by it.
    """

    sensor_id: str
    event_id: str
    event_time: EpochMs
    receive_time: EpochMs
    incident: str
    interval_s: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 0
    measurements: dict[str, float] = {}
    quality: Annotated[int, msgspec.Meta(ge=0, le=MAX_QUALITY)] = 0
    vendor: str = ""


class EventBatch(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Many reading rows and their readings as columns (schema version 2; see module doc)."""

    v: int = BATCH_VERSION
    sensors: list[str] = []
    vendors: list[str] = []
    metrics: list[str] = []
    sensor: bytes = b""  # <u2 per row
    time: bytes = b""  # <i8 per row
    receive_time: bytes = b""  # <i8 per row
    interval_s: bytes = b""  # <i4 per row
    quality: bytes = b""  # <u2 per row
    count: bytes = b""  # <u2 per row
    metric: bytes = b""  # u1 per reading
    value: bytes = b""  # <f8 per reading
    incidents: list[Incident] = []


# (field, bytes per row or reading): what each column's length must be a multiple of.
_ROW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sensor", "<u2"), ("time", "<i8"), ("receive_time", "<i8"), ("interval_s", "<i4"),
    ("quality", "<u2"), ("count", "<u2"))
_READING_COLUMNS: tuple[tuple[str, str], ...] = (("metric", "u1"), ("value", "<f8"))


def _buffer(typecode: str, values: list[Any]) -> bytes:
    """Little-endian raw bytes of ``values`` (``array`` beats numpy and ``struct`` for the
    few dozen values of a typical record)."""
    a = array.array(typecode, values)
    if _BIG_ENDIAN:
        a.byteswap()
    return a.tobytes()


def incident_of(ev: Event) -> Incident:
    """A v1 ``incident`` event as the ``Incident`` a v2 batch carries (no dimension text)."""
    return Incident(sensor_id=ev.sensor_id, event_id=ev.event_id, event_time=ev.event_time,
                    receive_time=ev.receive_time, incident=ev.incident or "unknown",
                    interval_s=ev.interval_s, measurements=ev.measurements,
                    quality=ev.quality, vendor=ev.vendor)


def batch_of(events: Sequence[Event]) -> EventBatch:
    """The v2 batch of ``events`` (v1 structs, as ingest's normalizer builds them), in order.

    Incidents become ``Incident`` structs; reading events become rows and readings. One
    pass per event with C-level ``extend``s per row: the metric codes of a row are looked
    up once per distinct set of metric names, not per reading. (Measured: this loop beats
    one list comprehension per column by 10-40%.)
    """
    sensor_at: dict[str, int] = {}
    sensors: list[str] = []
    vendors: list[str] = []
    metric_at: dict[str, int] = {}
    shapes: dict[tuple[str, ...], list[int]] = {}
    s_col: list[int] = []
    t_col: list[int] = []
    r_col: list[int] = []
    i_col: list[int] = []
    q_col: list[int] = []
    c_col: list[int] = []
    m_col: list[int] = []
    v_col: list[float] = []
    incidents: list[Incident] = []
    for ev in events:
        if ev.kind == _INCIDENT:
            incidents.append(incident_of(ev))
            continue
        s = sensor_at.get(ev.sensor_id)
        if s is None:
            s = sensor_at[ev.sensor_id] = len(sensors)
            sensors.append(ev.sensor_id)
            vendors.append(ev.vendor)
        m = ev.measurements
        names = tuple(m)
        codes = shapes.get(names)
        if codes is None:
            codes = shapes[names] = [metric_at.setdefault(n, len(metric_at)) for n in names]
        s_col.append(s)
        t_col.append(ev.event_time)
        r_col.append(ev.receive_time)
        i_col.append(ev.interval_s)
        q_col.append(ev.quality)
        c_col.append(len(codes))
        m_col.extend(codes)
        v_col.extend(m.values())
    if len(sensors) > MAX_BATCH_SENSORS or len(metric_at) > MAX_BATCH_METRICS:
        raise ValueError(f"a v2 batch holds at most {MAX_BATCH_SENSORS} sensors and "
                         f"{MAX_BATCH_METRICS} metrics: split the events")
    return EventBatch(
        sensors=sensors, vendors=vendors, metrics=list(metric_at),
        sensor=_buffer("H", s_col), time=_buffer("q", t_col), receive_time=_buffer("q", r_col),
        interval_s=_buffer("i", i_col), quality=_buffer("H", q_col), count=_buffer("H", c_col),
        metric=_buffer("B", m_col), value=_buffer("d", v_col), incidents=incidents)


_v2_encoder = msgspec.msgpack.Encoder()
_v2_decoder = msgspec.msgpack.Decoder(EventBatch)


def encode_batch(events: Sequence[Event]) -> bytes:
    """One v2 Kafka value holding ``events`` (see ``batch_of``)."""
    return _v2_encoder.encode(batch_of(events))


def _first_seen_local(group: npt.NDArray[np.int64], code: npt.NDArray[np.int64],
                      ncodes: int, ngroups: int
                      ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64],
                                 npt.NDArray[np.int64]]:
    """Per-group local indices of ``code`` in first-seen order, with numpy only.

    ``group`` is non-decreasing (entries grouped by record). Returns, per entry, the index
    of its code among its group's distinct codes in first-seen order; the distinct codes
    of all groups in that order (group after group); and how many each group has. This
    is what ``batch_of``'s ``dict.setdefault`` per event computes, for every record at
    once. (group, code) pairs index a dense table when it is small (the usual case: a
    batch's records times its sensors or metrics), else they are found with a sort.
    """
    n = code.size
    if n == 0:
        return (np.empty(0, np.int64), np.empty(0, np.int64), np.zeros(ngroups, np.int64))
    key = group * ncodes + code
    size = ngroups * ncodes
    if size <= 4 * n + 4096:
        first = np.full(size, n, np.int64)
        np.minimum.at(first, key, np.arange(n, dtype=np.int64))
        present = np.flatnonzero(first < n)  # by key: group-major
        distinct = present[np.argsort(first[present], kind="stable")]  # first-seen
        pair_group = distinct // ncodes
        per_group = np.bincount(pair_group, minlength=ngroups)
        lut = np.empty(size, np.int64)
        lut[distinct] = np.arange(distinct.size) - (np.cumsum(per_group) - per_group)[pair_group]
        return lut[key], distinct % ncodes, per_group
    uniq, first_at, inverse = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first_at, kind="stable")  # distinct pairs, first-seen, group by group
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    pair_group = uniq // ncodes
    per_group = np.bincount(pair_group, minlength=ngroups)
    local = rank - (np.cumsum(per_group) - per_group)[pair_group]
    return local[inverse.reshape(-1)], (uniq % ncodes)[order], per_group


def encode_columns(nrec: int, row_record: npt.NDArray[np.int64],
                   row_sensor: npt.NDArray[np.int64], sensor_ids: Sequence[str],
                   sensor_vendors: Sequence[str], row_time: npt.NDArray[np.int64],
                   row_receive_time: npt.NDArray[np.int64],
                   row_interval_s: npt.NDArray[np.int64],
                   row_quality: npt.NDArray[np.int64], row_count: npt.NDArray[np.int64],
                   metric: npt.NDArray[np.int64], metric_names: Sequence[str],
                   value: npt.NDArray[np.float64],
                   incidents: Sequence[Sequence[Incident]]) -> list[bytes]:
    """``nrec`` v2 Kafka values straight from columns: no ``Event`` per reading.

    The rows (reading events, not incidents) of all records come as one set of arrays,
    grouped by record (``row_record`` non-decreasing, 0..nrec-1) and in stream order
    inside each; ``row_sensor`` / ``metric`` are codes into ``sensor_ids`` (with
    ``sensor_vendors``) and ``metric_names``, valid for the whole call; ``row_count`` is
    each row's readings, which follow one another in row order. ``incidents[k]`` are
    record ``k``'s incidents.

    Byte for byte what ``encode_batch`` makes of the same events (tested): each record's
    ``sensors`` / ``metrics`` are its distinct names in first-seen order (found for all
    records at once, ``_first_seen_local``), its columns are slices of one little-endian
    buffer per column. Per record there is one ``EventBatch`` and one msgspec call; per
    reading, nothing in Python. This is ingest's hot path since issue 15 (item 1).
    """
    reading_record = np.repeat(row_record, row_count)
    s_local, s_codes, s_per = _first_seen_local(row_record, row_sensor, len(sensor_ids), nrec)
    m_local, m_codes, m_per = _first_seen_local(reading_record, metric, len(metric_names),
                                                nrec)
    if (s_per.size and int(s_per.max()) > MAX_BATCH_SENSORS) or (
            m_per.size and int(m_per.max()) > MAX_BATCH_METRICS):
        raise ValueError(f"a v2 batch holds at most {MAX_BATCH_SENSORS} sensors and "
                         f"{MAX_BATCH_METRICS} metrics: split the rows")
    if row_count.size and int(row_count.max()) > MAX_ROW_READINGS:
        raise ValueError(f"a v2 row holds at most {MAX_ROW_READINGS} readings")
    sids, vends = _objects(list(sensor_ids)), _objects(list(sensor_vendors))
    rec_sensors = sids[s_codes].tolist()
    rec_vendors = vends[s_codes].tolist()
    rec_metrics = _objects(list(metric_names))[m_codes].tolist()
    s_end = np.cumsum(s_per).tolist()
    m_end = np.cumsum(m_per).tolist()
    rows_end = np.cumsum(np.bincount(row_record, minlength=nrec)).tolist()
    readings_end = np.cumsum(np.bincount(reading_record, minlength=nrec)).tolist()
    sensor = s_local.astype("<u2").tobytes()
    time = row_time.astype("<i8").tobytes()
    receive = row_receive_time.astype("<i8").tobytes()
    interval = row_interval_s.astype("<i4").tobytes()
    quality = row_quality.astype("<u2").tobytes()
    count = row_count.astype("<u2").tobytes()
    metric_b = m_local.astype("u1").tobytes()
    value_b = value.astype("<f8").tobytes()
    encode = _v2_encoder.encode
    out: list[bytes] = []
    r0 = g0 = s0 = m0 = 0
    for k in range(nrec):
        r1, g1, s1, m1 = rows_end[k], readings_end[k], s_end[k], m_end[k]
        out.append(encode(EventBatch(
            sensors=rec_sensors[s0:s1], vendors=rec_vendors[s0:s1],
            metrics=rec_metrics[m0:m1], sensor=sensor[2 * r0:2 * r1],
            time=time[8 * r0:8 * r1], receive_time=receive[8 * r0:8 * r1],
            interval_s=interval[4 * r0:4 * r1], quality=quality[2 * r0:2 * r1],
            count=count[2 * r0:2 * r1], metric=metric_b[g0:g1], value=value_b[8 * g0:8 * g1],
            incidents=list(incidents[k]))))
        r0, g0, s0, m0 = r1, g1, s1, m1
    return out


@dataclass(frozen=True, slots=True)
class Columns:
    """What ``decode_batches`` returns: the rows and readings of many records, as arrays.

    Sensors and metrics are integer codes into ``sensor_ids`` and ``metric_names``
    (distinct, first-seen order, valid for this result only): a consumer maps them to its
    own codes once per distinct name (``np.array([mine(n) for n in cols.sensor_ids])
    [cols.sensor]``), never per reading. ``record`` / ``row_record`` give the index in the
    input list of the record each reading / row came from (its partition and offset).
    """

    sensor_ids: list[str]
    vendors: list[str]  # parallel to sensor_ids
    metric_names: list[str]
    # one per row (reading event)
    row_sensor: npt.NDArray[np.int64]
    row_time: npt.NDArray[np.int64]
    row_receive_time: npt.NDArray[np.int64]
    row_interval_s: npt.NDArray[np.int32]
    row_quality: npt.NDArray[np.int32]
    row_record: npt.NDArray[np.int64]
    # one per reading (row x metric), rows' readings in row order
    row: npt.NDArray[np.int64]  # the reading's row
    sensor: npt.NDArray[np.int64]
    time: npt.NDArray[np.int64]
    metric: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.int32]
    # incidents, in record order, and the record each came from
    incidents: list[Incident]
    incident_record: npt.NDArray[np.int64]

    def __len__(self) -> int:
        """Readings (the unit stored as one narrow row)."""
        return int(self.value.size)

    @property
    def record(self) -> npt.NDArray[np.int64]:
        """Per reading, the index of its record in the decoded list."""
        return self.row_record[self.row]

    def sensor_id(self) -> npt.NDArray[np.object_]:
        """Per reading, its sensor id as a string (an object array: for display and tests;
        group and join by the codes)."""
        return _objects(self.sensor_ids)[self.sensor]

    def metric_name(self) -> npt.NDArray[np.object_]:
        """Per reading, its metric name (object array; see ``sensor_id``)."""
        return _objects(self.metric_names)[self.metric]


def _objects(names: list[str]) -> npt.NDArray[np.object_]:
    a = np.empty(len(names), dtype=object)
    a[:] = names
    return a


@dataclass(slots=True)
class _Part:
    """Columns of a run of records of one version, before codes are made global: sensor
    and metric indices are into this part's own name lists."""

    sensor_names: list[str]
    vendor_names: list[str]  # parallel to sensor_names
    metric_names: list[str]
    record: npt.NDArray[np.int64]  # per row: index of its record in the decoded list
    slocal: npt.NDArray[np.int64]  # per row: index into sensor_names
    time: npt.NDArray[np.int64]
    receive: npt.NDArray[np.int64]
    interval: npt.NDArray[np.int32]
    quality: npt.NDArray[np.int32]
    count: npt.NDArray[np.int64]  # per row: its readings
    mlocal: npt.NDArray[np.int64]  # per reading: index into metric_names
    value: npt.NDArray[np.float64]


def _run_v1(values: list[bytes], first: int, alone: bool
            ) -> tuple[_Part, list[Incident], list[int]]:
    """A run of v1 records: one JSON parse for all, then a loop per event (legacy path)."""
    if len(values) == 1:
        events = [decode_event(values[0])]
    else:
        events = decode_events(values)
        if len(events) != len(values):  # two broken records can join into one valid value
            raise msgspec.ValidationError(f"v1 records {first}..{first + len(values) - 1}: "
                                          f"{len(values)} records decoded as {len(events)}")
    sensor_names: list[str] = []
    vendor_names: list[str] = []
    incidents: list[Incident] = []
    incident_record: list[int] = []
    sensor_at: dict[str, int] = {}
    metric_at: dict[str, int] = {}
    rec: list[int] = []
    sl: list[int] = []
    t: list[int] = []
    r: list[int] = []
    iv: list[int] = []
    q: list[int] = []
    c: list[int] = []
    ml: list[int] = []
    v: list[float] = []
    for k, ev in enumerate(events):
        if ev.kind == _INCIDENT:
            incidents.append(incident_of(ev))
            incident_record.append(first + k)
            continue
        s = sensor_at.get(ev.sensor_id)
        if s is None:
            s = sensor_at[ev.sensor_id] = len(sensor_names)
            sensor_names.append(ev.sensor_id)
            vendor_names.append(ev.vendor)
        rec.append(first + k)
        sl.append(s)
        t.append(ev.event_time)
        r.append(ev.receive_time)
        iv.append(ev.interval_s)
        q.append(ev.quality)
        m = ev.measurements
        c.append(len(m))
        for name in m:
            code = metric_at.get(name)
            if code is None:
                code = metric_at[name] = len(metric_at)
            ml.append(code)
        v.extend(m.values())
    part = _Part(sensor_names, vendor_names, list(metric_at), np.array(rec, np.int64),
                 np.array(sl, np.int64), np.array(t, np.int64), np.array(r, np.int64),
                 np.array(iv, np.int32), np.array(q, np.int32), np.array(c, np.int64),
                 np.array(ml, np.int64), np.array(v, np.float64))
    return part, incidents, incident_record


_COLUMN_BYTES: tuple[tuple[str, int], ...] = tuple(
    (name, np.dtype(dtype).itemsize) for name, dtype in _ROW_COLUMNS + _READING_COLUMNS)


def _run_v2(values: list[bytes], first: int, alone: bool
            ) -> tuple[_Part, list[Incident], list[int]]:
    """A run of v2 records: one msgspec call per record, then every column of the run
    joined as bytes and read with one ``np.frombuffer``; the checks are numpy over the
    run (per record there are only comprehensions, no statement per reading or row)."""

    def _bad(index: int, what: str) -> msgspec.ValidationError:
        return msgspec.ValidationError(f"v2 batch: {what}" if alone else
                                       f"v2 batch (record {first + index}): {what}")

    decode = _v2_decoder.decode
    batches = [decode(raw) for raw in values]
    nrec = len(batches)
    cols: dict[str, npt.NDArray[Any]] = {}
    lengths: dict[str, npt.NDArray[np.int64]] = {}
    for name, _ in _ROW_COLUMNS + _READING_COLUMNS:
        lengths[name] = np.fromiter(map(len, map(attrgetter(name), batches)), np.int64, nrec)
    version = np.fromiter(map(attrgetter("v"), batches), np.int64, nrec)
    wrong = np.flatnonzero(version != BATCH_VERSION)
    if wrong.size:
        k = int(wrong[0])
        raise _bad(k, f"unsupported event batch version {int(version[k])}")
    rows_of = lengths["time"] // 8
    readings_of = lengths["value"] // 8
    fits = np.ones(nrec, bool)
    for name, size in _COLUMN_BYTES:
        fits &= lengths[name] == size * (readings_of if name in ("metric", "value")
                                         else rows_of)
    nsensors = np.fromiter(map(len, map(attrgetter("sensors"), batches)), np.int64, nrec)
    nvendors = np.fromiter(map(len, map(attrgetter("vendors"), batches)), np.int64, nrec)
    nmetrics = np.fromiter(map(len, map(attrgetter("metrics"), batches)), np.int64, nrec)
    wrong = np.flatnonzero(~fits | (nvendors != nsensors))
    if wrong.size:
        k = int(wrong[0])
        if nvendors[k] != nsensors[k]:
            raise _bad(k, f"{nvendors[k]} vendors for {nsensors[k]} sensors")
        raise _bad(k, "column lengths disagree (rows: sensor 2, time 8, receive_time 8, "
                   "interval_s 4, quality 2, count 2 bytes each; readings: metric 1, "
                   "value 8 bytes each)")
    for name, dtype in _ROW_COLUMNS + _READING_COLUMNS:
        cols[name] = np.frombuffer(b"".join(map(attrgetter(name), batches)), dtype)
    count = cols["count"].astype(np.int64)
    # Every record's counts add up to its readings.
    ends = np.cumsum(rows_of)
    csum = np.concatenate(([0], np.cumsum(count)))
    per_record = csum[ends] - csum[ends - rows_of]
    wrong = np.flatnonzero(per_record != readings_of)
    if wrong.size:
        k = int(wrong[0])
        raise _bad(k, f"row counts add up to {int(per_record[k])} readings, "
                   f"the columns hold {int(readings_of[k])}")
    # Indices are local to their record's lists: check them, then offset them into the
    # run's joined lists.
    record = np.repeat(np.arange(nrec, dtype=np.int64), rows_of)
    slocal = cols["sensor"].astype(np.int64)
    over = np.flatnonzero(slocal >= nsensors[record])
    if over.size:
        k = int(record[over[0]])
        raise _bad(k, f"a row names sensor #{int(slocal[over[0]])} of {int(nsensors[k])}")
    reading_record = np.repeat(np.arange(nrec, dtype=np.int64), readings_of)
    mlocal = cols["metric"].astype(np.int64)
    over = np.flatnonzero(mlocal >= nmetrics[reading_record])
    if over.size:
        k = int(reading_record[over[0]])
        raise _bad(k, f"a reading names metric #{int(mlocal[over[0]])} of {int(nmetrics[k])}")
    value = cols["value"]
    bad = np.flatnonzero(~np.isfinite(value))
    if bad.size:
        raise _bad(int(reading_record[bad[0]]),
                   f"value {float(value[bad[0]])!r} is not a finite number")
    # The same bounds as v1's ``Event`` (what every consumer can store and compare).
    for name, lo, hi in (("time", 0, MAX_TIME_MS), ("receive_time", 0, MAX_TIME_MS),
                         ("quality", 0, MAX_QUALITY), ("interval_s", 0, 2**31 - 1)):
        col = cols[name]
        out = np.flatnonzero((col < lo) | (col > hi))
        if out.size:
            raise _bad(int(record[out[0]]), f"{name} {int(col[out[0]])} is outside [{lo}, {hi}]")
    incidents: list[Incident] = []
    incident_record: list[int] = []
    for k, b in enumerate(batches):
        if b.incidents:
            for inc in b.incidents:  # msgpack carries NaN/inf, which JSON (v1) cannot
                if not all(math.isfinite(v) for v in inc.measurements.values()):
                    raise _bad(k, f"incident {inc.event_id[:40]!r} has a value that is not "
                                  "a finite number")
            incidents += b.incidents
            incident_record += [first + k] * len(b.incidents)
    part = _Part(
        list(chain.from_iterable(map(attrgetter("sensors"), batches))),
        list(chain.from_iterable(map(attrgetter("vendors"), batches))),
        list(chain.from_iterable(map(attrgetter("metrics"), batches))),
        record + first, slocal + (np.cumsum(nsensors) - nsensors)[record],
        cols["time"].astype(np.int64), cols["receive_time"].astype(np.int64),
        cols["interval_s"].astype(np.int32), cols["quality"].astype(np.int32), count,
        mlocal + (np.cumsum(nmetrics) - nmetrics)[reading_record],
        value.astype(np.float64))
    return part, incidents, incident_record


def _distinct(names: list[str]) -> tuple[list[str], npt.NDArray[np.int64]]:
    """The distinct ``names`` in first-seen order, and each entry's index among them
    (C-level dict work; nothing to map when they are distinct already, as in one record)."""
    distinct = list(dict.fromkeys(names))
    if len(distinct) == len(names):
        return distinct, np.arange(len(names), dtype=np.int64)
    code = {name: k for k, name in enumerate(distinct)}
    return distinct, np.fromiter(map(code.__getitem__, names), np.int64, len(names))


def is_v1(value: bytes) -> bool:
    """A v1 JSON event (or nothing at all, which the JSON decoder refuses clearly)."""
    return not value or value[0] in _JSON_FIRST


def version_runs(values: Sequence[bytes | None]) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, is v1)`` of each run of consecutive records of one contract version:
    a reader decodes each run in one call and keeps the stream's order."""
    i, n = 0, len(values)
    while i < n:
        v1 = is_v1(values[i] or b"")
        j = i + 1
        while j < n and is_v1(values[j] or b"") == v1:
            j += 1
        yield i, j, v1
        i = j


def decode_batches(values: list[bytes]) -> Columns:
    """Decode many events-topic values, v1 events and v2 batches mixed, into columns.

    Rows and readings keep the order of ``values`` (and, inside a record, its own order),
    so each sensor's readings stay in stream order. v2 records are decoded without a
    Python step per reading; v1 records (the legacy path of a rolling upgrade) with one
    parse per run and a loop per event.

    Raises ``msgspec.DecodeError`` (not msgpack/JSON at all) or ``msgspec.ValidationError``
    (well-formed but not a valid event or batch; v2 messages name the record's index in
    ``values``) if ANY record is bad, like ``decode_events``: a consumer then decodes
    its records one by one (``decode_batches([value])``, or ``decode_each``) to
    dead-letter only the bad ones.
    """
    parts: list[_Part] = []
    incidents: list[Incident] = []
    incident_record: list[int] = []
    for i, j, v1 in version_runs(values):
        part, inc, inc_rec = (_run_v1 if v1 else _run_v2)(values[i:j], i, len(values) == 1)
        parts.append(part)
        incidents += inc
        incident_record += inc_rec
    # Codes of this result: C-level dict building over each record's name lists.
    all_sensors = list(chain.from_iterable(p.sensor_names for p in parts))
    all_vendors = list(chain.from_iterable(p.vendor_names for p in parts))
    all_metrics = list(chain.from_iterable(p.metric_names for p in parts))
    sensor_ids, slut = _distinct(all_sensors)
    vendors = all_vendors
    if len(sensor_ids) < len(all_sensors):
        first_vendor = dict(zip(reversed(all_sensors), reversed(all_vendors), strict=True))
        vendors = [first_vendor[sid] for sid in sensor_ids]
    metric_names, mlut = _distinct(all_metrics)
    row_sensor: list[npt.NDArray[np.int64]] = []
    reading_metric: list[npt.NDArray[np.int64]] = []
    sbase = mbase = 0
    for p in parts:
        row_sensor.append(slut[p.slocal + sbase])
        reading_metric.append(mlut[p.mlocal + mbase])
        sbase += len(p.sensor_names)
        mbase += len(p.metric_names)

    def joined(arrays: list[npt.NDArray[Any]], dtype: type) -> npt.NDArray[Any]:
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays or [np.empty(0, dtype)])

    rs = joined(row_sensor, np.int64)
    rt = joined([p.time for p in parts], np.int64)
    rq = joined([p.quality for p in parts], np.int32)
    count = joined([p.count for p in parts], np.int64)
    row = np.repeat(np.arange(rs.size, dtype=np.int64), count)
    return Columns(
        sensor_ids=sensor_ids, vendors=vendors, metric_names=metric_names,
        row_sensor=rs, row_time=rt,
        row_receive_time=joined([p.receive for p in parts], np.int64),
        row_interval_s=joined([p.interval for p in parts], np.int32), row_quality=rq,
        row_record=joined([p.record for p in parts], np.int64),
        row=row, sensor=rs[row], time=rt[row],
        metric=joined(reading_metric, np.int64),
        value=joined([p.value for p in parts], np.float64), quality=rq[row],
        incidents=incidents, incident_record=np.array(incident_record, np.int64))


def decode_each(values: list[bytes | None]) -> tuple[Columns, list[tuple[int, str]]]:
    """``decode_batches`` that survives bad records: one call for the whole list; if it
    raises, every record alone, and the good ones decoded together again.

    Returns the columns of the good records (``row_record`` etc. still index ``values``)
    and ``(index, reason)`` for each bad one (a ``None`` value is a tombstone), which the
    consumers dead-letter or park as they do today for v1 events.
    """
    if all(v is not None for v in values):
        try:
            return decode_batches(values), []  # type: ignore[arg-type]
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
    good: list[int] = []
    bad: list[tuple[int, str]] = []
    for k, v in enumerate(values):
        if v is None:
            bad.append((k, "empty message (tombstone) on the events topic"))
            continue
        try:
            decode_batches([v])
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            bad.append((k, str(exc)))
        else:
            good.append(k)
    cols = decode_batches([values[k] for k in good])  # type: ignore[misc]
    index = np.array(good, np.int64)
    return _reindexed(cols, index), bad


def _reindexed(cols: Columns, index: npt.NDArray[np.int64]) -> Columns:
    """``cols`` with record indices mapped through ``index`` (positions in a sub-list back
    to positions in the list it was taken from)."""
    if index.size == 0:
        return cols
    return dataclasses.replace(cols, row_record=index[cols.row_record],
                               incident_record=index[cols.incident_record])
