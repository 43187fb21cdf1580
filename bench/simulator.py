"""Benchmark: the simulator's maximum publish rate against a plain paho publish loop.

Both publish to a real Mosquitto (an isolated stack started here, Mosquitto only) while a
``mosquitto_sub`` process counts what arrives, so a rate is only reported for messages
that reached the broker and came out again. The baselines publish the simulator's own
pre-built messages (same topics, same sizes) in the tightest loop paho allows:

* ``plain_thread``: ``loop_start()`` and ``publish()`` in a for loop (what most code does;
  a 1,000-message window at QoS 1, or paho loses messages once ids wrap);
* ``plain_driven``: no network thread, ``publish()`` plus ``loop(0)`` every 64 messages
  (the technique the simulator's publisher uses).

The simulator run is the real path: ``publish_blocking`` with its generator process,
pacing disabled (``rate=1e9``), ground truth off. Runs are interleaved and repeated, and
medians reported, because the machine has 2 cores shared with other work: absolute
numbers are noisy, the ratios are the result. CPU time per message (this process plus
the generator process) is reported too: it is much less sensitive to other load.

    .venv/bin/python bench/simulator.py [--messages 50000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cityops.settings import Settings
from cityops.stack import Stack
from simulators.publisher import publish_blocking
from simulators.simulation import Simulation
from tests.support import injector, isolated_settings

RESULTS = Path(__file__).resolve().parent / "results" / "simulator.json"
START = 1_795_395_600_000  # 2026-11-23 07:00 Can Tho time


class Arrivals:
    """``mosquitto_sub`` printing one ``x`` line per message under the city tree (QoS 1)."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.path = tmp / "arrivals.txt"
        self._fh = self.path.open("wb")
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", "-h", settings.host, "-p",
             str(settings.mqtt_port), "-i", "bench-counter", "-u", settings.mqtt_admin_user,
             "-P", settings.mqtt_admin_password, "-t", "city/#", "-q", "1", "-F", "x"],
            stdout=self._fh, stderr=subprocess.STDOUT)
        # subscribed once a probe message comes through
        probe = _client(settings, "bench-probe")
        probe.connect(settings.host, settings.mqtt_port)
        probe.loop_start()
        deadline = time.monotonic() + 10
        while self.count() == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("subscriber receives nothing")
            probe.publish("city/bench/probe", b"probe", 1)
            time.sleep(0.2)
        probe.disconnect()
        probe.loop_stop()
        time.sleep(0.3)
        self.base = self.count()

    def count(self) -> int:
        return self.path.read_bytes().count(b"x")

    def wait_for(self, n: int, timeout: float = 60.0) -> int:
        target = self.base + n
        deadline = time.monotonic() + timeout
        seen = self.count()
        while seen < target and time.monotonic() < deadline:
            time.sleep(0.1)
            seen = self.count()
        time.sleep(0.2)
        seen = self.count()
        got = seen - self.base
        self.base = seen
        return got

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self._fh.close()


