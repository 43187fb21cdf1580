"""The database side of the processor: one transaction per Kafka batch, idempotent.

Why it is effectively-once: every batch is written in ONE transaction (readings,
incidents, dead letters, rollups, latest state, new sensors), readings and incidents
are inserted with ``ON CONFLICT DO NOTHING`` on their event id, and the rollups are fed
only with the readings that this transaction actually inserted. The consumer commits
Kafka offsets only after this transaction commits, so a crash anywhere means the batch
is delivered again, its readings conflict, nothing is inserted and nothing is counted
twice.

Write path, fast: binary COPY (``copy_records_to_table``) straight into the
(partitioned or hypertable) readings table, guarded by its unique key on
(event_id, metric, time): a batch of new readings costs what a raw COPY costs.
Slow, only when that COPY hits the unique key (a redelivery after a crash, a sensor
resending): the transaction is rolled back and redone through a temporary staging
table: COPY into staging, then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING
RETURNING``, so exactly the rows this transaction inserted are aggregated. (Asking
``xmin`` afterwards would spare the redo, but TimescaleDB refuses system columns on
compressed chunks, where late resends land.)

Rollups, plain PostgreSQL: numpy partials are COPYed to staging and upserted (n, sum,
min, max merge; p95 keeps the larger partial and the bucket is queued in
``rollup_repair`` when the window already had rows); ``repair_p95`` recomputes queued
buckets exactly from raw readings. TimescaleDB: the rollups are continuous aggregates;
after a batch with readings older than an aggregate's materialization watermark the
affected buckets are refreshed explicitly (TimescaleDB would not see them otherwise
until its next policy run, and the test build has no scheduler at all).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import numpy as np

from cityops.registry import Fleet
from ingest.backoff import Backoff, sleep_unless
from ingest.contract import DeadLetter
from processors import metrics
from processors.batch import (
    INCIDENT_COLUMNS,
    METRIC_BITS,
    READING_COLUMNS,
    STAGE_COLUMNS,
    Batch,
    Vocabularies,
    event_time,
)
from processors.rollup import ROLLUPS, WINDOWS_MS, Groups, aggregate

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
MAX_RETRIES = 5
# The database went away (restart, failover, network): the connection is gone, not the
# batch. The processor reconnects with back-off and writes the same batch again; Kafka
# keeps the backlog meanwhile, so waiting costs no memory here. OSError includes
# TimeoutError (a connect to an unreachable host).
# InternalClientError: a connection whose server went away mid-operation can fail with
# "cannot switch to state ...; another operation is in progress" (seen in the fault
# matrix's PostgreSQL restart); the step is repeated on a fresh connection.
CONNECTION_LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                   asyncpg.exceptions.OperatorInterventionError, asyncpg.InternalClientError)

_RCOLS = ", ".join(READING_COLUMNS)
_ICOLS = ", ".join(INCIDENT_COLUMNS)
_LATEST_COLS = ("sensor_id, metric, time, value, district, domain, type, landmark, "
                "event_id, quality")
_SCOPE_KEYS = {"sensor": ("sensor_id", "metric"), "district": ("district", "domain", "metric")}
_WINDOW_INTERVAL = {"1m": "1 minute", "1h": "1 hour"}

_SETUP = """
create temp table if not exists stage_readings
    (like readings excluding constraints excluding indexes, ord integer not null)
    on commit delete rows;
create temp table if not exists stage_latest
    (like readings excluding constraints excluding indexes) on commit delete rows;
create temp table if not exists stage_sensor_rollup
    (w smallint, bucket timestamptz, sensor_id text, metric text, n bigint,
     sum float8, min float8, max float8, p95 float8) on commit delete rows;
create temp table if not exists stage_district_rollup
    (w smallint, bucket timestamptz, district text, domain text, metric text, n bigint,
     sum float8, min float8, max float8, p95 float8) on commit delete rows;
create temp table if not exists stage_incidents
    (like incidents excluding constraints excluding indexes) on commit delete rows;
"""

_INSERT_READINGS = (f"insert into readings ({_RCOLS}) select {_RCOLS} from stage_readings "
                    "on conflict do nothing")
_INSERT_READINGS_RETURNING = _INSERT_READINGS + " returning event_id, metric"
_INSERT_INCIDENTS = (f"insert into incidents ({_ICOLS}) select {_ICOLS} from stage_incidents "
                     "on conflict do nothing")
_UPSERT_LATEST = f"""
insert into sensor_latest as l ({_LATEST_COLS}, updated_at)
select {_LATEST_COLS}, now() from stage_latest
on conflict (sensor_id, metric) do update
   set time = excluded.time, value = excluded.value, district = excluded.district,
       domain = excluded.domain, type = excluded.type, landmark = excluded.landmark,
       event_id = excluded.event_id, quality = excluded.quality, updated_at = now()
 where excluded.time > l.time
