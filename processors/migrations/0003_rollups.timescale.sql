-- Rollups, TimescaleDB: continuous aggregates over readings, real-time aggregation on
-- (materialized_only = false: buckets not yet materialized are computed from raw rows at
-- query time). p95 is percentile_cont(0.95), exact. Refresh policies keep them
-- materialized where TimescaleDB's scheduler runs; the processor also refreshes them
-- explicitly for the buckets late data lands in (processors/storage.py), because a late
-- reading below the materialization watermark is otherwise invisible until the next
-- refresh (and the test build runs no background jobs at all).
create materialized view if not exists sensor_rollup_1m
with (timescaledb.continuous, timescaledb.materialized_only = false) as
select time_bucket('1 minute', time) as bucket, sensor_id, metric,
       count(*) as n, sum(value) as sum, min(value) as min, max(value) as max,
       avg(value) as mean, percentile_cont(0.95) within group (order by value) as p95
  from readings
 group by time_bucket('1 minute', time), sensor_id, metric
with no data;

create materialized view if not exists sensor_rollup_1h
with (timescaledb.continuous, timescaledb.materialized_only = false) as
select time_bucket('1 hour', time) as bucket, sensor_id, metric,
       count(*) as n, sum(value) as sum, min(value) as min, max(value) as max,
       avg(value) as mean, percentile_cont(0.95) within group (order by value) as p95
  from readings
 group by time_bucket('1 hour', time), sensor_id, metric
with no data;

create materialized view if not exists district_rollup_1m
with (timescaledb.continuous, timescaledb.materialized_only = false) as
select time_bucket('1 minute', time) as bucket, district, domain, metric,
       count(*) as n, sum(value) as sum, min(value) as min, max(value) as max,
       avg(value) as mean, percentile_cont(0.95) within group (order by value) as p95
  from readings
 group by time_bucket('1 minute', time), district, domain, metric
with no data;

create materialized view if not exists district_rollup_1h
with (timescaledb.continuous, timescaledb.materialized_only = false) as
select time_bucket('1 hour', time) as bucket, district, domain, metric,
       count(*) as n, sum(value) as sum, min(value) as min, max(value) as max,
       avg(value) as mean, percentile_cont(0.95) within group (order by value) as p95
  from readings
 group by time_bucket('1 hour', time), district, domain, metric
with no data;
select add_continuous_aggregate_policy('sensor_rollup_1m', start_offset => interval '2 hours', end_offset => interval '1 minute', schedule_interval => interval '1 minute', if_not_exists => true);
select add_continuous_aggregate_policy('sensor_rollup_1h', start_offset => interval '3 days', end_offset => interval '1 hour', schedule_interval => interval '30 minutes', if_not_exists => true);
select add_continuous_aggregate_policy('district_rollup_1m', start_offset => interval '2 hours', end_offset => interval '1 minute', schedule_interval => interval '1 minute', if_not_exists => true);
select add_continuous_aggregate_policy('district_rollup_1h', start_offset => interval '3 days', end_offset => interval '1 hour', schedule_interval => interval '30 minutes', if_not_exists => true);
