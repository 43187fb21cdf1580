"""Kafka facts every service checks the same way, whichever cluster it talks to.

Topics are created by the deployment (``cityops stack up`` locally, the compose and
Kubernetes jobs in production) and never by a client: the brokers run with
``auto.create.topics.enable=false``. A service started before its topics exist, or
against the wrong cluster, stops at once with one line saying so (``MissingTopics``)
rather than waiting on metadata that will never come.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2

from cityops.errors import MissingTopics
from cityops.settings import Settings


async def missing_topics(settings: Settings, topics: list[str] | None = None) -> list[str]:
    """Which of ``topics`` (default: all the project's) the cluster's metadata lacks."""
    from aiokafka.admin import AIOKafkaAdminClient

    wanted = list(topics or settings.topics.all())
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=5_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [t for t in wanted if t not in existing]


async def require_topics(settings: Settings, topics: list[str]) -> None:
    """Raise ``MissingTopics`` (one clear line) unless every topic exists: a service
    started against the wrong cluster or before `stack up` says so instead of waiting
    on a topic nobody will create (the broker never auto-creates them)."""
    missing = await missing_topics(settings, topics)
    if missing:
        raise MissingTopics(settings.kafka_bootstrap, missing)


def partition_for(key: bytes, partitions: int) -> int:
    """The partition ``send(key=...)`` picks for ``key`` among ``partitions`` (murmur2 of
    the key, as aiokafka's ``DefaultPartitioner`` and the Java client's default do). The
    one place this is decided: ingest routes records with it, the processors their rollup
    partials, alerts its scope inputs and the partition a registry sensor lives on."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions

