"""The critical-incident webhook against the session's PostgreSQL and a real HTTP receiver
on a loopback port: enqueued once per incident, signed, retried on transient failures
(the schedule kept in the row), given up on refusals and after the last attempt, and
delivered once with two senders running. Incident rows are written directly: the
grouping code is not under test here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from alerts.console.auth import create_user
from alerts.incidents.model import Incident
from alerts.incidents.webhook import (
    DELIVERY_HEADER,
    EVENT_CRITICAL,
    SIGNATURE_HEADER,
    WebhookSender,
    enqueue_critical,
    recent_deliveries,
    sign,
    transient,
    verify_signature,
)
from alerts.store import create_pool
from alerts.testing import ConsoleServer, RunningService
from cityops.settings import SECRET_FIELDS, Settings, new_secret
from tests.support import free_port

RUN = uuid.uuid4().hex[:6]
RULE = f"webhook_test_{RUN}"


# --- a receiver ---------------------------------------------------------------------------
@dataclass
class Request:
    headers: dict[str, str]  # names in lower case
    body: bytes
    at: float  # time.time() on arrival
    status: int = 0  # what the receiver answered

    @property
    def delivery(self) -> str:
        return self.headers[DELIVERY_HEADER.lower()]

    @property
    def incident_id(self) -> int:
        return int(json.loads(self.body)["incident_id"])


# (request, how many times this delivery id has arrived, this one included) -> status
Answer = Callable[[Request, int], Awaitable[int]]


@dataclass
class Receiver:
    """A minimal HTTP/1.1 endpoint (one request per connection) that records every
    request and answers what ``answer`` says, with a short body explaining it."""

    answer: Answer
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hooks/cityops"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def tries(self, delivery: str) -> int:
        return sum(1 for r in self.requests if r.delivery == delivery)

    def ok(self) -> list[Request]:
        return [r for r in self.requests if 200 <= r.status < 300]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            lines = head.split("\r\n")
            assert lines[0].startswith("POST /hooks/cityops "), lines[0]
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            req = Request(headers, body, time.time())
            n = self.tries(req.delivery) + 1
            self.requests.append(req)
            req.status = await self.answer(req, n)
            text = b"" if req.status < 300 else f"refused by test ({req.status})".encode()
            writer.write(f"HTTP/1.1 {req.status} X\r\nContent-Length: {len(text)}\r\n"
                         "Connection: close\r\n\r\n".encode() + text)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)


def answering(status: int) -> Answer:
    async def answer(req: Request, n: int) -> int:
        return status
    return answer


# --- fixtures and helpers ------------------------------------------------------------------
@pytest.fixture(scope="module")
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.pg_dsn)
    yield p
    await p.execute("delete from alert_incidents where rule_id = $1", RULE)  # cascades
    await p.close()


def hook_settings(settings: Settings, url: str, **changes: Any) -> Settings:
    """Tiny back-off so a test takes well under a second per retry."""
    return settings.replace(**{
        "webhook_url": url, "webhook_secret": new_secret(), "webhook_timeout_s": 2.0,
        "webhook_max_attempts": 8, "webhook_retry_first_s": 0.05,
        "webhook_retry_cap_s": 0.2, **changes})


async def new_incident(pool: asyncpg.Pool, severity: str = "critical") -> Incident:
    key = f"{RULE}|landmark={uuid.uuid4().hex[:8]}"
    title = f"Test incident {key}"
    # announced already, as the store leaves it when it enqueues: an alerts service running
    # in the same database (its incidents' clock) must not announce it a second time
    row = await pool.fetchrow(
        "insert into alert_incidents (group_key, rule_id, severity, title, district, "
        " announced_at, announced_severity) values ($1, $2, $3, $4, 'ninh_kieu', now(), $3) "
        "returning incident_id, (extract(epoch from created_at) * 1000)::bigint as t",
        key, RULE, severity, title)
    t = row["t"]
    return Incident(incident_id=row["incident_id"], group_key=key, rule_id=RULE, state="open",
                    severity=severity, title=title, district="ninh_kieu", first_seen=t,
                    last_seen=t, created_at=t, updated_at=t)


async def enqueue(pool: asyncpg.Pool, incidents: list[Incident]) -> int:
    """As the incident store does: inside the transaction that made them critical."""
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue_critical(conn, incidents)


async def rows_of(pool: asyncpg.Pool, incidents: list[Incident]) -> dict[int, asyncpg.Record]:
    rows = await pool.fetch("select * from incident_notifications where incident_id = any($1)",
                            [i.incident_id for i in incidents])
    return {r["incident_id"]: r for r in rows}


async def settled(pool: asyncpg.Pool, incidents: list[Incident], *,
                  within: float = 20.0) -> dict[int, asyncpg.Record]:
    """The incidents' notification rows once each is delivered or given up."""
    deadline = time.monotonic() + within
    while True:
        rows = await rows_of(pool, incidents)
        if len(rows) == len(incidents) and all(
                r["delivered_at"] or r["failed_at"] for r in rows.values()):
            return rows
        assert time.monotonic() < deadline, f"not settled: {[dict(r) for r in rows.values()]}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def senders(settings: Settings, n: int = 1, **kw: Any) -> AsyncIterator[list[WebhookSender]]:
    # fallback_s long: a test that passes was woken by NOTIFY or a due retry, not a timer
    running = [WebhookSender(settings, **{"fallback_s": 60.0, **kw}) for _ in range(n)]
    for s in running:
        s.start()
    try:
        yield running
    finally:
        for s in running:
            await s.stop()


