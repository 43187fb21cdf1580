"""The database side of the processor: one transaction per Kafka batch, idempotent.

Why it is effectively-once: every batch is written in ONE transaction (readings,
incidents, dead letters, window marks); readings are inserted with ``ON CONFLICT DO
NOTHING`` on their natural key (sensor, metric, time), incidents on their event id, and
rollups are recomputed from the stored readings, never merged from a batch's counts.
The consumer commits Kafka offsets only after this transaction commits, so a crash
anywhere means the batch is delivered again, its readings conflict, nothing is inserted
and nothing is counted twice.

Write path, fast: one narrow row per reading (time, sensor key, metric code, value,
quality), binary COPY built straight from the batch's arrays (``processors.copy``) into
the (partitioned or hypertable) readings table, guarded by its natural key (sensor,
metric, time): a batch of new readings costs what a raw COPY costs. The registry keys
are resolved before the transaction (``resolve``): a sensor seen for the first time is
registered then, in its own statement, so a rolled-back batch never leaves a cached key
that points at nothing.
Slow, only when that COPY hits the natural key (a redelivery after a crash, a sensor
resending): the transaction is rolled back and redone through a temporary staging
table: COPY into staging, then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING
RETURNING`` joined back to the staged positions, so exactly the rows this transaction
inserted are aggregated. (Asking ``xmin`` afterwards would spare the redo, but
TimescaleDB refuses system columns on compressed chunks, where late resends land.)

Rollups, plain PostgreSQL: computed once per window, when it closes, from the raw
readings (``processors.windows``); a batch only marks, in its own transaction, the
windows (one row each) or, for late data, the cells its readings touched.
TimescaleDB: the rollups are continuous aggregates; after a batch with readings older
than an aggregate's materialization watermark the affected buckets are refreshed
explicitly (TimescaleDB would not see them otherwise until its next policy run, and
the test build has no scheduler at all).

Latest state (``sensor_latest``) is NOT written per batch any more: after the readings
transaction commits, the batch's newest reading per (sensor, metric) is merged into
in-memory arrays (``processors.latest.LatestState``), and ``flush_latest`` writes the
changed cells in one idempotent, order-safe upsert at most every ``latest_flush_s``
seconds (the processor calls it after each batch and on idle polls, and forced on a
clean stop). Trade-off, chosen on purpose: a crash loses at most the last
``latest_flush_s`` seconds of latest-state changes (offsets of those batches may
already be committed, so they are not redelivered); the next reading of each affected
sensor restores its row. Readings and rollups keep their effectively-once guarantee.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import numpy as np

from cityops.registry import Fleet, Sensor
from ingest.backoff import Backoff, sleep_unless
from ingest.contract import Columns, DeadLetter, Event
from processors import metrics
from processors.batch import (
    INCIDENT_COLUMNS,
    READING_COLUMNS,
    Batch,
    SensorRow,
    Vocabularies,
    columns,
    concat,
    event_time,
    from_columns,
)
from processors.copy import readings_payload
from processors.faults import CONNECTION_LOST, MAX_RETRIES, Fault, classify, describe, safe_text
from processors.latest import LatestState
from processors.rollup import ROLLUPS, Groups, aggregate
from processors.windows import ClosedWindows, marks, write_marks, write_watermarks

log = logging.getLogger(__name__)
T = TypeVar("T")

# Which failures are worth waiting for, retrying a little, or isolating: processors/faults.py
# (one classification for the processor and the alerts service). CONNECTION_LOST is
# re-exported here for the modules that import it from storage.
_RCOLS = ", ".join(READING_COLUMNS)
_STAGE_COLUMNS = (*READING_COLUMNS, "ord")
_ICOLS = ", ".join(INCIDENT_COLUMNS)

_SETUP = """
create temp table if not exists stage_readings
    (like readings excluding constraints excluding indexes, ord integer not null)
    on commit delete rows;
create temp table if not exists stage_incidents
    (like incidents excluding constraints excluding indexes) on commit delete rows;
