"""The console's REST API and live stream against the real stack: login, roles, CSRF,
tokens, operator actions with their audit trail, maintenance windows, SSE, sensors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from alerts.console.auth import create_user
from alerts.model import Signal, SignalKind
from alerts.store import AlertStore, create_pool
from alerts.testing import ConsoleServer, now_ms
from cityops.settings import PROJECT_ROOT, Settings
from tests.support import free_port

RUN = uuid.uuid4().hex[:6]
PASSWORDS = {"viewer": "viewer-pass-1", "operator": "operator-pass-1",
             "supervisor": "supervisor-pass-1"}


def user(role: str) -> str:
    return f"{role}-{RUN}"


@pytest.fixture(scope="module")
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.pg_dsn)
    for role, pw in PASSWORDS.items():
        await create_user(p, user(role), pw, role)
    yield p
    await p.close()


@pytest.fixture(scope="module")
async def console(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[ConsoleServer]:
    srv = ConsoleServer(settings, free_port())
    await srv.start()
    yield srv
    await srv.stop()


async def login(console: ConsoleServer, role: str) -> httpx.AsyncClient:
    c = httpx.AsyncClient(base_url=console.url, timeout=10)
    r = await c.post("/api/login", json={"username": user(role), "password": PASSWORDS[role]})
    assert r.status_code == 200, r.text
    c.headers["X-CSRF-Token"] = r.json()["csrf"]
    return c


@contextlib.asynccontextmanager
async def logged_in(console: ConsoleServer, role: str) -> AsyncIterator[httpx.AsyncClient]:
    c = await login(console, role)
    try:
        yield c
    finally:
        await c.aclose()


async def raise_alert(pool: asyncpg.Pool, name: str, severity: str = "major") -> int:
    """An alert as the alerts service raises it (same store code path)."""
    store = AlertStore(pool)
    sig = Signal(kind=SignalKind.RAISE, rule_id="api_test", source=f"{RUN}-{name}",
                 at_ms=now_ms(), severity=severity, title=f"Test alert {name}",
                 sensor_id=f"{RUN}-{name}", domain="traffic", district="ninh_kieu",
                 landmark="street_30_4", lat=10.03, lon=105.77, value=5.0)
    changes = await store.apply([sig])
    assert [c.action for c in changes] == ["raised"]
    return changes[0].alert.alert_id


async def test_login_rejects_wrong_password_and_unknown_user(console: ConsoleServer) -> None:
    async with httpx.AsyncClient(base_url=console.url) as c:
        r = await c.post("/api/login", json={"username": user("operator"), "password": "nope"})
        assert r.status_code == 401 and "cityops_session" not in r.cookies
        r = await c.post("/api/login", json={"username": "nobody-" + RUN, "password": "x" * 9})
        assert r.status_code == 401
        assert (await c.get("/api/alerts")).status_code == 401
        r = await c.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        # a forged cookie is not a session
        c.cookies.set("cityops_session", "eyJ1IjoiYWRtaW4iLCJyIjoic3VwZXJ2aXNvciIsImV4cCI6OX0="
                      ".forged")
        assert (await c.get("/api/me")).status_code == 401


async def test_passwords_are_stored_hashed(pool: asyncpg.Pool) -> None:
    h = await pool.fetchval("select password_hash from console_users where username = $1",
                            user("operator"))
    assert h.startswith("$argon2id$") and PASSWORDS["operator"] not in h


async def test_roles_decide_who_may_act_and_audit_records_who(
        console: ConsoleServer, pool: asyncpg.Pool) -> None:
    aid = await raise_alert(pool, "roles")
    viewer = await login(console, "viewer")
    operator = await login(console, "operator")
    supervisor = await login(console, "supervisor")
    try:
        assert (await viewer.get(f"/api/alerts/{aid}")).status_code == 200
        r = await viewer.post(f"/api/alerts/{aid}/acknowledge")
        assert r.status_code == 403 and "operator" in r.json()["detail"]
        # the operator's cookie without the CSRF header is refused
        r = await operator.post(f"/api/alerts/{aid}/acknowledge",
                                headers={"X-CSRF-Token": ""})
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
        r = await operator.post(f"/api/alerts/{aid}/acknowledge", json={"note": "on it"})
        assert r.status_code == 200
        body = r.json()
        assert body["acknowledged"] and body["acked_by"] == user("operator")
        assert body["state"] == "active"
        r = await operator.post(f"/api/alerts/{aid}/comment", json={"note": "police informed"})
        assert r.status_code == 200
        assert (await operator.post(f"/api/alerts/{aid}/clear")).status_code == 403
        assert (await operator.post(f"/api/alerts/{aid}/assign",
                                    json={"assignee": "x"})).status_code == 403
        r = await supervisor.post(f"/api/alerts/{aid}/assign", json={"assignee": "team-b"})
        assert r.status_code == 200 and r.json()["assignee"] == "team-b"
        r = await supervisor.post(f"/api/alerts/{aid}/clear", json={"note": "resolved"})
        assert r.status_code == 200 and r.json()["state"] == "cleared"
        assert r.json()["cleared_by"] == user("supervisor")
        assert (await supervisor.post(f"/api/alerts/{aid}/clear")).status_code == 409
        assert (await supervisor.post("/api/alerts/999999999/clear")).status_code == 404
        detail = (await viewer.get(f"/api/alerts/{aid}")).json()
        trail = [(a["actor"], a["action"], a["detail"].get("note")) for a in detail["audit"]]
        assert trail == [("system", "raised", None),
                         (user("operator"), "acknowledged", "on it"),
                         (user("operator"), "commented", "police informed"),
                         (user("supervisor"), "assigned", None),
                         (user("supervisor"), "cleared", "resolved")]
    finally:
        for c in (viewer, operator, supervisor):
            await c.aclose()


async def test_filters(console: ConsoleServer, pool: asyncpg.Pool) -> None:
    aid = await raise_alert(pool, "filters", severity="critical")
    async with logged_in(console, "viewer") as c:
        got = (await c.get("/api/alerts", params={"state": "active", "severity": "critical",
                                                  "district": "ninh_kieu"})).json()
        assert aid in [a["alert_id"] for a in got]
        assert all(a["severity"] == "critical" and a["state"] == "active" for a in got)
        got = (await c.get("/api/alerts", params={"district": "cai_rang"})).json()
        assert aid not in [a["alert_id"] for a in got]
        r = await c.get("/api/alerts", params={"severity": "apocalyptic"})
        assert r.status_code == 422


async def test_read_only_tokens_for_other_agencies(console: ConsoleServer,
                                                   pool: asyncpg.Pool) -> None:
    aid = await raise_alert(pool, "token")
    async with logged_in(console, "supervisor") as sup:
        r = await sup.post("/api/tokens", json={"agency": "water-board"})
        assert r.status_code == 201
        token = r.json()["token"]
    async with logged_in(console, "operator") as op:
        assert (await op.post("/api/tokens", json={"agency": "x-agency"})).status_code == 403
    stored = await pool.fetchval("select token_hash from api_tokens where agency='water-board'")
    assert token not in stored
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=console.url, headers=auth) as c:
        assert aid in [a["alert_id"] for a in (await c.get("/api/alerts")).json()]
        assert (await c.get("/api/latest")).status_code == 200
        r = await c.post(f"/api/alerts/{aid}/acknowledge")
        assert r.status_code == 403
        assert (await c.get("/api/map.svg")).status_code == 403
    async with httpx.AsyncClient(base_url=console.url,
                                 headers={"Authorization": "Bearer cot_wrong"}) as c:
        assert (await c.get("/api/alerts")).status_code == 401


async def test_maintenance_windows_api(console: ConsoleServer) -> None:
    async with logged_in(console, "supervisor") as sup, \
            logged_in(console, "operator") as op:
        r = await op.post("/api/maintenance", json={"scope": "district", "target": "o_mon",
                                                    "duration_s": 600})
        assert r.status_code == 403
        r = await sup.post("/api/maintenance", json={"scope": "district", "target": "nowhere",
                                                     "duration_s": 600})
        assert r.status_code == 422 and "nowhere" in r.text
        r = await sup.post("/api/maintenance", json={"scope": "district", "target": "o_mon",
                                                     "duration_s": 600, "reason": "works"})
        assert r.status_code == 201
        wid = r.json()["window_id"]
        listed = (await op.get("/api/maintenance")).json()
        assert [w["target"] for w in listed if w["window_id"] == wid] == ["o_mon"]
        assert (await sup.delete(f"/api/maintenance/{wid}")).status_code == 200
        assert (await sup.delete(f"/api/maintenance/{wid}")).status_code == 404


async def test_live_stream_pushes_changes(console: ConsoleServer, pool: asyncpg.Pool,
                                          settings: Settings) -> None:
    from aiokafka import AIOKafkaProducer

    from alerts.model import encode_change

    async with logged_in(console, "viewer") as c, \
            c.stream("GET", "/api/stream") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.aiter_lines()
        assert (await anext(lines)).startswith("retry:")
        # the alerts service's path: store the change, publish it on the alerts topic
        store = AlertStore(pool)
        sig = Signal(kind=SignalKind.RAISE, rule_id="api_test", source=f"{RUN}-sse",
                     at_ms=now_ms(), severity="minor", title="streamed")
        change = (await store.apply([sig]))[0]
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(settings.topics.alerts, encode_change(change))
        finally:
            await producer.stop()
        got = None
        async with asyncio.timeout(10):
            async for line in lines:
                if line.startswith("data: "):
                    doc = json.loads(line[6:])
                    if doc["alert"]["source"] == f"{RUN}-sse":
                        got = doc
                        break
        assert got is not None and got["action"] == "raised" and got["alert"]["title"] == "streamed"


async def test_sensor_latest_and_series(console: ConsoleServer, pool: asyncpg.Pool) -> None:
    from cityops.registry import Sensor

    # a sensor of this test only (the processors' tests own the fleet's rows)
    s = Sensor(f"t{RUN}-ld", "traffic", "lane_detector", "saomai", "ninh_kieu", "street_30_4",
               10.03, 105.77, 60)
    t0 = now_ms() - 30 * 60_000
    rows = [(datetime.fromtimestamp((t0 + 60_000 * i) / 1000, UTC), s.sensor_id, "speed_kmh",
             30.0 + i, s.district, s.domain, s.type, s.landmark, f"{RUN}-{i}") for i in range(20)]
    await pool.executemany("insert into readings (time, sensor_id, metric, value, district, "
                           "domain, type, landmark, event_id) values ($1,$2,$3,$4,$5,$6,$7,$8,"
                           "$9) on conflict do nothing", rows)
    await pool.execute("insert into sensor_latest (sensor_id, metric, time, value, district, "
                       "domain, type, landmark, event_id) values ($1,$2,$3,$4,$5,$6,$7,$8,$9) "
                       "on conflict (sensor_id, metric) do update set value = excluded.value, "
                       "time = excluded.time", *rows[-1][1:3], rows[-1][0], *rows[-1][3:])
    async with logged_in(console, "viewer") as c:
        d = (await c.get(f"/api/sensors/{s.sensor_id}")).json()
        assert d["sensor"]["landmark"] == s.landmark and d["latest"]["speed_kmh"]["value"] == 49
        assert d["sensor"]["type"] == "lane_detector"
        ser = (await c.get(f"/api/sensors/{s.sensor_id}/series",
                           params={"metric": "speed_kmh"})).json()
        assert [v for _, v in ser["points"]][-20:] == [30.0 + i for i in range(20)]
        assert (await c.get("/api/sensors/no-such-sensor")).status_code == 404


async def test_openapi_metrics_and_health(console: ConsoleServer) -> None:
    async with httpx.AsyncClient(base_url=console.url) as c:
        spec = (await c.get("/openapi.json")).json()
        for path in ("/api/alerts", "/api/alerts/{alert_id}/acknowledge", "/api/stream",
                     "/api/maintenance", "/api/tokens", "/api/sensors/{sensor_id}"):
            assert path in spec["paths"], path
        assert (await c.get("/docs")).status_code == 200
        r = await c.get("/healthz")
        assert r.status_code == 200 and r.json()["healthy"] is True
        m = (await c.get("/metrics")).text
        assert "cityops_console_logins_total" in m and "cityops_alerts_raised_total" in m


async def test_create_user_from_the_command_line(settings: Settings,
                                                 console: ConsoleServer) -> None:
    env = {**os.environ, "CITYOPS_PG_DSN_OVERRIDE": settings.pg_dsn,
           "CITYOPS_STATE_DIR": str(settings.state_dir)}
    name = f"cli-{RUN}"
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cityops.cli", "console", "--create-user", name,
                         "--role", "operator"], input="cli-password-1\n", text=True,
        capture_output=True, env=env, cwd=PROJECT_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cityops.cli", "console", "--create-user",
                         "bad-" + name, "--role", "operator"], input="short\n", text=True,
        capture_output=True, env=env, cwd=PROJECT_ROOT, timeout=60)
    assert proc.returncode == 2 and "at least 8" in proc.stderr
    async with httpx.AsyncClient(base_url=console.url) as c:
        r = await c.post("/api/login", json={"username": name, "password": "cli-password-1"})
        assert r.status_code == 200 and r.json()["role"] == "operator"
