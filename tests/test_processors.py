"""The processor end to end against the real stack (Kafka broker + PostgreSQL, plain mode).

Each test gets its own topics, consumer group, sensor ids and districts, so it sees only
its own data even though the session's database is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import msgspec
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from cityops.registry import Sensor
from cityops.settings import Settings, Topics
from cityops.stack.kafka import create_topics
from ingest.contract import DeadLetter, Event, encode_batch, encode_deadletter, encode_event
from processors import queries
from processors.batch import Vocabularies, columns
from processors.latest import LatestState
from processors.maintenance import run_maintenance
from processors.rollup import ROLLUPS, aggregate, decode_rollup
from processors.service import Processor
from processors.storage import Storage
from processors.testing import (
    STORED_ROWS,
    make_stream,
    reading_event,
    reference_latest,
    reference_rollups,
    row_keys,
)
from processors.windows import Closed, Grace, WindowCloser
from tests.support import free_port, topic_partitions

ROOT = Path(__file__).resolve().parent.parent


def private(settings: Settings, tag: str, **changes: object) -> Settings:
    topics = Topics(events=f"{tag}.events", deadletter=f"{tag}.deadletter",
                    aggregates=f"{tag}.aggregates", alerts=f"{tag}.alerts")
    values: dict[str, object] = {
        "topics": topics, "process_group": f"{tag}-processors", "process_batch_max": 400,
        "process_batch_linger_ms": 30, "process_close_every_s": 0.2,
        "process_close_quiet_s": 0.5,
        "process_metrics_port": free_port(), **changes}
    return settings.replace(**values)


async def produce(settings: Settings, events: list[Event], extra: list[tuple[str, bytes]] = ()
                  ) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                linger_ms=5)
    await producer.start()
    try:
        futs = [await producer.send(settings.topics.events, encode_event(e),
                                    key=e.sensor_id.encode()) for e in events]
        futs += [await producer.send(topic, value) for topic, value in extra]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def wait_for(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


@contextlib.asynccontextmanager
async def running(settings: Settings, storage: Storage) -> AsyncIterator[Processor]:
    processor = Processor(settings, storage)
    await processor.start()
    stop = asyncio.Event()
    task = asyncio.create_task(processor.run(stop))
    try:
        yield processor
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await processor.stop()


async def db_latest(conn: asyncpg.Connection, tag: str
                    ) -> dict[tuple[str, str], tuple[int, float]]:
    """sensor_latest of a test's sensors as (sensor, metric) -> (event time ms, value)."""
    return {(r["sensor_id"], r["metric"]): (int(r["time"].timestamp() * 1000), r["value"])
            for r in await conn.fetch("select * from sensor_latest where sensor_id like $1",
                                      f"{tag}-%")}


async def count_rows(conn: asyncpg.Connection, tag: str) -> int:
    return int(await conn.fetchval(
        "select count(*) from readings_named where sensor_id like $1", f"{tag}-%"))


async def db_rollups(conn: asyncpg.Connection, tag: str) -> dict[str, dict[tuple, tuple]]:
    out = {}
    for name, (scope, _) in ROLLUPS.items():
        keys = "sensor_id, metric" if scope == "sensor" else "district, domain, metric"
        col = "sensor_id" if scope == "sensor" else "district"
        rows = await conn.fetch(
            f"select bucket, {keys}, n, sum, min, max, mean, p95 from {name} "
            f"where {col} like $1", f"{tag}%")
        out[name] = {(int(r[0].timestamp() * 1000), *tuple(r)[1:-6]): tuple(r)[-6:]
                     for r in rows}
    return out


def assert_rollups_equal(got: dict[str, dict[tuple, tuple]], want: dict[str, dict]) -> None:
    for name, ref in want.items():
        assert set(got[name]) == set(ref), f"{name}: different windows"
        for key, s in ref.items():
            n, total, lo, hi, mean, p95 = got[name][key]
            assert n == s.n, (name, key)
            assert (lo, hi) == (s.min, s.max), (name, key)
            assert total == pytest.approx(s.sum, rel=1e-12, abs=1e-9), (name, key)
            assert mean == pytest.approx(s.mean, rel=1e-12, abs=1e-9), (name, key)
            assert p95 == pytest.approx(s.p95, rel=1e-12, abs=1e-9), (name, key)


