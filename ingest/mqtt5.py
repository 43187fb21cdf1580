"""A lean, subscribe-only MQTT v5 client on an asyncio ``Protocol``: the ``asyncio``
transport, and the way past the Python MQTT clients' ceiling.

Why it exists: profiled on this machine kind, paho spends most of a message's CPU
building objects ingest never uses (a ``Properties`` object per PUBLISH, an
``MQTTMessage``, topic matching for callbacks) and aiomqtt adds a task and an
``asyncio.wait`` per message on top. Ingest needs four packet types. Here the bytes of
many PUBLISH packets are parsed in one tight loop per socket read, into plain tuples,
and the PUBACKs of a batch leave in one write.

What it speaks (MQTT 5.0, OASIS standard, sections 3.1-3.4, 3.8-3.9, 3.12-3.14):
CONNECT (clean start off, Session Expiry Interval, Receive Maximum, user name and
password), CONNACK, SUBSCRIBE/SUBACK at QoS 1 (one packet for all of the worker's topic
filters: one in shared mode, one per district in districts mode), PUBLISH in (QoS 0/1;
QoS 2 is refused by subscribing at QoS 1 only), PUBACK out, PINGREQ/PINGRESP keepalive,
DISCONNECT both ways.
It announces no Topic Alias Maximum, so the broker never sends topic aliases, and it
skips PUBLISH properties (ingest uses none).
A lost connection ends ``next_batch`` with ``ConnectionError`` (so does a broker that
stops answering: no byte for 1.5 keepalive periods closes the socket). The service
then opens a new source, which resumes the persistent session: the broker hands back
whatever was not acknowledged. Each source is one connection, so a PUBACK can never
carry an old connection's packet id on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from types import TracebackType

from cityops.settings import Settings
from ingest.mqtt import MqttBatch, MqttRefused, connect_properties, subscriptions
from ingest.normalize import InboundMessage

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
_PUBACK = struct.Struct("!BBH")


def varint(n: int) -> bytes:
    """MQTT Variable Byte Integer (1-4 bytes, 7 bits each, low first)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + varint(len(body)) + body


