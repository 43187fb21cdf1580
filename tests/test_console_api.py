"""The console's REST API and live stream against the real stack: login, roles, CSRF,
tokens, operator actions with their audit trail, maintenance windows, SSE, sensors."""

from __future__ import annotations

import asyncio
import base64
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

from alerts.console.auth import Role, Sessions, create_user
from alerts.model import Signal, SignalKind
from alerts.store import AlertStore, create_pool
from alerts.testing import ConsoleServer, now_ms
from cityops.settings import PROJECT_ROOT, Settings, new_secret

RUN = uuid.uuid4().hex[:6]
PASSWORDS = {"viewer": "viewer-pass-1", "operator": "operator-pass-1",
             "supervisor": "supervisor-pass-1"}


def user(role: str) -> str:
    return f"{role}-{RUN}"


# autouse: the users it creates exist before any test logs in (the console fixture is shared)
@pytest.fixture(scope="module", autouse=True)
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.pg_dsn)
    for role, pw in PASSWORDS.items():
        await create_user(p, user(role), pw, role)
    yield p
    await p.close()



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
    from processors.testing import seed_readings

    # a sensor of this test only (the processors' tests own the fleet's rows)
    s = Sensor(f"t{RUN}-ld", "traffic", "lane_detector", "saomai", "ninh_kieu", "street_30_4",
               10.03, 105.77, 60)
    t0 = now_ms() - 30 * 60_000
    await seed_readings(pool, s, [(datetime.fromtimestamp((t0 + 60_000 * i) / 1000, UTC),
                                   "speed_kmh", 30.0 + i) for i in range(20)])
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


# --- no default secret: a cookie signed with any well-known value is not a session ---------------
WELL_KNOWN_SECRETS = ["cityops-dev-secret-change-me", "", "secret", "changeme", "change-me",
                      "password", "admin", "cityops", "test", "dev",
                      "replace-me-with-64-random-hex-characters"]


@pytest.mark.parametrize("secret", WELL_KNOWN_SECRETS)
async def test_cookie_forged_with_a_well_known_secret_gets_401(
        console: ConsoleServer, settings: Settings, secret: str) -> None:
    assert settings.console_secret not in WELL_KNOWN_SECRETS  # the stack generated its own
    forged = Sessions(secret, 3600).issue("mallory", Role.SUPERVISOR)
    forger = Sessions(secret, 3600)
    async with httpx.AsyncClient(base_url=console.url, timeout=10) as c:
        c.cookies.set("cityops_session", forged)
        assert (await c.get("/api/me")).status_code == 401
        r = await c.post("/api/maintenance",
                         headers={"X-CSRF-Token": forger.csrf(forged)},
                         json={"scope": "district", "target": "o_mon", "duration_s": 60})
        assert r.status_code == 401
    # the same forgery against a console that did run on the default is a supervisor: the
    # test would notice if the secret stopped mattering
    assert Sessions(secret, 3600).read(forged) is not None


# --- API tokens: listed, rotated, revoked (at once) ---------------------------------------------
async def test_tokens_are_listed_rotated_and_revoked_at_once(console: ConsoleServer) -> None:
    agency = f"river-police-{RUN}"
    async with logged_in(console, "supervisor") as sup:
        r = await sup.post("/api/tokens", json={"agency": agency})
        assert r.status_code == 201
        first, first_id = r.json()["token"], r.json()["token_id"]
        listed = (await sup.get("/api/tokens")).json()
        mine = [t for t in listed if t["agency"] == agency]
        assert [(t["token_id"], t["revoked_at"]) for t in mine] == [(first_id, None)]
        assert first not in (await sup.get("/api/tokens")).text  # shown once, never listed
        assert all("token" not in t and "token_hash" not in t for t in listed)
        reader = httpx.AsyncClient(base_url=console.url, timeout=10,
                                   headers={"Authorization": f"Bearer {first}"})
        try:
            assert (await reader.get("/api/alerts?limit=1")).status_code == 200
            # rotate: a new token for the same agency, the old one dead on its next request
            r = await sup.post(f"/api/tokens/{first_id}/rotate")
            assert r.status_code == 201, r.text
            second, second_id = r.json()["token"], r.json()["token_id"]
            assert r.json()["agency"] == agency and second != first and second_id != first_id
            assert (await reader.get("/api/alerts?limit=1")).status_code == 401
            reader.headers["Authorization"] = f"Bearer {second}"
            assert (await reader.get("/api/alerts?limit=1")).status_code == 200
            assert (await sup.post(f"/api/tokens/{first_id}/rotate")).status_code == 404
            # revoke: the very next request is refused
            assert (await sup.delete(f"/api/tokens/{second_id}")).status_code == 200
            assert (await reader.get("/api/alerts?limit=1")).status_code == 401
            assert (await sup.delete(f"/api/tokens/{second_id}")).status_code == 404
            states = {t["token_id"]: t["revoked_at"] for t in
                      (await sup.get("/api/tokens")).json() if t["agency"] == agency}
            assert set(states) == {first_id, second_id} and all(states.values())
        finally:
            await reader.aclose()
    async with logged_in(console, "operator") as op:
        assert (await op.get("/api/tokens")).status_code == 403
        assert (await op.delete(f"/api/tokens/{first_id}")).status_code == 403


