"""Events-topic values, contract v1 and v2 alike, as the columns the rules read.

The service's path is ``decode_rows``: each run of records of one version becomes one
``alerts.rows.Rows``. A v2 run (``ingest.contract.EventBatch`` records: a gateway's or a
batch's readings as columns, no dimension text) stays columns end to end: no ``Event``
per row, no measurements dict, the sensor's place taken once per distinct sensor from the
fleet registry when the ``Batch`` is built. A v1 run is decoded to ``Event`` structs (its
JSON carries them) and turned into the same columns.

Why: the per-event path (``decode_values`` / ``events_of``, kept for the benchmark and as
the reference the tests compare the columns with) built one Python object per row between
the decoder and the rules, and ``Batch`` then rebuilt columns from them (a py-spy profile
at 8,000 msg/s: decoding 19% of the worker's CPU, ``events_of`` 7.6% of it); in gateway
mode that starved the worker.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from alerts.batch import Place
from alerts.rows import Rows, rows_of_columns, rows_of_events
from ingest.contract import (
    Columns,
    Event,
    Kind,
    decode_batches,
    decode_event,
    decode_events,
    event_id,
    version_runs,
)

#: The place of a sensor the registry does not list (a v2 record names it anyway: a
#: fleet file older than ingest's). Rules that select by place do not match it.
_NOWHERE = Place("", "unknown", "unknown", "unknown", "unknown", 0.0, 0.0)


def decode_rows(values: list[bytes]) -> list[Rows]:
    """Every row of ``values`` in stream order: one ``Rows`` per run of one contract
    version (empty runs left out).

    Raises ``msgspec.ValidationError`` / ``DecodeError`` when any record is bad, like
    ``decode_events``: the caller then decodes record by record (``decode_row``).
    """
    out: list[Rows] = []
    for i, j, v1 in version_runs(values):
        run = values[i:j]
        if v1:
            rows = rows_of_events(decode_events(run) if len(run) > 1 else
                                  [decode_event(run[0])])
        else:
            rows = rows_of_columns(decode_batches(run))
        if len(rows):
            out.append(rows)
    return out


def decode_row(value: bytes) -> list[Rows]:
    """The rows of one record (a v2 record holds many)."""
    return decode_rows([value])


def decode_values(values: list[bytes], places: Mapping[str, Place]) -> list[Event]:
    """The per-event path: every event of ``values`` in stream order (v1 and v2 runs
    decoded in one call each), v2 rows expanded by ``events_of``.

    Raises ``msgspec.ValidationError`` / ``DecodeError`` when any record is bad, like
    ``decode_events``: the caller then decodes record by record (``decode_value``).
    """
    out: list[Event] = []
    for i, j, v1 in version_runs(values):
        run = values[i:j]
        if v1:
            out += decode_events(run) if len(run) > 1 else [decode_event(run[0])]
        else:
            out += events_of(decode_batches(run), places)
    return out


def decode_value(value: bytes, places: Mapping[str, Place]) -> list[Event]:
    """The events of one record (a v2 record holds many)."""
    return decode_values([value], places)


def events_of(cols: Columns, places: Mapping[str, Place]) -> list[Event]:
    """Rows and incidents of decoded v2 columns as events, in record order (inside a
    record, its rows, then its incidents)."""
    names = cols.metric_names
    counts = np.bincount(cols.row, minlength=cols.row_sensor.size).tolist()
    values = cols.value.tolist()
    metrics = [names[m] for m in cols.metric.tolist()]
    sensor_ids = cols.sensor_ids
    vendors = cols.vendors
    reading = Kind.READING.value
    rows: list[tuple[int, Event]] = []
    at = 0
    for s, t, rt, iv, q, rec, c in zip(
            cols.row_sensor.tolist(), cols.row_time.tolist(), cols.row_receive_time.tolist(),
            cols.row_interval_s.tolist(), cols.row_quality.tolist(), cols.row_record.tolist(),
            counts, strict=True):
        sid = sensor_ids[s]
        p = places.get(sid, _NOWHERE)
        rows.append((rec, Event(
            event_id=event_id(sid, t), sensor_id=sid, domain=p.domain, type=p.type,
            district=p.district, landmark=p.landmark, lat=p.lat, lon=p.lon, event_time=t,
            receive_time=rt, kind=reading, interval_s=iv,
            measurements=dict(zip(metrics[at:at + c], values[at:at + c], strict=True)),
            quality=q, vendor=vendors[s])))
        at += c
    if not cols.incidents:
        return [e for _, e in rows]
    for inc, rec in zip(cols.incidents, cols.incident_record.tolist(), strict=True):
        p = places.get(inc.sensor_id, _NOWHERE)
        rows.append((rec, Event(
            event_id=inc.event_id, sensor_id=inc.sensor_id, domain=p.domain, type=p.type,
            district=p.district, landmark=p.landmark, lat=p.lat, lon=p.lon,
            event_time=inc.event_time, receive_time=inc.receive_time,
            kind=Kind.INCIDENT.value, incident=inc.incident, interval_s=inc.interval_s,
            measurements=inc.measurements, quality=inc.quality, vendor=inc.vendor)))
    rows.sort(key=lambda x: x[0])  # stable: rows before incidents within a record
    return [e for _, e in rows]