def connect_packet(client_id: str, user: str, password: str, keepalive: int,
                   session_expiry: int, receive_maximum: int) -> bytes:
    props = (b"\x11" + struct.pack("!I", session_expiry)
             + b"\x21" + struct.pack("!H", receive_maximum))
    flags = 0x80 | 0x40  # user name, password; clean start off; no will
    body = (utf8("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive)
            + varint(len(props)) + props + utf8(client_id) + utf8(user) + utf8(password))
    return packet(CONNECT, body)


def subscribe_packet(packet_id: int, topic_filters: list[str], qos: int = 1) -> bytes:
    """One SUBSCRIBE for several filters (no properties; each filter with its options
    byte, here only the maximum QoS)."""
    return packet(SUBSCRIBE, struct.pack("!H", packet_id) + b"\x00"
                  + b"".join(utf8(f) + bytes([qos]) for f in topic_filters))


def suback_reasons(body: bytes) -> bytes:
    """A SUBACK's reason codes, one per filter: after the packet id (2 bytes) and the
    properties (a Variable Byte Integer length, then that many bytes)."""
    i, mult, plen = 2, 1, 0
    while i < len(body):
        b = body[i]
        i += 1
        plen += (b & 0x7F) * mult
        if b < 0x80:
            break
        mult <<= 7
    return body[i + plen:]


class ProtocolError(ConnectionError):
    """The broker sent something this client does not accept (or refused us)."""


class _Wire(asyncio.Protocol):
    """Frames packets out of the byte stream; PUBLISHes go to ``inbox`` as tuples."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.inbox: list[tuple[str, bytes, int, int]] = []
        self.wake = asyncio.Event()
        self.control: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._topics: dict[bytes, str] = {}
        self.received = 0  # bytes so far: the keepalive watchdog sees whether any came

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_exception(ConnectionError(f"MQTT connection lost: {exc}"))
        self.wake.set()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        self.received += len(data)
        n, pos = len(buf), 0
        topics, inbox = self._topics, self.inbox
        got = False
        try:
            while n - pos >= 2:
                header = buf[pos]
                # Remaining length: a Variable Byte Integer of up to 4 bytes.
                i, mult, length = pos + 1, 1, 0
                while True:
                    if i >= n:
                        raise IndexError
                    b = buf[i]
                    length += (b & 0x7F) * mult
                    i += 1
                    if b < 0x80:
                        break
                    mult <<= 7
                    if mult > 1 << 21:
                        raise ProtocolError("malformed remaining length")
                end = i + length
                if end > n:
                    break
                kind = header & 0xF0
                if kind == PUBLISH:
                    qos = (header >> 1) & 3
                    j = i + 2 + ((buf[i] << 8) | buf[i + 1])
                    tb = bytes(buf[i + 2:j])
                    topic = topics.get(tb)
                    if topic is None:
                        topic = topics[tb] = tb.decode("utf-8", "replace")
                        if len(topics) > 100_000:
                            topics.clear()
                    mid = 0
                    if qos:
                        mid = (buf[j] << 8) | buf[j + 1]
                        j += 2
                    # Skip the PUBLISH properties (length-prefixed).
                    mult, plen = 1, 0
                    while True:
                        b = buf[j]
                        j += 1
                        plen += (b & 0x7F) * mult
                        if b < 0x80:
                            break
                        mult <<= 7
                    if j + plen > end:
                        raise ProtocolError("PUBLISH header longer than its packet")
                    inbox.append((topic, bytes(buf[j + plen:end]), mid, qos))
                    got = True
                elif kind == PINGRESP:
                    pass
                else:
                    self.control.put_nowait((kind, bytes(buf[i:end])))
                pos = end
        except IndexError:
            pass  # a packet split across reads: keep its bytes for the next one
        except ProtocolError as exc:
            self.connection_lost(exc)
            if self.transport is not None:
                self.transport.close()
        del buf[:pos]
        if got:
            self.wake.set()


class LeanMqttSource:
    """The ``asyncio`` transport: same contract as the sources in ``ingest.mqtt``."""

    def __init__(self, settings: Settings, client_id: str) -> None:
        self.settings = settings
        self.client_id = client_id
        self.max_batch = settings.ingest_batch_max
        self.linger = settings.ingest_batch_linger_ms / 1000
        self.keepalive = 30
        self._wire: _Wire | None = None
        self._pinger: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LeanMqttSource:
        s = self.settings
        loop = asyncio.get_running_loop()
        tls = s.mqtt_tls_context()  # production brokers speak MQTT over TLS only
        _, wire = await asyncio.wait_for(loop.create_connection(
            _Wire, s.mqtt_host, s.mqtt_port, ssl=tls,
            server_hostname=s.mqtt_host if tls is not None else None), 15)
        self._wire = wire
        try:
            await self._handshake(wire)
        except BaseException:
            assert wire.transport is not None
            wire.transport.abort()
            raise
        self._pinger = asyncio.create_task(self._ping())
        return self

    async def _handshake(self, wire: _Wire) -> None:
        s = self.settings
        assert wire.transport is not None
        props = connect_properties(s)
        wire.transport.write(connect_packet(
            self.client_id, s.mqtt_ingest_user, s.mqtt_ingest_password, self.keepalive,
            props.SessionExpiryInterval, props.ReceiveMaximum))
        kind, body = await self._control(wire)
        if kind == CONNACK and len(body) >= 2 and body[1] in (0x86, 0x87):
            raise MqttRefused(f"MQTT connect refused: bad user name or password / not "
                              f"authorized (reason {body[1]:#x})")
        if kind != CONNACK or len(body) < 2 or body[1] != 0:
            raise ProtocolError(f"MQTT connect refused (packet {kind:#x}, "
                                f"reason {body[1] if len(body) > 1 else '?'})")
        filters = subscriptions(s)
        wire.transport.write(subscribe_packet(1, filters))
        kind, body = await self._control(wire)
        reasons = suback_reasons(body) if kind == SUBACK else b""
        if len(reasons) != len(filters) or max(reasons) > 2:
            raise ProtocolError(f"MQTT subscribe refused (packet {kind:#x}, reasons "
                                f"{reasons.hex() or '?'} for {filters})")

    @staticmethod
    async def _control(wire: _Wire) -> tuple[int, bytes]:
        """The next control packet, or ``ConnectionError`` if the connection dies first."""
        getting = asyncio.ensure_future(wire.control.get())
        done, _ = await asyncio.wait({getting, wire.closed}, timeout=15,
                                     return_when=asyncio.FIRST_COMPLETED)
        if getting in done:
            return getting.result()
        getting.cancel()
        if wire.closed in done:
            wire.closed.result()  # raises the ConnectionError
        raise TimeoutError("MQTT broker did not answer within 15 s")

    async def _ping(self) -> None:
        """Keepalive both ways: PINGREQ every half period; if nothing at all arrived for
        1.5 periods (not even a PINGRESP), the broker is gone without a FIN (a host
        reboot, a network partition): close, so ``next_batch`` raises and we reconnect."""
        wire = self._wire
        assert wire is not None and wire.transport is not None
        seen, silent = wire.received, 0.0
        while not wire.transport.is_closing():
            await asyncio.sleep(self.keepalive / 2)
            silent = 0.0 if wire.received != seen else silent + self.keepalive / 2
            seen = wire.received
            if silent >= self.keepalive * 1.5:
                wire.connection_lost(TimeoutError("no PINGRESP from the MQTT broker"))
                wire.transport.abort()
                return
            wire.transport.write(bytes([PINGREQ, 0]))

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._pinger:
            self._pinger.cancel()
        if self._wire and self._wire.transport and not self._wire.transport.is_closing():
            self._wire.transport.write(bytes([DISCONNECT, 0]))
            self._wire.transport.close()
        if self._wire:
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._wire.closed), 2)

    def _take(self, limit: int) -> list[tuple[str, bytes, int, int]]:
        assert self._wire is not None
        inbox = self._wire.inbox
        taken = inbox[:limit]
        del inbox[:limit]
        return taken

    async def next_batch(self) -> MqttBatch:
        wire = self._wire
        assert wire is not None
        while not wire.inbox:
            if wire.closed.done():
                wire.closed.result()  # raises the ConnectionError
                raise ConnectionError("MQTT connection closed")
            wire.wake.clear()
            await wire.wake.wait()
        taken = self._take(self.max_batch)
        if len(taken) < self.max_batch and self.linger:
            await asyncio.sleep(self.linger)
            taken += self._take(self.max_batch - len(taken))
        now = int(time.time() * 1000)
        return MqttBatch([InboundMessage(t, p, now) for t, p, _, _ in taken],
                         [(mid, qos) for _, _, mid, qos in taken if qos])

    def ack(self, batch: MqttBatch) -> bool:
        wire = self._wire
        if wire is None or wire.transport is None or wire.transport.is_closing() \
                or wire.closed.done():
            return False  # unacknowledged: the session redelivers after the reconnect
        if batch.acks:
            wire.transport.write(b"".join([_PUBACK.pack(PUBACK, 2, mid)
                                           for mid, _ in batch.acks]))
        return True