def metric(outcome: str) -> float:
    return REGISTRY.get_sample_value("cityops_webhook_deliveries_total",
                                     {"outcome": outcome}) or 0.0


def latency_count() -> float:
    return REGISTRY.get_sample_value("cityops_webhook_delivery_seconds_count") or 0.0


# --- signatures ---------------------------------------------------------------------------
def test_verify_signature_accepts_the_signer_and_rejects_everything_else() -> None:
    body = b'{"event":"incident.critical","incident_id":7}'
    now = time.time()
    header = sign("s3cret", body, int(now))
    assert verify_signature("s3cret", header, body, now=now)
    assert not verify_signature("other", header, body, now=now)  # wrong secret
    assert not verify_signature("s3cret", header, body.replace(b"7", b"8"), now=now)  # body
    assert not verify_signature("s3cret", header, body, now=now + 301)  # too old: a replay
    assert verify_signature("s3cret", header, body, now=now + 299)
    assert not verify_signature("s3cret", header, body, tolerance_s=10, now=now + 11)
    old = sign("s3cret", body, int(now) - 3600)
    assert not verify_signature("s3cret", old, body, now=now)
    mac = header.split("v1=")[1]
    for bad in ("", f"v1={mac}", f"t={int(now)}", f"t=abc,v1={mac}",
                f"t={int(now)},t={int(now)},v1={mac}", f"t={int(now)},v1=ünïcode"):
        assert not verify_signature("s3cret", bad, body, now=now), bad
    # during a secret rotation a receiver may see several v1: one matching is enough
    assert verify_signature("s3cret", f"t={int(now)},v1={'0' * 64},v1={mac}", body, now=now)


def test_what_is_retried() -> None:
    assert all(transient(s) for s in (None, 408, 429, 500, 502, 503, 504))
    assert not any(transient(s) for s in (301, 302, 400, 401, 403, 404, 410, 413, 422))


def test_alerts_needs_a_webhook_secret_only_with_a_webhook_url() -> None:
    strong = Settings().replace(**{n: new_secret() for n in SECRET_FIELDS})
    off = strong.replace(webhook_secret="")
    assert off.secrets_problem("alerts") is None
    on = off.replace(webhook_url="https://ops.cantho.example/hooks")
    problem = on.secrets_problem("alerts")
    assert problem is not None and "CITYOPS_WEBHOOK_SECRET" in problem
    assert on.replace(webhook_secret="replace-me-webhook").secrets_problem("alerts") is not None
    assert strong.replace(webhook_url="https://x.example/h").secrets_problem("alerts") is None


def test_the_sender_refuses_a_url_it_cannot_post_to() -> None:
    for url in ("ops.cantho.example/hooks", "ftp://x.example/h", "http://"):
        with pytest.raises(ValueError, match="webhook_url"):
            WebhookSender(Settings(webhook_url=url))


