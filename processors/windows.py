"""Rollup windows computed once, when they close (plain PostgreSQL mode).

Why: merging numpy partials into the rollup tables in every batch cost ~20 row writes
per message (staging COPY, four upserts, the same sensor-hour row rewritten every
batch), and p95 does not merge, so merged buckets were recomputed whole, for every
sensor, again and again while the hour was open. Here a window is computed from the raw
readings once it has ended, in the database (``INSERT … SELECT … GROUP BY`` with
``percentile_cont(0.95)``: exact, as TimescaleDB's continuous aggregates compute it),
and written once.

How a batch marks its windows (``marks``, inside the batch's own transaction, so a
mark exists exactly when its readings do):

* a reading of a window not closed yet refreshes ``rollup_pending(window,
  bucket).touched_at``: one small row per window and batch, not per reading;
* a reading of a closed window (late data: ``rollup_closed`` lists the windows computed
  after their grace; the processor keeps the recent ones in memory, ``ClosedWindows``)
  records its cell ``(window, bucket, sensor, metric)`` in ``rollup_late``.

Either mark is correct for any reading: a window mark makes the whole window be computed
again, a cell mark only the cell. The choice only decides the cost, which is why a
closed-window list a few seconds stale is fine.

``WindowCloser.run`` (any processor; a PostgreSQL advisory lock lets one run at a time)
computes every pending bucket whose end plus its grace every active events partition
has passed in event time (``rollup_watermarks``: each batch records a robust high
percentile of its readings' times per partition, kept monotonic; a partition silent for
``idle_s`` is not waited for; with none active, the database's clock decides) and that
was not touched for ``settle`` seconds: sensor and district rollups from one scan. Then
it deletes the mark only if nobody touched it meanwhile (compare-and-delete on
``touched_at``): a batch that committed readings after the recompute's snapshot leaves
its mark in place, so the bucket is computed again. Late cells are recomputed cell by
cell (the sensor's own readings of that window, and its district's), then their marks
deleted by id.
Every step is an idempotent recompute from the readings, and an update that changes
nothing is skipped (``where … is distinct from``), so closing early, twice or after a
crash is harmless: only its cost differs. That is why a window nobody touched for
``quiet_s`` (``process_close_quiet_s``) is computed even while open: a quiet city's
rollups are current, and a window closed early is simply computed again when it ends.
(Judged on the window's mark, not on one processor's traffic: a replica without
partitions must not recompute a busy city's open hour every period.) The closer runs
beside the consume loop on its own connection (``Processor.close_loop``): a busy minute
is one long statement, and batches do not wait for it.

Event time decides, not the wall clock: a processor catching up on an hour of backlog
closes that hour's windows as its partitions pass them, and a replay does not turn
every reading into a late cell.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg
import numpy as np
import numpy.typing as npt

from processors import metrics
from processors.faults import is_away

log = logging.getLogger(__name__)

#: Rollup windows: name suffix -> seconds.
WINDOWS_S: dict[str, int] = {"1m": 60, "1h": 3600}
LOCK_ID = 0x0C17_0C10  # pg advisory lock: one window closer at a time, across processors

_MARK_PENDING = """
insert into rollup_pending as p (window_s, bucket, touched_at)
select w, timestamptz 'epoch' + b * interval '1 millisecond', clock_timestamp()
  from unnest($1::int4[], $2::int8[]) as u (w, b)
on conflict (window_s, bucket) do update set touched_at = excluded.touched_at
"""
_WATERMARKS = """
insert into rollup_watermarks as w (topic, kafka_partition, event_ms, updated_at)
select t, p, ms, now() from unnest($1::text[], $2::int4[], $3::int8[]) as u (t, p, ms)
on conflict (topic, kafka_partition) do update
   set event_ms = greatest(w.event_ms, least(excluded.event_ms,
                   (extract(epoch from now()) * 1000)::int8 + 10000)),
       updated_at = now()
"""
#: Where event time stands: the slowest active partition, in epoch ms (null: none active).
_EVENT_NOW = """
select min(event_ms) from rollup_watermarks
 where updated_at > now() - $1 * interval '1 second' and ($2::text is null or topic = $2)
"""
_MARK_LATE = """
insert into rollup_late (window_s, bucket, sensor, metric)
select w, timestamptz 'epoch' + b * interval '1 millisecond', s, m
  from unnest($1::int4[], $2::int8[], $3::int4[], $4::int2[]) as u (w, b, s, m)
"""

_STATS = ("count(*) as n, sum(value) as sum, min(value) as min, max(value) as max, "
          "avg(value) as mean, percentile_cont(0.95) within group (order by value) as p95")
_SET = """
do update set n = excluded.n, sum = excluded.sum, min = excluded.min, max = excluded.max,
              mean = excluded.mean, p95 = excluded.p95
