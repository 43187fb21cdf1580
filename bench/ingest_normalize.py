"""Ingest's CPU path without servers: normalize -> duplicate window -> v2 records, per
batch of MQTT messages, on this tree against a baseline commit measured in the same run.

Why a separate bench: ``bench/ingest.py`` measures the whole worker (MQTT, Kafka, the
event loop) and needs both brokers; this one isolates what issue 15 item 1 changed (the
normalizer's output, the duplicate window, the record encoding) so its ratio is not
drowned in broker noise, and it runs in under a minute.

Same-run baseline: the baseline commit (default: the commit HEAD branched from main)
is exported with ``git
archive`` into a temporary directory (not a worktree) and both trees run the same
workload in child processes, alternating round by round, so both see the same machine
load. Each child detects which API its tree has: the old path is ``normalize_batch`` ->
``Normalized.events`` -> ``DuplicateWindow.keep(events)`` -> ``v2_records(events, ...)``;
the new one ``normalize_batch`` (columns) -> ``DuplicateWindow.keep_keys(row_key)`` ->
``v2_records_of(columns)``. Partitions come from aiokafka's murmur2 with a per-key cache,
as ``EventProducer.partition_of`` does.

Workloads: single-reading device messages of every direct sensor (batches of 50, what a
worker sees at a few thousand msg/s with its 5 ms linger, and of 2,000, a backlog
drain), and gateway messages of 25 readings (batches of 10 and 200). Reported per
workload and tree: the median over rounds of the CPU (``time.process_time``) per message
and per reading for each stage, and new/old ratios of the total.

Usage: ``flock /tmp/cityops-bench.lock .venv/bin/python bench/ingest_normalize.py
[--baseline main] [--rounds 5]``; writes ``bench/results/ingest_normalize.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "ingest_normalize.json"
T0 = 1_795_312_800_000
PARTITIONS = list(range(12))


def workloads() -> dict[str, tuple[list[tuple[str, bytes]], int]]:
    """name -> (messages, batch size). Reading times one second apart per sensor."""
    from cityops.registry import load_fleet
    from cityops.settings import Settings
    from ingest import samples

    fleet = load_fleet(Settings().fleet_file)
    direct = [s for s in fleet if s.gateway is None]
    seen: dict[str, int] = {}

    def at(sid: str) -> int:
        k = seen[sid] = seen.get(sid, -1) + 1
        return T0 + 1000 * k

    singles = [samples.device_message(s, at(s.sensor_id))
               for s in (direct[i % len(direct)] for i in range(20_000))]
    gws = list(fleet.gateways().items())
    gateways = []
    for k in range(1_000):
        gw, members = gws[k % len(gws)]
        sensors = [members[j % len(members)] for j in range(25)]
        gateways.append(samples.gateway_message(
            gw, members, T0, readings=[samples.reading(s, at(s.sensor_id)) for s in sensors]))
    return {"single x50": (singles, 50), "single x2000": (singles, 2_000),
            "gateway25 x10": (gateways[:600], 10), "gateway25 x200": (gateways, 200)}


def child(repeats: int) -> dict:
    """Run every workload on the tree this process imports; CPU seconds per stage."""
    from aiokafka.partitioner import DefaultPartitioner

    from cityops.registry import load_fleet
    from cityops.settings import Settings
    from ingest import dedup as dedup_mod
    from ingest import kafka
    from ingest.normalize import InboundMessage, Normalizer

    settings = Settings()
    fleet = load_fleet(settings.fleet_file)
    columnar = hasattr(dedup_mod.DuplicateWindow, "keep_keys")
    partitioner = DefaultPartitioner()
    routes: dict[str, int] = {}

    def partition_of(key: str) -> int:
        p = routes.get(key)
        if p is None:
            p = routes[key] = partitioner(key.encode(), PARTITIONS, PARTITIONS)
        return p

    out: dict = {"columnar": columnar}
    clock = time.process_time
    for name, (msgs, size) in workloads().items():
        recv = T0 + 3_000_000
        inbound = [InboundMessage(t, p, recv) for t, p in msgs]
        batches = [inbound[i:i + size] for i in range(0, len(inbound), size)]
        best: dict[str, float] | None = None
        for _ in range(repeats):
            norm = Normalizer(fleet, settings)
            window = dedup_mod.DuplicateWindow(settings.ingest_dedup_window_s,
                                               settings.ingest_dedup_max_ids)
            stage = {"normalize": 0.0, "dedup": 0.0, "encode": 0.0}
            rows = records = 0
            for b in batches:
                t = clock()
                res = norm.normalize_batch(b)
                t1 = clock()
                if columnar:
                    kept = window.keep_keys(res.row_key, recv)
                    if kept.size < len(res):
                        res = res.take(kept)
                    t2 = clock()
                    recs = kafka.v2_records_of(res, partition_of)
                    rows += len(res)
                else:
                    events = res.events
                    k = window.keep(events, recv)
                    events = [events[i] for i in k]
                    origin = [res.origin[i] for i in k]
                    t2 = clock()
                    recs = kafka.v2_records(events, origin, res.keys, partition_of)
                    rows += len(events)
                t3 = clock()
                records += len(recs)
                stage["normalize"] += t1 - t
                stage["dedup"] += t2 - t1
                stage["encode"] += t3 - t2
            stage["total"] = sum(stage.values())
            if best is None or stage["total"] < best["total"]:
                best = stage
        assert best is not None
        out[name] = {"messages": len(msgs), "rows": rows, "records": records,
                     "cpu_s": {k: round(v, 4) for k, v in best.items()}}
    return out


def export(ref: str, into: Path) -> None:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")


def run_child(src: Path, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                          "--repeats", str(repeats)], cwd=src, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default=None,
                   help="git ref of the old path (default: where HEAD left main)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="per child, best kept")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        sys.path.insert(0, os.getcwd())
        print(json.dumps(child(args.repeats)))
        return
    if args.baseline is None:
        args.baseline = subprocess.run(["git", "-C", str(ROOT), "merge-base", "main", "HEAD"],
                                       check=True, capture_output=True,
                                       text=True).stdout.strip()
    base_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                              check=True, capture_output=True, text=True).stdout.strip()
    head_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              check=True, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "ingest"],
                                check=True, capture_output=True, text=True).stdout.strip())
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="cityops-base-") as tmp:
        base = Path(tmp)
        export(args.baseline, base)
        for r in range(args.rounds):
            # alternate which goes first, so neither always gets the warmer machine
            order = [("old", base), ("new", ROOT)] if r % 2 == 0 else [("new", ROOT),
                                                                     ("old", base)]
            for name, src in order:
                runs[name].append(run_child(src, args.repeats))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    assert all(not x["columnar"] for x in runs["old"]) and all(x["columnar"] for x in runs["new"])
    summary: dict = {}
    for wl in [k for k in runs["new"][0] if k != "columnar"]:
        entry: dict = {}
        for name in ("old", "new"):
            first = runs[name][0][wl]
            med = {stage: statistics.median(x[wl]["cpu_s"][stage] for x in runs[name])
                   for stage in first["cpu_s"]}
            entry[name] = {
                "messages": first["messages"], "rows": first["rows"],
                "records": first["records"],
                "cpu_us_per_message": {k: round(v / first["messages"] * 1e6, 2)
                                       for k, v in med.items()},
                "cpu_us_per_row": round(med["total"] / max(first["rows"], 1) * 1e6, 2),
                "messages_per_cpu_s": round(first["messages"] / med["total"]),
            }
        entry["new_over_old_cpu"] = round(entry["new"]["cpu_us_per_message"]["total"]
                                          / entry["old"]["cpu_us_per_message"]["total"], 3)
        entry["speedup"] = round(1 / entry["new_over_old_cpu"], 2)
        summary[wl] = entry
        print(f"{wl:<16} old {entry['old']['cpu_us_per_message']['total']:8.2f} us/msg  "
              f"new {entry['new']['cpu_us_per_message']['total']:8.2f} us/msg  "
              f"new/old {entry['new_over_old_cpu']:.3f}  "
              f"(records {entry['old']['records']} -> {entry['new']['records']})", flush=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_at_end": os.getloadavg()},
              "baseline": f"{args.baseline} ({base_rev})",
              "tree": f"HEAD ({head_rev}){' + uncommitted ingest changes' if dirty else ''}",
              "method": "CPU (process_time) per stage, best of --repeats per child, median "
                        "over --rounds alternating children (see the module doc)",
              "rounds": args.rounds, "summary": summary}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
