"""Incidents against the real PostgreSQL: grouping, storm control, inhibition,
announcement, operator actions and quiet resolution (alerts/incidents).

Each test uses rule ids of its own (the session's database is shared), so group keys and
inhibition never reach another test's rows.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from alerts.engine import Engine
from alerts.incidents.store import IncidentStore
from alerts.model import Alert, Signal, SignalKind
from alerts.ruleset import RuleSet, parse_rules
from alerts.store import AlertStore, create_pool
from cityops.registry import load_fleet
from cityops.settings import Settings

FLEET = load_fleet(Settings().fleet_file)


def _rid(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


def _rules(text: str) -> RuleSet:
    return parse_rules(text)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.pg_dsn)
    yield p
    await p.close()


def _raise(rule_id: str, sensor: str, *, severity: str = "warning", landmark: str = "",
           district: str = "ninh_kieu", source: str | None = None,
           kind: SignalKind = SignalKind.RAISE) -> Signal:
    return Signal(kind=kind, rule_id=rule_id, source=source or sensor,
                  at_ms=int(time.time() * 1000), severity=severity, title=f"{rule_id} {sensor}",
                  sensor_id=sensor if source is None else None, domain="traffic",
                  district=district, landmark=landmark, lat=10.03, lon=105.77)


async def _incidents(pool: asyncpg.Pool, rule_id: str) -> list[asyncpg.Record]:
    return await pool.fetch("select * from alert_incidents where rule_id = $1 "
                            "order by incident_id", rule_id)


async def test_a_street_of_alerts_is_one_incident_and_a_storm_collapses(
        pool: asyncpg.Pool) -> None:
    drop = _rid("drop")
    rules = _rules(f"""
rules:
  - id: {drop}
    type: anomaly
    metric: speed_kmh
    method: rate
    max_rate_per_s: 0.5
    group: {{by: [landmark], storm_per_min: 20}}
""")
    incidents = IncidentStore(pool, rules)
    store = AlertStore(pool, update_every_s=0, incidents=incidents)
    street = [_raise(drop, f"{drop}-s{i}", landmark="street_30_4") for i in range(296)]
    other = _raise(drop, f"{drop}-other", landmark="nguyen_van_cu")
    changes = []
    for i in range(0, len(street), 50):  # batches, as the service applies them
        changes += await store.apply(street[i:i + 50])
    changes += await store.apply([other])
    rows = await _incidents(pool, drop)
    assert [(r["landmark"], r["alert_count"], r["sensor_count"], r["active_count"])
            for r in rows] == [("street_30_4", 296, 296, 296), ("nguyen_van_cu", 1, 1, 1)]
    members = await pool.fetchval("select count(distinct incident_id) from alerts "
                                  "where rule_id = $1 and landmark = 'street_30_4'", drop)
    assert members == 1
    # 297 raises in a minute against a limit of 20: the alert changes collapse into the
    # incidents; what is published one by one is the incidents' changes
    assert incidents.storm.storming == {drop}
    assert incidents.storm.publishable(changes) == []
    assert rows[0]["storm"] is True
    published = store.take_incident_changes()
    street_id = rows[0]["incident_id"]
    street_changes = [c for c in published if c.incident.incident_id == street_id]
    assert street_changes[0].action == "opened"
    assert street_changes[-1].incident.alert_count == 296
    # clearing half the street's alerts leaves the incident open with the rest
    await store.apply([_raise(drop, s.source, landmark="street_30_4", kind=SignalKind.CLEAR)
                       for s in street[:148]])
    row = await pool.fetchrow("select * from alert_incidents where incident_id = $1",
                              street_id)
    assert (row["state"], row["active_count"], row["alert_count"]) == ("open", 148, 296)


async def test_under_the_storm_limit_alert_changes_are_published(pool: asyncpg.Pool) -> None:
    calm = _rid("calm")
    rules = _rules(f"""
rules:
  - id: {calm}
    type: absence
    group: {{by: [district], storm_per_min: 20}}
""")
    incidents = IncidentStore(pool, rules)
    store = AlertStore(pool, update_every_s=0, incidents=incidents)
    changes = await store.apply([_raise(calm, f"{calm}-{i}") for i in range(5)])
    assert len(incidents.storm.publishable(changes)) == 5
    (row,) = await _incidents(pool, calm)
    assert (row["district"], row["alert_count"], row["storm"]) == ("ninh_kieu", 5, False)


async def test_a_district_outage_inhibits_its_sensors_offline_alerts(pool: asyncpg.Pool) -> None:
    offline, outage = _rid("offline"), _rid("outage")
    rules = _rules(f"""
