"""The Kafka side of ingest: events and dead letters, batched per partition, acknowledged.

Why ``create_batch``/``send_batch`` rather than ``send()``: aiokafka's per-message
``send()`` tops out near 70k msg/s on two cores, whole batches near 300k. Sending
batches means choosing partitions ourselves, so we use aiokafka's own
``DefaultPartitioner`` (murmur2 of the key, like the Java client) with the sensor id as
key: a sensor's readings land on the partition ``send(key=...)`` would pick, in order.

The producer is idempotent with ``acks=all``: a retried request cannot duplicate or
reorder a partition's records, so the only duplicates downstream can see are MQTT
redeliveries after a crash, and those carry the same event id.

A broker that lost records it had acknowledged (an unclean leader election, a machine
lost before its page cache was written back) leaves the idempotent producer's sequence
numbers out of step with its own: ``OutOfOrderSequenceNumber`` on every retry, forever.
Such an error is final for that producer id, so ``renew`` replaces the client with a
fresh one (a new producer id, sequences from zero); the service then hands the batches
over again: at worst a duplicate, with the same event id. A plain broker restart, even a
SIGKILL, keeps what it acknowledged (``cityops/stack/kafka.py``), and the fault matrix
runs ingest idempotent through both.

``kafka_idempotent`` turns idempotence off (for brokers without it); a retry can then
only duplicate (same event id, which consumers must accept anyway) and per-partition
order holds, since aiokafka keeps one batch in flight per partition.

What goes on the events topic depends on ``ingest_contract_version`` (see
``ingest/contract.py``): ``v1_records`` makes one JSON event per record keyed by sensor
id, ``v2_records_of`` (the service's path: from the normalizer's columns) or
``v2_records`` (the same bytes from v1 events) one ``EventBatch`` per MQTT message keyed
as ``Normalized.keys`` says, and coalesces the messages of a single reading that one
batch of MQTT messages (ingest's linger) holds into one record per partition. Either
way a record goes to the partition murmur2 of its key picks, so a sensor's readings stay
on one partition.

Compression defaults to zstd (``kafka_compression``): aiokafka compresses lz4 at level 9
(LZ4-HC), measured here at ~370 MB/s, a tenth of ingest's CPU at full speed; zstd at
its default level 3 ran at ~1,600 MB/s and made batches of events 2.3x smaller. Both
need ``cramjam``, which aiokafka uses for every codec but gzip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

from cityops.kafka import partition_for
from cityops.settings import Settings
from ingest.columns import METRIC_NAMES, Normalized
from ingest.contract import (
    DeadLetter,
    Event,
    Incident,
    encode_batch,
    encode_columns,
    encode_deadletter,
    encode_event,
)
from ingest.metrics import KAFKA_SEND_SECONDS

log = logging.getLogger("cityops.ingest.kafka")
# Errors after which this producer id can never succeed again: renew the client.
PRODUCER_FATAL = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch,
                  ProducerFenced)


# Rows of single-reading messages coalesced into one v2 record at most: a bound on the
# record's size (~50 bytes a row, zstd'd in the batch) whatever ``ingest_batch_max`` is.
COALESCE_MAX_ROWS = 5_000


class OutRecord(NamedTuple):
    """One events-topic record, encoded: the same bytes whenever it is handed over again."""

    key: str
    value: bytes
    timestamp: int  # epoch ms: when ingest received (the first of) its message(s)
    partition: int | None = None  # None: where murmur2 of ``key`` puts it


def v1_records(events: list[Event]) -> list[OutRecord]:
    """Contract v1: one JSON event per record, keyed by sensor id."""
    return [OutRecord(e.sensor_id, encode_event(e), e.receive_time) for e in events]


def v2_records(events: list[Event], origin: list[int], keys: dict[int, str],
               partition_of: Callable[[str], int] | None = None) -> list[OutRecord]:
    """Contract v2: the events of each message (``origin``: its index per event) as ONE
    ``EventBatch`` record keyed by ``keys[message]``.

    With ``partition_of`` (murmur2 of a key, the partition the producer would pick), the
    messages that made a single event are coalesced: one record per partition holding
    them all in arrival order, produced to that partition explicitly and keyed by its
    first message's key (any of its keys hashes to it). Each record takes the place of
    its first message in the output, so records leave in arrival order per partition.
    """
    by_msg: dict[int, list[Event]] = {}
    for ev, m in zip(events, origin, strict=True):
        group = by_msg.get(m)
        if group is None:
            by_msg[m] = [ev]
        else:
            group.append(ev)
    slots: list[tuple[str, list[Event], int | None]] = []  # (key, events, partition)
    open_slot: dict[int, int] = {}  # partition -> index in slots of its coalescing record
    for m, group in by_msg.items():
        key = keys[m]
        if partition_of is None or len(group) != 1:
            slots.append((key, group, None))
            continue
        p = partition_of(key)
        k = open_slot.get(p)
        if k is None or len(slots[k][1]) >= COALESCE_MAX_ROWS:
            open_slot[p] = len(slots)
            slots.append((key, [group[0]], p))
        else:
            slots[k][1].append(group[0])
    return [OutRecord(key, encode_batch(group), group[0].receive_time, p)
            for key, group, p in slots]


def v2_records_of(out: Normalized,
                  partition_of: Callable[[str], int] | None = None) -> list[OutRecord]:
    """Contract v2 straight from the normalizer's columns: what ``v2_records`` makes of
    the same rows as events, byte for byte (tested), without an ``Event`` per reading.

    A message with several rows is a record of its own; with ``partition_of``, the
    messages of one row share one record per partition (at most ``COALESCE_MAX_ROWS``
    rows each), keyed by its first message's key and produced to that partition
    explicitly. Records leave in the order of their first message. Which record each
    message joins is a short loop per message (a partition lookup and a dict hit:
    measured cheaper than a dozen numpy calls on the ~50 messages of a typical batch);
    everything per row and per reading is numpy (``contract.encode_columns``).
    """
    if len(out) == 0:
        return []
    row_msg = out.row_msg  # non-decreasing: rows are in message order
    first_row = np.flatnonzero(np.concatenate(([True], row_msg[1:] != row_msg[:-1])))
    per_msg = np.diff(np.append(first_row, row_msg.size))
    msgs = row_msg[first_row]
    keys = out.keys
    msg_record: list[int] = []  # per message with rows: its record
    lead: list[int] = []  # per record: its first message (position in ``msgs``)
    partition: list[int | None] = []  # per record: chosen partition, or None (by key)
    open_slot: dict[int, int] = {}  # partition -> its coalescing record
    fill: dict[int, int] = {}  # coalescing record -> rows in it
    for i, (m, c) in enumerate(zip(msgs.tolist(), per_msg.tolist(), strict=True)):
        if partition_of is None or c != 1:
            msg_record.append(len(lead))
            lead.append(i)
            partition.append(None)
            continue
        p = partition_of(keys[m])
        k = open_slot.get(p)
        if k is None or fill[k] >= COALESCE_MAX_ROWS:
            k = open_slot[p] = len(lead)
            fill[k] = 0
            lead.append(i)
            partition.append(p)
        fill[k] += 1
        msg_record.append(k)
    nrec = len(lead)
    row_record = np.repeat(np.array(msg_record, np.int64), per_msg)  # rows: message order
    incidents: list[list[Incident]] = [[] for _ in range(nrec)]
    cols, rec = out, row_record
    if out.row_kind.any():  # incidents are rare: they leave the columns as structs
        incident = out.incident_rows
        for j in np.flatnonzero(incident).tolist():
            incidents[int(row_record[j])].append(out.incident(j))
        cols, rec = out.take(np.flatnonzero(~incident)), row_record[~incident]
    if (rec[1:] < rec[:-1]).any():  # coalesced records interleave: group their rows
        order = np.argsort(rec, kind="stable")  # arrival order kept inside a record
        cols = cols.take(order)
        rec = rec[order]
    values = encode_columns(
        nrec, rec, cols.row_sensor, [s.sensor_id for s in cols.sensors],
        [s.vendor for s in cols.sensors], cols.row_time, cols.row_receive, cols.row_interval,
        cols.row_quality, cols.row_count, cols.metric, METRIC_NAMES, cols.value, incidents)
    first_msg = msgs[lead].tolist()
    stamp = out.row_receive[first_row[lead]].tolist()
    return [OutRecord(keys[m], v, ts, p)
            for m, v, ts, p in zip(first_msg, values, stamp, partition, strict=True)]


class EventProducer:
    """Produces batches of events and dead letters; ``submit`` returns the ack awaitable."""

    def __init__(self, settings: Settings, client_id: str) -> None:
        self.topics = settings.topics
        self.settings, self.client_id = settings, client_id
        self.generation = 0  # bumped by ``renew``
        self._producer = self._client()
        self._partitions: dict[str, list[int]] = {}
        # topic -> key -> (partition, key bytes): a dict hit instead of murmur2 per record
        self._routes: dict[str, dict[str, tuple[int, bytes]]] = {}

    def _client(self) -> AIOKafkaProducer:
        settings, client_id = self.settings, self.client_id
        return AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id=client_id,
            acks="all",
            enable_idempotence=settings.kafka_idempotent,
            compression_type=settings.kafka_codec,
            linger_ms=settings.kafka_linger_ms,
            max_batch_size=settings.kafka_max_batch_bytes,
            max_request_size=max(settings.kafka_max_batch_bytes, 1024 * 1024) * 2,
        )

    async def start(self) -> None:
        await self._producer.start()
        for topic in (self.topics.events, self.topics.deadletter):
            parts = await self._producer.partitions_for(topic)
            self._partitions[topic] = sorted(parts)
            self._routes[topic] = {}

    async def stop(self) -> None:
        await self._producer.stop()

    async def renew(self, generation: int) -> None:
        """Replace the client after a ``PRODUCER_FATAL`` error seen on ``generation``
        (once: batches of the same generation failing too do not renew it again)."""
        if generation != self.generation:
            return
        self.generation += 1
        old, self._producer = self._producer, self._client()
        log.warning("Kafka producer %s: producer id no longer usable; starting a new one",
                    self.client_id)
        with contextlib.suppress(Exception):
            # Its pending batches fail and are handed over again by the service.
            await asyncio.wait_for(old.stop(), 5)
        for attempt in range(30):  # the broker may still be coming back
            try:
                await self._producer.start()
                return
            except Exception as exc:
                log.warning("Kafka producer %s: start failed (%s), attempt %d", self.client_id,
                            exc, attempt + 1)
                await self._producer.stop()
                self._producer = self._client()
                await asyncio.sleep(1)
        await self._producer.start()

    def partition_of(self, key: str) -> int:
        """The events partition of ``key``: murmur2, as ``send(key=...)`` and the Java
        client's default partitioner pick it (cached per key)."""
        topic = self.topics.events
        return (self._routes[topic].get(key) or self._route(topic, key))[0]

    def _route(self, topic: str, key: str) -> tuple[int, bytes]:
        routes = self._routes[topic]
        if len(routes) > 1_000_000:  # keys are sensor ids; bound it all the same
            routes.clear()
        kb = key.encode()
        parts = self._partitions[topic]
        route = routes[key] = (parts[partition_for(kb, len(parts))], kb)
        return route

    async def submit(self, records: list[OutRecord],
                     deadletters: list[DeadLetter]) -> Awaitable[None]:
        """Hand records (``v1_records``/``v2_records``) and dead letters to the producer;
        the returned awaitable resolves when Kafka has acknowledged every one of them
        (and raises if any failed after retries).

        Awaiting ``submit`` itself may take a while when the producer's buffer is full:
        that is the backpressure that eventually stops ingest reading MQTT.
        """
        started = time.perf_counter()
        futures: list[asyncio.Future] = []
        for topic, out in (
                (self.topics.events, records),
                (self.topics.deadletter, [OutRecord(d.sensor_id or d.mqtt_topic,
                                                    encode_deadletter(d), d.received_at)
                                          for d in deadletters])):
            routes = self._routes[topic]
            batches: dict[int, Any] = {}
            for key, value, ts, chosen in out:
                partition, kb = routes.get(key) or self._route(topic, key)
                if chosen is not None:
                    partition = chosen
                batch = batches.get(partition)
                if batch is None:
                    batch = batches[partition] = self._producer.create_batch()
                if batch.append(key=kb, value=value, timestamp=ts) is None:  # full
                    futures.append(await self._producer.send_batch(batch, topic,
                                                                   partition=partition))
                    batch = batches[partition] = self._producer.create_batch()
                    if batch.append(key=kb, value=value, timestamp=ts) is None:
                        raise ValueError(f"record of {len(value)} bytes exceeds the batch size")
            for partition, batch in batches.items():
                if batch.record_count():
                    futures.append(await self._producer.send_batch(batch, topic,
                                                                   partition=partition))

        async def acked() -> None:
            if futures:
                await asyncio.gather(*futures)
            KAFKA_SEND_SECONDS.observe(time.perf_counter() - started)

        return acked()
