"""A batch of events as columns: numpy arrays for the readings COPY, rollups and latest state.

Events arrive as msgspec structs; one pass over them (the only Python loop of the hot
path, one iteration per reading) fills the integer codes numpy works with. Codes come
from ``Vocabulary`` objects that live as long as the processor, so a sensor keeps its
code across batches and decoding a key back to names is an array lookup. The database
keys of the narrow ``readings`` row (``sensors.sensor_key``, ``metrics.code``) are
looked up per code once (``Vocabularies.db_sensor`` / ``db_metric``), so the COPY
payload is built from arrays with no per-reading object (``processors.copy``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from cityops.registry import Sensor
from ingest.contract import Columns, Event, Kind

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
METRIC_BITS = 16  # metric codes are packed under sensor / district codes in rollup keys

#: The narrow ``readings`` row, in COPY order.
READING_COLUMNS: tuple[str, ...] = ("time", "sensor", "metric", "value", "quality")
INCIDENT_COLUMNS: tuple[str, ...] = (
    "time", "event_id", "sensor_id", "incident", "district", "domain", "type", "landmark",
    "lat", "lon", "confidence", "people_count", "quality", "measurements")


class Dims(NamedTuple):
    """A sensor's dimension text, as its events last said (what ``sensor_latest`` shows)."""

    district: str
    domain: str
    type: str
    landmark: str


#: A sensors-table row: (sensor_id, domain, type, vendor, district, landmark, lat, lon,
#: interval_s), for a sensor the processor sees for the first time.
SensorRow = tuple[str, str, str, str, str, str, float, float, int]
UNKNOWN = Dims("unknown", "unknown", "unknown", "unknown")


class Vocabulary:
    """Stable integer codes for strings (sensor ids, metrics, district/domain pairs)."""

    def __init__(self) -> None:
        self.codes: dict[Any, int] = {}
        self.names: list[Any] = []
        self._array: npt.NDArray[np.object_] | None = None

    def code(self, name: Any) -> int:
        c = self.codes.get(name)
        if c is None:
            c = self.codes[name] = len(self.names)
            self.names.append(name)
            self._array = None
        return c

    def lookup(self, codes: npt.NDArray[np.int64]) -> npt.NDArray[np.object_]:
        """Names of many codes at once."""
        if self._array is None or len(self._array) != len(self.names):
            self._array = np.empty(len(self.names), dtype=object)
            self._array[:] = self.names
        return self._array[codes]


@dataclass(slots=True)
class Vocabularies:
    sensors: Vocabulary = field(default_factory=Vocabulary)
    metrics: Vocabulary = field(default_factory=Vocabulary)
    areas: Vocabulary = field(default_factory=Vocabulary)  # (district, domain)
    sensor_area: dict[int, int] = field(default_factory=dict)  # sensor code -> area code
    sensor_dims: dict[int, Dims] = field(default_factory=dict)  # sensor code -> its text
    # Database keys by vocabulary code (-1: not looked up yet); ``Storage.resolve`` fills them.
    db_sensor: npt.NDArray[np.int32] = field(default_factory=lambda: np.empty(0, np.int32))
    db_metric: npt.NDArray[np.int16] = field(default_factory=lambda: np.empty(0, np.int16))


@dataclass(slots=True)
class Batch:
    """One Kafka batch, decoded, de-duplicated within itself, in columns."""

    incidents: list[tuple[Any, ...]]
    time_ms: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    sensor: npt.NDArray[np.int64]  # vocabulary codes
    metric: npt.NDArray[np.int64]
    area: npt.NDArray[np.int64]
    quality: npt.NDArray[np.int16]
    new_sensors: list[SensorRow]
    duplicates: int  # events repeated inside this batch, dropped here

    @property
    def sensor_key(self) -> npt.NDArray[np.int64]:
        """(sensor, metric) packed into one code per reading."""
        return (self.sensor << METRIC_BITS) | self.metric

    @property
    def area_key(self) -> npt.NDArray[np.int64]:
        """(district, domain, metric) packed into one code per reading."""
        return (self.area << METRIC_BITS) | self.metric

    def __len__(self) -> int:
        return int(self.values.size)

    def latest_positions(self) -> npt.NDArray[np.int64]:
        """Position of the newest reading (by event time) of every (sensor, metric)."""
        if self.values.size == 0:
            return np.empty(0, dtype=np.int64)
        key = self.sensor_key
        t_rel = self.time_ms - self.time_ms.min()
        t_bits = max(int(t_rel.max()), 1).bit_length()
        if (int(key.max()) + 1) << t_bits < 1 << 63:
            order = np.argsort((key << t_bits) | t_rel)
        else:
            order = np.lexsort((t_rel, key))
        k = key[order]
        is_last = np.empty(k.size, dtype=bool)
        is_last[-1] = True
        np.not_equal(k[1:], k[:-1], out=is_last[:-1])
        return order[is_last]

    def only(self, positions: npt.NDArray[np.int64]) -> Batch:
        """The same batch reduced to the readings at ``positions`` (the incidents stay as
        they were: they are written on their own)."""
        return Batch(self.incidents, self.time_ms[positions], self.values[positions],
                     self.sensor[positions], self.metric[positions], self.area[positions],
                     self.quality[positions], self.new_sensors, self.duplicates)


