"""The alerts service end to end: scripted events through the real Kafka broker, rules,
and the alert lifecycle in the real PostgreSQL, changes on the real alerts topic."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from alerts.model import decode_change
from alerts.rows import Rows
from alerts.store import AlertStore, create_pool
from alerts.testing import EventProducer, RunningService, make_event, now_ms
from cityops.settings import Settings
from ingest.contract import encode_event

RUN = uuid.uuid4().hex[:6]


def sid(name: str) -> str:
    return f"t{RUN}-{name}"


def _local_hhmm(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, ZoneInfo("Asia/Ho_Chi_Minh")).strftime("%H:%M")


NOW = now_ms()
# the geofence schedule: a window that contains NOW-3h but neither NOW-1h nor NOW
GEO_START, GEO_END = _local_hhmm(NOW - 3 * 3600_000 - 1800_000), _local_hhmm(NOW - 2 * 3600_000)

RULES = f"""
version: 1
rules:
  - id: congestion
    type: threshold
    severity: major
    title: "Congestion on {{landmark_name}} ({{value}} km/h)"
    match: {{sensors: [{sid("jam")}, {sid("restart")}, {sid("corr-jam")}]}}
    metric: speed_kmh
    op: "<"
    value: 10
    for_s: 300
    clear_value: 18
    clear_for_s: 60
  - id: flappy
    type: threshold
    severity: minor
    match: {{sensors: [{sid("flap")}, {sid("maint")}]}}
    metric: speed_kmh
    op: "<"
    value: 10
    clear_value: 18
    clear_for_s: 60
  - id: crowd
    type: threshold
    severity: major
    match: {{sensors: [{sid("corr-crowd")}]}}
    metric: crowd_density
    op: ">="
    value: 4
  - id: jam_and_crowd
    type: correlation
    severity: critical
    title: "Crowd and jam near {{landmark_name}}"
    rules: [crowd, congestion]
    radius_m: 1500
  - id: intrusions
    type: count
    severity: critical
    match: {{landmarks: [ctu]}}
    incidents: [intrusion]
    count: 3
    window_s: 15
    per: landmark
    escalate_after_s: 1
  - id: footfall
    type: anomaly
    severity: minor
    match: {{sensors: [{sid("ff")}]}}
    metric: footfall_in
    alpha: 0.1
    z: 6
    clear_z: 2
    min_samples: 20
    clear_after_n: 3
  - id: footfall_restart
    type: anomaly
    severity: minor
    match: {{sensors: [{sid("ff2")}]}}
    metric: footfall_in
    z: 6
    min_samples: 20
  - id: slow_minutes
    type: threshold
    severity: major
    match: {{sensors: [{sid("roll")}]}}
    input: rollup_1m
    metric: speed_kmh
    op: "<"
    value: 10
    for_s: 120
  - id: speed_jump
    type: anomaly
    method: rate
    severity: warning
    match: {{sensors: [{sid("rate")}]}}
    metric: speed_kmh
    max_rate_per_s: 1.0
    clear_after_n: 2
  - id: offline
    type: absence
    severity: warning
    match: {{sensors: [{sid("silent")}]}}
    silence_s: 2
  - id: poison_guard
    type: threshold
    severity: minor
    match: {{sensors: [{sid("p-good")}, {sid("p-eval")}, {sid("p-store")}]}}
    metric: speed_kmh
    op: "<"
    value: 10
  - id: night_zone
    type: geofence
    severity: critical
    zone: {{landmarks: [city_hall]}}
    schedule: {{start: "{GEO_START}", end: "{GEO_END}"}}
    incidents: [intrusion, door_forced]
    clear_after_s: 3600
