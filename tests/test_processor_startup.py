"""The processor starts before its database: it waits, then migrates and stores.

Services of an operations center come up in any order (a host reboot, a rolling
deploy). Before, ``cityops process`` exited when PostgreSQL did not answer at start, and
its runtime restarted it over and over (32 times in one 30 s outage of the fault
matrix). The database here is a private PostgreSQL (initialised, then stopped), so the
session's stack is never touched; Kafka is the session's broker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from cityops.settings import Settings
from cityops.stack import Stack
from cityops.stack.kafka import create_topics
from processors.service import serve
from processors.testing import make_stream
from tests.support import free_port, private_postgres
from tests.test_processors import count_rows, private, produce, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def own_pg(settings: Settings) -> Iterator[Stack]:
    """A private PostgreSQL, initialised and then stopped; Kafka stays the session's."""
    with private_postgres(settings.kafka_port, "cityops-process-startup-") as st:
        st.server("postgres").down()
        yield st


async def test_waits_for_the_database_then_migrates_and_stores(own_pg: Stack) -> None:
    tag = f"st{uuid.uuid4().hex[:8]}"
    s = private(own_pg.settings, tag)
    await create_topics(s)
    stream = make_stream(tag, int(time.time() * 1000) - 60_000, sensors=4, hours=0.25,
                         interval_s=15, seed=3)
    await produce(s, stream.all)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(s, stop))
    try:
        await asyncio.sleep(3.0)
        assert not task.done(), "the processor exited while its database was down"
        await asyncio.to_thread(own_pg.server("postgres").up)
        conn = await asyncpg.connect(s.pg_dsn)
        try:
            expected = len(stream.reading_rows())

            async def stored() -> bool:
                assert not task.done(), "the processor exited"
                return await count_rows(conn, tag) == expected
            await wait_for(stored, 60, "every reading stored after the database came up")
        finally:
            await conn.close()
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def test_stop_while_waiting_for_the_database_returns_at_once(settings: Settings) -> None:
    # a port nobody listens on: the database never answers
    s = private(settings, f"sw{uuid.uuid4().hex[:8]}", pg_port=free_port())
    stop = asyncio.Event()
    task = asyncio.create_task(serve(s, stop))
    await asyncio.sleep(1.5)
    assert not task.done(), "the processor exited while its database was unreachable"
    stop.set()
    t0 = time.monotonic()
    assert await asyncio.wait_for(task, 10) == 0
    assert time.monotonic() - t0 < 6.0  # the back-off is capped at 5 s and stop cuts it