"""
_INSERT_DEADLETTERS = """
insert into deadletters (received_at, reason, detail, mqtt_topic, sensor_id, payload,
                         payload_encoding, service, kafka_partition, kafka_offset)
select * from unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::text[], $9::int4[], $10::int8[])
on conflict (kafka_partition, kafka_offset) do nothing
"""
_UPSERT_SENSOR = """
insert into sensors (sensor_id, domain, type, vendor, district, landmark, lat, lon,
                     interval_s, gateway, updated_at)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now())
on conflict (sensor_id) do update
   set domain = excluded.domain, type = excluded.type, vendor = excluded.vendor,
       district = excluded.district, landmark = excluded.landmark, lat = excluded.lat,
       lon = excluded.lon, interval_s = excluded.interval_s, gateway = excluded.gateway,
       updated_at = now()
"""
_INSERT_SEEN_SENSOR = """
insert into sensors (sensor_id, domain, type, vendor, district, landmark, lat, lon, interval_s)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
on conflict (sensor_id) do nothing
"""


def _upsert_rollup_sql(name: str) -> str:
    """Merge one rollup's numpy partials (COPYed to staging) into its table.

    n, sum, min, max merge exactly; p95 keeps the larger partial and the bucket is queued
    for an exact recompute when the row already existed (``xmax <> 0`` marks an update).
    """
    scope, window = ROLLUPS[name]
    cols = ", ".join(_SCOPE_KEYS[scope])
    w = list(WINDOWS_MS).index(window)
    # District rows are shared by every processor: a fixed lock order avoids deadlocks.
    # A sensor's rows belong to one Kafka partition, so to one processor at a time (a
    # rebalance overlap can still deadlock; the batch is then retried).
    order = f"order by {cols}, bucket" if scope == "district" else ""
    return f"""
with up as (
    insert into {name} as r (bucket, {cols}, n, sum, min, max, mean, p95)
    select bucket, {cols}, n, sum, min, max, sum / n, p95
      from stage_{scope}_rollup where w = {w}
     {order}
    on conflict ({cols}, bucket) do update
       set n = r.n + excluded.n, sum = r.sum + excluded.sum,
           min = least(r.min, excluded.min), max = greatest(r.max, excluded.max),
           mean = (r.sum + excluded.sum) / (r.n + excluded.n),
           p95 = greatest(r.p95, excluded.p95)
    returning bucket, xmax <> 0 as merged
)
insert into rollup_repair (rollup, bucket)
select distinct '{name}', bucket from up where merged
on conflict do nothing
"""


_STAGE_ROLLUP_COLS = {
    "sensor": ("w", "bucket", "sensor_id", "metric", "n", "sum", "min", "max", "p95"),
    "district": ("w", "bucket", "district", "domain", "metric", "n", "sum", "min", "max", "p95"),
}


def _recompute_rollup_sql(name: str) -> str:
    """Exact rollup rows of some buckets from raw readings (plain mode p95 repair)."""
    scope, window = ROLLUPS[name]
    keys = ", ".join(_SCOPE_KEYS[scope])
    bucket = f"date_bin('{_WINDOW_INTERVAL[window]}', time, timestamptz 'epoch')"
    return f"""
insert into {name} as r (bucket, {keys}, n, sum, min, max, mean, p95)
select {bucket}, {keys}, count(*), sum(value), min(value), max(value), avg(value),
       percentile_cont(0.95) within group (order by value)
  from readings
 where time >= $1 and time < $2 and {bucket} = any($3::timestamptz[])
 group by {bucket}, {keys}
on conflict ({keys}, bucket) do update
   set n = excluded.n, sum = excluded.sum, min = excluded.min, max = excluded.max,
       mean = excluded.mean, p95 = excluded.p95
