-- Alerts scale out over N workers (alerts/scope.py): each worker checkpoints and loads only
-- the state of the partitions it owns, so every state row says whose it is. Per-key rows
-- get the (topic, partition) that owns their key (-1: written before partitioning, loaded
-- by the worker the key belongs to). Array state is one base + deltas per (rule, events
-- partition), so two workers never overwrite each other's sensors.
alter table alert_rule_state add column if not exists topic text not null default '';
alter table alert_rule_state add column if not exists partition integer not null default -1;
create index if not exists alert_rule_state_partition on alert_rule_state (topic, partition);

create table if not exists alert_rule_part_blobs (
    rule_id     text not null,
    partition   integer not null,
    rule_hash   text not null,
    blob        bytea not null,
    updated_at  timestamptz not null default now(),
    primary key (rule_id, partition)
);
create table if not exists alert_rule_part_blob_deltas (
    rule_id     text not null,
    partition   integer not null,
    seq         bigint generated always as identity,
    rule_hash   text not null,
    blob        bytea not null,
    written_at  timestamptz not null default now(),
    primary key (rule_id, partition, seq)
);

-- Who owns each partition of an alerts group right now: a worker claims its partitions on
-- assignment (before it loads their state), and a checkpoint writes only if every partition
-- it holds is still claimed by it. A worker that lost its partitions without hearing of it
-- (stuck past the rebalance timeout) therefore cannot overwrite its successor's state.
create table if not exists alert_partition_owners (
    grp         text not null,
    topic       text not null,
    partition   integer not null,
    owner       text not null,
    claimed_at  timestamptz not null default now(),
    primary key (grp, topic, partition)
);
