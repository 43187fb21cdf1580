-- Rollups, plain PostgreSQL: tables the processor maintains with upserts from its numpy
-- aggregation (n, sum, min, max merge exactly across batches; mean = sum / n).
-- p95 does not merge: when a window gets readings from a second batch the upsert keeps the
-- larger partial p95 and queues the bucket in rollup_repair; the processor then recomputes
-- that bucket exactly from raw readings (percentile_cont(0.95), as TimescaleDB's
-- continuous aggregates compute it). Same names and columns as the timescale mode's views.
create table if not exists sensor_rollup_1m (
    bucket timestamptz not null, sensor_id text not null, metric text not null,
    n bigint not null, sum double precision not null, min double precision not null,
    max double precision not null, mean double precision not null, p95 double precision not null,
    primary key (sensor_id, metric, bucket)
);
create table if not exists sensor_rollup_1h (like sensor_rollup_1m including all);
create table if not exists district_rollup_1m (
    bucket timestamptz not null, district text not null, domain text not null,
    metric text not null,
    n bigint not null, sum double precision not null, min double precision not null,
    max double precision not null, mean double precision not null, p95 double precision not null,
    primary key (district, domain, metric, bucket)
);
create table if not exists district_rollup_1h (like district_rollup_1m including all);
create index if not exists sensor_rollup_1m_bucket on sensor_rollup_1m using brin (bucket);
create index if not exists sensor_rollup_1h_bucket on sensor_rollup_1h (bucket);
create index if not exists district_rollup_1m_bucket on district_rollup_1m (bucket);
create index if not exists district_rollup_1h_bucket on district_rollup_1h (bucket);

-- Buckets whose p95 merged partials and must be recomputed from raw readings.
create table if not exists rollup_repair (
    rollup text not null,
    bucket timestamptz not null,
    queued_at timestamptz not null default now(),
    primary key (rollup, bucket)
);