where (r.n, r.sum, r.min, r.max, r.p95)
      is distinct from (excluded.n, excluded.sum, excluded.min, excluded.max, excluded.p95)
"""


#: Windows whose per-sensor rollup is a stored table. The minute one is a view over the
#: readings (migration 0013): a sensor reporting every 30-60 s has about one reading per
#: minute, so storing it cost about one row write per reading.
SENSOR_TABLES: frozenset[str] = frozenset({"1h"})
#: The rollup tables of plain PostgreSQL mode (what the closer writes, retention prunes).
ROLLUP_TABLES: tuple[str, ...] = (*(f"sensor_rollup_{w}" for w in WINDOWS_S
                                    if w in SENSOR_TABLES),
                                  *(f"district_rollup_{w}" for w in WINDOWS_S))


def _district_insert(window: str, source: str) -> str:
    return f"""
insert into district_rollup_{window} as r (bucket, district, domain, metric, n, sum, min,
                                          max, mean, p95)
{source}
on conflict (district, domain, metric, bucket) {_SET}
"""


def _close_bucket_sql(window: str) -> str:
    """Sensor (where stored) and district rollups of one whole bucket ($1 = start,
    $2 = end)."""
    if window not in SENSOR_TABLES:
        return _district_insert(window, f"""
select $1, s.district, s.domain, m.name, {_STATS}
  from readings r join sensors s on s.sensor_key = r.sensor join metrics m on m.code = r.metric
 where r.time >= $1 and r.time < $2
 group by s.district, s.domain, m.name""")
    return f"""
with a as (
    select r.sensor, s.district, s.domain, r.metric, grouping(r.sensor) as g, {_STATS}
      from readings r join sensors s on s.sensor_key = r.sensor
     where r.time >= $1 and r.time < $2
     group by grouping sets ((r.sensor, r.metric), (s.district, s.domain, r.metric))
), sensor_rows as (
    insert into sensor_rollup_{window} as r (bucket, sensor_id, metric, n, sum, min, max,
                                            mean, p95)
    select $1, s.sensor_id, m.name, a.n, a.sum, a.min, a.max, a.mean, a.p95
      from a join sensors s on s.sensor_key = a.sensor join metrics m on m.code = a.metric
     where a.g = 0
    on conflict (sensor_id, metric, bucket) {_SET}
    returning 1
)""" + _district_insert(window, """
select $1, a.district, a.domain, m.name, a.n, a.sum, a.min, a.max, a.mean, a.p95
  from a join metrics m on m.code = a.metric
 where a.g = 1""")


def _late_cells_sql(window: str, width_s: int) -> str:
    """Sensor (where stored) and district rollups of some cells ($1 buckets, $2 sensors,
    $3 metrics)."""
    width = f"interval '{width_s} seconds'"
    sensor_rows = f"""
, sensor_rows as (
    insert into sensor_rollup_{window} as r (bucket, sensor_id, metric, n, sum, min, max,
                                            mean, p95)
    select c.bucket, s.sensor_id, m.name, a.n, a.sum, a.min, a.max, a.mean, a.p95
      from c
      cross join lateral (select {_STATS} from readings x
                           where x.sensor = c.sensor and x.metric = c.metric
                             and x.time >= c.bucket and x.time < c.bucket + {width}) a
      join sensors s on s.sensor_key = c.sensor join metrics m on m.code = c.metric
     where a.n > 0
    on conflict (sensor_id, metric, bucket) {_SET}
    returning 1
)""" if window in SENSOR_TABLES else ""
    return f"""
with c as (
    select distinct bucket, sensor, metric
      from unnest($1::timestamptz[], $2::int4[], $3::int2[]) as c (bucket, sensor, metric)
){sensor_rows}, d as (
    select distinct c.bucket, s.district, s.domain, c.metric
      from c join sensors s on s.sensor_key = c.sensor
)""" + _district_insert(window, f"""
select d.bucket, d.district, d.domain, m.name, a.n, a.sum, a.min, a.max, a.mean, a.p95
  from d
  cross join lateral (select {_STATS} from readings x join sensors y on y.sensor_key = x.sensor
                       where y.district = d.district and y.domain = d.domain
                         and x.metric = d.metric
                         and x.time >= d.bucket and x.time < d.bucket + {width}) a
  join metrics m on m.code = d.metric
 where a.n > 0""")


@dataclass(frozen=True, slots=True)
class Grace:
    """How long after its end a window waits for stragglers before it is computed and
    listed as closed (seconds, per window); and how long it must have had no new
    readings (``settle_s``)."""

    minute_s: float = 10.0
    hour_s: float = 120.0
    settle_s: float = 2.0

    def of(self, window_s: int) -> float:
        return self.minute_s if window_s == 60 else self.hour_s


@dataclass(slots=True)
class Marks:
    """What one batch's stored readings mark: pending buckets and late cells."""

    pending_window: npt.NDArray[np.int32]
    pending_bucket_ms: npt.NDArray[np.int64]
    late_window: npt.NDArray[np.int32]
    late_bucket_ms: npt.NDArray[np.int64]
    late_sensor: npt.NDArray[np.int32]
    late_metric: npt.NDArray[np.int16]

    @property
    def late(self) -> int:
        return int(self.late_window.size)


