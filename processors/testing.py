"""Test and benchmark helpers: a messy event stream and plain-Python reference rollups.

The reference is deliberately the obvious code (dicts of lists, ``sorted``, the
textbook percentile), so the vectorized rollups and both storage modes are checked
against something anyone can read. ``bench/aggregate.py`` times it as the baseline.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from cityops.registry import Sensor
from ingest.contract import Event, event_id

METRICS_BY_DOMAIN = {"traffic": ("flow", "speed_kmh"), "tourism": ("footfall_in",)}


@dataclass(frozen=True, slots=True)
class Stats:
    n: int
    sum: float
    min: float
    max: float
    mean: float
    p95: float


def percentile_cont(values: list[float], q: float = 0.95) -> float:
    """PostgreSQL's ``percentile_cont``: linear interpolation between order statistics."""
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def stats(values: list[float]) -> Stats:
    total = sum(values)
    return Stats(len(values), total, min(values), max(values), total / len(values),
                 percentile_cont(values))


def reference_rollups(events: list[Event]) -> dict[str, dict[tuple[object, ...], Stats]]:
    """Every rollup of a stream, the slow obvious way: distinct events only."""
    groups: dict[str, dict[tuple[object, ...], list[float]]] = {
        name: defaultdict(list) for name in (
            "sensor_rollup_1m", "sensor_rollup_1h", "district_rollup_1m", "district_rollup_1h")}
    seen: set[str] = set()
    for ev in events:
        if ev.event_id in seen or ev.kind != "reading":
            continue
        seen.add(ev.event_id)
        for metric, value in ev.measurements.items():
            for window, ms in (("1m", 60_000), ("1h", 3_600_000)):
                bucket = ev.event_time // ms * ms
                groups[f"sensor_rollup_{window}"][(bucket, ev.sensor_id, metric)].append(value)
                groups[f"district_rollup_{window}"][
                    (bucket, ev.district, ev.domain, metric)].append(value)
    return {name: {k: stats(v) for k, v in g.items()} for name, g in groups.items()}


def reference_latest(events: list[Event]) -> dict[tuple[str, str], tuple[int, float]]:
    """(sensor, metric) -> (event time, value) of the newest reading by event time."""
    out: dict[tuple[str, str], tuple[int, float]] = {}
    for ev in events:
        if ev.kind != "reading":
            continue
        for metric, value in ev.measurements.items():
            cur = out.get((ev.sensor_id, metric))
            if cur is None or ev.event_time > cur[0]:
                out[(ev.sensor_id, metric)] = (ev.event_time, value)
    return out


@dataclass(slots=True)
class Stream:
    """A stream in delivery order, split in two phases (the second is late data)."""

    first: list[Event] = field(default_factory=list)
    second: list[Event] = field(default_factory=list)

    @property
    def all(self) -> list[Event]:
        return self.first + self.second

    def distinct(self) -> list[Event]:
        seen: dict[str, Event] = {}
        for ev in self.all:
            seen.setdefault(ev.event_id, ev)
        return list(seen.values())

    def reading_rows(self) -> set[tuple[str, str, int]]:
        return row_keys(self.distinct())


def row_keys(events: list[Event]) -> set[tuple[str, str, int]]:
    """The natural keys (sensor, metric, event time ms) of the rows ``events`` store."""
    return {(ev.sensor_id, m, ev.event_time) for ev in events if ev.kind == "reading"
            for m in ev.measurements}


#: Stored readings of the sensors matching a LIKE pattern, by natural key, with the value.
STORED_ROWS = ("select sensor_id, metric, (extract(epoch from time) * 1000)::int8 as ms, "
               "value from readings_named where sensor_id like $1")


