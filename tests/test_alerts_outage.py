"""The alerts worker rides out a database outage in-process: PostgreSQL is stopped under
it for ~12 s while a scripted incident's events arrive, then started again. The worker
must not exit, must stop consuming and say unhealthy while the database is away, and
afterwards raise the scripted alerts exactly once (one row, one "raised" audit entry,
one "raised" change on the alerts topic).

Two scripted sources, so both paths are covered: A's last events are sent the moment
the database stops (the worker usually evaluates them and holds the RAISE until the
database answers: the same signals are applied again), B's once the worker has noticed
the outage (they wait in Kafka and are read after it).

The database is a private PostgreSQL (its own cluster on a free port) so the session's
stack, used by other tests, is never stopped; Kafka is the session's broker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from alerts.model import decode_change
from alerts.testing import EventProducer, RunningService, make_event, now_ms
from cityops.settings import Settings
from cityops.stack import Stack
from tests.support import private_postgres

pytestmark = pytest.mark.timeout(240)

RUN = uuid.uuid4().hex[:6]
A, B = f"out{RUN}-a", f"out{RUN}-b"
OUTAGE_S = 12.0
RULES = f"""
version: 1
rules:
  - id: outage_burst
    type: count
    severity: critical
    match: {{sensors: [{A}, {B}]}}
    incidents: [intrusion]
    count: 3
    window_s: 900
    per: sensor
"""


@pytest.fixture(scope="module")
def own_pg(settings: Settings) -> Iterator[Stack]:
    """A private PostgreSQL (schema migrated); Kafka stays the session's."""
    with private_postgres(settings.kafka_port, "cityops-alerts-outage-") as st:
        yield st


async def _until(check, within: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.1)


async def test_worker_survives_database_outage_and_raises_once(own_pg: Stack,
                                                               tmp_path: Path) -> None:
    s = own_pg.settings
    pg = own_pg.server("postgres")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    svc = RunningService(s, rules, f"alerts-outage-{RUN}", checkpoint_s=0.2, tick_s=0.2,
                         update_every_s=0.0)
    service = await svc.start()
    task = svc._task
    assert task is not None
    changes = AIOKafkaConsumer(s.topics.alerts, bootstrap_servers=s.kafka_bootstrap,
                               auto_offset_reset="latest")
    await changes.start()
    await changes.getmany(timeout_ms=500)  # pin "latest" before anything is raised
    conn = await asyncpg.connect(s.pg_dsn)
    t0 = now_ms() - 120_000

    def hit(sensor: str, k: int):  # type: ignore[no-untyped-def]
        return make_event(sensor, t0 + k * 1000, domain="security", incident="intrusion")

    try:
        async with EventProducer(s) as producer:
            # phase 1, database up: one intrusion each, and its state checkpointed
            await producer.send(hit(A, 0), hit(B, 0))

            async def checkpointed() -> bool:
                n = await conn.fetchval("select count(*) from alert_rule_state where "
                                        "rule_id = 'outage_burst' and key = any($1)", [A, B])
                return bool(n == 2)
            await _until(checkpointed, 20, "phase 1 state checkpointed")
            await conn.close()

            # the outage
            await asyncio.to_thread(pg.down)
            down_at = time.monotonic()
            await producer.send(hit(A, 1), hit(A, 2))  # the worker reads these at once

            async def noticed() -> bool:
                assert not task.done(), "the alerts worker exited during the outage"
                return not service.healthy()
            await _until(noticed, 10, "the worker reports unhealthy while the DB is away")
            polled = service.records_polled
            await producer.send(hit(B, 1), hit(B, 2))  # these wait in Kafka
            while time.monotonic() - down_at < OUTAGE_S:
                assert not task.done(), "the alerts worker exited during the outage"
                assert not service.healthy()
                await asyncio.sleep(0.2)
            # no polling while the database is away: the backlog stays in Kafka
            assert service.records_polled == polled
            await asyncio.to_thread(pg.up)

            async def recovered() -> bool:
                assert not task.done(), "the alerts worker exited after the outage"
                return service.healthy()
            await _until(recovered, 30, "the worker is healthy again")

            conn = await asyncpg.connect(s.pg_dsn)

            async def raised_both() -> bool:
                n = await conn.fetchval("select count(*) from alerts where rule_id = "
                                        "'outage_burst' and source = any($1)", [A, B])
                return bool(n == 2)
            await _until(raised_both, 30, "both scripted alerts raised after the outage")
            # every record of the backlog read, and a checkpoint taken after it

            async def backlog_read() -> bool:
                return service.records_polled >= polled + 2
            await _until(backlog_read, 30, "the backlog read")

            async def settled() -> bool:
                n = await conn.fetchval(
                    "select count(*) from alert_rule_state where rule_id = 'outage_burst' "
                    "and key = $1 and jsonb_array_length(state->'hits') = 3", B)
                return bool(n == 1)
            await _until(settled, 20, "state after the outage checkpointed")

        rows = await conn.fetch("select alert_id, source, state, value from alerts "
                                "where rule_id = 'outage_burst' and source = any($1) "
                                "order by source", [A, B])
        assert [(r["source"], r["state"], r["value"]) for r in rows] == \
            [(A, "active", 3.0), (B, "active", 3.0)]
        for r in rows:
            actions = [a["action"] for a in await conn.fetch(
                "select action from alert_audit where alert_id = $1", r["alert_id"])]
            assert actions.count("raised") == 1, (r["source"], actions)
        published: dict[str, list[str]] = {A: [], B: []}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until both are seen and the topic is drained
            got = await changes.getmany(timeout_ms=1000)
            if not got and all(published.values()):
                break
            for msgs in got.values():
                for m in msgs:
                    ch = decode_change(m.value)
                    if ch.alert.rule_id == "outage_burst" and ch.alert.source in published:
                        published[ch.alert.source].append(ch.action)
        assert published == {A: ["raised"], B: ["raised"]}
        assert not task.done()
        assert service.db_outages >= 1
    finally:
        await changes.stop()
        if not conn.is_closed():
            await conn.close()
        await svc.stop()
