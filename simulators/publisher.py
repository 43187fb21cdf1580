"""Publishing a simulation over MQTT at a target rate, with a bounded in-flight window.

Why paho-mqtt directly and not aiomqtt: the benchmarks drive ingest at 20,000 msg/s, and
aiomqtt tops out near 10-12k msg/s on this machine class while paho reaches 25-29k (see
``shared/platform-notes.md``). the publishing thread drives paho's loop itself (see
``MqttSink``).

Why a helper process: generating, encoding and recording a message costs about as much
CPU as publishing it, so the stream is produced in a child process (``prefetch=True``,
the default) and handed over a pipe in window-sized batches; the publishing process does
little besides ``publish`` calls. The pipe's buffer bounds how far generation runs ahead.

Pacing: with a ``rate``, a token bucket on the monotonic clock releases messages (a
burst of at most 0.5 s worth after a stall, so a scheduling hiccup on a busy machine does
not cost the average rate). Without a rate, or when ``pace_clock`` is set, each message
waits for the simulated clock (``speed`` x real time) to reach its send time.
QoS 1 keeps at most ``inflight`` messages unacknowledged: paho loses messages
silently once more than 65,535 are in flight (message ids wrap), so ``publish`` waits,
serving the connection, while the window is full. QoS 0 uses the same window (a message
leaves it when paho has written it), which bounds memory when the socket is slower than
the generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import multiprocessing
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt

from cityops.devices import Identity, bridge_name, credentials
from cityops.registry import Fleet
from cityops.settings import Settings
from simulators import metrics
from simulators.clock import SimClock
from simulators.groundtruth import encode_truth
from simulators.simulation import Simulation

log = logging.getLogger("cityops.simulate")

# One batch as it crosses the pipe: topics, payloads, send times (sim ms), per-message
# flags (1 = malformed, 2 = duplicate copy, 4 = late) and ground-truth JSON lines.
Batch = tuple[list[str], list[bytes], list[int], list[int], list[bytes] | None]


class PublishError(RuntimeError):
    """The broker could not be reached or refused the credentials."""


@dataclass
class PublishStats:
    """What a run did; ``rate`` is messages per wall-clock second while publishing."""

    sent: int = 0
    completed: int = 0  # acknowledged (QoS 1) or written to the socket (QoS 0)
    errors: int = 0
    malformed: int = 0
    duplicates: int = 0
    late: int = 0
    elapsed_s: float = 0.0
    qos: int = 0
    max_inflight: int = 0
    first_send_ms: int | None = None
    last_send_ms: int | None = None
    ground_truth: str | None = None
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": round(self.rate, 1)}

    def summary(self) -> str:
        return (f"sent {self.sent} messages in {self.elapsed_s:.1f} s ({self.rate:,.0f}/s), "
                f"QoS {self.qos}, {self.completed} completed, {self.errors} errors, "
                f"{self.malformed} malformed, {self.duplicates} duplicates, {self.late} late"
                + (f"; ground truth in {self.ground_truth}" if self.ground_truth else ""))


class _Paced:
    """Waiting the way both sinks wait: turning their own network loop, never sleeping
    blind, so PUBACKs are read and keepalives sent while the pacing or a drain waits."""

    @property
    def inflight(self) -> int:
        raise NotImplementedError

    def _turn(self, timeout: float) -> None:
        raise NotImplementedError

    def idle(self, seconds: float) -> None:
        """Wait while serving the connection(s) (acks, keepalive): the pacing sleep."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._turn(min(left, 0.1))

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every message is acknowledged (QoS 1) or written (QoS 0)."""
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            self._turn(0.01)
        return self.inflight <= 0


class MqttSink(_Paced):
    """A connected paho client with a bounded in-flight window, driven by its caller.

    No network thread: ``publish`` writes straight to the socket (paho does that when no
    loop thread runs) and every 64 messages, or while the window is full, the caller's
    thread runs one non-blocking turn of paho's loop to read PUBACKs and keep the
    connection alive. Measured on 2 loaded cores this is 1.4x (QoS 0) to 3.6x (QoS 1)
    faster than ``loop_start`` plus a semaphore, because the GIL is not handed back and
    forth between two threads for every message.
    """

    def __init__(self, settings: Settings, *, qos: int = 0, inflight: int = 1000,
                 client_id: str | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if not 1 <= inflight <= 65_000:
            raise ValueError("inflight must be between 1 and 65,000 (paho's message ids wrap "
                             "at 65,535)")
        self.qos = qos
        self.inflight_limit = inflight
        self.published = 0
        self.completed = 0
        self.errors = 0
        self.max_inflight = 0
        self._connect_rc: Any = None
        self._last_reconnect = 0.0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"cityops-sim-{os.getpid()}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.host, self.port = settings.mqtt_host, settings.mqtt_port
        tls = settings.mqtt_tls_context()
        if tls is not None:
            self.client.tls_set_context(tls)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason_code: Any, properties: object) -> None:
        self._connect_rc = reason_code

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason_code: object, properties: object) -> None:
        self.completed += 1

    def connect(self, timeout: float = 10.0) -> None:
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise PublishError(f"cannot reach MQTT broker at {self.host}:{self.port}: {exc}"
                               ) from exc
        deadline = time.monotonic() + timeout
        while self._connect_rc is None and time.monotonic() < deadline:
            self.client.loop(0.05)
        rc = self._connect_rc
        if rc is None:
            self.close()
            raise PublishError(f"MQTT broker at {self.host}:{self.port} did not answer CONNECT")
        if getattr(rc, "is_failure", False):
            self.close()
            raise PublishError(f"MQTT broker refused the connection: {rc}")

    @property
    def inflight(self) -> int:
        return self.published - self.completed - self.errors

    def publish(self, topic: str, payload: bytes) -> None:
        if self.published - self.completed - self.errors >= self.inflight_limit:
            self.max_inflight = self.inflight_limit
            while self.published - self.completed - self.errors >= self.inflight_limit:
                self._turn(0.01)
        info = self.client.publish(topic, payload, self.qos)
        self.published += 1
        if info.rc == mqtt.MQTT_ERR_NO_CONN and self.qos > 0:
            # Not an error at QoS 1: paho keeps the message and sends it once reconnected
            # (its PUBACK completes it), so it stays in flight; counting it as failed too
            # would let ``inflight`` go negative and ``drain`` return early.
            self._reconnect()
        elif info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.errors += 1
            if info.rc == mqtt.MQTT_ERR_NO_CONN:
                self._reconnect()
        elif not self.published & 63:
            self.max_inflight = max(self.max_inflight, self.inflight)
            self._turn(0.0)

    def _turn(self, timeout: float) -> None:
        rc = self.client.loop(timeout)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._reconnect()

    def _reconnect(self) -> None:
        """At most once a second; QoS 1 messages still in paho's queue are resent."""
        now = time.monotonic()
        if now - self._last_reconnect < 1.0:
            time.sleep(0.05)
            return
        self._last_reconnect = now
        try:
            self.client.reconnect()
            log.warning("reconnected to MQTT broker %s:%s", self.host, self.port)
        except OSError as exc:
            log.warning("MQTT broker %s:%s unreachable: %s", self.host, self.port, exc)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
            self.client.loop(0.01)


