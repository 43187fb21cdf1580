"""Each real server of the stack answers, with the project's credentials and ACLs."""

from __future__ import annotations

import asyncio
import contextlib
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import aiomqtt
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from cityops.devices import DeviceStore, Identity
from cityops.registry import Sensor, load_fleet
from cityops.settings import CREDENTIALS_FILE, SECRET_FIELDS, Settings
from cityops.stack import Stack


def _client(s: Settings, user: str, password: str) -> aiomqtt.Client:
    return aiomqtt.Client(s.host, s.mqtt_port, username=user, password=password,
                          identifier=f"test-{uuid.uuid4().hex[:8]}")


async def _collect(client: aiomqtt.Client, n: int, wait_s: float) -> list[aiomqtt.Message]:
    got: list[aiomqtt.Message] = []

    async def run() -> None:
        async for msg in client.messages:
            got.append(msg)
            if len(got) >= n:
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run(), wait_s)
    return got


async def test_status_reports_all_healthy(stack: Stack) -> None:
    health = stack.status()
    assert [h.name for h in health] == ["mqtt", "kafka", "postgres", "prometheus"]
    assert all(h.healthy for h in health), health


def _a_device(s: Settings) -> tuple[Sensor, Identity]:
    fleet = load_fleet(s.fleet_file)
    ident = DeviceStore.load(s).identities
    sensor = next(x for x in fleet if x.gateway is None and x.sensor_id in ident)
    return sensor, ident[sensor.sensor_id]


async def test_mqtt_pubsub_with_credentials_and_acl(settings: Settings) -> None:
    s = settings
    sensor, me = _a_device(s)
    mine = f"{s.mqtt_topic_root}/{sensor.topic_suffix}"
    async with _client(s, s.mqtt_ingest_user, s.mqtt_ingest_password) as sub, \
            _client(s, me.name, me.password) as pub:
        await sub.subscribe(f"{s.mqtt_topic_root}/#", qos=1)
        await sub.subscribe("forbidden/#", qos=1)
        # Allowed: a sensor publishing on its own topic.
        await pub.publish(mine, b"ok", qos=1)
        # Refused by the ACL (silently dropped by Mosquitto): outside the tree...
        await pub.publish("forbidden/x", b"nope", qos=1)
        # ...another sensor's topic...
        await pub.publish(f"{s.mqtt_topic_root}/ninh_kieu/traffic/lane_detector/x1", b"no",
                          qos=1)
        # ...and the ingest account publishing at all.
        await sub.publish(f"{s.mqtt_topic_root}/ninh_kieu/traffic/lane_detector/x2", b"no", qos=1)
        got = await _collect(sub, 4, wait_s=2.0)
    assert [(str(m.topic), m.payload) for m in got] == [(mine, b"ok")]


async def test_mqtt_rejects_wrong_password(settings: Settings) -> None:
    _, me = _a_device(settings)
    with pytest.raises(aiomqtt.MqttError):
        async with _client(settings, me.name, "wrong"):
            pass


async def test_kafka_produce_consume_with_group(settings: Settings) -> None:
    topic = settings.topics.events
    key = uuid.uuid4().hex.encode()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                enable_idempotence=True)
    await producer.start()
    try:
        md = await producer.send_and_wait(topic, b"smoke", key=key)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                                group_id=f"smoke-{key.decode()[:8]}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        found = None
        async with asyncio.timeout(20):
            while found is None:
                batch = await consumer.getmany(timeout_ms=500)
                for tp, msgs in batch.items():
                    for m in msgs:
                        if m.key == key:
                            found = (tp.partition, m.offset, m.value)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert found == (md.partition, md.offset, b"smoke")


