-- Incidents: alerts from one cause, grouped (alerts/incidents). What operators see and act on
-- instead of one list item per alert. (The table "incidents" is taken: sensor incident events.)
create table if not exists alert_incidents (
    incident_id    bigserial primary key,
    group_key      text not null,              -- rule + grouping fields, e.g. speed_drop|landmark=street_30_4
    rule_id        text not null,              -- the rule whose alerts it groups
    state          text not null default 'open' check (state in ('open','resolved')),
    severity       text not null check (severity in ('critical','major','minor','warning','info')),
    title          text not null,              -- English, for API clients and webhooks
    title_args     jsonb not null default '{}'::jsonb,  -- template values: the console translates
    domain         text not null default '',
    district       text not null default '',
    landmark       text not null default '',
    gateway        text not null default '',
    lat            double precision,
    lon            double precision,
    alert_count    integer not null default 0, -- alerts that ever joined
    active_count   integer not null default 0, -- of them, still active
    sensor_count   integer not null default 0, -- distinct sensors among them
    first_seen     timestamptz not null default now(),
    last_seen      timestamptz not null default now(),
    acknowledged   boolean not null default false,
    acked_by       text,
    acked_at       timestamptz,
    assignee       text,
    storm          boolean not null default false, -- its rule raised faster than storm control allows
    inhibited_by   bigint references alert_incidents(incident_id) on delete set null,
    announced_at   timestamptz,                -- notified (after the rule's group wait)
    announced_severity text,                   -- at that severity: a worse one announces again
    resolved_at    timestamptz,
    resolved_by    text,
    version        integer not null default 1,
    created_at     timestamptz not null default now(),
    updated_at     timestamptz not null default now()
);
-- One open incident per group: the workers and the console never open two for one cause.
create unique index if not exists alert_incidents_one_open on alert_incidents (group_key)
    where state = 'open';
create index if not exists alert_incidents_state_time on alert_incidents (state, updated_at desc);
create index if not exists alert_incidents_inhibited on alert_incidents (inhibited_by)
    where inhibited_by is not null;

alter table alerts add column if not exists incident_id bigint
    references alert_incidents(incident_id) on delete set null;
create index if not exists alerts_incident on alerts (incident_id) where incident_id is not null;

create table if not exists incident_audit (
    audit_id     bigserial primary key,
    incident_id  bigint not null references alert_incidents(incident_id) on delete cascade,
    at           timestamptz not null default now(),
    actor        text not null,
    action       text not null,              -- opened | joined | acknowledged | assigned | commented | resolved | inhibited | released | escalated | storm
    detail       jsonb not null default '{}'::jsonb
);
create index if not exists incident_audit_incident on incident_audit (incident_id, at);
