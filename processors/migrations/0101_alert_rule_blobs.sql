-- Evaluators that keep per-sensor state in numpy arrays (anomaly, absence) checkpoint it as
-- one binary row per rule (an .npz of the sensor keys and the arrays): thousands of sensors
-- cost one write per checkpoint instead of one row each.
create table if not exists alert_rule_blobs (
    rule_id     text primary key,
    rule_hash   text not null,
    blob        bytea not null,
    updated_at  timestamptz not null default now()
);
