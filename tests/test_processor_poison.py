"""Poison records on the consuming side, through the real stack (Kafka + PostgreSQL).

A record the database refuses must cost that one record, never the stream: the
processor stays up, the record is parked (raw Kafka bytes, where it was, the error) in
the same transaction as the rest of its batch, its offset is committed, and every good
record around it is stored exactly once. A dead letter is stored losslessly whatever
bytes it carries (a NUL byte once stopped storage for the whole city).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from cityops.settings import Settings
from cityops.stack.servers import create_topics
from ingest.contract import DeadLetter, encode_deadletter
from processors.service import Processor
from processors.storage import Storage
from processors.testing import make_stream
from tests.test_processors import count_rows, private, produce

NUL_PAYLOAD = '{"sensor": "a\x00b", "v": 1}'


@contextlib.asynccontextmanager
async def running(settings: Settings, storage: Storage
                  ) -> AsyncIterator[tuple[Processor, asyncio.Task[None]]]:
    """The processor's loop in a task the test can watch (a dead loop fails at once)."""
    processor = Processor(settings, storage)
    await processor.start()
    stop = asyncio.Event()
    task = asyncio.create_task(processor.run(stop))
    try:
        yield processor, task
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await processor.stop()


async def until(task: asyncio.Task[None], check: object, within: float, what: str) -> None:
    """Wait for ``check()``; a processor loop that ended meanwhile fails the test at once."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if task.done():
            exc = task.exception()
            raise AssertionError(f"the processor loop ended while waiting for {what}: "
                                 f"{type(exc).__name__}: {exc}")
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


async def committed_past_end(s: Settings, topics: list[str]) -> bool:
    """Whether the processors' group has committed every partition of ``topics`` up to its
    end offset (nothing left to redeliver after a restart)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap)
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(s.process_group)
        parts = [TopicPartition(t, p) for t in topics
                 for p in (consumer.partitions_for_topic(t) or await _partitions(consumer, t))]
        ends = await consumer.end_offsets(parts)
        return all(end == 0 or (tp in committed and committed[tp].offset >= end)
                   for tp, end in ends.items())
    finally:
        await consumer.stop()
        await admin.close()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer.topics()  # loads the cluster metadata
    return consumer.partitions_for_topic(topic) or set()


async def test_nul_byte_dead_letter_is_stored_losslessly_and_the_stream_goes_on(
        settings: Settings) -> None:
    tag = f"t{uuid.uuid4().hex[:8]}"
    s = private(settings, tag)
    await create_topics(s)
    now_ms = int(time.time() * 1000)
    stream = make_stream(tag, now_ms - 60_000, sensors=6, hours=0.3, seed=21)
    expected = stream.reading_rows()
    letter = DeadLetter(reason="bad_json", detail=f"{tag}: NUL\x00in detail",
                        mqtt_topic=f"city/x/\x00/{tag}", payload=NUL_PAYLOAD,
                        received_at=now_ms, sensor_id=f"{tag}-\x00")
    storage = await Storage.connect(s.pg_dsn, "postgres")
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        async with running(s, storage) as (processor, task):
            half = len(stream.all) // 2
            await produce(s, stream.all[:half],
                          extra=[(s.topics.deadletter, encode_deadletter(letter))])
            await produce(s, stream.all[half:])

            async def all_stored() -> bool:
                return await count_rows(conn, tag) == len(expected)

            await until(task, all_stored, 60, "every good reading stored")

            async def letter_stored() -> bool:
                return bool(await conn.fetchval(
                    "select count(*) from deadletters where mqtt_topic like $1", f"%/{tag}"))

            await until(task, letter_stored, 30, "the NUL dead letter stored")
            assert processor.healthy

            async def committed() -> bool:
                return await committed_past_end(s, [s.topics.events, s.topics.deadletter])

            await until(task, committed, 30, "offsets committed past the dead letter")
        row = await conn.fetchrow("select * from deadletters where mqtt_topic like $1",
                                  f"%/{tag}")
        assert bytes(row["payload"]) == NUL_PAYLOAD.encode()  # raw bytes, lossless
        assert "\x00" not in row["detail"] and "\x00" not in row["mqtt_topic"]
        assert row["detail"] == f"{tag}: NUL\\x00in detail"  # escaped, still readable
        assert row["sensor_id"] == f"{tag}-\\x00"
        assert await count_rows(conn, tag) == len(expected)
    finally:
        await conn.close()
        await storage.close()
