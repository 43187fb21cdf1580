"""The TimescaleDB test server (PGlite behind tests/tooling/pglite/server.mjs) works
through asyncpg the way the storage layer uses it: plain and prepared queries,
pools, binary COPY, transactions that survive a dying client, and TimescaleDB's
hypertables, continuous aggregates, compression and retention.

One in-memory server is shared by the module; a second, short-lived one checks
that a data directory survives a restart.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

try:
    from tests.tooling.timescale import TimescaleServer
except ModuleNotFoundError:  # pytest run with tests/ (not the repo root) on sys.path
    from tooling.timescale import TimescaleServer

LOCK_TIMEOUT_S = 5.0


class _Rollback(Exception):
    """Raised inside `conn.transaction()` to make asyncpg roll it back."""


@pytest.fixture(scope="module")
def server() -> Iterator[TimescaleServer]:
    with TimescaleServer(lock_timeout_s=LOCK_TIMEOUT_S) as ts:
        yield ts


@pytest_asyncio.fixture
async def conn(server: TimescaleServer) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(server.dsn)
    try:
        yield c
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_simple_and_extended_queries(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("select 1") == 1
    assert await conn.fetchval("select $1::int + $2::int", 40, 2) == 42
    rows = await conn.fetch(
        "select g, g * $1::float8 as x from generate_series(1, $2::int) g", 0.5, 3
    )
    assert [(r["g"], r["x"]) for r in rows] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert await conn.fetchval("show server_version") == "17.5"
    assert await conn.fetchval("show TimeZone") == "UTC"
    stmt = await conn.prepare("select $1::text || '!'")
    assert [await stmt.fetchval(s) for s in ("a", "b")] == ["a!", "b!"]
    # a large parameter message (well over the 16 KB batch size) goes through whole
    big = list(range(100_000))
    assert await conn.fetchval("select sum(x) from unnest($1::int8[]) x", big) == sum(big)
    await conn.execute("create table if not exists em(id int primary key, v text)")
    await conn.executemany("insert into em values ($1, $2)", [(i, f"v{i}") for i in range(500)])
    assert await conn.fetchval("select count(*) from em") == 500


@pytest.mark.asyncio
async def test_sql_errors_are_exceptions_and_connection_survives(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await conn.execute("selec 1")
    with pytest.raises(asyncpg.UndefinedTableError):
        await conn.fetch("select * from no_such_table where x = $1", 1)
    await conn.execute("create table if not exists uq(id int primary key)")
    with pytest.raises(asyncpg.UniqueViolationError):
        async with conn.transaction():
            await conn.execute("insert into uq values (1)")
            await conn.execute("insert into uq values (1)")
    assert await conn.fetchval("select count(*) from uq") == 0
    assert await conn.fetchval("select $1::int", 7) == 7


@pytest.mark.asyncio
async def test_prepared_statement_names_do_not_collide(server: TimescaleServer) -> None:
    a = await asyncpg.connect(server.dsn)
    b = await asyncpg.connect(server.dsn)
    try:
        sa = await a.prepare("select 'from a'", name="same_name")
        sb = await b.prepare("select 'from b'", name="same_name")
        assert await sa.fetchval() == "from a"
        assert await sb.fetchval() == "from b"
        await b.close()  # Terminate closes only b
        assert await sa.fetchval() == "from a"
        assert await a.fetchval("select 1") == 1
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_pool_of_four_concurrent_transactions(server: TimescaleServer) -> None:
    async with asyncpg.create_pool(server.dsn, min_size=1, max_size=4) as pool:
        seen_pids: set[int] = set()

        async def worker(n: int) -> None:
            for round_ in range(5):
                async with pool.acquire() as c:
                    seen_pids.add(c.get_server_pid())
                    async with c.transaction():
                        await c.execute("create temp table scratch(v int) on commit drop")
                        mine = [n * 100 + round_ * 10 + i for i in range(5)]
                        await c.executemany("insert into scratch values ($1)", [(v,) for v in mine])
                        await asyncio.sleep(0.01)  # let the others try to run meanwhile
                        got = [r["v"] for r in await c.fetch("select v from scratch order by v")]
                        assert got == mine, f"worker {n} saw another transaction's rows"
                        assert await c.fetchval("select $1::int * 2", n) == n * 2

        await asyncio.gather(*(worker(n) for n in range(4)))
        assert len(seen_pids) == 4  # four separate client connections were in use


@pytest.mark.asyncio
async def test_reset_all_keeps_search_path_usable(server: TimescaleServer) -> None:
    async with asyncpg.create_pool(server.dsn, min_size=1, max_size=1) as pool:
        async with pool.acquire() as c:
            await c.execute("create table if not exists reset_probe(x int)")
            await c.execute("insert into reset_probe values (1)")
            await c.execute("set search_path to pg_catalog")
        # release sent RESET ALL; the reused connection resolves unqualified names
        async with pool.acquire() as c:
            assert await c.fetchval("show search_path") == "public"
            assert await c.fetchval("select count(*) from reset_probe") == 1
            await c.execute("RESET ALL")
            assert await c.fetchval("select count(*) from reset_probe") == 1
            assert await c.fetchval("show TimeZone") == "UTC"


@pytest.mark.asyncio
async def test_binary_copy_50k_rows(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "create table copy_target(ts timestamptz, sensor int, value float8, label text)"
    )
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    n = 50_000
    records = [(t0 + timedelta(seconds=i), i % 97, i * 0.5, f"s{i % 7}") for i in range(n)]
    start = time.perf_counter()
    result = await conn.copy_records_to_table("copy_target", records=records)
    elapsed = time.perf_counter() - start
    print(f"binary COPY through the shim: {n / elapsed:,.0f} rows/s")
    assert result == f"COPY {n}"
    assert await conn.fetchval("select count(*) from copy_target") == n
    assert await conn.fetchval("select sum(sensor) from copy_target") == sum(r[1] for r in records)
    assert await conn.fetchval("select max(ts) from copy_target") == records[-1][0]
    # COPY inside a transaction that is rolled back leaves nothing behind
    with pytest.raises(_Rollback):
        async with conn.transaction():
            await conn.copy_records_to_table("copy_target", records=records[:10])
            assert await conn.fetchval("select count(*) from copy_target") == n + 10
            raise _Rollback
    assert await conn.fetchval("select count(*) from copy_target") == n


@pytest.mark.asyncio
async def test_copy_to_table_csv_and_copy_out(conn: asyncpg.Connection) -> None:
    await conn.execute("create table csv_target(id int, name text)")
    source = io.BytesIO(b'id,name\n1,alpha\n2,"b,eta"\n3,gamma\n')
    result = await conn.copy_to_table("csv_target", source=source, format="csv", header=True)
    assert result == "COPY 3"
    rows = await conn.fetch("select id, name from csv_target order by id")
    assert [tuple(r) for r in rows] == [(1, "alpha"), (2, "b,eta"), (3, "gamma")]
    # a failing COPY is an exception and the connection keeps working
    with pytest.raises(asyncpg.InvalidTextRepresentationError):
        await conn.copy_to_table("csv_target", source=io.BytesIO(b"x,y\n"), format="csv")
    out = io.BytesIO()
    await conn.copy_from_table("csv_target", output=out, format="csv")
    assert out.getvalue().splitlines()[0] == b"1,alpha"


@pytest.mark.asyncio
async def test_killed_client_mid_transaction_is_rolled_back(
    server: TimescaleServer, conn: asyncpg.Connection
) -> None:
    await conn.execute("create table if not exists kill_probe(x int)")
    child_code = textwrap.dedent(
        """
        import asyncio, sys, asyncpg
        async def main():
            c = await asyncpg.connect(sys.argv[1])
            tr = c.transaction()
            await tr.start()
            await c.execute("insert into kill_probe values (42)")
            print("in-transaction", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", child_code, server.dsn, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
        assert line.strip() == b"in-transaction"
        # this query queues behind the child's open transaction ...
        waiting = asyncio.ensure_future(conn.fetchval("select count(*) from kill_probe"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        child.kill()  # ... until the child dies; its insert is rolled back
        assert await asyncio.wait_for(waiting, timeout=LOCK_TIMEOUT_S) == 0
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert await conn.fetchval("select count(*) from kill_probe") == 0


@pytest.mark.asyncio
async def test_waiting_too_long_for_the_session_is_an_error(
    server: TimescaleServer, conn: asyncpg.Connection
) -> None:
    other = await asyncpg.connect(server.dsn)
    try:
        async with conn.transaction():
            await conn.execute("select 1")
            with pytest.raises(asyncpg.LockNotAvailableError, match="single PGlite session"):
                await other.fetchval("select 1")
        assert await other.fetchval("select 2") == 2  # usable once the session is free
    finally:
        await other.close()


@pytest.mark.asyncio
async def test_timescaledb_features(conn: asyncpg.Connection) -> None:
    await conn.execute("create extension if not exists timescaledb")
    assert await conn.fetchval("select extversion from pg_extension where extname='timescaledb'")
    await conn.execute(
        "create table metrics(time timestamptz not null, sensor_id int, value float8)"
    )
    await conn.execute("select create_hypertable('metrics', by_range('time', interval '1 day'))")
    # 10 days of data ending now, one row per sensor every 10 minutes
    now = datetime.now(UTC).replace(microsecond=0)
    records = [
        (now - timedelta(minutes=10 * i), s, float(i % 50))
        for i in range(10 * 144)
        for s in (1, 2, 3)
    ]
    await conn.copy_records_to_table("metrics", records=records)
    total = len(records)
    assert await conn.fetchval("select count(*) from metrics") == total
    assert await conn.fetchval("select count(*) from show_chunks('metrics')") >= 10

    buckets = await conn.fetch(
        "select time_bucket('1 day', time) b, sensor_id, count(*) n from metrics "
        "where sensor_id = $1 group by 1, 2 order by 1",
        1,
    )
    assert sum(r["n"] for r in buckets) == total // 3

    await conn.execute(
        """
        create materialized view metrics_hourly with (timescaledb.continuous) as
        select time_bucket('1 hour', time) as bucket, sensor_id, avg(value) as avg_value,
               count(*) as n
        from metrics group by 1, 2 with no data
        """
    )
    await conn.execute(
        "alter materialized view metrics_hourly set (timescaledb.materialized_only = true)"
    )
    assert await conn.fetchval("select count(*) from metrics_hourly") == 0
    await conn.execute("call refresh_continuous_aggregate('metrics_hourly', null, null)")
    assert await conn.fetchval("select sum(n) from metrics_hourly") == total

    await conn.execute(
        "alter table metrics set (timescaledb.compress, "
        "timescaledb.compress_segmentby = 'sensor_id', timescaledb.compress_orderby = 'time')"
    )
    compressed = await conn.fetch(
        "select compress_chunk(c) from show_chunks('metrics', older_than => interval '2 days') c"
    )
    assert compressed
    assert await conn.fetchval(
        "select count(*) from timescaledb_information.chunks "
        "where hypertable_name = 'metrics' and is_compressed"
    ) == len(compressed)
    assert await conn.fetchval("select count(*) from metrics") == total  # still readable

    dropped = await conn.fetch("select drop_chunks('metrics', older_than => interval '8 days')")
    assert dropped
    after_drop = await conn.fetchval("select count(*) from metrics")
    assert 0 < after_drop < total
    assert await conn.fetchval("select min(time) from metrics") >= now - timedelta(days=9)

    job_id = await conn.fetchval("select add_retention_policy('metrics', interval '5 days')")
    await conn.execute(f"call run_job({int(job_id)})")  # no background worker: run it here
    assert await conn.fetchval("select min(time) from metrics") >= now - timedelta(days=6)
    assert await conn.fetchval("select count(*) from metrics") < after_drop


def test_data_directory_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"

    async def write(dsn: str) -> None:
        c = await asyncpg.connect(dsn)
        try:
            await c.execute("create table kept(x int); insert into kept values (7)")
        finally:
            await c.close()

    async def read(dsn: str) -> int:
        c = await asyncpg.connect(dsn)
        try:
            return await c.fetchval("select sum(x) from kept")
        finally:
            await c.close()

    with TimescaleServer(data_dir) as ts:
        asyncio.run(write(ts.dsn))
    assert not ts.running
    assert any(data_dir.iterdir())
    with TimescaleServer(os.fspath(data_dir)) as ts:
        assert asyncio.run(read(ts.dsn)) == 7
    assert not ts.running