"""

# Savepoints of one transaction share the staging tables (emptied only at commit): each
# piece written while isolating poison starts from empty ones, or it would merge another
# piece's rollup partials a second time.
_CLEAR_STAGE = "delete from stage_readings; delete from stage_incidents"

# The staged positions of the rows this statement inserted (a duplicate is not returned).
# Two staged rows with one natural key (two events that disagree on their id): the first
# by position is inserted, and only its position is returned.
_INSERT_READINGS_RETURNING = f"""
with ins as (insert into readings ({_RCOLS}) select {_RCOLS} from stage_readings order by ord
             on conflict do nothing returning sensor, metric, time)
select min(s.ord) from stage_readings s join ins using (sensor, metric, time)
 group by s.sensor, s.metric, s.time
"""
_INSERT_INCIDENTS = (f"insert into incidents ({_ICOLS}) select {_ICOLS} from stage_incidents "
                     "on conflict do nothing")
_INSERT_DEADLETTERS = """
insert into deadletters (received_at, reason, detail, mqtt_topic, sensor_id, payload,
                         payload_encoding, service, kafka_topic, kafka_partition, kafka_offset)
select * from unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::bytea[], $7::text[], $8::text[], $9::text[], $10::int4[], $11::int8[])
on conflict (kafka_topic, kafka_partition, kafka_offset) do nothing
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
_SENSOR_KEYS = "select sensor_id, sensor_key from sensors where sensor_id = any($1::text[])"
_ENSURE_METRICS = ("insert into metrics (name) select unnest($1::text[]) "
                   "on conflict (name) do nothing")
_METRIC_CODES = "select name, code from metrics where name = any($1::text[])"


class UnresolvedKey(ValueError):
    """A reading's sensor or metric has no registry key (the registry refused it): the
    records carrying it are poison for this batch and are parked, the rest is stored."""


@dataclass(slots=True)
class StoredDeadLetter:
    """A dead letter with where it came from (its idempotency key: topic, partition, offset)."""

    topic: str
    partition: int
    offset: int
    letter: DeadLetter


@dataclass(slots=True)
class Source:
    """A Kafka record exactly as read, with where it was: what is parked when the database
    refuses what it became (the raw bytes, not our decoding of them)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass(slots=True)
class Item:
    """One Kafka record and what it is to be stored as (an event or a dead letter)."""

    source: Source
    thing: Event | Columns | StoredDeadLetter  # a v1 event, a v2 record's columns


@dataclass(slots=True)
class WriteResult:
    readings: int = 0
    incidents: int = 0
    duplicates: int = 0
    deadletters: int = 0
    parked: list[tuple[Source, str]] = field(default_factory=list)  # (record, error class)
    rollups: dict[str, Groups] = field(default_factory=dict)
    aggregation_s: float = 0.0
    write_s: float = 0.0
    refreshed: list[str] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)  # seconds per write step
    # Batches whose readings this write committed: merged into the latest-state arrays
    # only after the transaction commits (a rolled-back or parked record never is).
    latest: list[Batch] = field(default_factory=list)


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


#: Bounds for the dead letters' text columns (characters): one hostile field must not
#: bloat a row, nor an index entry past PostgreSQL's limit (``reason`` is indexed).
_TEXT_LIMITS = {"reason": 100, "detail": 2000, "mqtt_topic": 1000, "sensor_id": 200,
                "payload_encoding": 20, "service": 50}


def deadletter_bytes(letter: DeadLetter) -> bytes:
    """The payload's original bytes: base64 decoded, text as its UTF-8 bytes.

    A payload that claims base64 but is not valid base64 is kept as the bytes of the text
    it is: nothing a sender put in a dead letter is lost or makes the write fail.
    """
    if letter.payload_encoding == "base64":
        try:
            return base64.b64decode(letter.payload, validate=True)
        except (binascii.Error, ValueError):
            pass
    return letter.payload.encode("utf-8", "surrogatepass")


def deadletter_row(d: StoredDeadLetter) -> tuple[Any, ...]:
    """One ``deadletters`` row: raw payload bytes (bytea), text fields made storable."""
    dl, lim = d.letter, _TEXT_LIMITS
    return (_dt(dl.received_at), safe_text(dl.reason, lim["reason"]),
            safe_text(dl.detail, lim["detail"]), safe_text(dl.mqtt_topic, lim["mqtt_topic"]),
            safe_text(dl.sensor_id, lim["sensor_id"]), deadletter_bytes(dl),
            safe_text(dl.payload_encoding, lim["payload_encoding"]),
            safe_text(dl.service, lim["service"]), d.topic, d.partition, d.offset)


def _concat(a: Groups, b: Groups) -> Groups:
    """Two batches' partials of one rollup side by side (partials of a key merge later)."""
    if not len(a):
        return b
    if not len(b):
        return a
    return Groups(a.window_ms, *(np.concatenate((getattr(a, f), getattr(b, f)))
                                 for f in ("key", "bucket_ms", "n", "sum", "min", "max", "p95")))


