"""Generate the cityops Grafana dashboards (``deploy/grafana/dashboards/*.json``).

Dashboards are code: this file is the source, the JSON next to it is its output and is
committed so Grafana's file provisioning can load it as is. Run::

    python deploy/grafana/generate.py          # rewrite the JSON
    python deploy/grafana/generate.py --check  # exit 1 if the JSON is stale (the tests run this)

Why generated rather than hand-written JSON: every SQL panel has to follow the same
rules (rollups, never raw readings, for ranges over an hour; the 1-hour rollup beyond a
day; the district/domain template variables), and the grid has to tile 24 columns
without overlap. A few helpers below make those rules impossible to forget.

How the storage-resolution switch works: each time-series query is a ``UNION ALL`` of
the same aggregate over the 1-minute rollup (ranges up to a day) and over the 1-hour
rollup (longer ranges). The branch guard compares two constants that Grafana's
``$__timeFrom()``/``$__timeTo()`` expand to, so PostgreSQL folds it at plan time and
never touches the other table (its plan shows ``One-Time Filter: false``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ingest.contract import NATIONALITIES

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"

PG = {"type": "grafana-postgresql-datasource", "uid": "cityops-db"}
PROM = {"type": "prometheus", "uid": "cityops-prometheus"}

RANGE = "$__timeTo()::timestamptz - $__timeFrom()::timestamptz"
# $__timeGroup on a raw table: Grafana expands it to floor(extract(epoch ...)), numeric
# arithmetic per row; date_bin does the same epoch-aligned grouping in integer math (3x
# cheaper on tens of thousands of incidents) and returns a timestamp.
BIN = "date_bin($__interval_ms * interval '1 millisecond', {col}, timestamptz 'epoch')"
DISTRICTS = "${district:sqlstring}"
DOMAINS = "${domain:sqlstring}"
MARKETS = "('cai_rang_market', 'phong_dien_market')"
NATIONALITY_METRICS = ", ".join(f"'visitors_{cc}'" for cc in NATIONALITIES)
TZ = "Asia/Ho_Chi_Minh"


def by_resolution(template: str, switch: str = "1 day") -> str:
    """The same query over the 1m rollup (range <= ``switch``) and the 1h rollup (longer).

    ``template`` uses ``{res}`` for the rollup suffix, ``{guard}`` for the branch guard
    and ``{per_min}`` for the minutes one rollup bucket covers (to turn sums into
    per-minute rates the same way in both branches). District-level panels of one metric
    switch at a day; the panel summing every metric at 6 hours (``WIDE_SWITCH``);
    per-landmark panels, which aggregate the per-sensor rollup, at 1 hour
    (``SENSOR_SWITCH``, see there why).
    """

    def fill(res: str, op: str, per_min: str) -> str:
        # str.replace, not str.format: the SQL holds Grafana's own ${var:format} braces.
        guard = f"{RANGE} {op} interval '{switch}'"
        return (template.replace("{res}", res).replace("{guard}", guard)
                .replace("{per_min}", per_min))

    minute = fill("1m", "<=", "1")
    hour = fill("1h", ">", "60")
    return f"{minute.strip()}\nunion all\n{hour.strip()}\norder by 1"


# Where panels leave the minute rollup for the hourly one (see by_resolution). Per-landmark
# panels aggregate the per-sensor rollup, which has no index by metric: every row of
# every metric in the range is read (6 hours of minutes = ~860k rows for 1,000 sensors,
# 1-2 s p95 on the bench), so they switch beyond 1 hour. A landmark-level rollup (26
# landmarks instead of 1,000 sensors) or an index on (metric, bucket) would let this go
# back to 6 hours: bench/results/dashboards.json measures the index as a variant.
SENSOR_SWITCH = "1 hour"
# Panels that sum every metric of the district rollup (~190k rows a day) switch at 6 hours.
WIDE_SWITCH = "6 hours"


# --------------------------------------------------------------------------------------
# Panels
# --------------------------------------------------------------------------------------
@dataclass
class Panel:
    title: str
    kind: str  # timeseries | stat | table | barchart | piechart | bargauge
    w: int
    h: int
    sql: str = ""
    fmt: str = "table"  # SQL result format: table | time_series
    promql: list[tuple[str, str]] = field(default_factory=list)  # (expr, legend)
    unit: str = ""
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)  # column -> unit
    decimals: int | None = None

    def to_json(self, pid: int, x: int, y: int) -> dict[str, Any]:
        ds = PG if self.sql else PROM
        if self.sql:
            targets: list[dict[str, Any]] = [{
                "refId": "A", "datasource": ds, "editorMode": "code", "rawQuery": True,
                "format": self.fmt, "rawSql": self.sql.strip(),
            }]
        else:
            targets = [{
                "refId": chr(ord("A") + i), "datasource": ds, "editorMode": "code",
                "expr": expr, "legendFormat": legend, "range": self.kind != "stat",
                "instant": self.kind == "stat",
            } for i, (expr, legend) in enumerate(self.promql)]
        defaults: dict[str, Any] = {}
        if self.unit:
            defaults["unit"] = self.unit
        if self.decimals is not None:
            defaults["decimals"] = self.decimals
        overrides = [{
            "matcher": {"id": "byName", "options": column},
            "properties": [{"id": "unit", "value": unit}],
        } for column, unit in self.overrides.items()]
        return {
            "id": pid,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": ds,
            "gridPos": {"x": x, "y": y, "w": self.w, "h": self.h},
            "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": overrides},
            "options": self.options,
        }


def layout(panels: Iterable[Panel]) -> list[dict[str, Any]]:
    """Flow panels left to right in rows of 24 columns."""
    out, x, y, row_h = [], 0, 0, 0
    for pid, p in enumerate(panels, start=1):
        if x + p.w > 24:
            x, y, row_h = 0, y + row_h, 0
        out.append(p.to_json(pid, x, y))
        x += p.w
        row_h = max(row_h, p.h)
    return out


def variable(name: str, label: str, sql: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": PG,
        "query": sql, "definition": sql, "refresh": 1, "sort": 1,
        "multi": True, "includeAll": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


DISTRICT_VAR = variable("district", "District",
                        "select distinct district from sensors order by 1")
DOMAIN_VAR = variable("domain", "Domain", "select distinct domain from sensors order by 1")


def dashboard(uid: str, title: str, description: str, panels: list[Panel],
              variables: list[dict[str, Any]], time_from: str = "now-6h") -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["cityops"],
        "timezone": TZ,
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "1m",
        "time": {"from": time_from, "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "links": [{"title": "cityops", "type": "dashboards", "tags": ["cityops"],
                   "asDropdown": True}],
        "panels": layout(panels),
    }


LEGEND_TABLE = {"legend": {"displayMode": "table", "placement": "right",
                           "calcs": ["mean", "max"]}}


# --------------------------------------------------------------------------------------
# City overview
# --------------------------------------------------------------------------------------
def overview() -> dict[str, Any]:
    panels = [
        Panel("Active alerts", "stat", 6, 5, unit="none", sql=f"""
