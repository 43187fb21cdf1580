"""Ingest rides through broker restarts by itself: a real Mosquitto restarted mid-stream,
then a real Kafka broker restarted mid-stream, while an ingest worker process keeps
running. Every reading published reaches Kafka (redelivered ones only as the same event
id), the worker never exits, and it says what happened (reconnect metric, /healthz).

These tests restart servers, so they run on a stack of their own, not the session's.

Measured limitation of Mosquitto 2.0.11 (Debian): a persistent session's SHARED
subscription is not restored from its persistence file after a restart (a plain one
is), so a message published after the broker came back and before ingest
re-subscribed has no subscriber and is dropped by the broker. Ingest re-subscribes on
every connect and reconnects fast (``ingest_reconnect_max_ms``), which only narrows that
gap. So the publisher here, like a gateway that connects after the broker's
subscribers, resumes once ingest is subscribed again; everything the broker held
across the restart, and everything the publisher had not got a PUBACK for, is
re-delivered or re-published, and must all arrive. (Ingest's districts mode, with plain
subscriptions the broker does restore, closes the gap: tests/test_ingest_partitioned.py
restarts the broker without holding the publisher.)

The Kafka broker (Apache Kafka, stopped with SIGTERM: its controlled shutdown) is
restarted under the idempotent producer ingest always uses; publishing goes on while
Kafka is down: ingest must hold the stream (Receive Maximum backpressure, retries) and
deliver all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from cityops.registry import Fleet, load_fleet
from cityops.settings import Settings
from cityops.stack import Stack
from tests.support import events_in, injector, isolated_settings, topic_partitions
from tests.test_ingest_service import Worker, base_time, stream

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def own_stack() -> Iterator[Stack]:
    """Mosquitto and the Kafka broker only, in a folder of their own (the servers drop to
    their own users: the folder must be world-readable, hence not pytest's tmp_path)."""
    state = Path(tempfile.mkdtemp(prefix="cityops-reconnect-",
                                  dir=os.environ.get("CITYOPS_TEST_TMP")))
    state.chmod(0o755)
    st = Stack(isolated_settings(state, ingest_reconnect_max_ms=1000))
    try:
        st.up(only=["mqtt", "kafka"])
        yield st
    finally:
        st.down()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(Settings().fleet_file)


class SurvivingPublisher:
    """Publishes messages with QoS 1 like a sensor gateway that survives a broker restart:
    whatever the broker had not PUBACKed when the connection dropped is published again
    on a new connection. (A duplicate carries the same payload, so the same event id.)"""

    def __init__(self, settings: Settings, msgs: list[tuple[str, bytes]], window: int = 200,
                 per_second: int = 2000) -> None:
        self.settings, self.msgs, self.window = settings, msgs, window
        self.login = injector(settings)  # the broker is up now; provisioned once
        self.per_second = per_second
        self.acked: set[int] = set()
        self.connections = 0
        self.may_reconnect = threading.Event()  # cleared by the test around a restart
        self.may_reconnect.set()
        self.may_publish = threading.Event()  # cleared: finish what is pending, then wait
        self.may_publish.set()
        self.idle = threading.Event()  # paused with nothing pending
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SurvivingPublisher:
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"publisher stuck at {len(self.acked)} acked"

    def _run(self) -> None:
        todo = deque(range(len(self.msgs)))
        started = time.monotonic()
        sent = 0
        deadline = started + 120
        while (todo or len(self.acked) < len(self.msgs)) and time.monotonic() < deadline:
            self.may_reconnect.wait(60)
            lost = threading.Event()
            client = paho.Client(CallbackAPIVersion.VERSION2,
                                 client_id=f"pub-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
            client.username_pw_set(*self.login)
            client.on_disconnect = lambda *_, lost=lost: lost.set()
            try:
                client.connect(self.settings.host, self.settings.mqtt_port, keepalive=10)
            except OSError:
                time.sleep(0.2)  # the broker is restarting
                continue
            self.connections += 1
            client.loop_start()
            pending: list[tuple[int, paho.MQTTMessageInfo]] = []
            try:
                while not lost.is_set() and (todo or pending):
                    if not self.may_publish.is_set() and not pending:
                        self.idle.set()
                    still = []
                    for i, info in pending:
                        (self.acked.add(i) if info.is_published() else still.append((i, info)))
                    pending = still
                    if not self.may_publish.is_set():
                        if not pending:
                            self.idle.set()
                        time.sleep(0.002)
                        continue
                    self.idle.clear()
                    if len(pending) >= self.window or not todo:
                        time.sleep(0.002)
                        continue
                    # Pace the stream so the restart lands in the middle of it.
                    if sent > (time.monotonic() - started) * self.per_second:
                        time.sleep(0.005)
                        continue
                    i = todo.popleft()
                    topic, payload = self.msgs[i]
                    info = client.publish(topic, payload, qos=1)
                    sent += 1
                    pending.append((i, info))
            finally:
                client.loop_stop()
                with contextlib.suppress(Exception):
                    client.disconnect()
            # Not PUBACKed on this connection: publish it again on the next one.
            todo.extendleft(sorted((i for i, info in pending if not info.is_published()),
                                   reverse=True))
            self.acked.update(i for i, info in pending if info.is_published())


async def end_offsets(settings: Settings) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, settings.topics.events)
        return await consumer.end_offsets(parts)
    finally:
        await consumer.stop()


async def event_ids_since(settings: Settings, start: dict[TopicPartition, int],
                          want: set[str], within: float,
                          quiet_s: float | None = None) -> list[str]:
    """Every event id on the events topic after ``start``, read until ``want`` is covered
    (a fresh consumer, so a broker restart in between does not matter), or ``within``
    seconds, or, with ``quiet_s``, until nothing new came for that long (when a loss is
    the expected outcome, waiting out ``within`` proves nothing more)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                enable_auto_commit=False)
    await consumer.start()
    ids: list[str] = []
    try:
        consumer.assign(list(start))
        for tp, off in start.items():
            consumer.seek(tp, off)
        deadline = time.monotonic() + within
        last_new = time.monotonic()
        while not want <= set(ids) and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=200, max_records=20_000)).values():
                ids.extend(e.event_id for e in events_in(r.value for r in recs))
                last_new = time.monotonic()
            if quiet_s is not None and time.monotonic() - last_new > quiet_s:
                break
        # A short extra read: duplicates may trail the last new id.
        for recs in (await consumer.getmany(timeout_ms=500, max_records=20_000)).values():
            ids.extend(e.event_id for e in events_in(r.value for r in recs))
    finally:
        await consumer.stop()
    return ids


def health(worker: Worker) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/healthz", timeout=1) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def wait_for(check, within: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def restart_mid_stream(stack: Stack, server: str, settings: Settings, fleet: Fleet,
                             tmp_path: Path, n: int) -> tuple[Worker, list[str], set[str]]:
    msgs, want = stream(fleet, n, base_time() - n)
    log = tmp_path / "ingest.log"
    worker = Worker(settings, f"rc-{uuid.uuid4().hex[:6]}", log).start()
    start = await end_offsets(settings)
    pub = SurvivingPublisher(settings, msgs).start()
    try:
        await wait_for(lambda: len(pub.acked) >= n // 3, 60, "publisher never got going")
        if server == "mqtt":
            pub.may_reconnect.clear()  # see the module doc: shared subscriptions
        else:  # see the module doc: stop Kafka when ingest has nothing in flight
            pub.may_publish.clear()
            await wait_for(pub.idle.is_set, 30, "publisher never paused")
            await wait_for(lambda: worker.metric("cityops_ingest_messages_total")
                           >= len(pub.acked) and
                           worker.metric("cityops_ingest_queue_depth") == 0, 30,
                           "ingest never caught up")
        await asyncio.to_thread(stack.server(server).down)
        pub.may_publish.set()  # Kafka is down: ingest must hold what comes now
        if server == "mqtt":
            # Unhealthy while the MQTT connection is down (a probe sees it at once).
            await wait_for(lambda: health(worker) == 503, 10, "/healthz stayed healthy")
        else:  # readings keep coming and wait, unacknowledged, for Kafka
            await wait_for(lambda: worker.metric("cityops_ingest_queue_depth") > 0, 10,
                           "ingest took nothing while Kafka was down")
            assert worker.proc is not None and worker.proc.poll() is None
        await asyncio.sleep(1.0)
        await asyncio.to_thread(stack.server(server).up)
        await wait_for(lambda: health(worker) == 200, 20, "ingest never reconnected")
        pub.may_reconnect.set()
        await asyncio.to_thread(pub.join, 90)
        ids = await event_ids_since(settings, start, want, within=60)
        await wait_for(lambda: health(worker) == 200, 20, "/healthz never healthy again")
        assert worker.proc is not None and worker.proc.poll() is None, \
            "ingest exited:\n" + log.read_text()[-3000:]
    except BaseException:
        print(log.read_text()[-5000:])
        raise
    return worker, ids, want


def check_nothing_lost(ids: list[str], want: set[str], what: str) -> None:
    got = set(ids)
    assert want <= got, f"{what}: lost {len(want - got)} of {len(want)}"
    assert got <= want, f"{what}: {len(got - want)} events nobody published"
    print(f"{what}: all {len(want)} in Kafka, {len(ids) - len(want)} redelivered "
          f"duplicates (same event ids)")


@pytest.mark.parametrize("transport", ["asyncio", "aiomqtt"])
async def test_mosquitto_restart_mid_stream_loses_nothing(
        own_stack: Stack, fleet: Fleet, tmp_path: Path, transport: str) -> None:
    st = own_stack.settings.replace(ingest_transport=transport,
                                    mqtt_share_group=f"rc-{uuid.uuid4().hex[:6]}")
    worker, ids, want = await restart_mid_stream(own_stack, "mqtt", st, fleet, tmp_path, 6000)
    try:
        assert worker.metric("cityops_ingest_mqtt_reconnects_total") >= 1
        assert worker.metric("cityops_ingest_mqtt_connected") == 1
    finally:
        assert worker.terminate() == 0
    check_nothing_lost(ids, want, f"mosquitto restart ({transport})")


async def test_kafka_restart_mid_stream_loses_nothing(
        own_stack: Stack, fleet: Fleet, tmp_path: Path) -> None:
    st = own_stack.settings.replace(mqtt_share_group=f"rc-{uuid.uuid4().hex[:6]}")
    worker, ids, want = await restart_mid_stream(own_stack, "kafka", st, fleet, tmp_path, 6000)
    try:
        retries = worker.metric("cityops_ingest_kafka_retries_total")
        assert worker.metric("cityops_ingest_mqtt_reconnects_total") == 0
    finally:
        assert worker.terminate() == 0
    check_nothing_lost(ids, want, f"kafka restart ({retries:.0f} batches handed over again)")
