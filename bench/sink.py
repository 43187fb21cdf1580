"""Sink throughput into PostgreSQL vs a raw asyncpg COPY of the same rows, same run.

Sink: what ``cityops process`` does per Kafka batch after ``getmany`` — decode the JSON
values (msgspec), build numpy columns, then one transaction: binary COPY of the narrow
rows, built from the arrays, into the day-partitioned readings table, and the window
marks; latest state merged into in-memory arrays per batch and flushed to
``sensor_latest`` once at the end of the run (timed; the processor flushes every
``process_latest_flush_s``); then every rollup window computed once, as the closer does
when the windows close (timed, step ``close``). Raw: ``copy_records_to_table`` of the
very same narrow rows (records built beforehand, not timed) straight into the same
readings table, one transaction per batch of the same size. Both start from empty
tables each round; rounds alternate. A third run per round measures the sink without
the plain-mode rollups (the database work of the TimescaleDB mode, whose rollups are
continuous aggregates), and each sink step is reported in units of the raw COPY time.

The machine has 2 cores shared by this script, PostgreSQL and other work: absolute
rows/s are noisy, the sink/raw ratio is the result.

Usage: ``.venv/bin/python bench/sink.py [--events 50000] [--batch 5000] [--rounds 3]``
Starts its own PostgreSQL (cityops stack, postgres only) on a free port, stops it after.
Writes ``bench/results/sink.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from cityops.stack import Stack
from ingest.contract import Event, encode_event, event_id
from processors.batch import READING_COLUMNS, Vocabularies, columns, event_time
from processors.cli import keep_freed_memory
from processors.latest import LatestState
from processors.service import decode_all
from processors.storage import Storage
from processors.windows import WindowCloser
from tests.support import isolated_settings

RESULTS = Path(__file__).resolve().parent / "results" / "sink.json"
METRICS = ("flow", "speed_kmh", "occupancy", "count_car")
TRUNCATE = ("truncate readings, latest_by_sensor, sensor_rollup_1h, district_rollup_1m, "
            "district_rollup_1h, rollup_pending, rollup_late, rollup_closed")


def make_events(n: int, sensors: int = 2000) -> list[Event]:
    """Readings of a fleet over the last minutes, in arrival order (slightly shuffled)."""
    now = int(time.time() * 1000) - 60_000
    out = []
    for i in range(n):
        s = i % sensors
        t = now - (n - i) // sensors * 30_000 - (s * 7) % 1000
        sid = f"bench-{s:05d}"
        out.append(Event(
            event_id=event_id(sid, t), sensor_id=sid, domain="traffic", type="lane_detector",
            district=f"d{s % 9}", landmark=f"l{s % 40}", lat=10.03, lon=105.78, event_time=t,
            receive_time=t + 120, interval_s=30, vendor="compact",
            measurements={m: float((i * 31 + k * 17) % 500) / 3 for k, m in
                          enumerate(METRICS)}))
    return out


async def run_raw(conn: asyncpg.Connection, batches: list[list[tuple]]) -> float:
    t0 = time.perf_counter()
    for records in batches:
        async with conn.transaction():
            await conn.copy_records_to_table("readings", records=records,
                                             columns=READING_COLUMNS)
    return time.perf_counter() - t0


async def run_sink(storage: Storage, values: list[list[bytes]], known: set[str]
                   ) -> tuple[float, dict[str, float], int]:
    storage.vocab = Vocabularies()
    storage.known_sensors = set(known)
    # Fresh latest state too: the tables were truncated, so every cell must be flushed.
    storage.latest = LatestState(storage.latest.flush_s)
    steps: dict[str, float] = {}
    rows = 0
    t0 = time.perf_counter()
    for batch_values in values:
        c0 = time.perf_counter()
        events, bad = decode_all(batch_values)
        assert not bad
        batch = columns(events, storage.vocab, storage.known_sensors)
        steps["decode+columns"] = steps.get("decode+columns", 0.0) + time.perf_counter() - c0
        result = await storage.write(batch)
        for step, seconds in result.steps.items():
            steps[step] = steps.get(step, 0.0) + seconds
        rows += result.readings
    f0 = time.perf_counter()
    await storage.flush_latest(force=True)
    steps["latest_flush"] = time.perf_counter() - f0
    if storage.rollup_tables:
        f0 = time.perf_counter()
        await WindowCloser(batch_buckets=100_000).run(storage.conn, everything=True)
        steps["close"] = time.perf_counter() - f0
    return time.perf_counter() - t0, steps, rows


async def bench(dsn: str, n_events: int, batch: int, rounds: int) -> dict:
    events = make_events(n_events)
    values = [encode_event(e) for e in events]
    value_batches = [values[i:i + batch] for i in range(0, len(values), batch)]
    vocab = Vocabularies()
    record_batches = []
    for i in range(0, len(events), batch):
        # The same narrow rows as plain tuples: what a client hands asyncpg's COPY.
        b = columns(events[i:i + batch], vocab, set())
        record_batches.append(list(zip(
            [event_time(t) for t in b.time_ms.tolist()], (b.sensor + 1).tolist(),
            (b.metric + 1).tolist(), b.values.tolist(), b.quality.tolist(), strict=True)))
    n_rows = sum(len(b) for b in record_batches)
    known: set[str] = set()  # registered by the first write, as sensors seen in events are
    conn = await asyncpg.connect(dsn)
    storage = await Storage.connect(dsn, "postgres")
    # The same sink without the rollup-table upserts: the database work of the
    # TimescaleDB mode, where the rollups are continuous aggregates.
    no_tables = await Storage.connect(dsn, "postgres", rollup_tables=False)
    raw_rates, sink_rates, breakdowns, core_ratios = [], [], [], []
    try:
        for st in (storage, no_tables):
            await st.write(columns([], st.vocab, set()))  # create the staging tables
        for r in range(rounds):
            await conn.execute(TRUNCATE)
            await conn.execute("checkpoint")
            raw_s = await run_raw(conn, record_batches)
            await conn.execute(TRUNCATE)
            await conn.execute("checkpoint")
            sink_s, steps, stored = await run_sink(storage, value_batches, known)
            assert stored == n_rows, (stored, n_rows)
            await conn.execute(TRUNCATE)
            await conn.execute("checkpoint")
            core_s, _, stored = await run_sink(no_tables, value_batches, known)
            assert stored == n_rows, (stored, n_rows)
            raw_rates.append(n_rows / raw_s)
            sink_rates.append(n_rows / sink_s)
            core_ratios.append(raw_s / core_s)
            # Each step's time in units of the raw COPY of the same rows.
            breakdowns.append({k: round(v / raw_s, 3) for k, v in steps.items()})
            print(f"round {r + 1}: raw COPY {n_rows / raw_s:9.0f} rows/s, sink "
                  f"{n_rows / sink_s:9.0f} rows/s, ratio {raw_s / sink_s:.2f} (without "
                  f"rollup tables {raw_s / core_s:.2f}); sink steps in raw-COPY units: "
                  f"{breakdowns[-1]}")
        rollup_rows = {t: await conn.fetchval(f"select count(*) from {t}") for t in (
            "sensor_rollup_1m", "sensor_rollup_1h", "district_rollup_1m", "district_rollup_1h",
            "latest_by_sensor")}
    finally:
        await storage.close()
        await no_tables.close()
        await conn.close()
    ratios = [s / r for s, r in zip(sink_rates, raw_rates, strict=True)]
    return {
        "events": n_events, "readings": n_rows, "batch_events": batch, "rounds": rounds,
        "raw_copy_rows_per_s": raw_rates, "sink_rows_per_s": sink_rates,
        "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
        "ratio_best": max(ratios), "sink_steps_in_raw_copy_units": breakdowns,
        "ratio_without_rollup_tables_per_round": core_ratios,
        "ratio_without_rollup_tables_median": statistics.median(core_ratios),
        "derived_rows_per_round": rollup_rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    state = Path(tempfile.mkdtemp(prefix="cityops-bench-sink-"))
    state.chmod(0o755)
    settings = isolated_settings(state, storage_mode="postgres")
    stack = Stack(settings)
    try:
        stack.up(["postgres"])
        result = asyncio.run(bench(settings.pg_dsn, args.events, args.batch, args.rounds))
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)
    result.update({
        "benchmark": "sink (decode + binary COPY from arrays + window marks + latest flush + "
                     "window close) vs raw asyncpg COPY of the same rows",
        "target_ratio": 0.70, "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "note": "2 shared cores (client, PostgreSQL, other work): absolute rows/s are noisy, "
                "the ratio is the result",
    })
    print(f"sink/raw ratio: median {result['ratio_median']:.2f}, best {result['ratio_best']:.2f};"
          f" without rollup tables (TimescaleDB-mode work): median "
          f"{result['ratio_without_rollup_tables_median']:.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