select count(*) as active
from alerts
where state = 'active' and domain in ({DOMAINS}) and district in ({DISTRICTS})
""", description="Alerts raised and not yet cleared."),
        Panel("Unacknowledged critical alerts", "stat", 6, 5, unit="none", sql=f"""
select count(*) as unacknowledged
from alerts
where state = 'active' and not acknowledged and severity = 'critical'
  and domain in ({DOMAINS}) and district in ({DISTRICTS})
""", options={"colorMode": "background"}),
        Panel("Sensors offline", "stat", 6, 5, unit="none", sql=f"""
select count(*) filter (where l.last_seen is null
                         or l.last_seen < now() - make_interval(secs => 3 * s.interval_s))
         as offline
from sensors s
left join (select sensor_id, max(time) as last_seen from sensor_latest group by 1) l
  using (sensor_id)
where s.district in ({DISTRICTS}) and s.domain in ({DOMAINS})
""", description="Sensors silent for more than three reporting intervals (or never seen)."),
        Panel("Events per second", "stat", 6, 5, unit="reqps", promql=[(
            "sum(cityops:ingest_events:rate5m)", "events/s")],
              description="Events ingest produced to Kafka (all districts and domains)."),
        Panel("Active alerts by domain and district", "bargauge", 12, 9, sql=f"""