def _add(total: WriteResult, part: WriteResult) -> None:
    total.readings += part.readings
    total.incidents += part.incidents
    total.duplicates += part.duplicates
    total.deadletters += part.deadletters
    total.aggregation_s += part.aggregation_s
    total.latest.extend(part.latest)
    for name, groups in part.rollups.items():
        total.rollups[name] = _concat(total.rollups[name], groups) if name in total.rollups \
            else groups


_INSERT_PARKED = """
insert into parked (service, consumer_group, topic, kafka_partition, kafka_offset,
                    kafka_timestamp, kafka_key, payload, error_class, error, attempts)
select * from unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[],
                     $6::timestamptz[], $7::bytea[], $8::bytea[], $9::text[], $10::text[],
                     $11::int4[])
on conflict (consumer_group, topic, kafka_partition, kafka_offset) do nothing
"""


async def park(conn: asyncpg.Connection, service: str, group: str,
               records: Sequence[tuple[Source, BaseException, int]]) -> int:
    """Insert parked records (raw bytes, where they were, the error, attempts made) on
    ``conn``, inside the caller's transaction; returns how many were new."""
    if not records:
        return 0
    rows = []
    for src, exc, attempts in records:
        error_class, error = describe(exc)
        rows.append((service, group, safe_text(src.topic, 500), src.partition, src.offset,
                     None if src.timestamp_ms is None else _dt(src.timestamp_ms), src.key,
                     src.value, error_class, error, attempts))
    status = await conn.execute(_INSERT_PARKED, *(list(c) for c in zip(*rows, strict=True)))
    return int(status.rsplit(" ", 1)[1])


