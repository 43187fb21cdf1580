"""The ingest service against the real Mosquitto and Kafka broker of the session stack:
formats end to end, dead letters on their topic, crash and redelivery, shared subscription."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import DefaultPartitioner
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import REGISTRY

from cityops.registry import Fleet, load_fleet
from cityops.settings import PROJECT_ROOT, Settings
from ingest import samples
from ingest.contract import decode_deadletter, decode_event
from ingest.normalize import InboundMessage, Normalizer
from ingest.service import IngestService
from tests.support import free_port, injector, topic_partitions
from tests.test_ingest_normalize import bad_cases, gateway_bytes, poison_elements

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(Settings().fleet_file)


def own_group(settings: Settings) -> Settings:
    """A share group of the test's own: sessions of other tests' workers never take a share.

    These tests read the events topic as contract v1 (one JSON event per reading, keyed
    by sensor): still a supported setting, for consumers of other agencies. The default,
    v2, is tested in test_ingest_service_v2.py and test_ingest_records.py."""
    return settings.replace(mqtt_share_group=f"t-{uuid.uuid4().hex[:8]}",
                            ingest_contract_version=1)


def base_time() -> int:
    """A fresh reading time for a test, so its event ids are its own."""
    time.sleep(0.002)
    return int(time.time() * 1000) - 60_000


# -- helpers: a real publisher, a real Kafka reader, a worker subprocess ---------------------
def publish_all(settings: Settings, messages: list[tuple[str, bytes]], window: int = 500,
                pace: float = 0.0) -> None:
    """Publish with QoS 1 as the test injector (any topic of the city tree: these tests send
    hostile topics on purpose); returns when Mosquitto acked all."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    client.username_pw_set(*injector(settings))
    slots = threading.Semaphore(window)
    client.on_publish = lambda *_: slots.release()
    client.connect(settings.host, settings.mqtt_port)
    client.loop_start()
    try:
        for i, (topic, payload) in enumerate(messages):
            slots.acquire()
            client.publish(topic, payload, qos=1)
            if pace and i % 100 == 99:
                time.sleep(pace)
        for _ in range(window):
            assert slots.acquire(timeout=30), "Mosquitto did not acknowledge every publish"
    finally:
        client.disconnect()
        client.loop_stop()


class KafkaReader:
    """Reads a topic from where it ended when the reader was opened."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings, self.topic = settings, topic
        self.records: list = []

    async def __aenter__(self) -> KafkaReader:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                         enable_auto_commit=False)
        await self.consumer.start()
        parts = await topic_partitions(self.consumer, self.topic)
        self.consumer.assign(parts)
        for tp, end in (await self.consumer.end_offsets(parts)).items():
            self.consumer.seek(tp, end)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def until(self, done: Callable[[list], bool], within: float = 60) -> list:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not done(self.records):
                    batch = await self.consumer.getmany(timeout_ms=200, max_records=50_000)
                    for recs in batch.values():
                        self.records.extend(recs)
        return self.records


async def eventually(check: Callable[[], bool], within: float, what: object) -> None:
    """Poll ``check`` until true; fail naming ``what`` (e.g. the service's stats)."""
    try:
        async with asyncio.timeout(within):
            while not check():  # noqa: ASYNC110 (polling counters of a running service)
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {within} s: {what}") from None


async def running(service: IngestService) -> asyncio.Task:
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.ready.wait(), 15)
    return task


async def stop(service: IngestService, task: asyncio.Task) -> None:
    service.stop()
    await asyncio.wait_for(task, 30)


def worker_env(settings: Settings) -> dict[str, str]:
    """CITYOPS_* variables that make ``Settings.load`` in a subprocess equal ``settings``."""
    env = dict(os.environ)
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, str | int | Path):
            env[f"CITYOPS_{f.name.upper()}"] = str(value)
    return env


