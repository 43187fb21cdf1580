"""The ingest service: MQTT in, normalized events and dead letters out to Kafka.

The pipeline, per batch of MQTT messages::

    MQTT session ──batch──▶ Normalizer ──▶ DuplicateWindow ──▶ EventProducer.submit
         ▲                                                          │ ack future
         └──────────── PUBACK, in batch order, after Kafka acked ◀──┘

Normalizing batch N+1 overlaps with Kafka acknowledging batch N (up to
``PIPELINE_DEPTH`` batches in flight). Messages are acknowledged to the broker strictly
in order and only after Kafka acknowledged every event and dead letter made from them.

Riding through broker restarts (the front door of the city must not need a restarter):

- MQTT lost: the session loop reconnects with capped exponential backoff and jitter,
  same client id and clean start off, so the broker redelivers every unacknowledged
  message. Batches from the old connection still finish their way into Kafka (their
  events passed the duplicate window, so they must), but are never acknowledged on the
  new connection: their packet ids died with the old one. ``/healthz`` is unhealthy
  while disconnected.
- Kafka unreachable: the idempotent producer retries; a batch it gives up on is handed
  to it again (same events, same ids) with backoff, in order, until Kafka takes it. No
  PUBACK leaves meanwhile, so MQTT Receive Maximum stops the broker sending: the
  backlog waits in Mosquitto, not in our memory. Only a stop request during such an
  outage ends the service with an error (nothing unacknowledged is lost: the broker
  redelivers it to the next process).

What the events become on Kafka follows ``ingest_contract_version``: v1, one JSON
event per record; v2, one columnar ``EventBatch`` per MQTT message, and one per
partition for the single-reading messages of a batch (``ingest.kafka.v2_records_of``).
Since issue 15 a batch stays columns from the normalizer to the v2 records: the
duplicate window takes the rows' int64 keys and the records are encoded from the
arrays, with no ``Event`` per reading (v1 builds them from the columns, off the hot
path). Dead letters and the duplicate window are the same in both.

Memory is bounded twice: by MQTT v5 Receive Maximum (``ingest_inflight_max``: the
broker sends no more unacknowledged messages, and queues the rest itself) and by the
pipeline depth (when Kafka is slow, ``submit`` and the pipeline queue block, so the
service stops taking messages from the MQTT client).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

import numpy as np

from cityops.kafka import require_topics
from cityops.registry import Fleet, load_fleet
from cityops.settings import Settings, SettingsError
from ingest import metrics
from ingest.backoff import Backoff, sleep_unless
from ingest.columns import Normalized
from ingest.contract import DeadLetter
from ingest.dedup import DuplicateWindow
from ingest.kafka import PRODUCER_FATAL, EventProducer, OutRecord, v1_records, v2_records_of
from ingest.mqtt import (
    CONNECTION_LOST,
    MqttBatch,
    MqttSource,
    open_source,
    session_client_id,
    subscriptions,
)
from ingest.normalize import Normalizer

log = logging.getLogger("cityops.ingest")
# Batches between normalizing and acknowledging. Memory is bounded by the MQTT Receive
# Maximum (messages), so this only needs to be deep enough to cover Kafka's round trip.
PIPELINE_DEPTH = 32


@dataclass(slots=True)
class IngestStats:
    """What this process has done (the same numbers the Prometheus metrics carry)."""

    messages: int = 0
    events: int = 0  # produced and acknowledged by Kafka
    duplicates: int = 0
    deadletters: collections.Counter[str] = field(default_factory=collections.Counter)
    acked_messages: int = 0
    in_flight: int = 0  # received, not yet acknowledged to the broker
    peak_in_flight: int = 0
    mqtt_reconnects: int = 0  # reconnect attempts after a lost (or failed) connection
    left_to_redelivery: int = 0  # processed, but their connection was gone before the ack
    kafka_retries: int = 0  # batches handed to Kafka again after a failure


def _per_place(out: Normalized) -> collections.Counter[tuple[str, str]]:
    """Rows per (district, domain), for the events-out metric: one count per sensor of
    the batch (``np.bincount``), not a look at every row."""
    per: collections.Counter[tuple[str, str]] = collections.Counter()
    if len(out):
        counts = np.bincount(out.row_sensor, minlength=len(out.sensors)).tolist()
        for s, k in zip(out.sensors, counts, strict=True):
            if k:
                per[(s.district, s.domain)] += k
    return per


@dataclass(slots=True)
class _InFlight:
    acked: asyncio.Future[None]
    batch: MqttBatch
    events: int  # rows (readings and incidents) in the records
    per_place: collections.Counter[tuple[str, str]]  # events per (district, domain)
    records: list[OutRecord]  # the events, encoded: handed over again as they are
    dead: list[DeadLetter]
    producer_generation: int  # which Kafka client the ack future belongs to


class IngestService:
    """One ingest worker. Its MQTT client id, and so its persistent session, is stable
    across restarts: made from ``worker_id`` in shared mode, from the worker's district
    slot in districts mode (``ingest.mqtt.session_client_id``). A restarted worker gets
    its unacked messages back."""

    def __init__(self, settings: Settings, worker_id: str = "0", *, fleet: Fleet | None = None,
                 transport: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.client_id = session_client_id(settings, worker_id)
        self.subscriptions = subscriptions(settings)  # raises early on a bad setting
        self.transport = transport or settings.ingest_transport
        self.normalizer = Normalizer(fleet or load_fleet(settings.fleet_file), settings)
        self.dedup = DuplicateWindow(settings.ingest_dedup_window_s,
                                     settings.ingest_dedup_max_ids)
        if settings.ingest_contract_version not in (1, 2):
            raise SettingsError(f"setting 'ingest_contract_version': 1 or 2, not "
                                f"{settings.ingest_contract_version}")
        self.contract = settings.ingest_contract_version
        self.stats = IngestStats()
        self.ready = asyncio.Event()  # set while connected and subscribed
        self._stop = asyncio.Event()
        self._failed: BaseException | None = None

    def healthy(self) -> bool:
        return self.ready.is_set() and self._failed is None and not self._stop.is_set()

    def stop(self) -> None:
        """Ask ``run`` to finish: in-flight batches are still acknowledged, then it returns."""
        self._stop.set()

    def _backoff(self) -> Backoff:
        return Backoff(self.settings.ingest_reconnect_min_ms / 1000,
                       self.settings.ingest_reconnect_max_ms / 1000)

    async def run(self) -> None:
        topics = self.settings.topics
        await require_topics(self.settings, [topics.events, topics.deadletter])
        producer = EventProducer(self.settings, self.client_id)
        await producer.start()
        try:
            await self._sessions(producer)
        finally:
            self._disconnected()
            await producer.stop()
        if self._failed is not None:
            raise self._failed

    def _disconnected(self) -> None:
        self.ready.clear()
        metrics.MQTT_CONNECTED.set(0)

    async def _sessions(self, producer: EventProducer) -> None:
        """Connect, pump until the connection is lost, back off, resume the session."""
        backoff = self._backoff()
        while not self._stop.is_set():
            try:
                async with open_source(self.settings, self.client_id, self.transport) as source:
                    self.ready.set()
                    metrics.MQTT_CONNECTED.set(1)
                    log.info("ingest worker %s subscribed", self.worker_id,
                             extra={"fields": {"transport": self.transport,
                                               "client_id": self.client_id,
                                               "subscriptions": self.subscriptions,
                                               "after_attempts": backoff.attempt}})
                    backoff.reset()
                    await self._pump(source, producer)
            except CONNECTION_LOST as exc:
                self._disconnected()
                if self._stop.is_set() or self._failed is not None:
                    return
                delay = backoff.next()
                self.stats.mqtt_reconnects += 1
                metrics.MQTT_RECONNECTS.inc()
                log.warning("MQTT connection lost or refused (%s: %s); reconnect attempt %d "
                            "in %.2f s, resuming session %s", type(exc).__name__, exc,
                            backoff.attempt, delay, self.client_id)
                await sleep_unless(self._stop, delay)
            else:
                self._disconnected()
            if self._failed is not None:
                return

    async def _pump(self, source: MqttSource, producer: EventProducer) -> None:
        """Take batches until stopped (returns) or the connection is lost (raises, after
        the batches already taken have reached Kafka)."""
        pipeline: asyncio.Queue[_InFlight | None] = asyncio.Queue(PIPELINE_DEPTH)
        acker = asyncio.create_task(self._ack_in_order(source, pipeline, producer))
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                taking = asyncio.create_task(source.next_batch())
                done, _ = await asyncio.wait({taking, stopping, acker},
                                             return_when=asyncio.FIRST_COMPLETED)
                if taking not in done:
                    taking.cancel()
                    break
                batch = taking.result()
                await pipeline.put(await self._process(batch, producer))
        finally:
            stopping.cancel()
            if not acker.done():
                await pipeline.put(None)  # drain: acknowledge what Kafka acknowledges
                await acker

    async def _process(self, batch: MqttBatch, producer: EventProducer) -> _InFlight:
        n = len(batch.messages)
        self.stats.messages += n
        self.stats.in_flight += n
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        metrics.MESSAGES_IN.inc(n)
        metrics.QUEUE_DEPTH.inc(n)
        metrics.BATCH_MESSAGES.observe(n)
        out = self.normalizer.normalize_batch(batch.messages)
        dead = out.dead
        kept = self.dedup.keep_keys(out.row_key, int(time.time() * 1000))
        dups = len(out) - kept.size
        if dups:
            out = out.take(kept)
        if self.contract == 2:
            records = v2_records_of(out, producer.partition_of)
        else:
            records = v1_records(out.events)  # the legacy contract: an Event per row
        if dups:
            self.stats.duplicates += dups
            metrics.DUPLICATES.inc(dups)
        for d in dead:
            self.stats.deadletters[d.reason] += 1
            metrics.REJECTIONS.labels(d.reason).inc()
        metrics.BATCH_EVENTS.observe(len(out))
        generation = producer.generation
        return _InFlight(await self._submit(producer, records, dead), batch, len(out),
                         _per_place(out), records, dead, generation)

    @staticmethod
    async def _submit(producer: EventProducer, records: list[OutRecord],
                      dead: list[DeadLetter]) -> asyncio.Future[None]:
        """``producer.submit``, with a failure to hand over (the producer's queue stayed
        full past its timeout: Kafka down) turned into a failed ack the acker retries."""
        try:
            acked: Awaitable[None] = await producer.submit(records, dead)
        except Exception as exc:
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed
        return asyncio.ensure_future(acked)

    async def _in_kafka(self, item: _InFlight, producer: EventProducer) -> bool:
        """Wait until Kafka acknowledged the batch, handing it over again (same events,
        same ids: at worst a duplicate with the same event id) while Kafka fails it.
        False only when asked to stop during an outage."""
        backoff = self._backoff()
        while True:
            try:
                await item.acked
                return True
            except Exception as exc:
                if self._stop.is_set():
                    log.error("Kafka did not acknowledge a batch and the worker is stopping; "
                              "not acknowledging it (the broker will redeliver)", exc_info=exc)
                    self._failed = exc
                    return False
                delay = backoff.next()
                self.stats.kafka_retries += 1
                metrics.KAFKA_RETRIES.inc()
                log.warning("Kafka did not acknowledge a batch of %d events (%s: %s); "
                            "retry %d in %.2f s", item.events, type(exc).__name__, exc,
                            backoff.attempt, delay)
                if isinstance(exc, PRODUCER_FATAL):
                    await producer.renew(item.producer_generation)
                if await sleep_unless(self._stop, delay):
                    continue  # stopping: the next look fails and ends the wait
                item.producer_generation = producer.generation
                item.acked = await self._submit(producer, item.records, item.dead)

    async def _ack_in_order(self, source: MqttSource, pipeline: asyncio.Queue[_InFlight | None],
                            producer: EventProducer) -> None:
        while (item := await pipeline.get()) is not None:
            if not await self._in_kafka(item, producer):
                # Nothing from here on may be acknowledged: the broker keeps it all.
                self._stop.set()
                while not pipeline.empty():
                    rest = pipeline.get_nowait()
                    if rest is not None:
                        if rest.acked.done() and not rest.acked.cancelled():
                            rest.acked.exception()  # seen: logged above, redelivered later
                        rest.acked.cancel()
                return
            n = len(item.batch.messages)
            if not source.ack(item.batch):
                self.stats.left_to_redelivery += n
            else:
                self.stats.acked_messages += n
            self.stats.events += item.events
            self.stats.in_flight -= n
            for (district, domain), k in item.per_place.items():
                metrics.EVENTS_OUT.labels(district, domain).inc(k)
            metrics.QUEUE_DEPTH.dec(n)