class SinkPool(_Paced):
    """One ``MqttSink`` per identity, chosen by topic: each device logs in as itself.

    Which identity publishes a topic (``identity_for``): in a ``devices`` fleet the
    sensor or gateway the topic names; a topic naming an id the registry does not know
    (the simulator's deliberate ``unknown_sensor`` readings, which no device identity may
    publish) goes through its district's bridge; a device the registry knows but the store
    does not (revoked) cannot publish at all: its messages are counted in ``refused``, as
    the broker would refuse its CONNECT. In a ``bridges`` fleet (load fleets: thousands of
    sensors, a few connections) the district's bridge publishes everything.

    Connections open on first use (a shard needs only its own devices). The in-flight
    window is shared by all of them; every 256 messages, and while waiting, one
    ``select`` over all sockets reads PUBACKs and keeps idle connections alive, so a
    device that publishes once a minute is not disconnected for missing keepalives.
    """

    def __init__(self, settings: Settings, fleet: Fleet, identities: dict[str, Identity], *,
                 qos: int = 0, inflight: int = 1000, client_id: str | None = None) -> None:
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if not 1 <= inflight <= 65_000:
            raise ValueError("inflight must be between 1 and 65,000 (paho's message ids wrap "
                             "at 65,535)")
        self.settings, self.fleet, self.identities = settings, fleet, identities
        self.qos, self.inflight_limit = qos, inflight
        self.client_id = client_id or f"cityops-sim-{os.getpid()}"
        self.sinks: dict[str, MqttSink] = {}
        self._route: dict[str, MqttSink | None] = {}
        self.published = self.completed = self.errors = self.refused = 0
        self.max_inflight = 0
        self._refused_names: set[str] = set()

    # -- which identity -----------------------------------------------------------------
    def identity_for(self, topic: str) -> Identity | None:
        parts = topic.split("/")
        district = parts[1] if len(parts) > 1 else ""
        bridge = self.identities.get(bridge_name(district))
        if self.fleet.identities == "bridges":
            return bridge
        name = parts[3] if len(parts) == 4 and parts[2] == "gateway" else parts[-1]
        ident = self.identities.get(name)
        if ident is not None and ident.kind != "bridge":
            return ident
        known = self.fleet.get(name) is not None or name in self.fleet.gateways()
        return None if known else bridge

    def _sink_for(self, topic: str) -> MqttSink | None:
        try:
            return self._route[topic]
        except KeyError:
            pass
        ident = self.identity_for(topic)
        sink = None
        if ident is not None:
            sink = self.sinks.get(ident.name)
            if sink is None:
                sink = MqttSink(self.settings, qos=self.qos, inflight=self.inflight_limit,
                                client_id=f"{self.client_id}-{ident.name}",
                                username=ident.name, password=ident.password)
                sink.client.on_publish = self._completer(sink)
                sink.connect()
                self.sinks[ident.name] = sink
        elif topic not in self._refused_names:
            self._refused_names.add(topic)
            log.warning("no MQTT identity may publish %s (device not provisioned or revoked)",
                        topic)
        if len(self._route) >= 100_000:
            self._route.clear()
        self._route[topic] = sink
        return sink

    # -- the MqttSink interface ------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Fail early when the local stack provisioned no identity at all."""
        if not self.identities:
            raise PublishError("no device identities: run `cityops stack up` (it provisions "
                               "the fleet's devices) or `cityops devices add`")

    def _completer(self, sink: MqttSink) -> Callable[..., None]:
        """PUBACK (or written, QoS 0): counts for the sink's own window and the pool's."""
        def on_publish(*_: object) -> None:
            sink.completed += 1
            self.completed += 1
        return on_publish

    @property
    def inflight(self) -> int:
        return self.published - self.completed - self.errors

    def publish(self, topic: str, payload: bytes) -> None:
        sink = self._sink_for(topic)
        if sink is None:
            self.refused += 1
            return
        if self.published - self.completed - self.errors >= self.inflight_limit:
            self.max_inflight = self.inflight_limit
            while self.published - self.completed - self.errors >= self.inflight_limit:
                self._turn(0.01)
        errors = sink.errors
        sink.publish(topic, payload)
        self.published += 1
        self.errors += sink.errors - errors
        if not self.published & 255:
            self.max_inflight = max(self.max_inflight, self.inflight)
            self._turn(0.0)

    def _turn(self, timeout: float) -> None:
        """One pass of every connection's network loop, waiting at most ``timeout`` for
        any socket to be readable (one select, not one per connection)."""
        by_sock = {}
        for sink in self.sinks.values():
            sock = sink.client.socket()
            if sock is not None:
                by_sock[sock] = sink
        if not by_sock:
            if timeout:
                time.sleep(timeout)
            return
        writers = [so for so, sk in by_sock.items() if sk.client.want_write()]
        try:
            readable, writable, _ = select.select(list(by_sock), writers, [], timeout)
        except (OSError, ValueError):  # a socket closed under us: let each sink recover
            readable, writable = list(by_sock), []
        for so in readable:
            if by_sock[so].client.loop_read() not in (mqtt.MQTT_ERR_SUCCESS,
                                                      mqtt.MQTT_ERR_AGAIN):
                by_sock[so]._reconnect()
        for so in writable:
            by_sock[so].client.loop_write()
        for sink in by_sock.values():
            sink.client.loop_misc()  # keepalive pings, retries

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()