class ClosedWindows:
    """The recently closed windows (bucket starts, epoch ms, sorted), per window length:
    the processor's copy of ``rollup_closed``, refreshed every close period."""

    #: How far back the copy reaches; a reading older than that marks its window
    #: (a whole-window recompute), which is correct, only dearer.
    horizon_s = 2 * 86_400

    def __init__(self) -> None:
        self.buckets: dict[int, npt.NDArray[np.int64]] = {
            w: np.empty(0, np.int64) for w in WINDOWS_S.values()}

    async def refresh(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            "select window_s, (extract(epoch from bucket) * 1000)::int8 from rollup_closed "
            "where bucket > now() - $1 * interval '1 second' order by 1, 2", self.horizon_s)
        for w in self.buckets:
            self.buckets[w] = np.array([r[1] for r in rows if r[0] == w], dtype=np.int64)

    def closed(self, window_s: int, bucket_ms: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return np.isin(bucket_ms, self.buckets[window_s])


def marks(time_ms: npt.NDArray[np.int64], sensor: npt.NDArray[np.integer],
          metric: npt.NDArray[np.integer], closed: ClosedWindows,
          area: npt.NDArray[np.integer] | None = None) -> Marks:
    """The window marks of some stored readings (vectorized: a few ``np.unique``).

    A late cell of a window with no stored sensor rollup (``SENSOR_TABLES``) only makes
    its district's row be recomputed, so with ``area`` (the readings' district and domain
    codes) one cell per (bucket, area, metric) is marked, its first sensor standing for
    all: a minute that went late across a city is a few dozen marks, not one per reading.
    """
    pw, pb, lw, lb, ls, lm = [], [], [], [], [], []
    for name, window_s in WINDOWS_S.items():
        width = window_s * 1000
        bucket = time_ms // width * width
        old = closed.closed(window_s, bucket)
        recent = np.unique(bucket[~old])
        pw.append(np.full(recent.size, window_s, np.int32))
        pb.append(recent)
        if old.any():
            scope = sensor if area is None or name in SENSOR_TABLES else area
            cells, first = np.unique(np.stack((bucket[old], scope[old].astype(np.int64),
                                               metric[old].astype(np.int64))),
                                     axis=1, return_index=True)
            lw.append(np.full(cells.shape[1], window_s, np.int32))
            lb.append(cells[0])
            ls.append(sensor[old][first].astype(np.int32))
            lm.append(cells[2].astype(np.int16))

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0, dtype)

    return Marks(cat(pw, np.int32), cat(pb, np.int64), cat(lw, np.int32), cat(lb, np.int64),
                 cat(ls, np.int32), cat(lm, np.int16))


def watermark(time_ms: npt.NDArray[np.int64]) -> int:
    """How far a batch of one partition has got in event time: the 90th percentile of its
    readings' times, so a few sensors with clocks ahead (ingest accepts up to
    ``ingest_future_ms``) do not close everyone's windows early."""
    return int(np.percentile(time_ms, 90, method="lower"))


async def write_watermarks(conn: asyncpg.Connection, marks_: dict[tuple[str, int], int]
                           ) -> None:
    """Record partitions' event-time progress (inside the batch's transaction)."""
    if marks_:
        keys = sorted(marks_)  # a fixed lock order across processors
        await conn.execute(_WATERMARKS, [k[0] for k in keys], [k[1] for k in keys],
                           [marks_[k] for k in keys])


async def write_marks(conn: asyncpg.Connection, m: Marks) -> None:
    """Record a batch's marks (call inside the batch's transaction)."""
    if m.pending_window.size:
        await conn.execute(_MARK_PENDING, m.pending_window, m.pending_bucket_ms)
    if m.late:
        await conn.execute(_MARK_LATE, m.late_window, m.late_bucket_ms, m.late_sensor,
                           m.late_metric)


@dataclass(slots=True)
class Closed:
    """What one closer run did."""

    buckets: dict[str, int] = field(default_factory=dict)  # window -> buckets computed
    late_cells: int = 0
    seconds: float = 0.0
    skipped: bool = False  # another processor holds the closer's lock


