"""What the operations center's video wall shows (``GET /api/wall/summary``).

Four things a room reads from across the floor: traffic against its usual level for this
hour, crowds at the watched landmarks against their capacity, open incidents by
severity, and the last three hours per domain as small charts.

Why it is built this way: every wall polls every ~15 s, so each query reads a bounded,
indexed slice and the whole answer is cached for a few seconds (one build however many
walls are on):

* traffic now: ``district_rollup_1m`` rows of the current hour (at least its last 15
  minutes, so a new hour is not judged on one minute), complete minutes only;
* traffic usual: ``district_rollup_1h`` at the same hour of the day on each of the
  previous ``HISTORY_DAYS`` days, named bucket by bucket (an index lookup, not a scan of a
  week); "no history yet" is ``history_days = 0``;
* crowds: ``sensor_latest`` for the camera-watched places (densest fresh view), and the
  footfall counters' entries minus exits over the last ``INSIDE_WINDOW`` for the places
  counted at their gates (cityops/city.py ``Capacity``);
* incidents: open, not inhibited (``alert_incidents``), counted by severity;
* charts: ``district_rollup_1m`` over ``CHART_WINDOW``, summed across districts per minute.

Both rollups are tables in plain PostgreSQL and continuous aggregates in TimescaleDB,
under the same names and columns (processors/queries.py), so this reads either.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
from pydantic import BaseModel, Field

from cityops.city import DISTRICTS, LANDMARKS, Landmark

HISTORY_DAYS = 7
NOW_MIN_WINDOW = timedelta(minutes=15)
CHART_WINDOW = timedelta(hours=3)
INSIDE_WINDOW = timedelta(hours=3)  # a visit to the counted sites lasts well under this
FRESH = timedelta(minutes=10)  # a camera's density older than this is not "now"
SEVERITIES = ("critical", "major", "minor", "warning", "info")
TRAFFIC_METRICS = ["flow", "speed_kmh"]

# (domain, metric, statistic, unit) per chart line; statistic over the districts' minute rows:
# sum = total per minute across the city, mean = sum / n, max = the highest reading.
Stat = Literal["sum", "mean", "max"]
CHARTS: dict[str, list[tuple[str, Stat, str]]] = {
    "traffic": [("flow", "sum", "veh/min"), ("speed_kmh", "mean", "km/h")],
    "security": [("crowd_density", "max", "p/m2"), ("crowd_density", "mean", "p/m2")],
    "tourism": [("footfall_in", "sum", "people/min"), ("footfall_out", "sum", "people/min")],
}

TRAFFIC_NOW = """
select district, metric, count(distinct bucket)::int as minutes, sum(n)::float8 as n,
       sum(sum) as total
  from district_rollup_1m
 where bucket >= $1 and bucket < $2 and domain = 'traffic' and metric = any($3::text[])
 group by grouping sets ((district, metric), (metric))
"""
TRAFFIC_USUAL = """
select district, metric, bucket, n::float8 as n, sum as total
  from district_rollup_1h
 where bucket = any($1::timestamptz[]) and domain = 'traffic' and metric = any($2::text[])
"""
CHART_ROWS = """
select bucket, domain, metric, sum(n)::float8 as n, sum(sum) as total, max(max) as peak
  from district_rollup_1m
 where bucket >= $1 and bucket < $2 and domain = any($3::text[]) and metric = any($4::text[])
 group by bucket, domain, metric
"""
DENSITY = """
select landmark, max(value) as value, count(*)::int as sensors, max(time) as updated
  from sensor_latest
 where landmark = any($1::text[]) and metric = 'crowd_density' and time > $2 and time <= $3
 group by landmark
"""
INSIDE = """
select s.landmark,
       coalesce(sum(r.value) filter (where m.name = 'footfall_in'), 0)
     - coalesce(sum(r.value) filter (where m.name = 'footfall_out'), 0) as value,
       count(distinct s.sensor_id)::int as sensors, max(r.time) as updated
  from sensors s
  join readings r on r.sensor = s.sensor_key
  join metrics m on m.code = r.metric
 where s.landmark = any($1::text[]) and m.name in ('footfall_in', 'footfall_out')
   and r.time > $2 and r.time <= $3
 group by s.landmark
