"""Dashboard query latency: every SQL panel of deploy/grafana/dashboards on a week of data.

What it measures: each SQL panel query, with Grafana's macros and template variables
expanded exactly as Grafana's PostgreSQL data source expands them, against a database
migrated with the real ``processors/migrations`` and seeded server-side (generate_series)
with a week of rollups for 1,000 sensors; p50/p95 per panel over repeated runs, at the
dashboard's default range and at 1 day and 7 days (the 1-minute and 1-hour rollup
branches). Targets: p95 < 100 ms per panel.

Modes: ``postgres`` (a fresh database on a running PostgreSQL: the local stack's, or a
private stack started here) and ``timescale`` (the TimescaleDB test server of
``tests/tooling/timescale.py``, with ``timescaledb: true`` macro expansion, i.e.
``time_bucket``).

This module is also the library the test suite uses (tests/test_dashboards.py): the
macro expander, the panel/expression extraction and the seeding live here once.

Run::

    .venv/bin/python -m bench.dashboards [--mode postgres|timescale|both] [--runs 20]

Writes bench/results/dashboards.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # `python bench/dashboards.py` as well as `-m`
    sys.path.insert(0, str(PROJECT_ROOT))

from cityops.city import DISTRICTS, LANDMARKS  # noqa: E402

DASHBOARD_DIR = PROJECT_ROOT / "deploy" / "grafana" / "dashboards"
PROVISIONING_DIR = PROJECT_ROOT / "deploy" / "grafana" / "provisioning"
RULES_DIR = PROJECT_ROOT / "deploy" / "prometheus" / "rules"
RESULTS = PROJECT_ROOT / "bench" / "results" / "dashboards.json"

#: The data source's ``timeInterval``: Grafana never groups finer than this.
MIN_INTERVAL_S = 60
#: What Grafana's maxDataPoints typically is for a half-width panel.
MAX_DATA_POINTS = 1000


# --------------------------------------------------------------------------------------
# Dashboards: load and extract
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SqlPanel:
    """One SQL target of one panel (every cityops SQL panel has exactly one)."""

    dashboard: str  # dashboard uid
    panel_id: int
    title: str
    kind: str  # panel type
    fmt: str  # table | time_series
    sql: str
    default_range: str  # e.g. "now-6h"
    referenced_columns: tuple[str, ...]  # column names the panel's config refers to

    @property
    def key(self) -> str:
        return f"{self.dashboard}#{self.panel_id} {self.title}"


@dataclass(frozen=True, slots=True)
class PromExpr:
    """A PromQL expression and where it comes from (a panel target or a rule)."""

    where: str
    expr: str
    is_panel: bool


def load_dashboards(folder: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """File stem -> parsed dashboard JSON."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def _referenced_columns(panel: Mapping[str, Any]) -> tuple[str, ...]:
    cols: list[str] = []
    for ov in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = ov.get("matcher", {})
        if matcher.get("id") == "byName":
            cols.append(str(matcher["options"]))
    x_field = panel.get("options", {}).get("xField")
    if x_field:
        cols.append(str(x_field))
    return tuple(cols)


def sql_panels(dashboards: Mapping[str, Mapping[str, Any]] | None = None) -> list[SqlPanel]:
    dashboards = load_dashboards() if dashboards is None else dashboards
    out = []
    for dash in dashboards.values():
        for panel in iter_panels(dash):
            for target in panel.get("targets", []):
                if "rawSql" in target:
                    out.append(SqlPanel(dash["uid"], panel["id"], panel["title"], panel["type"],
                                        target.get("format", "table"), target["rawSql"],
                                        dash["time"]["from"], _referenced_columns(panel)))
    return out


