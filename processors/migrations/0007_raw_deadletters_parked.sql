-- Dead letters keep their payload as raw bytes, losslessly, whatever they contain.
--
-- Why: a payload is whatever a device or an attacker sent. As text, one NUL byte (which
-- PostgreSQL text cannot hold) made the dead letter's INSERT fail, the processor never
-- committed its offset, and every restart met the same record: storage stopped for the
-- whole city. bytea holds any byte sequence.
--
-- `payload` becomes bytea: the original bytes (utf-8 text as its UTF-8 bytes, base64 as the
-- bytes it encoded). `payload_encoding` still says how the payload travelled on the
-- dead-letter topic. Readers that want text use deadletter_payload(payload), which gives
-- the same (payload, payload_encoding) pair as before: utf-8 text when the bytes are valid
-- UTF-8 without NUL, base64 otherwise (processors/queries.py DEADLETTERS does).

-- Rows stored before: base64 payloads back to their bytes (a malformed one is kept as the
-- text it was), utf-8 payloads to their UTF-8 bytes.
create function pg_temp.deadletter_bytes(p text, enc text) returns bytea
language plpgsql immutable as $$
begin
    if enc = 'base64' then
        begin
            return decode(p, 'base64');
        exception when others then
            null;
        end;
    end if;
    return convert_to(p, 'UTF8');
end $$;

alter table deadletters
    alter column payload type bytea using pg_temp.deadletter_bytes(payload, payload_encoding);

create or replace function deadletter_payload(raw bytea, out payload text,
                                              out payload_encoding text)
language plpgsql immutable strict parallel safe as $$
begin
    if position('\x00'::bytea in raw) = 0 then
        begin
            payload := convert_from(raw, 'UTF8');
            payload_encoding := 'utf-8';
            return;
        exception when others then  -- not valid UTF-8
            null;
        end;
    end if;
    payload := translate(encode(raw, 'base64'), E'\n', '');
    payload_encoding := 'base64';
end $$;

-- Kafka records a consumer could not store or evaluate for a reason of their own (a data
-- error, not the database being away), after bounded retries: parked here, in the same
-- transaction as the rest of their batch, and their offset committed, so one bad record
-- costs one record, never the stream. The record is kept exactly as read from Kafka, so
-- it can be inspected and replayed once the cause is fixed. The unique key makes parking
-- idempotent when a batch is delivered again.
create table if not exists parked (
    id              bigserial primary key,
    parked_at       timestamptz not null default now(),
    service         text not null,          -- processor | alerts
    consumer_group  text not null,
    topic           text not null,
    kafka_partition integer not null,
    kafka_offset    bigint not null,
    kafka_timestamp timestamptz,
    kafka_key       bytea,
    payload         bytea,                  -- the record's value, raw; null for a tombstone
    error_class     text not null,
    error           text not null,
    attempts        integer not null,
    unique (consumer_group, topic, kafka_partition, kafka_offset)
);
create index if not exists parked_parked_at on parked (parked_at desc);
