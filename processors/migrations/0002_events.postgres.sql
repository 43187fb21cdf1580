-- Readings and incidents, plain PostgreSQL: native range partitions, one per day.
--
-- Partitions are created ahead and dropped for retention by pg_partman (Debian's
-- postgresql-15-partman) when it is installed; without it the processor keeps daily
-- partitions itself (processors/maintenance.py) and says so in its log.
-- The unique keys carry `time` because a partitioned table's unique index must contain
-- the partition key; event_id already determines time, so (event_id, metric) stays unique.

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
) partition by range (time);
create index if not exists readings_sensor_metric_time on readings (sensor_id, metric, time desc);
create index if not exists readings_time_brin on readings using brin (time);

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
) partition by range (time);
create index if not exists incidents_district_time on incidents (district, time desc);
create index if not exists incidents_sensor_time on incidents (sensor_id, time desc);
create index if not exists incidents_time_brin on incidents using brin (time);

do $partman$
begin
    if exists (select 1 from pg_available_extensions where name = 'pg_partman') then
        create schema if not exists partman;
        create extension if not exists pg_partman schema partman;
        perform partman.create_parent(
            p_parent_table := 'public.' || t, p_control := 'time', p_type := 'native',
            p_interval := 'daily', p_premake := 3, p_jobmon := false,
            p_start_partition := to_char(now() - interval '3 days', 'YYYY-MM-DD'))
        from unnest(array['readings', 'incidents']) as t
        where not exists (select 1 from partman.part_config where parent_table = 'public.' || t);
        update partman.part_config
           set retention = '{{retention_days}} days', retention_keep_table = false,
               retention_keep_index = false, infinite_time_partitions = true
         where parent_table in ('public.readings', 'public.incidents');
    else
        raise warning 'pg_partman is not installed (Debian: apt-get install postgresql-15-partman): '
            'cityops keeps daily partitions of readings and incidents itself';
        create table if not exists readings_default partition of readings default;
        create table if not exists incidents_default partition of incidents default;
    end if;
end
$partman$;
