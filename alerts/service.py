"""``cityops alerts``: events from Kafka through the rule engine into alerts.

One consumer loop per process; N processes share the rules in one consumer group over
two topics (``alerts.scope``). The events topic is keyed so that one sensor's events live
in one partition and reach one worker in order: per-sensor rules run on the owner of
that partition, never on two workers at once. Rules whose state spans sensors (count per
landmark or district) get their inputs on the internal scope topic
(``topics.alerts_scoped``), keyed by the scope, and run on the owner of that partition;
correlation runs on every worker, each raising only the landmarks of its scope
partitions. A duplicate alert cannot come from a race (the database's one-active-alert
index is the backstop).

Rebalance: on revocation the worker checkpoints, then drops the state of the revoked
partitions; on assignment it loads the state of the assigned ones as their previous owner
checkpointed it, their watermarks, and seeks to the offsets stored with it. Both take
``_batch_lock``, which the loop holds from a poll's records to its checkpoint, so a
partition never leaves in the middle of a batch.

The rules that read time windows (``input: rollup_1m``) get them from the engine, which
computes them from the same events (``alerts.windows``): the worker does not read the
processors' ``cityops.aggregates`` topic (~9-12 records per event, almost all unused).
Absence and the windows judge time by event-time watermarks per partition
(``alerts.watermark``); the loop feeds them each poll's newest event time per partition
and whether each partition is read to its end (position == high watermark).

The loop is single-task on purpose (no locks): poll a batch, evaluate it vectorized,
apply the signals in one transaction, publish the changes, and now and then run the
clock (absence, escalation, rule file reload, maintenance windows) and checkpoint (in
the background: the loop does not wait for it).

Exactly-once rule state: the checkpoint writes the evaluators' changed state and the
offsets it reflects (events and scope topics) in ONE PostgreSQL transaction, and on
partition assignment the consumer seeks to the offsets stored there. Alert writes are
idempotent (one active alert per key), so the events replayed after a crash only
re-confirm what is there. Scope inputs are acknowledged by Kafka before the offsets of
the events they came from can be checkpointed; a replay publishes them again, and the
scoped rules drop an event id they have counted (within their window).

Database outages are ridden out in-process, like the processor does: every database
step of the loop goes through ``_db``, which on a lost database (``Fault.AWAY`` of
``processors.faults``, the one classification both services share) waits with capped,
jittered back-off and runs the SAME step again: the same signals are applied, nothing is
re-evaluated. Meanwhile the loop does not poll Kafka (the backlog waits there, so memory
stays flat), /healthz says unhealthy, and no checkpoint is taken while a batch is
evaluated but not yet applied, so state and offsets never get ahead of the alerts.

Poison records never crash-loop the service: a batch whose rule evaluation raises is
evaluated again one record at a time, and each record that still raises is parked (raw
Kafka bytes, topic/partition/offset, error; ``parked`` table, stage ``evaluate``) and
skipped; a batch of signals the alert store refuses for a reason other than a lost
database (after bounded retries on contention) is applied one signal at a time, and a
signal still refused is skipped with its error logged and counted (stage ``store``; a
signal is not a Kafka record, so there are no raw bytes to park for it).

The alerts producer is idempotent, so a producer id can become unusable for good: after a
broker loses records it had acknowledged (Apache Kafka after an unclean leader election,
or a whole machine lost before its page cache was written back), every batch is refused with
OutOfOrderSequenceNumber. ``publish`` then replaces the producer (``PRODUCER_FATAL``, as
ingest does) and sends again what was not acknowledged, instead of ending the process
(measured in the fault matrix: the worker exited with the batch's alerts written but not
published, was restarted by the runtime and started over from its checkpoint).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from alerts.decode import decode_row, decode_rows
from alerts.engine import Engine
from alerts.incidents.model import encode_incident_change
from alerts.incidents.store import IncidentStore, count_change
from alerts.incidents.webhook import WebhookSender
from alerts.metrics import BATCH_SIZE, DEADLETTERS, EVENTS, PARKED, SCOPED_INPUTS
from alerts.model import AlertChange, Signal, encode_change
from alerts.rows import Rows
from alerts.ruleset import RulesFile
from alerts.scope import Ownership, ScopeInput, decode_input, encode_input
from alerts.store import AlertStore, Fenced, create_pool
from cityops.kafka import require_topics
from cityops.registry import Fleet, load_fleet
from cityops.service import static_member_id
from cityops.settings import Settings
from ingest.backoff import Backoff, sleep_unless
from ingest.contract import DeadLetter, encode_deadletter, is_v1
from ingest.kafka import PRODUCER_FATAL
from processors.faults import CONNECTION_LOST, MAX_RETRIES, Fault, classify
from processors.storage import Source, park

log = logging.getLogger(__name__)


def _key_sensor(key: bytes | None, value: bytes | None) -> str | None:
    """The sensor a refused events record is keyed by: a v1 record's key is its sensor; a
    v2 record's may be a gateway or the first of many sensors, so it names none."""
    if not key or (value and not is_v1(value)):
        return None
    return key.decode("utf-8", "replace")