class Storage:
    """Writes batches and keeps the derived tables of one storage mode up to date."""

    def __init__(self, conn: asyncpg.Connection, mode: str, vocab: Vocabularies | None = None,
                 *, rollup_tables: bool | None = None, latest_flush_s: float = 2.0) -> None:
        if mode not in {"postgres", "timescale"}:
            raise ValueError(f"storage mode must be postgres or timescale, not {mode!r}")
        self.conn = conn
        self.mode = mode
        # Plain mode marks windows for ``processors.windows`` to compute; TimescaleDB derives
        # them (continuous aggregates). False on plain mode: measuring only (bench/sink.py).
        self.rollup_tables = mode == "postgres" if rollup_tables is None else rollup_tables
        self.closed = ClosedWindows()  # refreshed by the processor's housekeeping
        self.vocab = vocab or Vocabularies()
        self.known_sensors: set[str] = set()
        # The fleet (``load_fleet``): the places of sensors named by v2 records.
        self.registry: dict[str, Sensor] = {}
        self.latest = LatestState(latest_flush_s)
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
        self.registry = {s.sensor_id: s for s in fleet}
        return len(rows)

    def batch_of(self, items: Sequence[Item]) -> Batch:
        """The readings and incidents of some records (v1 events, v2 columns), in order."""
        parts: list[Batch] = []
        events: list[Event] = []
        for it in items:
            if isinstance(it.thing, Event):
                events.append(it.thing)
            elif isinstance(it.thing, Columns):
                if events:
                    parts.append(columns(events, self.vocab, self.known_sensors))
                    events = []
                parts.append(from_columns(it.thing, self.vocab, self.registry,
                                          self.known_sensors))
        if events:
            parts.append(columns(events, self.vocab, self.known_sensors))
        return concat(parts)

    async def resolve(self, batch: Batch) -> None:
        """Give every sensor and metric code of ``batch`` its registry key, registering the
        ones seen for the first time (committed on their own, before the batch's
        transaction: a sensor that reported is a sensor, whatever becomes of the batch).

        Never raises for a sensor or metric the database refuses (a hostile id): its key
        stays unresolved, and the write refuses the records that carry it
        (``UnresolvedKey``), which ``isolate`` then parks. A lost database is raised.
        """
        vocab = self.vocab
        vocab.db_sensor = _grown(vocab.db_sensor, len(vocab.sensors.names))
        vocab.db_metric = _grown(vocab.db_metric, len(vocab.metrics.names))
        if batch.new_sensors:
            await self._each_or_all(_INSERT_SEEN_SENSOR,
                                    [_storable(row) for row in batch.new_sensors])
        codes = np.unique(batch.sensor)
        codes = codes[vocab.db_sensor[codes] < 0]
        if codes.size:
            names = vocab.sensors.lookup(codes).tolist()
            code_of = dict(zip(names, codes.tolist(), strict=True))
            for sid, key in await self._lookup(_SENSOR_KEYS, names):
                vocab.db_sensor[code_of[sid]] = key
        codes = np.unique(batch.metric)
        codes = codes[vocab.db_metric[codes] < 0]
        if codes.size:
            names = vocab.metrics.lookup(codes).tolist()
            code_of = dict(zip(names, codes.tolist(), strict=True))
            found = {name: code for name, code in await self._lookup(_METRIC_CODES, names)}
            missing = [n for n in names if n not in found]
            if missing:  # only then: ON CONFLICT still spends a smallint of the sequence
                await self._each_or_all(_ENSURE_METRICS, [(missing,)], split=lambda a: [
                    ([n],) for n in a[0]])
                found.update(await self._lookup(_METRIC_CODES, missing))
            for name, code in found.items():
                vocab.db_metric[code_of[name]] = code

    async def _lookup(self, sql: str, names: list[str]) -> list[asyncpg.Record]:
        """Registry rows of ``names``; a name the database cannot even compare (a NUL
        byte, a lone surrogate) is left out instead of failing the others."""
        try:
            return await self.conn.fetch(sql, names)
        except Exception as exc:
            if classify(exc) is Fault.AWAY:
                raise
        rows: list[asyncpg.Record] = []
        for name in names:
            try:
                rows += await self.conn.fetch(sql, [name])
            except Exception as exc:
                if classify(exc) is Fault.AWAY:
                    raise
        return rows

    async def _each_or_all(self, sql: str, rows: list[tuple[Any, ...]],
                           split: Callable[[tuple[Any, ...]], list[tuple[Any, ...]]]
                           | None = None) -> None:
        """Run ``sql`` for all ``rows`` at once; if the database refuses them (not a lost
        connection), row by row, skipping the refused ones (they stay unresolved)."""
        try:
            async with self.conn.transaction():
                await self.conn.executemany(sql, rows)
            return
        except Exception as exc:
            if classify(exc) is Fault.AWAY:
                raise
        for row in [r for whole in rows for r in split(whole)] if split else rows:
            try:
                async with self.conn.transaction():
                    await self.conn.execute(sql, *row)
            except Exception as exc:
                if classify(exc) is Fault.AWAY:
                    raise
                log.warning("registry refused %s: %s", str(row)[:200], str(exc)[:200])

    # --- the hot path -----------------------------------------------------------------
    async def write(self, batch: Batch, deadletters: Sequence[StoredDeadLetter] = (),
                    watermarks: dict[tuple[str, int], int] | None = None) -> WriteResult:
        """Store one batch in one transaction (with the event-time ``watermarks`` of its
        partitions, plain mode: what the window closer judges time by).

        Contention (deadlock, serialization failure) is retried ``MAX_RETRIES`` times with
        back-off; after that, and on any other failure, the last exception is raised for
        the caller to classify (``processors.faults``): a lost database is waited for, a
        refused record is found and parked by ``isolate``.
        """
        await self._setup()
        await self.resolve(batch)
        backoff = Backoff(0.05, 1.0)
        for attempt in range(MAX_RETRIES):
            try:
                result = await self._write_once(batch, deadletters, watermarks)
                break
            except Exception as exc:
                if classify(exc) is not Fault.CONTENTION or attempt == MAX_RETRIES - 1:
                    raise
                metrics.WRITE_RETRIES.inc()
                log.warning("batch write retried after %s", type(exc).__name__,
                            extra={"fields": {"attempt": attempt + 1}})
                await asyncio.sleep(backoff.next())
        await self._after_commit(result, batch.new_sensors)
        return result

    async def _after_commit(self, result: WriteResult, new_sensors: Sequence[SensorRow]
                            ) -> None:
        self.known_sensors.update(row[0] for row in new_sensors)
        if result.latest:
            t0 = time.perf_counter()
            for batch in result.latest:
                self.latest.update(batch)
            took = time.perf_counter() - t0
            result.steps["latest"] = result.steps.get("latest", 0.0) + took
            metrics.WRITE_STEP_SECONDS.labels("latest").observe(took)
        if self.mode == "timescale" and result.readings:
            result.refreshed = await self.refresh_late(result)

    # --- poison records ---------------------------------------------------------------
    async def isolate(self, items: Sequence[Item], cause: BaseException, *, group: str,
                      service: str = "processor") -> WriteResult:
        """Store a batch whose write failed for a reason other than a lost database:
        everything that can be stored is, and each record that cannot is parked.

        One outer transaction; inside it the batch is bisected with savepoints: a piece
        that stores is kept, a piece that fails (after bounded retries on contention) is
        split in two, and a single record that still fails is parked with its raw Kafka
        bytes and the error, in the same transaction. k bad records among n cost about
        2·k·log2(n) savepoints, and only on this path: the hot path is untouched. A lost
        database anywhere in here rolls everything back and is raised as usual (the batch
        is written again once the database is back, nothing parked for it).
        """
        await self._setup()
        if not items:
            return WriteResult()
        log.warning("batch write failed (%s: %s); isolating the records the database "
                    "refuses", type(cause).__name__, str(cause)[:300],
                    extra={"fields": {"records": len(items)}})
        t0 = time.perf_counter()
        total = WriteResult()
        refused: list[tuple[Item, BaseException, int]] = []
        new_sensors: list[SensorRow] = []
        # Keys first, outside the transaction (see ``resolve``); a piece then only
        # fails for what it carries.
        await self.resolve(self.batch_of(items))
        async with self.conn.transaction():
            if len(items) == 1:  # the batch was this record: already retried by write()
                refused.append((items[0], cause, MAX_RETRIES))
            else:
                mid = len(items) // 2
                pending = [items[mid:], items[:mid]]
                while pending:
                    piece = pending.pop()
                    part, error, attempts = await self._try_piece(piece)
                    if part is not None:
                        _add(total, part[0])
                        new_sensors.extend(part[1])
                    elif len(piece) == 1:
                        assert error is not None
                        refused.append((piece[0], error, attempts))
                    else:
                        mid = len(piece) // 2
                        pending += [piece[mid:], piece[:mid]]
            await park(self.conn, service, group, [(it.source, exc, n) for it, exc, n in refused])
        total.parked = [(it.source, type(exc).__name__) for it, exc, _ in refused]
        total.write_s = time.perf_counter() - t0
        for it, exc, _ in refused:
            log.error("record parked: %s", str(exc)[:500], extra={"fields": {
                "topic": it.source.topic, "partition": it.source.partition,
                "offset": it.source.offset, "error_class": type(exc).__name__}})
        await self._after_commit(total, new_sensors)
        return total

    async def _try_piece(self, piece: Sequence[Item]
                         ) -> tuple[tuple[WriteResult, list[Event]] | None,
                                    BaseException | None, int]:
        """Write some records in a savepoint: ((result, new sensors), None, attempts) when
        stored, (None, error, attempts) when refused. A lost database is raised."""
        error: BaseException | None = None
        backoff = Backoff(0.05, 1.0)
        for attempt in range(1, MAX_RETRIES + 1):
            try:
                async with self.conn.transaction():  # a savepoint inside isolate()'s
                    await self.conn.execute(_CLEAR_STAGE)
                    letters = [it.thing for it in piece if isinstance(it.thing, StoredDeadLetter)]
                    batch = self.batch_of(piece)
                    return (await self._write_once(batch, letters), batch.new_sensors), None, \
                        attempt
            except Exception as exc:
                fault = classify(exc)
                if fault is Fault.AWAY:
                    raise
                error = exc
                if fault is Fault.POISON:
                    return None, exc, attempt
                metrics.WRITE_RETRIES.inc()
                await asyncio.sleep(backoff.next())
        return None, error, MAX_RETRIES

    async def _write_once(self, batch: Batch, deadletters: Sequence[StoredDeadLetter],
                          watermarks: dict[tuple[str, int], int] | None = None
                          ) -> WriteResult:
        try:
            return await self._write_txn(batch, deadletters, watermarks, fast=True)
        except asyncpg.UniqueViolationError:
            # Some readings were stored before (the COPY rolled back with its transaction).
            return await self._write_txn(batch, deadletters, watermarks, fast=False)

    async def _write_txn(self, batch: Batch, deadletters: Sequence[StoredDeadLetter],
                         watermarks: dict[tuple[str, int], int] | None, *, fast: bool
                         ) -> WriteResult:
        conn = self.conn
        result = WriteResult(duplicates=batch.duplicates)
        t0 = time.perf_counter()
        lap = _Laps(result.steps)
        async with conn.transaction():
            if len(batch):
                stored = batch
                sensor, metric = self._keys(batch)
                stored_sensor, stored_metric = sensor, metric
                if fast:
                    await conn.copy_to_table(
                        "readings", columns=READING_COLUMNS, format="binary",
                        source=io.BytesIO(readings_payload(
                            batch.time_ms, sensor, metric, batch.values, batch.quality)))
                    inserted = len(batch)
                else:
                    await conn.copy_to_table(
                        "stage_readings", columns=_STAGE_COLUMNS, format="binary",
                        source=io.BytesIO(readings_payload(
                            batch.time_ms, sensor, metric, batch.values, batch.quality,
                            ordinal=True)))
                    rows = await conn.fetch(_INSERT_READINGS_RETURNING)
                    inserted = len(rows)
                    positions = np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64,
                                                    count=inserted))
                    stored = batch.only(positions)
                    stored_sensor, stored_metric = sensor[positions], metric[positions]
                result.readings = inserted
                result.duplicates += len(batch) - inserted
                lap("readings")
                result.rollups = aggregate(stored.sensor_key, stored.area_key, stored.time_ms,
                                           stored.values)
                result.aggregation_s = lap("aggregate")
                if self.rollup_tables and inserted:
                    await write_marks(conn, marks(stored.time_ms, stored_sensor, stored_metric,
                                                  self.closed, stored.area))
                    lap("rollups")
                # Every reading of the batch, duplicates included: a redelivered batch
                # re-derives latest state it may have lost (the merge is a max by time).
                result.latest.append(batch)
            if self.rollup_tables and watermarks:
                await write_watermarks(conn, watermarks)
            if batch.incidents:
                await conn.copy_records_to_table("stage_incidents", records=[
                    (*r[:-1], json.dumps(r[-1])) for r in batch.incidents],
                    columns=INCIDENT_COLUMNS)
                status = await conn.execute(_INSERT_INCIDENTS)
                result.incidents = int(status.rsplit(" ", 1)[1])
                result.duplicates += len(batch.incidents) - result.incidents
            if deadletters:
                rows = [deadletter_row(d) for d in deadletters]
                status = await conn.execute(_INSERT_DEADLETTERS,
                                            *(list(col) for col in zip(*rows, strict=True)))
                result.deadletters = int(status.rsplit(" ", 1)[1])
            lap("other")
        lap("commit")
        result.write_s = time.perf_counter() - t0
        for step, seconds in result.steps.items():
            metrics.WRITE_STEP_SECONDS.labels(step).observe(seconds)
        return result

    def _keys(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """The registry keys of the batch's sensors and metrics, as arrays; refuses the
        batch when one has none (``resolve`` could not register it)."""
        sensor = self.vocab.db_sensor[batch.sensor]
        metric = self.vocab.db_metric[batch.metric]
        if (sensor < 0).any() or (metric < 0).any():
            missing = self.vocab.sensors.lookup(np.unique(batch.sensor[sensor < 0])).tolist()
            missing += self.vocab.metrics.lookup(np.unique(batch.metric[metric < 0])).tolist()
            raise UnresolvedKey(f"no registry key for {str(missing)[:300]}")
        return sensor, metric

    # --- latest state -----------------------------------------------------------------
    async def flush_latest(self, *, force: bool = False) -> int:
        """Write the latest-state cells changed since the last flush, if the flush period
        has passed (or ``force``: a clean stop, a test that reads ``sensor_latest``).

        One ``unnest`` upsert guarded by ``where excluded.time > l.time``: idempotent and
        order-safe, so a failed flush simply leaves its cells dirty for the next one.
        Returns how many cells were written.
        """
        t0 = time.perf_counter()
        n = await self.latest.flush(self.conn, self.vocab, force=force)
        if n:
            metrics.WRITE_STEP_SECONDS.labels("latest_flush").observe(time.perf_counter() - t0)
        return n

    # --- continuous aggregates (timescale mode) --------------------------------------
    async def cagg_watermarks(self) -> dict[str, int]:
        """Materialization watermark (epoch ms) of each rollup's continuous aggregate, by
        rollup name."""
        rows = await self.conn.fetch(_WATERMARKS, [cagg(n) for n in ROLLUPS])
        return {r[0].removesuffix(_CAGG_SUFFIX): int(r[1]) for r in rows}

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
                                "$3::timestamptz)", cagg(name), _dt(lo_ms), _dt(hi_ms))
        metrics.CAGG_REFRESHES.inc()