class Worker:
    """``python -m ingest`` in a subprocess, like a deployment runs it."""

    def __init__(self, settings: Settings, worker_id: str, log: Path) -> None:
        self.settings, self.worker_id, self.log = settings, worker_id, log
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "--worker-id", self.worker_id,
                 "--metrics-port", str(self.port)],
                cwd=PROJECT_ROOT, env=worker_env(self.settings), stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz",
                                            timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("ingest worker never became healthy:\n" + self.log.read_text())

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(f"metric {name} not exposed")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def stream(fleet: Fleet, n: int, t0: int) -> tuple[list[tuple[str, bytes]], set[str]]:
    """``n`` single-reading messages over the fleet's direct sensors, and their event ids."""
    sensors = [s for s in fleet if s.gateway is None and s.type != "traffic_signal"]
    msgs = [samples.device_message(sensors[i % len(sensors)], t0 + i) for i in range(n)]
    norm = Normalizer(fleet, Settings())
    now = int(time.time() * 1000)
    events, dead = norm.normalize([InboundMessage(t, p, now) for t, p in msgs])
    assert dead == []
    return msgs, {e.event_id for e in events}


# -- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["asyncio", "paho-thread", "aiomqtt"])
async def test_every_vendor_format_reaches_kafka_keyed_and_exact(
        settings: Settings, fleet: Fleet, transport: str) -> None:
    st = own_group(settings)
    t0 = base_time()
    direct = list(samples.one_of_each(fleet).values())
    msgs = [samples.device_message(s, t0) for s in direct]
    msgs += [samples.gateway_message(gw, members, t0) for gw, members in fleet.gateways().items()]
    expected, dead = Normalizer(fleet, st).normalize(
        [InboundMessage(t, p, t0) for t, p in msgs])
    assert dead == []
    want = {e.event_id: e for e in expected}
    service = IngestService(st, f"fmt-{transport}-{uuid.uuid4().hex[:6]}", transport=transport)
    async with KafkaReader(st, st.topics.events) as reader:
        task = await running(service)
        try:
            await asyncio.to_thread(publish_all, st, msgs)
            records = await reader.until(
                lambda rs: want.keys() <= {decode_event(r.value).event_id for r in rs})
        finally:
            await stop(service, task)
    got = {}
    parts = sorted(reader.consumer.assignment(), key=lambda tp: tp.partition)
    all_parts = [tp.partition for tp in parts]
    for r in records:
        ev = decode_event(r.value)
        if ev.event_id in want:
            got[ev.event_id] = ev
            assert r.key == ev.sensor_id.encode()
            assert r.partition == DefaultPartitioner()(r.key, all_parts, all_parts)
            # Record time is when ingest received it, not the reading's own time: a replayed
            # or late reading must not fall out of the topic's retention on arrival.
            assert r.timestamp == ev.receive_time
    assert got.keys() == want.keys()
    for eid, ev in got.items():
        assert {**_fields(ev), "receive_time": 0} == {**_fields(want[eid]), "receive_time": 0}
        assert ev.receive_time >= t0
    assert service.stats.events == len(want)
    assert service.stats.acked_messages == len(msgs)


def _fields(ev: object) -> dict:
    import msgspec
    return msgspec.structs.asdict(ev)  # type: ignore[arg-type]


