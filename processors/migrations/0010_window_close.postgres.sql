-- Rollups computed once, when their window closes (issue 15, item 3), plain PostgreSQL.
--
-- The processor no longer upserts rollup partials in every batch (COPY to staging, four
-- upserts, ~20 row writes per message) nor repairs p95 bucket-wide. A batch records which
-- windows its readings fall in, in the same transaction as the readings:
--   * a window still open (or just ended): one row per window and bucket in
--     rollup_pending, its touched_at refreshed;
--   * a window that may already be closed (a late reading): the (sensor, metric) cells it
--     touched, in rollup_late.
-- processors/windows.py then computes each pending window once, exactly (percentile_cont
-- over the raw readings), when it has ended and settled, and recomputes only the late
-- cells. Both are idempotent recomputes from readings, so nothing can be counted twice.

create table if not exists rollup_pending (
    window_s   integer not null,
    bucket     timestamptz not null,
    touched_at timestamptz not null default clock_timestamp(),
    primary key (window_s, bucket)
) with (fillfactor = 50);

create table if not exists rollup_late (
    id        bigserial primary key,
    window_s  integer not null,
    bucket    timestamptz not null,
    sensor    integer not null,
    metric    smallint not null,
    marked_at timestamptz not null default clock_timestamp()
);

-- Buckets the old way had queued for an exact p95 recompute are closed once more, the new way.
do $repair$
begin
    if to_regclass('rollup_repair') is not null then
        insert into rollup_pending (window_s, bucket)
        select distinct 60, date_bin('1 minute', bucket, timestamptz 'epoch') from rollup_repair
         where rollup like '%_1m'
        union
        select distinct 3600, date_bin('1 hour', bucket, timestamptz 'epoch') from rollup_repair
         where rollup like '%_1h'
        on conflict do nothing;
        drop table rollup_repair;
    end if;
end
$repair$;

-- Windows computed after their grace: a later reading of one of them is late data, and
-- marks only its cell. (A window computed early, by an idle processor, is not listed:
-- its next readings mark it pending again, and it is computed again when it ends.)
create table if not exists rollup_closed (
    window_s  integer not null,
    bucket    timestamptz not null,
    closed_at timestamptz not null default now(),
    primary key (window_s, bucket)
);

-- How far each events partition has got in event time (a robust high percentile of each
-- batch's reading times, kept monotonic), written in the batch's transaction. A window
-- closes when every active partition is past its end plus the grace: a processor working
-- through a backlog holds the windows of that backlog open instead of closing them under
-- its feet (which turned its readings into late cells). A partition silent for a minute
-- (wall clock) is not waited for.
create table if not exists rollup_watermarks (
    topic           text not null,
    kafka_partition integer not null,
    event_ms        bigint not null,
    updated_at      timestamptz not null default now(),
    primary key (topic, kafka_partition)
) with (fillfactor = 50);
