"""Helpers shared by tests and benchmarks (not fixtures: plain functions)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from cityops.devices import DeviceStore, apply
from cityops.registry import Fleet
from cityops.settings import SECRET_FIELDS, Settings, new_secret
from cityops.stack import Stack
from ingest.contract import Event, decode_batches

# Headless Debian chromium for every browser test (never `playwright install`). WebGL (the
# MapLibre map) runs here without a GPU: --disable-gpu leaves it to SwiftShader, Chromium's
# software renderer, and --enable-unsafe-swiftshader opts in to that explicitly (Chromium is
# retiring the silent fallback; measured on chromium 156: WebGL2 on "ANGLE (Google, Vulkan
# 1.3.0 (SwiftShader Device (Subzero)))" with or without it).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_settings(state_dir: Path, **overrides: object) -> Settings:
    """Settings for an isolated stack: fresh ports, own state folder, and freshly generated
    secrets (as ``cityops stack up`` makes them), so tests run the way an installation does
    rather than in dev_mode."""
    ports = {name: free_port() for name in (
        "mqtt_port", "kafka_port", "kafka_controller_port", "pg_port", "prometheus_port",
        "ingest_metrics_port", "process_metrics_port", "alerts_metrics_port",
        "simulate_metrics_port", "console_port")}
    secrets = {name: new_secret() for name in SECRET_FIELDS}
    return Settings(state_dir=state_dir,
                    **{**ports, **secrets, **overrides})  # type: ignore[arg-type]


@contextlib.contextmanager
def private_stack(prefix: str, only: list[str], **overrides: object) -> Iterator[Stack]:
    """Servers of their own (own ports, own state folder), started and removed after: for
    tests that stop, kill or break a server, so the session's stack is never touched."""
    state = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("CITYOPS_TEST_TMP")))
    state.chmod(0o755)  # the servers drop to their own users
    st = Stack(isolated_settings(state, **overrides))
    try:
        st.up(only=only)
        yield st
    finally:
        st.down()
        shutil.rmtree(state, ignore_errors=True)


def private_postgres(kafka_port: int, prefix: str) -> contextlib.AbstractContextManager[Stack]:
    """A PostgreSQL cluster of its own (schema migrated, running) next to a given Kafka:
    for tests that stop the database."""
    return private_stack(prefix, ["postgres"], kafka_port=kafka_port)


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """A topic's partitions as seen by a started consumer that is not subscribed to it:
    such a consumer holds no metadata for the topic until it asks for it."""
    await consumer._client.force_metadata_update()
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]


INJECTOR = "test-injector"


def injector(settings: Settings) -> tuple[str, str]:
    """(username, password) of a test-only bridge that may publish anywhere under the city
    tree: for tests and benchmarks that send hostile or arbitrary topics (unknown sensors,
    short topics, other districts) on purpose. No device has such an identity; the local
    stack's broker learns it here, once, and is reloaded."""
    store = DeviceStore.load(settings)
    ident = store.identities.get(INJECTOR)
    if ident is None:
        ident = store.add(INJECTOR, "bridge", [f"{settings.mqtt_topic_root}/#"])
        apply(settings, store)
        wait_for_login(settings, ident.name, ident.password, accepted=True)
    return ident.name, ident.password


NOT_AUTHORIZED = 135  # CONNACK 5 of MQTT 3.1.1, as paho 2 reports it (MQTT 5's code)


def mqtt_login(settings: Settings, username: str, password: str) -> int:
    """Connect once and return the CONNACK reason code (0 = accepted, NOT_AUTHORIZED)."""
    import paho.mqtt.client as paho

    got: list[int] = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"login-{new_secret()[:10]}",
                    protocol=paho.MQTTv311)
    c.username_pw_set(username, password)
    c.on_connect = lambda _c, _u, _f, rc, _p: got.append(rc.value)
    c.connect(settings.mqtt_host, settings.mqtt_port)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        c.loop(0.05)
    c.disconnect()
    if not got:
        raise TimeoutError("no CONNACK within 5 s")
    return got[0]


def wait_for_login(settings: Settings, username: str, password: str, *, accepted: bool,
                   within: float = 10.0) -> None:
    """Until the broker (reloaded by SIGHUP, asynchronously) accepts or refuses a login."""
    deadline = time.monotonic() + within
    while (mqtt_login(settings, username, password) == 0) != accepted:
        if time.monotonic() > deadline:
            raise AssertionError(f"{username} still {'refused' if accepted else 'accepted'}")
        time.sleep(0.05)


def events_in(values: Iterable[bytes | None], fleet: Fleet | None = None) -> list[Event]:
    """The events of events-topic values, contract v1 or v2 (a v2 record holds many), in
    order; v2 rows get their place from ``fleet`` (else ``unknown``). Readings keep the
    v1 event id (a hash of sensor and time), so tests compare ids across versions."""
    from alerts.decode import decode_values
    from alerts.engine import registry_places

    return decode_values([v or b"" for v in values], registry_places(fleet))


def readings(events: list[Event]) -> list[tuple]:
    """(sensor, metric, time, value, quality) of every reading of ``events``, in order:
    what a v1 stream carries, to compare with ``decoded``."""
    return [(e.sensor_id, m, e.event_time, v, e.quality) for e in events
            if e.kind == "reading" for m, v in e.measurements.items()]


def decoded(values: list[bytes]) -> list[tuple]:
    """The same tuples from contract records (v1 or v2), through ``decode_batches``."""
    c = decode_batches(values)
    return list(zip(c.sensor_id().tolist(), c.metric_name().tolist(), c.time.tolist(),
                    c.value.tolist(), c.quality.tolist(), strict=True))

