"""CPU per reading of the alerts worker's rule evaluation: columns against one Event per row.

The in-process complement of ``bench/alerts_cpu.py`` (which runs the whole worker against
Kafka and PostgreSQL, with v1 records): here only what the worker does with a poll once
Kafka has handed it over, on contract-v2 records as ingest makes them, so the decoder and
the rules are what is measured. Per poll, as ``AlertService._batch``: decode each
partition's records, observe its watermark, evaluate the rules (default rule file, the load
fleet as registry), tick.

Paths, each in its own process over the same polls (written once to a file), timed with
``time.process_time`` (this process's CPU, user + system), first polls left out (warm-up):

- ``columns``: this checkout, ``decode_rows`` -> ``Engine.evaluate`` (the service's path);
- ``per_event``: this checkout, ``decode_values`` (one ``Event`` per row) -> evaluate;
- ``baseline``: ``--baseline DIR`` (a checkout of the code before, e.g. ``git archive`` of
  main's commit), ``decode_values`` -> evaluate, with that checkout's own ``Batch``.

Runs alternate (baseline, per_event, columns) ``--repeat`` times; the median of each is
reported, in microseconds of CPU per reading, and ratios to the baseline of the same run.

Usage: ``flock /tmp/cityops-bench.lock .venv/bin/python bench/alerts_columns.py --baseline
/tmp/main-src [--mode gateway|single] [--readings 300000]``; writes
``bench/results/alerts_columns[_single].json``. Machine of 2 shared cores: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CODE = Path(os.environ.get("CITYOPS_CODE", Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(CODE))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
RESULTS = HERE / "bench" / "results"
PARTITIONS = 6
WARMUP_POLLS = 3


class Poll(msgspec.Struct, array_like=True):
    wall: int
    parts: dict[int, list[bytes]]


def _fleet_file(dest: Path, mode: str, gateway_size: int) -> Path:
    """The load fleet, every group behind gateways of ``gateway_size`` (``gateway``) or
    none (``single``), as ``bench/e2e/run.py`` makes it."""
    text = (HERE / "simulators" / "fleets" / "load.toml").read_text()
    text = re.sub(r"^gateway_size = \d+\n", "", text, flags=re.M)
    if mode == "gateway":
        text = text.replace("[[group]]\n", f"[[group]]\ngateway_size = {gateway_size}\n")
    dest.write_text(text)
    return dest


def make_polls(fleet_path: Path, readings: int, rows_per_poll: int) -> list[Poll]:
    """Records of the load fleet as ingest produces them (v2, keyed and coalesced per
    partition), grouped in polls of about ``rows_per_poll`` rows over all partitions."""
    from alerts.scope import scope_partition
    from cityops.registry import load_fleet
    from cityops.settings import Settings
    from ingest.kafka import v2_records
    from ingest.normalize import InboundMessage, Normalizer
    from simulators.simulation import Simulation

    fleet = load_fleet(fleet_path)
    per_s = Simulation(fleet, seed=3, start_ms=0).messages_per_sim_second()
    # in the past (ingest refuses the future), within its 24 h limit (gateway messages
    # carry ~100 readings: a message count overestimates the span)
    start = int(time.time() * 1000) - min(int(readings / per_s * 1000), 20 * 3_600_000) \
        - 600_000
    sim = Simulation(fleet, seed=3, start_ms=start)
    norm = Normalizer(fleet, Settings())
    polls: list[Poll] = []
    got = 0
    while got < readings:
        now = int(time.time() * 1000)
        out = norm.normalize_batch([InboundMessage(m.topic, m.payload, now)
                                    for m in sim.messages(2000)])
        if not out.events:
            if polls:
                break  # the simulation reached the present: fewer readings than asked
            raise RuntimeError("the normalizer refused a whole chunk")
        for k in range(0, len(out.events), rows_per_poll):
            evs = out.events[k:k + rows_per_poll]
            origin = out.origin[k:k + rows_per_poll]
            recs = v2_records(evs, origin, out.keys,
                              lambda key: scope_partition(key, PARTITIONS))
            parts: dict[int, list[bytes]] = {}
            for r in recs:
                p = r.partition if r.partition is not None else \
                    scope_partition(r.key, PARTITIONS)
                parts.setdefault(p, []).append(r.value)
            polls.append(Poll(max(e.event_time for e in evs) + 2_000, parts))
            got += sum(len(e.measurements) for e in evs)
    return polls


def run_path(path: str, polls_file: Path, fleet_path: Path) -> dict[str, float]:
    """One path over all polls, in this process (the code on ``sys.path``)."""
    from alerts.decode import decode_values
    from alerts.engine import Engine
    from alerts.ruleset import load_rules
    from cityops.registry import load_fleet

    polls = msgspec.msgpack.decode(polls_file.read_bytes(), type=list[Poll])
    engine = Engine(load_rules(CODE / "alerts" / "rules" / "default.yaml"),
                    load_fleet(fleet_path))
    if path == "columns":
        from alerts.decode import decode_rows

        def decode(values: list[bytes]) -> tuple[list, int, int, int]:  # type: ignore[type-arg]
            rows = decode_rows(values)
            return (rows, sum(len(r) for r in rows), sum(r.r_row.size for r in rows),
                    max(int(r.time.max()) for r in rows))
    else:
        def decode(values: list[bytes]) -> tuple[list, int, int, int]:  # type: ignore[type-arg]
            evs = decode_values(values, engine.index.registry)
            return (evs, len(evs), sum(len(e.measurements) for e in evs),
                    max(e.event_time for e in evs))

    cpu = 0.0
    rows_n = readings = signals = 0
    for k, poll in enumerate(polls):
        t0 = time.process_time()
        got: list = []  # type: ignore[type-arg]
        parts = []
        m = 0
        for p, values in poll.parts.items():
            items, n, r, newest = decode(values)
            m += r
            got += items
            parts.append(np.full(n, p, np.int32))
            engine.clock.observe(p, newest, poll.wall)
        engine.clock.advance(poll.wall, {p: False for p in range(PARTITIONS)})
        out = engine.evaluate(got, "events", np.concatenate(parts))
        out += engine.tick(poll.wall)
        if k >= WARMUP_POLLS:
            cpu += time.process_time() - t0
            rows_n += sum(p.size for p in parts)
            readings += m
            signals += len(out)
    return {"cpu_s": cpu, "rows": rows_n, "readings": readings, "signals": signals}


def _child(path: str, code: Path, polls_file: Path, fleet_path: Path) -> dict[str, float]:
    env = dict(os.environ, CITYOPS_CODE=str(code), PYTHONPATH=str(code),
               PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run([sys.executable, __file__, "--worker", path, "--polls",
                          str(polls_file), "--fleet", str(fleet_path)], env=env, cwd=code,
                         check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, help="checkout of the code before")
    ap.add_argument("--mode", choices=("gateway", "single"), default="gateway")
    ap.add_argument("--gateway-size", type=int, default=25)
    ap.add_argument("--readings", type=int, default=300_000)
    ap.add_argument("--rows-per-poll", type=int, default=4_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--polls", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--fleet", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_path(args.worker, args.polls, args.fleet)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="cityops-bench-columns-"))
    fleet_path = _fleet_file(tmp / "fleet.toml", args.mode, args.gateway_size)
    try:
        out = _measure(args, tmp, fleet_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "alerts_columns" + ("" if args.mode == "gateway" else "_single")
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def _measure(args: argparse.Namespace, tmp: Path, fleet_path: Path) -> dict[str, object]:
    polls = make_polls(fleet_path, args.readings, args.rows_per_poll)
    polls_file = tmp / "polls.msgpack"
    polls_file.write_bytes(msgspec.msgpack.encode(polls))
    records = sum(len(v) for p in polls for v in p.parts.values())
    paths = [("per_event", HERE), ("columns", HERE)]
    if args.baseline:
        paths.insert(0, ("baseline", args.baseline))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in paths}
    for _ in range(args.repeat):
        for name, code in paths:
            r = _child("per_event" if name == "baseline" else name, code, polls_file,
                       fleet_path)
            runs[name].append(r)
            print(f"{name}: {r}", flush=True)
    out: dict[str, object] = {"mode": args.mode, "polls": len(polls),
                              "rows_per_poll": args.rows_per_poll,
                              "records_per_poll": round(records / len(polls), 1)}
    ref = None
    for name, rs in runs.items():
        per = [r["cpu_s"] / r["readings"] * 1e6 for r in rs]
        us = statistics.median(per)
        out[name] = {"us_cpu_per_reading_median": round(us, 3),
                     "runs_us_per_reading": [round(x, 3) for x in per],
                     "rows_timed": rs[0]["rows"], "readings_timed": rs[0]["readings"],
                     "signals": rs[0]["signals"]}
        ref = ref or us
        out[f"ratio_{name}_over_{next(iter(runs))}"] = round(us / ref, 3)
    out["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    return out


if __name__ == "__main__":
    main()
