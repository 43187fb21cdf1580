"""Hot-path counters of the end-to-end bench, read from the servers' own bookkeeping.

Issue 15 asks how much each reading costs the database and the broker, measured rather
than estimated from the code. Both servers count for us:

* PostgreSQL: ``pg_stat_user_tables`` (inserted, updated, deleted tuples; HOT updates
  are a subset of the updated ones, listed apart, not added twice). Partitions are
  counted where the rows land, in the leaf tables, and reported under their top parent
  (``pg_inherits``): the partitioned parent itself always shows zeros. Other sessions'
  temporary staging tables are writes too and are counted, folded into ``pg_temp.NAME``;
  the bench's own session (its expected-events temp table) is left out.
* Kafka: the sum of every partition's end offset per topic. The pipeline's producers are
  idempotent but not transactional, so no control markers inflate the offsets.

PostgreSQL reports table counters late: a backend flushes them to shared memory at most
once a second while busy, and one that went idle right after a flush holds them until its
idle timer fires (``PGSTAT_IDLE_INTERVAL``, 10 s in PostgreSQL 15). Only the own backend
can be forced (``pg_stat_force_next_flush``), so a step waits ``STATS_SETTLE_S`` after the
pipeline drained before its closing snapshot, and every snapshot drops the session's
cached statistics first (``pg_stat_clear_snapshot``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer

from tests.support import topic_partitions

TARGET_DB_WRITES_PER_READING = 1.2
TARGET_KAFKA_RECORDS_PER_MESSAGE = 1.0
# Longer than PostgreSQL 15's idle flush interval (10 s): an idle backend's last
# transaction is in the shared counters by then.
STATS_SETTLE_S = 11.0
# Kafka's own topic of committed consumer offsets: the pipeline's consumers write to it,
# but it is bookkeeping, not data, so it is reported beside the total rather than in it.
OFFSETS_TOPIC = "__consumer_offsets"

_TEMP_SCHEMA = re.compile(r"^pg_temp_\d+$")

_TABLES_SQL = """
select s.relid::int8 as relid, s.schemaname, s.relname,
       s.n_tup_ins, s.n_tup_upd, s.n_tup_hot_upd, s.n_tup_del
  from pg_stat_user_tables s join pg_class c on c.oid = s.relid
 where c.relnamespace <> pg_my_temp_schema()
"""
_PARENTS_SQL = """
select i.inhrelid::int8 as child, i.inhparent::int8 as parent, n.nspname, c.relname
  from pg_inherits i join pg_class c on c.oid = i.inhparent
  join pg_namespace n on n.oid = c.relnamespace
"""


@dataclass(frozen=True, slots=True)
class TableCounts:
    """Cumulative tuple counters of one relation, as ``pg_stat_user_tables`` has them."""

    name: str
    ins: int = 0
    upd: int = 0
    hot_upd: int = 0
    dele: int = 0


@dataclass(slots=True)
class DbSnapshot:
    """Every user table's counters at one moment, and who inherits from whom."""

    tables: dict[int, TableCounts] = field(default_factory=dict)
    parents: dict[int, int] = field(default_factory=dict)  # child relid -> parent relid
    names: dict[int, str] = field(default_factory=dict)  # parent relid -> schema.table


@dataclass(slots=True)
class Snapshot:
    """Database and broker counters taken together (the two ends of a step)."""

    db: DbSnapshot
    kafka: dict[str, int]  # topic -> sum of its partitions' end offsets


@dataclass(frozen=True, slots=True)
class Work:
    """What a step asked of the pipeline, the denominators of the figures. Probes (the
    latency readings and panic presses published beside the load) go through the same
    path and show in the same counters, so they count here too."""

    messages: int  # MQTT messages published by the load generator
    readings: int  # readings (values: one narrow row each) of the ground truth found stored
    probe_messages: int = 0
    probe_readings: int = 0  # probe readings and presses found stored

    @property
    def all_messages(self) -> int:
        return self.messages + self.probe_messages

    @property
    def all_readings(self) -> int:
        return self.readings + self.probe_readings


def table_name(schema: str, table: str) -> str:
    """``schema.table``; every session's temporary schema folds into ``pg_temp``, so the
    processors' staging tables add up under one name whichever backend owns them."""
    return f"{'pg_temp' if _TEMP_SCHEMA.match(schema) else schema}.{table}"


def root_of(relid: int, parents: Mapping[int, int]) -> int:
    """The top ancestor of a relation (itself when it inherits from nothing)."""
    seen = {relid}
    while relid in parents:
        relid = parents[relid]
        if relid in seen:  # inheritance cannot loop; a torn catalog read must not hang
            break
        seen.add(relid)
    return relid


def writes_by_table(start: DbSnapshot, end: DbSnapshot) -> tuple[dict[str, dict[str, int]],
                                                                 list[str]]:
    """Tuple counter deltas between two snapshots, per top parent table (leaf partitions
    summed into it), with ``writes`` = inserted + updated + deleted. A table created in
    between counts from zero. A table dropped in between (a detached partition, a closed
    session's temp table) took its counts with it: its name is returned apart, so a
    reader knows the total may be short."""
    parents = {**start.parents, **end.parents}
    names = {**start.names, **end.names}
    out: dict[str, dict[str, int]] = {}
    for relid, e in end.tables.items():
        s = start.tables.get(relid, TableCounts(e.name))
        root = root_of(relid, parents)
        name = names.get(root, e.name) if root != relid else e.name
        row = out.setdefault(name, {"ins": 0, "upd": 0, "hot_upd": 0, "del": 0})
        row["ins"] += e.ins - s.ins
        row["upd"] += e.upd - s.upd
        row["hot_upd"] += e.hot_upd - s.hot_upd
        row["del"] += e.dele - s.dele
    for row in out.values():
        row["writes"] = row["ins"] + row["upd"] + row["del"]
    vanished = sorted({s.name for relid, s in start.tables.items() if relid not in end.tables})
    return out, vanished


