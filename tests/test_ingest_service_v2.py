"""The ingest service producing event contract v2 against the real Mosquitto and Kafka of
the session stack: at most one Kafka record per MQTT message (exactly one per gateway
message, single-reading messages coalesced per partition), every reading there once,
every bad reading in the dead-letter topic."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner

from cityops.registry import Fleet
from cityops.settings import Settings
from ingest import samples
from ingest.contract import decode_batches, decode_deadletter
from ingest.normalize import InboundMessage, Normalizer
from ingest.service import IngestService
from tests.test_ingest_service import (
    KafkaReader,
    base_time,
    fleet,  # noqa: F401 (fixture)
    own_group,
    publish_all,
    running,
    stop,
)

pytestmark = pytest.mark.timeout(240)


def rows_of(records: list) -> list[tuple[str, int]]:
    out = []
    for r in records:
        c = decode_batches([r.value])
        out += [(c.sensor_ids[s], t) for s, t in zip(c.row_sensor.tolist(),
                                                     c.row_time.tolist(), strict=True)]
    return out


async def test_v2_gateway_message_is_one_record_and_singles_share_partition_records(
        settings: Settings, fleet: Fleet) -> None:  # noqa: F811
    st = own_group(settings).replace(ingest_contract_version=2)
    t0 = base_time()
    gateways = list(fleet.gateways().items())
    gw_msgs = [samples.gateway_message(gw, m, t0 + k) for k, (gw, m) in enumerate(gateways)]
    # One gateway message with one bad reading: the others go on, one dead letter.
    bad_gw, bad_members = gateways[0]
    docs: list = [samples.reading(s, t0 + 100) for s in bad_members]
    docs[1] = 42
    gw_msgs.append(samples.gateway_message(bad_gw, bad_members, t0 + 100, readings=docs))
    direct = [s for s in fleet if s.gateway is None]
    singles = [samples.device_message(s, t0 + 200 + k) for k, s in enumerate(direct)]
    bad_single = (samples.topic_of(direct[0]), b'{"sensor": ')
    singles.append(bad_single)
    norm = Normalizer(fleet, st)
    bad_gw_rows = {(e.sensor_id, e.event_time) for e in norm.normalize(
        [InboundMessage(*gw_msgs[-1], t0)])[0]}
    want = {}
    for topic, payload in gw_msgs + singles:
        events, _ = norm.normalize([InboundMessage(topic, payload, t0)])
        for e in events:
            want[(e.sensor_id, e.event_time)] = e
    assert len(want) == sum(len(m) for _, m in gateways) + len(bad_members) - 1 + len(direct)

    parts: list[int] = []
    service = IngestService(st, f"v2-{uuid.uuid4().hex[:6]}")
    async with KafkaReader(st, st.topics.events) as events, \
            KafkaReader(st, st.topics.deadletter) as dlq:
        parts = sorted(tp.partition for tp in events.consumer.assignment())
        task = await running(service)
        try:
            # Gateways first and on their own, so their records are theirs alone.
            await asyncio.to_thread(publish_all, st, gw_msgs)
            gw_keys = {gw for gw, _ in gateways}
            await events.until(lambda rs: sum(r.key.decode() in gw_keys for r in rs)
                               >= len(gw_msgs))
            await asyncio.to_thread(publish_all, st, singles)
            records = await events.until(lambda rs: want.keys() <= set(rows_of(rs)))
            letters = await dlq.until(lambda rs: len(rs) >= 2)
        finally:
            await stop(service, task)

    got = rows_of(records)
    assert sorted(got) == sorted(want), "every reading once, none lost, none twice"
    assert all(r.value[:1] != b"{" for r in records), "v2 records only"
    partition = DefaultPartitioner()
    route = {s.sensor_id: s.gateway or s.sensor_id for s in fleet}
    gw_records = [r for r in records if r.key.decode() in gw_keys]
    single_records = [r for r in records if r.key.decode() not in gw_keys]
    # Exactly one record per gateway message, holding that message's good readings.
    assert len(gw_records) == len(gw_msgs)
    for r in gw_records:
        assert r.partition == partition(r.key, parts, parts)
        c = decode_batches([r.value])
        assert {route[s] for s in c.sensor_ids} == {r.key.decode()}
        assert r.timestamp == int(c.row_receive_time[0])
    assert len(bad_gw_rows) == len(bad_members) - 1
    assert sum(set(rows_of([r])) == bad_gw_rows for r in gw_records) == 1
    # Single-reading messages: at most one record each, on their sensor's partition.
    assert 1 <= len(single_records) <= len(direct)
    for r in single_records:
        for sid, _ in rows_of([r]):
            assert partition(route[sid].encode(), parts, parts) == r.partition
        assert partition(r.key, parts, parts) == r.partition
    assert len(records) <= len(gw_msgs) + len(singles) - 1  # Kafka records per MQTT message <= 1
    # Every bad reading is in the dead-letter topic with its reason.
    dead = [decode_deadletter(r.value) for r in letters]
    gw_letter = next(d for d in dead if d.bad_readings)
    assert (gw_letter.bad_readings, gw_letter.reasons[0].split(":")[0]) == (1, "#1 unknown_format")
    assert any(d.reason == "bad_json" and d.payload == bad_single[1].decode() for d in dead)
    assert service.stats.events == len(want)
    assert service.stats.acked_messages == len(gw_msgs) + len(singles)