def _cpu() -> float:
    """CPU seconds of this process and of its reaped children (the generator process)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _client(settings: Settings, name: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    c.username_pw_set(*injector(settings))  # one account for the whole fleet's topics
    c.max_inflight_messages_set(1000)
    return c


def plain_thread(settings: Settings, msgs: list[tuple[str, bytes]], qos: int) -> float:
    c = _client(settings, "bench-plain-thread")
    done = [0]
    window = threading.BoundedSemaphore(1000)

    def on_publish(*_: object) -> None:
        done[0] += 1
        if qos:
            window.release()

    c.on_publish = on_publish
    c.connect(settings.host, settings.mqtt_port)
    c.loop_start()
    while not c.is_connected():
        time.sleep(0.01)
    t0 = time.perf_counter()
    for topic, payload in msgs:
        if qos:
            window.acquire()
        c.publish(topic, payload, qos)
    while done[0] < len(msgs):
        time.sleep(0.001)
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return len(msgs) / elapsed


def plain_driven(settings: Settings, msgs: list[tuple[str, bytes]], qos: int) -> float:
    c = _client(settings, "bench-plain-driven")
    done = [0]
    c.on_publish = lambda *_: done.__setitem__(0, done[0] + 1)
    c.connect(settings.host, settings.mqtt_port)
    while not c.is_connected():
        c.loop(0.05)
    t0 = time.perf_counter()
    sent = 0
    for topic, payload in msgs:
        while sent - done[0] >= 1000:
            c.loop(0.01)
        c.publish(topic, payload, qos)
        sent += 1
        if not sent & 63:
            c.loop(0)
    while done[0] < sent:
        c.loop(0.01)
    elapsed = time.perf_counter() - t0
    c.disconnect()
    return len(msgs) / elapsed


def simulator(settings: Settings, n: int, qos: int, seed: int) -> tuple[float, dict]:
    sim = Simulation(seed=seed, start_ms=START, malformed_share=0.0)
    stats = publish_blocking(sim, settings, rate=1e9, pace_clock=False, count=n, qos=qos,
                             inflight=1000, progress=False, client_id="bench-simulator")
    assert stats.sent == n and stats.errors == 0, stats.as_dict()
    # the rate until the last message was acknowledged/written, like the baselines
    return stats.sent / stats.extra["elapsed_with_drain_s"], stats.as_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.messages

    tmp = Path(tempfile.mkdtemp(prefix="cityops-bench-sim-",
                                dir=os.environ.get("CITYOPS_TEST_TMP")))
    tmp.chmod(0o755)
    settings = isolated_settings(tmp)
    stack = Stack(settings)
    stack.up(["mqtt"])
    results: dict = {"messages_per_run": n, "repeat": args.repeat, "cores": os.cpu_count(),
                     "load_before": os.getloadavg()}
    try:
        # generation alone, no MQTT
        t0 = time.perf_counter()
        msgs = [(m.topic, m.payload) for m in
                Simulation(seed=7, start_ms=START).messages(n)]
        gen_rate = n / (time.perf_counter() - t0)
        results["generation_msgs_per_s"] = round(gen_rate)
        results["mean_payload_bytes"] = round(sum(len(p) for _, p in msgs) / n, 1)
        arrivals = Arrivals(settings, tmp)
        runs: dict[str, dict[int, list[float]]] = {k: {0: [], 1: []} for k in
                                                    ("simulator", "plain_thread", "plain_driven")}
        cpu: dict[str, dict[int, list[float]]] = {k: {0: [], 1: []} for k in runs}
        lost: dict[str, int] = {}
        for rep in range(args.repeat):
            for qos in (0, 1):
                for name in ("simulator", "plain_thread", "plain_driven"):
                    cpu0 = _cpu()
                    if name == "simulator":
                        rate, _ = simulator(settings, n, qos, seed=7)
                    elif name == "plain_thread":
                        rate = plain_thread(settings, msgs, qos)
                    else:
                        rate = plain_driven(settings, msgs, qos)
                    cpu[name][qos].append((_cpu() - cpu0) / n * 1e6)
                    got = arrivals.wait_for(n)
                    lost[f"{name}_qos{qos}_rep{rep}"] = n - got
                    if got != n and qos == 1:
                        raise RuntimeError(f"{name} QoS 1 lost {n - got} of {n} messages")
                    runs[name][qos].append(rate)
                    print(f"rep {rep} qos {qos} {name:<13} {rate:>9,.0f} msg/s  "
                          f"arrived {got}/{n}", flush=True)
        arrivals.close()
        med = {name: {q: statistics.median(v) for q, v in by_q.items()}
               for name, by_q in runs.items()}
        results["runs_msgs_per_s"] = {k: {f"qos{q}": [round(x) for x in v]
                                          for q, v in by_q.items()} for k, by_q in runs.items()}
        results["median_msgs_per_s"] = {k: {f"qos{q}": round(v) for q, v in by_q.items()}
                                        for k, by_q in med.items()}
        results["ratio_simulator_vs_plain_thread"] = {
            f"qos{q}": round(med["simulator"][q] / med["plain_thread"][q], 2) for q in (0, 1)}
        results["ratio_simulator_vs_plain_driven"] = {
            f"qos{q}": round(med["simulator"][q] / med["plain_driven"][q], 2) for q in (0, 1)}
        results["ratio_generation_vs_plain_thread_qos0"] = round(
            gen_rate / med["plain_thread"][0], 2)
        cpu_med = {name: {q: statistics.median(v) for q, v in by_q.items()}
                   for name, by_q in cpu.items()}
        results["median_cpu_us_per_msg"] = {k: {f"qos{q}": round(v, 1) for q, v in by_q.items()}
                                            for k, by_q in cpu_med.items()}
        results["ratio_cpu_per_msg_simulator_vs_plain_driven"] = {
            f"qos{q}": round(cpu_med["simulator"][q] / cpu_med["plain_driven"][q], 2)
            for q in (0, 1)}
        results["messages_not_arrived"] = lost
        results["load_after"] = os.getloadavg()
        results["note"] = ("2 shared cores, other work running: absolute msg/s are noisy; "
                           "compare the ratios (medians of interleaved runs).")
    finally:
        stack.down()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    keys = ("ratio", "median", "generation")
    print(json.dumps({k: v for k, v in results.items() if k.startswith(keys)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