def open_sink(settings: Settings, fleet: Fleet, *, qos: int = 0, inflight: int = 1000,
              client_id: str | None = None) -> SinkPool:
    """The publisher of ``fleet``'s devices with the local stack's identities."""
    return SinkPool(settings, fleet, credentials(settings), qos=qos, inflight=inflight,
                    client_id=client_id)


class TokenBucket:
    """Releases ``rate`` tokens per second on the monotonic clock; bursts of ``burst_s``."""

    def __init__(self, rate: float, burst_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self.burst = burst_s
        self.sleep = sleep
        self.next = time.monotonic()

    def take(self) -> None:
        now = time.monotonic()
        ahead = self.next - now
        if ahead > 0.002:
            self.sleep(ahead)
        elif ahead < -self.burst:
            self.next = now - self.burst
        self.next += self.interval


# --- where the messages come from ---------------------------------------------------------
def _batch_of(sim: Simulation, want_truth: bool) -> Iterator[Batch]:
    for window in sim.batches():  # empty windows too: the consumer checks its deadline
        flags = [(1 if m.truth.bad else 0) | (2 if m.truth.duplicate_of is not None else 0)
                 | (4 if m.truth.readings and m.truth.readings[0].late else 0) for m in window]
        yield ([m.topic for m in window], [m.payload for m in window],
               [m.truth.send_time for m in window], flags,
               [encode_truth(m.truth) for m in window] if want_truth else None)


def _produce(conn: Connection, spec: dict[str, Any], want_truth: bool) -> None:
    """Child process: build the same simulation and stream its batches into the pipe."""
    # The stream allocates millions of short-lived, acyclic objects; the cyclic collector
    # would spend ~30 % of this process's CPU finding nothing. Run it rarely instead.
    gc.set_threshold(200_000, 50, 100)
    try:
        sim = Simulation(**spec)
        for batch in _batch_of(sim, want_truth):
            conn.send(batch)
    except (BrokenPipeError, EOFError, KeyboardInterrupt):
        pass
    finally:
        with contextlib.suppress(Exception):
            conn.close()


class _Prefetch:
    """Runs ``_produce`` in a spawned process; iterating yields its batches."""

    def __init__(self, sim: Simulation, want_truth: bool) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_produce, args=(send, sim.spec, want_truth),
                                 name="cityops-sim-generator", daemon=True)
        self._proc.start()
        send.close()

    def __iter__(self) -> Iterator[Batch]:
        while True:
            try:
                yield self._recv.recv()
            except EOFError:
                if self._proc.exitcode not in (None, 0):
                    raise RuntimeError(f"simulation process failed (exit code "
                                       f"{self._proc.exitcode})") from None
                return

    def close(self) -> None:
        self._recv.close()
        self._proc.join(timeout=2)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=2)


