"""Incidents through the whole pipeline: simulators → Mosquitto → ingest → Kafka → alerts →
PostgreSQL, on a stack of its own, with the default rules (alerts/rules/default.yaml).

Two scenarios run together on the ~7,900-sensor load fleet: an accident on 30/4 street
(its detectors' speeds collapse one after the other) and a network cut that silences
every sensor of Ô Môn. Operators must see the accident as ONE incident holding every
speed-drop alert of the street, not one list item per detector, and Ô Môn as one
district-offline incident with the sensors' offline alerts inhibited under it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.e2e_harness import City, publish_load, recent_base

LOAD_FLEET = Path(__file__).resolve().parent.parent / "simulators" / "fleets" / "load.toml"
SIM_MINUTES = 16


@pytest.fixture(scope="module")
def city() -> Iterator[City]:
    with City(ingest=1, process=1, alerts=1, prefix="cityops-incidents-",
              fleet_file=LOAD_FLEET, ingest_subscription="districts") as c:
        yield c


@pytest.fixture(scope="module")
def published(city: City, tmp_path_factory: pytest.TempPathFactory) -> City:
    span = SIM_MINUTES * 60_000
    start = recent_base(int(time.time() * 1000), span)
    stats = publish_load(
        city.settings, tmp_path_factory.mktemp("incidents") / "truth.bin", seed=16,
        start_ms=start, rate=3000, count=int(SIM_MINUTES * 60 * 116.4),
        scenarios=("accident:target=street_30_4,after=2m,duration=30m,every=10s,fade=0.002",
                   "offline:share=1,district=o_mon,after=4m"))
    assert stats.sent > 0
    return city


async def _wait_for(conn: asyncpg.Connection, sql: str, ok: object, within_s: float,
                    *args: object) -> object:
    deadline = time.monotonic() + within_s
    got = None
    while time.monotonic() < deadline:
        got = await conn.fetchval(sql, *args)
        if ok(got):  # type: ignore[operator]
            return got
        await asyncio.sleep(1)
    return got


async def test_an_accident_is_one_incident_not_a_storm(published: City) -> None:
    conn = await asyncpg.connect(published.settings.pg_dsn)
    try:
        n = await _wait_for(conn, "select count(*) from alerts where rule_id = 'speed_drop' "
                            "and landmark = 'street_30_4'", lambda v: v and v >= 10, 120)
        assert n and n >= 10, f"the accident raised {n} speed-drop alerts on 30/4 street"
        await asyncio.sleep(3)  # the alerts of the last poll join their incident
        rows = await conn.fetch(
            "select incident_id, count(*) as n from alerts where rule_id = 'speed_drop' "
            "and landmark = 'street_30_4' group by incident_id")
        (one,) = rows  # every speed-drop alert of the street: one incident, none outside
        assert one["incident_id"] is not None
        inc = await conn.fetchrow("select * from alert_incidents where incident_id = $1",
                                  one["incident_id"])
        assert inc["alert_count"] == one["n"] and inc["sensor_count"] == one["n"]
        assert inc["group_key"] == "speed_drop|landmark=street_30_4"
        assert (inc["state"], inc["severity"]) == ("open", "warning")
        # what an operator's list shows for the street: a handful of items, not hundreds
        listed = await conn.fetchval(
            "select count(*) from alert_incidents where landmark = 'street_30_4' and "
            "state = 'open' and inhibited_by is null")
        assert 1 <= listed <= 3
    finally:
        await conn.close()


async def test_a_district_cut_off_inhibits_its_sensors_offline_alerts(published: City) -> None:
    conn = await asyncpg.connect(published.settings.pg_dsn)
    try:
        cause = await _wait_for(
            conn, "select incident_id from alert_incidents where rule_id = 'district_offline' "
            "and district = 'o_mon' and state = 'open'", lambda v: v is not None, 180)
        assert cause is not None, "no district_offline incident for Ô Môn"
        offline = await _wait_for(
            conn, "select count(*) from alerts where rule_id = 'sensor_offline' and "
            "district = 'o_mon' and state = 'active'", lambda v: v and v >= 160, 60)
        assert offline >= 160  # at least half of Ô Môn's 320 sensors
        await asyncio.sleep(6)  # the outage rule's slow clock and the inhibition pass
        rows = await conn.fetch(
            "select a.incident_id, i.inhibited_by, count(*) as n from alerts a "
            "join alert_incidents i using (incident_id) where a.rule_id = 'sensor_offline' "
            "and a.district = 'o_mon' and a.state = 'active' group by 1, 2")
        assert [(r["inhibited_by"]) for r in rows] == [cause], rows
        # the operators' list: the cause, not the hundreds of offline sensors
        listed = await conn.fetch(
            "select rule_id from alert_incidents where district = 'o_mon' and "
            "state = 'open' and inhibited_by is null and rule_id in "
            "('sensor_offline', 'district_offline')")
        assert [r["rule_id"] for r in listed] == ["district_offline"]
    finally:
        await conn.close()