async def test_messy_stream_ends_with_exact_rows_rollups_and_latest(settings: Settings) -> None:
    tag = f"t{uuid.uuid4().hex[:8]}"
    # partials are off by default (cityops' alerts compute their own windows); on here,
    # where the test checks what other agencies' consumers would read
    s = private(settings, tag, process_publish_rollups=True)
    await create_topics(s)
    now_ms = int(time.time() * 1000)
    stream = make_stream(tag, now_ms - 60_000)
    distinct = stream.distinct()
    expected_rows = stream.reading_rows()
    assert len(stream.all) > len(distinct)  # the stream does carry duplicates

    letter = DeadLetter(reason="bad_json", detail=f"{tag}: expecting value", mqtt_topic=
                        f"city/x/traffic/lane_detector/{tag}", payload="{not json",
                        received_at=now_ms)
    storage = await Storage.connect(s.pg_dsn, "postgres")
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        async with running(s, storage) as processor:
            await produce(s, stream.first)
            first_rows = row_keys(stream.first)
            await wait_for(lambda: _eq(count_rows(conn, tag), len(first_rows)), 60,
                           "the first phase stored")
            # Phase 2: late readings for windows already rolled up, duplicates, bad input.
            await produce(s, stream.second, extra=[
                (s.topics.events, b'{"v": 1, "event_id": "broken'),
                (s.topics.deadletter, encode_deadletter(letter)),
                (s.topics.deadletter, encode_deadletter(letter))])
            await wait_for(lambda: _eq(count_rows(conn, tag), len(expected_rows)), 60,
                           "all readings stored")
            bad_letters = ("select count(*) from deadletters where service = 'processor' "
                           "and position($1::bytea in payload) > 0")
            try:
                await wait_for(lambda: _eq(conn.fetchval(bad_letters, b'"event_id": "broken'),
                                           1), 30, "the bad event dead-lettered")
            except AssertionError as exc:  # say whether it is missing or there twice
                n = await conn.fetchval(bad_letters, b'"event_id": "broken')
                raise AssertionError(f"{exc} (found {n})") from None
            await wait_for(lambda: _eq(WindowCloser().pending(conn), 0),
                           30, "p95 repairs done")
            # Latest state reaches the table by the periodic flush, before any stop.
            await wait_for(lambda: _eq(db_latest(conn, tag), reference_latest(stream.all)),
                           30, "latest state flushed")
            assert processor.healthy

        # Readings: every (sensor, metric, time) exactly once, with its value.
        rows = await conn.fetch(STORED_ROWS, f"{tag}-%")
        assert len(rows) == len(expected_rows)
        assert {(r[0], r[1], r[2]) for r in rows} == expected_rows
        by_key = {(e.sensor_id, e.event_time): e for e in distinct if e.kind == "reading"}
        for r in rows[:500]:
            assert r[3] == by_key[(r[0], r[2])].measurements[r[1]]

        # Rollups (after late data and p95 repair) equal the plain-Python reference.
        want = reference_rollups(stream.all)
        assert_rollups_equal(await db_rollups(conn, tag), want)

        # Latest state by event time, not by arrival.
        assert await db_latest(conn, tag) == reference_latest(stream.all)

        # Incidents once each; the dead letter once per Kafka message (it was sent twice).
        incidents = {e.event_id for e in distinct if e.kind == "incident"}
        assert await conn.fetchval("select count(*) from incidents where sensor_id like $1",
                                   f"{tag}-%") == len(incidents)
        assert await conn.fetchval("select count(*) from deadletters where detail = $1",
                                   letter.detail) == 2
        # Sensors seen in events joined the registry.
        assert await conn.fetchval("select count(*) from sensors where sensor_id like $1",
                                   f"{tag}-%") == 24

        # The shared queries answer from the same data.
        d0 = f"{tag}_d0"
        start = datetime.fromtimestamp((now_ms - 4 * 3_600_000) / 1000, UTC)
        end = datetime.fromtimestamp(now_ms / 1000, UTC)
        drows = await queries.district_rollups(conn, "1h", start, end, district=d0)
        assert {(int(r["bucket"].timestamp() * 1000), r["district"], r["domain"], r["metric"])
                for r in drows} == {k for k in want["district_rollup_1h"] if k[1] == d0}
        sid = f"{tag}-s001"
        series = await queries.series(conn, sid, "flow", start, end)
        assert [r["value"] for r in series] == [
            e.measurements["flow"] for e in sorted(distinct, key=lambda e: e.event_time)
            if e.sensor_id == sid and e.kind == "reading"]
        assert len(await queries.latest(conn, district=d0)) == len(
            [k for k in reference_latest(stream.all) if k[0] in
             {e.sensor_id for e in distinct if e.district == d0}])

        # The rollup partials on the aggregates topic merge to the same n/sum/min/max.
        merged = await _merged_partials(s, tag)
        for name, ref in want.items():
            assert set(merged[name]) == set(ref), name
            for key, st in ref.items():
                n, total, lo, hi = merged[name][key]
                assert (n, lo, hi) == (st.n, st.min, st.max)
                assert total == pytest.approx(st.sum, rel=1e-9)
    finally:
        await conn.close()
        await storage.close()


