-- Outbox of the webhook for critical incidents (alerts/incidents/webhook.py). A row is
-- written in the same transaction that makes an incident critical, so a notification
-- exists if and only if that change committed; the alerts service's senders deliver it
-- afterwards and keep their retry schedule here, so it survives a restart.
create table if not exists incident_notifications (
    notification_id bigserial primary key,       -- X-Cityops-Delivery: receivers dedupe by it
    incident_id     bigint not null references alert_incidents(incident_id) on delete cascade,
    kind            text not null,               -- what happened, e.g. 'critical'
    payload         jsonb not null,              -- the body sent, as enqueued
    created_at      timestamptz not null default now(),
    attempts        integer not null default 0,  -- HTTP attempts made
    next_attempt_at timestamptz not null default now(),  -- not before (back-off after a failure)
    last_status     integer,                     -- HTTP status of the last attempt; null: no answer
    last_error      text,                        -- what went wrong in the last failed attempt
    delivered_at    timestamptz,                 -- a 2xx answer
    failed_at       timestamptz,                 -- given up: a permanent refusal or too many attempts
    -- Each incident is notified once per kind, however often it is enqueued.
    unique (incident_id, kind)
);
-- What the senders wait for: still owed, by due time.
create index if not exists incident_notifications_due on incident_notifications (next_attempt_at)
    where delivered_at is null and failed_at is null;
