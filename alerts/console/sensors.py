"""What the sensor page and the agencies' API read: a sensor, its latest values, a series.

Reads the processors' tables through their shared queries (``processors.queries``) and
the ``sensors`` registry table. A table
that is not there yet (a console started against a database the processors never
migrated) gives an empty answer, not an error page.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from cityops.registry import Fleet
from processors import queries


def _ms(ts: Any) -> int:
    return int(ts.timestamp() * 1000)


async def sensor_info(pool: asyncpg.Pool, fleet: Fleet | None,
                      sensor_id: str) -> dict[str, Any] | None:
    try:
        row = await pool.fetchrow("select sensor_id, domain, type, vendor, district, landmark, "
                                  "lat, lon, interval_s from sensors where sensor_id = $1",
                                  sensor_id)
    except asyncpg.UndefinedTableError:
        row = None
    if row is not None:
        return dict(row)
    s = fleet.get(sensor_id) if fleet else None
    if s is None:  # not provisioned here, but it has reported: what its readings say
        try:
            r = await pool.fetchrow("select sensor_id, domain, type, district, landmark "
                                    "from sensor_latest where sensor_id = $1 limit 1",
                                    sensor_id)
        except asyncpg.UndefinedTableError:
            r = None
        return None if r is None else {**dict(r), "vendor": "", "lat": None, "lon": None,
                                       "interval_s": None}
    return {"sensor_id": s.sensor_id, "domain": s.domain, "type": s.type, "vendor": s.vendor,
            "district": s.district, "landmark": s.landmark, "lat": s.lat, "lon": s.lon,
            "interval_s": s.interval_s}


async def latest(pool: asyncpg.Pool, sensor_id: str) -> dict[str, dict[str, Any]]:
    try:
        async with pool.acquire() as conn:
            rows = await queries.latest(conn, sensor_id=sensor_id)
    except asyncpg.UndefinedTableError:
        return {}
    return {r["metric"]: {"time": _ms(r["time"]), "value": r["value"], "quality": r["quality"]}
            for r in rows}


async def latest_many(pool: asyncpg.Pool, *, district: str | None = None,
                      domain: str | None = None, limit: int = 5000) -> list[dict[str, Any]]:
    try:
        async with pool.acquire() as conn:
            rows = await queries.latest(conn, district=district, domain=domain)
    except asyncpg.UndefinedTableError:
        return []
    return [{"sensor_id": r["sensor_id"], "metric": r["metric"], "time": _ms(r["time"]),
             "value": r["value"], "district": r["district"], "domain": r["domain"],
             "type": r["type"], "landmark": r["landmark"]} for r in rows[:limit]]


async def series(pool: asyncpg.Pool, sensor_id: str, metric: str, minutes: int = 120,
                 points: int = 240) -> list[tuple[int, float]]:
    """The recent series of one metric: the newest ``points`` readings within ``minutes``."""
    end = datetime.now(UTC) + timedelta(minutes=1)
    try:
        async with pool.acquire() as conn:
            rows = await queries.series(conn, sensor_id, metric,
                                        end - timedelta(minutes=minutes + 1), end)
    except asyncpg.UndefinedTableError:
        return []
    return [(_ms(r["time"]), r["value"]) for r in rows[-points:]]
