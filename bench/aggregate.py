"""Numpy rollups vs a straightforward pure-Python implementation, on the same batch.

What is timed: the four rollups of one batch (per sensor+metric and per
district+domain+metric, 1-minute and 1-hour windows; n, sum, min, max, mean, p95),
starting from the batch's columns (integer keys, epoch-ms times, float values), which
the processor builds once per batch for both COPY and aggregation. The baseline is the
obvious Python: group into a dict of lists, then ``sorted`` per group for p95.

The batch looks like the city: N sensors with 1-4 metrics each, readings spread over a
few minutes around an hour boundary, 2% late by up to 3 hours.

Both run on one core (numpy does not thread these operations). The machine has 2 cores
shared with other work, so absolute speeds are noisy: the ratio is the result.

Usage: ``.venv/bin/python bench/aggregate.py [--sizes 20000 50000 200000] [--repeat 7]``
Writes ``bench/results/aggregate.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from processors.batch import METRIC_BITS
from processors.cli import keep_freed_memory
from processors.rollup import aggregate

RESULTS = Path(__file__).resolve().parent / "results" / "aggregate.json"


def make_batch(size: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sensors = max(size // 10, 50)
    metrics_per_sensor = rng.integers(1, 5, sensors)
    sensor = rng.integers(0, sensors, size)
    metric = (rng.integers(0, 4, size) % metrics_per_sensor[sensor]).astype(np.int64)
    area = sensor % 9 * 3 + sensor % 3  # 9 districts x 3 domains
    hour = 1_800_000_000_000 // 3_600_000 * 3_600_000
    t = hour - 120_000 + rng.integers(0, 300_000, size)  # 5 minutes across an hour boundary
    late = rng.random(size) < 0.02
    t[late] -= rng.integers(0, 3 * 3_600_000, int(late.sum()))
    values = np.round(rng.gamma(2.0, 30.0, size), 2)
    return {"sensor_key": (sensor << METRIC_BITS) | metric, "area_key": (area << METRIC_BITS)
            | metric, "time_ms": t.astype(np.int64), "values": values}


def python_rollups(sensor_key: list[int], area_key: list[int], time_ms: list[int],
                   values: list[float]) -> dict[str, dict[tuple[int, int], tuple]]:
    """The straightforward implementation: dict of lists, sorted for the percentile."""
    out = {}
    for scope, keys in (("sensor", sensor_key), ("district", area_key)):
        for window, ms in (("1m", 60_000), ("1h", 3_600_000)):
            groups: dict[tuple[int, int], list[float]] = defaultdict(list)
            for k, t, v in zip(keys, time_ms, values, strict=True):
                groups[(k, t // ms * ms)].append(v)
            res = {}
            for key, vs in groups.items():
                vs.sort()
                n = len(vs)
                total = sum(vs)
                h = (n - 1) * 0.95
                lo = math.floor(h)
                hi = min(lo + 1, n - 1)
                p95 = vs[lo] + (h - lo) * (vs[hi] - vs[lo])
                res[key] = (n, total, vs[0], vs[-1], total / n, p95)
            out[f"{scope}_rollup_{window}"] = res
    return out


def check_same(np_out: dict, py_out: dict) -> None:
    for name, g in np_out.items():
        ref = py_out[name]
        assert len(g) == len(ref), name
        for i in range(0, len(g), max(len(g) // 500, 1)):
            n, total, lo, hi, _, p95 = ref[(int(g.key[i]), int(g.bucket_ms[i]))]
            assert (int(g.n[i]), g.min[i], g.max[i]) == (n, lo, hi)
            assert math.isclose(g.sum[i], total, rel_tol=1e-9)
            assert math.isclose(g.p95[i], p95, rel_tol=1e-12, abs_tol=1e-12)


def best_of(fn, repeat: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[20_000, 50_000, 200_000])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's malloc thresholds as they are")
    args = parser.parse_args()
    if not args.no_malloc_tuning:
        keep_freed_memory()  # as `cityops process` does
    rows = []
    for size in args.sizes:
        b = make_batch(size)
        lists = {k: v.tolist() for k, v in b.items()}
        np_out = aggregate(b["sensor_key"], b["area_key"], b["time_ms"], b["values"])
        py_out = python_rollups(**lists)
        check_same(np_out, py_out)
        np_best, np_median = best_of(
            lambda b=b: aggregate(b["sensor_key"], b["area_key"], b["time_ms"], b["values"]),
            args.repeat)
        py_best, py_median = best_of(lambda lists=lists: python_rollups(**lists),
                                     max(args.repeat // 2, 2))
        row = {
            "readings": size,
            "groups": {name: len(g) for name, g in np_out.items()},
            "numpy_s": {"best": np_best, "median": np_median},
            "python_s": {"best": py_best, "median": py_median},
            "numpy_readings_per_s": size / np_best,
            "numpy_readings_per_s_median": size / np_median,
            "python_readings_per_s": size / py_best,
            "speedup": py_best / np_best,
            "speedup_median": py_median / np_median,
        }
        rows.append(row)
        print(f"{size:>8} readings: numpy {size / np_best / 1e6:6.2f} M/s (median "
              f"{size / np_median / 1e6:5.2f}), python {size / py_best / 1e6:5.2f} M/s, "
              f"speedup x{row['speedup']:.0f} (median x{row['speedup_median']:.0f})")
    result = {
        "benchmark": "numpy rollups vs pure Python, same batch, one core",
        "targets": {"speedup": 30, "numpy_readings_per_s": 5_000_000},
        "malloc_tuning": not args.no_malloc_tuning,
        "numpy": np.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
        "note": "2 shared cores, other work running: absolute numbers are noisy, "
                "the speedup ratio is the result",
        "runs": rows,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
