"""The local Apache Kafka broker: what it is, what it promises after a crash, and the
bad configurations it refuses at start with one clear line.

The session's stack is only looked at here; every test that stops, kills or breaks a
broker runs one of its own (own ports, own state folder).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from cityops.errors import MissingTopics
from cityops.kafka import require_topics
from cityops.settings import PROJECT_ROOT, Settings, Topics
from cityops.stack import Stack, StackError
from cityops.stack.kafka import POM, BrokerJars, java, kafka_version, new_cluster_id
from cityops.stack.process import MissingBinary
from tests.support import isolated_settings, private_stack


@pytest.fixture()
def own_kafka() -> Iterator[Stack]:
    with private_stack("cityops-kafka-", ["kafka"]) as st:
        yield st


def test_session_broker_is_apache_kafka(settings: Settings, stack: Stack) -> None:
    pid = stack.server("kafka").proc.pid
    assert pid is not None
    cmd = psutil.Process(pid).cmdline()
    assert Path(cmd[0]).name == "java" and "kafka.Kafka" in cmd, cmd
    jars = BrokerJars(settings.cache_dir)
    assert (jars.libs / f"kafka_2.13-{kafka_version()}.jar").is_file()
    assert kafka_version().startswith("4.")
    # The broker's own log says which version runs.
    assert f"Kafka version: {kafka_version()}" in stack.server("kafka").proc.log_file.read_text()


async def test_sigkill_loses_nothing_acknowledged(own_kafka: Stack) -> None:
    """The local node's promise (cityops/stack/kafka.py): a record acknowledged with
    acks=all survives a SIGKILL of the broker process, whatever the flush policy does."""
    s = own_kafka.settings
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=2)
    await producer.start()
    n = 20_000
    try:
        futures = [await producer.send(s.topics.events, key=str(i % 97).encode(),
                                       value=f"r{i}".encode()) for i in range(n)]
        acked = [(await f) for f in futures]  # every record acknowledged...
    finally:
        await producer.stop()
    assert len(acked) == n
    broker = own_kafka.server("kafka")
    broker.proc.stop(timeout=10, sig=signal.SIGKILL)  # ...then the process is killed
    assert broker.proc.pid is None
    await asyncio.to_thread(broker.up)  # log recovery runs here
    consumer = AIOKafkaConsumer(s.topics.events, bootstrap_servers=s.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    seen: list[bytes] = []
    try:
        while len(seen) < n:
            batch = await consumer.getmany(timeout_ms=5000)
            if not batch:
                break
            seen += [m.value for msgs in batch.values() for m in msgs if m.value]
    finally:
        await consumer.stop()
    assert len(seen) == n and len(set(seen)) == n, f"{len(seen)} read, {len(set(seen))} distinct"


def test_stale_state_folder_of_another_cluster_is_refused(own_kafka: Stack) -> None:
    broker = own_kafka.server("kafka")
    broker.down()
    broker.files.cluster_id_file.write_text("AAAAAAAAAAAAAAAAAAAAAA\n")
    with pytest.raises(StackError, match=r"belongs to Kafka cluster .* not this stack's"):
        broker.up()
    assert broker.proc.pid is None


def test_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        st = Stack(isolated_settings(tmp_path, kafka_controller_port=port))
        with pytest.raises(StackError, match=f"controller port {port} .* taken"):
            st.up(only=["kafka"])
        st2 = Stack(isolated_settings(tmp_path, kafka_port=port))
        with pytest.raises(StackError, match=f"port {port} .* taken"):
            st2.up(only=["kafka"])


async def test_missing_topic_is_one_clear_error(settings: Settings) -> None:
    with pytest.raises(MissingTopics, match=r"has no topic cityops\.nope"):
        await require_topics(settings, [settings.topics.events, "cityops.nope"])


def test_service_against_missing_topic_exits_with_one_line(settings: Settings,
                                                           tmp_path: Path) -> None:
    conf = tmp_path / "cityops.toml"
    topics = Topics(events="cityops.missing-events")
    conf.write_text(f'[topics]\nevents = "{topics.events}"\n')
    env = {**os.environ, **settings.to_env(), "CITYOPS_CONFIG": str(conf)}
    proc = subprocess.run([sys.executable, "-m", "cityops.cli", "process"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cityops: kafka at ") and "has no topic cityops.missing-events" in last
    assert "Traceback" not in proc.stderr


def test_failed_fetch_is_one_clear_error(tmp_path: Path) -> None:
    pom = tmp_path / "pom.xml"
    pom.write_text(POM.read_text().replace(f"<kafka.version>{kafka_version()}<",
                                           "<kafka.version>0.0.0-no-such-release<"))
    with pytest.raises(StackError, match=r"fetching Apache Kafka 0\.0\.0-no-such-release "
                                         r"from Maven Central failed"):
        BrokerJars(tmp_path / "cache", pom).fetch()
    assert not any((tmp_path / "cache" / "kafka").glob("0.0.0*"))  # nothing half-fetched


def test_missing_java_names_the_package(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingBinary, match="openjdk-17-jre-headless"):
        java()


def test_cluster_ids_are_kafka_uuids_the_storage_tool_accepts() -> None:
    """16 random bytes as Kafka writes them, and never starting with "-" (the storage tool
    took such an id for an option: a CI run failed on one in 64 formats)."""
    ids = [new_cluster_id() for _ in range(20_000)]
    assert not any(cid.startswith("-") for cid in ids)
    assert all(len(base64.urlsafe_b64decode(cid + "==")) == 16 for cid in ids[:100])
    assert len(set(ids)) == len(ids)