"""
INCIDENT_COUNTS = """
select severity, count(*)::int as n
  from alert_incidents
 where state = 'open' and inhibited_by is null
 group by severity
"""


# --- the answer (OpenAPI) ------------------------------------------------------------------
class TrafficLevel(BaseModel):
    """Traffic now against the usual for this hour of the day (city or one district)."""

    district: str | None = Field(description="null: the whole city")
    minutes: int = Field(description="complete minutes with readings in the current window")
    flow_per_min: float | None = Field(description="vehicles counted per minute, all detectors")
    usual_flow_per_min: float | None = Field(description="the same, this hour on previous days")
    flow_ratio: float | None = Field(description="flow / usual (1.0 = as usual); city-wide: "
                                                 "over the districts that have history")
    speed_kmh: float | None = Field(description="mean speed of all readings")
    usual_speed_kmh: float | None
    speed_ratio: float | None
    history_days: int = Field(description="previous days with data for this hour; 0 = no "
                                          "history yet")


class TrafficTile(BaseModel):
    hour: int = Field(description="the hour of the day, center time zone")
    window_start: int = Field(description="epoch ms; the current window is [start, end)")
    window_end: int
    city: TrafficLevel
    districts: list[TrafficLevel]


class CrowdLevel(BaseModel):
    """A watched landmark's crowd now against its capacity (cityops/city.py)."""

    landmark: str
    district: str
    unit: Literal["p/m2", "people"] = Field(description="p/m2: densest camera view; people: "
                                                        "entries minus exits, last 3 hours")
    value: float | None = Field(description="null: no fresh reading")
    capacity: float
    ratio: float | None = Field(description="value / capacity (1.0 = at capacity)")
    sensors: int = Field(description="sensors the value comes from")
    updated_at: int | None = Field(description="epoch ms of the newest reading used")


class IncidentCounts(BaseModel):
    """Open incidents not inhibited by a bigger one, by severity."""

    critical: int = 0
    major: int = 0
    minor: int = 0
    warning: int = 0
    info: int = 0
    total: int = 0


class ChartSeries(BaseModel):
    metric: str
    stat: Stat
    unit: str
    values: list[float | None] = Field(description="one per entry of the chart's t")


class Chart(BaseModel):
    domain: str
    t: list[int] = Field(description="epoch seconds, one per minute (uPlot's x)")
    series: list[ChartSeries]


class WallSummary(BaseModel):
    generated_at: int = Field(description="epoch ms")
    at: int = Field(description="epoch ms the traffic hour and the charts are for")
    traffic: TrafficTile
    crowds: list[CrowdLevel]
    incidents: IncidentCounts
    charts: list[Chart]


