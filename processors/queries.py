"""The shared read queries: the console, the API, Grafana and the tests ask these.

They work unchanged in both storage modes: in plain PostgreSQL the rollups are tables
the processor maintains, in TimescaleDB continuous aggregates with real-time
aggregation, under the same names and columns:

* ``sensor_rollup_1m`` / ``sensor_rollup_1h``:
  bucket, sensor_id, metric, n, sum, min, max, mean, p95
* ``district_rollup_1m`` / ``district_rollup_1h``:
  bucket, district, domain, metric, n, sum, min, max, mean, p95

Rows come back ordered, so answers from the two modes compare equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

WINDOWS = ("1m", "1h")

LATEST = """
select sensor_id, metric, time, value, district, domain, type, landmark, quality
  from sensor_latest
 where ($1::text is null or sensor_id = $1)
   and ($2::text is null or district = $2)
   and ($3::text is null or domain = $3)
 order by sensor_id, metric
"""

SERIES = """
select time, value, quality
  from readings
 where sensor = (select sensor_key from sensors where sensor_id = $1)
   and metric = (select code from metrics where name = $2)
   and time >= $3 and time < $4
 order by time
"""

SENSOR_ROLLUP = """
select bucket, sensor_id, metric, n, sum, min, max, mean, p95
  from sensor_rollup_{window}
 where sensor_id = $1 and ($2::text is null or metric = $2) and bucket >= $3 and bucket < $4
 order by metric, bucket
"""

DISTRICT_ROLLUP = """
select bucket, district, domain, metric, n, sum, min, max, mean, p95
  from district_rollup_{window}
 where bucket >= $1 and bucket < $2
   and ($3::text is null or district = $3)
   and ($4::text is null or domain = $4)
   and ($5::text is null or metric = $5)
 order by district, domain, metric, bucket
"""

# A domain across the whole city: n, sum, min, max merge exactly across districts;
# p95 does not, so the city-wide figure is the worst district's p95.
DOMAIN_ROLLUP = """
select bucket, domain, metric, sum(n)::bigint as n, sum(sum) as sum, min(min) as min,
       max(max) as max, sum(sum) / sum(n) as mean, max(p95) as p95_worst_district
  from district_rollup_{window}
 where bucket >= $1 and bucket < $2 and domain = $3 and ($4::text is null or metric = $4)
   and ($5::text[] is null or district = any($5::text[]))
 group by bucket, domain, metric
 order by metric, bucket
"""

INCIDENTS = """
select time, event_id, sensor_id, incident, district, domain, type, landmark, lat, lon,
       confidence, people_count, quality, measurements
  from incidents
 where time >= $1 and time < $2 and ($3::text is null or district = $3)
 order by time, event_id
"""

# ``payload`` is raw bytes (bytea) in the table; readers get it as before, utf-8 text when
# it is valid UTF-8 without NUL, else base64 (``payload_encoding`` says which), plus the
# exact bytes as ``payload_bytes``.
DEADLETTERS = """
select d.received_at, d.reason, d.detail, d.mqtt_topic, d.sensor_id, p.payload,
       p.payload_encoding, d.service, d.payload as payload_bytes
  from deadletters d, lateral deadletter_payload(d.payload) p
 where ($1::text is null or d.reason = $1)
 order by d.received_at desc, d.id desc
 limit $2
"""


def _window(window: str) -> str:
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, not {window!r}")
    return window


async def latest(conn: asyncpg.Connection, *, sensor_id: str | None = None,
                 district: str | None = None, domain: str | None = None
                 ) -> list[asyncpg.Record]:
    """The newest reading (by event time) of every sensor and metric matching the filters."""
    return await conn.fetch(LATEST, sensor_id, district, domain)


async def series(conn: asyncpg.Connection, sensor_id: str, metric: str, start: datetime,
                 end: datetime) -> list[asyncpg.Record]:
    """Raw readings of one sensor metric in [start, end), by event time."""
    return await conn.fetch(SERIES, sensor_id, metric, start, end)


async def sensor_rollups(conn: asyncpg.Connection, sensor_id: str, window: str,
                         start: datetime, end: datetime, metric: str | None = None
                         ) -> list[asyncpg.Record]:
    return await conn.fetch(SENSOR_ROLLUP.format(window=_window(window)), sensor_id, metric,
                            start, end)


async def district_rollups(conn: asyncpg.Connection, window: str, start: datetime,
                           end: datetime, *, district: str | None = None,
                           domain: str | None = None, metric: str | None = None
                           ) -> list[asyncpg.Record]:
    """Rollups per district and domain (and metric) in [start, end)."""
    return await conn.fetch(DISTRICT_ROLLUP.format(window=_window(window)), start, end,
                            district, domain, metric)


async def domain_rollups(conn: asyncpg.Connection, window: str, start: datetime,
                         end: datetime, domain: str, metric: str | None = None,
                         districts: Sequence[str] | None = None) -> list[asyncpg.Record]:
    """One domain across all (or the given) districts (n/sum/min/max/mean exact; p95 the
    worst district's)."""
    return await conn.fetch(DOMAIN_ROLLUP.format(window=_window(window)), start, end, domain,
                            metric, list(districts) if districts is not None else None)


async def incidents(conn: asyncpg.Connection, start: datetime, end: datetime,
                    district: str | None = None) -> list[asyncpg.Record]:
    return await conn.fetch(INCIDENTS, start, end, district)


async def deadletters(conn: asyncpg.Connection, reason: str | None = None, limit: int = 100
                      ) -> list[asyncpg.Record]:
    return await conn.fetch(DEADLETTERS, reason, limit)