"""


@pytest.fixture(scope="module")
async def rules_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("rules") / "rules.yaml"
    p.write_text(RULES)
    return p


@pytest.fixture(scope="module")
async def running(settings: Settings, rules_path: Path) -> AsyncIterator[RunningService]:
    svc = RunningService(settings, rules_path, f"alerts-test-{RUN}", update_every_s=0.0,
                         checkpoint_s=0.2, tick_s=0.2)
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture(scope="module")
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.pg_dsn)
    yield p
    await p.close()


@pytest.fixture(scope="module")
async def producer(settings: Settings) -> AsyncIterator[EventProducer]:
    async with EventProducer(settings) as p:
        yield p


async def alerts_of(pool: asyncpg.Pool, rule: str, source: str) -> list[dict[str, Any]]:
    rows = await pool.fetch("select * from alerts where rule_id = $1 and source = $2 "
                            "order by alert_id", rule, source)
    return [dict(r) for r in rows]


async def audit_of(pool: asyncpg.Pool, alert_id: int) -> list[str]:
    return [r["action"] for r in await pool.fetch(
        "select action from alert_audit where alert_id = $1 order by audit_id", alert_id)]


async def eventually(check: Callable[[], Any], within: float = 15.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s (last: {got!r})")
        await asyncio.sleep(0.1)


async def settle(svc: RunningService, seconds: float = 1.0) -> None:
    """Let the service drain what was produced (the test's own clock, no fixed result)."""
    await asyncio.sleep(seconds)


# --- threshold with duration, hysteresis, clear ---------------------------------------------
async def test_threshold_with_duration_raises_updates_and_clears(
        running: RunningService, producer: EventProducer, pool: asyncpg.Pool,
        settings: Settings) -> None:
    s = sid("jam")
    base = now_ms() - 900_000
    # 8 km/h from base: 5 minutes later (6th reading) it is congestion
    speeds = [8, 8, 8, 8, 8, 8, 9, 12, 25, 25]  # 9 updates, 12 in the band, 25 twice: clear
    times = [base + 60_000 * i for i in range(len(speeds))]
    consumer = AIOKafkaConsumer(settings.topics.alerts, bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="latest")
    await consumer.start()
    try:
        await consumer.seek_to_end()
        await producer.send(*[make_event(s, t, speed_kmh=v) for t, v in
                              zip(times[:5], speeds[:5], strict=True)])
        await settle(running)
        assert await alerts_of(pool, "congestion", s) == []  # 4 minutes is not 5
        await producer.send(make_event(s, times[5], speed_kmh=8))
        rows = await eventually(lambda: alerts_of(pool, "congestion", s))
        assert len(rows) == 1 and rows[0]["state"] == "active"
        assert rows[0]["severity"] == "major" and rows[0]["value"] == 8
        assert rows[0]["title"] == "Congestion on 30/4 street (8 km/h)"
        assert rows[0]["district"] == "ninh_kieu" and rows[0]["domain"] == "traffic"
        await producer.send(make_event(s, times[6], speed_kmh=9))
        await eventually(lambda: pool.fetchval(
            "select 1 from alerts where alert_id = $1 and value = 9", rows[0]["alert_id"]))
        await producer.send(*[make_event(s, t, speed_kmh=v) for t, v in
                              zip(times[7:], speeds[7:], strict=True)])

        async def cleared() -> list[dict[str, Any]]:
            r = await alerts_of(pool, "congestion", s)
            return r if r and r[0]["state"] == "cleared" else []

        rows = await eventually(cleared)
        assert len(rows) == 1
        assert rows[0]["cleared_by"] == "system" and rows[0]["value"] == 9
        assert await audit_of(pool, rows[0]["alert_id"]) == ["raised", "updated", "cleared"]
        published: list[tuple[str, int]] = []
        deadline = time.monotonic() + 10
        while len(published) < 3 and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                for m in msgs:
                    ch = decode_change(m.value)
                    if ch.alert.source == s:
                        published.append((ch.action, ch.alert.version))
        assert published == [("raised", 1), ("updated", 2), ("cleared", 3)]
    finally:
        await consumer.stop()


async def test_flapping_input_raises_one_alert(running: RunningService,
                                               producer: EventProducer,
                                               pool: asyncpg.Pool) -> None:
    s = sid("flap")
    base = now_ms() - 600_000
    # 50 readings 10 s apart flapping across the threshold and even past the clear value:
    # never 60 s on the normal side, so never cleared, never re-raised
    values = [8 if i % 2 == 0 else (14 if i % 4 == 1 else 22) for i in range(50)]
    for chunk in range(0, 50, 10):  # several batches, not one
        await producer.send(*[make_event(s, base + 10_000 * i, speed_kmh=v)
                              for i, v in list(enumerate(values))[chunk:chunk + 10]])
        await asyncio.sleep(0.15)
    await settle(running, 1.5)
    rows = await alerts_of(pool, "flappy", s)
    assert len(rows) == 1, rows
    assert rows[0]["state"] == "active"
    actions = await audit_of(pool, rows[0]["alert_id"])
    assert actions[0] == "raised" and set(actions[1:]) <= {"updated"}


# --- count in a window ------------------------------------------------------------------------
async def test_count_in_window_per_landmark_then_clears_and_escalates(
        running: RunningService, producer: EventProducer, pool: asyncpg.Pool) -> None:
    t = now_ms()
    a, b = sid("door-a"), sid("door-b")
    ev = [make_event(a, t - 3000, landmark="ctu", domain="security", incident="intrusion"),
          make_event(b, t - 2000, landmark="ctu", domain="security", incident="intrusion")]
    await producer.send(*ev)
    await producer.send(ev[1])  # a resend of the same incident counts once
    await settle(running)
    assert await alerts_of(pool, "intrusions", "landmark:ctu") == []
    await producer.send(make_event(a, t - 1000, landmark="ctu", domain="security",
                                   incident="intrusion"))
    rows = await eventually(lambda: alerts_of(pool, "intrusions", "landmark:ctu"))
    assert len(rows) == 1 and rows[0]["value"] == 3 and rows[0]["severity"] == "critical"
    assert rows[0]["sensor_id"] is None and rows[0]["landmark"] == "ctu"
    # critical and unacknowledged for more than escalate_after_s (1 s): escalated. The
    # window (15 s from t - 3 s) keeps it active long enough for that even on a loaded CI
    # machine (with 6 s it could clear before any escalation tick ran).
    esc = await eventually(lambda: pool.fetchval(
        "select escalation_level from alerts where alert_id = $1 and escalation_level > 0",
        rows[0]["alert_id"]))
    assert esc >= 1
    # the 15 s window empties: cleared by the clock
    async def cleared() -> bool:
        r = await alerts_of(pool, "intrusions", "landmark:ctu")
        return r[0]["state"] == "cleared"

    await eventually(cleared, within=30)
    actions = await audit_of(pool, rows[0]["alert_id"])
    assert actions[0] == "raised" and actions[-1] == "cleared" and "escalated" in actions


# --- statistical anomaly and rate of change -------------------------------------------------
async def test_ewma_anomaly_against_own_history(running: RunningService,
                                                producer: EventProducer,
                                                pool: asyncpg.Pool) -> None:
    s = sid("ff")
    base = now_ms() - 3600_000
    normal = [100 + (i % 5) - 2 for i in range(40)]
    await producer.send(*[make_event(s, base + 60_000 * i, landmark="ninh_kieu_wharf",
                                     domain="tourism", footfall_in=v)
                          for i, v in enumerate(normal)])
    await settle(running)
    assert await alerts_of(pool, "footfall", s) == []
    await producer.send(make_event(s, base + 60_000 * 40, landmark="ninh_kieu_wharf",
                                   domain="tourism", footfall_in=400))
    rows = await eventually(lambda: alerts_of(pool, "footfall", s))
    assert len(rows) == 1 and rows[0]["value"] == 400 and rows[0]["details"]["z"] > 6
    await producer.send(*[make_event(s, base + 60_000 * (41 + i), landmark="ninh_kieu_wharf",
                                     domain="tourism", footfall_in=100) for i in range(3)])

    async def cleared() -> bool:
        return (await alerts_of(pool, "footfall", s))[0]["state"] == "cleared"

    await eventually(cleared)


async def test_rate_of_change(running: RunningService, producer: EventProducer,
                              pool: asyncpg.Pool) -> None:
    s = sid("rate")
    base = now_ms() - 600_000
    speeds = [40, 41, 40, 10, 11, 11, 12]  # a 30 km/h fall in 10 s, then steady
    await producer.send(*[make_event(s, base + 10_000 * i, speed_kmh=v)
                          for i, v in enumerate(speeds)])
    rows = await eventually(lambda: alerts_of(pool, "speed_jump", s))
    assert rows[0]["value"] == 10 and rows[0]["details"]["z"] == pytest.approx(-3.0)

    async def cleared() -> bool:
        return (await alerts_of(pool, "speed_jump", s))[0]["state"] == "cleared"

    await eventually(cleared)
    assert len(await alerts_of(pool, "speed_jump", s)) == 1


# --- absence ------------------------------------------------------------------------------------
async def test_absence_raises_offline_and_clears_when_back(running: RunningService,
                                                           producer: EventProducer,
                                                           pool: asyncpg.Pool) -> None:
    s = sid("silent")
    await producer.send(make_event(s, now_ms(), speed_kmh=30))
    await settle(running, 1.0)
    assert await alerts_of(pool, "offline", s) == []
    rows = await eventually(lambda: alerts_of(pool, "offline", s), within=10)
    assert rows[0]["state"] == "active" and rows[0]["details"]["silent_s"] >= 2
    await producer.send(make_event(s, now_ms(), speed_kmh=30))

    async def cleared() -> bool:
        return (await alerts_of(pool, "offline", s))[0]["state"] == "cleared"

    await eventually(cleared)


# --- correlation across domains -----------------------------------------------------------------
async def test_crowd_and_jam_near_one_landmark_become_one_incident(
        running: RunningService, producer: EventProducer, pool: asyncpg.Pool) -> None:
    crowd, jam = sid("corr-crowd"), sid("corr-jam")
    base = now_ms() - 600_000
    await producer.send(make_event(crowd, base, landmark="night_market", domain="security",
                                   crowd_density=5.0))
    await eventually(lambda: alerts_of(pool, "crowd", crowd))
    await settle(running, 0.6)
    assert await alerts_of(pool, "jam_and_crowd", "landmark:night_market") == []
    # 30/4 street starts ~900 m from the night market
    await producer.send(*[make_event(jam, base + 60_000 * i, speed_kmh=5, lat=10.0300,
                                     lon=105.7790) for i in range(6)])
    rows = await eventually(lambda: alerts_of(pool, "jam_and_crowd", "landmark:night_market"))
    assert len(rows) == 1 and rows[0]["severity"] == "critical"
    crowd_id = (await alerts_of(pool, "crowd", crowd))[0]["alert_id"]
    jam_id = (await alerts_of(pool, "congestion", jam))[0]["alert_id"]
    assert rows[0]["details"]["members"] == sorted([crowd_id, jam_id])
    assert rows[0]["title"] == "Crowd and jam near Ninh Kieu night market"
    # the crowd disperses: the crowd alert clears, and with it the combined incident
    await producer.send(make_event(crowd, base + 60_000, landmark="night_market",
                                   domain="security", crowd_density=0.5))

    async def cleared() -> bool:
        r = await alerts_of(pool, "jam_and_crowd", "landmark:night_market")
        return r[0]["state"] == "cleared"

    await eventually(cleared)


# --- geofence and schedule -------------------------------------------------------------------
async def test_restricted_zone_on_schedule_only(running: RunningService,
                                                producer: EventProducer,
                                                pool: asyncpg.Pool) -> None:
    inside, outside = sid("gate-in"), sid("gate-out")
    now = now_ms()
    # the door at city hall forced outside the schedule (1 h ago): nothing
    await producer.send(make_event(inside, now - 3600_000, landmark="city_hall",
                                   domain="security", type="door_sensor",
                                   incident="door_forced"))
    # an intrusion inside the schedule but away from the zone (a campus camera): nothing
    await producer.send(make_event(outside, NOW - 3 * 3600_000, landmark="ctu",
                                   domain="security", incident="intrusion"))
    await settle(running)
    assert await alerts_of(pool, "night_zone", inside) == []
    assert await alerts_of(pool, "night_zone", outside) == []
    # inside the zone, inside the schedule: raised, then cleared because it is now over
    await producer.send(make_event(inside, NOW - 3 * 3600_000, landmark="city_hall",
                                   domain="security", type="door_sensor",
                                   incident="door_forced"))
    rows = await eventually(lambda: alerts_of(pool, "night_zone", inside))
    assert len(rows) == 1 and rows[0]["severity"] == "critical"
    assert await audit_of(pool, rows[0]["alert_id"]) in (["raised"], ["raised", "cleared"])

    async def cleared() -> bool:
        return (await alerts_of(pool, "night_zone", inside))[0]["state"] == "cleared"

    await eventually(cleared)


# --- maintenance window --------------------------------------------------------------------------
async def test_maintenance_window_silences_sensor(running: RunningService,
                                                  producer: EventProducer,
                                                  pool: asyncpg.Pool) -> None:
    s = sid("maint")
    store = AlertStore(pool)
    wid = await store.add_window("sensor", s, now_ms() - 1000, now_ms() + 600_000,
                                 "lane closed for works", "test")
    assert running.service and running.service.store
    await running.service.store.load_windows()  # what the service does every 5 s
    await producer.send(make_event(s, now_ms() - 5000, speed_kmh=3))
    await settle(running, 1.5)
    assert await alerts_of(pool, "flappy", s) == []
    assert await store.delete_window(wid)
    await running.service.store.load_windows()
    await producer.send(make_event(s, now_ms(), speed_kmh=3))
    rows = await eventually(lambda: alerts_of(pool, "flappy", s))
    assert len(rows) == 1


# --- restart in the middle -------------------------------------------------------------------
async def test_restart_keeps_open_alerts_and_rule_state(running: RunningService,
                                                        producer: EventProducer,
                                                        pool: asyncpg.Pool) -> None:
    s, flap, ff = sid("restart"), sid("flap"), sid("ff2")
    base = now_ms() - 1200_000
    # 3 of the 6 readings a congestion needs, then a restart
    await producer.send(*[make_event(s, base + 60_000 * i, speed_kmh=5) for i in range(3)])
    # a footfall history long enough for the anomaly rule (its state is a numpy blob)
    await producer.send(*[make_event(ff, base + 30_000 * i, landmark="ninh_kieu_wharf",
                                     domain="tourism", footfall_in=50 + i % 3)
                          for i in range(25)])
    await settle(running, 1.0)
    state = await eventually(lambda: pool.fetchval(
        "select state from alert_rule_state where rule_id = 'congestion' and key = $1", s))
    assert state["since"] == base and not state["firing"]
    open_before = await alerts_of(pool, "flappy", flap)
    assert len(open_before) == 1 and open_before[0]["state"] == "active"
    await running.stop()
    # events produced while the service is down are not lost
    await producer.send(*[make_event(s, base + 60_000 * i, speed_kmh=5) for i in range(3, 6)])
    await running.start()
    rows = await eventually(lambda: alerts_of(pool, "congestion", s))
    assert len(rows) == 1 and rows[0]["first_event_time"] == datetime.fromtimestamp(
        (base + 300_000) / 1000, UTC)
    # the footfall history survived: the first reading after the restart is judged by it
    await producer.send(make_event(ff, base + 30_000 * 25, landmark="ninh_kieu_wharf",
                                   domain="tourism", footfall_in=500))
    rows = await eventually(lambda: alerts_of(pool, "footfall_restart", ff))
    assert rows[0]["value"] == 500 and rows[0]["details"]["z"] > 6
    # the open flapping alert is updated after the restart, not raised again
    await producer.send(make_event(flap, now_ms() - 1000, speed_kmh=7))
    await eventually(lambda: pool.fetchval(
        "select 1 from alerts where alert_id = $1 and value = 7", open_before[0]["alert_id"]))
    assert len(await alerts_of(pool, "flappy", flap)) == 1


# --- windows computed from the events ------------------------------------------------------
async def test_threshold_over_one_minute_windows_of_raw_events(
        running: RunningService, producer: EventProducer, pool: asyncpg.Pool) -> None:
    """The window rule reads the minute's mean, computed by the alerts engine from the raw
    events (no rollup partials on the aggregates topic), one value per closed minute."""
    s = sid("roll")
    b0 = (now_ms() // 60_000 - 10) * 60_000

    def at(minute: int, second: int, speed: float) -> Any:
        return make_event(s, b0 + minute * 60_000 + second * 1000, speed_kmh=speed)

    # minute 0: a slow reading and a fast one, mean 24 km/h: not slow (judged reading by
    # reading, minute 0 would start the slow spell); minute 1 arrives before the rest of
    # minute 0 (out of order, inside the lateness): still counted in minute 0
    await producer.send(at(0, 5, 8.0), at(1, 1, 5.0), at(0, 40, 40.0))
    # minutes 1-3 slow (mean 5): slow since the end of minute 1, for 120 s at minute 3's end
    await producer.send(at(1, 30, 5.0), at(2, 5, 4.0), at(2, 35, 6.0), at(3, 5, 5.0))
    await settle(running)
    assert await alerts_of(pool, "slow_minutes", s) == []
    await producer.send(at(3, 35, 5.0), at(4, 20, 30.0))  # minute 4 closes minute 3
    rows = await eventually(lambda: alerts_of(pool, "slow_minutes", s))
    assert len(rows) == 1 and rows[0]["value"] == 5.0
    assert rows[0]["first_event_time"] == datetime.fromtimestamp((b0 + 240_000) / 1000, UTC)


# --- bad input, rule reload -------------------------------------------------------------------
async def test_undecodable_message_goes_to_dead_letter(running: RunningService,
                                                       producer: EventProducer,
                                                       settings: Settings) -> None:
    from ingest.contract import decode_deadletter

    consumer = AIOKafkaConsumer(settings.topics.deadletter,
                                bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="latest")
    await consumer.start()
    try:
        await consumer.seek_to_end()
        key = sid("garbage").encode()
        await producer.send_raw(b'{"v": 1, "sensor_id": 42', key)
        found = None
        deadline = time.monotonic() + 10
        while found is None and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=300)).values():
                for m in msgs:
                    dl = decode_deadletter(m.value)
                    if dl.sensor_id == key.decode():
                        found = dl
        assert found is not None and found.service == "alerts" and found.reason == "bad_json"
        assert found.payload == '{"v": 1, "sensor_id": 42'
    finally:
        await consumer.stop()


