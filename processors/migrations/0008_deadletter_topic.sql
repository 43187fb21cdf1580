-- A dead letter's idempotency key names its topic: (kafka_topic, kafka_partition,
-- kafka_offset), not (kafka_partition, kafka_offset).
--
-- Why: partition and offset alone are unique only within one topic. A second dead-letter
-- topic (another agency's, a test's, a topic deleted and created again after an incident)
-- hands out the same (partition, offset) pairs, and `on conflict do nothing` then dropped
-- its letters in silence, as duplicates of letters they were not. Rows stored before this
-- migration came from the one default topic.
alter table deadletters add column if not exists kafka_topic text not null
    default 'cityops.deadletter';
alter table deadletters alter column kafka_topic drop default;
alter table deadletters drop constraint if exists deadletters_kafka_partition_kafka_offset_key;
create unique index if not exists deadletters_kafka_source
    on deadletters (kafka_topic, kafka_partition, kafka_offset);