select district || ' / ' || domain as place, count(*) as active
from alerts
where state = 'active' and domain in ({DOMAINS}) and district in ({DISTRICTS})
group by district, domain
order by active desc
""", options={"orientation": "horizontal", "displayMode": "gradient",
              "reduceOptions": {"values": True, "calcs": [], "fields": "/^active$/"}}),
        Panel("Sensors offline by district", "table", 12, 9, sql=f"""
select s.district, s.domain,
       count(*) as sensors,
       count(*) filter (where l.last_seen is null
                         or l.last_seen < now() - make_interval(secs => 3 * s.interval_s))
         as offline,
       extract(epoch from max(now() - l.last_seen)) as longest_silence_s
from sensors s
left join (select sensor_id, max(time) as last_seen from sensor_latest group by 1) l
  using (sensor_id)
where s.district in ({DISTRICTS}) and s.domain in ({DOMAINS})
group by 1, 2
order by offline desc, 1, 2
""", overrides={"offline": "none", "longest_silence_s": "s"}),
        Panel("Measurements per minute by domain (from rollups)", "timeseries", 12, 9,
              fmt="time_series", unit="none", sql=by_resolution(f"""
select $__timeGroupAlias(bucket, $__interval), domain as metric,
       avg(readings) / {{per_min}} as value
from (select bucket, domain, sum(n)::float8 as readings
      from district_rollup_{{res}}
      where {{guard}} and $__timeFilter(bucket)
        and district in ({DISTRICTS}) and domain in ({DOMAINS})
      group by 1, 2) per_bucket
group by 1, 2
""", switch=WIDE_SWITCH),
              description="Measurements stored per minute (every metric of every reading), "
                          "from district_rollup_1m up to 6 hours, district_rollup_1h beyond."),
        Panel("Event rates (pipeline)", "timeseries", 12, 9, unit="reqps", promql=[
            ("sum(cityops:ingest_messages:rate1m)", "MQTT messages in"),
            ("sum(cityops:ingest_events:rate5m)", "events to Kafka"),
            ("sum(cityops:ingest_rejections:rate5m)", "dead-lettered"),
            ('sum(rate(cityops_alerts_raised_total{domain=~"$domain"}[$__rate_interval]))',
             "alerts raised"),
        ]),
        Panel("Latest active alerts", "table", 24, 9, sql=f"""
select raised_at as "time", severity, domain, district, landmark, title,
       acknowledged, extract(epoch from now() - raised_at) as open_for_s
from alerts
where state = 'active' and domain in ({DOMAINS}) and district in ({DISTRICTS})
order by raised_at desc
limit 50
""", overrides={"open_for_s": "s"}),
    ]
    return dashboard("cityops-overview", "City overview",
                     "Can Tho at a glance: active alerts, event rates, sensors offline.",
                     panels, [DISTRICT_VAR, DOMAIN_VAR])


# --------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------
def sensor_series(metric: str, inner: str, outer: str, where: str = "") -> str:
    """A per-landmark series from the per-sensor rollup joined to the sensor registry.

    Two levels: first per rollup bucket and landmark (cheap hash aggregate on the
    timestamp), then Grafana's $__timeGroup over those few rows; ``inner`` names the
    per-bucket columns, ``outer`` combines them per time group.
    """
    return by_resolution(f"""
select $__timeGroupAlias(bucket, $__interval), landmark as metric, {outer} as value
from (select r.bucket, s.landmark, {inner}
      from sensor_rollup_{{res}} r
      join sensors s using (sensor_id)
      where {{guard}} and $__timeFilter(r.bucket) and r.metric = '{metric}'
        and s.district in ({DISTRICTS}){where}
      group by 1, 2) per_bucket
