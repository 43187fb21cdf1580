"""Events of the stream as columns, before the rule engine has given their sensors codes.

Why a type of its own: decoding must stay pure (no engine state: a poll that fails to
decode is decoded again record by record, ``alerts.service._decode_with``), while a
sensor's code and place are engine state (``SensorIndex``). ``Rows`` is what decoding
hands over: per row (one event) arrays of time and receive time and an index into
``learn``, the list of what ``Batch`` must teach the sensor index, in stream order:

- a v2 run (``rows_of_columns``) gives one entry per DISTINCT sensor of the run: its place
  is the fleet registry's, so learning it once per poll is exactly learning it per row;
- a v1 run (``rows_of_events``) gives one entry per event, the event itself: a v1 event
  carries its own place, and the index learns them in order, as it always did.

Readings are three parallel arrays (row, metric, value) sorted by row, so a metric's
positions come out in stream order. Incidents are rare: what only they carry (event id,
incident kind) lives in a small dict by row, ``notes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from ingest.contract import Columns, Event, Kind

_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]


class Note(NamedTuple):
    """What a row carries beyond its readings: an incident's identity and kind."""

    event_id: str
    incident: str | None
    is_incident: bool  # kind == "incident" (what count and geofence rules select)


class Learn(NamedTuple):
    """One entry for the sensor index: a v1 event (its own place), or a v2 sensor (its
    registry place; ``interval_s`` of its first row, for a sensor the registry lacks)."""

    sensor_id: str
    event: Event | None
    interval_s: int


@dataclass(slots=True)
class Rows:
    """One run of records of one contract version, as columns (see the module doc)."""

    learn: list[Learn]
    entry: _I64  # per row: index into ``learn``
    time: _I64  # per row: event time
    receive: _I64  # per row: receive time
    metric_names: list[str]
    r_row: _I64  # per reading: its row, nondecreasing
    r_metric: _I64  # per reading: index into ``metric_names``
    r_value: _F64
    notes: dict[int, Note] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.time.size)

    def sensor_ids(self) -> list[str]:
        """Per row, its sensor id (for tests and logs; the engine works on codes)."""
        ids = [e.sensor_id for e in self.learn]
        return [ids[k] for k in self.entry.tolist()]


def rows_of_events(events: Sequence[Event]) -> Rows:
    """v1 events (and the closed windows the engine makes) as rows: one learn entry per
    event, readings from each measurements dict, flattened by C-level iteration (the
    legacy path: the events exist already)."""
    n = len(events)
    dicts = [e.measurements for e in events]
    keys = list(chain.from_iterable(dicts))
    names = list(dict.fromkeys(keys))
    at = {k: m for m, k in enumerate(names)}
    incident = Kind.INCIDENT.value
    return Rows(
        learn=[Learn(e.sensor_id, e, e.interval_s) for e in events],
        entry=np.arange(n, dtype=np.int64),
        time=np.fromiter((e.event_time for e in events), np.int64, n),
        receive=np.fromiter((e.receive_time for e in events), np.int64, n),
        metric_names=names,
        r_row=np.repeat(np.arange(n, dtype=np.int64), [len(d) for d in dicts]),
        r_metric=np.fromiter(map(at.__getitem__, keys), np.int64, len(keys)),
        r_value=np.fromiter(chain.from_iterable(d.values() for d in dicts), np.float64,
                            len(keys)),
        notes={i: Note(e.event_id, e.incident, e.kind == incident) for i, e in
               enumerate(events) if e.incident is not None or e.kind == incident})


def rows_of_columns(cols: Columns) -> Rows:
    """Decoded v2 columns as rows, without a Python step per row or reading.

    Row order is ``events_of``'s (the per-event path): by record, and inside a record its
    rows, then its incidents. Learn entries are the run's distinct sensors in order of
    first appearance, so new sensors get their codes in the order the per-event path
    would give them.
    """
    names = list(cols.sensor_ids)
    sensor, time = cols.row_sensor, cols.row_time
    receive, interval = cols.row_receive_time, cols.row_interval_s
    r_row, r_metric, r_value = cols.row, cols.metric, cols.value
    metric_names = list(cols.metric_names)
    notes: dict[int, Note] = {}
    if cols.incidents:
        sensor, time, receive, interval, r_row, r_metric, r_value, notes = _with_incidents(
            cols, names, metric_names)
    if sensor.size == 0:
        uniq = first = np.empty(0, np.int64)
    else:
        uniq, first = np.unique(sensor, return_index=True)
        order = np.argsort(first)
        uniq, first = uniq[order], first[order]
    lut = np.zeros(len(names), np.int64)
    lut[uniq] = np.arange(uniq.size)
    learn = [Learn(names[s], None, iv) for s, iv in
             zip(uniq.tolist(), interval[first].tolist(), strict=True)]
    return Rows(learn=learn, entry=lut[sensor], time=time, receive=receive,
                metric_names=metric_names, r_row=r_row, r_metric=r_metric,
                r_value=r_value, notes=notes)


def _with_incidents(cols: Columns, names: list[str], metric_names: list[str]
                    ) -> tuple[_I64, _I64, _I64, npt.NDArray[np.int32], _I64, _I64, _F64,
                               dict[int, Note]]:
    """Rows and incidents merged in record order (rows first), readings of incidents
    included; ``names`` and ``metric_names`` are extended with what only incidents name."""
    n = cols.row_sensor.size
    incs = cols.incidents
    at = {s: k for k, s in enumerate(names)}
    mat = {m: k for k, m in enumerate(metric_names)}
    inc_sensor = []
    for inc in incs:
        k = at.get(inc.sensor_id)
        if k is None:
            k = at[inc.sensor_id] = len(names)
            names.append(inc.sensor_id)
        inc_sensor.append(k)
    order = np.argsort(np.concatenate([cols.row_record, cols.incident_record]), kind="stable")
    where = np.empty_like(order)
    where[order] = np.arange(order.size)  # source (rows, then incidents) -> position
    m = len(incs)
    sensor = np.concatenate([cols.row_sensor, np.asarray(inc_sensor, np.int64)])[order]
    time = np.concatenate([cols.row_time, np.fromiter(
        (i.event_time for i in incs), np.int64, m)])[order]
    receive = np.concatenate([cols.row_receive_time, np.fromiter(
        (i.receive_time for i in incs), np.int64, m)])[order]
    interval = np.concatenate([cols.row_interval_s, np.fromiter(
        (i.interval_s for i in incs), np.int32, m)])[order]
    e_row: list[int] = []
    e_metric: list[int] = []
    e_value: list[float] = []
    notes: dict[int, Note] = {}
    for k, inc in enumerate(incs):
        pos = int(where[n + k])
        notes[pos] = Note(inc.event_id, inc.incident, True)
        for name, v in inc.measurements.items():
            mk = mat.get(name)
            if mk is None:
                mk = mat[name] = len(metric_names)
                metric_names.append(name)
            e_row.append(pos)
            e_metric.append(mk)
            e_value.append(v)
    r_row = np.concatenate([where[cols.row], np.asarray(e_row, np.int64)])
    r_metric = np.concatenate([cols.metric, np.asarray(e_metric, np.int64)])
    r_value = np.concatenate([cols.value, np.asarray(e_value, np.float64)])
    o = np.argsort(r_row, kind="stable")
    return sensor, time, receive, interval, r_row[o], r_metric[o], r_value[o], notes