async def test_malformed_input_lands_in_deadletter_topic_with_reason(
        settings: Settings, fleet: Fleet) -> None:
    st = own_group(settings)
    t0 = base_time()
    cases = bad_cases(fleet, t0)
    goods = [s for s in fleet if s.gateway is None][:len(cases)]
    msgs: list[tuple[str, bytes]] = []
    for (_, topic, payload, _), s in zip(cases, goods, strict=True):
        msgs.append(samples.device_message(s, t0))
        msgs.append((topic, payload))
    expected_good, _ = Normalizer(fleet, st).normalize(
        [InboundMessage(t, p, t0) for t, p in msgs[::2]])
    mine = {p for _, p in msgs[1::2]}
    before = {r: REGISTRY.get_sample_value("cityops_ingest_rejections_total", {"reason": r})
              or 0.0 for *_, r in cases}
    service = IngestService(st, f"dl-{uuid.uuid4().hex[:6]}")
    async with KafkaReader(st, st.topics.events) as events, \
            KafkaReader(st, st.topics.deadletter) as dlq:
        task = await running(service)
        try:
            await asyncio.to_thread(publish_all, st, msgs)

            def mine_of(rs: list) -> list:
                out = []
                for r in rs:
                    d = decode_deadletter(r.value)
                    raw = d.payload.encode() if d.payload_encoding == "utf-8" else \
                        __import__("base64").b64decode(d.payload)
                    if raw in mine:
                        out.append(d)
                return out

            letters = mine_of(await dlq.until(lambda rs: len(mine_of(rs)) >= len(cases)))
            good_ids = {e.event_id for e in expected_good}
            recs = await events.until(
                lambda rs: good_ids <= {decode_event(r.value).event_id for r in rs})
        finally:
            await stop(service, task)
    assert Counter(d.reason for d in letters) == Counter(r for *_, r in cases)
    by_topic_reason = {(d.mqtt_topic, d.reason) for d in letters}
    for _, topic, _, reason in cases:
        assert (topic, reason) in by_topic_reason
    assert all(d.detail and d.received_at >= t0 for d in letters)
    assert good_ids <= {decode_event(r.value).event_id for r in recs}
    assert service.stats.deadletters == Counter(r for *_, r in cases)
    for reason, count in Counter(r for *_, r in cases).items():  # the Prometheus counters
        assert REGISTRY.get_sample_value("cityops_ingest_rejections_total",
                                         {"reason": reason}) == before[reason] + count


async def test_poison_messages_are_dead_lettered_and_ingest_stays_up(
        settings: Settings, fleet: Fleet) -> None:
    """Issue 14 through Mosquitto and Kafka: each poison payload (which used to raise out
    of the service, or was stored) becomes its dead letter with its own reason, the good
    traffic around it is all in Kafka, every message is acknowledged, and the service is
    still running; a gateway message of 1,000 bad elements is ONE dead letter."""
    st = own_group(settings)
    t0 = base_time()
    sa = next(s for s in fleet if s.vendor == "saomai" and s.type == "lane_detector"
              and s.gateway is None)
    cases = [(samples.topic_of(sa), p, r) for _, p, r in poison_elements(fleet, t0)]
    gw, members = next(iter(fleet.gateways().items()))
    amplifier = gateway_bytes(gw, t0, [json_bytes(samples.reading(m, t0)) for m in members]
                              + [b"0"] * 1_000)
    cases.append((samples.gateway_topic(members[0].district, gw), amplifier, "unknown_format"))
    goods = [s for s in fleet if s.gateway is None][:len(cases)]
    msgs: list[tuple[str, bytes]] = []
    for (topic, payload, _), s in zip(cases, goods, strict=True):
        msgs += [samples.device_message(s, t0), (topic, payload)]
    expected_good, _ = Normalizer(fleet, st).normalize(
        [InboundMessage(t, p, t0) for t, p in msgs[::2]])
    good_ids = {e.event_id for e in expected_good} | {
        e.event_id for e in Normalizer(fleet, st).normalize(
            [InboundMessage(cases[-1][0], amplifier, t0)])[0]}
    mine = {p: r for _, p, r in cases}
    service = IngestService(st, f"poison-{uuid.uuid4().hex[:6]}")
    async with KafkaReader(st, st.topics.events) as events, \
            KafkaReader(st, st.topics.deadletter) as dlq:
        task = await running(service)
        try:
            await asyncio.to_thread(publish_all, st, msgs)

            def mine_of(rs: list) -> list:
                letters = [decode_deadletter(r.value) for r in rs]
                return [d for d in letters if _dl_raw(d) in mine]

            letters = mine_of(await dlq.until(lambda rs: len(mine_of(rs)) >= len(cases)))
            recs = await events.until(
                lambda rs: good_ids <= {decode_event(r.value).event_id for r in rs})
            await eventually(lambda: service.stats.acked_messages >= len(msgs), 60,
                             service.stats)
            assert not task.done(), "ingest stopped on a poison message"
        finally:
            await stop(service, task)
    assert sorted((d.reason, _dl_raw(d)) for d in letters) == sorted(
        (r, p) for _, p, r in cases)  # one letter each, with its own reason
    assert all(d.detail for d in letters)
    assert next(d for d in letters if _dl_raw(d) == amplifier).bad_readings == 1_000
    assert good_ids <= {decode_event(r.value).event_id for r in recs}
    assert service.stats.acked_messages == len(msgs)