group by 1, 2
""", switch=SENSOR_SWITCH)


def traffic() -> dict[str, Any]:
    panels = [
        Panel("Mean speed per arterial", "timeseries", 12, 9, fmt="time_series", unit="velocitykmh",
              sql=sensor_series("speed_kmh", "sum(r.sum) as total, sum(r.n) as n",
                                "sum(total) / nullif(sum(n), 0)", " and s.domain = 'traffic'"),
              options=LEGEND_TABLE),
        Panel("Flow per arterial (vehicles/min)", "timeseries", 12, 9, fmt="time_series",
              unit="none",
              sql=sensor_series("flow", "sum(r.sum) as total", "avg(total) / {per_min}",
                                " and s.domain = 'traffic'"),
              options=LEGEND_TABLE),
        Panel("Flow per district (vehicles/min)", "timeseries", 12, 9, fmt="time_series",
              unit="none", sql=by_resolution(f"""
select $__timeGroupAlias(bucket, $__interval), district as metric,
       avg(sum) / {{per_min}} as value
from district_rollup_{{res}}
where {{guard}} and $__timeFilter(bucket) and domain = 'traffic' and metric = 'flow'
  and district in ({DISTRICTS})
group by 1, 2
""")),
        Panel("Mean speed per district", "timeseries", 12, 9, fmt="time_series",
              unit="velocitykmh", sql=by_resolution(f"""
select $__timeGroupAlias(bucket, $__interval), district as metric,
       sum(sum) / nullif(sum(n), 0) as value
from district_rollup_{{res}}
where {{guard}} and $__timeFilter(bucket) and domain = 'traffic' and metric = 'speed_kmh'
  and district in ({DISTRICTS})
group by 1, 2
""")),
        Panel("Congestion over the day (local hour)", "barchart", 16, 9, sql=f"""
select to_char(bucket at time zone '{TZ}', 'HH24') as hour,
       100 * sum(sum) filter (where metric = 'occupancy')
           / nullif(sum(n) filter (where metric = 'occupancy'), 0) as occupancy_pct,
       sum(sum) filter (where metric = 'speed_kmh')
           / nullif(sum(n) filter (where metric = 'speed_kmh'), 0) as speed_kmh
from district_rollup_1h
where $__timeFilter(bucket) and domain = 'traffic' and metric in ('occupancy', 'speed_kmh')
  and district in ({DISTRICTS})
group by 1
order by 1
""", options={"xField": "hour", "orientation": "vertical"},
              overrides={"occupancy_pct": "percent", "speed_kmh": "velocitykmh"},
              description="Mean detector occupancy and speed per hour of the day over the "
                          "range (hourly rollup; pick 7 days for a weekly profile)."),
        Panel("Slowest arterials now", "table", 8, 9, sql=f"""
select s.landmark, s.district, round(avg(l.value)::numeric, 1) as speed_kmh,
       count(*) as sensors
from sensor_latest l
join sensors s using (sensor_id)
where l.metric = 'speed_kmh' and s.domain = 'traffic' and s.district in ({DISTRICTS})
  and l.time > now() - interval '15 minutes'
group by 1, 2
order by speed_kmh
limit 10
""", overrides={"speed_kmh": "velocitykmh"}),
    ]
    return dashboard("cityops-traffic", "Traffic",
                     "Flow and speed per arterial and district; congestion over the day.",
                     panels, [DISTRICT_VAR])


# --------------------------------------------------------------------------------------
# Security
# --------------------------------------------------------------------------------------
def security() -> dict[str, Any]:
    panels = [
        Panel("Median time to acknowledge", "stat", 6, 5, unit="s", sql=f"""
select percentile_cont(0.5) within group (order by extract(epoch from acked_at - raised_at))
         as median_s
from alerts
where $__timeFilter(raised_at) and domain = 'security' and acked_at is not null
  and district in ({DISTRICTS})
"""),
        Panel("Unacknowledged security alerts", "stat", 6, 5, unit="none", sql=f"""
select count(*) as unacknowledged
from alerts
where state = 'active' and not acknowledged and domain = 'security'
  and district in ({DISTRICTS})
""", options={"colorMode": "background"}),
        Panel("Incidents", "stat", 6, 5, unit="none", sql=f"""
