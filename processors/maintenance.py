"""Storage upkeep the processor runs now and then: partitions ahead, retention, policies.

Plain PostgreSQL: pg_partman's ``run_maintenance_proc()`` creates the daily partitions
ahead of time and drops those past the retention period. Without pg_partman the
processor keeps daily partitions itself (a few DDL statements, logged loudly so the
operator installs ``postgresql-15-partman``). Rollup rows older than the retention
period are deleted too.

TimescaleDB: its own scheduler runs the compression, retention and refresh policies.
When no scheduler is running (the WASM test build never has one; a server with
``timescaledb.max_background_workers = 0`` neither) the processor runs the policy jobs
itself with ``CALL run_job(id)``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import asyncpg

from processors.windows import ROLLUP_TABLES

log = logging.getLogger(__name__)

PARTITIONED = ("readings", "incidents")
PREMAKE_DAYS = 3


async def has_partman(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(
        "select count(*) from pg_extension where extname = 'pg_partman'"))


async def run_maintenance(conn: asyncpg.Connection, mode: str, retention_days: int,
                          now: datetime | None = None) -> list[str]:
    """One maintenance pass; returns what it did (for logs and tests)."""
    done: list[str] = []
    if mode == "timescale":
        done += await _timescale_jobs(conn)
        return done
    if await has_partman(conn):
        await conn.execute("call partman.run_maintenance_proc()")
        done.append("partman.run_maintenance_proc")
    else:
        log.warning("pg_partman is not installed: keeping daily partitions without it "
                    "(install postgresql-15-partman for the supported path)")
        done += await _fallback_partitions(conn, retention_days, now or datetime.now(UTC))
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    for name in (*ROLLUP_TABLES, "rollup_closed"):  # and the list of windows closed long ago
        status = await conn.execute(f"delete from {name} where bucket < $1", cutoff)
        if status != "DELETE 0":
            done.append(f"{name}: {status}")
    return done


async def _timescale_jobs(conn: asyncpg.Connection) -> list[str]:
    scheduler = await conn.fetchval(
        "select count(*) from pg_stat_activity "
        "where application_name like 'TimescaleDB Background Worker Scheduler%'")
    if scheduler:
        return []
    jobs = await conn.fetch(
        "select job_id, proc_name, hypertable_name from timescaledb_information.jobs "
        "where proc_name in ('policy_refresh_continuous_aggregate', 'policy_compression', "
        "'policy_retention') order by job_id")
    done = []
    for job in jobs:
        await conn.execute(f"call run_job({int(job['job_id'])})")
        done.append(f"{job['proc_name']}({job['hypertable_name']})")
    return done


async def _fallback_partitions(conn: asyncpg.Connection, retention_days: int,
                               now: datetime) -> list[str]:
    """Daily partitions from yesterday to PREMAKE_DAYS ahead; drop those past retention."""
    done = []
    today = now.astimezone(UTC).date()
    for table in PARTITIONED:
        for offset in range(-1, PREMAKE_DAYS + 1):
            day = today + timedelta(days=offset)
            part = f"{table}_p{day:%Y_%m_%d}"
            if await conn.fetchval("select to_regclass($1) is not null", part):
                continue
            try:
                await conn.execute(
                    f"create table {part} partition of {table} "
                    f"for values from ('{day.isoformat()}') to "
                    f"('{(day + timedelta(days=1)).isoformat()}')")
            except asyncpg.PostgresError as exc:  # e.g. rows for that day in the default
                log.warning("could not create partition %s: %s", part, exc)
                continue
            done.append(f"created {part}")
        parts = await conn.fetch(
            "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid "
            "where i.inhparent = $1::regclass and c.relname ~ '_p[0-9]{4}_[0-9]{2}_[0-9]{2}$'",
            table)
        cutoff = today - timedelta(days=retention_days)
        for row in parts:
            name = row[0]
            day = datetime.strptime(name[-10:], "%Y_%m_%d").date()
            if day < cutoff:
                await conn.execute(f"drop table {name}")
                done.append(f"dropped {name}")
    return done