async def test_rules_file_hot_reload_and_bad_file_keeps_last_good(
        running: RunningService, rules_path: Path, producer: EventProducer,
        pool: asyncpg.Pool) -> None:
    assert running.service and running.service.engine
    s = sid("reload")
    engine = running.service.engine
    added = RULES + f"""
  - id: hot_added
    type: threshold
    severity: info
    match: {{sensors: [{s}]}}
    metric: occupancy
    op: ">"
    value: 0.9
"""
    await asyncio.to_thread(rules_path.write_text, added)
    await eventually(lambda: asyncio.sleep(0, "hot_added" in engine.evaluators))
    assert "congestion" in engine.evaluators
    await producer.send(make_event(s, now_ms(), occupancy=0.95))
    await eventually(lambda: alerts_of(pool, "hot_added", s))
    # a broken edit: refused, the last good rules keep running
    broken = added.replace("metric: occupancy", "metric: occupancyy")
    await asyncio.to_thread(rules_path.write_text, broken)
    await eventually(lambda: asyncio.sleep(0, running.service.rules_file.last_error))
    err = running.service.rules_file.last_error
    assert "rule 'hot_added'" in err and "field 'metric'" in err and "occupancyy" in err
    assert "hot_added" in engine.evaluators
    assert len(engine.evaluators) == RULES.count("\n  - id: ") + 1
    await asyncio.to_thread(rules_path.write_text, RULES)
    await eventually(lambda: asyncio.sleep(0, "hot_added" not in engine.evaluators))