# --- building it --------------------------------------------------------------------------
def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _floor(t: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + (t - epoch) // step * step


@dataclass(frozen=True)
class Hour:
    """The current traffic window and the hour buckets it is compared with."""

    hour: int
    start: datetime
    end: datetime
    history: list[datetime]

    @classmethod
    def of(cls, at: datetime, tz: ZoneInfo) -> Hour:
        end = _floor(at, timedelta(minutes=1))  # buckets before it are complete minutes
        local = at.astimezone(tz).replace(minute=0, second=0, microsecond=0)
        start = min(local.astimezone(UTC), end - NOW_MIN_WINDOW)
        naive = local.replace(tzinfo=None)
        history = [_floor((naive - timedelta(days=k)).replace(tzinfo=tz).astimezone(UTC),
                          timedelta(hours=1)) for k in range(1, HISTORY_DAYS + 1)]
        return cls(local.hour, start, end, history)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def traffic_levels(now_rows: list[Any], usual_rows: list[Any], hour: Hour) -> TrafficTile:
    """Current window vs the same hour on previous days, per district and city-wide.

    A district's usual flow is the mean over the days that have this hour (hour sum / 60
    per day), its usual speed the mean of all those hours' readings. City-wide, the values
    shown are the whole city's, but the ratios compare only the districts that have
    history (a district whose sensors are new would otherwise read as a traffic surge).
    """
    now: dict[str | None, dict[str, Any]] = defaultdict(dict)
    for r in now_rows:
        now[r["district"]][r["metric"]] = r
    flows: dict[str, dict[datetime, float]] = defaultdict(lambda: defaultdict(float))
    speeds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in usual_rows:
        if r["metric"] == "flow":
            flows[r["district"]][r["bucket"]] += r["total"] / 60.0
        else:
            speeds[r["district"]][0] += r["total"]
            speeds[r["district"]][1] += r["n"]

    def current(district: str | None) -> tuple[int, float | None, float | None]:
        f, s = now[district].get("flow"), now[district].get("speed_kmh")
        minutes = max((r["minutes"] for r in (f, s) if r), default=0)
        return (minutes, f["total"] / f["minutes"] if f and f["minutes"] else None,
                s["total"] / s["n"] if s and s["n"] else None)

    levels = []
    for d in DISTRICTS:
        minutes, flow, speed = current(d.code)
        days = flows.get(d.code, {})
        usual_flow = sum(days.values()) / len(days) if days else None
        ssum, sn = speeds.get(d.code, (0.0, 0.0))
        usual_speed = ssum / sn if sn else None
        levels.append(TrafficLevel(
            district=d.code, minutes=minutes, flow_per_min=flow, usual_flow_per_min=usual_flow,
            flow_ratio=_ratio(flow, usual_flow), speed_kmh=speed, usual_speed_kmh=usual_speed,
            speed_ratio=_ratio(speed, usual_speed), history_days=len(days)))
    minutes, flow, speed = current(None)
    known = [lv for lv in levels if lv.history_days]
    usual_flow = sum(lv.usual_flow_per_min or 0.0 for lv in known) if known else None
    flow_known = sum(lv.flow_per_min or 0.0 for lv in known)
    s_known = [now[lv.district].get("speed_kmh") for lv in known]
    speed_known = _ratio(sum(r["total"] for r in s_known if r), sum(r["n"] for r in s_known if r))
    ssum = sum(v[0] for v in speeds.values())
    sn = sum(v[1] for v in speeds.values())
    usual_speed = ssum / sn if sn else None
    city = TrafficLevel(
        district=None, minutes=minutes, flow_per_min=flow, usual_flow_per_min=usual_flow,
        flow_ratio=_ratio(flow_known, usual_flow) if flow is not None else None,
        speed_kmh=speed, usual_speed_kmh=usual_speed, speed_ratio=_ratio(speed_known, usual_speed),
        history_days=len({day for days in flows.values() for day in days}))
    return TrafficTile(hour=hour.hour, window_start=_ms(hour.start), window_end=_ms(hour.end),
                       city=city, districts=levels)


def charts(rows: list[Any], start: datetime, end: datetime) -> list[Chart]:
    """One chart per domain, every minute of [start, end) (null where nothing was read)."""
    t = [int((start + timedelta(minutes=i)).timestamp())
         for i in range(int((end - start) / timedelta(minutes=1)))]
    index = {s: i for i, s in enumerate(t)}
    got: dict[tuple[str, str], list[Any]] = defaultdict(lambda: [None] * len(t))
    for r in rows:
        i = index.get(int(r["bucket"].timestamp()))
        if i is not None:
            got[(r["domain"], r["metric"])][i] = r
    out = []
    for domain, lines in CHARTS.items():
        series = []
        for metric, stat, unit in lines:
            cells = got[(domain, metric)]
            values = [None if r is None else
                      r["total"] if stat == "sum" else
                      r["peak"] if stat == "max" else
                      (r["total"] / r["n"] if r["n"] else None) for r in cells]
            series.append(ChartSeries(metric=metric, stat=stat, unit=unit, values=values))
        out.append(Chart(domain=domain, t=t, series=series))
    return out


def crowd_levels(density: list[Any], inside: list[Any],
                 landmarks: tuple[Landmark, ...] = LANDMARKS) -> list[CrowdLevel]:
    """Every landmark with a capacity, its crowd from the measure its unit names."""
    by_unit = {"p/m2": {r["landmark"]: r for r in density},
               "people": {r["landmark"]: r for r in inside}}
    out = []
    for lm in landmarks:
        if lm.capacity is None:
            continue
        r = by_unit[lm.capacity.unit].get(lm.code)
        value = None if r is None else max(float(r["value"]), 0.0)
        out.append(CrowdLevel(landmark=lm.code, district=lm.district, unit=lm.capacity.unit,
                              value=value, capacity=lm.capacity.value,
                              ratio=_ratio(value, lm.capacity.value),
                              sensors=0 if r is None else r["sensors"],
                              updated_at=None if r is None else _ms(r["updated"])))
    return out


async def _fetch(conn: asyncpg.Connection, query: str, *args: Any) -> list[Any]:
    """Rows, or none when the table is not there (a console on a database the processors
    never migrated shows an empty wall, not an error)."""
    try:
        return list(await conn.fetch(query, *args))
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        return []


async def summary(pool: asyncpg.Pool, tz: ZoneInfo, at: datetime | None = None
                  ) -> WallSummary:
    """The wall's whole answer; ``at`` (default now) moves the traffic hour and the charts
    (replays, tests); crowds and incidents are always now."""
    now = datetime.now(UTC)
    at = at or now
    hour = Hour.of(at, tz)
    chart_end = hour.end
    chart_start = chart_end - CHART_WINDOW
    watched = {u: [lm.code for lm in LANDMARKS if lm.capacity and lm.capacity.unit == u]
               for u in ("p/m2", "people")}
    chart_metrics = sorted({m for lines in CHARTS.values() for m, _, _ in lines})
    # one connection, one query after the other: small indexed reads, and the wall never
    # takes more than one of the pool's connections from the operators' requests
    async with pool.acquire() as conn:
        now_rows = await _fetch(conn, TRAFFIC_NOW, hour.start, hour.end, TRAFFIC_METRICS)
        usual_rows = await _fetch(conn, TRAFFIC_USUAL, hour.history, TRAFFIC_METRICS)
        chart_rows = await _fetch(conn, CHART_ROWS, chart_start, chart_end, list(CHARTS),
                                  chart_metrics)
        density = await _fetch(conn, DENSITY, watched["p/m2"], now - FRESH, now)
        inside = await _fetch(conn, INSIDE, watched["people"], now - INSIDE_WINDOW, now)
        counts = await _fetch(conn, INCIDENT_COUNTS)
    by_sev = {r["severity"]: r["n"] for r in counts if r["severity"] in SEVERITIES}
    return WallSummary(
        generated_at=_ms(now), at=_ms(at), traffic=traffic_levels(now_rows, usual_rows, hour),
        crowds=crowd_levels(density, inside),
        incidents=IncidentCounts(**by_sev, total=sum(by_sev.values())),
        charts=charts(chart_rows, chart_start, chart_end))


class WallCache:
    """The current summary, built at most once per ``ttl_s`` whoever asks (one per
    console); answers for an explicit ``at`` are not cached."""

    def __init__(self, timezone: str, ttl_s: float = 5.0) -> None:
        self.tz = ZoneInfo(timezone)
        self.ttl_s = ttl_s
        self._value: WallSummary | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def get(self, pool: asyncpg.Pool, at_ms: int | None = None) -> WallSummary:
        if at_ms is not None:
            return await summary(pool, self.tz, datetime.fromtimestamp(at_ms / 1000, UTC))
        async with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.ttl_s:
                self._value = await summary(pool, self.tz)
                self._at = time.monotonic()
            return self._value