async def test_a_batch_of_only_dead_letters_is_acknowledged_after_kafka_has_them(
        fleet: Fleet) -> None:
    """The ack-after-Kafka path covers dead letters: a batch that produced no event at
    all (every message poison) is acknowledged to MQTT only once Kafka acknowledged its
    dead letters. No broker needed: a producer whose acknowledgement the test releases."""
    from ingest.mqtt import MqttBatch

    class Producer:
        generation = 0

        def __init__(self) -> None:
            self.kafka_ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.handed: list = []

        async def submit(self, events: list, dead: list) -> asyncio.Future[None]:
            self.handed.append((events, dead))
            return self.kafka_ack

    class Source:
        def __init__(self) -> None:
            self.acked: list[MqttBatch] = []

        def ack(self, batch: MqttBatch) -> bool:
            self.acked.append(batch)
            return True

    service = IngestService(Settings(ingest_contract_version=1), "ack-dl", fleet=fleet)
    sa = next(s for s in fleet if s.vendor == "saomai" and s.type == "lane_detector")
    batch = MqttBatch([InboundMessage(samples.topic_of(sa), p, int(time.time() * 1000))
                       for _, p, _ in poison_elements(fleet)], acks=[(1, 1)])
    producer, source = Producer(), Source()
    pipeline: asyncio.Queue = asyncio.Queue()
    await pipeline.put(await service._process(batch, producer))  # type: ignore[arg-type]
    await pipeline.put(None)
    acker = asyncio.create_task(service._ack_in_order(source, pipeline, producer))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    [(events, dead)] = producer.handed
    assert events == [] and len(dead) == len(batch.messages)
    assert source.acked == [] and not acker.done()  # Kafka has not acknowledged yet
    producer.kafka_ack.set_result(None)
    await asyncio.wait_for(acker, 5)
    assert source.acked == [batch]
    assert service.stats.acked_messages == len(batch.messages)


def json_bytes(doc: dict | str) -> bytes:
    import json
    return json.dumps(doc).encode()


def _dl_raw(d: object) -> bytes:
    import base64
    return d.payload.encode() if d.payload_encoding == "utf-8" else base64.b64decode(d.payload)  # type: ignore[attr-defined]


async def test_resent_reading_is_dropped_as_duplicate(settings: Settings, fleet: Fleet) -> None:
    st = own_group(settings)
    t0 = base_time()
    s = next(s for s in fleet if s.vendor == "saomai" and s.type == "lane_detector")
    one = samples.device_message(s, t0)
    other = samples.device_message(s, t0 + 1)
    service = IngestService(st, f"dup-{uuid.uuid4().hex[:6]}")
    task = await running(service)
    try:
        await asyncio.to_thread(publish_all, st, [one, one, other, one])
        await eventually(lambda: service.stats.acked_messages >= 4, 60, service.stats)
    finally:
        await stop(service, task)
    assert (service.stats.events, service.stats.duplicates) == (2, 2)