# --- the publishing loop -------------------------------------------------------------------
def publish_blocking(sim: Simulation, settings: Settings, *, rate: float | None = None,
                     count: int | None = None, duration: float | None = None, qos: int = 0,
                     inflight: int = 1000, pace_clock: bool | None = None,
                     ground_truth: Path | str | None = None, progress: bool = True,
                     prefetch: bool = True, stop: threading.Event | None = None,
                     client_id: str | None = None, progress_stream: IO[str] | None = None,
                     pause: threading.Event | None = None,
                     drained: threading.Event | None = None) -> PublishStats:
    """Publish until ``count`` messages, ``duration`` seconds, or ``stop`` is set.

    With ``prefetch`` the stream is generated from its start in a child process (the
    simulation object is only used as a recipe); without it, from ``sim``'s current
    position in this thread.

    While ``pause`` is set the devices hold their readings (a planned broker maintenance:
    the fleet is told to buffer); once everything sent before the pause is acknowledged,
    ``drained`` is set, so the caller knows the broker holds it all.
    """
    if count is None and duration is None and stop is None:
        raise ValueError("give a count, a duration or a stop event, or it never ends")
    pace = (rate is None) if pace_clock is None else pace_clock
    stats = PublishStats(qos=qos)
    sink = open_sink(settings, sim.fleet, qos=qos, inflight=inflight, client_id=client_id)
    sink.connect()
    want_truth = ground_truth is not None
    truth_fh = Path(ground_truth).open("wb") if ground_truth is not None else None  # noqa: SIM115
    if truth_fh is not None:
        stats.ground_truth = str(ground_truth)
    source = _Prefetch(sim, want_truth) if prefetch else None
    batches = iter(source) if source is not None else _batch_of(sim, want_truth)
    clock = SimClock(sim.start_ms, sim.speed) if pace else None
    err_stream = progress_stream or sys.stderr
    tty = err_stream.isatty()
    stop = stop or threading.Event()
    sent = 0
    limit = count if count is not None else -1
    # The clocks start with the first batch in hand: spawning the generator is set-up.
    first = next(batches, None)
    batches = itertools.chain([first] if first is not None else [], batches)
    bucket = TokenBucket(rate, sleep=sink.idle) if rate else None
    reporter = _Progress(stats, sink, err_stream, tty) if progress else None
    t_start = time.monotonic()
    waited = 0.0
    deadline = t_start + duration if duration is not None else float("inf")
    if clock is not None:
        clock.start()
    next_report = t_start + 1.0
    try:
        while True:
            t_wait = time.monotonic()
            batch = next(batches, None)
            waited += time.monotonic() - t_wait
            if batch is None:
                break
            topics, payloads, send_times, flags, truths = batch
            n = len(topics)
            if limit >= 0:
                n = min(n, limit - sent)
            done = 0
            for i in range(n):
                if clock is not None:
                    wait = clock.seconds_until(send_times[i])
                    while wait > 0 and not stop.is_set() and time.monotonic() < deadline:
                        sink.idle(min(wait, 0.25))
                        if reporter is not None and time.monotonic() >= next_report:
                            next_report = reporter.tick(sent + done)
                        wait = clock.seconds_until(send_times[i])
                    if wait > 0:
                        break  # stopped or out of time while waiting for the clock
                if pause is not None and pause.is_set():
                    _hold(sink, pause, drained, stop)
                if bucket is not None:
                    bucket.take()
                sink.publish(topics[i], payloads[i])
                done += 1
                if not done & 127:
                    now = time.monotonic()
                    if now >= deadline or stop.is_set():
                        break
                    if reporter is not None and now >= next_report:
                        next_report = reporter.tick(sent + done)
            if done:
                _account(stats, send_times, flags, done)
                if truth_fh is not None and truths is not None:
                    truth_fh.write(b"\n".join(truths[:done]) + b"\n")
            sent += done
            if sent == limit or time.monotonic() >= deadline or stop.is_set():
                stats.stopped_early = stop.is_set()
                break
    finally:
        stats.sent = sink.published
        stats.elapsed_s = time.monotonic() - t_start
        stats.extra["waited_for_generator_s"] = round(waited, 3)
        sink.drain()
        stats.extra["elapsed_with_drain_s"] = round(time.monotonic() - t_start, 4)
        stats.completed, stats.errors = sink.completed, sink.errors
        stats.extra["connections"] = len(sink.sinks)
        if sink.refused:
            stats.extra["refused_no_identity"] = sink.refused
        stats.max_inflight = max(sink.max_inflight, reporter.max_inflight if reporter else 0)
        if reporter is not None:
            reporter.tick(stats.sent, final=True)
        sink.close()
        if source is not None:
            source.close()
        if truth_fh is not None:
            truth_fh.close()
    return stats