def make_stream(tag: str, end_ms: int, *, sensors: int = 24, hours: float = 2.5,
                interval_s: int = 20, late_share: float = 0.05, dup_share: float = 0.1,
                incidents: int = 20, seed: int = 5) -> Stream:
    """Readings of ``sensors`` sensors in 3 districts over ``hours`` before ``end_ms``:
    shuffled in blocks (out of order), ``dup_share`` resent (duplicates), ``late_share``
    held back to the second phase (late data), plus some incidents, some repeated."""
    rng = random.Random(seed)
    districts = [f"{tag}_d{i}" for i in range(3)]
    fleet = []
    for j in range(sensors):
        domain = "traffic" if j % 3 else "tourism"
        fleet.append((f"{tag}-s{j:03d}", districts[j % 3], domain))
    events: list[Event] = []
    start = end_ms - int(hours * 3_600_000)
    for sid, district, domain in fleet:
        t = start + rng.randrange(interval_s * 1000)
        while t < end_ms:
            m = {name: round(rng.uniform(0, 100), 3) if name != "flow"
                 else float(rng.randrange(0, 400)) for name in METRICS_BY_DOMAIN[domain]}
            events.append(reading_event(sid, district, domain, t, m))
            t += interval_s * 1000 + rng.randrange(-2000, 2000)
    for k in range(incidents):
        sid, district, domain = fleet[k % len(fleet)]
        t = start + rng.randrange(end_ms - start)
        events.append(Event(
            event_id=event_id(sid, t, "incident", "intrusion"), sensor_id=sid, domain=domain,
            type="cctv", district=district, landmark="ninh_kieu_wharf", lat=10.03, lon=105.79,
            event_time=t, receive_time=t + 50, kind="incident", incident="intrusion",
            measurements={"confidence": 0.9, "people_count": float(k)}))
    events.sort(key=lambda e: e.event_time)
    # Out of order: shuffle inside blocks of 200 (a gateway flushing its buffer).
    for i in range(0, len(events), 200):
        block = events[i:i + 200]
        rng.shuffle(block)
        events[i:i + 200] = block
    late = set(rng.sample(range(len(events)), int(len(events) * late_share)))
    first = [e for i, e in enumerate(events) if i not in late]
    second = [e for i, e in enumerate(events) if i in late]
    for _ in range(int(len(events) * dup_share)):
        src = rng.choice(events)
        target = first if rng.random() < 0.7 else second
        target.insert(rng.randrange(len(target) + 1), src)
    return Stream(first, second)


def reading_event(sid: str, district: str, domain: str, t: int, m: dict[str, float]) -> Event:
    return Event(event_id=event_id(sid, t), sensor_id=sid, domain=domain,
                 type="lane_detector" if domain == "traffic" else "footfall_counter",
                 district=district, landmark="street_30_4", lat=10.03, lon=105.78,
                 event_time=t, receive_time=t + 100, interval_s=20, measurements=m,
                 vendor="compact")


_SEED_SENSOR = """
insert into sensors (sensor_id, domain, type, vendor, district, landmark, lat, lon, interval_s)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
on conflict (sensor_id) do update set updated_at = now()
returning sensor_key
"""
_SEED_METRIC = """
with new as (insert into metrics (name) values ($1) on conflict (name) do nothing
             returning code)
select code from new union all select code from metrics where name = $1
"""
_SEED_LATEST = "select latest_put($1, $2, $3, $4)"


async def seed_readings(db: asyncpg.Connection | asyncpg.Pool, sensor: Sensor,
                        rows: list[tuple[datetime, str, float]], *, latest: bool = True) -> None:
    """Store readings ``(time, metric, value)`` of ``sensor`` the way the processor does
    (registry keys, one narrow row each), and its newest per metric as latest state: for
    tests and benchmarks that need data in place without running the pipeline."""
    key = await db.fetchval(_SEED_SENSOR, sensor.sensor_id, sensor.domain, sensor.type,
                            sensor.vendor, sensor.district, sensor.landmark, sensor.lat,
                            sensor.lon, sensor.interval_s)
    codes = {m: await db.fetchval(_SEED_METRIC, m) for m in {r[1] for r in rows}}
    await db.executemany(
        "insert into readings (time, sensor, metric, value) values ($1, $2, $3, $4) "
        "on conflict do nothing", [(t, key, codes[m], v) for t, m, v in rows])
    if latest:
        newest: dict[str, tuple[datetime, str, float]] = {}
        for r in rows:
            if r[1] not in newest or r[0] > newest[r[1]][0]:
                newest[r[1]] = r
        await db.executemany(_SEED_LATEST, [(key, codes[m], t, v) for t, m, v in
                                            newest.values()])