async def db_snapshot(conn: asyncpg.Connection) -> DbSnapshot:
    """Read the table counters afresh (not the session's cached copy)."""
    await conn.execute("select pg_stat_clear_snapshot()")
    snap = DbSnapshot()
    for r in await conn.fetch(_TABLES_SQL):
        snap.tables[r["relid"]] = TableCounts(table_name(r["schemaname"], r["relname"]),
                                              r["n_tup_ins"], r["n_tup_upd"],
                                              r["n_tup_hot_upd"], r["n_tup_del"])
    for r in await conn.fetch(_PARENTS_SQL):
        snap.parents[r["child"]] = r["parent"]
        snap.names[r["parent"]] = table_name(r["nspname"], r["relname"])
    return snap


async def kafka_end_offsets(bootstrap: str, topics: Iterable[str]) -> dict[str, int]:
    """Per topic, the sum of its partitions' end offsets: how many records it ever took
    (a topic the broker does not have counts 0)."""
    topics = list(topics)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [tp for t in topics for tp in await topic_partitions(consumer, t)]
        ends = await consumer.end_offsets(parts) if parts else {}
    finally:
        await consumer.stop()
    out = dict.fromkeys(topics, 0)
    for tp, offset in ends.items():
        out[tp.topic] += offset
    return out


async def snapshot(conn: asyncpg.Connection, bootstrap: str, topics: Iterable[str]) -> Snapshot:
    """Database and broker counters now; ``topics`` are the pipeline's own (the consumer
    offsets topic is read as well)."""
    db = await db_snapshot(conn)
    kafka = await kafka_end_offsets(bootstrap, [*topics, OFFSETS_TOPIC])
    return Snapshot(db, kafka)


def _per(n: float, d: int) -> float | None:
    return round(n / d, 3) if d else None


def db_figures(start: DbSnapshot, end: DbSnapshot, readings: int) -> dict[str, Any]:
    """Row writes per stored reading: the total, and per table (temporary staging tables
    included, and also subtotalled, since they cost CPU but no WAL)."""
    tables, vanished = writes_by_table(start, end)
    total = sum(t["writes"] for t in tables.values())
    temp = sum(t["writes"] for name, t in tables.items() if name.startswith("pg_temp."))
    for t in tables.values():
        t["per_reading"] = _per(t["writes"], readings)
    ranked = dict(sorted(tables.items(), key=lambda kv: -kv[1]["writes"]))
    return {"db_row_writes": total, "db_row_writes_per_reading": _per(total, readings),
            "db_row_writes_target": TARGET_DB_WRITES_PER_READING,
            "db_row_writes_temp_tables": temp,
            "db_row_writes_per_reading_without_temp": _per(total - temp, readings),
            "db_tables": ranked, "db_tables_dropped_during_step": vanished}


def kafka_figures(start: Mapping[str, int], end: Mapping[str, int],
                  messages: int) -> dict[str, Any]:
    """Records the pipeline wrote to each of its topics per MQTT message; the consumer
    offsets topic is given apart and left out of the total."""
    delta = {t: end.get(t, 0) - start.get(t, 0) for t in end}
    offsets = delta.pop(OFFSETS_TOPIC, 0)
    total = sum(delta.values())
    return {"kafka_records": total, "kafka_records_per_msg": _per(total, messages),
            "kafka_records_target": TARGET_KAFKA_RECORDS_PER_MESSAGE,
            "kafka_topics": {t: {"records": n, "per_msg": _per(n, messages)}
                             for t, n in delta.items()},
            "kafka_consumer_offset_commits": offsets}


def hot_path(start: Snapshot, end: Snapshot, work: Work, window_s: float) -> dict[str, Any]:
    """The step's hot-path figures, with the counts they were divided by."""
    return {"window_s": round(window_s, 1), "mqtt_messages": work.all_messages,
            "probe_messages": work.probe_messages, "readings": work.all_readings,
            "probe_readings": work.probe_readings,
            **db_figures(start.db, end.db, work.all_readings),
            **kafka_figures(start.kafka, end.kafka, work.all_messages)}


def summary_line(hot: Mapping[str, Any], cpu: Mapping[str, Any]) -> str:
    """One printed line: the three per-reading figures next to their targets."""
    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    top = ", ".join(f"{name} {t['per_reading']}" for name, t in
                    list(hot["db_tables"].items())[:4] if t["writes"])
    return (f"db row writes/reading {fmt(hot['db_row_writes_per_reading'])} "
            f"(target <= {hot['db_row_writes_target']}; {top}) | "
            f"kafka records/msg {fmt(hot['kafka_records_per_msg'])} "
            f"(target <= {hot['kafka_records_target']:g}) | "
            f"cpu us/reading {fmt(cpu.get('total_us_per_reading'), '.1f')}")