select count(*) as incidents
from incidents
where $__timeFilter(time) and district in ({DISTRICTS})
"""),
        Panel("Serious incidents", "stat", 6, 5, unit="none", sql=f"""
select count(*) as serious
from incidents
where $__timeFilter(time) and district in ({DISTRICTS})
  and incident in ('intrusion', 'fight', 'panic', 'door_forced')
""", options={"colorMode": "background"}),
        Panel("Incidents by type", "timeseries", 12, 9, fmt="time_series", unit="none", sql=f"""
select {BIN.format(col="time")} as "time", incident as metric, count(*) as value
from incidents
where $__timeFilter(time) and district in ({DISTRICTS})
group by 1, 2
order by 1
""", options={"legend": {"displayMode": "table", "placement": "right", "calcs": ["sum"]}},
              description="Discrete incidents (not readings): counted straight from the "
                          "incidents table (partitioned by day, a few thousand a day)."),
        Panel("Incidents by place", "table", 12, 9, sql=f"""
select landmark, district, count(*) as incidents,
       count(*) filter (where incident in ('intrusion', 'fight', 'panic', 'door_forced'))
         as serious,
       max(time) as last_incident
from incidents
where $__timeFilter(time) and district in ({DISTRICTS})
group by 1, 2
order by incidents desc
limit 25
""", overrides={"last_incident": "dateTimeFromNow"}),
        Panel("Incidents by type (total)", "piechart", 8, 9, sql=f"""
select incident, count(*) as incidents
from incidents
where $__timeFilter(time) and district in ({DISTRICTS})
group by 1
order by 2 desc
""", options={"reduceOptions": {"values": True, "calcs": [], "fields": "/^incidents$/"},
              "pieType": "donut"}),
        Panel("Time to acknowledge (security alerts)", "timeseries", 16, 9, fmt="time_series",
              unit="s", sql=f"""
select {BIN.format(col="raised_at")} as "time",
       percentile_cont(0.5) within group (order by extract(epoch from acked_at - raised_at))
         as p50,
       percentile_cont(0.9) within group (order by extract(epoch from acked_at - raised_at))
         as p90
from alerts
where $__timeFilter(raised_at) and domain = 'security' and acked_at is not null
  and district in ({DISTRICTS})
group by 1
order by 1
"""),
        Panel("Peak crowd density per site", "timeseries", 12, 9, fmt="time_series",
              unit="none", sql=sensor_series("crowd_density", "max(r.max) as peak",
                                             "max(peak)")),
        Panel("Open security alerts", "table", 12, 9, sql=f"""
select raised_at as "time", severity, district, landmark, title, acknowledged,
       extract(epoch from acked_at - raised_at) as time_to_ack_s
from alerts
where state = 'active' and domain = 'security' and district in ({DISTRICTS})
order by raised_at desc
limit 50
""", overrides={"time_to_ack_s": "s"}),
    ]
    return dashboard("cityops-security", "Security",
                     "Incidents by type and place; how fast operators acknowledge.",
                     panels, [DISTRICT_VAR])


# --------------------------------------------------------------------------------------
# Tourism
# --------------------------------------------------------------------------------------
def tourism() -> dict[str, Any]:
    panels = [
        Panel("Visitors entering per site (per hour)", "timeseries", 12, 9, fmt="time_series",
              unit="none", sql=sensor_series("footfall_in", "sum(r.sum) as total",
                                             "avg(total) * 60 / {per_min}"),
              options=LEGEND_TABLE),
        Panel("Visitors by nationality", "barchart", 12, 9, sql=by_resolution(f"""
select nationality, avg(devices) as devices
from (select r.bucket, substr(r.metric, 10) as nationality, sum(r.sum / r.n) as devices
      from sensor_rollup_{{res}} r
      join sensors s using (sensor_id)
      where {{guard}} and $__timeFilter(r.bucket)
        and r.metric in ({NATIONALITY_METRICS})
        and s.district in ({DISTRICTS})
      group by 1, 2) per_bucket
