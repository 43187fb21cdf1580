-- The per-sensor minute rollup is computed on read from the readings (plain PostgreSQL
-- mode), no longer stored (issue 15).
--
-- Why: a city sensor reports every 30-60 s, so `sensor_rollup_1m` held about one row per
-- reading: the bench counted 0.75-0.95 rollup row writes per reading (each with the sensor
-- id and metric name as text), the largest derived write left on the hot path, and the
-- window closer's per-sensor percentile over every minute. A minute of one sensor is one or
-- two readings; reading them is as cheap as reading a stored copy.
--
-- The view keeps the table's name and columns for the dashboards and the API. A filter on
-- `bucket` becomes a filter on the expression below (PostgreSQL moves a grouping column's
-- condition under the GROUP BY), which the BRIN index on that expression serves, so a
-- dashboard's time range reads only its own block ranges. The hourly and the district
-- rollups stay tables, computed once when their window closes (processors/windows.py).
-- TimescaleDB mode keeps its continuous aggregate.

do $drop$
begin
    if exists (select 1 from information_schema.tables
                where table_schema = 'public' and table_name = 'sensor_rollup_1m'
                  and table_type = 'BASE TABLE') then
        drop table sensor_rollup_1m;
    end if;
end
$drop$;

create index if not exists readings_minute on readings
    using brin (date_bin('1 minute', time, timestamptz 'epoch'))
    with (pages_per_range = 32, autosummarize = on);

create or replace view sensor_rollup_1m as
select date_bin('1 minute', r.time, timestamptz 'epoch') as bucket, s.sensor_id,
       m.name as metric, count(*) as n, sum(r.value) as sum, min(r.value) as min,
       max(r.value) as max, avg(r.value) as mean,
       percentile_cont(0.95) within group (order by r.value) as p95
  from readings r
  join sensors s on s.sensor_key = r.sensor
  join metrics m on m.code = r.metric
 group by 1, s.sensor_id, m.name;
