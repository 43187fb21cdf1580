"""An installation with data migrates to the narrow schema (0009-0011) without losing it.

Wide readings (text dimensions, event ids), latest state by text key and a queued p95
repair, written the way the previous release wrote them, then ``migrate``: every reading
within the retention period is in the narrow table under its registry keys (a sensor the
registry never listed is registered from its rows), each in a daily partition that
retention can drop (not the default partition), the latest state reads the same through
the ``sensor_latest`` view, and the repair queue became a pending window.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from cityops.settings import Settings
from processors.schema import migrate, migration_files

RETENTION_DAYS = 30


@pytest.fixture
async def old_install(settings: Settings) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A database migrated up to 0008 (the release before the narrow rows)."""
    admin = await asyncpg.connect(settings.pg_dsn)
    db = f"mignarrow_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"create database {db}")
    dsn = settings.pg_dsn.rsplit("/", 1)[0] + f"/{db}"
    conn = await asyncpg.connect(dsn)
    try:
        old = [(v, n, p) for v, n, p in migration_files("postgres") if v < 9]
        for _, _, path in old:
            await conn.execute(path.read_text().replace("{{retention_days}}",
                                                        str(RETENTION_DAYS)))
        await conn.execute("create table schema_migrations (version int not null, name text "
                           "not null, mode text not null, applied_at timestamptz not null "
                           "default now(), primary key (version, name))")
        await conn.executemany("insert into schema_migrations (version, name, mode) "
                               "values ($1, $2, 'postgres')", [(v, n) for v, n, _ in old])
        yield dsn, conn
    finally:
        await conn.close()
        await admin.execute(f"drop database {db} with (force)")
        await admin.close()


async def test_wide_readings_latest_and_repairs_survive_the_narrow_migration(
        old_install: tuple[str, asyncpg.Connection]) -> None:
    dsn, conn = old_install
    now = datetime.now(UTC).replace(microsecond=0)
    await conn.execute(
        "insert into sensors (sensor_id, domain, type, vendor, district, landmark, lat, lon, "
        "interval_s) values ('known-1', 'traffic', 'lane_detector', 'saomai', 'ninh_kieu', "
        "'street_30_4', 10.03, 105.78, 60)")
    ages = {"today": timedelta(minutes=5), "ten days": timedelta(days=10),
            "past retention": timedelta(days=RETENTION_DAYS + 3)}
    rows = []
    for sid in ("known-1", "unlisted-7"):  # the second never made it into the registry
        for label, age in ages.items():
            for metric, value in (("flow", 12.0), ("speed_kmh", 41.5)):
                rows.append((now - age, sid, metric, value, "cai_rang", "traffic",
                             "lane_detector", "street_30_4", f"{sid}-{label}", 0))
    await conn.executemany(
        "insert into readings (time, sensor_id, metric, value, district, domain, type, "
        "landmark, event_id, quality) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", rows)
    await conn.execute(
        "insert into sensor_latest (sensor_id, metric, time, value, district, domain, type, "
        "landmark, event_id) values ('unlisted-7', 'flow', $1, 12, 'cai_rang', 'traffic', "
        "'lane_detector', 'street_30_4', 'x')", now - ages["today"])
    await conn.execute("insert into rollup_repair (rollup, bucket) values "
                       "('sensor_rollup_1m', $1)", now.replace(second=0) - timedelta(minutes=5))

    assert await migrate(dsn, "postgres", retention_days=RETENTION_DAYS) == "postgres"

    got = {(r[0], r[1], r[2].replace(microsecond=0), r[3]) for r in await conn.fetch(
        "select sensor_id, metric, time, value from readings_named")}
    want = {(r[1], r[2], r[0], r[3]) for r in rows if now - r[0] <= timedelta(days=RETENTION_DAYS)}
    assert got == want
    assert await conn.fetchval("select count(*) from readings") == len(want)
    # Every moved row sits in a daily partition, none in the default one.
    in_default = await conn.fetchval(
        "select count(*) from readings r join pg_class c on c.oid = r.tableoid "
        "where c.relname = 'readings_default'") if await conn.fetchval(
        "select to_regclass('readings_default') is not null") else 0
    assert in_default == 0
    assert await conn.fetchval("select district from sensors where sensor_id = 'unlisted-7'") \
        == "cai_rang"
    latest = [tuple(r) for r in await conn.fetch(
        "select sensor_id, metric, value from sensor_latest")]
    assert latest == [("unlisted-7", "flow", 12.0)]
    assert await conn.fetchval("select count(*) from rollup_pending where window_s = 60") == 1
    assert not await conn.fetchval("select to_regclass('rollup_repair') is not null")
    # Migrating again changes nothing.
    assert await migrate(dsn, "postgres", retention_days=RETENTION_DAYS) == "postgres"
    assert await conn.fetchval("select count(*) from readings") == len(want)