async def _eq(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _merged_partials(s: Settings, tag: str) -> dict[str, dict[tuple, list]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: dict[str, dict[tuple, list]] = defaultdict(dict)
    try:
        parts = await topic_partitions(consumer, s.topics.aggregates)
        assert parts
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        deadline = time.monotonic() + 60

        async def behind() -> bool:
            return any([await consumer.position(tp) < off for tp, off in ends.items()])

        while await behind() and time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=1000)
            for recs in got.values():
                for rec in recs:
                    r = decode_rollup(rec.value)
                    name = f"{r.scope}_rollup_{r.window}"
                    key = ((r.bucket, r.sensor_id, r.metric) if r.scope == "sensor"
                           else (r.bucket, r.district, r.domain, r.metric))
                    cur = out[name].get(key)
                    out[name][key] = ([r.n, r.sum, r.min, r.max] if cur is None else
                                      [cur[0] + r.n, cur[1] + r.sum, min(cur[2], r.min),
                                       max(cur[3], r.max)])
    finally:
        await consumer.stop()
    return out


async def test_columnar_records_store_the_same_rows_rollups_latest_and_incidents(
        settings: Settings) -> None:
    """Contract v2 through the processor: gateway-sized columnar records (and, during a
    rolling upgrade, v1 events beside them) store exactly the rows, rollups, latest state
    and incidents of the same stream; places come from the fleet registry."""
    tag = f"t{uuid.uuid4().hex[:8]}"
    s = private(settings, tag)
    await create_topics(s)
    stream = make_stream(tag, int(time.time() * 1000) - 60_000, sensors=12, hours=0.4, seed=29)
    readings = [e for e in stream.all if e.kind == "reading"]
    registry = {e.sensor_id: Sensor(e.sensor_id, e.domain, e.type, e.vendor or "x", e.district,
                                    e.landmark, e.lat, e.lon, e.interval_s) for e in readings}
    values = [(encode_batch(stream.all[i:i + 25]), stream.all[i].sensor_id)
              for i in range(0, len(stream.all) - 40, 25)]
    values += [(encode_event(e), e.sensor_id) for e in stream.all[len(values) * 25:]]
    storage = await Storage.connect(s.pg_dsn, "postgres")
    storage.registry = registry
    conn = await asyncpg.connect(s.pg_dsn)
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        async with running(s, storage) as processor:
            await asyncio.gather(*[await producer.send(s.topics.events, v, key=k.encode())
                                   for v, k in values])
            await wait_for(lambda: _eq(count_rows(conn, tag), len(stream.reading_rows())), 60,
                           "every reading stored")
            await wait_for(lambda: _eq(WindowCloser().pending(conn), 0), 30, "windows closed")
            await wait_for(lambda: _eq(db_latest(conn, tag), reference_latest(stream.all)),
                           30, "latest state flushed")
            assert processor.healthy
        rows = await conn.fetch(STORED_ROWS, f"{tag}-%")
        assert {(r[0], r[1], r[2]) for r in rows} == stream.reading_rows()
        assert_rollups_equal(await db_rollups(conn, tag), reference_rollups(stream.all))
        incidents = {e.event_id for e in stream.distinct() if e.kind == "incident"}
        got = await conn.fetch("select event_id, district from incidents where sensor_id "
                               "like $1", f"{tag}-%")
        assert {r[0] for r in got} == incidents and len(got) == len(incidents)
        assert all(r[1] == registry[e.sensor_id].district for r in got
                   for e in stream.all if e.event_id == r[0])
    finally:
        await producer.stop()
        await conn.close()
        await storage.close()


async def test_same_batch_twice_counts_once(settings: Settings) -> None:
    """A redelivered batch (crash after the DB commit, before the offset commit)."""
    tag = f"t{uuid.uuid4().hex[:8]}"
    stream = make_stream(tag, int(time.time() * 1000), sensors=6, hours=0.2, seed=11)
    storage = await Storage.connect(settings.pg_dsn, "postgres")
    try:
        first = await storage.write(columns(stream.first, storage.vocab, storage.known_sensors))
        again = await storage.write(columns(stream.first, storage.vocab, storage.known_sensors))
        assert first.readings > 0 and again.readings == 0
        assert all(len(g) == 0 for g in again.rollups.values())
        # Half old, half new: only the new half is aggregated.
        mixed = stream.first[: len(stream.first) // 2] + stream.second
        res = await storage.write(columns(mixed, storage.vocab, storage.known_sensors))
        new_rows = row_keys(stream.second) - row_keys(stream.first)
        assert res.readings == len(new_rows)
        assert int(res.rollups["sensor_rollup_1m"].n.sum()) == len(new_rows)
        await WindowCloser().run(storage.conn, everything=True)
        assert_rollups_equal(await db_rollups(storage.conn, tag), reference_rollups(stream.all))
    finally:
        await storage.close()


def test_latest_state_keeps_the_newest_by_event_time_and_marks_only_changes() -> None:
    """The in-memory merge: arrival order does not matter, older readings change nothing."""
    stream = make_stream("lat", 1_800_000_000_000, sensors=8, hours=0.5, seed=5)
    readings = [e for e in stream.all if e.kind == "reading"]
    vocab = Vocabularies()
    state = LatestState(flush_s=3600)
    rng = np.random.default_rng(1)
    for part in np.array_split(rng.permutation(len(readings)), 7):  # shuffled batches
        state.update(columns([readings[i] for i in part.tolist()], vocab, set()))
    sensor = vocab.sensors.lookup(state.keys >> 16).tolist()
    metric = vocab.metrics.lookup(state.keys & 0xFFFF).tolist()
    got = {(s, m): (t, v) for s, m, t, v in zip(sensor, metric, state.time_ms.tolist(),
                                                 state.values.tolist(), strict=True)}
    assert got == reference_latest(readings)
    assert state.pending == len(got) == len(state)
    assert not state.due()  # changed, but the flush period has not passed
    state.dirty[:] = False
    # Replaying everything (a redelivery) or anything older changes no cell.
    assert state.update(columns(readings, vocab, set())) == 0 and state.pending == 0
    newest = max(readings, key=lambda e: e.event_time)
    newer = msgspec.structs.replace(newest, event_id="x" * 32,
                                    event_time=newest.event_time + 1)
    assert state.update(columns([newer], vocab, set())) == len(newer.measurements)
    assert state.pending == len(newer.measurements)
    assert state.due(now=state.last_flush + 3601)


async def test_latest_flush_is_periodic_one_statement_and_never_regresses(
        settings: Settings) -> None:
    """Nothing reaches sensor_latest before the flush is due (or forced); a flush of older
    state (another processor, a restart that replays old readings) does not regress it."""
    tag = f"t{uuid.uuid4().hex[:8]}"
    stream = make_stream(tag, int(time.time() * 1000), sensors=6, hours=0.2, seed=17)
    storage = await Storage.connect(settings.pg_dsn, "postgres", latest_flush_s=3600)
    other = await Storage.connect(settings.pg_dsn, "postgres", latest_flush_s=3600)
    conn = storage.conn
    try:
        res = await storage.write(columns(stream.all, storage.vocab, storage.known_sensors))
        assert res.readings > 0 and "latest" in res.steps
        assert await storage.flush_latest() == 0  # not due yet
        assert await db_latest(conn, tag) == {}
        want = reference_latest(stream.all)
        assert await storage.flush_latest(force=True) == len(want)
        assert await db_latest(conn, tag) == want
        assert await storage.flush_latest(force=True) == 0  # nothing changed since
        # Another processor holding only older readings (a restart replaying old
        # batches, a rebalance overlap) flushes: the SQL guard keeps the newer rows.
        times = sorted(e.event_time for e in stream.all)
        older = [e for e in stream.all if e.event_time < times[len(times) // 2]]
        assert reference_latest(older) != want
        await other.write(columns(older, other.vocab, other.known_sensors))
        assert await other.flush_latest(force=True) > 0
        assert await db_latest(conn, tag) == want
        # Cells written again with the same state are idempotent.
        storage.latest.dirty[:] = True
        await storage.flush_latest(force=True)
        assert await db_latest(conn, tag) == want
        # One row per sensor, however many metrics it reports.
        assert await conn.fetchval(
            "select count(*) from latest_by_sensor l join sensors s on s.sensor_key = l.sensor"
            " where s.sensor_id like $1", f"{tag}%") == len({k[0] for k in want})
        # A flush carrying one newer metric of a sensor replaces that cell only: the
        # sensor's other metrics stay as they were.
        newest = max((e for e in stream.all if len(e.measurements) > 1),
                     key=lambda e: e.event_time)
        metric, value = next(iter(newest.measurements.items()))
        one = msgspec.structs.replace(newest, event_id="y" * 32, measurements={metric: value + 1},
                                      event_time=newest.event_time + 5)
        await other.write(columns([one], other.vocab, other.known_sensors))
        assert await other.flush_latest(force=True) == 1
        assert await db_latest(conn, tag) == {**want, (one.sensor_id, metric): (
            one.event_time, value + 1)}
    finally:
        await storage.close()
        await other.close()


async def test_a_clean_stop_flushes_the_latest_state(settings: Settings) -> None:
    """Latest state changed since the last flush is written when the processor stops,
    however long the flush period."""
    tag = f"t{uuid.uuid4().hex[:8]}"
    stream = make_stream(tag, int(time.time() * 1000), sensors=4, hours=0.1, seed=19)
    storage = await Storage.connect(settings.pg_dsn, "postgres")
    try:
        processor = Processor(settings.replace(process_latest_flush_s=3600.0), storage)
        assert storage.latest.flush_s == 3600.0
        await storage.write(columns(stream.all, storage.vocab, storage.known_sensors))
        await processor.flush_latest()  # not due
        assert await db_latest(storage.conn, tag) == {}
        await processor.stop()
        assert await db_latest(storage.conn, tag) == reference_latest(stream.all)
        assert storage.latest.pending == 0
    finally:
        await storage.close()


def test_numpy_rollups_match_reference_on_random_batches() -> None:
    rng = np.random.default_rng(3)
    for size in (1, 2, 17, 3000):
        tag = f"r{size}"
        stream = make_stream(tag, 1_800_000_000_000, sensors=max(3, size // 200), hours=1.5,
                             incidents=0, late_share=0, dup_share=0, seed=int(rng.integers(99)))
        events = stream.all[:size]
        vocab = Vocabularies()
        b = columns(events, vocab, set())
        got = aggregate(b.sensor_key, b.area_key, b.time_ms, b.values)
        want = reference_rollups(events)
        for name, g in got.items():
            ref = want[name]
            assert len(g) == len(ref)
            for i in range(len(g)):
                m = vocab.metrics.names[int(g.key[i]) & 0xFFFF]
                hi = int(g.key[i]) >> 16
                if name.startswith("sensor"):
                    key = (int(g.bucket_ms[i]), vocab.sensors.names[hi], m)
                else:
                    key = (int(g.bucket_ms[i]), *vocab.areas.names[hi], m)
                s = ref[key]
                assert (int(g.n[i]), g.min[i], g.max[i]) == (s.n, s.min, s.max)
                assert g.sum[i] == pytest.approx(s.sum, rel=1e-12)
                assert g.p95[i] == pytest.approx(s.p95, rel=1e-12, abs=1e-12)


async def test_partman_premakes_and_drops_old_partitions(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        old = datetime.now(UTC) - timedelta(days=settings.retention_days + 5)
        await conn.execute("select partman.create_partition_time('public.readings', $1)",
                           [old])
        part = f"readings_p{old:%Y_%m_%d}"
        assert await conn.fetchval("select to_regclass($1) is not null", part)
        await conn.execute(
            "insert into readings (time, sensor, metric, value, quality) "
            "values ($1, -1, 1, 1, 0)", old)
        done = await run_maintenance(conn, "postgres", settings.retention_days)
        assert "partman.run_maintenance_proc" in done
        assert not await conn.fetchval("select to_regclass($1) is not null", part)
        ahead = datetime.now(UTC) + timedelta(days=3)
        assert await conn.fetchval("select to_regclass($1) is not null",
                                   f"readings_p{ahead:%Y_%m_%d}")
    finally:
        await conn.close()


async def test_kill_9_mid_batch_then_restart_loses_and_duplicates_nothing(
        settings: Settings, tmp_path: Path) -> None:
    tag = f"t{uuid.uuid4().hex[:8]}"
    s = private(settings, tag, process_batch_max=300, process_batch_linger_ms=20)
    await create_topics(s)
    stream = make_stream(tag, int(time.time() * 1000) - 60_000, sensors=24, hours=2.0,
                         interval_s=15, seed=7)
    expected = stream.reading_rows()
    await produce(s, stream.all)
    config = tmp_path / "cityops.toml"
    config.write_text(
        f'host = "{s.host}"\nkafka_port = {s.kafka_port}\npg_port = {s.pg_port}\n'
        f'state_dir = "{s.state_dir}"\nprocess_metrics_port = {s.process_metrics_port}\n'
        f'process_group = "{s.process_group}"\nprocess_batch_max = 300\n'
        f'process_batch_linger_ms = 20\nprocess_close_every_s = 0.2\n'
        f'process_close_quiet_s = 0.5\n'
        f'storage_mode = "postgres"\n'
        f'[topics]\nevents = "{s.topics.events}"\ndeadletter = "{s.topics.deadletter}"\n'
        f'aggregates = "{s.topics.aggregates}"\nalerts = "{s.topics.alerts}"\n')
    env = {**os.environ, "CITYOPS_CONFIG": str(config)}

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "cityops.cli", "process"], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "process.log", "ab"))

    conn = await asyncpg.connect(s.pg_dsn)
    procs = []
    try:
        # Kill -9 twice while batches are being written, at different fill levels.
        for fraction in (0.2, 0.55):
            proc = start()
            procs.append(proc)
            await wait_for(lambda f=fraction: _ge(count_rows(conn, tag), int(len(expected) * f)),
                           90, f"{fraction:.0%} of the rows stored")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        killed_at = await count_rows(conn, tag)
        assert killed_at < len(expected)
        proc = start()
        procs.append(proc)
        await wait_for(lambda: _eq(count_rows(conn, tag), len(expected)), 120, "all rows")
        await wait_for(lambda: _eq(WindowCloser().pending(conn), 0),
                       30, "p95 repairs done")
        url = f"http://127.0.0.1:{s.process_metrics_port}/metrics"
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert "cityops_process_batches_total" in metrics
        assert 'cityops_process_consumer_lag{partition="0"}' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        rows = await conn.fetch(f"select sensor_id, metric, ms, count(*) from ({STORED_ROWS}) r "
                                "group by 1, 2, 3", f"{tag}-%")
        assert {(r[0], r[1], r[2]) for r in rows} == expected
        assert all(r[3] == 1 for r in rows)
        # No batch counted twice in the rollups, none lost: exact against the reference.
        assert_rollups_equal(await db_rollups(conn, tag), reference_rollups(stream.all))
        incidents = {e.event_id for e in stream.distinct() if e.kind == "incident"}
        assert await conn.fetchval("select count(*) from incidents where sensor_id like $1",
                                   f"{tag}-%") == len(incidents)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        await conn.close()
        print((tmp_path / "process.log").read_text()[-4000:])  # shown when the test fails
    log = (tmp_path / "process.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    json.loads(log.strip().splitlines()[0])  # JSON logs


async def _ge(value: Awaitable[int], expected: int) -> bool:
    return await value >= expected


async def test_windows_close_once_when_due_and_late_data_recomputes_only_its_cells(
        settings: Settings) -> None:
    """A window is computed when its grace has passed (not before, unless asked), listed
    as closed, and a late reading then marks only its (sensor, metric) cell: the closer
    rewrites that cell's rows and leaves every other row of the window untouched."""
    tag = f"t{uuid.uuid4().hex[:8]}"
    now_ms = int(time.time() * 1000)
    # Readings over the last 1.5 hours, half of them held back as late data.
    stream = make_stream(tag, now_ms, sensors=6, hours=1.5, interval_s=10, incidents=0,
                         dup_share=0, late_share=0.5, seed=13)
    storage = await Storage.connect(settings.pg_dsn, "postgres")
    conn = storage.conn
    # A topic nobody writes: no partition is active, so the clock decides what has ended.
    closer = WindowCloser(Grace(minute_s=10, hour_s=120, settle_s=0),
                          batch_buckets=10_000, topic=f"{tag}.events")
    try:
        await storage.write(columns(stream.first, storage.vocab, storage.known_sensors))
        minutes = {e.event_time // 60_000 * 60_000 for e in stream.first}
        await closer.run(conn)
        closed = {(r[0], int(r[1].timestamp() * 1000)) for r in await conn.fetch(
            "select window_s, bucket from rollup_closed")}
        current_hour = now_ms // 3_600_000 * 3_600_000
        assert (3600, current_hour) not in closed  # open: left for later
        assert {(60, m) for m in minutes if m + 70_000 < now_ms} <= closed
        assert not {(60, m) for m in minutes if m + 60_000 > now_ms} & closed
        want_first = reference_rollups(stream.first)
        got = await db_rollups(conn, tag)
        ended = {k: v for k, v in want_first["sensor_rollup_1m"].items()
                 if k[0] + 70_000 < now_ms}
        assert ended
        assert_rollups_equal({"sensor_rollup_1m": {k: got["sensor_rollup_1m"][k]
                                                   for k in ended}},
                             {"sensor_rollup_1m": ended})

        # Late data: readings of closed minutes mark their cells, nothing else.
        await storage.closed.refresh(conn)
        # The minute rollups stored are the districts' (a sensor's minute is a view over
        # its readings): a late cell rewrites its district's row of that minute only.
        cells_sql = ("select (extract(epoch from bucket) * 1000)::int8, district, domain, "
                     "metric, ctid::text from district_rollup_1m where district like $1")
        before = {tuple(r[:4]): r[4] for r in await conn.fetch(cells_sql, f"{tag}%")}
        # A few late readings (every 7th), so most cells of the closed minutes are not hit.
        late = [e for e in stream.second
                if e.event_time // 60_000 * 60_000 + 70_000 < now_ms][::7]
        await storage.write(columns(late, storage.vocab, storage.known_sensors))
        cells = await conn.fetch("select bucket, s.sensor_id, m.name from rollup_late l "
                                 "join sensors s on s.sensor_key = l.sensor "
                                 "join metrics m on m.code = l.metric where window_s = 60 "
                                 "and s.sensor_id like $1", f"{tag}-%")
        touched = {(int(r[0].timestamp() * 1000), r[1], r[2]) for r in cells}
        where = {e.sensor_id: (e.district, e.domain) for e in stream.all}
        # one mark per (minute, district, domain, metric) a late reading fell in: the
        # minute's stored rollup is the district's (a sensor's minute is a view)
        late_rows = {(e.event_time // 60_000 * 60_000, *where[e.sensor_id], m)
                     for e in late for m in e.measurements}
        sensor_cells = {(e.event_time // 60_000 * 60_000, e.sensor_id, m)
                        for e in late for m in e.measurements}
        assert len(touched) == len(late_rows) < len(sensor_cells)
        assert {(b, *where[sid], m) for b, sid, m in touched} == late_rows
        pending = {int(r[0].timestamp() * 1000) for r in await conn.fetch(
            "select bucket from rollup_pending where window_s = 60")}
        assert not pending & {b for b, _, _ in touched}  # no closed minute re-opened whole
        await closer.run(conn)
        after = {tuple(r[:4]): r[4] for r in await conn.fetch(cells_sql, f"{tag}%")}
        rewritten = {k for k in after if before.get(k) != after[k]}
        touched_rows = late_rows
        # Only the touched cells' district rows were written (a late reading can add one),
        # and the others (most of the closed minutes' rows) kept their row version.
        assert rewritten and rewritten <= touched_rows and set(before) - touched_rows

        # Everything computed (the open windows too, as an idle processor does): exact.
        await storage.write(columns(stream.second, storage.vocab, storage.known_sensors))
        await closer.run(conn, everything=True)
        assert await closer.pending(conn) == 0
        assert_rollups_equal(await db_rollups(conn, tag), reference_rollups(stream.all))
        assert (3600, current_hour) not in {(r[0], int(r[1].timestamp() * 1000)) for r in
                                            await conn.fetch("select window_s, bucket "
                                                             "from rollup_closed")}
    finally:
        await storage.close()


async def test_a_long_window_close_does_not_hold_back_batches(settings: Settings) -> None:
    """Closing a busy minute is one long statement; batches are stored meanwhile (the
    closer runs beside the consume loop, on its own connection)."""
    tag = f"t{uuid.uuid4().hex[:8]}"
    s = private(settings, tag)
    await create_topics(s)
    stream = make_stream(tag, int(time.time() * 1000) - 60_000, sensors=4, hours=0.05,
                         incidents=0, seed=41)
    storage = await Storage.connect(s.pg_dsn, "postgres")
    conn = await asyncpg.connect(s.pg_dsn)
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def endless_close(conn: asyncpg.Connection, *, everything: bool = False) -> Closed:
        entered.set()
        await gate.wait()  # a close that lasts as long as this test wants
        return Closed()

    try:
        async with running(s, storage) as processor:
            processor.closer.run = endless_close  # type: ignore[method-assign]
            await asyncio.wait_for(entered.wait(), 10)
            await produce(s, stream.all)
            await wait_for(lambda: _eq(count_rows(conn, tag), len(stream.reading_rows())), 20,
                           "readings stored while a close runs")
            gate.set()
    finally:
        await conn.close()
        await storage.close()


async def test_windows_close_when_every_partition_is_past_them(settings: Settings) -> None:
    """Event time decides: a partition still working through minutes 5-9 holds them open
    although another partition and the clock are long past them, so its readings there
    are not late data; they close once it passes them too."""
    tag = f"t{uuid.uuid4().hex[:8]}"
    topic = f"{tag}.events"
    t0 = (int(time.time() * 1000) // 3_600_000 - 3) * 3_600_000  # three hours ago
    minute = 60_000

    def readings(sid: str, start: int, end: int) -> list[Event]:
        return [reading_event(sid, f"{tag}_d", "traffic", t, {"flow": float(t % 97)})
                for t in range(start, end, 20_000)]

    storage = await Storage.connect(settings.pg_dsn, "postgres")
    conn = storage.conn
    closer = WindowCloser(Grace(minute_s=10, hour_s=120, settle_s=0), batch_buckets=10_000,
                          topic=topic)

    async def closed_minutes() -> set[int]:
        return {(int(r[0].timestamp() * 1000) - t0) // minute for r in await conn.fetch(
            "select bucket from rollup_closed where window_s = 60 and bucket >= $1 and "
            "bucket < $2", datetime.fromtimestamp(t0 / 1000, UTC),
            datetime.fromtimestamp((t0 + 3_600_000) / 1000, UTC))}

    try:
        ahead = readings(f"{tag}-a", t0, t0 + 10 * minute)
        behind = readings(f"{tag}-b", t0, t0 + 5 * minute)
        await storage.write(columns(ahead, storage.vocab, storage.known_sensors),
                            watermarks={(topic, 0): t0 + 10 * minute})
        await storage.write(columns(behind, storage.vocab, storage.known_sensors),
                            watermarks={(topic, 1): t0 + 5 * minute})
        await closer.run(conn)
        assert await closed_minutes() == {0, 1, 2, 3}  # minute 4 ends at 5:00 + 10 s grace
        await storage.closed.refresh(conn)
        rest = readings(f"{tag}-b", t0 + 5 * minute, t0 + 10 * minute)
        await storage.write(columns(rest, storage.vocab, storage.known_sensors),
                            watermarks={(topic, 1): t0 + 10 * minute})
        assert not await conn.fetchval(
            "select count(*) from rollup_late l join sensors s on s.sensor_key = l.sensor "
            "where s.sensor_id like $1", f"{tag}-%")
        await closer.run(conn)
        assert await closed_minutes() == set(range(9))
        assert_rollups_equal({"sensor_rollup_1m": {k: v for k, v in (await db_rollups(
            conn, tag))["sensor_rollup_1m"].items() if k[0] < t0 + 9 * minute}},
            {"sensor_rollup_1m": {k: v for k, v in reference_rollups(
                ahead + behind + rest)["sensor_rollup_1m"].items() if k[0] < t0 + 9 * minute}})
    finally:
        await storage.close()


async def test_partitions_are_kept_without_partman(settings: Settings) -> None:
    """The fallback when pg_partman is not installed: daily partitions ahead, old ones dropped."""
    from processors.maintenance import _fallback_partitions

    admin = await asyncpg.connect(settings.pg_dsn)
    db = f"nopartman_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"create database {db}")
    conn = await asyncpg.connect(settings.pg_dsn.rsplit("/", 1)[0] + f"/{db}")
    try:
        for table in ("readings", "incidents"):
            await conn.execute(f"create table {table} (time timestamptz not null) "
                               "partition by range (time)")
        now = datetime(2026, 3, 10, 12, tzinfo=UTC)
        await conn.execute("create table readings_p2026_01_01 partition of readings "
                           "for values from ('2026-01-01') to ('2026-01-02')")
        done = await _fallback_partitions(conn, 30, now)
        assert "dropped readings_p2026_01_01" in done
        parts = {r[0] for r in await conn.fetch(
            "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid")}
        days = [f"2026_03_{d:02d}" for d in range(9, 14)]
        assert parts == {f"{t}_p{d}" for t in ("readings", "incidents") for d in days}
        assert await _fallback_partitions(conn, 30, now) == []  # idempotent
    finally:
        await conn.close()
        await admin.execute(f"drop database {db}")
        await admin.close()
