"""Events-topic values, contract v1 and v2 alike, as the ``Event`` structs the rules take.

The rule engine (``alerts.engine``, ``alerts.batch``, ``alerts.windows``) evaluates
``Event`` structs. A v2 record (``ingest.contract.EventBatch``) carries a gateway's or a
batch's readings as columns and no dimension text; here its rows become events again,
with the place of each sensor taken from the fleet registry the engine already holds
(``SensorIndex.registry``), and incidents become ``incident`` events.

Trade-off, chosen for now: this keeps one Python object per row (a sensor's sample, not
each of its 4-7 readings) between the decoder and the rules; the records and the JSON
parse per event are gone. Rules reading the columns directly is the next step.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from alerts.batch import Place
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


def decode_values(values: list[bytes], places: Mapping[str, Place]) -> list[Event]:
    """Every event of ``values`` in stream order (v1 and v2 runs decoded in one call each).

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
