-- Alerts: lifecycle, audit trail, maintenance windows, rule state, console accounts.
-- Owned by the alerts package (migration numbers 0100-0199).

create table if not exists alerts (
    alert_id          bigserial primary key,
    rule_id           text not null,
    source            text not null,            -- sensor id, or "landmark:<code>" for correlations
    severity          text not null check (severity in ('critical','major','minor','warning','info')),
    state             text not null check (state in ('active','cleared')),
    acknowledged      boolean not null default false,
    acked_by          text,
    acked_at          timestamptz,
    assignee          text,
    title             text not null,
    message           text not null default '',
    domain            text not null default '',
    district          text not null default '',
    landmark          text not null default '',
    sensor_id         text,
    lat               double precision,
    lon               double precision,
    value             double precision,
    details           jsonb not null default '{}'::jsonb,
    updates           integer not null default 0,
    version           integer not null default 1,
    escalation_level  integer not null default 0,
    escalated_at      timestamptz,
    first_event_time  timestamptz,
    last_event_time   timestamptz,
    raised_at         timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    cleared_at        timestamptz,
    cleared_by        text
);
-- The lifecycle's central promise: one active alert per (rule, source).
create unique index if not exists alerts_one_active on alerts (rule_id, source) where state = 'active';
create index if not exists alerts_state_time on alerts (state, raised_at desc);
create index if not exists alerts_updated on alerts (updated_at desc);

create table if not exists alert_audit (
    audit_id   bigserial primary key,
    alert_id   bigint not null references alerts(alert_id) on delete cascade,
    at         timestamptz not null default now(),
    actor      text not null,
    action     text not null,
    detail     jsonb not null default '{}'::jsonb
);
create index if not exists alert_audit_alert on alert_audit (alert_id, at);

create table if not exists maintenance_windows (
    window_id   bigserial primary key,
    scope       text not null check (scope in ('sensor','district','landmark')),
    target      text not null,
    starts_at   timestamptz not null,
    ends_at     timestamptz not null check (ends_at > starts_at),
    reason      text not null default '',
    created_by  text not null,
    created_at  timestamptz not null default now()
);
create index if not exists maintenance_windows_end on maintenance_windows (ends_at);

-- Evaluator state per (rule, key), written in the same transaction as the consumer offsets
-- below, so a restart resumes exactly where the last checkpoint left off.
create table if not exists alert_rule_state (
    rule_id     text not null,
    rule_hash   text not null,
    key         text not null,
    state       jsonb not null,
    updated_at  timestamptz not null default now(),
    primary key (rule_id, key)
);

create table if not exists alert_consumer_offsets (
    grp         text not null,
    topic       text not null,
    partition   integer not null,
    next_offset bigint not null,
    updated_at  timestamptz not null default now(),
    primary key (grp, topic, partition)
);

create table if not exists console_users (
    username       text primary key,
    password_hash  text not null,
    role           text not null check (role in ('viewer','operator','supervisor')),
    created_at     timestamptz not null default now(),
    disabled       boolean not null default false
);

create table if not exists api_tokens (
    token_id     bigserial primary key,
    token_hash   text not null unique,
    agency       text not null,
    scope        text not null default 'read' check (scope in ('read')),
    created_by   text not null,
    created_at   timestamptz not null default now(),
    revoked_at   timestamptz
);