# --- poison records: parked or skipped, never a crash loop ---------------------------------
async def test_poison_record_is_parked_and_a_refused_signal_skipped_while_others_go_on(
        running: RunningService, producer: EventProducer, pool: asyncpg.Pool,
        settings: Settings) -> None:
    """One record makes rule evaluation raise, another's signal makes the alert store raise
    a data error: both cost only themselves; the good record next to them raises its alert,
    and the service keeps running."""
    from prometheus_client import REGISTRY

    svc = running.service
    assert svc is not None and svc.engine is not None and svc.store is not None
    engine, store = svc.engine, svc.store
    real_evaluate, real_apply = engine.evaluate, store.apply
    bad_eval, bad_store = sid("p-eval"), sid("p-store")

    def evaluate(events: list[Any], source: str = "events") -> list[Any]:
        # the service hands over decoded columns (``alerts.rows.Rows``), tests Events
        if any(bad_eval in (e.sensor_ids() if isinstance(e, Rows) else [e.sensor_id])
               for e in events):
            raise ZeroDivisionError("rule exploded on this record")
        return real_evaluate(events, source)

    async def apply(signals: Any) -> Any:
        if any(s.source == bad_store for s in signals):
            raise asyncpg.exceptions.NumericValueOutOfRangeError("value out of range")
        return await real_apply(signals)

    def parked(stage: str) -> float:
        return REGISTRY.get_sample_value("cityops_alerts_parked_total", {"stage": stage}) or 0.0

    before = {st: parked(st) for st in ("evaluate", "store")}
    engine.evaluate = evaluate  # type: ignore[method-assign]
    store.apply = apply  # type: ignore[method-assign]
    try:
        t = now_ms()
        poisoned = make_event(bad_eval, t, speed_kmh=3.0)
        await producer.send(poisoned, make_event(sid("p-good"), t, speed_kmh=4.0),
                            make_event(bad_store, t, speed_kmh=5.0))
        raised = await eventually(lambda: alerts_of(pool, "poison_guard", sid("p-good")))
        assert raised[0]["state"] == "active"
        row = await eventually(lambda: pool.fetchrow(
            "select * from parked where consumer_group = $1 and kafka_key = $2",
            running.group, bad_eval.encode()))
        assert row["service"] == "alerts" and row["topic"] == settings.topics.events
        assert row["error_class"] == "ZeroDivisionError"
        assert row["error"] == "rule exploded on this record"
        assert bytes(row["payload"]) == encode_event(poisoned)  # the raw Kafka bytes
        await eventually(lambda: _true(parked("store") - before["store"] >= 1))
        assert parked("evaluate") - before["evaluate"] == 1
        assert await alerts_of(pool, "poison_guard", bad_eval) == []
        assert await alerts_of(pool, "poison_guard", bad_store) == []
        assert svc.healthy() and running._task is not None and not running._task.done()
    finally:
        engine.evaluate = real_evaluate  # type: ignore[method-assign]
        store.apply = real_apply  # type: ignore[method-assign]
    # Once the cause is gone other sources raise as usual. (The skipped raise itself is not
    # retried: the rule's state holds it as raised until its condition clears.)
    await producer.send(make_event(sid("p-good"), now_ms(), speed_kmh=20.0),
                        make_event(bad_eval, now_ms(), speed_kmh=2.0))
    await eventually(lambda: alerts_of(pool, "poison_guard", bad_eval))


async def _true(value: bool) -> bool:
    return value