def event_time(ms: int) -> datetime:
    """Exact epoch-ms to an aware datetime (no float rounding)."""
    return EPOCH + timedelta(milliseconds=ms)


def columns(events: list[Event], vocab: Vocabularies, known_sensors: set[str]) -> Batch:
    """Turn decoded events into code arrays (and incident records) in a single pass."""
    incidents: list[tuple[Any, ...]] = []
    times: list[int] = []
    values: list[float] = []
    sensors: list[int] = []
    metrics: list[int] = []
    areas: list[int] = []
    quality: list[int] = []
    new_sensors: dict[str, SensorRow] = {}
    seen: set[str] = set()
    duplicates = 0
    sensor_code, metric_code, area_code = (vocab.sensors.code, vocab.metrics.code,
                                           vocab.areas.code)
    sensor_area, sensor_dims = vocab.sensor_area, vocab.sensor_dims
    incident_kind = Kind.INCIDENT.value
    for ev in events:
        if ev.event_id in seen:
            duplicates += 1
            continue
        seen.add(ev.event_id)
        sid = ev.sensor_id
        if sid not in known_sensors and sid not in new_sensors:
            new_sensors[sid] = sensor_row(ev)
        if ev.kind == incident_kind:
            m = ev.measurements
            incidents.append((EPOCH + timedelta(milliseconds=ev.event_time), ev.event_id, sid,
                              ev.incident or "unknown", ev.district, ev.domain, ev.type,
                              ev.landmark, ev.lat, ev.lon, m.get("confidence"),
                              m.get("people_count"), ev.quality, m))
            continue
        s = sensor_code(sid)
        dims = sensor_dims.get(s)
        if dims is None or (dims.district != ev.district or dims.landmark != ev.landmark
                             or dims.domain != ev.domain or dims.type != ev.type):
            sensor_dims[s] = Dims(ev.district, ev.domain, ev.type, ev.landmark)
            sensor_area[s] = area_code((ev.district, ev.domain))
        a = sensor_area[s]
        ms, q = ev.event_time, ev.quality
        for metric, value in ev.measurements.items():
            times.append(ms)
            values.append(value)
            sensors.append(s)
            metrics.append(metric_code(metric))
            areas.append(a)
            quality.append(q)
    if len(vocab.metrics.names) >= 1 << METRIC_BITS:
        raise ValueError(f"more than {1 << METRIC_BITS} distinct metrics: refusing to pack keys")
    return Batch(incidents, np.array(times, dtype=np.int64), np.array(values, dtype=np.float64),
                 np.array(sensors, dtype=np.int64), np.array(metrics, dtype=np.int64),
                 np.array(areas, dtype=np.int64), np.array(quality, dtype=np.int16),
                 list(new_sensors.values()), duplicates)


def sensor_row(e: Event) -> SensorRow:
    """The ``sensors`` row of a sensor known only from its events."""
    return (e.sensor_id, e.domain, e.type, e.vendor or "unknown", e.district, e.landmark,
            e.lat, e.lon, e.interval_s)


