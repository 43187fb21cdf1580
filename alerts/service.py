"""``cityops alerts``: events and rollups from Kafka through the rule engine into alerts.

One consumer loop per process, in a consumer group on the events and aggregates topics.
Both are keyed by sensor id, so one sensor's events (and, separately, its rollups) live
in one partition and reach one consumer in order; a rule reads either events or rollups,
so per-sensor rule state never sees two concurrent messages, and a duplicate alert
cannot come from a race (the database's one-active-alert index is the backstop).

The loop is single-task on purpose (no locks): poll a batch, evaluate it vectorized,
apply the signals in one transaction, publish the changes, and now and then run the
clock (absence, escalation, rule file reload, maintenance windows) and checkpoint (in
the background: the loop does not wait for it).

Exactly-once rule state: the checkpoint writes the evaluators' changed state and the
offsets it reflects in ONE PostgreSQL transaction, and on partition assignment the
consumer seeks to the offsets stored there. Alert writes are idempotent (one active
alert per key), so the events replayed after a crash only re-confirm what is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from alerts.engine import Engine
from alerts.kafka import poll
from alerts.metrics import BATCH_SIZE, DEADLETTERS, EVENTS
from alerts.model import AlertChange, encode_change
from alerts.rollups import decode_rollup, decode_rollups
from alerts.ruleset import RulesFile
from alerts.store import AlertStore, create_pool
from cityops.registry import Fleet, load_fleet
from cityops.service import static_member_id
from cityops.settings import Settings
from ingest.contract import DeadLetter, Event, decode_event, decode_events, encode_deadletter
from processors.rollup import Rollup

log = logging.getLogger(__name__)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: AlertService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if revoked:
            await self.service.checkpoint(force=True)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.service.seek_to_checkpoint(assigned)


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
        self.tick_s = tick_s
        self.update_every_s = (settings.alerts_update_every_s if update_every_s is None
                               else update_every_s)
        self.offsets: dict[tuple[str, int], int] = {}
        self.assigned = False
        self.engine: Engine | None = None
        self.store: AlertStore | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._last_checkpoint = 0.0
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._last_windows = 0.0

    def healthy(self) -> bool:
        return self.assigned

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        rules = self.rules_file.load()
        if self.fleet is None and s.fleet_file.is_file():
            self.fleet = load_fleet(s.fleet_file)
        pool = await create_pool(s.pg_dsn)
        self.store = store = AlertStore(pool, update_every_s=self.update_every_s)
        self.engine = Engine(rules, self.fleet)
        restored = self.engine.restore(await store.load_state())
        restored += self.engine.restore_blobs(await store.load_blobs())
        await store.load_windows()
        self.producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=2,
                                         enable_idempotence=True)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, group_id=self.group,
            # Static membership: a killed worker rejoins at once (see static_member_id).
            group_instance_id=static_member_id("alerts", s.alerts_metrics_port),
            enable_auto_commit=False, auto_offset_reset="latest", max_poll_records=5000,
            fetch_max_wait_ms=50)
        await self.producer.start()
        try:
            await self.consumer.start()
            self.consumer.subscribe([s.topics.events, s.topics.aggregates],
                                    listener=_Rebalance(self))
            log.info("alerts service started", extra={"fields": {
                "rules": len(rules.rules), "restored_keys": restored, "group": self.group}})
            await self._loop(stop)
        finally:
            with contextlib.suppress(Exception):
                await self.checkpoint(force=True)
            await self.consumer.stop()
            await self.producer.stop()
            await pool.close()

    async def _loop(self, stop: asyncio.Event) -> None:
        assert self.consumer and self.engine and self.store
        last_tick = 0.0
        while not stop.is_set():
            data = await poll(self.consumer, max_records=5000)
            if data:
                self.assigned = True
            events: list[Event] = []
            rollups: list[Rollup] = []
            for tp, msgs in data.items():
                if tp.topic == self.settings.topics.aggregates:
                    rollups.extend(await self._decode_rollups(tp.topic, msgs))
                else:
                    events.extend(await self._decode(tp.topic, msgs))
                self.offsets[(tp.topic, tp.partition)] = msgs[-1].offset + 1
            if events:
                EVENTS.labels("events").inc(len(events))
                BATCH_SIZE.observe(len(events))
            if rollups:
                EVENTS.labels("aggregates").inc(len(rollups))
            signals = self.engine.evaluate(events)
            if rollups:
                signals += self.engine.evaluate_rollups(rollups)
            now = time.time()
            ticked = now - last_tick >= self.tick_s
            if ticked:
                last_tick = now
                self.assigned = self.assigned or bool(self.consumer.assignment())
                await self._reload_rules()
                signals += self.engine.tick(int(now * 1000))
            changes = await self.store.apply(signals)
            if self.engine.has_correlations() and (changes or ticked):
                corr = self.engine.correlate(await self.store.active(), int(now * 1000))
                changes += await self.store.apply(corr)
            if ticked:
                changes += await self.store.escalate(self.settings.alerts_escalate_after_s,
                                                     self._escalation_overrides())
                if now - self._last_windows >= 5.0:
                    self._last_windows = now
                    await self.store.load_windows()
                    await self.store.count_active()
            await self.publish(changes)
            await self.checkpoint()

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
            RULE_RELOADS.labels("applied").inc()
            log.info("rules applied", extra={"fields": {"rules": len(new.rules),
                                                          "state_reset": dropped}})

    async def _decode(self, topic: str, msgs: list) -> list[Event]:  # type: ignore[type-arg]
        return await self._decode_with(topic, msgs, decode_events, decode_event)

    async def _decode_rollups(self, topic: str, msgs: list) -> list[Rollup]:  # type: ignore[type-arg]
        return await self._decode_with(topic, msgs, decode_rollups, decode_rollup)

    async def _decode_with(self, topic: str, msgs: list, many, one) -> list:  # type: ignore[no-untyped-def,type-arg]
        """Decode a poll's messages in one call; if that fails, find and dead-letter the bad
        ones and keep the good ones in order."""
        try:
            return many([m.value for m in msgs])  # type: ignore[no-any-return]
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
        good = []
        for m in msgs:
            try:
                good.append(one(m.value))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                reason = "unsupported_version" if "version" in str(exc) else "bad_json"
                DEADLETTERS.labels(reason).inc()
                dl = DeadLetter(reason=reason, detail=f"alerts: {topic}@{m.partition}:"
                                f"{m.offset}: {exc}", mqtt_topic="",
                                payload=(m.value or b"").decode("utf-8", "replace"),
                                received_at=int(time.time() * 1000),
                                sensor_id=m.key.decode() if m.key else None, service="alerts")
                assert self.producer
                await self.producer.send(self.settings.topics.deadletter,
                                         encode_deadletter(dl), key=m.key)
        return good

    async def publish(self, changes: list[AlertChange]) -> None:
        if not changes:
            return
        assert self.producer
        topic = self.settings.topics.alerts
        futs = [await self.producer.send(topic, encode_change(c),
                                         key=str(c.alert.alert_id).encode()) for c in changes]
        await asyncio.gather(*futs)

    async def checkpoint(self, force: bool = False) -> None:
        """Snapshot now, write in the background (the loop does not wait for PostgreSQL).

        The snapshot and the offsets are taken together, synchronously, so what is written
        is consistent however far the loop has moved on by the time it lands. At most one
        write is in flight; ``force`` (revocation, shutdown) waits for it.
        """
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
        write = self._write_checkpoint(rows, blobs, offsets)
        if force:
            await write
        else:
            self._checkpoint_task = asyncio.create_task(write, name="alerts-checkpoint")

    async def _write_checkpoint(self, rows: list, blobs: list,  # type: ignore[type-arg]
                                offsets: dict[tuple[str, int], int]) -> None:
        assert self.store and self.consumer and self.engine
        try:
            await self.store.checkpoint(self.group, rows, offsets, blobs)
        except Exception:
            log.exception("checkpoint failed; everything goes into the next one")
            for k, v in offsets.items():
                self.offsets.setdefault(k, v)
            self.engine.mark_all_dirty()
            return
        assigned = self.consumer.assignment()
        commit = {TopicPartition(t, p): OffsetAndMetadata(o, "")
                  for (t, p), o in offsets.items() if TopicPartition(t, p) in assigned}
        if commit:  # Kafka's copy is for lag monitoring; PostgreSQL's copy is authoritative
            with contextlib.suppress(Exception):
                await self.consumer.commit(commit)

    async def seek_to_checkpoint(self, assigned: list[TopicPartition]) -> None:
        assert self.store and self.consumer
        stored = await self.store.load_offsets(self.group)
        for tp in assigned:
            off = stored.get((tp.topic, tp.partition))
            if off is not None:
                self.consumer.seek(tp, off)
            else:  # first time this group owns it: pin where we start, so a restart resumes
                self.offsets[(tp.topic, tp.partition)] = await self.consumer.position(tp)
        self.assigned = True
