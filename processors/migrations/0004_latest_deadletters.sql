-- The latest reading of every sensor and metric, by EVENT time (a late or replayed reading
-- never overwrites a newer one): what the console and the API show as "now".
create table if not exists sensor_latest (
    sensor_id  text not null,
    metric     text not null,
    time       timestamptz not null,
    value      double precision not null,
    district   text not null,
    domain     text not null,
    type       text not null,
    landmark   text not null,
    event_id   text not null,
    quality    integer not null default 0,
    updated_at timestamptz not null default now(),
    primary key (sensor_id, metric)
);
create index if not exists sensor_latest_district on sensor_latest (district, domain);

-- Payloads refused upstream, from the dead-letter topic. (kafka_partition, kafka_offset)
-- makes storing them idempotent: a redelivered dead letter is not stored twice.
create table if not exists deadletters (
    id               bigserial primary key,
    received_at      timestamptz not null,
    reason           text not null,
    detail           text not null,
    mqtt_topic       text not null,
    sensor_id        text,
    payload          text not null,
    payload_encoding text not null default 'utf-8',
    service          text not null default 'ingest',
    stored_at        timestamptz not null default now(),
    kafka_partition  integer not null,
    kafka_offset     bigint not null,
    unique (kafka_partition, kafka_offset)
);
create index if not exists deadletters_received_at on deadletters (received_at desc);
create index if not exists deadletters_reason on deadletters (reason, received_at desc);