rules:
  - id: {offline}
    type: absence
    group: {{by: [district]}}
  - id: {outage}
    type: outage
    severity: major
    rule: {offline}
    per: district
    min_count: 3
    min_fraction: 0.1
inhibit:
  - source: {{rules: [{outage}]}}
    target: {{rules: [{offline}]}}
    equal: [district]
""")
    incidents = IncidentStore(pool, rules)
    store = AlertStore(pool, update_every_s=0, incidents=incidents)
    await store.apply([_raise(offline, f"{offline}-{i}", district="o_mon") for i in range(40)])
    await store.apply([_raise(offline, f"{offline}-b{i}", district="co_do") for i in range(2)])
    (sym,) = [r for r in await _incidents(pool, offline) if r["district"] == "o_mon"]
    listed = {i.incident_id for i, _ in await incidents.search(state="open", limit=1000)}
    assert sym["incident_id"] in listed
    # the outage rule reads the active offline alerts, as the service's slow clock does
    engine = Engine(rules, FLEET)
    active = await store.active([offline])
    signals = engine.correlate(active, int(time.time() * 1000), outages=True)
    assert [(s.kind, s.source, s.value) for s in signals] == [
        (SignalKind.RAISE, "district:o_mon", 40.0)]  # co_do's 2 stay under min_count
    await store.apply(signals)
    (cause,) = await _incidents(pool, outage)
    sym = await pool.fetchrow("select * from alert_incidents where incident_id = $1",
                              sym["incident_id"])
    assert sym["inhibited_by"] == cause["incident_id"]
    listed = {i.incident_id: n for i, n in await incidents.search(state="open", limit=1000)}
    assert sym["incident_id"] not in listed and listed[cause["incident_id"]] == 1
    detail = await incidents.detail(cause["incident_id"])
    assert detail is not None and [i["incident_id"] for i in detail["inhibited"]] == \
        [sym["incident_id"]]
    # every one of the 40 offline alerts is under the one inhibited incident
    under = await pool.fetchval("select count(*) from alerts a join alert_incidents i "
                                "using (incident_id) where a.rule_id = $1 and "
                                "i.inhibited_by = $2", offline, cause["incident_id"])
    assert under == 40
    # the cause resolved: what it held back is on the list again
    acted = await incidents.act(cause["incident_id"], "resolved", "op")
    assert acted is not None
    assert [c.incident.incident_id for c in acted.released] == [sym["incident_id"]]
    assert await pool.fetchval("select inhibited_by from alert_incidents where "
                               "incident_id = $1", sym["incident_id"]) is None


async def test_a_major_incident_on_a_street_inhibits_its_warnings(pool: asyncpg.Pool) -> None:
    jam, drop = _rid("jam"), _rid("drop")
    rules = _rules(f"""
rules:
  - id: {jam}
    type: threshold
    severity: major
    metric: speed_kmh
    op: "<"
    value: 10
  - id: {drop}
    type: anomaly
    metric: speed_kmh
    method: rate
    max_rate_per_s: 0.5
inhibit:
  - source: {{rules: [{jam}], min_severity: major}}
    target: {{rules: [{drop}], max_severity: warning}}
    equal: [landmark]
""")
    store = AlertStore(pool, update_every_s=0, incidents=IncidentStore(pool, rules))
    await store.apply([_raise(drop, f"{drop}-{i}", landmark="street_3_2") for i in range(4)]
                      + [_raise(drop, f"{drop}-x", landmark="hoa_binh")])
    await store.apply([_raise(jam, f"{jam}-1", severity="major", landmark="street_3_2")])
    (cause,) = await _incidents(pool, jam)
    got = {r["landmark"]: r["inhibited_by"] for r in await _incidents(pool, drop)}
    assert got == {"street_3_2": cause["incident_id"], "hoa_binh": None}


async def test_announcement_waits_for_the_group_wait(pool: asyncpg.Pool) -> None:
    now_rule, later_rule = _rid("now"), _rid("later")
    rules = _rules(f"""
rules:
  - id: {now_rule}
    type: absence
    severity: minor
    group: {{wait_s: 0}}
  - id: {later_rule}
    type: absence
    severity: minor
    group: {{wait_s: 1.5}}