def from_columns(cols: Columns, vocab: Vocabularies, registry: Mapping[str, Sensor],
                 known_sensors: set[str]) -> Batch:
    """A batch from decoded contract-v2 columns: arrays stay arrays.

    The only Python loops are over the result's distinct sensors and metrics (mapping
    their names to this processor's codes) and over incidents; readings are gathered by
    fancy indexing. Dimension text comes from the fleet registry (a v2 record carries
    none); a sensor missing from it (a fleet file older than ingest's) is stored as
    ``unknown`` rather than refused.
    """
    scode = np.empty(len(cols.sensor_ids), np.int64)
    sarea = np.empty(len(cols.sensor_ids), np.int64)
    new_sensors: list[SensorRow] = []
    dims_of, area_of = vocab.sensor_dims, vocab.sensor_area
    for k, sid in enumerate(cols.sensor_ids):
        c = vocab.sensors.code(sid)
        scode[k] = c
        if c not in dims_of:
            reg = registry.get(sid)
            d = Dims(reg.district, reg.domain, reg.type, reg.landmark) if reg else UNKNOWN
            dims_of[c] = d
            area_of[c] = vocab.areas.code((d.district, d.domain))
        sarea[k] = area_of[c]
        if sid not in known_sensors:
            reg = registry.get(sid)
            new_sensors.append(
                (sid, reg.domain, reg.type, reg.vendor, reg.district, reg.landmark, reg.lat,
                 reg.lon, reg.interval_s) if reg else
                (sid, "unknown", "unknown", cols.vendors[k] or "unknown", "unknown",
                 "unknown", 0.0, 0.0, 0))
    mcode = np.array([vocab.metrics.code(m) for m in cols.metric_names], np.int64)
    if len(vocab.metrics.names) >= 1 << METRIC_BITS:
        raise ValueError(f"more than {1 << METRIC_BITS} distinct metrics: refusing to pack keys")
    incidents: list[tuple[Any, ...]] = []
    for inc in cols.incidents:
        reg = registry.get(inc.sensor_id)
        d = Dims(reg.district, reg.domain, reg.type, reg.landmark) if reg else UNKNOWN
        m = inc.measurements
        incidents.append((EPOCH + timedelta(milliseconds=inc.event_time), inc.event_id,
                          inc.sensor_id, inc.incident, d.district, d.domain, d.type,
                          d.landmark, reg.lat if reg else 0.0, reg.lon if reg else 0.0,
                          m.get("confidence"), m.get("people_count"), inc.quality, m))
        if inc.sensor_id not in known_sensors and reg is not None and not any(
                r[0] == inc.sensor_id for r in new_sensors):
            new_sensors.append((inc.sensor_id, reg.domain, reg.type, reg.vendor, reg.district,
                                reg.landmark, reg.lat, reg.lon, reg.interval_s))
    return Batch(incidents, cols.time, cols.value, scode[cols.sensor], mcode[cols.metric],
                 sarea[cols.sensor], cols.quality.astype(np.int16), new_sensors, 0)


def concat(parts: list[Batch]) -> Batch:
    """Batches side by side, in order, readings deduplicated by their natural key."""
    parts = [p for p in parts if len(p) or p.incidents or p.new_sensors]
    if not parts:
        return Batch([], *(np.empty(0, t) for t in (np.int64, np.float64, np.int64,
                                                      np.int64, np.int64, np.int16)), [], 0)
    if len(parts) == 1:
        return unique_readings(parts[0])
    seen: set[str] = set()
    new: list[SensorRow] = []
    for p in parts:
        for row in p.new_sensors:
            if row[0] not in seen:
                seen.add(row[0])
                new.append(row)
    return unique_readings(Batch(
        [i for p in parts for i in p.incidents],
        *(np.concatenate([getattr(p, f) for p in parts]) for f in (
            "time_ms", "values", "sensor", "metric", "area", "quality")),
        new, sum(p.duplicates for p in parts)))


def unique_readings(batch: Batch) -> Batch:
    """``batch`` without repeated (sensor, metric, time) readings, the first one kept (a
    reading sent twice, by MQTT redelivery or a gateway resending, is one reading)."""
    n = len(batch)
    if n < 2:
        return batch
    order = np.lexsort((np.arange(n), batch.time_ms, batch.metric, batch.sensor))
    s, m, t = batch.sensor[order], batch.metric[order], batch.time_ms[order]
    repeat = np.zeros(n, bool)
    repeat[1:] = (s[1:] == s[:-1]) & (m[1:] == m[:-1]) & (t[1:] == t[:-1])
    if not repeat.any():
        return batch
    keep = np.sort(order[~repeat])
    out = batch.only(keep)
    out.duplicates += int(repeat.sum())
    return out