async def test_kill_9_mid_stream_then_restart_loses_nothing(
        settings: Settings, fleet: Fleet, tmp_path: Path) -> None:
    st = own_group(settings)
    n = 20_000
    msgs, want = stream(fleet, n, base_time() - n)
    worker_id = f"k9-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "ingest.log"
    first = Worker(st, worker_id, log).start()
    async with KafkaReader(st, st.topics.events) as reader:
        publisher = asyncio.create_task(asyncio.to_thread(publish_all, st, msgs, 500, 0.002))
        mine = lambda rs: [r for r in rs if decode_event(r.value).event_id in want]  # noqa: E731
        await reader.until(lambda rs: len(mine(rs)) >= n // 4, within=60)
        first.kill9()  # mid-stream: messages in flight, more still being published
        in_kafka_at_kill = len(mine(reader.records))
        await asyncio.sleep(0.5)
        second = Worker(st, worker_id, log).start()
        try:
            await publisher
            records = await reader.until(
                lambda rs: want <= {decode_event(r.value).event_id for r in rs}, within=120)
        finally:
            assert second.terminate() == 0, log.read_text()[-3000:]
    ids = [decode_event(r.value).event_id for r in records]
    assert in_kafka_at_kill < n, "the kill came too late to test anything"
    assert want <= set(ids), f"lost {len(want - set(ids))} of {n}"
    extra = [i for i in ids if i not in want]
    assert extra == []
    dup = len([i for i in ids if i in want]) - len(want)
    print(f"kill -9 at {in_kafka_at_kill}/{n} in Kafka; after restart all {n} present, "
          f"{dup} redelivered duplicates (same event ids)")


async def test_two_workers_split_a_shared_subscription(
        settings: Settings, fleet: Fleet, tmp_path: Path) -> None:
    st = own_group(settings)
    n = 4_000
    msgs, want = stream(fleet, n, base_time() - n)
    workers = [Worker(st, f"split-{k}-{uuid.uuid4().hex[:6]}", tmp_path / f"w{k}.log").start()
               for k in range(2)]
    try:
        async with KafkaReader(st, st.topics.events) as reader:
            await asyncio.to_thread(publish_all, st, msgs)
            records = await reader.until(
                lambda rs: want <= {decode_event(r.value).event_id for r in rs}, within=60)
        shares = [w.metric("cityops_ingest_messages_total") for w in workers]
    finally:
        codes = [w.terminate() for w in workers]
    assert codes == [0, 0]
    assert want <= {decode_event(r.value).event_id for r in records}
    assert all(s > 0 for s in shares), shares
    assert sum(shares) == n, shares
    print(f"shared subscription split {n} messages as {shares}")


@pytest.mark.parametrize("transport", ["asyncio", "paho-thread", "aiomqtt"])
async def test_acknowledged_messages_are_not_redelivered(
        settings: Settings, fleet: Fleet, transport: str) -> None:
    """The batched PUBACKs reach the broker: the same session resumed gets nothing back,
    while a message published when the worker was away is waiting for it."""
    st = own_group(settings)
    msgs, _ = stream(fleet, 300, base_time() - 300)
    worker_id = f"ack-{transport}-{uuid.uuid4().hex[:6]}"
    first = IngestService(st, worker_id, transport=transport)
    task = await running(first)
    try:
        await asyncio.to_thread(publish_all, st, msgs)
        await eventually(lambda: first.stats.acked_messages >= len(msgs), 60, first.stats)
    finally:
        await stop(first, task)
    later = samples.device_message(next(s for s in fleet if s.vendor == "saomai"), base_time())
    await asyncio.to_thread(publish_all, st, [later])
    second = IngestService(st, worker_id, transport=transport)
    task = await running(second)
    try:
        await eventually(lambda: second.stats.acked_messages >= 1, 60, second.stats)
        await asyncio.sleep(1.0)  # anything unacknowledged would be redelivered at connect
    finally:
        await stop(second, task)
    assert first.stats.messages == len(msgs)
    assert second.stats.messages == 1


async def test_unacknowledged_messages_are_bounded_by_receive_maximum(
        settings: Settings, fleet: Fleet) -> None:
    """Backpressure: however far behind ingest is, it holds at most ``ingest_inflight_max``
    unacknowledged messages; Mosquitto keeps the rest queued until acks free the window."""
    st = own_group(settings).replace(ingest_inflight_max=64, ingest_batch_max=16)
    msgs, want = stream(fleet, 2_000, base_time() - 2_000)
    worker_id = f"bp-{uuid.uuid4().hex[:6]}"
    # Queue the whole backlog while the worker's session is offline, then let it drain.
    first = IngestService(st, worker_id)
    await stop(first, await running(first))
    await asyncio.to_thread(publish_all, st, msgs)
    service = IngestService(st, worker_id)
    async with KafkaReader(st, st.topics.events) as reader:
        task = await running(service)
        try:
            records = await reader.until(
                lambda rs: want <= {decode_event(r.value).event_id for r in rs})
        finally:
            await stop(service, task)
    assert want <= {decode_event(r.value).event_id for r in records}
    assert service.stats.messages == len(msgs)
    assert 16 <= service.stats.peak_in_flight <= 64, service.stats.peak_in_flight