T = TypeVar("T")
# A new producer id per attempt: a second fatal error in a row is a broker that refuses
# every producer, which a process restart (the runtime's job) is no better at.
PRODUCER_RENEWALS = 3

# How far back a scope partition never read by the group is read from (_seek_back): more
# than a new group's workers take to all get their assignment.
SCOPE_LOOKBACK_MS = 60_000

# The database is away (restart, failover, network): the connection is gone, not the work.
# Kept for the modules and tests that import it; the decision is ``processors.faults``.
DB_AWAY = CONNECTION_LOST


def route_keys(fleet: Fleet | None, settings: Settings) -> dict[str, str]:
    """Each registry sensor's events-topic key as ingest produces it: with contract v2 a
    sensor behind a gateway travels in its gateway's records (keyed by the gateway, so on
    the gateway's partition), else a record is keyed by its sensor (``ingest.kafka``)."""
    if fleet is None or settings.ingest_contract_version < 2:
        return {}
    return {s.sensor_id: s.gateway for s in fleet if s.gateway}


class _Stopped(Exception):
    """``stop`` was set while waiting for the database to come back."""


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: AlertService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.service.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.service.on_assigned(assigned)


class AlertService:
    def __init__(self, settings: Settings, *, rules_file: Path | None = None,
                 fleet: Fleet | None = None, group: str | None = None,
                 checkpoint_s: float | None = None, tick_s: float = 0.5,
                 update_every_s: float | None = None) -> None:
        self.settings = settings
        self.rules_file = RulesFile(rules_file or settings.rules_file)
        self.fleet = fleet
        self.group = group or settings.alerts_group
        self.checkpoint_s = settings.alerts_checkpoint_s if checkpoint_s is None else checkpoint_s
        # events partition -> next offset to read (position), for "read to its end"
        self._position: dict[int, int] = {}
        self.tick_s = tick_s
        self.update_every_s = (settings.alerts_update_every_s if update_every_s is None
                               else update_every_s)
        self.offsets: dict[tuple[str, int], int] = {}
        self.assigned = False
        self.engine: Engine | None = None
        self.store: AlertStore | None = None
        self.incidents: IncidentStore | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._last_checkpoint = 0.0
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._last_windows = 0.0
        self._stop = asyncio.Event()
        self._backoff = Backoff(settings.ingest_reconnect_min_ms / 1000,
                                settings.ingest_reconnect_max_ms / 1000)
        self.db_ok = True  # False from a lost connection until a database step succeeds
        self.db_outages = 0
        self._db_lost_at = 0.0
        self.records_polled = 0  # Kafka records handed to the loop (flat while the DB is away)
        self.producer_renewals = 0  # producers replaced after a PRODUCER_FATAL error
        # False while a polled batch is evaluated but its signals are not in the database:
        # the engine state then runs ahead of the alerts, so it must not be checkpointed.
        self._clean = True
        # Held by the loop from a poll's records to its checkpoint, and by the rebalance
        # callbacks: aiokafka runs those in its own task, so without it a partition could
        # be revoked (and its state checkpointed and dropped) in the middle of a batch.
        self._batch_lock = asyncio.Lock()
        self.ownership: Ownership | None = None
        self._claim = ""  # this worker's claim on its partitions (AlertStore.claim)
        self._fatal: BaseException | None = None  # a rebalance callback failed for good

    def _new_producer(self) -> AIOKafkaProducer:
        s = self.settings
        return AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=2,
                                enable_idempotence=True, compression_type=s.kafka_codec)

    async def _renew_producer(self, failed: AIOKafkaProducer, exc: BaseException) -> None:
        """Replace ``failed`` (its producer id is refused for good) by a new client, unless
        that was done already. Starting waits for a broker that is still coming back
        (capped back-off); raises ``_Stopped`` if ``stop`` is set meanwhile."""
        stop_failed = failed.stop
        if self.producer is not failed:
            return
        self.producer_renewals += 1
        log.warning("alerts producer: %s, its producer id is no longer usable; starting a "
                    "new producer", type(exc).__name__)
        with contextlib.suppress(Exception):  # its pending batches fail; we resend them
            await asyncio.wait_for(stop_failed(), 5)
        backoff = Backoff(self.settings.ingest_reconnect_min_ms / 1000,
                          self.settings.ingest_reconnect_max_ms / 1000)
        for attempt in range(30):
            producer = self._new_producer()
            try:
                await producer.start()
            except Exception as err:  # the broker may still be restarting
                with contextlib.suppress(Exception):
                    await producer.stop()
                log.warning("alerts producer: start failed (%s), attempt %d",
                            type(err).__name__, attempt + 1)
                if await sleep_unless(self._stop, backoff.next()):
                    raise _Stopped from err
                continue
            self.producer = producer
            return
        raise exc

    def healthy(self) -> bool:
        return self.assigned and self.db_ok

    async def _db(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run one database step; on a lost connection run the same step again once the
        database answers, backing off (capped, jittered) in between. Raises ``_Stopped``
        if ``stop`` is set meanwhile. Every step is one transaction (or a read), and the
        alert writes are idempotent, so a step whose commit was lost in flight is harmless
        to repeat."""
        contention, contention_backoff = 0, Backoff(0.05, 1.0)
        while True:
            try:
                result = await op()
            except Exception as exc:
                fault = classify(exc)
                if fault is Fault.CONTENTION and contention < MAX_RETRIES - 1:
                    contention += 1
                    await asyncio.sleep(contention_backoff.next())
                    continue
                if fault is not Fault.AWAY:
                    raise
                if self.db_ok:
                    self.db_ok = False
                    self.db_outages += 1
                    self._db_lost_at = time.monotonic()
                    log.warning("database connection lost (%s: %s); holding the batch and "
                                "retrying", type(exc).__name__, exc)
                if self.store is not None:  # the pool's other connections are dead too
                    with contextlib.suppress(Exception):
                        await self.store.pool.expire_connections()
                if await sleep_unless(self._stop, self._backoff.next()):
                    raise _Stopped from exc
                continue
            if not self.db_ok:
                self.db_ok = True
                log.info("database back after %.1fs; carrying on",
                         time.monotonic() - self._db_lost_at)
            self._backoff.reset()
            return result

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self._stop = stop
        rules = self.rules_file.load()
        # critical incidents to the webhook receiver: a task of its own (own connection),
        # started with the consumer; a malformed URL stops the service here, at once
        webhook = WebhookSender(s) if s.webhook_url else None
        if self.fleet is None and s.fleet_file.is_file():
            self.fleet = load_fleet(s.fleet_file)
        try:  # a database that is away at start-up is waited for, too
            pool = await self._db(partial(create_pool, s.pg_dsn))
            self.incidents = IncidentStore(
                pool, rules, {x.sensor_id: x.gateway for x in self.fleet or () if x.gateway})
            self.store = store = AlertStore(pool, update_every_s=self.update_every_s,
                                            incidents=self.incidents)
            self.engine = Engine(rules, self.fleet,
                                 lateness_ms=int(s.alerts_window_lateness_s * 1000))
            # State is loaded per partition as partitions are assigned (on_assigned).
            self.ownership = Ownership(self.engine.index, route_keys(self.fleet, s))
            self.engine.own(self.ownership, s.topics.events, s.topics.alerts_scoped)
            await self._db(store.load_windows)
        except _Stopped:
            if self.store is not None:
                self.store.pool.terminate()
            return
        await require_topics(s, [s.topics.events, s.topics.alerts, s.topics.alerts_scoped,
                                 s.topics.incidents])
        self.producer = self._new_producer()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, group_id=self.group,
            # Static membership: a killed worker rejoins at once (see static_member_id).
            group_instance_id=static_member_id("alerts", s.alerts_metrics_port),
            enable_auto_commit=False, auto_offset_reset="latest", max_poll_records=5000,
            fetch_min_bytes=s.kafka_fetch_min_bytes, fetch_max_wait_ms=s.kafka_fetch_max_wait_ms)
        await self.producer.start()
        if webhook is not None:
            webhook.start()
        try:
            await self.consumer.start()
            self.consumer.subscribe([s.topics.events, s.topics.alerts_scoped],
                                    listener=_Rebalance(self))
            log.info("alerts service started", extra={"fields": {
                "rules": len(rules.rules), "group": self.group}})
            await self._loop(stop)
        finally:
            if webhook is not None:
                await webhook.stop()
            if self._clean and self.db_ok:
                with contextlib.suppress(Exception):
                    await self.checkpoint(force=True)
            await self.consumer.stop()
            await self.producer.stop()
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, *DB_AWAY):
                pool.terminate()

    async def _loop(self, stop: asyncio.Event) -> None:
        try:
            await self._consume(stop)
        except _Stopped:
            log.info("stopping while the database is away: the unapplied batch is not "
                     "checkpointed, so it is read again from Kafka after a restart")

    async def _consume(self, stop: asyncio.Event) -> None:
        assert self.consumer
        last_tick = 0.0
        while not stop.is_set():
            # Wait for records until the next tick is due: the broker holds an empty fetch
            # (fetch.max.wait.ms) and answers as soon as records arrive, so a quiet stream
            # costs a few requests a second and no latency.
            wait_ms = max(1, int((last_tick + self.tick_s - time.time()) * 1000))
            data = await self.consumer.getmany(timeout_ms=wait_ms, max_records=5000)
            if self._fatal is not None:  # see on_assigned
                raise self._fatal
            async with self._batch_lock:
                last_tick = await self._batch(data, last_tick)

    async def _batch(self, data: dict[TopicPartition, list[Any]], last_tick: float) -> float:
        """One poll's records, start to end (under ``_batch_lock``); returns the time of
        the last tick."""
        assert self.consumer and self.engine and self.store and self.ownership
        store, db, topics, own = self.store, self._db, self.settings.topics, self.ownership
        # records of partitions revoked while the poll was answered belong to their new owner
        data = {tp: m for tp, m in data.items() if tp.partition in
                (own.events if tp.topic == topics.events else own.scope)}
        if data:
            self.assigned = True
        self._clean = False
        events: list[Rows] = []
        parts: list[np.ndarray] = []
        inputs: list[ScopeInput] = []
        wall = int(time.time() * 1000)
        for tp, msgs in data.items():
            self.records_polled += len(msgs)
            self.offsets[(tp.topic, tp.partition)] = msgs[-1].offset + 1
            if tp.topic == topics.alerts_scoped:
                inputs += self._decode_inputs(msgs)
                continue
            got = await self._decode(tp.topic, msgs)
            n = sum(len(r) for r in got)
            if n:
                events.extend(got)
                parts.append(np.full(n, tp.partition, np.int32))
                self.engine.clock.observe(tp.partition, max(int(r.time.max()) for r in got
                                                            if len(r)), wall)
            self._position[tp.partition] = msgs[-1].offset + 1
        self.engine.clock.advance(wall, self._caught_up())
        if events:
            rows = sum(len(r) for r in events)
            EVENTS.labels("events").inc(rows)
            BATCH_SIZE.observe(rows)
        signals = await self._evaluate(events, np.concatenate(parts) if parts else None,
                                       data)
        if inputs:
            SCOPED_INPUTS.labels("consumed").inc(len(inputs))
            signals += await self._evaluate_scoped(inputs, data)
        # Before anything is checkpointed: a crash from here on replays the events, which
        # publish the same inputs again (the scoped rules drop an event id seen before).
        await self._publish_inputs(self.engine.take_outbox())
        now = time.time()
        ticked = now - last_tick >= self.tick_s
        if ticked:
            last_tick = now
            self.assigned = self.assigned or bool(self.consumer.assignment())
            await self._reload_rules()
            signals += self.engine.tick(int(now * 1000))
        # From here on every database step is retried as is until it succeeds (_db).
        changes = await self._apply(signals)
        if self.engine.has_correlations() and (changes or ticked):
            active = await db(partial(store.active, self.engine.correlated_rules()))
            corr = self.engine.correlate(active, int(now * 1000))
            changes += await self._apply(corr)
        if ticked:
            changes += await db(partial(store.escalate, self.settings.alerts_escalate_after_s,
                                        self._escalation_overrides()))
            if self.incidents is not None:
                store.push_incident_changes(await db(self.incidents.tick))
            if now - self._last_windows >= 5.0:
                self._last_windows = now
                await db(store.load_windows)
                await db(store.count_active)
                if self.engine.has_correlations(outages=True):
                    active = await db(partial(store.active,
                                              self.engine.correlated_rules(outages=True)))
                    changes += await self._apply(self.engine.correlate(
                        active, int(now * 1000), outages=True))
        await self.publish(changes)
        self._clean = True
        await self.checkpoint()
        return last_tick

    def _caught_up(self) -> dict[int, bool]:
        """Events partitions read to their end (position == high watermark, as the last
        fetch response said: no request of its own). Only those may let their watermark
        follow the wall clock (``alerts.watermark``)."""
        assert self.consumer is not None
        out: dict[int, bool] = {}
        for tp in self.consumer.assignment():
            if tp.topic != self.settings.topics.events:
                continue
            high = self.consumer.highwater(tp)
            pos = self._position.get(tp.partition)
            out[tp.partition] = high is not None and pos is not None and pos >= high
        return out

    async def _evaluate(self, events: list[Rows], partitions: np.ndarray | None,
                        data: dict[TopicPartition, list[Any]]) -> list[Signal]:
        """The rules over a poll's events; a record that makes them raise is parked and
        skipped instead of ending the service (and, restarted, meeting the same record
        again from the checkpoint).

        Only when the vectorized call raised are the records evaluated again one by one.
        Rules that ran before the failing one in that call have seen the batch once
        already; count rules drop an event they have seen (by event id), others may weigh
        that batch twice: a rare, bounded cost against a service stopped for the city.
        """
        assert self.engine
        engine, topics = self.engine, self.settings.topics
        try:
            return engine.evaluate(events, "events", partitions)
        except Exception as exc:
            return await self._isolate_evaluation(data, topics.events, exc, self._decode_one,
                                                  engine.evaluate)

    def _decode_inputs(self, msgs: list[Any]) -> list[ScopeInput]:
        """Scope-topic records (written by alerts workers only); one that does not decode
        is logged and skipped, never a reason to stop."""
        out = []
        for m in msgs:
            try:
                out.append(decode_input(m.value or b""))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                DEADLETTERS.labels("bad_scoped_input").inc()
                log.error("scope input skipped: %s", exc, extra={"fields": {
                    "topic": self.settings.topics.alerts_scoped, "partition": m.partition,
                    "offset": m.offset}})
        return out

    async def _evaluate_scoped(self, inputs: list[ScopeInput],
                               data: dict[TopicPartition, list[Any]]) -> list[Signal]:
        """The scoped rules over the inputs of a poll; a record that makes them raise is
        parked and skipped, as for events (``_evaluate``)."""
        assert self.engine
        try:
            return self.engine.on_scoped(inputs)
        except Exception as exc:
            return await self._isolate_evaluation(
                data, self.settings.topics.alerts_scoped, exc,
                lambda v: [decode_input(v)], self.engine.on_scoped)

    async def _isolate_evaluation(self, data: dict[TopicPartition, list[Any]], topic: str,
                                  cause: BaseException, one: Callable[[bytes], list[Any]],
                                  evaluate: Callable[[list[Any]], list[Signal]]
                                  ) -> list[Signal]:
        log.warning("rule evaluation failed (%s: %s); evaluating the batch one record at a "
                    "time", type(cause).__name__, str(cause)[:300])
        signals: list[Signal] = []
        refused: list[tuple[Source, BaseException, int]] = []
        for tp, msgs in data.items():
            if tp.topic != topic:
                continue
            for m in msgs:
                try:
                    items = one(m.value)  # a v2 record holds many events
                except (msgspec.ValidationError, msgspec.DecodeError, TypeError):
                    continue  # dead-lettered when the poll was decoded
                try:
                    signals += evaluate(items)
                except Exception as exc:
                    refused.append((Source(tp.topic, m.partition, m.offset, m.key, m.value,
                                           m.timestamp), exc, 1))
        if refused:
            assert self.store
            pool = self.store.pool

            async def write() -> int:
                async with pool.acquire() as conn, conn.transaction():
                    return await park(conn, "alerts", self.group, refused)

            await self._db(write)
            PARKED.labels("evaluate").inc(len(refused))
            for src, exc, _ in refused:
                log.error("record parked: rule evaluation raised %s: %s", type(exc).__name__,
                          str(exc)[:500], extra={"fields": {
                              "topic": src.topic, "partition": src.partition,
                              "offset": src.offset}})
        return signals

    async def _apply(self, signals: list[Signal]) -> list[AlertChange]:
        """Signals into alerts in one transaction; if the store refuses them for a reason
        other than a lost database, one signal at a time, skipping (logged, counted) each
        one it still refuses, so one bad signal never holds back the others."""
        assert self.store
        store = self.store
        try:
            return await self._db(partial(store.apply, signals))
        except _Stopped:
            raise
        except Exception as exc:
            if len(signals) <= 1:
                if signals:
                    self._skip_signal(signals[0], exc)
                return []
            log.warning("alert store refused a batch (%s: %s); applying its signals one by "
                        "one", type(exc).__name__, str(exc)[:300])
        changes: list[AlertChange] = []
        for signal in signals:
            try:
                changes += await self._db(partial(store.apply, [signal]))
            except _Stopped:
                raise
            except Exception as exc:
                self._skip_signal(signal, exc)
        return changes

    def _skip_signal(self, signal: Signal, exc: BaseException) -> None:
        PARKED.labels("store").inc()
        log.error("signal skipped: the alert store raised %s: %s", type(exc).__name__,
                  str(exc)[:500], extra={"fields": {
                      "rule": signal.rule_id, "source": signal.source, "kind": signal.kind}})

    def _escalation_overrides(self) -> dict[str, float]:
        assert self.engine
        return {r.id: r.escalate_after_s for r in self.engine.rules.rules
                if r.escalate_after_s is not None}

    async def _reload_rules(self) -> None:
        assert self.engine
        new = await asyncio.to_thread(self.rules_file.poll)  # file I/O off the loop
        if new is not None:
            from alerts.metrics import RULE_RELOADS

            dropped = self.engine.set_rules(new)
            if self.incidents is not None:
                self.incidents.set_rules(new)
            RULE_RELOADS.labels("applied").inc()
            log.info("rules applied", extra={"fields": {"rules": len(new.rules),
                                                          "state_reset": dropped}})

    async def _decode(self, topic: str, msgs: list) -> list[Rows]:  # type: ignore[type-arg]
        return await self._decode_with(topic, msgs, self._decode_many, self._decode_one)

    def _decode_many(self, values: list[bytes]) -> list[Rows]:
        """Rows of many records, contract v1 and v2, as columns (``alerts.decode``): the
        sensors' places are learned when the engine builds its batch."""
        return decode_rows(values)

    def _decode_one(self, value: bytes) -> list[Rows]:
        return decode_row(value)

    async def _decode_with(self, topic: str, msgs: list, many, one) -> list:  # type: ignore[no-untyped-def,type-arg]
        """Decode a poll's messages in one call; if that fails, find and dead-letter the bad
        ones and keep the good ones in order (``one`` gives a record's list of items)."""
        try:
            if all(m.value is not None for m in msgs):
                return many([m.value for m in msgs])  # type: ignore[no-any-return]
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
        good = []
        for m in msgs:
            try:
                if m.value is None:
                    raise msgspec.DecodeError("empty message (tombstone) on the events topic")
                good.extend(one(m.value))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                reason = "unsupported_version" if "version" in str(exc) else "bad_json"
                DEADLETTERS.labels(reason).inc()
                raw = m.value or b""
                try:  # a v2 record is binary: keep its bytes, as the processor does
                    payload, encoding = raw.decode(), "utf-8"
                except UnicodeDecodeError:
                    payload, encoding = base64.b64encode(raw).decode(), "base64"
                dl = DeadLetter(reason=reason, detail=f"alerts: {topic}@{m.partition}:"
                                f"{m.offset}: {exc}", mqtt_topic="", payload=payload,
                                payload_encoding=encoding, received_at=int(time.time() * 1000),
                                sensor_id=_key_sensor(m.key, m.value), service="alerts")
                for renewal in range(PRODUCER_RENEWALS + 1):
                    producer = self.producer
                    assert producer is not None
                    try:  # a producer that died of a fatal error refuses new sends too
                        await producer.send(self.settings.topics.deadletter,
                                            encode_deadletter(dl), key=m.key)
                        break
                    except PRODUCER_FATAL as exc:
                        if renewal == PRODUCER_RENEWALS:
                            raise
                        await self._renew_producer(producer, exc)
        return good

    async def publish(self, changes: list[AlertChange]) -> None:
        """Send the changes and wait for every acknowledgement.

        On a ``PRODUCER_FATAL`` error the producer is renewed and the changes not
        acknowledged are sent again, in their order, so nothing is dropped and one
        alert's changes stay in order (same key, same partition). A change that was in
        flight when the producer died may be written and still reported failed, so it
        can arrive twice: the topic is at-least-once, and each change carries the whole
        alert, so the console applying it twice shows the same row. Other errors end the
        loop as before (the process is restarted and replays from its checkpoint).
        """
        incidents = self.store.take_incident_changes() if self.store else []
        if self.incidents is not None:  # a storming rule's alerts go out as its incidents
            changes = self.incidents.storm.publishable(changes)
        if changes:
            await self._send_all(self.settings.topics.alerts,
                                 [(encode_change(c), str(c.alert.alert_id).encode())
                                  for c in changes])
        if incidents:
            try:
                await self._send_all(self.settings.topics.incidents,
                                     [(encode_incident_change(c),
                                       str(c.incident.incident_id).encode()) for c in incidents])
            except BaseException:
                assert self.store
                self.store.push_incident_changes(incidents)  # sent with the next batch
                raise
            for c in incidents:
                count_change(c)

    async def _publish_inputs(self, inputs: list[ScopeInput]) -> None:
        """The inputs of rules spanning sensors onto the scope topic, keyed by scope, all
        acknowledged before the loop goes on (and so before the offsets of the events they
        came from can be checkpointed)."""
        if not inputs:
            return
        await self._send_all(self.settings.topics.alerts_scoped,
                             [(encode_input(i), i.key.encode()) for i in inputs])
        SCOPED_INPUTS.labels("published").inc(len(inputs))

    async def _send_all(self, topic: str, pending: list[tuple[bytes, bytes]]) -> None:
        """Send (value, key)s and wait for every acknowledgement, renewing a producer that
        died of a ``PRODUCER_FATAL`` error and sending again what it did not deliver."""
        for renewal in range(PRODUCER_RENEWALS + 1):
            producer = self.producer
            assert producer is not None
            futs = []
            fatal: BaseException | None = None
            for value, key in pending:
                try:
                    futs.append(await producer.send(topic, value, key=key))
                except PRODUCER_FATAL as exc:  # the sender already died of it
                    fatal = exc
                    break
            results = await asyncio.gather(*futs, return_exceptions=True)
            failed = [m for m, r in zip(pending, results, strict=False)
                      if isinstance(r, BaseException)] + pending[len(futs):]
            for r in results:
                if isinstance(r, BaseException):
                    if not isinstance(r, PRODUCER_FATAL):
                        raise r
                    fatal = fatal or r
            if not failed:
                return
            assert fatal is not None
            if renewal == PRODUCER_RENEWALS:
                raise fatal
            await self._renew_producer(producer, fatal)
            pending = failed

    async def checkpoint(self, force: bool = False) -> None:
        """Snapshot now, write in the background (the loop does not wait for PostgreSQL).

        The snapshot and the offsets are taken together, synchronously, so what is written
        is consistent however far the loop has moved on by the time it lands. At most one
        write is in flight; ``force`` (revocation, shutdown) waits for it.
        """
        if not self._clean:  # evaluated, not yet applied: the state is ahead of the alerts
            return
        pending = self._checkpoint_task
        if pending is not None and not pending.done():
            if not force:
                return
            await asyncio.wait([pending])
        now = time.monotonic()
        if not force and now - self._last_checkpoint < self.checkpoint_s:
            return
        if self.engine is None or self.store is None or self.consumer is None:
            return
        self._last_checkpoint = now
        rows, blobs = self.engine.snapshot(), self.engine.snapshot_blobs()
        offsets = dict(self.offsets)
        if not rows and not blobs and not offsets:
            return
        self.offsets.clear()
        topic = self.settings.topics.events
        marks = {(topic, p): w for p, w in self.engine.clock.snapshot().items()}
        own = self.ownership
        held = [] if own is None else \
            [(topic, p) for p in sorted(own.events)] + \
            [(self.settings.topics.alerts_scoped, p) for p in sorted(own.scope)]
        write = self._write_checkpoint(rows, blobs, offsets, marks, (self._claim, held))
        if force:
            await write
        else:
            self._checkpoint_task = asyncio.create_task(write, name="alerts-checkpoint")

    async def _write_checkpoint(self, rows: list, blobs: list,  # type: ignore[type-arg]
                                offsets: dict[tuple[str, int], int],
                                marks: dict[tuple[str, int], int],
                                owner: tuple[str, list[tuple[str, int]]]) -> None:
        assert self.store and self.consumer and self.engine
        try:
            await self.store.checkpoint(self.group, rows, offsets, blobs, marks, owner)
        except Exception as exc:
            if isinstance(exc, Fenced):  # our revocation is on its way: it drops all this
                log.warning("checkpoint refused: %s", exc)
            elif classify(exc) is Fault.AWAY:
                log.warning("checkpoint not written, database away (%s); everything goes "
                            "into the next one", type(exc).__name__)
            else:
                log.exception("checkpoint failed; everything goes into the next one")
            for k, v in offsets.items():
                self.offsets.setdefault(k, v)
            self.engine.mark_all_dirty(rows)
            return
        assigned = self.consumer.assignment()
        commit = {TopicPartition(t, p): OffsetAndMetadata(o, "")
                  for (t, p), o in offsets.items() if TopicPartition(t, p) in assigned}
        if commit:  # Kafka's copy is for lag monitoring; PostgreSQL's copy is authoritative
            with contextlib.suppress(Exception):
                await self.consumer.commit(commit)

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Partitions leave: checkpoint everything (their state as of their last record),
        then forget what belonged to them, so nothing stale is judged or written again:
        their next owner loads it from this checkpoint (``on_assigned``)."""
        if not revoked or self.engine is None or self.ownership is None:
            return
        async with self._batch_lock:
            await self.checkpoint(force=True)
            events, scope = self._split(revoked)
            own = self.ownership
            self.engine.drop(events, scope)
            own.events -= events
            own.scope -= scope
            for tp in revoked:
                self.offsets.pop((tp.topic, tp.partition), None)
                if tp.topic == self.settings.topics.events:
                    self._position.pop(tp.partition, None)
            log.info("partitions revoked", extra={"fields": {
                "events": sorted(events), "scoped": sorted(scope)}})

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Partitions arrive: load their state as their previous owner checkpointed it
        (per-sensor state with the events partition of its sensor, scope state with its
        scope partition), their watermarks, and seek to the offsets stored with it.

        The partitions count as owned only once all of that is done. If it fails for a
        reason other than a lost database (which ``_db`` waits out), the loop ends the
        service: judging them without their state, or never, would both be wrong, and a
        restart (the runtime's job) loads them again."""
        assert self.consumer and self.store and self.engine and self.ownership
        async with self._batch_lock:
            try:
                await self._take_over(assigned)
            except _Stopped:
                raise
            except Exception as exc:
                log.exception("loading the state of assigned partitions failed")
                self._fatal = exc

    async def _take_over(self, assigned: list[TopicPartition]) -> None:
        assert self.consumer and self.store and self.engine and self.ownership
        s, own, store, engine = self.settings, self.ownership, self.store, self.engine
        own.set_counts(len(self.consumer.partitions_for_topic(s.topics.events) or ()),
                       len(self.consumer.partitions_for_topic(s.topics.alerts_scoped) or ()))
        events, scope = self._split(assigned)
        engine.assigned(events)
        parts = [(tp.topic, tp.partition) for tp in assigned]
        # Claimed before loading: a previous owner's late checkpoint is refused from now on,
        # or (if it is being written) lands first and is what we load. Partitions still
        # held from before are claimed again with the new claim.
        held = [(s.topics.events, p) for p in own.events] + \
            [(s.topics.alerts_scoped, p) for p in own.scope]
        claim = uuid.uuid4().hex
        await self._db(partial(store.claim, self.group, claim, parts + held))
        self._claim = claim
        restored = engine.restore(await self._db(partial(store.load_state, parts)),
                                  events, scope)
        if events:
            restored += engine.restore_blobs(
                await self._db(partial(store.load_blobs, sorted(events))), events)
            marks = await self._db(partial(store.load_watermarks, self.group,
                                           s.topics.events))
            engine.clock.restore({p: w for p, w in marks.items() if p in events},
                                 int(time.time() * 1000))
        await self.seek_to_checkpoint(assigned)
        own.events |= events
        own.scope |= scope
        log.info("partitions assigned", extra={"fields": {
            "events": sorted(events), "scoped": sorted(scope), "restored": restored}})

    def _split(self, tps: list[TopicPartition]) -> tuple[set[int], set[int]]:
        """(events partitions, scope partitions) of ``tps``."""
        t = self.settings.topics
        return ({tp.partition for tp in tps if tp.topic == t.events},
                {tp.partition for tp in tps if tp.topic == t.alerts_scoped})

    async def seek_to_checkpoint(self, assigned: list[TopicPartition]) -> None:
        assert self.store and self.consumer
        stored = await self._db(partial(self.store.load_offsets, self.group))
        for tp in assigned:
            off = stored.get((tp.topic, tp.partition))
            if off is not None:
                self.consumer.seek(tp, off)
                if tp.topic == self.settings.topics.events:
                    self._position[tp.partition] = off
            else:  # first time this group owns it: pin where we start, so a restart resumes
                if tp.topic == self.settings.topics.alerts_scoped:
                    await self._seek_back(tp)
                pos = self.offsets[(tp.topic, tp.partition)] = await self.consumer.position(tp)
                if tp.topic == self.settings.topics.events:
                    self._position[tp.partition] = pos
        self.assigned = True

    async def _seek_back(self, tp: TopicPartition) -> None:
        """A scope partition this group never read starts ``SCOPE_LOOKBACK_MS`` back, not
        at its end: in a new group, another worker may publish inputs to it before this
        worker has resolved its position, and those would be skipped."""
        assert self.consumer
        since = int(time.time() * 1000) - SCOPE_LOOKBACK_MS
        found = (await self.consumer.offsets_for_times({tp: since})).get(tp)
        if found is not None:
            self.consumer.seek(tp, found.offset)
