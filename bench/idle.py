"""Idle cost of the whole stack: servers and services up, no traffic, CPU over a minute.

An idle operations center still pays for every consumer that polls, every timer that
ticks and every broker housekeeping thread; on a 2-core box that is capacity taken from
the load. This starts a private stack (Mosquitto, the Kafka broker, PostgreSQL,
Prometheus) with one ingest, one processor and one alerts worker, waits ``--warmup``
seconds (start-up work, group joins, first checkpoints), then samples the CPU seconds of
every process tree for ``--seconds`` and reports each as a share of one core.

Run ``.venv/bin/python bench/idle.py [--seconds 60] [--out idle]``; results in
``bench/results/<out>.json``. Compare two runs made one right after the other on the same
machine (the ratio is the result; absolute shares are noisy on a shared box).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e_harness import City, city_pids, sampling  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def measure(seconds: float, warmup: float) -> dict[str, Any]:
    with City(prefix="cityops-bench-idle-") as city:
        time.sleep(warmup)
        with sampling(city_pids(city), interval=1.0) as sampler:
            time.sleep(seconds)
        first, last = sampler.samples[0], sampler.samples[-1]
        wall = last[0] - first[0]
        per = {name: round(100 * (last[2].get(name, 0.0) - first[2].get(name, 0.0)) / wall, 2)
               for name in last[2]}
        rss = {name: round(v / 2**20, 1) for name, v in last[1].items()}
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(wall, 1), "warmup_s": warmup,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "percent_of_one_core": per,
        "total_percent_of_one_core": round(sum(per.values()), 2),
        "rss_mib": rss,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--out", default="idle")
    args = p.parse_args()
    result = measure(args.seconds, args.warmup)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