group by 1
""", switch=SENSOR_SWITCH).replace("order by 1", "order by 2 desc"),
              options={"xField": "nationality", "orientation": "horizontal"},
              description="Wi-Fi/BLE probes: unique devices seen at once (summed over "
                          "probes, averaged over the range), by nationality."),
        Panel("Floating-market boats", "timeseries", 12, 9, fmt="time_series", unit="none",
              sql=sensor_series("boats", "max(r.max) as peak", "max(peak)",
                                f" and s.landmark in {MARKETS}"),
              description="Cai Rang and Phong Dien floating markets: boats present (peak)."),
        Panel("Hotel occupancy by district", "timeseries", 12, 9, fmt="time_series",
              unit="percentunit", sql=by_resolution(f"""
select $__timeGroupAlias(bucket, $__interval), district as metric,
       sum(sum) / nullif(sum(n), 0) as value
from district_rollup_{{res}}
where {{guard}} and $__timeFilter(bucket) and domain = 'tourism'
  and metric = 'hotel_occupancy' and district in ({DISTRICTS})
group by 1, 2
""")),
        Panel("Busiest sites now", "table", 12, 8, sql=f"""
select s.landmark, s.district, sum(l.value) as visitors_last_interval,
       max(l.time) as updated
from sensor_latest l
join sensors s using (sensor_id)
where l.metric = 'footfall_in' and s.district in ({DISTRICTS})
group by 1, 2
order by visitors_last_interval desc
limit 10
""", overrides={"updated": "dateTimeFromNow"}),
        Panel("Hotel occupancy now", "stat", 12, 8, unit="percentunit", decimals=1, sql=f"""
select avg(l.value) as occupancy
from sensor_latest l
join sensors s using (sensor_id)
where l.metric = 'hotel_occupancy' and s.district in ({DISTRICTS})
"""),
    ]
    return dashboard("cityops-tourism", "Tourism",
                     "Visitors by site and nationality; floating-market boat counts.",
                     panels, [DISTRICT_VAR], time_from="now-24h")


# --------------------------------------------------------------------------------------
# Pipeline health
# --------------------------------------------------------------------------------------
def pipeline() -> dict[str, Any]:
    panels = [
        Panel("Services up", "stat", 24, 4, unit="none", promql=[(
            'sum by (service) (up{job=~"cityops-.*"})', "{{service}}")],
              options={"colorMode": "background", "textMode": "value_and_name"}),
        Panel("Rates in and out", "timeseries", 12, 9, unit="reqps", promql=[
            ("sum(cityops:ingest_messages:rate1m)", "MQTT messages in (ingest)"),
            ("sum(cityops:ingest_events:rate5m)", "events to Kafka (ingest)"),
            ("sum(rate(cityops_process_messages_total[$__rate_interval]))",
             "messages consumed (processors)"),
            ("sum(cityops:process_rows:rate1m)", "rows stored"),
            ("sum(rate(cityops_alerts_events_total[$__rate_interval]))",
             "messages read (alerts)"),
            ('sum(rate(cityops_alerts_raised_total{domain=~"$domain"}[$__rate_interval]))',
             "alerts raised"),
        ]),
        Panel("Dead letters by reason", "timeseries", 12, 9, unit="reqps", promql=[
            ("sum by (reason) (rate(cityops_ingest_rejections_total[$__rate_interval]))",
             "ingest: {{reason}}"),
            ("sum(rate(cityops_process_bad_events_total[$__rate_interval]))",
             "processors: undecodable event"),
            ("sum by (reason) (rate(cityops_alerts_deadletters_total[$__rate_interval]))",
             "alerts: {{reason}}"),
        ]),
        Panel("Consumer lag and backlog", "timeseries", 12, 9, unit="none", promql=[
            ("sum by (partition) (cityops_process_consumer_lag)",
             "processors, partition {{partition}}"),
            ("sum(cityops_ingest_queue_depth)", "ingest: waiting for Kafka ack"),
        ]),
        Panel("Write latency", "timeseries", 12, 9, unit="s", promql=[
            ("histogram_quantile(0.5, sum by (le) "
             "(rate(cityops_process_write_seconds_bucket[$__rate_interval])))",
             "database batch p50"),
            ("cityops:process_write_seconds:p95_5m", "database batch p95"),
            ("histogram_quantile(0.95, sum by (le) "
             "(rate(cityops_ingest_kafka_send_seconds_bucket[$__rate_interval])))",
             "ingest to Kafka ack p95"),
        ]),
        Panel("Time from event to alert", "timeseries", 12, 9, unit="s", promql=[
            ("histogram_quantile(0.5, sum by (le) "
             "(rate(cityops_alert_event_to_alert_seconds_bucket[$__rate_interval])))", "p50"),
            ("cityops:alert_event_to_alert_seconds:p95_5m", "p95"),
        ], description="From ingest receiving the triggering event to the alert committed."),
        Panel("Database write steps (p95)", "timeseries", 12, 9, unit="s", promql=[
            ("histogram_quantile(0.95, sum by (le, step) "
             "(rate(cityops_process_write_step_seconds_bucket[$__rate_interval])))",
             "{{step}}")],
              description="Where a batch write spends its time: readings COPY, aggregation, "
                          "rollup upserts, latest state, commit."),
        Panel("Storage freshness", "stat", 6, 5, unit="s", sql=f"""