# --- the outbox ---------------------------------------------------------------------------
async def test_an_incident_is_enqueued_once_however_often_and_from_wherever(
        settings: Settings, pool: asyncpg.Pool) -> None:
    a, b, c = [await new_incident(pool) for _ in range(3)]
    major = await new_incident(pool, "major")
    async with pool.acquire() as c1, pool.acquire() as c2:
        t1 = c1.transaction()
        await t1.start()
        assert await enqueue_critical(c1, [a, a, major]) == 1  # twice in one call; not major
        t2 = c2.transaction()
        await t2.start()
        second = asyncio.create_task(enqueue_critical(c2, [a, b]))
        await asyncio.sleep(0.3)
        assert not second.done()  # waits for the first transaction's row of `a`
        await t1.commit()
        assert await second == 1  # b only
        await t2.commit()
        # a transaction that rolls back leaves nothing owed
        t3 = c1.transaction()
        await t3.start()
        assert await enqueue_critical(c1, [c]) == 1
        await t3.rollback()
    assert await rows_of(pool, [c]) == {}
    assert await enqueue(pool, [a, b, c]) == 1  # c, now for real
    assert await enqueue(pool, [a, b, c]) == 0
    rows = await rows_of(pool, [a, b, c, major])
    assert sorted(rows) == sorted(i.incident_id for i in (a, b, c))
    async with Receiver(answering(200)) as rx, senders(hook_settings(settings, rx.url)):
        await settled(pool, [a, b, c])
        assert await enqueue(pool, [a, b, c]) == 0  # delivered is still "once"
        await asyncio.sleep(0.3)
    mine = {i.incident_id for i in (a, b, c)}
    got = Counter(r.incident_id for r in rx.requests if r.incident_id in mine | {
        major.incident_id})
    assert got == Counter(mine), got


# --- delivery -----------------------------------------------------------------------------
async def test_retried_until_accepted_then_delivered_once_and_signed(
        settings: Settings, pool: asyncpg.Pool) -> None:
    s = hook_settings(settings, "", webhook_retry_first_s=0.2, webhook_retry_cap_s=0.4)
    seen_before_success: dict[str, dict[str, Any]] = {}

    async def answer(req: Request, n: int) -> int:
        if n == 3:  # the row as committed before this (successful) try
            row = await pool.fetchrow(
                "select attempts, last_status, last_error, delivered_at, failed_at "
                "from incident_notifications where notification_id = $1", int(req.delivery))
            seen_before_success[req.delivery] = dict(row)
        return 500 if n <= 2 else 200

    incidents = [await new_incident(pool) for _ in range(3)]
    delivered, retried, latencies = metric("delivered"), metric("retry"), latency_count()
    async with Receiver(answer) as rx:
        s = s.replace(webhook_url=rx.url)
        async with senders(s):
            await asyncio.sleep(0.2)  # the sender is asleep (nothing due): NOTIFY wakes it
            assert await enqueue(pool, incidents) == 3
            rows = await settled(pool, incidents, within=10)
    ids = {i.incident_id for i in incidents}
    mine = [r for r in rx.requests if r.incident_id in ids]
    ok = [r for r in mine if 200 <= r.status < 300]
    assert Counter(r.incident_id for r in ok) == Counter(ids)  # exactly once each with a 2xx
    assert len({r.delivery for r in ok}) == 3
    assert Counter(r.incident_id for r in mine) == Counter({i: 3 for i in ids})
    for req in mine:
        assert verify_signature(s.webhook_secret, req.headers[SIGNATURE_HEADER.lower()],
                                req.body)
        assert not verify_signature(new_secret(), req.headers[SIGNATURE_HEADER.lower()],
                                    req.body)
        assert req.headers["x-cityops-event"] == EVENT_CRITICAL
        assert req.headers["content-type"] == "application/json"
        payload = json.loads(req.body)
        assert payload["event"] == EVENT_CRITICAL and payload["severity"] == "critical"
        assert payload["rule_id"] == RULE and payload["title"].startswith("Test incident")
    for inc in incidents:
        row = rows[inc.incident_id]
        assert row["attempts"] == 3 and row["last_status"] == 200
        assert row["delivered_at"] is not None and row["failed_at"] is None
        before = seen_before_success[str(row["notification_id"])]
        assert before["attempts"] == 2 and before["last_status"] == 500
        assert "HTTP 500" in before["last_error"] and before["delivered_at"] is None
        # the first retry waited its back-off: Backoff's first delay is uniform(first/2, first)
        tries = sorted(r.at for r in mine if r.incident_id == inc.incident_id)
        assert tries[1] - tries[0] >= 0.1 - 0.02, tries
    assert metric("delivered") - delivered == 3
    assert metric("retry") - retried == 6
    assert latency_count() - latencies == 3
    listed = {d["incident_id"]: d for d in await recent_deliveries(pool, 50)}
    assert all(listed[i]["status"] == "delivered" and listed[i]["attempts"] == 3 for i in ids)


