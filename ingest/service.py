"""The ingest service: MQTT in, normalized events and dead letters out to Kafka.

The pipeline, per batch of MQTT messages::

    MQTT session ──batch──▶ Normalizer ──▶ DuplicateWindow ──▶ EventProducer.submit
         ▲                                                          │ ack future
         └──────────── PUBACK, in batch order, after Kafka acked ◀──┘

Normalizing batch N+1 overlaps with Kafka acknowledging batch N (up to
``PIPELINE_DEPTH`` batches in flight). Messages are acknowledged to the broker strictly
in order and only after Kafka acknowledged every event and dead letter made from them.
If Kafka fails a batch, nothing after it is acknowledged and the service stops with an
error: the broker redelivers all of it to the next ingest process.

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

from cityops.registry import Fleet, load_fleet
from cityops.settings import Settings
from ingest import metrics
from ingest.dedup import DuplicateWindow
from ingest.kafka import EventProducer
from ingest.mqtt import MqttBatch, MqttSource, open_source
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


@dataclass(slots=True)
class _InFlight:
    acked: asyncio.Task[None]
    batch: MqttBatch
    events: int


class IngestService:
    """One ingest worker. ``worker_id`` makes its MQTT client id (and so its persistent
    session) stable across restarts: a restarted worker gets its unacked messages back."""

    def __init__(self, settings: Settings, worker_id: str = "0", *, fleet: Fleet | None = None,
                 transport: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.client_id = f"cityops-ingest-{worker_id}"
        self.transport = transport or settings.ingest_transport
        self.normalizer = Normalizer(fleet or load_fleet(settings.fleet_file), settings)
        self.dedup = DuplicateWindow(settings.ingest_dedup_window_s,
                                     settings.ingest_dedup_max_ids)
        self.stats = IngestStats()
        self.ready = asyncio.Event()  # set once subscribed
        self._stop = asyncio.Event()
        self._failed: BaseException | None = None

    def healthy(self) -> bool:
        return self.ready.is_set() and self._failed is None and not self._stop.is_set()

    def stop(self) -> None:
        """Ask ``run`` to finish: in-flight batches are still acknowledged, then it returns."""
        self._stop.set()

    async def run(self) -> None:
        producer = EventProducer(self.settings, self.client_id)
        await producer.start()
        try:
            async with open_source(self.settings, self.client_id, self.transport) as source:
                self.ready.set()
                log.info("ingest worker %s subscribed", self.worker_id,
                         extra={"fields": {"transport": self.transport,
                                           "client_id": self.client_id}})
                await self._pump(source, producer)
        finally:
            self.ready.clear()
            await producer.stop()
        if self._failed is not None:
            raise self._failed

    async def _pump(self, source: MqttSource, producer: EventProducer) -> None:
        pipeline: asyncio.Queue[_InFlight | None] = asyncio.Queue(PIPELINE_DEPTH)
        acker = asyncio.create_task(self._ack_in_order(source, pipeline))
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
        events, dead = self.normalizer.normalize(batch.messages)
        events, dups = self.dedup.filter(events, int(time.time() * 1000))
        if dups:
            self.stats.duplicates += dups
            metrics.DUPLICATES.inc(dups)
        for d in dead:
            self.stats.deadletters[d.reason] += 1
            metrics.REJECTIONS.labels(d.reason).inc()
        metrics.BATCH_EVENTS.observe(len(events))
        acked: Awaitable[None] = await producer.submit(events, dead)
        return _InFlight(asyncio.ensure_future(acked), batch, len(events))

    async def _ack_in_order(self, source: MqttSource,
                            pipeline: asyncio.Queue[_InFlight | None]) -> None:
        while (item := await pipeline.get()) is not None:
            try:
                await item.acked
            except Exception as exc:
                # Nothing from here on may be acknowledged: the broker keeps it all.
                log.error("Kafka did not acknowledge a batch; stopping without acking it "
                          "(the broker will redeliver)", exc_info=exc)
                self._failed = exc
                self._stop.set()
                while not pipeline.empty():
                    rest = pipeline.get_nowait()
                    if rest is not None:
                        rest.acked.cancel()
                return
            source.ack(item.batch)
            n = len(item.batch.messages)
            self.stats.events += item.events
            self.stats.acked_messages += n
            self.stats.in_flight -= n
            metrics.EVENTS_OUT.inc(item.events)
            metrics.QUEUE_DEPTH.dec(n)