def _hold(sink: SinkPool, pause: threading.Event, drained: threading.Event | None,
          stop: threading.Event) -> None:
    """Serve the connection without publishing until ``pause`` clears."""
    while pause.is_set() and not stop.is_set():
        if drained is not None and sink.inflight == 0:
            drained.set()
        sink.idle(0.05)
    if drained is not None:
        drained.clear()


def _account(stats: PublishStats, send_times: list[int], flags: list[int], done: int) -> None:
    if stats.first_send_ms is None:
        stats.first_send_ms = send_times[0]
    stats.last_send_ms = send_times[done - 1]
    head = flags[:done]
    stats.malformed += sum(f & 1 for f in head)
    stats.duplicates += sum(1 for f in head if f & 2)
    stats.late += sum(1 for f in head if f & 4)


class _Progress:
    """The once-a-second progress line on stderr, and the Prometheus counters."""

    def __init__(self, stats: PublishStats, sink: SinkPool, stream: IO[str], tty: bool) -> None:
        self.stats, self.sink, self.stream, self.tty = stats, sink, stream, tty
        self.t0 = self.t_last = time.monotonic()
        self.last_sent = 0
        self.last_errors = 0
        self.max_inflight = 0

    def tick(self, sent: int, final: bool = False) -> float:
        now = time.monotonic()
        inflight = self.sink.inflight
        self.max_inflight = max(self.max_inflight, inflight)
        rate = (sent - self.last_sent) / max(now - self.t_last, 1e-6)
        errors = self.sink.errors
        metrics.MESSAGES.inc(sent - self.last_sent)
        metrics.ERRORS.inc(errors - self.last_errors)
        metrics.INFLIGHT.set(inflight)
        metrics.RATE.set(rate)
        if not final:
            line = (f"simulate: {sent:>10,} sent  {rate:>9,.0f} msg/s  in flight {inflight:>6,}"
                    f"  errors {errors:,}")
            self.stream.write(("\r" + line) if self.tty else (line + "\n"))
            self.stream.flush()
        elif self.tty:
            self.stream.write("\n")
        self.t_last, self.last_sent, self.last_errors = now, sent, errors
        return now + 1.0


async def publish(sim: Simulation, settings: Settings, **options: Any) -> PublishStats:
    """Async wrapper: runs ``publish_blocking`` in a worker thread (never blocks the loop).

    Cancelling the awaiting task sets the stop event; the worker drains and exits.
    """
    stop: threading.Event = options.pop("stop", None) or threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(publish_blocking, sim, settings, stop=stop,
                                                   **options))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Exception):
            await task
        raise