async def test_two_senders_deliver_each_notification_once(
        settings: Settings, pool: asyncpg.Pool) -> None:
    async def slow_ok(req: Request, n: int) -> int:
        await asyncio.sleep(0.03)  # sends overlap: both senders hold batches at once
        return 200

    class Counting(httpx.AsyncHTTPTransport):
        sent = 0

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            self.sent += 1
            return await super().handle_async_request(request)

    incidents = [await new_incident(pool) for _ in range(30)]
    assert await enqueue(pool, incidents) == 30
    transports = [Counting(), Counting()]
    async with Receiver(slow_ok) as rx:
        s = hook_settings(settings, rx.url)
        async with senders(s, transport=transports[0], batch=3), \
                senders(s, transport=transports[1], batch=3):
            await settled(pool, incidents)
    ids = {i.incident_id for i in incidents}
    mine = [r for r in rx.requests if r.incident_id in ids]
    assert Counter(r.incident_id for r in mine) == Counter(ids)
    assert len({r.delivery for r in mine}) == len(mine) == 30
    assert all(t.sent > 0 for t in transports), [t.sent for t in transports]


async def test_a_refusal_fails_at_once_and_is_visible(
        settings: Settings, pool: asyncpg.Pool) -> None:
    inc = await new_incident(pool)
    failed, retried = metric("failed"), metric("retry")
    async with Receiver(answering(400)) as rx, senders(hook_settings(settings, rx.url)):
        assert await enqueue(pool, [inc]) == 1
        row = (await settled(pool, [inc]))[inc.incident_id]
        await asyncio.sleep(0.3)
    assert [r.incident_id for r in rx.requests].count(inc.incident_id) == 1
    assert row["attempts"] == 1 and row["last_status"] == 400
    assert row["failed_at"] is not None and row["delivered_at"] is None
    assert "HTTP 400: refused by test (400)" in row["last_error"]
    assert metric("failed") - failed == 1 and metric("retry") == retried
    listed = {d["notification_id"]: d for d in await recent_deliveries(pool, 20)}
    seen = listed[row["notification_id"]]
    assert seen["status"] == "failed" and seen["failed_at"] and seen["next_attempt_at"] is None
    assert seen["last_error"] == row["last_error"] and seen["title"] == inc.title

    # the supervisor sees it in the console's API; an operator may not
    console = ConsoleServer(settings, free_port())
    for role in ("supervisor", "operator"):
        await create_user(pool, f"{role}-wh-{RUN}", "webhook-pass-1", role)
    await console.start()
    try:
        for role, expected in (("supervisor", 200), ("operator", 403)):
            async with httpx.AsyncClient(base_url=console.url, timeout=10) as c:
                r = await c.post("/api/login", json={"username": f"{role}-wh-{RUN}",
                                                     "password": "webhook-pass-1"})
                assert r.status_code == 200, r.text
                r = await c.get("/api/webhooks/deliveries", params={"limit": 20})
                assert r.status_code == expected, r.text
                if expected == 200:
                    api = {d["notification_id"]: d for d in r.json()}
                    assert api[row["notification_id"]]["status"] == "failed"
                    assert api[row["notification_id"]]["last_status"] == 400
    finally:
        await console.stop()


@pytest.mark.parametrize("case", ["unreachable", "no answer"])
async def test_transient_failures_are_retried_then_given_up(
        settings: Settings, pool: asyncpg.Pool, case: str) -> None:
    async def hang(req: Request, n: int) -> int:
        await asyncio.sleep(30)
        return 200

    inc = await new_incident(pool)
    failed, retried = metric("failed"), metric("retry")
    async with Receiver(hang) as rx:
        url = f"http://127.0.0.1:{free_port()}/hooks/cityops" if case == "unreachable" \
            else rx.url
        s = hook_settings(settings, url, webhook_max_attempts=3, webhook_timeout_s=0.3,
                          webhook_retry_first_s=0.02, webhook_retry_cap_s=0.05)
        async with senders(s):
            assert await enqueue(pool, [inc]) == 1
            row = (await settled(pool, [inc], within=10))[inc.incident_id]
    assert row["attempts"] == 3 and row["last_status"] is None
    assert row["failed_at"] is not None and row["delivered_at"] is None
    expected = "ConnectError" if case == "unreachable" else "Timeout"
    assert expected in row["last_error"], row["last_error"]
    assert metric("retry") - retried == 2 and metric("failed") - failed == 1
    assert len(rx.requests) == (0 if case == "unreachable" else 3)