async def test_tokens_from_the_command_line(settings: Settings, console: ConsoleServer) -> None:
    env = {**os.environ, "CITYOPS_STATE_DIR": str(settings.state_dir),
           "CITYOPS_PG_PORT": str(settings.pg_port)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cityops.cli", "console", *args],
                              text=True, capture_output=True, env=env, cwd=PROJECT_ROOT,
                              timeout=60)

    agency = f"cli-agency-{RUN}"
    made = await asyncio.to_thread(cli, "--create-token", agency)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    listed = await asyncio.to_thread(cli, "--list-tokens")
    assert listed.returncode == 0, listed.stderr
    (row,) = [ln for ln in listed.stdout.splitlines() if agency in ln]
    token_id = row.split()[0]
    assert "active" in row and token not in listed.stdout
    rotated = await asyncio.to_thread(cli, "--rotate-token", token_id)
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip().splitlines()[-1]
    assert new.startswith("cot_") and new != token
    async with httpx.AsyncClient(base_url=console.url, timeout=10) as c:
        r = await c.get("/api/alerts?limit=1", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        r = await c.get("/api/alerts?limit=1", headers={"Authorization": f"Bearer {new}"})
        assert r.status_code == 200
        relisted = (await asyncio.to_thread(cli, "--list-tokens")).stdout.splitlines()
        new_id = next(ln for ln in relisted if agency in ln and "active" in ln).split()[0]
        revoked = await asyncio.to_thread(cli, "--revoke-token", new_id)
        assert revoked.returncode == 0, revoked.stderr
        r = await c.get("/api/alerts?limit=1", headers={"Authorization": f"Bearer {new}"})
        assert r.status_code == 401
    again = await asyncio.to_thread(cli, "--revoke-token", new_id)
    assert again.returncode == 2 and "no active token" in again.stderr
    bad = await asyncio.to_thread(cli, "--revoke-token", "not-a-number")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


# --- every input validated at the edge: 4xx, never 500 -------------------------------------------
async def test_non_ascii_cookie_is_unauthenticated_not_500(console: ConsoleServer) -> None:
    async with httpx.AsyncClient(base_url=console.url, timeout=10) as c:
        for raw in (b"cityops_session=\xff\xfe.\xe9t\xe9",
                    b"cityops_session=eyJ1IjoiYSJ9.\xc3\xa9\xc3\xa9",
                    b"cityops_session=\xe9t\xe9"):
            for path in ("/api/me", "/api/alerts", "/"):
                r = await c.get(path, headers={"Cookie": raw})
                assert r.status_code in (401, 303), (raw, path, r.status_code, r.text)


@pytest.mark.parametrize("cookie", [
    "x", ".", "a.b.c", "e30.", "bm90IGpzb24.sig",  # "{}", "not json"
    "eyJ1IjoiYSIsInIiOiJzdXBlcnZpc29yIiwiZXhwIjoiem9vIn0.sig",  # exp not a number
])
async def test_malformed_cookies_are_unauthenticated(console: ConsoleServer, cookie: str) -> None:
    async with httpx.AsyncClient(base_url=console.url, timeout=10) as c:
        c.cookies.set("cityops_session", cookie)
        assert (await c.get("/api/me")).status_code == 401


def test_sessions_read_survives_any_correctly_signed_garbage() -> None:
    """Even a body signed with the real key (a bug elsewhere, a key leak in a test) that is
    not the expected JSON shape is no session, not an exception."""
    s = Sessions(new_secret(), 60)
    for body in (b"", b"\xff", b"[]", b"{}", b'{"u": 1, "r": "boss", "exp": 9e99}',
                 b'{"u": "a", "r": "supervisor", "exp": "soon"}', b"1e999999"):
        value = base64.urlsafe_b64encode(body).decode() + "." + s._sign(body)
        assert s.read(value) is None, body


@pytest.mark.parametrize("path", [
    "/api/alerts/99999999999999999999", "/api/alerts/-1", "/api/alerts/0",
    "/api/alerts/9223372036854775808",
])
async def test_alert_ids_are_bounded(console: ConsoleServer, path: str) -> None:
    async with logged_in(console, "supervisor") as sup:
        assert (await sup.get(path)).status_code == 422
        assert (await sup.post(path + "/acknowledge")).status_code == 422
        assert (await sup.post(path + "/clear")).status_code == 422
    async with logged_in(console, "supervisor") as sup:
        assert (await sup.get("/api/alerts/9223372036854775807")).status_code == 404
        assert (await sup.delete("/api/maintenance/99999999999999999999")).status_code == 422
        assert (await sup.delete("/api/tokens/99999999999999999999")).status_code == 422


YEAR_MS = 365 * 86_400_000


@pytest.mark.parametrize("body", [
    {"starts_at": 10**10 * YEAR_MS, "duration_s": 600},  # the year 10^10
    {"starts_at": -(10**12), "duration_s": 600},
    {"starts_at": 2**63, "duration_s": 600},
    {"ends_at": 10**10 * YEAR_MS},
    {"starts_at": now_ms() + 3 * YEAR_MS, "duration_s": 600},  # years ahead: a typo
    # ends_at set directly may not bypass the 30-day limit duration_s has
    {"ends_at": now_ms() + 31 * 86_400_000},
    {"starts_at": now_ms(), "ends_at": now_ms() + 30 * 86_400_000 + 60_000},
    {"starts_at": now_ms(), "ends_at": now_ms() - 1},
    {"duration_s": 30 * 86400 + 1},
    {"starts_at": now_ms(), "ends_at": now_ms() + 600_000, "duration_s": 600},  # both
])
async def test_maintenance_windows_are_bounded_whichever_field_sets_them(
        console: ConsoleServer, body: dict[str, int]) -> None:
    async with logged_in(console, "supervisor") as sup:
        r = await sup.post("/api/maintenance", json={"scope": "district", "target": "o_mon",
                                                     **body})
        assert r.status_code == 422, (body, r.status_code, r.text)


async def test_maintenance_window_of_exactly_thirty_days_is_fine(console: ConsoleServer) -> None:
    async with logged_in(console, "supervisor") as sup:
        start = now_ms() + 60_000
        r = await sup.post("/api/maintenance", json={
            "scope": "district", "target": "o_mon", "starts_at": start,
            "ends_at": start + 30 * 86_400_000})
        assert r.status_code == 201, r.text
        assert (await sup.delete(f"/api/maintenance/{r.json()['window_id']}")).status_code == 200


@pytest.mark.parametrize(("method", "path", "kw"), [
    ("GET", "/api/sensors/a%00b", {}),
    ("GET", "/api/sensors/x/series", {"params": {"metric": "speed\x00kmh"}}),
    ("GET", "/api/alerts", {"params": {"district": "ninh\x00kieu"}}),
    ("GET", "/api/latest", {"params": {"domain": "\x00"}}),
    ("POST", "/api/alerts/1/comment", {"json": {"note": "nul \x00 inside"}}),
    ("POST", "/api/maintenance", {"json": {"scope": "sensor", "target": "s\x00",
                                           "duration_s": 60}}),
    ("POST", "/api/tokens", {"json": {"agency": "bad\x00agency"}}),
    ("POST", "/api/login", {"json": {"username": "a\x00b", "password": "whatever-1"}}),
])
async def test_nul_and_control_characters_are_refused_at_the_edge(
        console: ConsoleServer, method: str, path: str, kw: dict[str, object]) -> None:
    async with logged_in(console, "supervisor") as sup:
        r = await sup.request(method, path, **kw)  # type: ignore[arg-type]
        assert r.status_code in (401, 404, 422), (path, r.status_code, r.text)


async def test_demo_accounts_get_generated_passwords(settings: Settings,
                                                     console: ConsoleServer) -> None:
    """`--seed-dev-users` (what `cityops demo` runs) never uses a password from the source:
    generated once per installation, kept, printed."""
    env = {**os.environ, "CITYOPS_STATE_DIR": str(settings.state_dir),
           "CITYOPS_PG_PORT": str(settings.pg_port)}

    def seed() -> dict[str, str]:
        proc = subprocess.run([sys.executable, "-m", "cityops.cli", "console",
                               "--seed-dev-users"], text=True, capture_output=True, env=env,
                              cwd=PROJECT_ROOT, timeout=60, check=True)
        line = proc.stdout.strip().splitlines()[-1].removeprefix("dev users: ")
        return {u.split("/")[0]: u.split("/", 1)[1].split(" ")[0] for u in line.split(", ")}

    first = await asyncio.to_thread(seed)
    assert set(first) == {"viewer", "operator", "supervisor", "wall"}
    assert all(pw != f"{name}-dev" and len(pw) >= 12 for name, pw in first.items())
    assert await asyncio.to_thread(seed) == first  # stable across runs
    async with httpx.AsyncClient(base_url=console.url) as c:
        r = await c.post("/api/login", json={"username": "supervisor",
                                             "password": "supervisor-dev"})
        assert r.status_code == 401
        r = await c.post("/api/login", json={"username": "supervisor",
                                             "password": first["supervisor"]})
        assert r.status_code == 200 and r.json()["role"] == "supervisor"
        # the wall's screen account is a viewer
        r = await c.post("/api/login", json={"username": "wall", "password": first["wall"]})
        assert r.status_code == 200 and r.json()["role"] == "viewer"
