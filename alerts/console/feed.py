"""The live feed: alert and incident changes from their topics, fanned out to every open
console.

One Kafka consumer per console process (no group: every console sees every change),
starting at the end of the topic; each browser stream gets its own bounded queue. A
browser too slow to keep up loses its queue and is told to reload (the page then
fetches the current list), instead of making the feed hold memory for it. A record is
checked once here and passed on as the bytes it came in (``Item``: the SSE event name and
the JSON), so a thousand open consoles cost one decode, not a thousand encodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer

from alerts.incidents.model import decode_incident_change
from alerts.model import decode_change
from cityops.settings import Settings

log = logging.getLogger(__name__)
Item = tuple[bytes, bytes]  # (SSE event name: b"alert" | b"incident", the change's JSON)


class Subscription:
    def __init__(self, size: int = 1000) -> None:
        self.queue: asyncio.Queue[Item | None] = asyncio.Queue(size)
        self.overflowed = False


class AlertFeed:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subscribers: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        topics = self.settings.topics
        self._events = {topics.alerts: (b"alert", decode_change),
                        topics.incidents: (b"incident", decode_incident_change)}
        self._consumer = AIOKafkaConsumer(
            topics.alerts, topics.incidents, bootstrap_servers=self.settings.kafka_bootstrap,
            auto_offset_reset="latest", enable_auto_commit=False)
        await self._consumer.start()
        await self._consumer.seek_to_end()
        for tp in self._consumer.assignment():  # resolve positions now, not at first fetch
            await self._consumer.position(tp)
        self.ready.set()
        self._task = asyncio.create_task(self._run(), name="alert-feed")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer:
            await self._consumer.stop()
        for sub in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)

    def subscribe(self) -> Subscription:
        sub = Subscription()
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    async def _run(self) -> None:
        assert self._consumer
        while True:
            batch = await self._consumer.getmany(timeout_ms=1000, max_records=1000)
            for tp, msgs in batch.items():
                event, decode = self._events[tp.topic]
                for m in msgs:
                    try:
                        decode(m.value)
                    except Exception as exc:
                        log.warning("undecodable change skipped", extra={"fields": {
                            "topic": tp.topic, "offset": m.offset, "error": str(exc)}})
                        continue
                    self.publish_local((event, m.value))

    def publish_local(self, item: Item) -> None:
        for sub in list(self.subscribers):
            try:
                sub.queue.put_nowait(item)
            except asyncio.QueueFull:
                sub.overflowed = True
                self.subscribers.discard(sub)
