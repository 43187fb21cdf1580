"""The alerts worker's CPU per event: this code against a baseline checkout, same run.

What is measured: one real ``cityops alerts`` process (subprocess, default rules, the load
fleet registry) consuming N events of the load fleet simulator, normalized by ingest's
own ``Normalizer`` and produced on the events topic as ingest would (one record per
event, keyed by sensor id). For a checkout whose alerts still read the processors' rollup
partials (``--baseline``, e.g. a worktree at main), the partials the processor would
publish for those events (its own ``columns``/``aggregate``/``rollup_messages``, per
5,000-event batch like ``process_batch_max``) are produced on the aggregates topic too.
Reported per code path: CPU seconds (user + system) of the alerts process from the first
record produced until its checkpoint holds the end offset of every partition it reads,
per 1,000 events, and the Kafka records it consumed per event; then new / baseline.

Each path gets fresh topics (the same events, replayed), its own consumer group, and a
new process; both run against the same stack, one after the other. The simulated time
lies minutes behind the wall clock, as in ``bench/e2e/run.py``.

Usage: ``.venv/bin/python bench/alerts_cpu.py --baseline /work/wt-alerts15-base
[--events 200000]``; writes ``bench/results/alerts_cpu.json``. Starts its own Kafka and
PostgreSQL on free ports (stopped at the end). The machine has 2 shared cores: run it
rarely, and read the ratio, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner

from bench.alert_latency import service_env, wait_http
from cityops.registry import load_fleet
from cityops.settings import PROJECT_ROOT, Settings
from cityops.stack import Stack
from ingest.contract import Event, encode_event
from ingest.normalize import InboundMessage, Normalizer
from simulators.simulation import Simulation
from tests.support import isolated_settings

RESULTS = PROJECT_ROOT / "bench" / "results" / "alerts_cpu.json"
LOAD_FLEET = PROJECT_ROOT / "simulators" / "fleets" / "load.toml"
RULES = PROJECT_ROOT / "alerts" / "rules" / "default.yaml"


def make_events(s: Settings, n: int) -> list[Event]:
    """``n`` events of the load fleet, as ingest makes them, minutes behind the clock."""
    fleet = load_fleet(LOAD_FLEET)
    per_s = Simulation(fleet, seed=3, start_ms=0).messages_per_sim_second()
    # the whole stretch in the past, ending two minutes ago (ingest refuses the future)
    span_ms = int(n / per_s * 1000) + 120_000
    sim = Simulation(fleet, seed=3, start_ms=int(time.time() * 1000) - span_ms)
    norm = Normalizer(fleet, s)
    events: list[Event] = []
    while len(events) < n:
        now = int(time.time() * 1000)
        msgs = [InboundMessage(m.topic, m.payload, now) for m in sim.messages(5000)]
        got, _ = norm.normalize(msgs)
        if not got:
            raise RuntimeError("the normalizer refused a whole chunk (simulated time?)")
        events.extend(got)
    return events[:n]


def partials(events: list[Event]) -> list[tuple[bytes, bytes]]:
    """(key, value) of every rollup partial the processor would publish for ``events``."""
    from processors.batch import Vocabularies, columns
    from processors.rollup import aggregate
    from processors.service import rollup_messages

    vocab = Vocabularies()
    known: set[str] = set()
    out: list[tuple[bytes, bytes]] = []
    for k in range(0, len(events), 5000):
        b = columns(events[k:k + 5000], vocab, known)
        known.update(e.sensor_id for e in b.new_sensors)
        for name, groups in aggregate(b.sensor_key, b.area_key, b.time_ms, b.values).items():
            out += rollup_messages(name, groups, vocab)
    return out


async def produce(s: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Per-partition batches, the default partitioner's choice per key (as ingest does)."""
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=5,
                                compression_type="zstd", max_batch_size=1 << 20)
    await producer.start()
    try:
        parts = sorted(await producer.partitions_for(topic))
        pick = DefaultPartitioner()
        futs = []
        batches = {p: producer.create_batch() for p in parts}
        for key, value in records:
            p = pick(key, parts, parts)
            if batches[p].append(key=key, value=value, timestamp=None) is None:
                futs.append(await producer.send_batch(batches[p], topic, partition=p))
                batches[p] = producer.create_batch()
                batches[p].append(key=key, value=value, timestamp=None)
        for p, b in batches.items():
            if b.record_count():
                futs.append(await producer.send_batch(b, topic, partition=p))
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def end_offsets(s: Settings, topics: list[str]) -> dict[tuple[str, int], int]:
    c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap)
    await c.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in (c.partitions_for_topic(t) or
                                                               await _parts(c, t))]
        ends = await c.end_offsets(tps)
        return {(tp.topic, tp.partition): o for tp, o in ends.items()}
    finally:
        await c.stop()


