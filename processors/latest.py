"""Latest state, kept in arrays per (sensor, metric) and flushed as one row per sensor.

Why: ``sensor_latest`` is derived data that dashboards read at human speed, yet it used
to be upserted in every batch transaction, one row per reading. Here the processor keeps
the newest reading of every (sensor, metric) it has seen in arrays, merges each
committed batch into them vectorized (one searchsorted + one compare), and writes only
the cells that changed since the last flush, at most every ``process_latest_flush_s``
seconds and on a clean stop.

A flush writes ONE row per changed sensor (``latest_by_sensor``, migration 0012): its
changed cells as ``{"<metric code>": [time ms, value, quality]}``, merged by one upsert
from arrays. City sensors report every 30-60 s, so nearly every flush
finds each cell of a reporting sensor changed once: keyed by (sensor, metric) that was
one row write per reading; keyed by sensor it is one per message. The view
``sensor_latest`` gives readers the per-metric rows and the names.

Trade-off: the JSON text of a flush is built in Python, one short string per changed
cell, joined per sensor (PostgreSQL's binary jsonb is JSON text too). That is per flush,
not per reading: a cell that changed ten times between flushes is written once.

Correctness:

* Out of order never regresses: a batch's newest reading per key wins only if its event
  time is newer than the cell's (in memory), and the database merge (``latest_merge``)
  replaces a cell only by a newer one and keeps the cells a flush does not carry
  (another processor's, or ones this process has not seen since it started), so a
  flush is idempotent and flushes may land in any order.
* Only committed readings enter the arrays (``Storage`` merges them after the readings
  transaction commits), so a rolled-back or parked record never shows up as latest.
* Trade-off: the arrays are not part of the readings transaction. A crash (not a clean
  stop) loses at most the last ``process_latest_flush_s`` seconds of latest-state
  changes; the next reading of each of those sensors restores its row. Readings and
  rollups stay effectively-once: offsets are still committed only after the readings
  transaction commits.
"""

from __future__ import annotations

import math
import time

import asyncpg
import numpy as np
import numpy.typing as npt

from processors.batch import METRIC_BITS, Batch, Vocabularies

#: Sentinel time of a cell that has no reading yet: any real reading is newer.
_NONE = np.iinfo(np.int64).min

# Order-safe and idempotent: a cell only moves forward in event time (latest_merge).
# The rows come as three arrays (unnest), not through a staging table: a temp table's
# rows are row writes too (~0.2 per reading in the bench), and a flush is one row per
# changed sensor, few enough to send as parameters.
_FLUSH = """
insert into latest_by_sensor as l (sensor, time, cells, updated_at)
select sensor, to_timestamp(time_ms / 1000.0), cells, now()
  from unnest($1::int4[], $2::int8[], $3::jsonb[]) as u (sensor, time_ms, cells)
on conflict (sensor) do update
   set cells = latest_merge(l.cells, excluded.cells),
       time = greatest(l.time, excluded.time), updated_at = now()
"""


def sensor_rows(sensor: npt.NDArray[np.integer], metric: npt.NDArray[np.integer],
                time_ms: npt.NDArray[np.int64], value: npt.NDArray[np.float64],
                quality: npt.NDArray[np.integer]) -> list[tuple[int, int, str]]:
    """Cells grouped by sensor (cells of one sensor must be adjacent) as rows
    ``(sensor, newest time ms, cells JSON)``. A value JSON cannot hold (not finite) is
    written as null: the cell still says when the sensor last reported it."""
    if sensor.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, sensor[1:] != sensor[:-1]])
    ends = np.r_[starts[1:], sensor.size]
    newest = np.maximum.reduceat(time_ms, starts)
    parts = [f'"{m}":[{t},{v!r},{q}]' if math.isfinite(v) else f'"{m}":[{t},null,{q}]'
             for m, t, v, q in zip(metric.tolist(), time_ms.tolist(), value.tolist(),
                                   quality.tolist(), strict=True)]
    return [(s, t, "{" + ",".join(parts[a:b]) + "}")
            for s, t, a, b in zip(sensor[starts].tolist(), newest.tolist(), starts.tolist(),
                                  ends.tolist(), strict=True)]