async def test_the_retry_schedule_survives_a_restart(settings: Settings,
                                                     pool: asyncpg.Pool) -> None:
    inc = await new_incident(pool)
    async with Receiver(answering(503)) as rx:
        s = hook_settings(settings, rx.url, webhook_retry_first_s=1.5, webhook_retry_cap_s=3)
        async with senders(s):
            assert await enqueue(pool, [inc]) == 1
            deadline = time.monotonic() + 10
            while not rx.requests or (await rows_of(pool, [inc]))[inc.incident_id][
                    "attempts"] < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        row = (await rows_of(pool, [inc]))[inc.incident_id]
        due = row["next_attempt_at"].timestamp()
        assert due - rx.requests[0].at >= 0.75 - 0.05  # uniform(first/2, first) after try 1
        async with senders(s):  # a new process: it honours the stored schedule
            deadline = time.monotonic() + 10
            while len(rx.requests) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
    assert rx.requests[1].at >= due - 0.02, (rx.requests[1].at, due)


async def test_the_alerts_service_runs_the_sender_and_stops_it(
        settings: Settings, pool: asyncpg.Pool) -> None:
    inc = await new_incident(pool)
    async with Receiver(answering(204)) as rx:
        svc = RunningService(hook_settings(settings, rx.url), settings.rules_file,
                             f"alerts-webhook-{RUN}", tick_s=0.2)
        await svc.start()
        try:
            assert [t for t in asyncio.all_tasks() if t.get_name() == "webhook-sender"]
            assert await enqueue(pool, [inc]) == 1
            row = (await settled(pool, [inc], within=10))[inc.incident_id]
        finally:
            await svc.stop()
        assert row["delivered_at"] is not None and row["last_status"] == 204
        assert [r.incident_id for r in rx.requests].count(inc.incident_id) == 1
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "webhook-sender"]


# --- end to end: a critical event through the alerts service to the receiver ------------------
async def test_a_critical_incident_reaches_a_flaky_receiver_exactly_once(
        settings: Settings, pool: asyncpg.Pool, tmp_path: Any) -> None:
    """A panic button pressed twice at one landmark and once at another: the alerts
    service groups them into two critical incidents, announces each once, and the
    receiver that refuses every delivery's first two tries gets each incident once."""
    from alerts.testing import EventProducer, make_event, now_ms

    rule = f"panic_e2e_{RUN}"
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""
rules:
  - id: {rule}
    type: count
    severity: critical
    title: "Panic at {{landmark_name}}"
    incidents: [panic]
    count: 1
    window_s: 900
    per: sensor
    group: {{by: [landmark], wait_s: 0}}
""")
    async with Receiver(lambda req, n: _status(500 if n <= 2 else 200)) as rx:
        svc = RunningService(hook_settings(settings, rx.url), rules, f"alerts-hook-e2e-{RUN}",
                             tick_s=0.2, update_every_s=0.0)
        await svc.start()
        try:
            t = now_ms()
            async with EventProducer(settings) as prod:
                await prod.send(*(make_event(f"{rule}-{i}", t + i, landmark=lm,
                                             domain="security", incident="panic")
                                  for i, lm in enumerate(("night_market", "night_market",
                                                          "ctu"))))
            for _ in range(300):  # up to 30 s: two incidents delivered
                if len({r.incident_id for r in rx.ok()}) >= 2:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # anything sent twice would have arrived by now
        finally:
            await svc.stop()
    incidents = {r["incident_id"]: r["landmark"] for r in await pool.fetch(
        "select incident_id, landmark from alert_incidents where rule_id = $1", rule)}
    assert sorted(incidents.values()) == ["ctu", "night_market"]
    ok = Counter(r.incident_id for r in rx.ok())
    assert ok == Counter({i: 1 for i in incidents})  # each once with a 2xx
    tries = Counter(r.incident_id for r in rx.requests)
    assert tries == Counter({i: 3 for i in incidents})  # after two refusals each
    assert await pool.fetchval("select alert_count from alert_incidents where rule_id = $1 "
                               "and landmark = 'night_market'", rule) == 2


async def _status(code: int) -> int:
    return code
