"""``cityops process``: Kafka events and dead letters -> database, rollups -> Kafka.

The loop, per batch:

1. take a batch from the consumer group (``getmany``) until ``process_batch_max``
   messages or ``process_batch_linger_ms`` after the first one;
2. decode events in one msgspec call (a message that does not decode goes to the
   dead-letter topic with its reason, the rest of the batch goes on);
3. write everything in one database transaction (``processors.storage``);
4. publish the batch's rollup partials on the aggregates topic and wait for the acks;
5. only then commit the Kafka offsets;
6. flush the latest-state arrays to ``sensor_latest`` if ``process_latest_flush_s`` has
   passed since the last flush (also on idle polls, and forced on a clean stop).

A crash before step 5 redelivers the batch; the write is idempotent and counts nothing
twice, so every event is stored exactly once (effectively-once). Rollup partials and
dead letters produced by this service are at-least-once on Kafka. Latest state is
derived and flushed after the offset commit: a crash loses at most the last
``process_latest_flush_s`` seconds of it, until those sensors' next readings.

Plain mode: every ``process_close_every_s`` the rollup windows that have closed (every
active partition is past their end plus grace, ``process_window_grace_1m_s`` / ``_1h_s``,
in event time) are computed from the readings, and the cells late readings touched are
recomputed (``processors.windows``); a window nobody touched for
``process_close_quiet_s`` is computed even while open. Storage maintenance runs every
``process_maintenance_interval_s``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from typing import Any

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from cityops.kafka import partition_for, require_topics
from cityops.registry import load_fleet
from cityops.service import static_member_id
from cityops.settings import Settings
from ingest.backoff import Backoff, sleep_unless
from ingest.contract import (
    DeadLetter,
    Event,
    decode_batches,
    decode_deadletter,
    decode_each,
    decode_event,
    decode_events,
    encode_deadletter,
    is_v1,
)
from processors import metrics
from processors.batch import METRIC_BITS, Batch, Vocabularies, columns, concat, from_columns
from processors.faults import is_away
from processors.maintenance import run_maintenance
from processors.rollup import ROLLUPS, Groups, Rollup, encode_rollup
from processors.schema import migrate
from processors.storage import Item, Source, Storage, StoredDeadLetter, WriteResult
from processors.windows import Grace, WindowCloser, watermark

log = logging.getLogger(__name__)

Records = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class Processor:
    """One member of the processors' consumer group."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        storage.latest.flush_s = settings.process_latest_flush_s
        self.closer = WindowCloser(Grace(settings.process_window_grace_1m_s,
                                         settings.process_window_grace_1h_s),
                                   topic=settings.topics.events,
                                   quiet_s=settings.process_close_quiet_s)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.last_batch_at = time.monotonic()
        self._last_maintenance = 0.0
        self.healthy = False
        self.stored_events = 0
        self._partitions: list[int] = []
        self._partition_of: dict[bytes, int] = {}

    async def start(self) -> None:
        s = self.settings
        await require_topics(s, [s.topics.events, s.topics.deadletter, s.topics.aggregates])
        self.consumer = AIOKafkaConsumer(
            s.topics.events, s.topics.deadletter, bootstrap_servers=s.kafka_bootstrap,
            group_id=s.process_group, group_instance_id=instance_id(s),
            enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024, fetch_min_bytes=s.kafka_fetch_min_bytes,
            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap, acks="all", linger_ms=5,
            max_batch_size=1024 * 1024, compression_type=s.kafka_codec)
        await self.producer.start()
        await self.consumer.start()
        self.healthy = True

    async def stop(self) -> None:
        """Flush the latest state (a clean stop loses none of it), then leave Kafka."""
        self.healthy = False
        try:
            await self.storage.flush_latest(force=True)
        except Exception as exc:  # database away or refusing: the next readings restore it
            log.warning("final latest-state flush failed (%s: %s); %d cells not written",
                        type(exc).__name__, exc, self.storage.latest.pending)
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        assert self.consumer is not None
        closing = (asyncio.create_task(self.close_loop(stop), name="window-closer")
                   if self.storage.mode == "postgres" and self.storage.dsn else None)
        try:
            await self._consume(stop)
        finally:
            if closing is not None:
                closing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await closing

    async def _consume(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            records = await self.take_batch(stop)
            while True:
                try:
                    if records:
                        await self.handle(records)
                    await self.housekeeping(idle=not records)
                    break
                except Exception as exc:
                    # Offsets are committed only after the database commit, so the same
                    # records are simply written again once the database is back. What
                    # counts as "away" is decided in processors/faults.py, nowhere else;
                    # a record's own fault never gets here (handle parks it).
                    if not is_away(exc):
                        raise
                    self.healthy = False
                    if not await self.storage.reconnect(stop, exc):
                        return
                    self.healthy = True

    async def take_batch(self, stop: asyncio.Event) -> Records:
        """Messages until the batch is full or the linger time after the first one ran out."""
        assert self.consumer is not None
        s = self.settings
        out: Records = await self.consumer.getmany(timeout_ms=500, max_records=s.process_batch_max)
        total = sum(len(v) for v in out.values())
        if not total:
            return out
        deadline = time.monotonic() + s.process_batch_linger_ms / 1000
        while total < s.process_batch_max and not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            more = await self.consumer.getmany(timeout_ms=int(left * 1000) or 1,
                                               max_records=s.process_batch_max - total)
            for tp, recs in more.items():
                out.setdefault(tp, []).extend(recs)
                total += len(recs)
        return out

    async def handle(self, records: Records) -> WriteResult:
        """Decode, store, publish, then commit offsets: the whole effectively-once step."""
        assert self.consumer is not None and self.producer is not None
        topics = self.settings.topics
        letters: list[StoredDeadLetter] = []
        parts: list[Batch] = []
        bad: list[tuple[bytes, str]] = []
        watermarks: dict[tuple[str, int], int] = {}
        size = 0
        for tp, recs in records.items():
            metrics.MESSAGES.labels(tp.topic).inc(len(recs))
            size += len(recs)
            if tp.topic == topics.deadletter:
                letters.extend(StoredDeadLetter(r.topic, r.partition, r.offset,
                                                _as_deadletter(r.value)) for r in recs)
                continue
            # Decoded per partition: each partition's event-time progress is recorded
            # with the batch (processors/windows.py closes windows by it).
            part, refused = self.decode([r.value for r in recs])
            parts.append(part)
            bad += refused
            if len(part):
                watermarks[(tp.topic, tp.partition)] = watermark(part.time_ms)
        metrics.BATCH_SIZE.observe(size)
        batch = concat(parts)
        try:
            result = await self.storage.write(batch, letters, watermarks)
        except Exception as exc:
            if is_away(exc):
                raise
            # A record the database refuses (or contention that outlived its retries):
            # store the rest, park the refused ones, and go on. See Storage.isolate.
            result = await self.storage.isolate(self._items(records), exc,
                                                group=self.settings.process_group)
        pending = []
        for raw, reason in bad:
            metrics.BAD_EVENTS.inc()
            pending.append(await self.producer.send(topics.deadletter, encode_deadletter(
                _bad_event_letter(raw, reason, topics.events))))
        if self.settings.process_publish_rollups and result.readings:
            pending += await self.publish_rollups(result.rollups)
        if pending:
            await asyncio.gather(*pending)
        await self.commit(records)
        self._record(result, records)
        await self.update_lag()
        return result

    def decode(self, values: list[bytes | None]) -> tuple[Batch, list[tuple[bytes, str]]]:
        """A poll's events-topic values as one batch, and the values that do not decode
        (with why). v1 events (the legacy JSON contract) and v2 columnar records are
        decoded apart, each in one call: a v2 record's readings stay arrays from the bytes
        to the COPY (``processors.batch.from_columns``)."""
        st = self.storage
        v1 = [v for v in values if v is None or is_v1(v)]
        v2 = [v for v in values if v is not None and not is_v1(v)]
        events, bad = decode_all(v1)
        parts = [columns(events, st.vocab, st.known_sensors)]
        if v2:
            cols, refused = decode_each(v2)  # type: ignore[arg-type]
            bad += [(v2[k] or b"", reason) for k, reason in refused]
            parts.append(from_columns(cols, st.vocab, st.registry, st.known_sensors))
        return concat(parts), bad

    def _items(self, records: Records) -> list[Item]:
        """The batch's records one by one, each with what it is stored as, for isolating
        poison. Events that do not decode are left out: they are dead-lettered anyway."""
        items: list[Item] = []
        for tp, recs in records.items():
            for r in recs:
                src = Source(tp.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
                if tp.topic == self.settings.topics.deadletter:
                    items.append(Item(src, StoredDeadLetter(r.topic, r.partition, r.offset,
                                                            _as_deadletter(r.value))))
                    continue
                if r.value is None:
                    continue
                try:
                    items.append(Item(src, decode_event(r.value) if is_v1(r.value)
                                      else decode_batches([r.value])))
                except (msgspec.ValidationError, msgspec.DecodeError):
                    continue
        return items

    async def update_lag(self) -> None:
        """Messages behind the high watermark on every events partition we own."""
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            if tp.topic != self.settings.topics.events:
                continue
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            with contextlib.suppress(IllegalStateError, KafkaError):
                position = await self.consumer.position(tp)
                metrics.CONSUMER_LAG.labels(str(tp.partition)).set(max(high - position, 0))

    async def publish_rollups(self, rollups: dict[str, Groups]) -> list[asyncio.Future[Any]]:
        """Rollup partials to the aggregates topic in per-partition batches.

        One ``send()`` per message costs ~15 µs of client CPU; filling BatchBuilders per
        partition (the default partitioner's choice, cached per key) is several times
        cheaper, and a batch carries as many partials as a processor batch makes.
        """
        assert self.producer is not None
        topic = self.settings.topics.aggregates
        partitions = sorted(await self.producer.partitions_for(topic))
        if partitions != self._partitions:
            self._partitions, self._partition_of = partitions, {}
        builders: dict[int, Any] = {}
        futures = []
        for name, groups in rollups.items():
            msgs = rollup_messages(name, groups, self.storage.vocab)
            for key, value in msgs:
                p = self._partition_of.get(key)
                if p is None:
                    p = self._partition_of[key] = partitions[partition_for(key, len(partitions))]
                builder = builders.get(p)
                if builder is None:
                    builder = builders[p] = self.producer.create_batch()
                if builder.append(key=key, value=value, timestamp=None) is None:  # full
                    futures.append(await self.producer.send_batch(builder, topic, partition=p))
                    builder = builders[p] = self.producer.create_batch()
                    builder.append(key=key, value=value, timestamp=None)
            metrics.ROLLUPS_PUBLISHED.labels(ROLLUPS[name][1]).inc(len(msgs))
        for p, builder in builders.items():
            if builder.record_count():
                futures.append(await self.producer.send_batch(builder, topic, partition=p))
        return futures

    async def commit(self, records: Records) -> None:
        assert self.consumer is not None
        offsets = {tp: recs[-1].offset + 1 for tp, recs in records.items() if recs}
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # Partitions moved to another member meanwhile: it redelivers from the last
            # committed offset and the idempotent write stores nothing twice.
            log.warning("offset commit refused after a rebalance: %s", exc)

    def _record(self, result: WriteResult, records: Records) -> None:
        assert self.consumer is not None
        metrics.BATCHES.inc()
        metrics.ROWS_WRITTEN.labels("readings").inc(result.readings)
        metrics.ROWS_WRITTEN.labels("incidents").inc(result.incidents)
        metrics.ROWS_WRITTEN.labels("deadletters").inc(result.deadletters)
        metrics.DUPLICATES.inc(result.duplicates)
        for source, _ in result.parked:
            metrics.PARKED.labels(source.topic).inc()
        metrics.WRITE_SECONDS.observe(result.write_s)
        metrics.AGGREGATION_SECONDS.observe(result.aggregation_s)
        self.stored_events += result.readings
        self.last_batch_at = time.monotonic()

    async def housekeeping(self, idle: bool) -> None:
        s = self.settings
        now = time.monotonic()
        if idle:
            await self.update_lag()
        await self.flush_latest()
        if now - self._last_maintenance >= s.process_maintenance_interval_s:
            self._last_maintenance = now
            try:
                done = await run_maintenance(self.storage.conn, self.storage.mode,
                                             s.retention_days)
                if done:
                    log.info("storage maintenance", extra={"fields": {"done": done}})
            except Exception:
                log.exception("storage maintenance failed; will retry next period")


    async def close_loop(self, stop: asyncio.Event) -> None:
        """Compute closed rollup windows and late cells every ``process_close_every_s``,
        beside the consume loop, on a connection of its own.

        Why beside: closing a busy minute is one statement over all of its readings (a
        second or more of the database's time at 20k readings/s), and batches must not
        wait for it. Any failure, a lost database included, is logged and retried next
        period on a new connection: the marks stay, and derived data must not stop the
        readings. A window nobody touched for ``process_close_quiet_s`` is computed even
        while open (a quiet city's current windows); judged on the window's mark, so an
        idle replica does not recompute the open hour of a busy one.
        """
        s = self.settings
        conn: asyncpg.Connection | None = None
        try:
            while not await sleep_unless(stop, s.process_close_every_s):
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.storage.dsn, timeout=5)
                    done = await self.closer.run(conn)
                    await self.storage.closed.refresh(conn)
                except Exception as exc:
                    log.warning("closing rollup windows failed (%s: %s); retried next period",
                                type(exc).__name__, str(exc)[:300])
                    if conn is not None and is_away(exc):
                        conn.terminate()
                        conn = None
                    continue
                if done.seconds > 1.0:
                    log.info("rollup windows closed", extra={"fields": {
                        "buckets": done.buckets, "late_cells": done.late_cells,
                        "seconds": round(done.seconds, 2)}})
        finally:
            if conn is not None:
                conn.terminate()

    async def flush_latest(self) -> None:
        """Latest state to ``sensor_latest`` when its flush is due. A lost database is
        raised (``run`` reconnects and calls this again); any other failure is logged and
        the cells stay dirty for the next period: derived state must not stop the
        readings."""
        try:
            await self.storage.flush_latest()
        except Exception as exc:
            if is_away(exc):
                raise
            log.warning("latest-state flush failed (%s: %s); retried next period",
                        type(exc).__name__, exc)
            self.storage.latest.last_flush = time.monotonic()


def instance_id(settings: Settings) -> str | None:
    """The static group member id (see ``Settings.process_instance_id``).

    Static membership is what lets a processor killed with -9 come back at once: the
    restarted member takes its dead self's place and partitions without a rebalance,
    instead of the group waiting up to ``session.timeout.ms`` for the broker to expire it
    (Apache Kafka does expire it; static membership is about recovery time, not that).
    """
    if settings.process_instance_id == "auto":
        return static_member_id("process", settings.process_metrics_port)
    return settings.process_instance_id or None


def decode_all(values: list[bytes | None]) -> tuple[list[Event], list[tuple[bytes, str]]]:
    """All events of a batch in one decoder call; on failure, isolate the bad messages."""
    if not values:
        return [], []
    if all(v is not None for v in values):
        try:
            return decode_events(values), []  # type: ignore[arg-type]
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
    events: list[Event] = []
    bad: list[tuple[bytes, str]] = []
    for v in values:
        if v is None:
            bad.append((b"", "empty message (tombstone) on the events topic"))
            continue
        try:
            events.append(decode_event(v))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            bad.append((v, str(exc)))
    return events, bad


def _bad_event_letter(raw: bytes, reason: str, topic: str) -> DeadLetter:
    try:
        payload, encoding = raw.decode(), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(raw).decode(), "base64"
    return DeadLetter(reason="bad_event", detail=reason[:2000], mqtt_topic=f"kafka:{topic}",
                      payload=payload, payload_encoding=encoding,
                      received_at=int(time.time() * 1000), service="processor")


def _as_deadletter(value: bytes | None) -> DeadLetter:
    """A dead-letter message as stored; one that does not decode is stored as such."""
    try:
        return decode_deadletter(value or b"")
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raw = value or b""
        return DeadLetter(reason="bad_deadletter", detail=str(exc)[:2000], mqtt_topic="",
                          payload=base64.b64encode(raw).decode(), payload_encoding="base64",
                          received_at=int(time.time() * 1000), service="processor")


def rollup_messages(name: str, g: Groups, vocab: Vocabularies) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) of every partial of one rollup, keyed by sensor id or district."""
    scope, window = ROLLUPS[name]
    if not len(g):
        return []
    mask = (1 << METRIC_BITS) - 1
    metric = vocab.metrics.lookup(g.key & mask)
    high = (g.key >> METRIC_BITS)
    if scope == "sensor":
        sensor_ids = vocab.sensors.lookup(high)
        areas = [vocab.areas.names[vocab.sensor_area[c]] for c in high.tolist()]
    else:
        sensor_ids = [None] * len(g)
        areas = vocab.areas.lookup(high).tolist()
    out = []
    for sid, (district, domain), m, b, n, sm, lo, hi, mean, p95 in zip(
            sensor_ids, areas, metric, g.bucket_ms.tolist(), g.n.tolist(), g.sum.tolist(),
            g.min.tolist(), g.max.tolist(), g.mean.tolist(), g.p95.tolist(), strict=True):
        r = Rollup(scope=scope, window=window, bucket=b, sensor_id=sid, district=district,
                   domain=domain, metric=m, n=n, sum=sm, min=lo, max=hi, mean=mean, p95=p95)
        out.append(((sid or district).encode(), encode_rollup(r)))
    return out


async def _open_storage(settings: Settings, stop: asyncio.Event,
                        max_delay_s: float = 5.0) -> Storage | None:
    """Migrate and connect, waiting (capped, jittered back-off) while the database is not
    there yet: services of an operations center start in any order, and a processor that
    exits until PostgreSQL answers is restarted over and over by its runtime (seen: 32
    restarts in a 30 s outage). None if ``stop`` was set first."""
    backoff = Backoff(0.2, max_delay_s)
    while not stop.is_set():
        try:
            mode = await migrate(settings.pg_dsn, settings.storage_mode,
                                 retention_days=settings.retention_days)
            return await Storage.connect(settings.pg_dsn, mode)
        except Exception as exc:
            if not is_away(exc):  # a failed migration, say: not worth waiting for
                raise
            delay = backoff.next()
            log.warning("database not reachable yet (%s: %s); next try in %.1fs",
                        type(exc).__name__, exc, delay)
            await sleep_unless(stop, delay)
    return None


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """Migrate, register the fleet, then consume until ``stop`` is set."""
    from cityops.service import serve_http

    storage = await _open_storage(settings, stop)
    if storage is None:
        return 0
    processor = Processor(settings, storage)
    server = serve_http("process", settings.bind_host, settings.process_metrics_port,
                        health=lambda: processor.healthy)
    try:
        try:
            n = await storage.load_fleet(load_fleet(settings.fleet_file))
            log.info("sensor registry loaded", extra={"fields": {"sensors": n}})
        except Exception as exc:  # a missing fleet file must not stop storing events
            log.error("could not load the fleet file %s: %s", settings.fleet_file, exc)
        await processor.start()
        log.info("processor started", extra={"fields": {
            "mode": storage.mode, "group": settings.process_group, "topics": [
                settings.topics.events, settings.topics.deadletter]}})
        await processor.run(stop)
        return 0
    finally:
        with contextlib.suppress(KafkaError, OSError, asyncio.CancelledError):
            await processor.stop()
        await storage.close()
        server.shutdown()

