"""The Grafana dashboards work, proven without a Grafana server.

No Grafana can be installed here, so this module does what Grafana would: it expands
every SQL panel's macros and template variables the way Grafana's PostgreSQL data source
does (``bench.dashboards.QueryContext``) and runs the query against a real database,
migrated with the real ``processors/migrations`` and seeded with a week of a 1,000-sensor
city; it checks the result has the columns the panel needs, that the storage-resolution
switch reads the rollup it should (from the query plan) and never the raw readings, and
that the JSON itself is well formed (ids, grid, data sources, variables). PromQL is
checked against the real Prometheus in tests/test_observability.py.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import yaml

from bench.dashboards import (
    DASHBOARD_DIR,
    PROJECT_ROOT,
    PROVISIONING_DIR,
    MacroError,
    QueryContext,
    SqlPanel,
    grafana_interval_ms,
    iter_panels,
    load_dashboards,
    parse_interval,
    relative_range,
    seed,
    sql_panels,
    variable_values,
)
from cityops.city import DISTRICTS
from cityops.settings import Settings
from processors.schema import migrate

DASHBOARDS = load_dashboards()
PANELS = sql_panels(DASHBOARDS)
RANGES = ("now-1h", "default", "now-1d", "now-7d")
ROLLUPS = ("sensor_rollup_1m", "sensor_rollup_1h", "district_rollup_1m", "district_rollup_1h")
NOW = dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------------------
# A seeded database: real migrations, a week of 1,000 sensors
# --------------------------------------------------------------------------------------
@dataclass
class SeededDb:
    dsn: str
    mode: str
    values: dict[str, list[str]]


@pytest.fixture(scope="module")
async def seeded(settings: Settings) -> AsyncIterator[SeededDb]:
    """A private database on the session's PostgreSQL, so other tests' rows never mix in."""
    name = f"cityops_dash_{uuid.uuid4().hex[:8]}"
    admin_dsn = settings.pg_dsn.rsplit("/", 1)[0] + "/postgres"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'create database "{name}"')
    dsn = settings.pg_dsn.rsplit("/", 1)[0] + "/" + name
    try:
        mode = await migrate(dsn, settings.storage_mode)
        conn = await asyncpg.connect(dsn)
        try:
            # A week of hourly rollups; the last 3 hours of minute rollups (the minute
            # branch is read for ranges up to 6 hours or a day: 3 hours of it is enough to
            # prove the queries, and keeps seeding to seconds; the bench seeds 25 hours).
            await seed(conn, NOW, mode=mode, sensors=1000, days=7, minute_hours=3)
            values = await variable_values(conn, DASHBOARDS)
        finally:
            await conn.close()
        yield SeededDb(dsn, mode, values)
    finally:
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


@pytest.fixture(scope="module")
async def db(seeded: SeededDb) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(seeded.dsn)
    # A runaway query fails here instead of hanging the suite (speed is bench/'s job).
    await conn.execute("set statement_timeout = '20s'")
    yield conn
    await conn.close()


def _range(panel: SqlPanel, label: str) -> tuple[dt.datetime, dt.datetime]:
    return relative_range(panel.default_range if label == "default" else label, NOW)


# --------------------------------------------------------------------------------------
# The JSON: generated, well formed, wired to provisioned data sources
# --------------------------------------------------------------------------------------
def test_dashboard_json_is_what_the_generator_writes() -> None:
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "deploy/grafana/generate.py"),
                           "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_five_dashboards_exist() -> None:
    titles = {d["title"] for d in DASHBOARDS.values()}
    assert titles == {"City overview", "Traffic", "Security", "Tourism", "Pipeline health"}
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids)


def _provisioned_datasources() -> dict[str, str]:
    doc = yaml.safe_load((PROVISIONING_DIR / "datasources" / "cityops.yml").read_text())
    return {ds["uid"]: ds["type"] for ds in doc["datasources"]}


def test_provisioning_declares_both_datasources_and_the_dashboard_folder() -> None:
    ds = _provisioned_datasources()
    assert ds == {"cityops-db": "grafana-postgresql-datasource",
                  "cityops-prometheus": "prometheus"}
    providers = yaml.safe_load(
        (PROVISIONING_DIR / "dashboards" / "cityops.yml").read_text())["providers"]
    assert [(p["type"], p["folder"]) for p in providers] == [("file", "cityops")]
    assert len(list(DASHBOARD_DIR.glob("*.json"))) == 5


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_structure(name: str) -> None:
    dash = DASHBOARDS[name]
    datasources = _provisioned_datasources()
    panels = list(iter_panels(dash))
    assert panels, "a dashboard without panels"
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids), f"duplicate panel ids in {name}: {ids}"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} runs past the 24-column grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        assert p["targets"], f"{p['title']} has no query"
        for t in [p, *p["targets"]]:
            ds = t["datasource"]
            assert datasources.get(ds["uid"]) == ds["type"], f"{p['title']}: unknown {ds}"
        kinds = {("sql" if "rawSql" in t else "promql") for t in p["targets"]}
        assert kinds == ({"sql"} if p["datasource"]["uid"] == "cityops-db" else {"promql"})


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_template_variables_exist_and_are_used(name: str) -> None:
    dash = DASHBOARDS[name]
    declared = {v["name"] for v in dash["templating"]["list"]}
    assert {"district"} <= declared
    used: set[str] = set()
    for p in iter_panels(dash):
        for t in p["targets"]:
            text = t.get("rawSql") or t.get("expr", "")
            for m in re.finditer(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", text):
                var = m.group(1) or m.group(2)
                if not var.startswith("__"):
                    used.add(var)
    assert used <= declared, f"{name} uses undeclared variables {used - declared}"
    assert declared <= used, f"{name} declares unused variables {declared - used}"


def test_no_panel_reads_raw_readings_and_rollup_queries_have_both_resolutions() -> None:
    for panel in PANELS:
        sql = panel.sql
        assert not re.search(r"\b(from|join)\s+readings\b", sql), f"{panel.key} reads readings"
        for family in ("sensor_rollup", "district_rollup"):
            minute, hour = f"{family}_1m" in sql, f"{family}_1h" in sql
            if minute:
                assert hour, f"{panel.key} reads {family}_1m with no 1h branch for long ranges"


# --------------------------------------------------------------------------------------
# Grafana's macro expansion, as implemented by the test (pinned to Grafana's output)
# --------------------------------------------------------------------------------------
T0 = dt.datetime(2026, 11, 20, 0, 0, tzinfo=dt.UTC)


def test_macros_expand_as_grafana_does() -> None:
    ctx = QueryContext(T0, T0 + dt.timedelta(hours=6), {"district": ["ninh_kieu", "o'mon"]})
    assert ctx.expand_sql("$__timeFilter(bucket)") == (
        "bucket BETWEEN '2026-11-20T00:00:00Z' AND '2026-11-20T06:00:00Z'")
    assert ctx.expand_sql("$__timeFrom()") == "'2026-11-20T00:00:00Z'"
    assert ctx.expand_sql("$__timeGroupAlias(bucket, $__interval)") == (
        'floor(extract(epoch from bucket)/60)*60 AS "time"')
    assert ctx.expand_sql("$__timeGroup(time, '5m')") == "floor(extract(epoch from time)/300)*300"
    assert ctx.expand_sql("x in (${district:sqlstring})") == "x in ('ninh_kieu','o''mon')"
    assert ctx.expand_sql("$__interval_ms") == "60000"
    ts = QueryContext(T0, T0 + dt.timedelta(days=7), {}, timescaledb=True)
    assert ts.expand_sql("$__timeGroupAlias(bucket, $__interval)") == (
        "time_bucket('600s',bucket) AS \"time\"")
    assert ctx.expand_promql('up{district=~"$district"}[$__rate_interval]') == (
        'up{district=~"(ninh_kieu|o\'mon)"}[75s]')


def test_macro_expansion_refuses_what_grafana_would_not_expand() -> None:
    ctx = QueryContext(T0, T0 + dt.timedelta(hours=1), {"district": ["ninh_kieu"]})
    with pytest.raises(MacroError, match="not defined"):
        ctx.expand_sql("where domain in (${domain:sqlstring})")
    with pytest.raises(MacroError, match="macro"):
        ctx.expand_sql("$__unixEpochGroup(ts, 1h)")
    with pytest.raises(MacroError, match="not an interval"):
        ctx.expand_sql("$__timeGroup(ts, soon)")


def test_interval_follows_grafanas_rounding_with_a_one_minute_floor() -> None:
    assert grafana_interval_ms(T0, T0 + dt.timedelta(hours=1)) == 60_000
    assert grafana_interval_ms(T0, T0 + dt.timedelta(days=1)) == 60_000
    assert grafana_interval_ms(T0, T0 + dt.timedelta(days=2)) == 120_000
    assert grafana_interval_ms(T0, T0 + dt.timedelta(days=7)) == 600_000
    assert parse_interval("1d") == 86_400


# --------------------------------------------------------------------------------------
# Every SQL panel against the seeded database
# --------------------------------------------------------------------------------------
async def test_template_variable_queries_list_the_city(db: asyncpg.Connection,
                                                       seeded: SeededDb) -> None:
    assert set(seeded.values["district"]) == {d.code for d in DISTRICTS}
    assert set(seeded.values["domain"]) == {"traffic", "security", "tourism"}


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, int | float | Decimal) and not isinstance(v, bool))


def check_columns(panel: SqlPanel, rows: list[asyncpg.Record]) -> None:
    """What Grafana needs from the result to draw this panel."""
    assert rows, f"{panel.key}: no rows on a seeded week"
    cols = list(rows[0].keys())
    for col in panel.referenced_columns:
        assert col in cols, f"{panel.key}: the panel refers to column {col!r}; got {cols}"
    if panel.fmt == "time_series":
        assert cols[0] == "time", f"{panel.key}: the first column must be time, got {cols}"
        times = [r["time"] for r in rows]
        assert all(isinstance(t, dt.datetime | int | float | Decimal) for t in times), times[:3]
        keys = [t.timestamp() if isinstance(t, dt.datetime) else float(t) for t in times]
        assert keys == sorted(keys), f"{panel.key}: time series rows must be in time order"
        for col in cols[1:]:
            values = [r[col] for r in rows]
            if col == "metric":
                assert all(isinstance(v, str) for v in values), f"{panel.key}: metric not text"
            else:
                assert all(_is_number(v) for v in values), f"{panel.key}: {col} not numeric"
    elif panel.kind != "table":  # stat, bar gauge, pie and bar charts draw numbers
        numeric = [c for c in cols if all(_is_number(r[c]) for r in rows)
                   and any(r[c] is not None for r in rows)]
        assert numeric, f"{panel.key}: {panel.kind} needs a numeric column; got {cols}"
    if panel.kind == "stat":
        assert len(rows) == 1 and len(cols) == 1, f"{panel.key}: a stat shows one value"


@pytest.mark.parametrize("label", RANGES)
@pytest.mark.parametrize("panel", PANELS, ids=[p.key for p in PANELS])
async def test_sql_panel_returns_what_the_panel_draws(db: asyncpg.Connection, seeded: SeededDb,
                                                     panel: SqlPanel, label: str) -> None:
    start, end = _range(panel, label)
    ctx = QueryContext(start, end, seeded.values, timescaledb=False)
    sql = ctx.expand_sql(panel.sql)
    rows = await db.fetch(sql)
    check_columns(panel, rows)
    plan = json.loads(await db.fetchval("explain (format json) " + sql))
    assert "readings" not in _relations(plan), f"{panel.key} scans raw readings"


def _relations(plan: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(plan, dict):
        if "Relation Name" in plan:
            found.add(plan["Relation Name"])
        for v in plan.values():
            found |= _relations(v)
    elif isinstance(plan, list):
        for v in plan:
            found |= _relations(v)
    return found


ROLLUP_PANELS = [p for p in PANELS if any(r in p.sql for r in ROLLUPS)
                 and "$__timeTo()" in p.sql]


@pytest.mark.parametrize("label", RANGES)
@pytest.mark.parametrize("panel", ROLLUP_PANELS, ids=[p.key for p in ROLLUP_PANELS])
async def test_rollup_resolution_follows_the_range(db: asyncpg.Connection, seeded: SeededDb,
                                                   panel: SqlPanel, label: str) -> None:
    """The plan touches only the 1m rollup up to the panel's switch, only the 1h beyond.

    PostgreSQL folds the branch guard (two constants) at plan time: the other branch is
    a ``Result`` with ``One-Time Filter: false`` and no scan at all.
    """
    start, end = _range(panel, label)
    switch = re.search(r"<= interval '(\d+) (hours?|days?)'", panel.sql)
    assert switch, f"{panel.key}: no branch guard"
    limit = dt.timedelta(**{switch.group(2).rstrip("s") + "s": int(switch.group(1))})
    sql = QueryContext(start, end, seeded.values).expand_sql(panel.sql)
    plan = json.loads(await db.fetchval("explain (format json) " + sql))
    # In plain PostgreSQL a sensor's minutes are a view over the readings (migration 0013)
    rels = {"readings_1m" if r.startswith("readings") else r for r in _relations(plan)
            if "rollup" in r or r.startswith("readings")}
    want = "_1m" if end - start <= limit else "_1h"
    assert rels and all(r.endswith(want) for r in rels), (panel.key, label, rels)


async def test_district_variable_filters_every_panel(db: asyncpg.Connection,
                                                    seeded: SeededDb) -> None:
    """One district selected: panels that show a district only show that one."""
    values = {**seeded.values, "district": ["cai_rang"]}
    checked = 0
    for panel in PANELS:
        start, end = _range(panel, "now-7d")
        rows = await db.fetch(QueryContext(start, end, values).expand_sql(panel.sql))
        if rows and "district" in rows[0]:
            assert {r["district"] for r in rows} == {"cai_rang"}, panel.key
            checked += 1
        if panel.fmt == "time_series" and "district as metric" in panel.sql:
            assert {r["metric"] for r in rows} <= {"cai_rang"}, panel.key
            checked += 1
    assert checked >= 5


async def test_offline_sensors_are_counted_from_latest_readings(db: asyncpg.Connection,
                                                                seeded: SeededDb) -> None:
    """The seed silences every sensor whose id hashes to 0 mod 33: the panel counts them."""
    panel = next(p for p in PANELS if p.title == "Sensors offline")
    expected = await db.fetchval(
        "select count(*) from sensors where vendor = 'benchgen'"
        " and abs(hashtext(sensor_id)) % 33 = 0")
    # The panel compares with the database's now(); the seed is as old as this module's
    # import (minutes, on a loaded CI run), so bring the live sensors up to now first.
    await db.execute(
        "update latest_by_sensor l set time = now() - interval '5 seconds', cells = ("
        " select jsonb_object_agg(c.key, jsonb_set(c.value, '{0}', to_jsonb((extract(epoch"
        " from now() - interval '5 seconds') * 1000)::bigint))) from jsonb_each(l.cells) c)"
        " from sensors s where s.sensor_key = l.sensor and abs(hashtext(s.sensor_id)) % 33 <> 0")
    start, end = _range(panel, "default")
    got = await db.fetchval(QueryContext(start, end, seeded.values).expand_sql(panel.sql))
    assert expected > 0 and got == expected