async def _parts(c: AIOKafkaConsumer, topic: str) -> set[int]:
    await c._client.force_metadata_update()  # fresh topics
    return c.partitions_for_topic(topic) or set()


def _spawn(code: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``cityops alerts`` of the checkout ``code`` (its modules first on the path)."""
    out = log.open("wb")
    return subprocess.Popen([sys.executable, "-m", "cityops.cli", "alerts"], env=env, cwd=code,
                            stdout=out, stderr=out)


async def run_path(s: Settings, tmp: Path, name: str, code: Path, events: list[Event],
                   rollups: list[tuple[bytes, bytes]] | None) -> dict[str, object]:
    """One code path: fresh topics, one alerts process, the events (and partials)."""
    topics = replace(s.topics, events=f"bench.{name}.events",
                     aggregates=f"bench.{name}.aggregates", alerts=f"bench.{name}.alerts",
                     deadletter=f"bench.{name}.deadletter")
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 6 if t == topics.events else 3, 1)
                                   for t in (topics.events, topics.aggregates, topics.alerts,
                                             topics.deadletter)])
    finally:
        await admin.close()
    ps = replace(s, topics=topics, alerts_group=f"bench-{name}",
                 alerts_metrics_port=s.alerts_metrics_port + (1 if name == "new" else 0))
    rules = tmp / "rules.yaml"
    rules.write_text(RULES.read_text())
    env = service_env(ps, rules)
    env["CITYOPS_FLEET_FILE"] = str(LOAD_FLEET)
    env["PYTHONPATH"] = str(code)
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'[topics]\nevents = "{topics.events}"\ndeadletter = "{topics.deadletter}"\n'
                   f'aggregates = "{topics.aggregates}"\nalerts = "{topics.alerts}"\n')
    env["CITYOPS_CONFIG"] = str(cfg)
    proc = _spawn(code, env, tmp / f"{name}.log")
    try:
        await wait_http(f"http://{s.host}:{ps.alerts_metrics_port}/healthz", within=120)
        ps_proc = psutil.Process(proc.pid)
        cpu0 = sum(ps_proc.cpu_times()[:2])
        t0 = time.monotonic()
        values = [(e.sensor_id.encode(), encode_event(e)) for e in events]
        await produce(s, topics.events, values)
        read = [topics.events]
        if rollups is not None:
            await produce(s, topics.aggregates, rollups)
            read.append(topics.aggregates)
        ends = await end_offsets(s, read)
        conn = await asyncpg.connect(s.pg_dsn)
        try:
            while True:
                rows = await conn.fetch("select topic, partition, next_offset from "
                                        "alert_consumer_offsets where grp = $1", ps.alerts_group)
                done = {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
                if all(done.get(k, 0) >= v for k, v in ends.items()):
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"{name}: alerts exited, see {tmp / (name + '.log')}")
                await asyncio.sleep(0.5)
            alerts = await conn.fetchval("select count(*) from alerts")
        finally:
            await conn.close()
        cpu = sum(ps_proc.cpu_times()[:2]) - cpu0
        wall = time.monotonic() - t0
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    consumed = sum(ends.values())
    return {"code": str(code), "events": len(events), "records_consumed": consumed,
            "records_per_event": round(consumed / len(events), 2),
            "cpu_s": round(cpu, 2), "cpu_s_per_1000_events": round(cpu / len(events) * 1000, 3),
            "wall_s": round(wall, 1), "alerts_rows_total": alerts}


async def measure(args: argparse.Namespace, s: Settings, tmp: Path) -> dict[str, object]:
    print(f"generating {args.events:,} events of the load fleet...", flush=True)
    events = make_events(s, args.events)
    print("the processor's rollup partials for them...", flush=True)
    parts = partials(events)
    print(f"  {len(parts):,} partials ({len(parts) / len(events):.1f} per event)", flush=True)
    out: dict[str, object] = {}
    out["baseline"] = await run_path(s, tmp, "base", Path(args.baseline), events, parts)
    print(f"baseline: {out['baseline']}", flush=True)
    # the alerts database is shared: the baseline's alerts stay, the new path adds its own
    out["new"] = await run_path(s, tmp, "new", PROJECT_ROOT, events, None)
    print(f"new: {out['new']}", flush=True)
    b, n = out["baseline"], out["new"]
    out["ratio_cpu_new_over_baseline"] = round(
        n["cpu_s_per_1000_events"] / b["cpu_s_per_1000_events"], 3)  # type: ignore[index,operator]
    return out


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so the stack is stopped (finally) on SIGTERM too


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="checkout of the code to compare with")
    ap.add_argument("--events", type=int, default=200_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cityops-bench-alerts-cpu-"))
    tmp.chmod(0o755)
    s = isolated_settings(tmp)
    stack = Stack(s)
    try:
        stack.up(["kafka", "postgres"])
        result = asyncio.run(measure(args, s, tmp))
        result["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        stack.down()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
