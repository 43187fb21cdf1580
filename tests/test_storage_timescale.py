"""The TimescaleDB storage mode against a real TimescaleDB (PGlite + TimescaleDB 2.23 served
over the wire by tests/tooling/timescale.py), through the processor's real code path.

Checked: the migrations build hypertables, continuous aggregates (real-time on),
compression and retention policies; the processor's binary COPY + insert path writes
into them; late data below the aggregates' watermark is refreshed explicitly; policies
run (this build has no scheduler, the processor's maintenance runs them); and the
shared queries answer exactly as the plain-PostgreSQL mode does for the same stream.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import pytest_asyncio

from cityops.settings import Settings
from cityops.stack.kafka import create_topics
from processors import queries
from processors.batch import columns
from processors.maintenance import run_maintenance
from processors.rollup import ROLLUPS
from processors.schema import migrate
from processors.storage import Storage, cagg
from processors.testing import make_stream, reference_latest, reference_rollups, row_keys
from processors.windows import WindowCloser
from tests.test_processors import (
    assert_rollups_equal,
    count_rows,
    db_rollups,
    private,
    produce,
    running,
    wait_for,
)
from tests.tooling.timescale import TimescaleServer


@pytest.fixture(scope="module")
def timescale() -> Iterator[TimescaleServer]:
    with TimescaleServer(lock_timeout_s=60) as ts:
        yield ts


@pytest_asyncio.fixture(scope="module")
async def ts_dsn(timescale: TimescaleServer) -> AsyncIterator[str]:
    assert await migrate(timescale.dsn, "auto", retention_days=30) == "timescale"
    yield timescale.dsn


async def test_migrations_build_hypertables_caggs_and_policies(ts_dsn: str) -> None:
    conn = await asyncpg.connect(ts_dsn)
    try:
        hypertables = {r[0] for r in await conn.fetch(
            "select hypertable_name from timescaledb_information.hypertables")}
        assert {"readings", "incidents"} <= hypertables
        caggs = {r[0]: r[1] for r in await conn.fetch(
            "select view_name, materialized_only "
            "from timescaledb_information.continuous_aggregates")}
        # Real-time aggregation on; each keyed by integers, named by a view of its rollup.
        assert caggs == {cagg(name): False for name in ROLLUPS}
        views = {r[0] for r in await conn.fetch(
            "select table_name from information_schema.views where table_schema = 'public'")}
        assert {*ROLLUPS, "readings_named"} <= views
        columns_ = [r[0] for r in await conn.fetch(
            "select column_name from information_schema.columns where table_name = 'readings' "
            "order by ordinal_position")]
        assert columns_ == ["time", "sensor", "metric", "value", "quality"]
        jobs = {(r[0], r[1]) for r in await conn.fetch(
            "select proc_name, hypertable_name from timescaledb_information.jobs")}
        assert {("policy_compression", "readings"), ("policy_retention", "readings"),
                ("policy_retention", "incidents")} <= jobs
        interval = await conn.fetchval(
            "select time_interval from timescaledb_information.dimensions "
            "where hypertable_name = 'readings'")
        assert interval == timedelta(days=1)
        # Migrating again is a no-op.
        assert await migrate(ts_dsn, "auto") == "timescale"
    finally:
        await conn.close()


async def test_processor_into_timescale_matches_reference_and_plain_mode(
        settings: Settings, ts_dsn: str) -> None:
    tag = f"t{uuid.uuid4().hex[:8]}"
    now_ms = int(time.time() * 1000)
    stream = make_stream(tag, now_ms - 60_000, sensors=12, hours=2.2, seed=21)
    expected = stream.reading_rows()
    first_rows = row_keys(stream.first)
    # The same stream through two processors: one on TimescaleDB, one on plain PostgreSQL.
    s_ts = private(settings, tag + "ts")
    s_pg = private(settings, tag + "pg")
    for s in (s_ts, s_pg):
        await create_topics(s)
    ts_storage = await Storage.connect(ts_dsn, "timescale")
    pg_storage = await Storage.connect(settings.pg_dsn, "postgres")
    ts = await asyncpg.connect(ts_dsn)
    pg = await asyncpg.connect(settings.pg_dsn)
    try:
        async with running(s_ts, ts_storage), running(s_pg, pg_storage):
            for s in (s_ts, s_pg):
                await produce(s, stream.first)
            await wait_for(lambda: _eq(count_rows(ts, tag), len(first_rows)), 120,
                           "phase 1 in timescale")
            await wait_for(lambda: _eq(count_rows(pg, tag), len(first_rows)), 60,
                           "phase 1 in postgres")
            # Materialize everything so far: the late phase then lands below the watermark.
            for name in ROLLUPS:
                await ts_storage_refresh(ts, name)
            marks = await ts_storage.cagg_watermarks()
            assert all(m > now_ms - 3_600_000 for m in marks.values()), marks
            for s in (s_ts, s_pg):
                await produce(s, stream.second)
            await wait_for(lambda: _eq(count_rows(ts, tag), len(expected)), 120,
                           "phase 2 in timescale")
            await wait_for(lambda: _eq(count_rows(pg, tag), len(expected)), 60,
                           "phase 2 in postgres")
            await wait_for(lambda: _eq(WindowCloser().pending(pg), 0),
                           30, "plain-mode p95 repairs")
        want = reference_rollups(stream.all)
        assert_rollups_equal(await db_rollups(ts, tag), want)
        assert_rollups_equal(await db_rollups(pg, tag), want)
        # Late readings were below the watermark: only the explicit refresh put them in the
        # materialized part. Read the materialization alone to prove it.
        await ts.execute("alter materialized view sensor_rollup_1m_agg "
                         "set (timescaledb.materialized_only = true)")
        try:
            mat = await db_rollups(ts, tag)
            late = {(e.event_time // 60_000 * 60_000, e.sensor_id, m)
                    for e in stream.second if e.kind == "reading" for m in e.measurements}
            for key in late:
                assert mat["sensor_rollup_1m"][key][0] == want["sensor_rollup_1m"][key].n
        finally:
            await ts.execute("alter materialized view sensor_rollup_1m_agg "
                             "set (timescaledb.materialized_only = false)")

        # The shared queries give the same answers in both modes.
        start = datetime.fromtimestamp((now_ms - 4 * 3_600_000) / 1000, UTC)
        end = datetime.fromtimestamp(now_ms / 1000, UTC)
        sid, district = f"{tag}-s001", f"{tag}_d1"
        for window in ("1m", "1h"):
            _same(await queries.district_rollups(ts, window, start, end, district=district),
                  await queries.district_rollups(pg, window, start, end, district=district))
            _same(await queries.sensor_rollups(ts, sid, window, start, end),
                  await queries.sensor_rollups(pg, sid, window, start, end))
            ours = [f"{tag}_d{i}" for i in range(3)]
            _same(await queries.domain_rollups(ts, window, start, end, "traffic", "flow", ours),
                  await queries.domain_rollups(pg, window, start, end, "traffic", "flow", ours))
        _same(await queries.series(ts, sid, "flow", start, end),
              await queries.series(pg, sid, "flow", start, end))
        ts_latest = await queries.latest(ts, district=district)
        _same(ts_latest, await queries.latest(pg, district=district))
        ref = reference_latest(stream.all)
        assert {(r["sensor_id"], r["metric"]): r["value"] for r in ts_latest} == {
            k: v[1] for k, v in ref.items() if k[0] in {r["sensor_id"] for r in ts_latest}}
        _same(await queries.incidents(ts, start, end, district),
              await queries.incidents(pg, start, end, district))
    finally:
        for c in (ts, pg):
            await c.close()
        await ts_storage.close()
        await pg_storage.close()


async def ts_storage_refresh(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute("call refresh_continuous_aggregate($1, null, now())", cagg(name))


def _same(a: list[asyncpg.Record], b: list[asyncpg.Record]) -> None:
    """Two query answers are equal (floats to 1e-9 relative: sums add in another order)."""
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b, strict=True):
        assert list(ra.keys()) == list(rb.keys())
        for ka in ra.keys():  # noqa: SIM118 (asyncpg Records are not dicts)
            va, vb = ra[ka], rb[ka]
            if isinstance(va, float):
                assert va == pytest.approx(vb, rel=1e-9, abs=1e-9), ka
            else:
                assert va == vb, ka


async def test_compression_and_retention_through_the_sink(ts_dsn: str) -> None:
    tag = f"c{uuid.uuid4().hex[:8]}"
    now_ms = int(time.time() * 1000)
    old = make_stream(tag, now_ms - 5 * 86_400_000, sensors=4, hours=1, seed=3, incidents=0,
                      dup_share=0, late_share=0)
    ancient = make_stream(tag + "a", now_ms - 45 * 86_400_000, sensors=2, hours=0.5, seed=4,
                          incidents=0, dup_share=0, late_share=0)
    storage = await Storage.connect(ts_dsn, "timescale")
    conn = await asyncpg.connect(ts_dsn)
    try:
        for st in (old, ancient):
            res = await storage.write(columns(st.first, storage.vocab, storage.known_sensors))
            assert res.readings == len(st.reading_rows())
        done = await run_maintenance(conn, "timescale", retention_days=30)
        assert any(d.startswith("policy_compression") for d in done), done
        assert any(d.startswith("policy_retention") for d in done), done
        compressed = await conn.fetchval(
            "select count(*) from timescaledb_information.chunks where hypertable_name = "
            "'readings' and is_compressed and range_end < now() - interval '4 days'")
        assert compressed >= 1
        # Retention dropped the 45-day-old chunk; the 5-day-old one is compressed and kept.
        assert await count_rows(conn, tag + "a") == 0
        assert await count_rows(conn, tag) == len(old.reading_rows())
        # The sink writes into a compressed chunk: duplicates skipped, new rows stored.
        again = old.first[:50]
        extra = make_stream(tag, now_ms - 5 * 86_400_000 + 600_000, sensors=4, hours=0.05,
                            seed=9, incidents=0, dup_share=0, late_share=0).first
        res = await storage.write(columns(again + extra, storage.vocab, storage.known_sensors))
        new_rows = row_keys(extra) - old.reading_rows()
        assert res.readings == len(new_rows)
        assert int(res.rollups["sensor_rollup_1m"].n.sum()) == len(new_rows)
        total = old.reading_rows() | new_rows
        assert await count_rows(conn, tag) == len(total)
    finally:
        await conn.close()
        await storage.close()


async def _eq(value, expected: int) -> bool:  # type: ignore[no-untyped-def]
    return await value == expected