#: TimescaleDB mode: a rollup (``sensor_rollup_1m``...) is a view giving names to the
#: continuous aggregate ``<rollup>_agg``, which is keyed by the registry's integers.
_CAGG_SUFFIX = "_agg"


def cagg(rollup: str) -> str:
    """The continuous aggregate behind a rollup view (TimescaleDB mode)."""
    return rollup + _CAGG_SUFFIX


#: Watermarks in epoch ms; an aggregate never materialized reports the minimum time (-> 0 here).
_WATERMARKS = """
select user_view_name,
       coalesce((extract(epoch from nullif(_timescaledb_functions.to_timestamp(
           _timescaledb_functions.cagg_watermark(mat_hypertable_id)), '-infinity')) * 1000
       )::bigint, 0) as wm
  from _timescaledb_catalog.continuous_agg where user_view_name = any($1::text[])
"""


def _storable(row: SensorRow) -> SensorRow:
    """A ``sensors`` row (of a sensor seen for the first time) with its descriptive text
    made storable (``safe_text``): whichever of the sensor's events came first names it,
    and one hostile field there must not leave the sensor without a key, its good
    readings unstorable. The id is its identity and is not touched: an id the database
    cannot hold is no sensor (its records are parked)."""
    def text(v: str) -> str:
        return safe_text(v, 200) or ""

    sid, domain, type_, vendor, district, landmark, lat, lon, interval_s = row
    return (sid, text(domain), text(type_), text(vendor), text(district), text(landmark),
            lat, lon, interval_s)


def _grown(keys: np.ndarray, size: int) -> np.ndarray:
    """``keys`` extended to ``size`` entries, the new ones -1 (not looked up yet)."""
    if keys.size >= size:
        return keys
    return np.concatenate((keys, np.full(size - keys.size, -1, dtype=keys.dtype)))


async def with_retries(op: Callable[[], Awaitable[T]], attempts: int = MAX_RETRIES) -> T:
    """Run ``op``, again on contention (``Fault.CONTENTION``), at most ``attempts`` times."""
    backoff = Backoff(0.05, 1.0)
    for attempt in range(attempts):
        try:
            return await op()
        except Exception as exc:
            if classify(exc) is not Fault.CONTENTION or attempt == attempts - 1:
                raise
            await asyncio.sleep(backoff.next())
    raise AssertionError("unreachable")
