"""End-to-end benchmark: simulators -> Mosquitto -> ingest -> Kafka -> processors and
alerts -> PostgreSQL, every process real, on one machine, counted against ground truth.

What it measures, per offered rate (steps of ``--step-s`` seconds, rising until the
pipeline no longer keeps up):
  * sustained end-to-end throughput: messages (and readings) published and stored, over
    the time from the first publish to the commit of the step's last row; a step "keeps
    up" when the publisher reached 90 % of the offered rate, the backlog drained within
    ``--drain-s`` after the publisher stopped, and nothing was lost or stored twice
    (exact count against the simulator's ground truth);
  * latency publish -> stored: probe readings (5/s, current event time) published next to
    the load; stored = the commit timestamp of their rows (``track_commit_timestamp``);
  * latency publish -> alert: probe panic-button presses (1/s, a fresh button each time,
    rule ``panic_button``) until the alert row exists (its ``raised_at``);
  * CPU (cores used) and peak RSS of every worker and server (psutil, process trees);
  * what each reading costs the hot path (issue 15), read from the servers' counters
    between the step's start and ``--stats-settle-s`` after it drained: database row
    writes per stored reading (``pg_stat_user_tables``, partitions under their parent),
    Kafka records per MQTT message (topic end offsets), and CPU microseconds per reading
    per service (``bench/e2e/counters.py``). Probes count in these denominators.
Same-run ceilings it is compared with (workers stopped, same stack): a bare MQTT
pub/sub loop (the simulator's publisher -> Mosquitto -> a paho subscriber that only
counts, QoS 1) and raw asyncpg COPY of rows the pipeline stored into a table like
``readings``.

Soak (``--soak SECONDS``): one long run at ``--soak-rate`` (default: half the best
sustained rate of this run's steps, or 1,000 msg/s without steps), sampling each
service's RSS every 5 s; reports the RSS slope of the second half (MiB/min) and plots it.

Usage::

    .venv/bin/python bench/e2e/run.py --ingest 1 --process 1 --rates 1000,2000,4000
    .venv/bin/python bench/e2e/run.py --mode gateway --rates 2000,4000 --step-s 60
    .venv/bin/python bench/e2e/run.py --rates '' --soak 600 --soak-rate 1500

Writes ``bench/results/e2e.json`` (or ``e2e_soak.json``) and PNG plots next to it. The
machine has 2 cores shared by every process of the city (and by whatever else runs):
absolute numbers are noisy, ratios to the same-run ceilings less so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import numpy as np  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
import psutil  # noqa: E402

from bench.e2e import counters  # noqa: E402
from bench.e2e import profile as profiling  # noqa: E402
from cityops.registry import Sensor, load_fleet  # noqa: E402
from cityops.settings import Settings  # noqa: E402
from ingest import samples  # noqa: E402
from simulators.publisher import open_sink  # noqa: E402
from simulators.simulation import Simulation  # noqa: E402
from tests.e2e_harness import (  # noqa: E402
    City,
    ResourceSampler,
    Stored,
    city_pids,
    count_stored,
    deadletter_watermark,
    expected_from_truth,
)

RESULTS = ROOT / "bench" / "results"
# A backlog that stops moving for this long is taken as lost. Generous: a database
# checkpoint or a JVM pause can hold a loaded 2-core box for seconds, and a step that ends
# early only reports a backlog as a loss.
STALL_S = 60.0
LOAD_FLEET = ROOT / "simulators" / "fleets" / "load.toml"


# --- fleets ----------------------------------------------------------------------------
def scaled_fleet(dest: Path, scale: int, mode: str, gateway_size: int) -> Path:
    """The load fleet with ``scale`` times the devices. ``single``: no gateways (every
    message one reading); ``gateway``: every group behind gateways of ``gateway_size``."""
    text = LOAD_FLEET.read_text()
    text = re.sub(r"^count = (\d+)$", lambda m: f"count = {int(m.group(1)) * scale}", text,
                  flags=re.M)
    text = re.sub(r"^gateway_size = \d+\n", "", text, flags=re.M)
    if mode == "gateway":
        text = text.replace("[[group]]\n", f"[[group]]\ngateway_size = {gateway_size}\n")
    text = text.replace('name = "can-tho-load"', f'name = "can-tho-load-x{scale}-{mode}"')
    dest.write_text(text)
    return dest


# --- probes -----------------------------------------------------------------------------
@dataclass
class Probes:
    """Probe readings (stored latency) and panic presses (alert latency) next to the load."""

    settings: Settings
    lane: list[Sensor]
    panic: list[Sensor]
    reading_hz: float = 5.0
    alert_hz: float = 1.0
    # (sensor id, event time ms) -> wall publish time
    readings: dict[tuple[str, int], float] = field(default_factory=dict)
    alerts: dict[str, float] = field(default_factory=dict)  # sensor id -> wall publish time
    rows_stored: int = 0  # the probe readings' rows found stored (by ``latencies``)
    _next_panic: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        # The probes publish as the fleet's own identities (the load fleet's district
        # bridges), driven from this thread like the simulator's publisher.
        c = open_sink(self.settings, load_fleet(self.settings.fleet_file), qos=1,
                      client_id=f"e2e-probe-{os.getpid()}")
        c.connect()
        t_read = t_alert = time.monotonic()
        k = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= t_read:
                    sensor = self.lane[k % len(self.lane)]
                    k += 1
                    ms = int(time.time() * 1000)
                    topic, payload = samples.device_message(sensor, ms)
                    self.readings[(sensor.sensor_id, ms)] = time.time()
                    c.publish(topic, payload)
                    t_read += 1 / self.reading_hz
                if now >= t_alert and self._next_panic < len(self.panic):
                    sensor = self.panic[self._next_panic]
                    self._next_panic += 1
                    ms = int(time.time() * 1000)
                    payload = samples.encode(samples.safecity(sensor.sensor_id, ms, "PANIC"))
                    self.alerts[sensor.sensor_id] = time.time()
                    c.publish(samples.topic_of(sensor), payload)
                    t_alert += 1 / self.alert_hz
                c.idle(max(0.0, min(t_read, t_alert, time.monotonic() + 0.1)
                           - time.monotonic()))
        finally:
            c.drain(5.0)
            c.close()

    def start(self) -> Probes:
        self.readings, self.alerts, self.rows_stored = {}, {}, 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="e2e-probes", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def latencies(self, conn: asyncpg.Connection, wait_s: float = 30.0
                        ) -> tuple[list[float], list[float], int, int]:
        """Seconds publish->stored and publish->alert; plus how many never arrived."""
        deadline = time.monotonic() + wait_s
        stored: dict[tuple[str, int], float] = {}
        alerted: dict[str, float] = {}
        sensors = list({k[0] for k in self.readings})
        lo = datetime.fromtimestamp(min((k[1] for k in self.readings), default=0) / 1000, UTC)
        while True:
            # Probe readings by their natural key (sensor, event time), through the registry.
            rows = await conn.fetch(
                "select s.sensor_id, (extract(epoch from r.time) * 1000)::int8 ms, "
                "extract(epoch from min(pg_xact_commit_timestamp(r.xmin))) t, count(*) n "
                "from readings r join sensors s on s.sensor_key = r.sensor "
                "where s.sensor_id = any($1) and r.time >= $2 group by 1, 2", sensors, lo)
            stored = {(r[0], r[1]): float(r["t"]) for r in rows
                      if r["t"] is not None and (r[0], r[1]) in self.readings}
            self.rows_stored = sum(int(r["n"]) for r in rows if (r[0], r[1]) in self.readings)
            rows = await conn.fetch(
                "select source, extract(epoch from min(raised_at)) t from alerts "
                "where rule_id = 'panic_button' and source = any($1) group by source",
                list(self.alerts))
            alerted = {r["source"]: float(r["t"]) for r in rows}
            done = len(stored) == len(self.readings) and len(alerted) == len(self.alerts)
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        s = [stored[k] - t for k, t in self.readings.items() if k in stored]
        a = [alerted[k] - t for k, t in self.alerts.items() if k in alerted]
        return s, a, len(self.readings) - len(s), len(self.alerts) - len(a)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None, "n": 0}
    arr = np.asarray(values) * 1000
    return {"p50": round(float(np.percentile(arr, 50)), 1),
            "p95": round(float(np.percentile(arr, 95)), 1),
            "p99": round(float(np.percentile(arr, 99)), 1),
            "max": round(float(arr.max()), 1), "n": len(values)}


# --- resources ----------------------------------------------------------------------------
def resources(sampler: ResourceSampler, t0: float, t1: float) -> dict[str, dict[str, float]]:
    """Cores used (CPU seconds / wall seconds) and peak RSS per service over [t0, t1]."""
    inside = [s for s in sampler.samples if t0 <= s[0] <= t1]
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    wall = max(last[0] - first[0], 1e-6)
    out = {}
    for name in last[1]:
        cpu = last[2].get(name, 0.0) - first[2].get(name, 0.0)
        out[name] = {"cores": round(max(cpu, 0.0) / wall, 3), "cpu_s": round(max(cpu, 0.0), 2),
                     "peak_rss_mib": round(max(s[1].get(name, 0) for s in inside) / 2**20, 1)}
    return out


def cpu_per_message(res: dict[str, dict[str, float]], messages: int,
                    cores: int, readings: int = 0) -> dict[str, Any]:
    """CPU milliseconds each service spent per published message over the step, and the
    rate the whole co-located stack could reach if CPU were the only limit
    (``cores`` / total CPU seconds per message). Unlike a wall-clock rate this barely
    depends on what else the machine runs, so it says where the cycles go. Also CPU
    microseconds per stored reading: a gateway message carries many readings, and the
    per-reading budget (issue 15) is what compares across modes."""
    if not res or not messages:
        return {}
    per = {name: round(r["cpu_s"] * 1000 / messages, 3) for name, r in res.items()}
    total = sum(per.values())
    out = {"ms_per_msg": per, "total_ms_per_msg": round(total, 3),
           "cpu_bound_msgs_per_s": round(cores * 1000 / total, 1) if total else None}
    if readings:
        us = {name: round(r["cpu_s"] * 1e6 / readings, 2) for name, r in res.items()}
        out |= {"us_per_reading": us, "total_us_per_reading": round(sum(us.values()), 2),
                "readings": readings}
    return out


# --- load from several publisher processes ---------------------------------------------------
@dataclass
class LoadStats:
    sent: int
    errors: int
    elapsed_s: float  # first message to last acknowledgement, the slowest publisher
    rate: float


_SUMMARY = re.compile(r"sent (\d+) messages in ([\d.]+) s .*?(\d+) completed, (\d+) errors")


# Publisher processes still running: an interrupted run kills them before stopping the
# stack (their thread's ``communicate`` would otherwise hold the interpreter's exit).
_PUBLISHERS: list[Any] = []


def _kill_publishers() -> None:
    for proc in _PUBLISHERS:
        if proc.poll() is None:
            proc.kill()
    _PUBLISHERS.clear()


def publish_sharded(settings: Settings, fleet: Path, truths: list[Path], *, seed: int,
                    start_ms: int, rate: float, count: int) -> LoadStats:
    """``cityops simulate --shard i/K`` in K processes (one Python publisher tops out near
    2-4k QoS 1 msg/s on these cores); the shards partition the one fleet's stream."""
    import subprocess

    k = len(truths)
    env = {**os.environ, **settings.replace(fleet_file=fleet).to_env()}
    procs = []
    for i, truth in enumerate(truths):
        cmd = [sys.executable, "-m", "cityops.cli", "simulate", "--shard", f"{i}/{k}",
               "--rate", str(rate / k), "--count", str(count // k), "--seed", str(seed),
               "--start", str(start_ms), "--qos", "1", "--inflight", "5000",
               "--ground-truth", str(truth), "--no-progress", "--metrics-port", "0"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    _PUBLISHERS.extend(procs)
    sent = errors = 0
    elapsed = 0.0
    for proc in procs:
        _, err = proc.communicate(timeout=3600)
        m = _SUMMARY.search(err or "")
        if proc.returncode != 0 or m is None:
            raise RuntimeError(f"publisher failed ({proc.returncode}): {err[-2000:]}")
        sent += int(m.group(1))
        elapsed = max(elapsed, float(m.group(2)))
        errors += int(m.group(4))
    return LoadStats(sent, errors, elapsed, sent / elapsed if elapsed else 0.0)


def merge_expected(truths: list[Path]) -> Any:
    exps = [expected_from_truth(t) for t in truths]
    exp = exps[0]
    for other in exps[1:]:
        exp.messages += other.messages
        exp.duplicates_sent += other.duplicates_sent
        exp.readings.update(other.readings)
        exp.incidents |= other.incidents
        exp.deadletters.update(other.deadletters)
        exp.deadletter_topics.update(other.deadletter_topics)
        exp.heartbeats += other.heartbeats
        exp.min_time_ms = min(exp.min_time_ms, other.min_time_ms)
        exp.max_time_ms = max(exp.max_time_ms, other.max_time_ms)
    return exp


# --- one step --------------------------------------------------------------------------------
async def run_step(city: City, fleet: Path, rate: float, seconds: float, start_ms: int,
                   seed: int, probes: Probes, sampler: ResourceSampler, drain_s: float,
                   workdir: Path, publishers: int = 1,
                   settle_s: float = counters.STATS_SETTLE_S,
                   profile_dir: Path | None = None) -> dict[str, Any]:
    s = city.settings
    truths = [workdir / f"truth-{seed}-{i}.jsonl" for i in range(publishers)]
    conn = await asyncpg.connect(s.pg_dsn)
    dl_mark = await deadletter_watermark(conn)
    t_counted = time.monotonic()
    before = await counters.snapshot(conn, s.kafka_bootstrap, s.topics.all())
    probes.start()
    workers = [w.name for w in city.pipeline.workers] if profile_dir else []
    with profiling.recording(city_pids(city), workers, max(5.0, seconds * 0.8),
                             (profile_dir or workdir) / "profiles", f"{rate:g}") as profiles:
        stats = await asyncio.to_thread(publish_sharded, s, fleet, truths, seed=seed,
                                        start_ms=start_ms, rate=rate,
                                        count=int(rate * seconds))
    t_pub = time.monotonic()
    wall_pub = time.time()
    # The clocks start with the first message sent (spawning the generator is set-up).
    t0 = t_pub - stats.elapsed_s
    wall0 = wall_pub - stats.elapsed_s
    probes.stop()
    exp = merge_expected(truths)
    lo = datetime.fromtimestamp(exp.min_time_ms / 1000 - 1, UTC)
    hi = datetime.fromtimestamp(exp.max_time_ms / 1000 + 1, UTC)
    # Wait for the backlog: every expected event stored, or the rows in the step's
    # (simulated) time range stop growing for STALL_S, or the drain deadline passes. The
    # row count alone cannot say "all stored": the range, padded by a second each side,
    # also holds the neighbouring step's last rows, so it reached the expected count while
    # the tail was still in flight, and that tail was reported lost (61 readings of a soak,
    # hundreds in gateway steps). The exact count decides; the cheap one only gates it.
    last, last_change, last_exact = -1, time.monotonic(), 0.0
    stored: Stored | None = None  # the last exact count, when it found everything
    while True:
        n = int(await conn.fetchval(
            "select (select count(*) from readings where time between $1 and $2) + "
            "(select count(*) from incidents where time between $1 and $2)", lo, hi))
        now = time.monotonic()
        if n != last:
            last, last_change = n, now
        # Stop when all is stored, or nothing moved for STALL_S (then what is missing is
        # lost), or after a long cap (then it is backlog: ``keeps_up`` is false either way).
        if now - last_change > STALL_S or now - t_pub > max(drain_s * 4, 300):
            break
        if n >= exp.rows and now - last_exact >= 2.0:
            last_exact = now
            stored = await count_stored(conn, exp, dl_mark)
            if stored.complete:
                break
            stored = None
        await asyncio.sleep(0.5)
    t_done = time.monotonic()
    if stored is None:
        stored = await count_stored(conn, exp, dl_mark)
    t_last_commit = await conn.fetchval(
        "select extract(epoch from max(pg_xact_commit_timestamp(xmin))) from readings "
        "where time between $1 and $2", lo, hi)
    lat_s, lat_a, probe_lost, alert_lost = await probes.latencies(conn)
    await asyncio.sleep(settle_s)  # PostgreSQL's table counters lag (bench/e2e/counters.py)
    after = await counters.snapshot(conn, s.kafka_bootstrap, s.topics.all())
    await conn.close()
    # A reading is one value (one narrow row), as issue 15 counts them: a message of a
    # lane detector holds ~4, a gateway message ~100.
    work = counters.Work(messages=stats.sent, readings=stored.rows_stored,
                         probe_messages=len(probes.readings) + len(probes.alerts),
                         probe_readings=probes.rows_stored + len(lat_a))
    e2e_s = (float(t_last_commit) - wall0) if t_last_commit else float("nan")
    drained_after = (float(t_last_commit) - wall_pub) if t_last_commit else math.inf
    keeps_up = (stats.rate >= 0.9 * rate and drained_after <= drain_s and stored.lost == 0
                and stored.duplicates == 0
                and stored.deadletters_stored == stored.deadletters_expected)
    readings_total = exp.rows
    return {
        "offered_msgs_per_s": rate, "seconds": seconds, "published": stats.sent,
        "publish_rate": round(stats.rate, 1), "publish_errors": stats.errors,
        "events_expected": exp.events, "events_stored": stored.events_stored,
        "lost": stored.lost, "duplicates": stored.duplicates,
        "deadletters": f"{stored.deadletters_stored}/{stored.deadletters_expected}",
        "deadletter_reasons": stored.deadletter_reasons,
        "rows_stored": stored.rows_stored,
        "e2e_seconds": round(e2e_s, 2), "drained_after_publish_s": round(drained_after, 2),
        "e2e_msgs_per_s": round(stats.sent / e2e_s, 1) if e2e_s > 0 else None,
        "e2e_readings_per_s": round(exp.events / e2e_s, 1) if e2e_s > 0 else None,
        "e2e_rows_per_s": round(readings_total / e2e_s, 1) if e2e_s > 0 else None,
        "keeps_up": keeps_up,
        "latency_stored_ms": percentiles(lat_s), "stored_probes_missing": probe_lost,
        "latency_alert_ms": percentiles(lat_a), "alert_probes_missing": alert_lost,
        "resources": (res := resources(sampler, t0, t_done)),
        "cpu": cpu_per_message(res, stats.sent, os.cpu_count() or 1, work.all_readings),
        "hot_path": counters.hot_path(before, after, work, time.monotonic() - t_counted),
        **({"profile": {name: profiling.summary(path) for name, path in profiles.items()}}
           if profiles else {}),
    }


# --- ceilings ----------------------------------------------------------------------------------
def _count_subscriber(host: str, port: int, user: str, password: str, n: int,
                      ready: Any, out: Any) -> None:
    """Child process: a bare paho QoS 1 subscriber that only counts (the MQTT ceiling)."""
    got = 0
    first = last = 0.0
    done = threading.Event()

    def on_message(c: Any, u: Any, m: Any) -> None:
        nonlocal got, first, last
        got += 1
        last = time.monotonic()
        if got == 1:
            first = last
        if got >= n:
            done.set()

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"e2e-ceiling-{os.getpid()}")
    c.username_pw_set(user, password)
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    c.connect(host, port)
    c.subscribe("city/#", qos=1)
    c.loop_start()
    done.wait(120)
    c.loop_stop()
    out.put((got, last - first, time.monotonic()))


def mqtt_ceiling(settings: Settings, fleet: Path, n: int, workdir: Path,
                 publishers: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_count_subscriber, args=(
        settings.host, settings.mqtt_port, settings.mqtt_admin_user,
        settings.mqtt_admin_password, n, ready, out))
    proc.start()
    ready.wait(20)
    time.sleep(0.3)
    n = n // publishers * publishers
    truths = [workdir / f"ceiling-{i}.jsonl" for i in range(publishers)]
    stats = publish_sharded(settings, fleet, truths, seed=999, rate=1e7, count=n,
                            start_ms=int(time.time() * 1000) - 3_600_000)
    got, span, _ = out.get(timeout=150)
    proc.join(timeout=10)
    return {"messages": n, "received": got, "publish_rate": round(stats.rate, 1),
            "msgs_per_s": round(got / span, 1) if span > 0 else None}


async def copy_ceiling(settings: Settings, rows: int = 200_000) -> dict[str, Any]:
    """asyncpg COPY of rows the pipeline stored, into a table like ``readings``."""
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        records = await conn.fetch(
            "select time, sensor, metric, value, quality from readings limit $1", rows)
        records = [tuple(r) for r in records]
        await conn.execute("drop table if exists e2e_copy_ceiling")
        await conn.execute("create table e2e_copy_ceiling (like readings including all)")
        cols = ["time", "sensor", "metric", "value", "quality"]
        t = time.perf_counter()
        for i in range(0, len(records), 5000):  # the processor's batch size
            async with conn.transaction():
                await conn.copy_records_to_table("e2e_copy_ceiling", records=records[i:i + 5000],
                                                 columns=cols)
        dt = time.perf_counter() - t
        await conn.execute("drop table e2e_copy_ceiling")
    finally:
        await conn.close()
    return {"rows": len(records), "rows_per_s": round(len(records) / dt, 1) if dt else None}


# --- soak ------------------------------------------------------------------------------------
async def soak(city: City, fleet: Path, rate: float, seconds: float, start_ms: int,
               probes: Probes, workdir: Path, publishers: int) -> dict[str, Any]:
    sampler = ResourceSampler(city_pids(city), interval=5.0).start()
    try:
        step = await run_step(city, fleet, rate, seconds, start_ms, 5000, probes, sampler,
                              drain_s=10.0, workdir=workdir, publishers=publishers)
    finally:
        sampler.stop()
    t0 = sampler.samples[0][0] if sampler.samples else 0.0
    series: dict[str, list[tuple[float, float]]] = {}
    for t, rss, _ in sampler.samples:
        for name, v in rss.items():
            series.setdefault(name, []).append((round(t - t0, 1), round(v / 2**20, 1)))
    slopes = {}
    for name, pts in series.items():
        half = [p for p in pts if p[0] >= seconds / 2 and p[0] <= seconds]
        if len(half) >= 3:
            x = np.array([p[0] for p in half]) / 60
            y = np.array([p[1] for p in half])
            slopes[name] = round(float(np.polyfit(x, y, 1)[0]), 3)
    return {"rate": rate, "seconds": seconds, "step": step, "rss_mib": series,
            "rss_slope_second_half_mib_per_min": slopes}


# --- plots ------------------------------------------------------------------------------------
def plot(result: dict[str, Any], prefix: str, out: Path = RESULTS) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    steps = result.get("steps", [])
    label = (f"{result['config']['mode']} messages, {result['config']['ingest']} ingest + "
             f"{result['config']['process']} processor(s), 2 cores shared, {result['date']}")

    def save(fig: Any, path: Path) -> None:
        """Footnote (configuration and date), write the PNG, list it."""
        fig.text(0.01, 0.01, label, fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))
    if steps:
        offered = [s["offered_msgs_per_s"] for s in steps]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(offered, offered, "k:", label="offered")
        ax.plot(offered, [s["publish_rate"] for s in steps], "o-", label="published")
        ax.plot(offered, [s["e2e_msgs_per_s"] or 0 for s in steps], "s-",
                label="stored end to end (msg/s)")
        for s in steps:
            if not s["keeps_up"]:
                ax.annotate("falls behind", (s["offered_msgs_per_s"], s["e2e_msgs_per_s"] or 0),
                            textcoords="offset points", xytext=(-30, -15), fontsize=8)
        ceil = result.get("ceilings", {}).get("mqtt_pubsub", {}).get("msgs_per_s")
        if ceil:
            ax.axhline(ceil, color="grey", ls="--", label=f"bare MQTT pub/sub ceiling {ceil:,.0f}")
        ax.set_xlabel("offered rate (messages/s)")
        ax.set_ylabel("messages/s")
        ax.set_title("cityops end to end: throughput vs offered rate", fontsize=10)
        ax.legend(fontsize=8)
        save(fig, out / f"{prefix}_throughput.png")

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, style, name in (("latency_stored_ms", "-", "publish→stored"),
                                 ("latency_alert_ms", "--", "publish→alert")):
            for p, marker in (("p50", "o"), ("p95", "s"), ("p99", "^")):
                ys = [s[key][p] for s in steps]
                ax.plot(offered, [y if y is not None else float("nan") for y in ys],
                        marker=marker, ls=style, label=f"{name} {p}")
        ax.axhline(500, color="red", lw=0.8, ls=":", label="alert p99 target 500 ms")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (messages/s)")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title("cityops end to end: latency percentiles", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        save(fig, out / f"{prefix}_latency.png")
    if result.get("soak"):
        sk = result["soak"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, pts in sorted(sk["rss_mib"].items()):
            ax.plot([p[0] / 60 for p in pts], [p[1] for p in pts], label=name)
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS (MiB, process tree)")
        ax.set_title(f"cityops soak at {sk['rate']:,.0f} msg/s: memory per service",
                     fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        save(fig, out / (f"{prefix}_memory.png" if prefix.endswith("_soak")
                         else f"{prefix}_soak_memory.png"))
    return made


# --- main ---------------------------------------------------------------------------------------
async def enable_commit_timestamps(city: City) -> None:
    """Commit timestamps give each stored row its exact commit time (publish->stored)."""
    conn = await asyncpg.connect(city.settings.pg_dsn)
    try:
        on = await conn.fetchval("show track_commit_timestamp")
        if on != "on":
            await conn.execute("alter system set track_commit_timestamp = on")
    finally:
        await conn.close()
    if on != "on":
        pg = city.stack.server("postgres")
        pg.down()
        pg.up()


def per_reading(step: dict[str, Any]) -> dict[str, Any]:
    """A step's three hot-path figures for the summary (issue 15's targets)."""
    hot, cpu = step["hot_path"], step["cpu"]
    return {"offered_msgs_per_s": step["offered_msgs_per_s"], "keeps_up": step["keeps_up"],
            "db_row_writes_per_reading": hot["db_row_writes_per_reading"],
            "kafka_records_per_msg": hot["kafka_records_per_msg"],
            "cpu_us_per_reading": cpu.get("total_us_per_reading")}


def machine() -> dict[str, Any]:
    load1, load5, _ = os.getloadavg()
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "memory_gib": round(psutil.virtual_memory().total
                                                                  / 2**30, 1),
            "load_avg_1m_at_start": round(load1, 2), "load_avg_5m_at_start": round(load5, 2)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    overrides = ({"kafka_retention_ms": int(args.kafka_retention_s * 1000)}
                 if args.kafka_retention_s else {})
    city = City(ingest=args.ingest, process=args.process, alerts=1, prefix="cityops-bench-e2e-",
                **overrides)
    workdir = city.state / "bench"
    workdir.mkdir()
    fleet = scaled_fleet(city.state / "fleet.toml", args.scale, args.mode, args.gateway_size)
    city.settings = city.settings.replace(fleet_file=fleet)
    city.stack.settings = city.settings
    for server in city.stack.servers:
        server.settings = city.settings
    city.pipeline.settings = city.settings
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "config": {"ingest": args.ingest, "process": args.process, "alerts": 1,
                   "publishers": args.publishers,
                   "mode": args.mode, "fleet_scale": args.scale,
                   "gateway_size": args.gateway_size if args.mode == "gateway" else None,
                   "step_s": args.step_s, "drain_s": args.drain_s, "rates": rates,
                   "stats_settle_s": args.stats_settle_s},
        "method": __doc__.split("\n\n")[1].strip() if __doc__ else "",
        "steps": [], "ceilings": {},
    }
    try:
        city.stack.up()
        await enable_commit_timestamps(city)
        fl = load_fleet(fleet)
        per_sim_s = Simulation(fl, seed=1, start_ms=0).messages_per_sim_second()
        result["config"]["sensors"] = len(fl)
        result["config"]["messages_per_sim_second"] = round(per_sim_s, 1)
        if args.ceilings:
            print("ceiling: bare MQTT pub/sub loop...", flush=True)
            result["ceilings"]["mqtt_pubsub"] = await asyncio.to_thread(
                mqtt_ceiling, city.settings, fleet, args.ceiling_messages, workdir,
                args.publishers)
            print(f"  {result['ceilings']['mqtt_pubsub']}", flush=True)
        city.start()
        lanes = [s for s in fl if s.vendor == "saomai" and s.type == "lane_detector"
                 and s.gateway is None][:50]
        if not lanes:  # gateway mode: the probes still go straight to the broker
            lanes = [s for s in fl if s.vendor == "saomai" and s.type == "lane_detector"][:50]
        panic = [s for s in fl if s.type == "panic_button"]
        probes = Probes(city.settings, lanes, panic)
        # Steps never share simulated time (no accidental event-id collisions); the whole
        # run sits in the last ``span`` before now, each step ending where the next begins.
        spans = [r * args.step_s / per_sim_s * 1000 for r in rates]
        soak_rate = args.soak_rate
        total = sum(spans)
        if total > 20 * 3600 * 1000:
            raise SystemExit(f"the run spans {total / 3.6e6:.1f} simulated hours: raise --scale")
        cursor = int(time.time() * 1000 - total - 60_000) // 1000 * 1000
        # The processor registers the whole fleet as it starts (one upsert per sensor);
        # PostgreSQL may report those writes up to 10 s later, into the first step's
        # counters, unless they settle first (bench/e2e/counters.py).
        await asyncio.sleep(args.stats_settle_s)
        sampler = ResourceSampler(city_pids(city), interval=0.5).start()
        try:
            for i, (rate, span) in enumerate(zip(rates, spans, strict=True)):
                print(f"step {i + 1}/{len(rates)}: {rate:,.0f} msg/s for {args.step_s:.0f} s",
                      flush=True)
                step = await run_step(city, fleet, rate, args.step_s, cursor, 10 + i, probes,
                                      sampler, args.drain_s, workdir, args.publishers,
                                      args.stats_settle_s,
                                      profile_dir=args.out_dir if args.profile else None)
                cursor += int(span) + 1000
                result["steps"].append(step)
                print("  " + json.dumps({k: step[k] for k in (
                    "publish_rate", "e2e_msgs_per_s", "e2e_rows_per_s", "keeps_up", "lost",
                    "duplicates", "drained_after_publish_s")}) + "\n  stored "
                    + json.dumps(step["latency_stored_ms"]) + "\n  alert  "
                    + json.dumps(step["latency_alert_ms"]) + "\n  cpu    "
                    + json.dumps(step["cpu"]) + "\n  hot    "
                    + counters.summary_line(step["hot_path"], step["cpu"]), flush=True)
                if not step["keeps_up"] and not args.all_steps:
                    break
        finally:
            sampler.stop()
        kept = [s for s in result["steps"] if s["keeps_up"]]
        best = max(kept, key=lambda s: s["e2e_msgs_per_s"] or 0) if kept else None
        if args.soak:
            rate = soak_rate or (best["e2e_msgs_per_s"] / 2 if best else 1000.0)
            print(f"soak: {rate:,.0f} msg/s for {args.soak:.0f} s", flush=True)
            # Placed now, at its real rate: it ends about now, after every step's stretch.
            soak_span = rate * args.soak / per_sim_s * 1000
            if soak_span > 20 * 3600 * 1000:
                raise SystemExit("the soak spans more than 20 simulated hours: raise --scale")
            # The simulated clock runs faster than the wall clock (rate / messages per
            # simulated second): the soak must END by now, or its readings run ahead of the
            # clock and ingest rightly refuses them (in_future). After steps, it must also
            # begin after their stretch.
            start = int(time.time() * 1000 - soak_span - 60_000) // 1000 * 1000
            if result["steps"] and start < cursor:
                raise SystemExit("the soak's simulated stretch would overlap the steps': run "
                                 "it alone (--rates '') or raise --scale")
            result["soak"] = await soak(city, fleet, rate, args.soak, start, probes, workdir,
                                        args.publishers)
            print("  RSS slope, second half (MiB/min): "
                  + json.dumps(result["soak"]["rss_slope_second_half_mib_per_min"]), flush=True)
        city.pipeline.stop_all()
        if args.ceilings and result["steps"]:
            print("ceiling: raw asyncpg COPY...", flush=True)
            result["ceilings"]["asyncpg_copy"] = await copy_ceiling(city.settings)
            print(f"  {result['ceilings']['asyncpg_copy']}", flush=True)
        mq = result["ceilings"].get("mqtt_pubsub", {}).get("msgs_per_s")
        cp = result["ceilings"].get("asyncpg_copy", {}).get("rows_per_s")
        result["summary"] = {
            "best_sustained_msgs_per_s": best["e2e_msgs_per_s"] if best else None,
            "best_sustained_rows_per_s": best["e2e_rows_per_s"] if best else None,
            "at_offered": best["offered_msgs_per_s"] if best else None,
            "ratio_to_mqtt_pubsub_ceiling": round(best["e2e_msgs_per_s"] / mq, 3)
            if best and mq else None,
            "ratio_rows_to_asyncpg_copy_ceiling": round(best["e2e_rows_per_s"] / cp, 3)
            if best and cp else None,
            "first_step_falling_behind": next((s["offered_msgs_per_s"] for s in result["steps"]
                                               if not s["keeps_up"]), None),
            "per_reading": [per_reading(s) for s in result["steps"]],
        }
        result["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
        result["machine"]["other_processes_cpu_percent_at_end"] = round(
            psutil.cpu_percent(interval=1.0), 1)
    finally:
        _kill_publishers()
        with contextlib.suppress(Exception):
            city.stop()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ingest", type=int, default=1, help="ingest workers (1)")
    p.add_argument("--process", type=int, default=1, help="processor workers (1)")
    p.add_argument("--publishers", type=int, default=2,
                   help="simulator processes, each publishing one shard of the fleet (2)")
    p.add_argument("--mode", choices=("single", "gateway"), default="single",
                   help="single-reading messages, or gateway batches")
    p.add_argument("--gateway-size", type=int, default=25,
                   help="sensors per gateway in gateway mode (25)")
    p.add_argument("--scale", type=int, default=4,
                   help="fleet = load fleet x SCALE (4: 31,520 sensors); more sensors = less "
                        "simulated time per message, so long runs stay inside ingest's window")
    p.add_argument("--rates", default="1000,2000,4000,8000,12000,16000,20000",
                   help="offered rates, messages/s, comma separated ('' = none)")
    p.add_argument("--step-s", type=float, default=20.0, help="seconds of load per step (20)")
    p.add_argument("--stats-settle-s", type=float, default=counters.STATS_SETTLE_S,
                   help="wait after each step before reading PostgreSQL's table counters "
                        f"({counters.STATS_SETTLE_S:g}: an idle backend reports within 10 s)")
    p.add_argument("--drain-s", type=float, default=5.0,
                   help="a step keeps up if its backlog drains this soon after publishing (5)")
    p.add_argument("--all-steps", action="store_true",
                   help="run every rate, not stopping at the first that falls behind")
    p.add_argument("--soak", type=float, default=0.0, help="soak seconds after the steps (0)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the ingest, processor and alerts workers in every step: top "
                        "functions in the JSON, collapsed stacks beside it")
    p.add_argument("--soak-rate", type=float, default=None,
                   help="soak rate (default: half the best sustained rate)")
    p.add_argument("--kafka-retention-s", type=float, default=None,
                   help="local topic retention (default: the settings' kafka_retention_ms); "
                        "a shorter one bounds the broker's disk and page cache in a soak")
    p.add_argument("--no-ceilings", dest="ceilings", action="store_false")
    p.add_argument("--ceiling-messages", type=int, default=100_000)
    p.add_argument("--out", default=None, help="result name under bench/results (e2e)")
    p.add_argument("--out-dir", type=Path, default=RESULTS,
                   help="folder for the JSON and plots (bench/results); a smoke run can "
                        "write elsewhere and leave the recorded results alone")
    args = p.parse_args()
    name = args.out or ("e2e_soak" if args.soak and not args.rates else
                        "e2e" if args.mode == "single" else "e2e_gateway")
    # SIGTERM (timeout, kill) stops the run like Ctrl-C: publishers and the stack go too.
    # Only the first signal interrupts: a second one must not cut the clean-up short.
    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    result = asyncio.run(main_async(args))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(result, name, args.out_dir)
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result.get("summary", {}), indent=1))
    print(f"wrote {args.out_dir / name}.json and {', '.join(result['plots'])}")


if __name__ == "__main__":
    main()
