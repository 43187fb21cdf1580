"""Poison records on the consuming side, through the real stack (Kafka + PostgreSQL).

A record the database refuses must cost that one record, never the stream: the
processor stays up, the record is parked (raw Kafka bytes, where it was, the error) in
the same transaction as the rest of its batch, its offset is committed, and every good
record around it is stored exactly once. A dead letter is stored losslessly whatever
bytes it carries (a NUL byte once stopped storage for the whole city).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from cityops.settings import Settings
from cityops.stack.kafka import create_topics
from ingest.contract import DeadLetter, encode_deadletter, encode_event
from processors import queries
from processors.batch import columns
from processors.service import Processor
from processors.storage import Storage, StoredDeadLetter
from processors.testing import STORED_ROWS, make_stream, reference_latest, reference_rollups
from processors.windows import WindowCloser
from tests.test_processors import (
    assert_rollups_equal,
    count_rows,
    db_rollups,
    private,
    produce,
)

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
        # The shared query still answers text: base64 when the bytes hold a NUL.
        shown = [r for r in await queries.deadletters(conn, "bad_json", 10_000)
                 if r["mqtt_topic"].endswith(f"/{tag}")]
        assert [(r["payload_encoding"], base64.b64decode(r["payload"])) for r in shown] == [
            ("base64", NUL_PAYLOAD.encode())]
        assert bytes(shown[0]["payload_bytes"]) == NUL_PAYLOAD.encode()
        assert await conn.fetchval("select count(*) from parked where consumer_group = $1",
                                   s.process_group) == 0
    finally:
        await conn.close()
        await storage.close()


async def test_poison_records_are_parked_and_every_good_record_is_stored(
        settings: Settings) -> None:
    """Records the database refuses for different reasons, amid good traffic."""
    from prometheus_client import REGISTRY

    tag = f"t{uuid.uuid4().hex[:8]}"
    s = private(settings, tag)
    await create_topics(s)
    now_ms = int(time.time() * 1000)
    stream = make_stream(tag, now_ms - 60_000, sensors=6, hours=0.3, seed=23)
    expected = stream.reading_rows()
    model = stream.all[0]
    incident = next(e for e in stream.all if e.kind == "incident")
    poison = {
        # A NUL in a reading's sensor id: the registry refuses the sensor, so the reading
        # has no sensor key to be stored under.
        "UnresolvedKey": (s.topics.events, encode_event(msgspec.structs.replace(
            model, event_id=uuid.uuid4().hex, sensor_id=f"{tag}-s\x00x", event_time=now_ms - 9))),
        # A NUL inside a text column of an incident: the server refuses it.
        "CharacterNotInRepertoireError": (s.topics.events, encode_event(msgspec.structs.replace(
            incident, event_id=uuid.uuid4().hex, landmark="l\x00x", event_time=now_ms - 7))),
        # A dead letter received in the year 3 million: no timestamptz for it.
        "dead letter": (s.topics.deadletter, encode_deadletter(DeadLetter(
            reason="bad_json", detail=f"{tag} far future", mqtt_topic=f"city/{tag}",
            payload="x", received_at=10 ** 17))),
    }

    def parked_total(topic: str) -> float:
        return REGISTRY.get_sample_value("cityops_process_parked_total",
                                         {"topic": topic}) or 0.0

    before = {t: parked_total(t) for t in (s.topics.events, s.topics.deadletter)}
    storage = await Storage.connect(s.pg_dsn, "postgres")
    conn = await asyncpg.connect(s.pg_dsn)
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        async with running(s, storage) as (processor, task):
            half = len(stream.all) // 2
            await produce(s, stream.all[:half])
            sent = {}
            for name, (topic, value) in poison.items():
                sent[name] = (value, await (await producer.send(topic, value)))
            # Outside the contract (quality past 16 bits): refused at decode, dead-lettered.
            await producer.send_and_wait(s.topics.events, encode_event(msgspec.structs.replace(
                model, event_id=uuid.uuid4().hex, event_time=now_ms - 5, quality=2 ** 40)))
            await produce(s, stream.all[half:])

            async def all_stored() -> bool:
                return await count_rows(conn, tag) == len(expected)

            await until(task, all_stored, 60, "every good reading stored")

            async def all_parked() -> bool:
                return await conn.fetchval("select count(*) from parked where "
                                           "consumer_group = $1", s.process_group) == 3

            await until(task, all_parked, 30, "the three poison records parked")

            async def committed() -> bool:
                return await committed_past_end(s, [s.topics.events, s.topics.deadletter])

            await until(task, committed, 30, "offsets committed past the poison")

            async def repaired() -> bool:
                return await WindowCloser().pending(conn) == 0

            await until(task, repaired, 30, "p95 repairs done")
            assert processor.healthy and not task.done()

        # Every good reading exactly once; the rollups count nothing twice or lost (the
        # isolating savepoints start from empty staging tables).
        rows = await conn.fetch(f"select sensor_id, metric, ms, count(*) from ({STORED_ROWS}) r "
                                "group by 1, 2, 3", f"{tag}-%")
        assert {(r[0], r[1], r[2]) for r in rows} == expected and all(r[3] == 1 for r in rows)
        assert_rollups_equal(await db_rollups(conn, tag), reference_rollups(stream.all))
        # Latest state holds committed readings only: the parked reading never became
        # latest (nor stuck the flushes); the out-of-contract one below neither.
        latest = {(r["sensor_id"], r["metric"]): (int(r["time"].timestamp() * 1000), r["value"])
                  for r in await conn.fetch("select * from sensor_latest where sensor_id "
                                            "like $1", f"{tag}-%")}
        assert latest == reference_latest(stream.all)
        # Each poison record parked once: raw Kafka bytes, where it was, why.
        parked = {(r["topic"], r["kafka_partition"], r["kafka_offset"]): r for r in
                  await conn.fetch("select * from parked where consumer_group = $1",
                                   s.process_group)}
        for name, (value, meta) in sent.items():
            row = parked[(meta.topic, meta.partition, meta.offset)]
            assert bytes(row["payload"]) == value
            assert row["service"] == "processor" and row["error"]
            want = "OverflowError" if name == "dead letter" else name
            assert row["error_class"] == want, (name, row["error"])
        assert parked_total(s.topics.events) - before[s.topics.events] == 2
        assert parked_total(s.topics.deadletter) - before[s.topics.deadletter] == 1
        assert not await conn.fetchval("select count(*) from deadletters where detail = $1",
                                       f"{tag} far future")
        assert await conn.fetchval(
            "select count(*) from deadletters where service = 'processor' and reason = "
            "'bad_event' and detail like '%$.quality%' and position($1::bytea in payload) > 0",
            model.sensor_id.encode()) == 1
    finally:
        await producer.stop()
        await conn.close()
        await storage.close()


async def test_migration_turns_stored_text_payloads_into_their_bytes(settings: Settings) -> None:
    """Rows stored before migration 0007 keep their payload: utf-8 text as its UTF-8 bytes,
    base64 as the bytes it encoded, a malformed base64 as the text it was."""
    from processors.schema import migrate, migration_files

    admin = await asyncpg.connect(settings.pg_dsn)
    db = f"mig0007_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"create database {db}")
    dsn = settings.pg_dsn.rsplit("/", 1)[0] + f"/{db}"
    conn = await asyncpg.connect(dsn)
    try:
        for version, _, path in migration_files("postgres"):
            if version < 7:
                await conn.execute(path.read_text().replace("{{retention_days}}", "30"))
        await conn.execute("create table schema_migrations (version int not null, name text "
                           "not null, mode text not null, applied_at timestamptz not null "
                           "default now(), primary key (version, name))")
        await conn.executemany("insert into schema_migrations (version, name, mode) "
                               "values ($1, $2, 'postgres')",
                               [(v, n) for v, n, _ in migration_files("postgres") if v < 7])
        old = [("héllo {", "utf-8"), (base64.b64encode(b"\xff\x00raw").decode(), "base64"),
               ("not base64!", "base64")]
        await conn.executemany(
            "insert into deadletters (received_at, reason, detail, mqtt_topic, payload, "
            "payload_encoding, kafka_partition, kafka_offset) "
            "values (now(), 'bad_json', '', '', $1, $2, 0, $3)",
            [(p, e, i) for i, (p, e) in enumerate(old)])
        assert await migrate(dsn, "postgres") == "postgres"
        got = [bytes(r[0]) for r in await conn.fetch(
            "select payload from deadletters order by kafka_offset")]
        assert got == ["héllo {".encode(), b"\xff\x00raw", b"not base64!"]
        shown = [tuple(r) for r in await conn.fetch(
            "select p.payload, p.payload_encoding from deadletters d, "
            "lateral deadletter_payload(d.payload) p order by d.kafka_offset")]
        assert shown == [("héllo {", "utf-8"),
                         (base64.b64encode(b"\xff\x00raw").decode(), "base64"),
                         ("not base64!", "utf-8")]
    finally:
        await conn.close()
        await admin.execute(f"drop database {db}")
        await admin.close()


async def test_dead_letters_of_two_topics_at_the_same_offset_are_both_stored(
        settings: Settings) -> None:
    """The idempotency key of a stored dead letter names its topic: partition and offset
    alone repeat across topics (another agency's, a recreated one), and a letter dropped
    as a 'duplicate' of another topic's is lost in silence."""
    tag = f"t{uuid.uuid4().hex[:8]}"
    storage = await Storage.connect(settings.pg_dsn, "postgres")
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        now = int(time.time() * 1000)
        letters = [StoredDeadLetter(f"{tag}.{name}", 0, 7, DeadLetter(
            reason="bad_json", detail=f"{tag} {name}", mqtt_topic="city/x", payload="{",
            received_at=now)) for name in ("deadletter", "other-deadletter")]
        result = await storage.write(columns([], storage.vocab, storage.known_sensors),
                                     letters)
        again = await storage.write(columns([], storage.vocab, storage.known_sensors),
                                    letters)  # a redelivery stores nothing twice
        rows = await conn.fetch("select kafka_topic, detail from deadletters "
                                "where detail like $1 order by kafka_topic", f"{tag} %")
        assert [r["kafka_topic"] for r in rows] == [f"{tag}.deadletter",
                                                    f"{tag}.other-deadletter"]
        assert (result.deadletters, again.deadletters) == (2, 0)
    finally:
        await conn.close()
        await storage.close()