select extract(epoch from now() - max(l.time)) as behind_s
from sensor_latest l
join sensors s using (sensor_id)
where s.district in ({DISTRICTS}) and s.domain in ({DOMAINS})
""", description="Age of the newest stored reading: grows when the pipeline stalls."),
        Panel("Database write retries (1h)", "stat", 6, 5, unit="none", promql=[(
            "sum(increase(cityops_process_write_retries_total[1h]))", "retries")]),
        Panel("Dead-letter ratio", "stat", 6, 5, unit="percentunit", promql=[(
            "cityops:ingest_rejection_ratio:rate5m", "dead-lettered")]),
        Panel("Alerts raised per minute by domain", "stat", 6, 5, unit="none", promql=[(
            'sum by (domain) (rate(cityops_alerts_raised_total{domain=~"$domain"}[5m])) * 60',
            "{{domain}}")]),
        Panel("Dead letters by reason (stored)", "bargauge", 12, 9, sql="""
select reason, count(*) as dead_letters
from deadletters
where $__timeFilter(received_at)
group by 1
order by 2 desc
""", options={"orientation": "horizontal",
              "reduceOptions": {"values": True, "calcs": [], "fields": "/^dead_letters$/"}}),
        Panel("Latest dead letters", "table", 12, 9, sql="""
select received_at as "time", reason, detail, mqtt_topic, sensor_id
from deadletters
where $__timeFilter(received_at)
order by received_at desc
limit 50
"""),
        Panel("Connections and retries", "timeseries", 24, 8, unit="none", promql=[
            ("sum(cityops_ingest_mqtt_connected)", "ingest MQTT sessions connected"),
            ("sum(increase(cityops_ingest_mqtt_reconnects_total[$__rate_interval]))",
             "ingest MQTT reconnects"),
            ("sum(increase(cityops_ingest_kafka_retries_total[$__rate_interval]))",
             "ingest Kafka batch retries"),
            ("sum(increase(cityops_process_write_retries_total[$__rate_interval]))",
             "processors database write retries"),
        ]),
    ]
    return dashboard("cityops-pipeline", "Pipeline health",
                     "Rates in and out, dead letters, lag, write latency, event-to-alert time.",
                     panels, [DISTRICT_VAR, DOMAIN_VAR], time_from="now-1h")


DASHBOARDS = {
    "overview": overview,
    "traffic": traffic,
    "security": security,
    "tourism": tourism,
    "pipeline": pipeline,
}


def render() -> dict[str, str]:
    """File name -> JSON text for every dashboard."""
    return {f"{name}.json": json.dumps(build(), indent=2, ensure_ascii=False) + "\n"
            for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if any dashboard JSON is stale")
    args = parser.parse_args(argv)
    stale = []
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        path = OUT / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        print(f"stale dashboards (run python {Path(__file__).name}): {', '.join(stale)}",
              file=sys.stderr)
        return 1
    if not args.check:
        print(f"wrote {len(stale)} dashboard(s) to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