def prom_exprs(dashboards: Mapping[str, Mapping[str, Any]] | None = None,
               rules_dir: Path = RULES_DIR) -> list[PromExpr]:
    """Every PromQL expression in the dashboards and the rule files."""
    import yaml

    dashboards = load_dashboards() if dashboards is None else dashboards
    out = []
    for dash in dashboards.values():
        for panel in iter_panels(dash):
            for target in panel.get("targets", []):
                if "expr" in target:
                    out.append(PromExpr(f"{dash['uid']}#{panel['id']} {panel['title']}",
                                        target["expr"], True))
    for path in sorted(rules_dir.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule.get("alert")
                out.append(PromExpr(f"{path.name}:{name}", rule["expr"], False))
    return out


# --------------------------------------------------------------------------------------
# Grafana's expansion of macros and template variables
# --------------------------------------------------------------------------------------
# Grafana's roundInterval() table (public/app/core/utils/kbn + pkg/tsdb/intervalv2), from
# one minute up: (upper bound in ms, interval in ms).
_ROUND = [(90_000, 60_000), (210_000, 120_000), (450_000, 300_000), (750_000, 600_000),
          (1_050_000, 900_000), (1_500_000, 1_200_000), (2_700_000, 1_800_000),
          (5_400_000, 3_600_000), (9_000_000, 7_200_000), (16_200_000, 10_800_000),
          (24_300_000, 21_600_000), (64_800_000, 43_200_000), (604_800_000, 86_400_000),
          (1_814_400_000, 604_800_000)]


def grafana_interval_ms(start: datetime, end: datetime, min_interval_s: int = MIN_INTERVAL_S,
                        max_points: int = MAX_DATA_POINTS) -> int:
    """The ``$__interval`` Grafana picks for a range: range/points, rounded, >= minimum."""
    raw = (end - start).total_seconds() * 1000 / max_points
    rounded = next((iv for bound, iv in _ROUND if raw < bound), 2_592_000_000)
    return max(rounded, min_interval_s * 1000)


def format_interval(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def parse_interval(text: str) -> float:
    """Seconds in a Grafana/Prometheus duration such as ``5m`` or ``1d``."""
    m = re.fullmatch(r"\s*['\"]?(\d+(?:\.\d+)?)(ms|s|m|h|d|w)['\"]?\s*", text)
    if not m:
        raise MacroError(f"not an interval: {text!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}[m.group(2)]
    return float(m.group(1)) * scale


class MacroError(ValueError):
    """A query uses a macro or variable Grafana would not expand the way it was meant."""


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + (
        f".{t.microsecond:06d}".rstrip("0") if t.microsecond else "") + "Z"


def _num(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else repr(seconds)


_MACRO = re.compile(r"\$(__[_a-zA-Z0-9]+)\(([^)]*)\)")
_VAR = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")


@dataclass(frozen=True, slots=True)
class QueryContext:
    """What Grafana knows when it runs a panel query: range, interval, variable values."""

    start: datetime
    end: datetime
    variables: Mapping[str, Sequence[str]] = field(default_factory=dict)
    timescaledb: bool = False  # the data source's "TimescaleDB" switch
    interval_ms: int | None = None

    @property
    def interval(self) -> int:
        if self.interval_ms is not None:
            return self.interval_ms
        return grafana_interval_ms(self.start, self.end)

    def _var(self, name: str, fmt: str | None, sql: bool) -> str:
        if name not in self.variables:
            raise MacroError(f"template variable ${name} is not defined")
        values = list(self.variables[name])
        if not values:
            raise MacroError(f"template variable ${name} has no value")
        fmt = fmt or ("sqlstring" if sql else "regex")
        if fmt == "sqlstring":
            return ",".join("'" + v.replace("'", "''") + "'" for v in values)
        if fmt == "csv":
            return ",".join(values)
        if fmt == "regex":
            escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
            return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        if fmt == "raw":
            return values[0]
        raise MacroError(f"template variable format :{fmt} is not supported here")

    def _variables(self, text: str, sql: bool, builtins: Mapping[str, str]) -> str:
        def sub(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(3)
            if name in builtins:
                return builtins[name]
            if name.startswith("__"):  # a macro: left for the macro pass
                return m.group(0)
            return self._var(name, m.group(2), sql)

        return _VAR.sub(sub, text)

    def expand_sql(self, sql: str) -> str:
        """Expand like Grafana: variables (frontend), then $__interval, then macros (backend)."""
        iv = self.interval
        builtins = {"__interval": format_interval(iv), "__interval_ms": str(iv)}
        text = self._variables(sql, True, builtins)

        def macro(m: re.Match[str]) -> str:
            name, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
            if name == "__timeFilter":
                return f"{args[0]} BETWEEN '{_rfc3339(self.start)}' AND '{_rfc3339(self.end)}'"
            if name == "__timeFrom":
                return f"'{_rfc3339(self.start)}'"
            if name == "__timeTo":
                return f"'{_rfc3339(self.end)}'"
            if name in ("__timeGroup", "__timeGroupAlias"):
                if len(args) < 2:
                    raise MacroError(f"${name} needs a column and an interval")
                secs = parse_interval(args[1])
                if self.timescaledb:
                    expr = f"time_bucket('{secs:.0f}s',{args[0]})"
                else:
                    expr = f"floor(extract(epoch from {args[0]})/{_num(secs)})*{_num(secs)}"
                return expr + (' AS "time"' if name == "__timeGroupAlias" else "")
            if name == "__time":
                return f'{args[0]} AS "time"'
            raise MacroError(f"macro ${name} is not one the cityops dashboards may use")

        text = _MACRO.sub(macro, text)
        left = re.search(r"\$(?!\d)[{\w]", text)
        if left:
            raise MacroError(f"unexpanded variable or macro near {text[left.start():][:30]!r}")
        return text

    def expand_promql(self, expr: str, scrape_interval_s: int = 15) -> str:
        """Grafana's Prometheus data source: variables (regex-formatted) and intervals."""
        iv = self.interval
        rate = max(4 * scrape_interval_s * 1000, iv + scrape_interval_s * 1000)
        builtins = {"__interval": format_interval(iv), "__interval_ms": str(iv),
                    "__rate_interval": format_interval(rate),
                    "__range": format_interval(int((self.end - self.start).total_seconds())
                                                * 1000)}
        text = self._variables(expr, False, builtins)
        left = re.search(r"\$(?!\d)[{\w]", re.sub(r"\{\{.*?\}\}", "", text))
        if left:
            raise MacroError(f"unexpanded variable near {text[left.start():][:30]!r}")
        return text


def relative_range(spec: str, now: datetime) -> tuple[datetime, datetime]:
    """``now-6h`` -> (now - 6h, now)."""
    m = re.fullmatch(r"now-(\d+)([mhdw])", spec)
    if not m:
        raise ValueError(f"unsupported relative time {spec!r}")
    return now - timedelta(seconds=parse_interval(m.group(1) + m.group(2))), now


# --------------------------------------------------------------------------------------
# Seeding: a week of a 1,000-sensor city, generated inside the database
# --------------------------------------------------------------------------------------
# (type, domain, share of the fleet in %, landmark kinds it sits at)
FLEET_MIX: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("lane_detector", "traffic", 35, ("arterial", "bridge")),
    ("traffic_camera", "traffic", 10, ("arterial", "bridge")),
    ("traffic_signal", "traffic", 5, ("arterial",)),
    ("cctv", "security", 20, ("attraction", "market", "public_building", "transport",
                              "campus", "hotel_zone", "bridge")),
    ("panic_button", "security", 5, ("attraction", "market", "transport")),
    ("door_sensor", "security", 5, ("public_building", "campus")),
    ("footfall_counter", "tourism", 10, ("attraction", "market")),
    ("boat_counter", "tourism", 2, ("market",)),
    ("wifi_probe", "tourism", 3, ("attraction", "market", "hotel_zone")),
    ("hotel", "tourism", 5, ("hotel_zone",)),
)

# (type, metric, typical value, daily amplitude as a share of it)
TYPE_METRICS: tuple[tuple[str, str, float, float], ...] = (
    ("lane_detector", "flow", 40, 0.8), ("lane_detector", "speed_kmh", 35, -0.3),
    ("lane_detector", "occupancy", 0.3, 0.8),
    ("traffic_camera", "flow", 60, 0.8), ("traffic_camera", "speed_kmh", 30, -0.3),
    ("traffic_signal", "signal_state", 2, 0.0),
    ("cctv", "crowd_density", 0.8, 0.9), ("cctv", "people_count", 40, 0.9),
    ("panic_button", "door_open", 0.01, 0.0), ("door_sensor", "door_open", 0.05, 0.5),
    ("footfall_counter", "footfall_in", 30, 0.9), ("footfall_counter", "footfall_out", 28, 0.9),
    ("boat_counter", "boats", 120, 0.9),
    ("wifi_probe", "visitors_total", 400, 0.7),
    ("wifi_probe", "visitors_vn", 300, 0.7), ("wifi_probe", "visitors_kr", 25, 0.7),
    ("wifi_probe", "visitors_cn", 20, 0.7), ("wifi_probe", "visitors_us", 10, 0.7),
    ("wifi_probe", "visitors_fr", 8, 0.7), ("wifi_probe", "visitors_de", 6, 0.7),
    ("wifi_probe", "visitors_au", 5, 0.7), ("wifi_probe", "visitors_jp", 6, 0.7),
    ("wifi_probe", "visitors_th", 5, 0.7), ("wifi_probe", "visitors_other", 15, 0.7),
    ("hotel", "hotel_occupancy", 0.65, 0.2),
)

INCIDENTS = ("intrusion", "crowd_density", "loitering", "abandoned_object", "fight", "panic",
             "door_forced", "door_open", "signal_fault")
SEVERITIES = ("critical", "major", "minor", "warning")
DEADLETTER_REASONS = ("bad_json", "wrong_type", "missing_field", "out_of_range",
                      "unknown_sensor", "too_old")


def fleet_rows(n: int = 1000) -> list[tuple[Any, ...]]:
    """A deterministic 1,000-sensor fleet spread over Can Tho's landmarks."""
    by_kind: dict[str, list[Any]] = {}
    for lm in LANDMARKS:
        by_kind.setdefault(lm.kind, []).append(lm)
    districts = {d.code for d in DISTRICTS}
    rows: list[tuple[Any, ...]] = []
    for type_, domain, share, kinds in FLEET_MIX:
        sites = [lm for k in kinds for lm in by_kind.get(k, [])]
        count = round(n * share / 100)
        for i in range(count):
            lm = sites[i % len(sites)]
            assert lm.district in districts
            rows.append((f"{lm.code}-{type_}-bench{i + 1:04d}", domain, type_, "benchgen",
                         lm.district, lm.code, lm.lat + 0.0001 * (i % 17),
                         lm.lon + 0.0001 * (i % 13), 60, None))
    return rows[:n]


# One value per (sensor, metric, time): a daily curve (local time, UTC+7) with noise.
_VALUE = ("m.base * greatest(0.05, 1 + m.amp * sin(2 * pi() * "
          "((extract(epoch from b) / 3600 + 7 - 9) / 24))) * (0.85 + 0.3 * random())")


async def _seed_rollup_tables(conn: asyncpg.Connection, end: datetime, days: int,
                              minute_hours: int) -> None:
    # Up to the current (partial) hour and the last whole minute, as a live processor has.
    # The per-sensor minutes are a view over readings (migration 0013): seed one reading
    # per sensor, metric and minute, which is what that view then reads.
    await conn.execute("insert into metrics (name) select distinct metric from "
                       "seed_type_metrics on conflict (name) do nothing")
    await conn.execute(f"""
insert into readings (time, sensor, metric, value, quality)
select b, s.sensor_key, mm.code, {_VALUE}, 0
from generate_series(date_trunc('hour', $1::timestamptz - interval '{minute_hours} hours'),
                     $1::timestamptz - interval '1 minute', interval '1 minute') b
cross join sensors s
join seed_type_metrics m using (type)
join metrics mm on mm.name = m.metric
where s.vendor = 'benchgen'
order by b
on conflict do nothing""", end)
    # Inserted in time order, as the processor writes them (the BRIN index relies on it).
    await conn.execute(f"""
insert into sensor_rollup_1h (bucket, sensor_id, metric, n, sum, min, max, mean, p95)
select b, s.sensor_id, m.metric, 60, v * 60, v * 0.7, v * 1.3, v, v * 1.2
from sensors s
join seed_type_metrics m using (type)
cross join generate_series(date_trunc('hour', $1::timestamptz - interval '{days} days'),
                           date_trunc('hour', $1::timestamptz), interval '1 hour') b
cross join lateral (select {_VALUE} as v) x
where s.vendor = 'benchgen'
order by b
on conflict do nothing""", end)
    for res in ("1h", "1m"):
        await conn.execute(f"""
insert into district_rollup_{res} (bucket, district, domain, metric, n, sum, min, max, mean, p95)
select r.bucket, s.district, s.domain, r.metric, sum(r.n), sum(r.sum), min(r.min), max(r.max),
       sum(r.sum) / sum(r.n), max(r.p95)
from sensor_rollup_{res} r join sensors s using (sensor_id)
where s.vendor = 'benchgen'
group by 1, 2, 3, 4
order by 1
on conflict do nothing""")


async def _seed_readings_for_caggs(conn: asyncpg.Connection, end: datetime, days: int,
                                   minute_hours: int) -> None:
    minute_start = end - timedelta(hours=minute_hours)
    hour_start = end - timedelta(days=days)
    await conn.execute("insert into metrics (name) select distinct metric from "
                       "seed_type_metrics on conflict (name) do nothing")
    for start, stop, step in ((hour_start, minute_start, "1 hour"),
                              (minute_start, end, "1 minute")):
        await conn.execute(f"""
insert into readings (time, sensor, metric, value, quality)
select b, s.sensor_key, mm.code, {_VALUE}, 0
from generate_series($1::timestamptz, $2::timestamptz - interval '1 second',
                     interval '{step}') b
cross join sensors s
join seed_type_metrics m using (type)
join metrics mm on mm.name = m.metric
where s.vendor = 'benchgen'
on conflict do nothing""", start, stop)
    for view in ("sensor_rollup_1m_agg", "district_rollup_1m_agg", "sensor_rollup_1h_agg",
                 "district_rollup_1h_agg"):
        await conn.execute(f"call refresh_continuous_aggregate('{view}', $1::timestamptz, "
                           f"$2::timestamptz)", hour_start - timedelta(hours=1),
                           end + timedelta(hours=1))



@dataclass
class SeedStats:
    sensors: int
    rows: dict[str, int]
    seconds: float


async def seed(conn: asyncpg.Connection, now: datetime, *, mode: str = "postgres",
               sensors: int = 1000,
               days: int = 7, minute_hours: int = 25, incidents: int = 30_000,
               alerts: int = 6_000, deadletters: int = 5_000) -> SeedStats:
    """Fill the dashboards' tables for ``sensors`` sensors over ``days`` days.

    Everything big is generated by PostgreSQL itself (generate_series), so seeding a
    week costs one round trip per table. The 1-hour rollups cover ``days``; the
    1-minute rollups cover the last ``minute_hours`` (the dashboards read them for
    ranges up to a day: older 1-minute rows only make the index deeper, which the
    bench can show by raising ``minute_hours``). Values follow a daily curve peaking
    in the local morning/evening so "congestion over the day" has a shape.

    ``mode`` is the storage mode the database was migrated in: in ``postgres`` the
    rollups are tables (filled here as the processor fills them); in ``timescale`` they
    are continuous aggregates over ``readings``, so readings are generated instead
    (one per sensor, metric and minute for the last ``minute_hours``, one per hour
    before: the same number of rollup rows) and the aggregates refreshed.
    """
    t0 = time.perf_counter()
    fleet = fleet_rows(sensors)
    await conn.execute("create temp table if not exists seed_type_metrics "
                       "(type text, metric text, base float8, amp float8)")
    await conn.execute("truncate seed_type_metrics")
    await conn.executemany("insert into seed_type_metrics values ($1, $2, $3, $4)",
                           TYPE_METRICS)
    await conn.executemany(
        "insert into sensors (sensor_id, domain, type, vendor, district, landmark, lat, lon,"
        " interval_s, gateway) values ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
        " on conflict (sensor_id) do nothing", fleet)
    end = now.replace(second=0, microsecond=0)
    if mode == "postgres":
        await _seed_rollup_tables(conn, end, days, minute_hours)
    else:
        await _seed_readings_for_caggs(conn, end, days, minute_hours)
    # Latest value per sensor and metric; 3% of the sensors went silent an hour ago.
    await conn.execute("insert into metrics (name) select distinct metric from "
                       "seed_type_metrics on conflict (name) do nothing")
    await conn.execute("""
insert into latest_by_sensor (sensor, time, cells)
select sensor, max(t), jsonb_object_agg(code::text, jsonb_build_array(
           (extract(epoch from t) * 1000)::bigint, v, 0))
from (select s.sensor_key as sensor, mm.code,
             case when abs(hashtext(s.sensor_id)) % 33 = 0
                  then $1::timestamptz - interval '1 hour'
                  else $1::timestamptz - random() * interval '50 seconds' end as t,
             m.base * (0.85 + 0.3 * random()) as v
        from sensors s join seed_type_metrics m using (type)
        join metrics mm on mm.name = m.metric
       where s.vendor = 'benchgen') cell
group by sensor
on conflict do nothing""", now)
    span_s = days * 86_400
    # Sensors numbered 0..n-1 so generated rows can pick one with a hash join.
    numbered = ("with pick as (select row_number() over (order by sensor_id) - 1 as i, *"
                " from sensors where vendor = 'benchgen' {where}),"
                " cnt as (select count(*) as c from pick)")
    await conn.execute(numbered.format(where="and domain = 'security'") + f"""
insert into incidents (time, event_id, sensor_id, incident, district, domain, type, landmark,
                       lat, lon, confidence, people_count, quality)
select $1::timestamptz - random() * interval '{span_s} seconds', md5('inc' || g), s.sensor_id,
       ($2::text[])[1 + g % array_length($2::text[], 1)], s.district, s.domain, s.type,
       s.landmark, s.lat, s.lon, 0.5 + random() / 2, (random() * 80)::int, 0
from generate_series(1, {int(incidents)}) g
cross join cnt
join pick s on s.i = (g::bigint * 7919) % cnt.c
on conflict do nothing""", now, list(INCIDENTS))
    # Alerts: mostly cleared; the newest 2% still active; 6 in 7 acknowledged 10 s..30 min in.
    active_from = int(alerts * 0.98)
    await conn.execute(numbered.format(where="") + f"""
insert into alerts (rule_id, source, severity, state, acknowledged, acked_at, title, domain,
                    district, landmark, sensor_id, raised_at, updated_at, cleared_at)
select 'bench_rule_' || (g % 12), s.sensor_id || '#' || g,
       ($2::text[])[1 + g % 4],
       case when g > {active_from} then 'active' else 'cleared' end,
       g % 7 <> 0,
       case when g % 7 <> 0 then t + (10 + random() * 1790) * interval '1 second' end,
       'bench alert ' || g, s.domain, s.district, s.landmark, s.sensor_id, t, t,
       case when g <= {active_from} then t + interval '1 hour' end
from generate_series(1, {int(alerts)}) g
cross join cnt
join pick s on s.i = (g::bigint * 104729) % cnt.c
cross join lateral (select $1::timestamptz - interval '{span_s} seconds'
                           + (g::float8 / {int(alerts)}) * interval '{span_s} seconds' as t) tt
""", now, list(SEVERITIES))
    await conn.execute(f"""
insert into deadletters (received_at, reason, detail, mqtt_topic, sensor_id, payload,
                         kafka_topic, kafka_partition, kafka_offset)
select $1::timestamptz - random() * interval '{span_s} seconds',
       ($2::text[])[1 + g % array_length($2::text[], 1)], 'bench dead letter ' || g,
       'city/ninh_kieu/traffic/lane_detector/x' || (g % 50), null, '{{"bad": true}}',
       'cityops.deadletter', g % 3, 1000000 + g
from generate_series(1, {int(deadletters)}) g
on conflict do nothing""", now, list(DEADLETTER_REASONS))
    await conn.execute("analyze")
    rows = {}
    for table in ("sensors", "sensor_rollup_1h", "sensor_rollup_1m", "district_rollup_1h",
                  "district_rollup_1m", "latest_by_sensor", "incidents", "alerts", "deadletters"):
        rows[table] = int(await conn.fetchval(f"select count(*) from {table}"))
    return SeedStats(len(fleet), rows, time.perf_counter() - t0)


async def variable_values(conn: asyncpg.Connection,
                          dashboards: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Run every template variable's query, as Grafana does to fill its drop-downs.

    The values are what "All" expands to (the variables have no custom allValue).
    """
    out: dict[str, list[str]] = {}
    for dash in dashboards.values():
        for var in dash.get("templating", {}).get("list", []):
            rows = await conn.fetch(var["query"])
            out[var["name"]] = [str(r[0]) for r in rows]
    return out


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------
def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def time_panels(conn: asyncpg.Connection, now: datetime, runs: int,
                      timescaledb: bool) -> list[dict[str, Any]]:
    dashboards = load_dashboards()
    values = await variable_values(conn, dashboards)
    out = []
    for panel in sql_panels(dashboards):
        for label in ("default", "now-1d", "now-7d"):
            start, end = relative_range(panel.default_range if label == "default" else label, now)
            ctx = QueryContext(start, end, values, timescaledb=timescaledb)
            sql = ctx.expand_sql(panel.sql)
            await conn.fetch(sql)  # warm the plan cache and the buffers
            times = []
            rows = 0
            for _ in range(runs):
                t = time.perf_counter()
                rows = len(await conn.fetch(sql))
                times.append((time.perf_counter() - t) * 1000)
            out.append({"panel": panel.key, "range": label if label != "default"
                        else f"default ({panel.default_range})", "rows": rows,
                        "p50_ms": round(percentile(times, 0.5), 2),
                        "p95_ms": round(percentile(times, 0.95), 2)})
    return out


async def _baseline_ms(conn: asyncpg.Connection, runs: int) -> float:
    """A fixed reference query, to express panel latencies as ratios (the box is shared)."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        await conn.fetchval("select sum(g) from generate_series(1, 100000) g")
        times.append((time.perf_counter() - t) * 1000)
    return percentile(times, 0.5)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A private PostgreSQL (the stack's own server class) for the run; stopped afterwards."""
    from cityops.settings import Settings
    from cityops.stack.servers import Postgres
    from tests.support import free_port

    state = Path(tempfile.mkdtemp(prefix="cityops-bench-"))
    state.chmod(0o755)
    settings = Settings(state_dir=state, pg_port=free_port(), storage_mode="postgres")
    server = Postgres(settings)
    server.up()  # creates the database and runs the real migrations
    try:
        yield settings.pg_dsn
    finally:
        server.down()
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def timescale_database() -> Iterator[str]:
    """The TimescaleDB test server (PGlite + TimescaleDB over the wire protocol)."""
    from tests.tooling.timescale import TimescaleServer

    data = Path(tempfile.mkdtemp(prefix="cityops-bench-ts-"))
    try:
        # On disk, not in WASM memory (32-bit: a week of readings would not fit).
        with TimescaleServer(data_dir=data) as ts:
            yield ts.dsn
    finally:
        shutil.rmtree(data, ignore_errors=True)


#: Indexes the per-sensor panels would want; NOT in processors/migrations (measured here
#: as a variant so the owner of the schema can decide with numbers).
PROPOSED_INDEXES = (
    "create index if not exists sensor_rollup_1m_metric_bucket"
    " on sensor_rollup_1m (metric, bucket) include (sensor_id, n, sum, max)",
    "create index if not exists sensor_rollup_1h_metric_bucket"
    " on sensor_rollup_1h (metric, bucket) include (sensor_id, n, sum, max)",
)


def _summary(panels: list[dict[str, Any]], base: float) -> dict[str, Any]:
    for p in panels:
        p["p95_vs_baseline"] = round(p["p95_ms"] / base, 2)
    default = [p for p in panels if p["range"].startswith("default")]
    return {"baseline_query_p50_ms": round(base, 2),
            "over_target": [f"{p['panel']} @ {p['range']}: {p['p95_ms']} ms"
                            for p in panels if p["p95_ms"] >= 100],
            "over_target_at_default_range": sum(p["p95_ms"] >= 100 for p in default),
            "worst": max(panels, key=lambda p: p["p95_ms"]), "panels": panels}


async def measure(dsn: str, mode: str, runs: int, minute_hours: int,
                  proposed_indexes: bool) -> dict[str, Any]:
    from processors.schema import migrate

    await migrate(dsn, mode)
    conn = await asyncpg.connect(dsn)
    out: dict[str, Any] = {"mode": mode}
    try:
        now = datetime.now(UTC)
        stats = await seed(conn, now, mode=mode, minute_hours=minute_hours)
        print(f"[{mode}] seeded in {stats.seconds:.1f}s: {stats.rows}", flush=True)
        out["seed"] = {"sensors": stats.sensors, "rows": stats.rows,
                       "seconds": round(stats.seconds, 1), "minute_rollup_hours": minute_hours}
        base = await _baseline_ms(conn, runs)
        panels = await time_panels(conn, now, runs, timescaledb=(mode == "timescale"))
        out["as_migrated"] = _summary(panels, base)
        if proposed_indexes:
            for ddl in PROPOSED_INDEXES:
                await conn.execute(ddl)
            await conn.execute("analyze")
            base = await _baseline_ms(conn, runs)
            panels = await time_panels(conn, now, runs, timescaledb=(mode == "timescale"))
            out["with_proposed_indexes"] = {"indexes": list(PROPOSED_INDEXES),
                                            **_summary(panels, base)}
    finally:
        await conn.close()
    return out


def bench_mode(mode: str, runs: int, minute_hours: int, proposed: bool) -> dict[str, Any]:
    server = postgres_database() if mode == "postgres" else timescale_database()
    with server as dsn:
        return asyncio.run(measure(dsn, mode, runs, minute_hours, proposed))


def _print(label: str, res: dict[str, Any]) -> None:
    print(f"\n{label}: baseline query p50 {res['baseline_query_p50_ms']} ms")
    print(f"{'panel':58} {'range':18} {'rows':>6} {'p50 ms':>8} {'p95 ms':>8} {'x base':>7}")
    for p in res["panels"]:
        print(f"{p['panel'][:58]:58} {p['range']:18} {p['rows']:6d} {p['p50_ms']:8.2f} "
              f"{p['p95_ms']:8.2f} {p['p95_vs_baseline']:7.2f}")
    print(f"{label}: {len(res['over_target'])} panel/range(s) at or over 100 ms p95 "
          f"({res['over_target_at_default_range']} at the dashboard's default range)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Dashboard SQL latency on a week of data")
    parser.add_argument("--mode", choices=("postgres", "timescale", "both"), default="both")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--minute-hours", type=int, default=25,
                        help="hours of 1-minute rollups to seed, plain PostgreSQL (the "
                             "dashboards read at most 24)")
    parser.add_argument("--timescale-minute-hours", type=int, default=6,
                        help="the same in TimescaleDB mode, where the rollups are continuous "
                             "aggregates and seeding goes through raw readings in WASM")
    parser.add_argument("--no-proposed-indexes", action="store_true",
                        help="skip the variant with PROPOSED_INDEXES")
    args = parser.parse_args(argv)
    modes = ("postgres", "timescale") if args.mode == "both" else (args.mode,)
    results: dict[str, Any] = {
        "host": {"machine": platform.machine(), "python": platform.python_version(),
                 "note": "2 shared cores, other jobs running: absolute ms are noisy; "
                         "p95_vs_baseline divides by a fixed reference query's p50 "
                         "(sum over generate_series(1, 100000)) measured in the same run"},
        "target_p95_ms": 100, "runs_per_query": args.runs, "modes": {}}
    for mode in modes:
        hours = args.minute_hours if mode == "postgres" else args.timescale_minute_hours
        try:
            results["modes"][mode] = bench_mode(mode, args.runs, hours,
                                                not args.no_proposed_indexes)
        except Exception as exc:  # a mode that cannot run is reported, not hidden
            results["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for mode, res in results["modes"].items():
        if "error" in res:
            print(f"{mode}: ERROR {res['error']}")
            continue
        _print(f"{mode} (as migrated)", res["as_migrated"])
        if "with_proposed_indexes" in res:
            _print(f"{mode} (with proposed indexes)", res["with_proposed_indexes"])
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
