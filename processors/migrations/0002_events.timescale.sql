-- Readings and incidents, TimescaleDB: hypertables with one-day chunks (a day of a city's
-- readings is a few million rows: big enough to compress well, small enough to drop
-- whole for retention), compressed after 2 days, dropped after the retention period.
-- Unique keys carry `time` (a hypertable's unique index must contain the time column).
create extension if not exists timescaledb;

create table if not exists readings (
    time      timestamptz not null,
    sensor_id text not null,
    metric    text not null,
    value     double precision not null,
    district  text not null,
    domain    text not null,
    type      text not null,
    landmark  text not null,
    event_id  text not null,
    quality   integer not null default 0,
    unique (event_id, metric, time)
);
select create_hypertable('readings', by_range('time', interval '1 day'), if_not_exists => true);
create index if not exists readings_sensor_metric_time on readings (sensor_id, metric, time desc);

create table if not exists incidents (
    time         timestamptz not null,
    event_id     text not null,
    sensor_id    text not null,
    incident     text not null,
    district     text not null,
    domain       text not null,
    type         text not null,
    landmark     text not null,
    lat          double precision not null,
    lon          double precision not null,
    confidence   double precision,
    people_count double precision,
    quality      integer not null default 0,
    measurements jsonb not null default '{}'::jsonb,
    unique (event_id, time)
);
select create_hypertable('incidents', by_range('time', interval '7 days'), if_not_exists => true);
create index if not exists incidents_district_time on incidents (district, time desc);
create index if not exists incidents_sensor_time on incidents (sensor_id, time desc);

alter table readings set (timescaledb.compress, timescaledb.compress_segmentby = 'sensor_id, metric',
                          timescaledb.compress_orderby = 'time desc');
select add_compression_policy('readings', interval '2 days', if_not_exists => true);
select add_retention_policy('readings', interval '{{retention_days}} days', if_not_exists => true);
select add_retention_policy('incidents', interval '{{retention_days}} days', if_not_exists => true);
