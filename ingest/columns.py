"""Ingest's columnar batch: what the normalizer makes of a batch of MQTT messages.

Issue 15 (item 1) made this the unit ingest works in from the adapters to Kafka: rows
(one per event) and readings (one per measurement) as numpy arrays, with the batch's
sensor table, instead of a v1 ``Event`` struct per reading. The duplicate window takes
``row_key`` (``ingest.dedup``), ``take`` keeps what passes it, ``ingest.kafka.
v2_records_of`` encodes the contract v2 records from the arrays, and ``events`` rebuilds
v1 events only where they are still wanted (contract v1, tests). A module of its own so
the Kafka side can take the columns without importing the normalizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cityops.registry import Sensor
from ingest.contract import METRICS, DeadLetter, Event, Incident, event_id

# Ingest's own metric codes (readings' ``metric`` column): positions in ``METRICS``. A
# v2 record carries metric *names*, so these codes never leave the process.
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)
METRIC_CODE: dict[str, int] = {name: k for k, name in enumerate(METRIC_NAMES)}
_INCIDENT = "incident"


@dataclass(slots=True)
class Normalized:
    """What one batch of messages became: reading rows as columns, and dead letters.

    Rows (one per event: a reading or an incident, in message order) and their readings
    (one per measurement, following their row's order) are numpy arrays; sensors are
    indices into ``sensors``, this batch's sensor table. ``dead`` are the dead letters,
    ``keys`` the Kafka key of each message with rows: contract v2 produces one record per
    message, keyed by the gateway id for a gateway message, else by the sensor's gateway
    if the registry puts it behind one, else by the sensor id (so a sensor's readings
    share one partition whichever way they came).

    ``events`` / ``origin`` rebuild the v1 view (an ``Event`` per row and the message it
    came from): for contract v1 and tests, not the v2 hot path.
    """

    sensors: list[Sensor]  # the batch's sensor table: rows index it
    row_sensor: npt.NDArray[np.int64]
    row_msg: npt.NDArray[np.int64]  # index of the row's message in the batch
    row_time: npt.NDArray[np.int64]  # event time, epoch ms
    row_receive: npt.NDArray[np.int64]  # its message's receive time, epoch ms
    row_interval: npt.NDArray[np.int64]
    row_quality: npt.NDArray[np.int64]
    row_kind: npt.NDArray[np.int64]  # index into ``kinds``: 0 is a plain reading
    row_key: npt.NDArray[np.int64]  # duplicate-window key (``Normalizer._keys``)
    row_count: npt.NDArray[np.int64]  # readings of each row
    metric: npt.NDArray[np.int64]  # per reading: index into ``METRIC_NAMES``
    value: npt.NDArray[np.float64]  # per reading, in contract units, range-checked
    kinds: list[tuple[str, str | None]]  # (kind, incident) of each ``row_kind`` code
    dead: list[DeadLetter] = field(default_factory=list)
    keys: dict[int, str] = field(default_factory=dict)

    @classmethod
    def empty(cls, kinds: list[tuple[str, str | None]]) -> Normalized:
        i = np.empty(0, np.int64)
        return cls([], i, i, i, i, i, i, i, i, i, i, np.empty(0, np.float64), kinds)

    def __len__(self) -> int:
        """Rows (events)."""
        return int(self.row_time.size)

    def take(self, rows: npt.NDArray[np.int64]) -> Normalized:
        """Only ``rows`` (positions, in the order given) and their readings; the rest
        (sensor table, dead letters, keys) as is."""
        if rows.size == len(self) and np.array_equal(rows, np.arange(rows.size)):
            return self
        start = np.cumsum(self.row_count) - self.row_count
        count = self.row_count[rows]
        # readings of the kept rows: each row's run start..start+count, in order
        reading = np.repeat(start[rows] - (np.cumsum(count) - count), count) + np.arange(
            int(count.sum()))
        return Normalized(
            self.sensors, self.row_sensor[rows], self.row_msg[rows], self.row_time[rows],
            self.row_receive[rows], self.row_interval[rows], self.row_quality[rows],
            self.row_kind[rows], self.row_key[rows], count, self.metric[reading],
            self.value[reading], self.kinds, self.dead, self.keys)

    @property
    def incident_rows(self) -> npt.NDArray[np.bool_]:
        """Per row: an incident (rare; it travels as an ``Incident`` struct in v2)."""
        other = self.row_kind != 0  # code 0 is a plain reading: almost every row
        if other.any():
            is_incident = np.array([k == _INCIDENT for k, _ in self.kinds], bool)
            return is_incident[self.row_kind]
        return other

    @property
    def origin(self) -> list[int]:
        """Per row (event), the index of its message in the batch."""
        return self.row_msg.tolist()

    @property
    def events(self) -> list[Event]:
        """The v1 ``Event`` of every row, in order (contract v1 and tests)."""
        names = [METRIC_NAMES[c] for c in self.metric.tolist()]
        values = self.value.tolist()
        out: list[Event] = []
        g = 0
        for s, t, r, iv, q, k, c in zip(
                self.row_sensor.tolist(), self.row_time.tolist(), self.row_receive.tolist(),
                self.row_interval.tolist(), self.row_quality.tolist(), self.row_kind.tolist(),
                self.row_count.tolist(), strict=True):
            sensor = self.sensors[s]
            kind, incident = self.kinds[k]
            out.append(Event(
                event_id=event_id(sensor.sensor_id, t, kind, incident),
                sensor_id=sensor.sensor_id, domain=sensor.domain, type=sensor.type,
                district=sensor.district, landmark=sensor.landmark, lat=sensor.lat,
                lon=sensor.lon, event_time=t, receive_time=r, kind=kind, incident=incident,
                interval_s=iv, measurements=dict(zip(names[g:g + c], values[g:g + c],
                                                     strict=True)),
                quality=q, vendor=sensor.vendor))
            g += c
        return out

    def incident(self, row: int) -> Incident:
        """Row ``row`` (an incident row) as the ``Incident`` a v2 batch carries."""
        sensor = self.sensors[int(self.row_sensor[row])]
        kind, name = self.kinds[int(self.row_kind[row])]
        start = int(self.row_count[:row].sum())
        end = start + int(self.row_count[row])
        t = int(self.row_time[row])
        return Incident(
            sensor_id=sensor.sensor_id, event_id=event_id(sensor.sensor_id, t, kind, name),
            event_time=t, receive_time=int(self.row_receive[row]),
            incident=name or "unknown", interval_s=int(self.row_interval[row]),
            measurements=dict(zip([METRIC_NAMES[c] for c in self.metric[start:end].tolist()],
                                  self.value[start:end].tolist(), strict=True)),
            quality=int(self.row_quality[row]), vendor=sensor.vendor)

    @staticmethod
    def joined(parts: list[tuple[int, Normalized]], dead: list[DeadLetter],
               kinds: list[tuple[str, str | None]]) -> Normalized:
        """Normalized one-message parts ``(message index, part)`` as one batch, in order
        (the slow path of ``normalize_batch``: one message at a time)."""
        if not parts:
            out = Normalized.empty(kinds)
            out.dead = dead
            return out
        table: dict[str, int] = {}
        sensors: list[Sensor] = []
        row_sensor: list[npt.NDArray[np.int64]] = []
        row_msg: list[npt.NDArray[np.int64]] = []
        keys: dict[int, str] = {}
        for i, p in parts:
            lut = np.array([table.setdefault(s.sensor_id, len(table)) for s in p.sensors],
                           np.int64)
            sensors += [s for s in p.sensors if table[s.sensor_id] >= len(sensors)]
            row_sensor.append(lut[p.row_sensor] if lut.size else p.row_sensor)
            row_msg.append(np.full(len(p), i, np.int64))
            if 0 in p.keys:
                keys[i] = p.keys[0]

        def cat(name: str) -> npt.NDArray[Any]:
            return np.concatenate([getattr(p, name) for _, p in parts])

        return Normalized(sensors, np.concatenate(row_sensor), np.concatenate(row_msg),
                          cat("row_time"), cat("row_receive"), cat("row_interval"),
                          cat("row_quality"), cat("row_kind"), cat("row_key"),
                          cat("row_count"), cat("metric"), cat("value"), kinds, dead, keys)
