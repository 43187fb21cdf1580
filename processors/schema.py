"""Versioned, idempotent schema migrations for both storage modes.

Migrations are SQL files in ``processors/migrations`` named ``NNNN_name.sql`` (both
modes), ``NNNN_name.timescale.sql`` or ``NNNN_name.postgres.sql`` (one mode only).
Applied versions are recorded in ``schema_migrations`` together with the mode, and
the whole run holds an advisory lock so concurrent starters do not race.
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg

MIGRATIONS = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(timescale|postgres))?\.sql$")
LOCK_ID = 0x0C17_0B5


async def detect_mode(conn: asyncpg.Connection, requested: str = "auto") -> str:
    """``timescale`` if the extension can be had (or is asked for), else ``postgres``."""
    if requested not in {"auto", "timescale", "postgres"}:
        raise ValueError(f"storage_mode must be auto, timescale or postgres, not {requested!r}")
    if requested != "auto":
        return requested
    available = await conn.fetchval(
        "select count(*) from pg_available_extensions where name = 'timescaledb'")
    return "timescale" if available else "postgres"


def migration_files(mode: str) -> list[tuple[int, str, Path]]:
    out = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise ValueError(f"migration file {path.name} does not match NNNN_name[.mode].sql")
        version, name, only = int(m.group(1)), m.group(2), m.group(3)
        if only is None or only == mode:
            out.append((version, name, path))
    return out


async def _materialize_moved_history(conn: asyncpg.Connection) -> None:
    """After 0009 rebuilt the continuous aggregates ``with no data`` over moved readings:
    materialize all of it once (a refresh cannot run inside the migration's transaction;
    the policies only reach back 2 hours and 3 days)."""
    if not await conn.fetchval("select exists (select 1 from readings)"):
        return
    for name in ("sensor_rollup_1m_agg", "sensor_rollup_1h_agg", "district_rollup_1m_agg",
                 "district_rollup_1h_agg"):
        await conn.execute("call refresh_continuous_aggregate($1, null, now())", name)


async def migrate(dsn: str, mode: str = "auto", *, retention_days: int = 30) -> str:
    """Apply every pending migration; returns the storage mode in use."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("select pg_advisory_lock($1)", LOCK_ID)
        try:
            await conn.execute(
                "create table if not exists schema_migrations ("
                " version int not null, name text not null, mode text not null,"
                " applied_at timestamptz not null default now(), primary key (version, name))")
            recorded = await conn.fetchval("select mode from schema_migrations limit 1")
            mode = recorded or await detect_mode(conn, mode)
            done = {(r["version"], r["name"]) for r in
                    await conn.fetch("select version, name from schema_migrations")}
            applied: list[str] = []
            for version, name, path in migration_files(mode):
                if (version, name) in done:
                    continue
                applied.append(name)
                sql = path.read_text().replace("{{retention_days}}", str(int(retention_days)))
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "insert into schema_migrations(version, name, mode) values ($1,$2,$3)",
                        version, name, mode)
            if mode == "timescale" and "narrow_readings" in applied:
                await _materialize_moved_history(conn)
            return mode
        finally:
            await conn.execute("select pg_advisory_unlock($1)", LOCK_ID)
    finally:
        await conn.close()