class LatestState:
    """Newest reading per packed (sensor, metric) key (``Batch.sensor_key``), in arrays.

    ``keys`` is sorted, so a batch finds its cells with one ``np.searchsorted``; the
    parallel arrays hold the event time (int64 ms, what is compared), the value, the
    quality flags and a dirty flag (changed since the last successful flush). Names and
    dimension text are looked up from the vocabularies only for the cells a flush writes.
    Keys only grow: a city's fleet is bounded (~140k cells for 31.5k sensors), and a
    sensor's key keeps its cell.
    """

    def __init__(self, flush_s: float = 2.0) -> None:
        self.flush_s = flush_s
        self.keys: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)
        self.time_ms: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)
        self.values: npt.NDArray[np.float64] = np.empty(0, dtype=np.float64)
        self.quality: npt.NDArray[np.int16] = np.empty(0, dtype=np.int16)
        self.dirty: npt.NDArray[np.bool_] = np.empty(0, dtype=bool)
        self.last_flush = time.monotonic()

    def __len__(self) -> int:
        return int(self.keys.size)

    @property
    def pending(self) -> int:
        """Cells changed since the last successful flush."""
        return int(np.count_nonzero(self.dirty))

    def _add_keys(self, new: npt.NDArray[np.int64]) -> None:
        """Make cells for keys not seen before (empty: sentinel time, clean)."""
        keys = np.concatenate((self.keys, new))
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.time_ms = np.concatenate((self.time_ms, np.full(new.size, _NONE)))[order]
        self.values = np.concatenate((self.values, np.zeros(new.size)))[order]
        self.quality = np.concatenate((self.quality, np.zeros(new.size, np.int16)))[order]
        self.dirty = np.concatenate((self.dirty, np.zeros(new.size, dtype=bool)))[order]

    def update(self, batch: Batch) -> int:
        """Merge a committed batch: each key's newest reading replaces its cell when newer
        by event time. Returns how many cells changed."""
        if len(batch) == 0:
            return 0
        pos = batch.latest_positions()  # one position per key, newest in the batch
        key = batch.sensor_key[pos]
        t = batch.time_ms[pos]
        idx = np.searchsorted(self.keys, key)
        found = idx < self.keys.size
        found[found] = self.keys[idx[found]] == key[found]
        if not found.all():
            self._add_keys(np.unique(key[~found]))
            idx = np.searchsorted(self.keys, key)
        newer = t > self.time_ms[idx]
        if not newer.any():
            return 0
        cells = idx[newer]
        src = pos[newer]
        self.time_ms[cells] = t[newer]
        self.values[cells] = batch.values[src]
        self.quality[cells] = batch.quality[src]
        self.dirty[cells] = True
        return int(cells.size)

    def due(self, now: float | None = None) -> bool:
        """Whether a flush is due: something changed and the flush period has passed."""
        now = time.monotonic() if now is None else now
        return bool(self.dirty.any()) and now - self.last_flush >= self.flush_s

    def cells(self, vocab: Vocabularies) -> tuple[npt.NDArray[np.int64],
                                                  dict[str, npt.NDArray[np.generic]]]:
        """The dirty cells and their columns (database keys, time in epoch ms, value,
        quality), in key order. Every cell holds a committed reading, so its sensor and
        metric have database keys (``Storage.resolve``)."""
        cells = np.flatnonzero(self.dirty)
        keys = self.keys[cells]
        return cells, {"sensor": vocab.db_sensor[keys >> METRIC_BITS],
                       "metric": vocab.db_metric[keys & ((1 << METRIC_BITS) - 1)],
                       "time": self.time_ms[cells], "value": self.values[cells],
                       "quality": self.quality[cells]}

    async def flush(self, conn: asyncpg.Connection, vocab: Vocabularies, *,
                    force: bool = False) -> int:
        """Write the changed cells, one row per sensor, in one statement if due (or
        ``force``); returns how many cells were written. On failure the cells stay dirty: the next
        flush sends them."""
        if not (self.due() or (force and self.dirty.any())):
            return 0
        cells, cols = self.cells(vocab)
        sent = self.time_ms[cells].copy()
        # keys sort by this process's sensor index, so a sensor's cells are adjacent
        rows = sensor_rows(cols["sensor"], cols["metric"], cols["time"], cols["value"],
                           cols["quality"])
        if not rows:
            return 0
        sensors, times, docs = (list(c) for c in zip(*rows, strict=True))
        await conn.execute(_FLUSH, sensors, times, docs)
        # Clean only what was sent and not replaced meanwhile by a newer reading.
        self.dirty[cells[self.time_ms[cells] == sent]] = False
        self.last_flush = time.monotonic()
        return int(cells.size)
