"""A batch of events as columns: COPY records for the database, numpy arrays for rollups.

Events arrive as msgspec structs; one pass over them (the only Python loop of the hot
path, one iteration per reading) builds both the binary-COPY records and the integer
codes numpy groups by. Codes come from ``Vocabulary`` objects that live as long as the
processor, so a sensor keeps its code across batches and decoding a rollup key back to
names is an array lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.contract import Event, Kind

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
METRIC_BITS = 16  # metric codes are packed under sensor / district codes in rollup keys

READING_COLUMNS: tuple[str, ...] = (
    "time", "sensor_id", "metric", "value", "district", "domain", "type", "landmark",
    "event_id", "quality")
#: A reading as staged on the slow path: the readings columns plus its position in the batch.
STAGE_COLUMNS: tuple[str, ...] = (*READING_COLUMNS, "ord")
INCIDENT_COLUMNS: tuple[str, ...] = (
    "time", "event_id", "sensor_id", "incident", "district", "domain", "type", "landmark",
    "lat", "lon", "confidence", "people_count", "quality", "measurements")


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


@dataclass(slots=True)
class Batch:
    """One Kafka batch, decoded, de-duplicated within itself, in columns."""

    readings: list[tuple[Any, ...]]  # READING_COLUMNS
    incidents: list[tuple[Any, ...]]
    time_ms: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    sensor: npt.NDArray[np.int64]
    metric: npt.NDArray[np.int64]
    area: npt.NDArray[np.int64]
    new_sensors: list[Event]
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
        """The same batch reduced to the readings at ``positions`` (arrays only: the COPY
        records and incidents stay as they were, they are already written)."""
        return Batch(self.readings, self.incidents, self.time_ms[positions],
                     self.values[positions], self.sensor[positions], self.metric[positions],
                     self.area[positions], self.new_sensors, self.duplicates)


def event_time(ms: int) -> datetime:
    """Exact epoch-ms to an aware datetime (no float rounding)."""
    return EPOCH + timedelta(milliseconds=ms)


def columns(events: list[Event], vocab: Vocabularies, known_sensors: set[str]) -> Batch:
    """Turn decoded events into COPY records and code arrays in a single pass."""
    readings: list[tuple[Any, ...]] = []
    incidents: list[tuple[Any, ...]] = []
    times: list[int] = []
    values: list[float] = []
    sensors: list[int] = []
    metrics: list[int] = []
    areas: list[int] = []
    new_sensors: dict[str, Event] = {}
    seen: set[str] = set()
    duplicates = 0
    sensor_code, metric_code, area_code = (vocab.sensors.code, vocab.metrics.code,
                                           vocab.areas.code)
    sensor_area = vocab.sensor_area
    incident_kind = Kind.INCIDENT.value
    for ev in events:
        if ev.event_id in seen:
            duplicates += 1
            continue
        seen.add(ev.event_id)
        sid = ev.sensor_id
        if sid not in known_sensors and sid not in new_sensors:
            new_sensors[sid] = ev
        t = EPOCH + timedelta(milliseconds=ev.event_time)
        if ev.kind == incident_kind:
            m = ev.measurements
            incidents.append((t, ev.event_id, sid, ev.incident or "unknown", ev.district,
                              ev.domain, ev.type, ev.landmark, ev.lat, ev.lon,
                              m.get("confidence"), m.get("people_count"), ev.quality, m))
            continue
        s = sensor_code(sid)
        a = sensor_area[s] = area_code((ev.district, ev.domain))
        ms = ev.event_time
        for metric, value in ev.measurements.items():
            readings.append((t, sid, metric, value, ev.district, ev.domain, ev.type,
                             ev.landmark, ev.event_id, ev.quality))
            times.append(ms)
            values.append(value)
            sensors.append(s)
            metrics.append(metric_code(metric))
            areas.append(a)
    if len(vocab.metrics.names) >= 1 << METRIC_BITS:
        raise ValueError(f"more than {1 << METRIC_BITS} distinct metrics: refusing to pack keys")
    return Batch(readings, incidents,
                 np.array(times, dtype=np.int64), np.array(values, dtype=np.float64),
                 np.array(sensors, dtype=np.int64), np.array(metrics, dtype=np.int64),
                 np.array(areas, dtype=np.int64), list(new_sensors.values()), duplicates)