""")
    incidents = IncidentStore(pool, rules)
    store = AlertStore(pool, update_every_s=0, incidents=incidents)
    await store.apply([_raise(now_rule, f"{now_rule}-1"), _raise(later_rule, f"{later_rule}-1")])
    actions = {(c.incident.rule_id, c.action) for c in store.take_incident_changes()}
    assert (now_rule, "announced") in actions and (later_rule, "announced") not in actions
    assert not [c for c in await incidents.tick() if c.incident.rule_id == later_rule
                and c.action == "announced"]
    await asyncio.sleep(1.6)
    announced = [c for c in await incidents.tick() if c.incident.rule_id == later_rule]
    assert [c.action for c in announced] == ["announced"]
    # once only
    assert not [c for c in await incidents.tick() if c.incident.rule_id == later_rule]


async def test_operators_act_on_the_incident_and_its_alerts(pool: asyncpg.Pool) -> None:
    rule = _rid("act")
    rules = _rules(f"""
rules:
  - id: {rule}
    type: absence
""")
    incidents = IncidentStore(pool, rules)
    store = AlertStore(pool, update_every_s=0, incidents=incidents)
    await store.apply([_raise(rule, f"{rule}-{i}", landmark="ctu") for i in range(3)])
    (inc,) = await _incidents(pool, rule)
    iid = inc["incident_id"]
    acked = await incidents.act(iid, "acknowledged", "an-operator", note="on it")
    assert acked is not None and acked.change.incident.acknowledged
    assert {a.alert.acknowledged for a in acked.alerts} == {True} and len(acked.alerts) == 3
    assigned = await incidents.act(iid, "assigned", "an-operator", assignee="team-2")
    assert assigned is not None and assigned.change.incident.assignee == "team-2"
    assert await pool.fetchval("select count(*) from alerts where incident_id = $1 and "
                               "assignee = 'team-2'", iid) == 3
    resolved = await incidents.act(iid, "resolved", "an-operator", note="towed away")
    assert resolved is not None and resolved.change.incident.state == "resolved"
    assert await pool.fetchval("select count(*) from alerts where incident_id = $1 and "
                               "state = 'active'", iid) == 0
    assert await incidents.act(iid, "commented", "an-operator", note="late") is None
    detail = await incidents.detail(iid)
    assert detail is not None
    actions = [(e["kind"], e["action"]) for e in detail["timeline"]]
    assert actions.count(("alert", "raised")) == 3
    assert [a for k, a in actions if k == "incident"] == [
        "opened", "announced", "acknowledged", "assigned", "resolved"]
    cleared_by = await pool.fetch("select distinct cleared_by from alerts where "
                                  "incident_id = $1", iid)
    assert [r["cleared_by"] for r in cleared_by] == ["an-operator"]
    # a new alert of the same cause opens a new incident (the old one is resolved)
    await store.apply([_raise(rule, f"{rule}-9", landmark="ctu")])
    assert len(await _incidents(pool, rule)) == 2


async def test_a_quiet_incident_resolves_after_its_interval(pool: asyncpg.Pool) -> None:
    rule = _rid("quiet")
    rules = _rules(f"""
rules:
  - id: {rule}
    type: absence
    group: {{interval_s: 1}}
""")
    incidents = IncidentStore(pool, rules)
    store = AlertStore(pool, update_every_s=0, incidents=incidents)
    await store.apply([_raise(rule, f"{rule}-1", landmark="airport")])
    await store.apply([_raise(rule, f"{rule}-1", landmark="airport", kind=SignalKind.CLEAR)])
    assert [c for c in await incidents.tick() if c.incident.rule_id == rule] == []
    # raised again within the interval: the same incident
    await store.apply([_raise(rule, f"{rule}-1", landmark="airport")])
    await store.apply([_raise(rule, f"{rule}-1", landmark="airport", kind=SignalKind.CLEAR)])
    (inc,) = await _incidents(pool, rule)
    assert (inc["alert_count"], inc["active_count"], inc["state"]) == (2, 0, "open")
    await asyncio.sleep(1.2)
    done = [c for c in await incidents.tick() if c.incident.rule_id == rule]
    assert [(c.action, c.incident.state, c.actor) for c in done] == [
        ("resolved", "resolved", "system")]


def test_alert_carries_its_incident() -> None:
    assert "incident_id" in Alert.__struct_fields__
