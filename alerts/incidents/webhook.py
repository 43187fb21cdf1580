"""The outgoing webhook for critical incidents: an outbox in PostgreSQL and its sender.

Why an outbox: the incident store calls ``enqueue_critical`` inside the transaction that
opens an incident at critical severity or raises an open one to critical, so a
notification exists if and only if that change committed, and no HTTP call ever runs
inside the store's transaction. ``unique (incident_id, kind)`` makes each critical
incident one notification however many workers or transactions enqueue it.

Each alerts worker runs a ``WebhookSender``. It claims due rows with ``for update skip
locked`` and holds the row locks while it sends, so two workers never send the same row
at once, and a worker that dies mid-send releases its rows with its connection. It sleeps
until LISTEN ``cityops_webhook`` (``pg_notify`` at the enqueue's commit) or the earliest
retry falls due, whichever comes first, with a fallback timer for a notification missed
while its connection was down: no polling.

Delivery is at least once: a 2xx whose outcome could not be committed (the database went
away) is sent again later. Receivers dedupe by ``X-Cityops-Delivery`` and authenticate by
``X-Cityops-Signature`` (``verify_signature``; the Stripe scheme, signed per attempt so a
retry hours later is not mistaken for a replay).

What is worth trying again is decided in one place, ``transient``; the retry schedule is
``ingest.backoff.Backoff`` (the project's one back-off) and is stored in the row
(``next_attempt_at``), so it survives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import msgspec

from alerts.incidents.model import Incident
from alerts.incidents.texts import incident_titles
from alerts.metrics import WEBHOOK_DELIVERIES, WEBHOOK_DELIVERY_SECONDS, WEBHOOK_PENDING
from cityops.settings import Settings
from ingest.backoff import Backoff
from processors.faults import Fault, classify, safe_text

log = logging.getLogger(__name__)

CHANNEL = "cityops_webhook"  # LISTEN/NOTIFY channel: "a notification was enqueued"
KIND_CRITICAL = "critical"
EVENT_CRITICAL = "incident.critical"
SIGNATURE_HEADER = "X-Cityops-Signature"
DELIVERY_HEADER = "X-Cityops-Delivery"
EVENT_HEADER = "X-Cityops-Event"
FALLBACK_S = 30.0  # longest sleep without a notification (one missed while reconnecting)
BATCH = 16  # notifications one sender claims and sends at once
ERROR_CHARS = 500  # last_error is a hint for an operator, not a log

_encoder = msgspec.json.Encoder()


# --- signing ----------------------------------------------------------------------------
def _mac(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, t: int | None = None) -> str:
    """The ``X-Cityops-Signature`` value for ``body`` sent at unix time ``t`` (now)."""
    t = int(time.time()) if t is None else t
    return f"t={t},v1={_mac(secret, t, body)}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: float = 300,
                     *, now: float | None = None) -> bool:
    """True if ``header`` (``t=<unix s>,v1=<hex>``) signs exactly ``body`` with ``secret``
    and ``t`` is within ``tolerance_s`` of now: a receiver that also remembers the
    ``X-Cityops-Delivery`` ids of that span rejects replays. Several ``v1`` are allowed
    (one matching is enough), for a receiver checking during a secret rotation."""
    t: int | None = None
    sigs: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            if t is not None or not value.isdigit():
                return False  # two timestamps, or not a number: not ours
            t = int(value)
        elif key == "v1":
            sigs.append(value)
    if t is None or not sigs:
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = _mac(secret, t, body).encode()
    return any(hmac.compare_digest(expected, s.encode()) for s in sigs)


# --- what a failed attempt means ----------------------------------------------------------
def transient(status: int | None) -> bool:
    """Whether an attempt that got ``status`` (None: no answer at all, i.e. a connection
    error or a timeout) is worth trying again. 5xx, 408 and 429 say "not now"; any other
    non-2xx answer (4xx, or a 3xx: a signed POST is not re-sent to another address) says
    the receiver refuses this request, and the same request will not fare better."""
    return status is None or status >= 500 or status in (408, 429)


def outcome(status: int | None, attempts: int, max_attempts: int) -> str:
    """``delivered``, ``retry`` or ``failed`` for an attempt that got ``status``, being
    the ``attempts``-th attempt of its notification."""
    if status is not None and 200 <= status < 300:
        return "delivered"
    if transient(status) and attempts < max_attempts:
        return "retry"
    return "failed"


def retry_delay(settings: Settings, failures: int) -> float:
    """Seconds before the next attempt after ``failures`` failed ones (1 or more): the
    schedule ``Backoff(webhook_retry_first_s, webhook_retry_cap_s)`` gives its
    ``failures``-th ``next()``, computed from the count kept in the row."""
    backoff = Backoff(settings.webhook_retry_first_s, settings.webhook_retry_cap_s)
    backoff.attempt = max(failures - 1, 0)
    return backoff.next()


# --- the outbox ---------------------------------------------------------------------------
_ENQUEUE = """
insert into incident_notifications (incident_id, kind, payload)
select u.incident_id, $3, u.payload::jsonb
from unnest($1::bigint[], $2::text[]) as u(incident_id, payload)
on conflict (incident_id, kind) do nothing
"""


async def enqueue_critical(conn: asyncpg.Connection, incidents: Sequence[Incident]) -> int:
    """Owe the webhook one ``incident.critical`` notification for each of ``incidents``
    that is critical; returns how many were new (an incident already notified, or
    enqueued by another transaction, is not notified again).

    Call it inside the transaction that opens the incidents at critical severity or
    raises them to critical: the notification then commits, or rolls back, with the
    change, and the senders are woken (``pg_notify``, delivered at commit). Incidents of
    another severity are skipped, so the caller may pass every incident it changed.
    """
    critical = [i for i in incidents if i.severity == "critical"]
    if not critical:
        return 0
    # the heading in each language, for a receiver that posts it to people (Zalo, SMS)
    payloads = [_encoder.encode({**msgspec.to_builtins(i), "event": EVENT_CRITICAL,
                                 "titles": incident_titles(i)}).decode() for i in critical]
    status = await conn.execute(_ENQUEUE, [i.incident_id for i in critical], payloads,
                                KIND_CRITICAL)
    added = int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <rows>"
    if added:
        await conn.execute("select pg_notify($1, '')", CHANNEL)
    return added


async def recent_deliveries(pool: asyncpg.Pool, limit: int = 50) -> list[dict[str, Any]]:
    """The latest ``limit`` notifications, newest first, for operators: ``status``
    (pending, delivered or failed), attempts, the last HTTP status and error, and times
    (epoch ms; ``next_attempt_at`` only while pending)."""
    rows = await pool.fetch(
        """select notification_id, incident_id, kind, payload->>'title' as title,
                  case when delivered_at is not null then 'delivered'
                       when failed_at is not null then 'failed' else 'pending' end as status,
                  attempts, last_status, last_error,
                  (extract(epoch from created_at) * 1000)::bigint as created_at,
                  case when delivered_at is null and failed_at is null
                       then (extract(epoch from next_attempt_at) * 1000)::bigint
                  end as next_attempt_at,
                  (extract(epoch from delivered_at) * 1000)::bigint as delivered_at,
                  (extract(epoch from failed_at) * 1000)::bigint as failed_at
           from incident_notifications order by notification_id desc limit $1""", limit)
    return [dict(r) for r in rows]


# --- the sender ---------------------------------------------------------------------------
_CLAIM = """
select notification_id, incident_id, kind, payload::text as body, attempts
from incident_notifications
where delivered_at is null and failed_at is null and next_attempt_at <= clock_timestamp()
order by next_attempt_at
limit $1
for update skip locked
"""
_RECORD = """
update incident_notifications n set
    attempts = n.attempts + 1,
    last_status = u.status,
    last_error = coalesce(u.error, n.last_error),
    delivered_at = case when u.outcome = 'delivered' then clock_timestamp() end,
    failed_at = case when u.outcome = 'failed' then clock_timestamp() end,
    next_attempt_at = case when u.outcome = 'retry'
                           then clock_timestamp() + make_interval(secs => u.delay)
                           else n.next_attempt_at end
from unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::float8[])
     as u(notification_id, status, error, outcome, delay)
where n.notification_id = u.notification_id
returning extract(epoch from n.delivered_at - n.created_at)::float8 as latency
"""
# The earliest owed notification no other sender holds: what to wake up for. (A row
# another sender is sending is its business; if that sender dies, the row is free again
# and found at the fallback timer at the latest.)
_NEXT = """
select extract(epoch from next_attempt_at - clock_timestamp())::float8
from incident_notifications
where delivered_at is null and failed_at is null
order by next_attempt_at limit 1
for update skip locked
"""
_PENDING = "select count(*) from incident_notifications where delivered_at is null " \
           "and failed_at is null"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One POST of one notification: the answer's status (None: none came) and, if it
    was not a 2xx, what went wrong."""

    status: int | None
    error: str | None


class WebhookSender:
    """Delivers the outbox to ``settings.webhook_url``: ``start()`` once, ``await
    stop()`` on shutdown. Opens its own database connection (LISTEN and the claims), so
    the alerts loop's pool never waits on a slow receiver."""

    def __init__(self, settings: Settings, *, fallback_s: float = FALLBACK_S,
                 batch: int = BATCH, transport: httpx.AsyncBaseTransport | None = None) -> None:
        url = httpx.URL(settings.webhook_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"webhook_url {settings.webhook_url!r} is not an http(s) URL")
        self.settings = settings
        self.url = url
        self.fallback_s = fallback_s
        self.batch = batch
        self._transport = transport
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # a notification, a lost connection, or stop
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the sender in the background of the running event loop."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="webhook-sender")

    async def stop(self) -> None:
        """Let the sends in flight finish (each is bounded by ``webhook_timeout_s``) and
        record their outcome, then close; cancel if that takes much longer."""
        self._stop.set()
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task),
                                   self.settings.webhook_timeout_s + 5)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        except Exception:  # the service is stopping: say so, do not stop its shutdown
            log.exception("webhook sender ended with an error")

    async def run(self) -> None:
        """The loop: deliver what is due, then sleep until woken or the next is due. A
        failing database step is logged and the loop starts over on a new connection
        after a capped back-off: the alerts service goes on meanwhile."""
        s = self.settings
        reconnect = Backoff(s.ingest_reconnect_min_ms / 1000, FALLBACK_S)
        timeout = httpx.Timeout(s.webhook_timeout_s)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False,
                                     transport=self._transport,
                                     headers={"User-Agent": "cityops-webhook"}) as client:
            try:
                while not self._stop.is_set():
                    try:
                        conn = await self._connect()
                        self._wake.clear()  # what is enqueued from here on wakes us again
                        while await self._deliver_due(conn, client) and not self._stop.is_set():
                            pass  # a full batch: there may be more due
                        delay = await self._next_due(conn)
                        reconnect.reset()
                    except Exception as exc:
                        if self._stop.is_set():
                            break
                        away = classify(exc) is Fault.AWAY
                        (log.warning if away else log.exception)(
                            "webhook sender: database step failed (%s: %s); retrying on a "
                            "new connection", type(exc).__name__, exc)
                        await self._close()
                        delay = reconnect.next()
                    await self._sleep(delay)
            finally:
                await self._close()

    async def _connect(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
            await conn.add_listener(CHANNEL, self._notified)
            conn.add_termination_listener(self._lost)
            self._conn = conn  # what was enqueued while not listening: the next pass finds it
        return self._conn

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._wake.set()

    def _lost(self, conn: object) -> None:
        self._wake.set()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:
                conn.terminate()

    async def _sleep(self, delay: float) -> None:
        if delay > 0 and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _next_due(self, conn: asyncpg.Connection) -> float:
        """Seconds until the earliest notification this sender could claim falls due
        (the fallback if none); refreshes the pending gauge."""
        async with conn.transaction():
            due = await conn.fetchval(_NEXT)
        WEBHOOK_PENDING.set(await conn.fetchval(_PENDING))
        return self.fallback_s if due is None else min(max(due, 0.0), self.fallback_s)

    async def _deliver_due(self, conn: asyncpg.Connection, client: httpx.AsyncClient) -> bool:
        """Claim up to ``batch`` due notifications, send them (concurrently, row locks
        held) and record each outcome, in one transaction. True if the batch was full."""
        s = self.settings
        async with conn.transaction():
            rows = await conn.fetch(_CLAIM, self.batch)
            if not rows:
                return False
            attempts = await asyncio.gather(*(self._send(client, r) for r in rows))
            outcomes = [outcome(a.status, r["attempts"] + 1, s.webhook_max_attempts)
                        for r, a in zip(rows, attempts, strict=True)]
            delays = [retry_delay(s, r["attempts"] + 1) if o == "retry" else 0.0
                      for r, o in zip(rows, outcomes, strict=True)]
            latencies = await conn.fetch(
                _RECORD, [r["notification_id"] for r in rows], [a.status for a in attempts],
                [a.error for a in attempts], outcomes, delays)
        # committed: count, and say what went wrong
        for r, a, o, d in zip(rows, attempts, outcomes, delays, strict=True):
            WEBHOOK_DELIVERIES.labels(o).inc()
            where = (f"webhook delivery {r['notification_id']} (incident {r['incident_id']}, "
                     f"attempt {r['attempts'] + 1}/{s.webhook_max_attempts})")
            if o == "retry":
                log.warning("%s failed: %s; next attempt in %.1f s", where, a.error, d,
                            extra={"fields": {"status": a.status}})
            elif o == "failed":
                log.error("%s failed: %s; giving up", where, a.error,
                          extra={"fields": {"status": a.status}})
        for row in latencies:
            if row["latency"] is not None:
                WEBHOOK_DELIVERY_SECONDS.observe(row["latency"])
        return len(rows) == self.batch

    async def _send(self, client: httpx.AsyncClient, row: asyncpg.Record) -> Attempt:
        """POST one notification, signed now. Never raises for the receiver's sake: every
        way it can go wrong is an ``Attempt`` with no status or a non-2xx one."""
        body = row["body"].encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.settings.webhook_secret, body),
            DELIVERY_HEADER: str(row["notification_id"]),
            EVENT_HEADER: EVENT_CRITICAL,
        }
        try:
            # httpx's timeout is per read/write; this bounds the whole exchange (and how
            # long the row lock is held), whatever a slow receiver trickles.
            async with asyncio.timeout(self.settings.webhook_timeout_s):
                resp = await client.post(self.url, content=body, headers=headers)
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            detail = str(exc) or "no answer"
            return Attempt(None, safe_text(f"{type(exc).__name__}: {detail}", ERROR_CHARS))
        if 200 <= resp.status_code < 300:
            return Attempt(resp.status_code, None)
        text = resp.text.strip()
        error = f"HTTP {resp.status_code}" + (f": {text}" if text else "")
        return Attempt(resp.status_code, safe_text(error, ERROR_CHARS))