"""


@dataclass(slots=True)
class StoredDeadLetter:
    """A dead letter with where it came from on the dead-letter topic (its idempotency key)."""

    partition: int
    offset: int
    letter: DeadLetter


@dataclass(slots=True)
class WriteResult:
    readings: int = 0
    incidents: int = 0
    duplicates: int = 0
    deadletters: int = 0
    rollups: dict[str, Groups] = field(default_factory=dict)
    aggregation_s: float = 0.0
    write_s: float = 0.0
    refreshed: list[str] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)  # seconds per write step


class _Laps:
    """Seconds since the previous lap, recorded under a step name."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into = into
        self.last = time.perf_counter()

    def __call__(self, step: str) -> float:
        now = time.perf_counter()
        took = now - self.last
        self.into[step] = self.into.get(step, 0.0) + took
        self.last = now
        return took


def _dt(ms: int) -> datetime:
    return event_time(ms)


class Storage:
    """Writes batches and keeps the derived tables of one storage mode up to date."""

    def __init__(self, conn: asyncpg.Connection, mode: str, vocab: Vocabularies | None = None,
                 *, rollup_tables: bool | None = None) -> None:
        if mode not in {"postgres", "timescale"}:
            raise ValueError(f"storage mode must be postgres or timescale, not {mode!r}")
        self.conn = conn
        self.mode = mode
        # Plain mode upserts the rollup tables; TimescaleDB derives them (continuous
        # aggregates). False on plain mode is for measuring only (bench/sink.py).
        self.rollup_tables = mode == "postgres" if rollup_tables is None else rollup_tables
        self.vocab = vocab or Vocabularies()
        self.known_sensors: set[str] = set()
        self._ready = False
        self.dsn: str | None = None

    @classmethod
    async def connect(cls, dsn: str, mode: str, **options: Any) -> Storage:
        conn = await asyncpg.connect(dsn)
        storage = cls(conn, mode, **options)
        storage.dsn = dsn
        return storage

    async def reconnect(self, stop: asyncio.Event, cause: BaseException,
                        max_delay_s: float = 5.0) -> bool:
        """Replace a lost connection, backing off (capped, jittered) until the database
        answers again or ``stop`` is set; returns whether it is connected."""
        if self.dsn is None:
            raise RuntimeError("storage was not opened with Storage.connect: cannot reconnect")
        log.warning("database connection lost (%s: %s); reconnecting", type(cause).__name__,
                    cause)
        self.conn.terminate()
        backoff = Backoff(0.2, max_delay_s)
        while not stop.is_set():
            try:
                self.conn = await asyncpg.connect(self.dsn, timeout=5)
            except (*CONNECTION_LOST, asyncpg.PostgresError) as exc:
                metrics.WRITE_RETRIES.inc()
                delay = backoff.next()
                log.warning("database still unreachable (%s); next try in %.1fs",
                            type(exc).__name__, delay)
                await sleep_unless(stop, delay)
                continue
            self._ready = False  # session-local staging tables are made again
            log.info("database connection restored")
            return True
        return False

    async def close(self) -> None:
        await self.conn.close()

    async def _setup(self) -> None:
        if not self._ready:
            await self.conn.execute(_SETUP)
            self._ready = True

    # --- registry ---------------------------------------------------------------------
    async def load_fleet(self, fleet: Fleet) -> int:
        """Upsert the provisioned fleet into ``sensors``; returns how many sensors."""
        rows = [(s.sensor_id, s.domain, s.type, s.vendor, s.district, s.landmark, s.lat, s.lon,
                 s.interval_s, s.gateway) for s in fleet]
        async with self.conn.transaction():
            await self.conn.executemany(_UPSERT_SENSOR, rows)
        self.known_sensors.update(s.sensor_id for s in fleet)
        return len(rows)

    # --- the hot path -----------------------------------------------------------------
    async def write(self, batch: Batch, deadletters: Sequence[StoredDeadLetter] = ()
                    ) -> WriteResult:
        """Store one batch in one transaction; retried on deadlock/serialization failure."""
        await self._setup()
        for attempt in range(MAX_RETRIES):
            try:
                result = await self._write_once(batch, deadletters)
                break
            except TRANSIENT as exc:
                metrics.WRITE_RETRIES.inc()
                log.warning("batch write retried after %s", type(exc).__name__,
                            extra={"fields": {"attempt": attempt + 1}})
                await asyncio.sleep(0.05 * (attempt + 1))
        else:
            raise RuntimeError(f"batch write failed {MAX_RETRIES} times on transient errors")
        self.known_sensors.update(e.sensor_id for e in batch.new_sensors)
        if self.mode == "timescale" and result.readings:
            result.refreshed = await self.refresh_late(result)
        return result

    async def _write_once(self, batch: Batch, deadletters: Sequence[StoredDeadLetter]
                          ) -> WriteResult:
        try:
            return await self._write_txn(batch, deadletters, fast=True)
        except asyncpg.UniqueViolationError:
            # Some readings were stored before (the COPY rolled back with its transaction).
            return await self._write_txn(batch, deadletters, fast=False)

    async def _write_txn(self, batch: Batch, deadletters: Sequence[StoredDeadLetter],
                         fast: bool) -> WriteResult:
        conn = self.conn
        result = WriteResult(duplicates=batch.duplicates)
        t0 = time.perf_counter()
        lap = _Laps(result.steps)
        async with conn.transaction():
            if batch.readings:
                stored = batch
                if fast:
                    await conn.copy_records_to_table("readings", records=batch.readings,
                                                     columns=READING_COLUMNS)
                    inserted = len(batch)
                else:
                    await conn.copy_records_to_table(
                        "stage_readings", records=[(*r, i) for i, r in enumerate(batch.readings)],
                        columns=STAGE_COLUMNS)
                    rows = await conn.fetch(_INSERT_READINGS_RETURNING)
                    inserted = len(rows)
                    position = {(r[8], r[2]): i for i, r in enumerate(batch.readings)}
                    positions = np.sort(np.fromiter(
                        (position[(r[0], r[1])] for r in rows), dtype=np.int64, count=inserted))
                    stored = batch.only(positions)
                result.readings = inserted
                result.duplicates += len(batch) - inserted
                lap("readings")
                result.rollups = aggregate(stored.sensor_key, stored.area_key, stored.time_ms,
                                           stored.values)
                result.aggregation_s = lap("aggregate")
                if self.rollup_tables and inserted:
                    await self._upsert_rollups(result.rollups)
                    lap("rollups")
                readings = batch.readings
                newest = [readings[i] for i in batch.latest_positions().tolist()]
                await conn.copy_records_to_table("stage_latest", records=newest,
                                                 columns=READING_COLUMNS)
                await conn.execute(_UPSERT_LATEST)
                lap("latest")
            if batch.incidents:
                await conn.copy_records_to_table("stage_incidents", records=[
                    (*r[:-1], json.dumps(r[-1])) for r in batch.incidents],
                    columns=INCIDENT_COLUMNS)
                status = await conn.execute(_INSERT_INCIDENTS)
                result.incidents = int(status.rsplit(" ", 1)[1])
                result.duplicates += len(batch.incidents) - result.incidents
            if deadletters:
                rows = [(_dt(d.letter.received_at), d.letter.reason, d.letter.detail,
                         d.letter.mqtt_topic, d.letter.sensor_id, d.letter.payload,
                         d.letter.payload_encoding, d.letter.service, d.partition, d.offset)
                        for d in deadletters]
                status = await conn.execute(_INSERT_DEADLETTERS,
                                            *(list(col) for col in zip(*rows, strict=True)))
                result.deadletters = int(status.rsplit(" ", 1)[1])
            if batch.new_sensors:
                await conn.executemany(_INSERT_SEEN_SENSOR, [
                    (e.sensor_id, e.domain, e.type, e.vendor or "unknown", e.district,
                     e.landmark, e.lat, e.lon, e.interval_s) for e in batch.new_sensors])
            lap("other")
        lap("commit")
        result.write_s = time.perf_counter() - t0
        for step, seconds in result.steps.items():
            metrics.WRITE_STEP_SECONDS.labels(step).observe(seconds)
        return result

    async def _upsert_rollups(self, rollups: dict[str, Groups]) -> None:
        """COPY every partial of a scope into staging once, then one upsert per rollup."""
        vocab = self.vocab
        mask = (1 << METRIC_BITS) - 1
        for scope in ("sensor", "district"):
            records: list[tuple[Any, ...]] = []
            for w, window in enumerate(WINDOWS_MS):
                g = rollups[f"{scope}_rollup_{window}"]
                if not len(g):
                    continue
                metric = vocab.metrics.lookup(g.key & mask).tolist()
                keys: list[list[Any]]
                if scope == "sensor":
                    keys = [vocab.sensors.lookup(g.key >> METRIC_BITS).tolist(), metric]
                else:
                    areas = vocab.areas.lookup(g.key >> METRIC_BITS).tolist()
                    keys = [[a[0] for a in areas], [a[1] for a in areas], metric]
                records.extend(zip([w] * len(g), _datetimes(g.bucket_ms), *keys, g.n.tolist(),
                                   g.sum.tolist(), g.min.tolist(), g.max.tolist(),
                                   g.p95.tolist(), strict=True))
            if not records:
                continue
            await self.conn.copy_records_to_table(
                f"stage_{scope}_rollup", records=records, columns=_STAGE_ROLLUP_COLS[scope])
            for name, (sc, _) in ROLLUPS.items():
                if sc == scope:
                    await self.conn.execute(_upsert_rollup_sql(name))

    # --- p95 repair (plain mode) ------------------------------------------------------
    async def repair_p95(self, limit: int = 500, *, include_open: bool = True) -> int:
        """Recompute queued buckets exactly from raw readings; returns buckets repaired.

        ``include_open=False`` leaves windows that have not ended yet in the queue: they
        will merge more partials anyway, and recomputing the current hour of a whole city
        every few seconds would cost more than the writes. Until repaired, a merged
        window's p95 is the largest partial p95 (an approximation, usually close).

        Each rollup is repaired in its own transaction holding a SHARE ROW EXCLUSIVE lock
        on the rollup table: writers' upserts wait for it, so a concurrent batch's
        partial either lands before our recompute reads (and is included) or merges on
        top of it afterwards (and is not lost).
        """
        if self.mode != "postgres" or not await self.conn.fetchval(
                "select exists (select 1 from rollup_repair)"):
            return 0
        done = 0
        for name, (_, window) in ROLLUPS.items():
            width = timedelta(milliseconds=WINDOWS_MS[window])
            async with self.conn.transaction():
                await self.conn.execute(f"lock table {name} in share row exclusive mode")
                rows = await self.conn.fetch(
                    "delete from rollup_repair where ctid in (select ctid from rollup_repair "
                    "where rollup = $1 and ($3 or bucket + $4::interval <= now()) "
                    "order by bucket limit $2) returning bucket", name, limit, include_open,
                    width)
                if not rows:
                    continue
                buckets = sorted(r[0] for r in rows)
                await self.conn.execute(_recompute_rollup_sql(name), buckets[0],
                                        buckets[-1] + width, buckets)
                done += len(buckets)
        if done:
            metrics.P95_REPAIRS.inc(done)
        return done

    async def pending_repairs(self) -> int:
        if self.mode != "postgres":
            return 0
        return int(await self.conn.fetchval("select count(*) from rollup_repair"))

    # --- continuous aggregates (timescale mode) --------------------------------------
    async def cagg_watermarks(self) -> dict[str, int]:
        """Materialization watermark (epoch ms) of each rollup continuous aggregate."""
        rows = await self.conn.fetch(_WATERMARKS, list(ROLLUPS))
        return {r[0]: int(r[1]) for r in rows}

    async def refresh_late(self, result: WriteResult) -> list[str]:
        """Refresh the continuous-aggregate buckets that readings below the watermark hit."""
        refreshed = []
        marks = await self.cagg_watermarks()
        for name, groups in result.rollups.items():
            wm = marks.get(name)
            if wm is None or not len(groups):
                continue
            late = groups.bucket_ms[groups.bucket_ms < wm]
            if late.size == 0:
                continue
            lo = int(late.min())
            hi = int(late.max()) + groups.window_ms
            await self.refresh(name, lo, hi)
            refreshed.append(name)
        return refreshed

    async def refresh(self, name: str, lo_ms: int, hi_ms: int) -> None:
        await self.conn.execute("call refresh_continuous_aggregate($1, $2::timestamptz, "
                                "$3::timestamptz)", name, _dt(lo_ms), _dt(hi_ms))
        metrics.CAGG_REFRESHES.inc()


#: Watermarks in epoch ms; an aggregate never materialized reports the minimum time (-> 0 here).
_WATERMARKS = """
select user_view_name,
       coalesce((extract(epoch from nullif(_timescaledb_functions.to_timestamp(
           _timescaledb_functions.cagg_watermark(mat_hypertable_id)), '-infinity')) * 1000
       )::bigint, 0) as wm
  from _timescaledb_catalog.continuous_agg where user_view_name = any($1::text[])
"""


def _datetimes(ms: np.ndarray) -> list[datetime]:
    """Many epoch-ms values to datetimes, converting each distinct value once."""
    uniq, inverse = np.unique(ms, return_inverse=True)
    conv = [_dt(int(u)) for u in uniq.tolist()]
    return [conv[i] for i in inverse.tolist()]


async def with_retries(op: Callable[[], Awaitable[T]], attempts: int = MAX_RETRIES) -> T:
    for attempt in range(attempts):
        try:
            return await op()
        except TRANSIENT:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")
