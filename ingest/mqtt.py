"""The MQTT side of ingest: a persistent MQTT v5 session on its subscription, messages
handed over in batches, each acknowledged only when the service says so.

Two ways to subscribe, chosen by the ``ingest_subscription`` setting:

``shared``     (default) every worker subscribes to ``$share/<mqtt_share_group>/<root>/#``
               and Mosquitto splits the messages between whoever is connected: elastic
               scale-out (add a worker, it gets a share). But Mosquitto 2.0.11 does not
               restore a shared subscription after its own restart (see below), so an
               unplanned broker restart drops what sensors publish before ingest has
               subscribed again.
``districts``  static partitioning by district, like Kafka partitions: worker
               ``ingest_worker_index`` of ``ingest_workers`` subscribes, without ``$share``,
               to ``<root>/<district>/#`` for every ``ingest_workers``-th district of
               ``cityops.city.DISTRICTS`` (``worker_districts``). Its persistent session,
               subscriptions included, survives a broker restart, so a broker crash under
               load loses nothing. The price: scale-out is by district (at most one worker
               per district, never elastic: changing ``ingest_workers`` means restarting
               every worker with the new count), a busy district cannot be split, and a
               topic under a district code the city does not know reaches no worker at all
               (in shared mode it would be dead-lettered). The MQTT client id names the
               slot (``<mqtt_share_group>-districts-<index>-of-<workers>``), not the worker:
               the session belongs to the partition, so any process taking slot 0 resumes
               slot 0's backlog, and two processes configured for the same slot show up at
               once (the broker disconnects one for the other) instead of both consuming.

Three transports, same contract (``next_batch`` / ``ack``), chosen by the
``ingest_transport`` setting:

``asyncio``      (default) ``ingest.mqtt5``: a lean subscribe-only MQTT v5 client on an
                 asyncio ``Protocol`` that parses many PUBLISH packets per socket read.
                 Measured (``bench/ingest.py``), the whole ingest path then costs about a
                 tenth of the CPU per message of a bare aiomqtt receive loop.
``aiomqtt``      the asyncio client, everything on the event loop. Measured on this
                 machine kind, its subscriber tops out near 14-16k msg/s
                 (``shared/platform-notes.md``): each message costs a task and an
                 ``asyncio.wait`` in its iterator, plus paho's per-message objects.
``paho-thread``  paho's own network loop in a thread; its callback only appends to a
                 list, and the event loop takes whole batches from it. Cheaper than
                 aiomqtt, but paho's parsing and the GIL hand-offs remain.

All use manual acknowledgement: a QoS 1 message is PUBACKed only after Kafka has
acknowledged everything made from it, so a crash before that leaves it in the broker's
session for redelivery. The session survives the process (clean start off, session
expiry set, stable client id per worker or slot). MQTT v5 Receive Maximum caps the
unacknowledged messages the broker will send us: that is the bound on ingest's
in-memory queue, and when it is reached Mosquitto holds (queues) the rest.

A source is one connection. When it is lost, ``next_batch`` raises one of
``CONNECTION_LOST`` and the service opens a new source (same client id, clean start
off) after a backoff. Packet ids belong to a connection: a message received on the old
connection is never acknowledged on the new one (``ack`` returns False for it); the
broker redelivers it on the resumed session instead, with the same payload, so the
same event id. Every connect subscribes again: Mosquitto 2.0.11 restores a persistent
session's plain subscriptions and their queued messages after its own restart (SIGTERM:
it saves its persistence file on the way out), but not a SHARED subscription nor what
was queued for it; until we subscribe, what sensors publish has no subscriber and is
dropped. Measured (publisher at 500 msg/s QoS 1, broker down 1-10 s, subscriber
reconnecting within 1-2 s): ``districts``-style plain subscriptions lost 0 in every run,
shared ones lost 0 to 1,541 of 5,000. Hence, in shared mode, the short backoff cap
(``ingest_reconnect_max_ms``), which only narrows that gap; districts mode closes it.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityops.city import DISTRICTS
from cityops.settings import Settings
from ingest import metrics
from ingest.normalize import InboundMessage

log = logging.getLogger("cityops.ingest.mqtt")
RECEIVE_MAXIMUM_LIMIT = 65_535  # the protocol's ceiling for Receive Maximum
_PUBACK = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id


def send_acks(client: paho.Client, acks: list[tuple[int, int]]) -> None:
    """PUBACK a batch of QoS 1 messages with one queued write.

    paho's public ``ack(mid, qos)`` queues one 4-byte packet per call, wakes its network
    thread with a syscall per call and then sends each packet with its own ``send()``:
    profiled, that was an eighth of ingest's CPU at full speed. The PUBACKs below are
    byte for byte what ``ack()`` queues (paho's ``_send_command_with_mid``; MQTT v5 lets
    a success PUBACK omit its reason code), concatenated and handed to paho's packet
    queue once. If paho's internals ever change shape, or for QoS 2, we fall back to
    the public call.
    """
    queue = getattr(client, "_packet_queue", None)
    if queue is None or any(qos != 1 for _, qos in acks):
        for mid, qos in acks:
            client.ack(mid, qos)
        return
    if acks:
        queue(paho.PUBACK, b"".join([_PUBACK.pack(paho.PUBACK, 2, mid) for mid, _ in acks]),
              0, 0)


@dataclass(slots=True)
class MqttBatch:
    """Messages taken from MQTT together, and what acknowledging them needs."""

    messages: list[InboundMessage] = field(default_factory=list)
    acks: list[tuple[int, int]] = field(default_factory=list)  # (mid, qos) of QoS>0 messages
    connection: int = 0  # which connection of the source received them (paho reconnects)


class MqttRefused(Exception):
    """The broker refused our CONNECT (bad credentials, not authorized): retrying cannot
    help, so the service stops instead of reconnecting."""


# What a lost or failed MQTT connection raises, on any transport: reconnect and resume.
CONNECTION_LOST: tuple[type[BaseException], ...] = (ConnectionError, OSError, TimeoutError,
                                                    aiomqtt.MqttError)


class MqttSource(Protocol):
    async def __aenter__(self) -> MqttSource: ...
    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None: ...
    async def next_batch(self) -> MqttBatch: ...
    def ack(self, batch: MqttBatch) -> bool: ...


SUBSCRIPTION_MODES = ("shared", "districts")


def subscription(settings: Settings) -> str:
    """The shared-mode filter (also the bare-client baseline of ``bench/ingest.py``)."""
    return f"$share/{settings.mqtt_share_group}/{settings.mqtt_topic_root}/#"


def subscription_mode(settings: Settings) -> str:
    mode = settings.ingest_subscription.strip().lower()
    if mode not in SUBSCRIPTION_MODES:
        raise ValueError(f"unknown ingest_subscription {settings.ingest_subscription!r} "
                         f"({' | '.join(SUBSCRIPTION_MODES)})")
    return mode


def worker_districts(settings: Settings) -> tuple[str, ...]:
    """Districts mode: the district codes worker ``ingest_worker_index`` of
    ``ingest_workers`` owns. Round robin over ``cityops.city.DISTRICTS`` (dense urban
    districts are listed first, so they spread over the workers); deterministic, so
    every worker computes the same split without talking to the others, and together
    the workers own every district exactly once."""
    n, i = settings.ingest_workers, settings.ingest_worker_index
    if not 1 <= n <= len(DISTRICTS):
        raise ValueError(f"ingest_workers={n}: districts mode needs 1..{len(DISTRICTS)} "
                         "workers (one district is the smallest share)")
    if not 0 <= i < n:
        raise ValueError(f"ingest_worker_index={i} is not in 0..{n - 1}")
    return tuple(d.code for d in DISTRICTS[i::n])


def subscriptions(settings: Settings) -> list[str]:
    """The topic filters this worker subscribes to (QoS 1), per ``ingest_subscription``."""
    if subscription_mode(settings) == "shared":
        return [subscription(settings)]
    return [f"{settings.mqtt_topic_root}/{code}/#" for code in worker_districts(settings)]


def session_client_id(settings: Settings, worker_id: str) -> str:
    """The MQTT client id, which names the persistent session: per worker in shared mode,
    per slot of the group (``mqtt_share_group`` names the group in both modes, so two
    ingest deployments on one broker never resume each other's sessions) in districts
    mode (see the module doc)."""
    if subscription_mode(settings) == "shared":
        return f"cityops-ingest-{worker_id}"
    return (f"{settings.mqtt_share_group}-districts-{settings.ingest_worker_index}"
            f"-of-{settings.ingest_workers}")


def connect_properties(settings: Settings) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = settings.ingest_session_expiry_s
    props.ReceiveMaximum = max(1, min(settings.ingest_inflight_max, RECEIVE_MAXIMUM_LIMIT))
    return props


def open_source(settings: Settings, client_id: str, transport: str | None = None) -> MqttSource:
    kind = (transport or settings.ingest_transport).lower()
    if kind == "aiomqtt":
        return AiomqttSource(settings, client_id)
    if kind == "paho-thread":
        return PahoThreadSource(settings, client_id)
    if kind == "asyncio":
        from ingest.mqtt5 import LeanMqttSource

        return LeanMqttSource(settings, client_id)
    raise ValueError(f"unknown ingest transport {kind!r} (asyncio | paho-thread | aiomqtt)")


class AiomqttSource:
    """The aiomqtt transport (see module doc)."""

    def __init__(self, settings: Settings, client_id: str) -> None:
        self.settings = settings
        self.max_batch = settings.ingest_batch_max
        self.linger = settings.ingest_batch_linger_ms / 1000
        self.client = aiomqtt.Client(
            settings.mqtt_host, settings.mqtt_port, tls_context=settings.mqtt_tls_context(),
            username=settings.mqtt_ingest_user, password=settings.mqtt_ingest_password,
            identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False, properties=connect_properties(settings), keepalive=30)
        # aiomqtt has no public manual-acknowledgement API yet (aiomqtt issue #345, draft
        # PR #346), and without one paho PUBACKs every message as soon as it is parsed,
        # before Kafka has it: a crash would lose it. So we switch the underlying paho
        # client to manual acks before connecting, and call its ``ack(mid, qos)`` from the
        # event loop (aiomqtt drives paho from that same loop, so no thread is involved).
        self._paho: paho.Client = self.client._client
        self._paho.manual_ack_set(True)
        self._lost = False

    async def __aenter__(self) -> AiomqttSource:
        try:
            await self.client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            if exc.rc in (4, 5, 134, 135):  # bad user name or password / not authorized
                raise MqttRefused(f"MQTT connect refused: {exc}") from exc
            raise
        # A resumed session pours its backlog in before the SUBACK: allow for the wait.
        granted = await self.client.subscribe(
            [(f, 1) for f in subscriptions(self.settings)], timeout=60)
        refused = [rc for rc in granted if getattr(rc, "is_failure", False)]
        if refused:  # the ACL does not let the ingest account read these filters
            await self.client.__aexit__(None, None, None)
            raise MqttRefused(f"MQTT subscribe refused: {refused}")
        self._messages = self.client.messages.__aiter__()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._lost = True
        await self.client.__aexit__(et, e, tb)

    async def next_batch(self) -> MqttBatch:
        """Wait for one message, then take what else arrives within the linger time."""
        try:
            first = await anext(self._messages)
        except BaseException:
            self._lost = True
            raise
        msgs = [first]
        for attempt in range(2):
            while len(msgs) < self.max_batch and len(self.client.messages):
                msgs.append(await anext(self._messages))
            if attempt == 0 and len(msgs) < self.max_batch:
                await asyncio.sleep(self.linger)
        now = int(time.time() * 1000)
        batch = MqttBatch()
        for m in msgs:
            payload = m.payload if isinstance(m.payload, bytes) else bytes(m.payload)  # type: ignore[arg-type]
            batch.messages.append(InboundMessage(m.topic.value, payload, now))
            if m.qos:
                batch.acks.append((m.mid, m.qos))
        return batch

    def ack(self, batch: MqttBatch) -> bool:
        if self._lost or not self._paho.is_connected():
            return False  # its packet ids died with the connection: the broker redelivers
        send_acks(self._paho, batch.acks)
        return True


class PahoThreadSource:
    """The paho-in-a-thread transport (see module doc)."""

    def __init__(self, settings: Settings, client_id: str) -> None:
        self.settings = settings
        self.max_batch = settings.ingest_batch_max
        self.linger = settings.ingest_batch_linger_ms / 1000
        self._paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=paho.MQTTv5, manual_ack=True)
        self._paho.username_pw_set(settings.mqtt_ingest_user, settings.mqtt_ingest_password)
        self._paho.on_message = self._on_message
        self._paho.on_connect = self._on_connect
        self._paho.on_disconnect = self._on_disconnect
        self._buf: list[tuple[str, bytes, int, int]] = []
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._closing = False
        self._connection = 0  # bumped on every (re)connect, under the lock
        self._taken_on = 0  # the connection the last ``_take`` took from

    # -- paho thread -------------------------------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: object, flags: object,
                    reason: object, props: object = None) -> None:
        if getattr(reason, "is_failure", False):
            self._set_error(ConnectionError(f"MQTT connect refused: {reason}"))
            return
        # paho reconnects by itself: messages received on the old connection must not be
        # acknowledged on this one (their packet ids are the old connection's, and the
        # broker is about to redeliver them). Drop the unprocessed ones, and let batches
        # already taken fail their ``ack``.
        with self._lock:
            if self._connection:
                metrics.MQTT_RECONNECTS.inc()
                self._buf.clear()
            self._connection += 1
        # Subscribing again on a resumed session is harmless and covers a lost session.
        client.subscribe([(f, 1) for f in subscriptions(self.settings)])
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._connected.set)

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object,
                       reason: object, props: object = None) -> None:
        if not self._closing:
            log.warning("MQTT disconnected (%s); paho reconnects, unacked messages are "
                        "redelivered", reason)

    def _set_error(self, exc: BaseException) -> None:
        self._error = exc
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._wake.set)
        self._loop.call_soon_threadsafe(self._connected.set)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        item = (msg.topic, msg.payload, msg.mid, msg.qos)
        with self._lock:
            self._buf.append(item)
            first = len(self._buf) == 1
        if first:  # one wake-up per batch, not per message
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._wake.set)

    # -- event loop ----------------------------------------------------------------------
    async def __aenter__(self) -> PahoThreadSource:
        self._loop = asyncio.get_running_loop()
        s = self.settings
        tls = s.mqtt_tls_context()
        if tls is not None:
            self._paho.tls_set_context(tls)
        await asyncio.to_thread(self._paho.connect, s.mqtt_host, s.mqtt_port, 30,
                                clean_start=False, properties=connect_properties(s))
        self._paho.loop_start()
        await asyncio.wait_for(self._connected.wait(), 15)
        if self._error:
            raise self._error
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._closing = True
        self._paho.disconnect()
        await asyncio.to_thread(self._paho.loop_stop)

    def _take(self, limit: int) -> list[tuple[str, bytes, int, int]]:
        with self._lock:
            taken = self._buf[:limit]
            del self._buf[:limit]
            self._taken_on = self._connection
        return taken

    async def next_batch(self) -> MqttBatch:
        """Wait for messages, then give a partial batch the linger time to fill up: Kafka
        acknowledges a batch per round trip, so tiny batches would cap the throughput."""
        while True:
            if self._error:
                raise self._error
            taken = self._take(self.max_batch)
            if taken:
                break
            self._wake.clear()
            await self._wake.wait()
        connection = self._taken_on
        if len(taken) < self.max_batch and self.linger:
            await asyncio.sleep(self.linger)
            more = self._take(self.max_batch - len(taken))
            if self._taken_on == connection:  # else: redelivered on the new connection
                taken += more
            else:
                taken, connection = more, self._taken_on
        now = int(time.time() * 1000)
        return MqttBatch([InboundMessage(t, p, now) for t, p, _, _ in taken],
                         [(mid, qos) for _, _, mid, qos in taken if qos], connection)

    def ack(self, batch: MqttBatch) -> bool:
        if batch.connection != self._connection:
            return False  # received on a connection paho has since replaced
        # paho's packet queue is a deque appended to from here and drained by its
        # network thread, which a byte on its socket pair wakes.
        send_acks(self._paho, batch.acks)
        return True
