-- Alerts checkpoints write only what changed (alerts/slots.py): the array state of a rule
-- is a base in alert_rule_blobs plus the deltas written since, in order; a new base drops
-- the deltas of its rule in the same transaction.
create table if not exists alert_rule_blob_deltas (
    rule_id     text not null,
    seq         bigint generated always as identity,
    rule_hash   text not null,
    blob        bytea not null,
    written_at  timestamptz not null default now(),
    primary key (rule_id, seq)
);

-- The event-time watermark of each events partition (alerts/watermark.py), checkpointed
-- with the offset it goes with, so absence and windows resume on the same clock.
alter table alert_consumer_offsets add column if not exists watermark_ms bigint;