class WindowCloser:
    """Computes pending windows and late cells (see the module docstring)."""

    def __init__(self, grace: Grace | None = None, *, batch_buckets: int = 50,
                 batch_cells: int = 20_000, idle_s: float = 60.0,
                 topic: str | None = None, quiet_s: float | None = None) -> None:
        self.grace = grace or Grace()
        self.idle_s = idle_s
        # A window nobody touched for this long is computed even if not due (open): a
        # quiet city's current windows. Judged on the mark, so every processor agrees.
        self.quiet_s = quiet_s
        self.topic = topic  # the events topic whose partitions' progress counts (None: all)
        self.batch_buckets = batch_buckets
        self.batch_cells = batch_cells

    async def pending(self, conn: asyncpg.Connection) -> int:
        """Buckets and late cells not computed yet."""
        return int(await conn.fetchval(
            "select (select count(*) from rollup_pending) + (select count(*) from rollup_late)"))

    async def run(self, conn: asyncpg.Connection, *, everything: bool = False) -> Closed:
        """Compute what is due (``everything``: all that is pending, open windows too)."""
        t0 = time.perf_counter()
        done = Closed()
        if not await conn.fetchval("select pg_try_advisory_lock($1)", LOCK_ID):
            done.skipped = True
            return done
        try:
            event_now = await conn.fetchval(_EVENT_NOW, self.idle_s, self.topic)
            for name, window_s in WINDOWS_S.items():
                done.buckets[name] = await self._close_buckets(conn, name, window_s,
                                                                everything, event_now)
                done.late_cells += await self._late_cells(conn, name, window_s, everything)
        finally:
            await conn.execute("select pg_advisory_unlock($1)", LOCK_ID)
        done.seconds = time.perf_counter() - t0
        for name, n in done.buckets.items():
            if n:
                metrics.WINDOWS_CLOSED.labels(name).inc(n)
        if done.late_cells:
            metrics.LATE_CELLS.inc(done.late_cells)
        return done

    async def _close_buckets(self, conn: asyncpg.Connection, name: str, window_s: int,
                             everything: bool, event_now: int | None) -> int:
        # ``due``: event time (or, with no active partition, the clock) is past its end
        # and grace, and it settled. Only a due window is listed as closed; one computed
        # early (``everything``) is computed again when due.
        rows = await conn.fetch(
            "select bucket, touched_at, due from (select bucket, touched_at,"
            " bucket + $1 * interval '1 second' + $3 * interval '1 second' <"
            "   coalesce(timestamptz 'epoch' + $6 * interval '1 millisecond', now()) and"
            " touched_at < now() - $4 * interval '1 second' as due"
            " from rollup_pending where window_s = $1) p"
            " where $2 or due or touched_at < now() - $7 * interval '1 second'"
            " order by bucket limit $5",
            window_s, everything, self.grace.of(window_s), self.grace.settle_s,
            self.batch_buckets, event_now, self.quiet_s)
        sql = _close_bucket_sql(name)
        done = 0
        for bucket, touched_at, due in rows:
            try:
                async with conn.transaction():
                    await conn.execute(sql, bucket, bucket + timedelta(seconds=window_s))
                    if due:
                        await conn.execute(
                            "insert into rollup_closed (window_s, bucket) values ($1, $2) "
                            "on conflict (window_s, bucket) do update set closed_at = now()",
                            window_s, bucket)
            except Exception as exc:  # one bucket must not stall the others
                if is_away(exc):
                    raise
                log.warning("closing %s window %s failed (%s: %s); retried next period",
                            name, bucket, type(exc).__name__, str(exc)[:300])
                continue
            done += 1
            await conn.execute("delete from rollup_pending where window_s = $1 and bucket = $2 "
                               "and touched_at = $3", window_s, bucket, touched_at)
        return done

    async def _late_cells(self, conn: asyncpg.Connection, name: str, window_s: int,
                          everything: bool) -> int:
        # Late cells wait a little (the grace's settle, and a minute for hours) so that
        # a trickle of late readings is recomputed once, not once per batch.
        wait_s = 0.0 if everything else self.grace.settle_s * (1 if window_s == 60 else 30)
        if self.quiet_s is not None:
            wait_s = min(wait_s, self.quiet_s)
        rows = await conn.fetch(
            "select id, bucket, sensor, metric from rollup_late where window_s = $1 and "
            "marked_at < now() - $2 * interval '1 second' order by id limit $3",
            window_s, wait_s, self.batch_cells)
        if not rows:
            return 0
        ids, buckets, sensors, metric_codes = (list(c) for c in zip(*rows, strict=True))
        async with conn.transaction():
            await conn.execute(_late_cells_sql(name, window_s), buckets, sensors, metric_codes)
            await conn.execute("delete from rollup_late where id = any($1::int8[])", ids)
        return len(rows)
