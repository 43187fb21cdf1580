"""The alerts producer after its producer id became unusable (a broker that lost records
it had acknowledged, as Apache Kafka can after an unclean leader election or a machine
crash before the OS wrote its page cache back): the broker then refuses every batch of
that producer with OutOfOrderSequenceNumber. ``publish`` must renew the producer and
deliver each change exactly once instead of failing (which ended the worker in the fault
matrix).

The refusal is provoked on the session broker without restarting it (other tests use it):
the producer's sequence number for the partition is moved ahead of what the broker holds,
which is exactly the state a broker that lost acknowledged records leaves it in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from alerts.model import Alert, AlertChange, decode_change
from alerts.service import AlertService
from cityops.settings import Settings, Topics


def _change(alert_id: int, action: str = "raised") -> AlertChange:
    now = int(time.time() * 1000)
    alert = Alert(alert_id=alert_id, rule_id="kafka_restart_test", source=f"s{alert_id}",
                  severity="minor", state="active", acknowledged=False, title="t",
                  raised_at=now, updated_at=now)
    return AlertChange(action=action, actor="rules", at=now, alert=alert)


async def _read_all(settings: Settings, topic: str, expect: int,
                    within_s: float = 20.0) -> list[AlertChange]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[AlertChange] = []
    try:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            data = await consumer.getmany(timeout_ms=200)
            for msgs in data.values():
                out.extend(decode_change(m.value) for m in msgs)
            if len(out) >= expect:  # and a moment more, to see a duplicate if one comes
                await asyncio.sleep(0.5)
                for msgs in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(decode_change(m.value) for m in msgs)
                break
    finally:
        await consumer.stop()
    return out


async def test_publish_renews_a_producer_the_broker_refuses(settings: Settings) -> None:
    topic = f"cityops.test-alerts-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:  # the broker never auto-creates topics. One partition: Apache Kafka refuses a
        # sequence gap only on a partition that holds this producer's state, and the
        # first publish below gives state to the partition of alert 1 alone.
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    s = dataclasses.replace(settings, topics=Topics(alerts=topic))
    service = AlertService(s)
    service.producer = first = service._new_producer()
    await first.start()
    try:
        await service.publish([_change(1)])  # sets the partitions' sequence numbers
        parts = sorted(await first.partitions_for(topic))
        txn = first._sender._txn_manager  # the idempotence state aiokafka keeps per partition
        for p in parts:
            txn.increment_sequence_number(TopicPartition(topic, p), 7)

        await service.publish([_change(2), _change(3), _change(2, "updated")])

        assert service.producer_renewals == 1
        assert service.producer is not first
        got = await _read_all(s, topic, expect=4)
        seen = [(c.alert.alert_id, c.action) for c in got]
        assert sorted(seen) == sorted([(1, "raised"), (2, "raised"), (3, "raised"),
                                       (2, "updated")]), seen
        # one alert's changes stay in order (same key, same partition)
        assert seen.index((2, "raised")) < seen.index((2, "updated"))
    finally:
        assert service.producer is not None
        await service.producer.stop()
        if service.producer is not first:
            await first.stop()