async def test_kafka_has_project_topics(settings: Settings) -> None:
    # Naming the topic makes the consumer load its metadata at start (``topics()`` only
    # lists names; it does not fill the client's cluster view).
    consumer = AIOKafkaConsumer(settings.topics.events, bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        topics = await consumer.topics()
        parts = consumer.partitions_for_topic(settings.topics.events)
    finally:
        await consumer.stop()
    assert set(settings.topics.all()) <= topics
    assert parts is not None and len(parts) == settings.kafka_partitions


async def test_postgres_answers_and_is_migrated(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        assert await conn.fetchval("select 40 + 2") == 42
        versions = await conn.fetchval("select count(*) from schema_migrations")
        assert versions >= 1
    finally:
        await conn.close()


def test_starting_twice_is_harmless(stack: Stack) -> None:
    pids = [s.proc.pid for s in stack.servers]
    assert stack.up() == []
    assert [s.proc.pid for s in stack.servers] == pids


def test_missing_binary_is_one_clear_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = ("from cityops.stack.servers import Prometheus\n"
            "from cityops.settings import Settings\n"
            "from pathlib import Path\n"
            f"Prometheus(Settings(state_dir=Path({str(tmp_path)!r}))).check_installed()\n")
    env = {"PATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False)
    assert res.returncode != 0
    assert "install the 'prometheus' package" in res.stderr


def test_cli_reports_missing_binary_without_traceback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {"PATH": str(tmp_path), "CITYOPS_STATE_DIR": str(tmp_path / "st"),
           "CITYOPS_MQTT_PORT": "1"}
    res = subprocess.run([sys.executable, "-m", "cityops.cli", "stack", "up", "--only", "mqtt"],
                         env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 1, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "mosquitto" in lines[0] and "apt-get install" in lines[0], res.stderr


def test_stack_generates_secrets_once_and_keeps_them(tmp_path: Path) -> None:
    """No secret of the local stack is a default: the first up() generates them (0600
    file), later stacks on the same state folder reuse them, and the servers get them."""
    first = Stack(Settings(state_dir=tmp_path))
    assert first._write_credentials() is True
    creds = tmp_path / CREDENTIALS_FILE
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    s = first.settings
    assert s.default_secrets() == []
    assert all(srv.settings is s for srv in first.servers)  # Mosquitto's passwd gets them
    again = Stack(Settings.load(env={"CITYOPS_STATE_DIR": str(tmp_path)}))
    assert again._write_credentials() is False
    assert {n: getattr(again.settings, n) for n in SECRET_FIELDS} == \
        {n: getattr(s, n) for n in SECRET_FIELDS}
    # a file from before (the old dev defaults) is upgraded, not trusted
    creds.write_text('mqtt_ingest_password = "ingest-dev"\n'
                     'console_secret = "cityops-dev-secret-change-me"\n')
    old = Stack(Settings.load(env={"CITYOPS_STATE_DIR": str(tmp_path)}))
    assert old._write_credentials() is True and old.settings.default_secrets() == []
    # an explicitly configured secret is recorded as given
    mine = Stack(s.replace(console_secret="an-operator-chosen-secret-0123456789"))
    mine._write_credentials()
    assert Settings.load(env={"CITYOPS_STATE_DIR": str(tmp_path)}).console_secret == \
        "an-operator-chosen-secret-0123456789"


def test_session_stack_runs_on_generated_secrets(stack: Stack, settings: Settings) -> None:
    assert settings.default_secrets() == []
    stored = Settings.load(env={"CITYOPS_STATE_DIR": str(settings.state_dir)})
    assert {n: getattr(stored, n) for n in SECRET_FIELDS} == \
        {n: getattr(settings, n) for n in SECRET_FIELDS}


async def test_postgres_requires_the_password_over_tcp(settings: Settings) -> None:
    for password in ("", "wrong-password"):
        dsn = settings.replace(pg_password=password).pg_dsn
        with pytest.raises((asyncpg.InvalidPasswordError,
                            asyncpg.InvalidAuthorizationSpecificationError)):
            await asyncpg.connect(dsn, timeout=5)
