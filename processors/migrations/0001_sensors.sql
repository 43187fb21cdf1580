-- The sensor registry: every provisioned device, where it is and what it measures.
create table if not exists sensors (
    sensor_id   text primary key,
    domain      text not null,
    type        text not null,
    vendor      text not null,
    district    text not null,
    landmark    text not null,
    lat         double precision not null,
    lon         double precision not null,
    interval_s  integer not null,
    gateway     text,
    updated_at  timestamptz not null default now()
);
create index if not exists sensors_district_domain on sensors (district, domain);
