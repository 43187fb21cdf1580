"""Issue 14 through the whole real stack: every class of poison input, sent by devices on
their own topics between good readings, goes Mosquitto -> ingest -> Kafka -> processor ->
PostgreSQL. Every service stays up (none exits, none is restarted), each poison payload
is in ``deadletters`` with its own reason and its raw bytes intact, and every good reading
sent alongside is stored (counted, not sampled).

The inputs are the ones that stopped a service or were stored before issue 14: deep
nesting, invalid UTF-8, numbers no column holds, duplicate keys, a negative count, a NUL
byte (which PostgreSQL text cannot hold), and a gateway message of 1,000 bad readings
(one dead letter, not 1,000).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import asyncpg
import pytest

from cityops.registry import load_fleet
from ingest import samples
from ingest.normalize import InboundMessage, Normalizer
from processors.testing import row_keys
from tests.e2e_harness import City, publish_now
from tests.test_ingest_normalize import _lane_bytes, gateway_bytes, poison_elements

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def city() -> Iterator[City]:
    with City(ingest=1, process=1, alerts=1, prefix="cityops-poison-") as c:
        c.watch()
        yield c


def _cases(fleet, t0: int) -> list[tuple[str, bytes, str]]:  # type: ignore[no-untyped-def]
    """(topic, raw payload, expected reason), each published by the device that owns it."""
    topic, lane = _lane_bytes(fleet, t0)  # the lane sensor poison_elements writes for
    cases = [(topic, p, r) for _, p, r in poison_elements(fleet, t0)]
    cases.append((topic, lane.replace(b'"sensor": "', b'"sensor": "\x00'), "bad_json"))
    gw, members = next(iter(fleet.gateways().items()))
    amplifier = gateway_bytes(gw, t0, [b"0"] * 1_000)
    cases.append((samples.gateway_topic(members[0].district, gw), amplifier, "unknown_format"))
    return cases


async def test_poison_through_the_whole_stack_stops_nothing_and_loses_no_good_reading(
        city: City) -> None:
    s = city.settings
    fleet = load_fleet(s.fleet_file)
    t0 = int(time.time() * 1000) - 30_000
    cases = _cases(fleet, t0)
    goods = [s_ for s_ in fleet if s_.gateway is None and s_.vendor != "saomai"][:40]
    msgs: list[tuple[str, bytes]] = []
    for i, sensor in enumerate(goods):
        msgs.append(samples.device_message(sensor, t0 + i))
        if i < len(cases):
            msgs.append(cases[i][:2])
    assert len(cases) < len(goods)
    good, _ = Normalizer(fleet, s).normalize(
        [InboundMessage(t, p, t0) for t, p in msgs if (t, p) not in {c[:2] for c in cases}])
    want_rows = row_keys(good)
    assert len(want_rows) > len(goods)

    conn = await asyncpg.connect(s.pg_dsn)
    try:
        dl_before = await conn.fetchval("select coalesce(max(id), 0) from deadletters")
        await asyncio.to_thread(publish_now, s, msgs)
        deadline = time.monotonic() + 120
        stored: set[tuple[str, str, int]] = set()
        sensor_ids = list({e.sensor_id for e in good})
        letters: list[asyncpg.Record] = []
        while time.monotonic() < deadline:
            rows = await conn.fetch(
                "select sensor_id, metric, (extract(epoch from time) * 1000)::int8 "
                "from readings_named where sensor_id = any($1::text[]) and time >= $2",
                sensor_ids, datetime.fromtimestamp(t0 / 1000 - 3600, UTC))
            stored = {(r[0], r[1], r[2]) for r in rows} & want_rows
            letters = await conn.fetch("select reason, payload, detail from deadletters "
                                       "where id > $1 and service = 'ingest'", dl_before)
            if stored >= want_rows and len(letters) >= len(cases):
                break
            await asyncio.sleep(0.5)
        # Every good reading stored, once each.
        assert stored == want_rows, f"{len(want_rows - stored)} good readings missing"
        # Each poison payload dead-lettered once, with its own reason and its raw bytes.
        got = sorted((r["reason"], bytes(r["payload"])) for r in letters)
        assert got == sorted((reason, raw) for _, raw, reason in cases)
        assert all(r["detail"] for r in letters)
        # Nothing poison became a reading: the lane sensor's poison stored no row.
        sa_id = cases[0][0].rsplit("/", 1)[1]
        assert await conn.fetchval("select count(*) from readings_named where sensor_id = $1 "
                                   "and time >= $2", sa_id,
                                   datetime.fromtimestamp(t0 / 1000, UTC)) == 0
        assert await conn.fetchval("select count(*) from parked") == 0
    finally:
        await conn.close()
    # No service stopped: all alive, none restarted by the watcher.
    assert city.respawned == []
    assert all(w.alive for w in city.pipeline.workers), [
        city.pipeline.tail(w) for w in city.pipeline.workers if not w.alive]
