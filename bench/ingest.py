"""Ingest throughput: MQTT -> normalized events -> Kafka acknowledged, against a bare
aiomqtt subscribe loop measured in the same run on the same broker.

Method (the same for every contender, so the ratios are fair): a persistent MQTT session
subscribes and goes offline; the messages are published and Mosquitto queues them for
it; then the contender connects and drains the backlog. The clock runs from its
connection (for ingest workers: from spawn, less their start-up time measured on an
empty session in the same run; see ``ingest_workers``) to the last message handled: for the
bare loops "received", for ingest "events acknowledged by Kafka" (every message of the
run must end as events or dead letters; the run fails otherwise). The publisher never
competes for CPU with the contender this way.

Contenders:
  aiomqtt-loop   ``async for m in client.messages: n += 1`` (QoS 1, auto-ack): the baseline
  paho-loop      paho's callback counting in its network thread: the client ceiling
  ingest ...     ``python -m ingest`` worker processes (1 or 2 on one shared subscription),
                 with the lean ``asyncio`` MQTT transport unless the name says otherwise

Each run also reports CPU seconds: the contender's own, and Mosquitto's plus the Kafka
broker's (``broker_cpu_s``; the local broker is Apache Kafka on the same machine), since on
2 cores they all compete.

Usage: ``.venv/bin/python bench/ingest.py [--messages 100000] [--gateways 2000]
[--only "paho-loop single,ingest x1 single"] [--out file.json]``
Starts its own Mosquitto and Kafka broker on free ports (stopped at the end); writes
``bench/results/ingest.json``. The machine has 2 cores shared with the broker, Mosquitto
and whatever else runs: absolute numbers are noisy, the ratios less so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiomqtt
import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from cityops.registry import load_fleet
from cityops.settings import PROJECT_ROOT, Settings
from cityops.stack import Stack
from ingest import samples
from ingest.mqtt import connect_properties, subscription
from tests.support import free_port, isolated_settings
from tests.test_ingest_service import publish_all, worker_env

RESULTS = PROJECT_ROOT / "bench" / "results" / "ingest.json"


class Clock:
    """Reading times one second apart per sensor (compact sensors report whole seconds),
    the last a minute ago: every reading of a run is a distinct event, none in the future."""

    def __init__(self, sensor_sequence: list[str]) -> None:
        counts: dict[str, int] = {}
        for sid in sensor_sequence:
            counts[sid] = counts.get(sid, 0) + 1
        self.t0 = int(time.time() * 1000) - 60_000 - max(counts.values(), default=0) * 1000
        self.seen: dict[str, int] = {}

    def next(self, sensor_id: str) -> int:
        r = self.seen[sensor_id] = self.seen.get(sensor_id, -1) + 1
        return self.t0 + r * 1000


def single_messages(n: int) -> list[tuple[str, bytes]]:
    fleet = load_fleet(Settings().fleet_file)
    direct = [s for s in fleet if s.gateway is None]
    sensors = [direct[i % len(direct)] for i in range(n)]
    clock = Clock([s.sensor_id for s in sensors])
    return [samples.device_message(s, clock.next(s.sensor_id)) for s in sensors]


def gateway_messages(n: int, per: int) -> list[tuple[str, bytes]]:
    """``n`` gateway batches of ``per`` readings from the fleet's gateway members."""
    fleet = load_fleet(Settings().fleet_file)
    gws = list(fleet.gateways().items())
    plan = [(gws[k % len(gws)], [gws[k % len(gws)][1][j % len(gws[k % len(gws)][1])]
                                 for j in range(per)]) for k in range(n)]
    clock = Clock([s.sensor_id for _, sensors in plan for s in sensors])
    return [samples.gateway_message(gw, members, clock.t0,
                                    readings=[samples.reading(s, clock.next(s.sensor_id))
                                              for s in sensors])
            for (gw, members), sensors in plan]


def client_id(contender: str, worker_id: str) -> str:
    return worker_id if "loop" in contender else f"cityops-ingest-{worker_id}"


def register_session(settings: Settings, client_id: str) -> None:
    """Create the persistent session (with its shared subscription) and leave it offline."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.username_pw_set(settings.mqtt_ingest_user, settings.mqtt_ingest_password)
    done = threading.Event()
    c.on_subscribe = lambda *_: done.set()
    c.connect(settings.host, settings.mqtt_port, clean_start=True,
              properties=connect_properties(settings))
    c.loop_start()
    c.subscribe(subscription(settings), qos=1)
    assert done.wait(10)
    c.disconnect()
    c.loop_stop()


def drop_session(settings: Settings, client_id: str) -> None:
    """End a contender's persistent session, so later runs' messages are not queued for it
    (every share group gets its own copy of each message)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.username_pw_set(settings.mqtt_ingest_user, settings.mqtt_ingest_password)
    c.connect(settings.host, settings.mqtt_port, clean_start=True)  # no expiry: gone at close
    c.loop_start()
    time.sleep(0.2)
    c.disconnect()
    c.loop_stop()


async def aiomqtt_loop(settings: Settings, client_id: str, n: int) -> float:
    async with aiomqtt.Client(settings.host, settings.mqtt_port,
                              username=settings.mqtt_ingest_user,
                              password=settings.mqtt_ingest_password, identifier=client_id,
                              protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                              properties=connect_properties(settings)) as client:
        t = time.perf_counter()
        got = 0
        async for _ in client.messages:
            got += 1
            if got == n:
                return time.perf_counter() - t
    raise AssertionError("unreachable")


def cpu_seconds(proc: psutil.Process | None = None) -> float:
    c = (proc or psutil.Process()).cpu_times()
    return c.user + c.system


def paho_loop(settings: Settings, client_id: str, n: int) -> float:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.username_pw_set(settings.mqtt_ingest_user, settings.mqtt_ingest_password)
    got = [0]
    done = threading.Event()

    def on_message(*_: object) -> None:
        got[0] += 1
        if got[0] == n:
            done.set()
    c.on_message = on_message
    t = time.perf_counter()
    c.connect(settings.host, settings.mqtt_port, clean_start=False,
              properties=connect_properties(settings))
    c.loop_start()
    assert done.wait(600)
    elapsed = time.perf_counter() - t
    c.disconnect()
    c.loop_stop()
    return elapsed


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        out = {}
        for line in r.read().decode().splitlines():
            if line.startswith("cityops_ingest_") and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


def ingest_workers(settings: Settings, worker_ids: list[str], n_messages: int,
                   log_dir: Path, transport: str) -> dict:
    """Drain the backlog with ``python -m ingest`` workers; rate and CPU of the drain.

    A worker starts draining the moment it is subscribed, and its ``/healthz`` shares the
    busy event loop, so "healthy" is seen late (after thousands of messages). So the
    clock and the CPU run from spawn to the last message, less what the same workers
    spend to start when there is nothing to drain: measured just before, in the same
    run, by spawning them on fresh sessions until healthy (``startup_s``,
    ``startup_cpu_s`` in the result).
    """
    idle_ids = [f"{w}-idle" for w in worker_ids]
    startup_s, startup_cpu, _, _ = _spawn_and_wait(settings, idle_ids, None, log_dir,
                                                   transport)
    for wid in idle_ids:
        drop_session(settings, f"cityops-ingest-{wid}")
    total_s, total_cpu, stats, _ = _spawn_and_wait(settings, worker_ids, n_messages,
                                                   log_dir, transport)
    elapsed = max(total_s - startup_s, 1e-3)
    events = sum(_events(s) for s in stats)
    rejected = sum(v for k, v in (kv for s in stats for kv in s.items())
                   if k.startswith("cityops_ingest_rejections_total{"))
    shares = [s.get("cityops_ingest_messages_total", 0) for s in stats]
    return {"seconds": round(elapsed, 3), "messages": n_messages, "events": events,
            "rejected": rejected, "messages_per_s": round(n_messages / elapsed),
            "events_per_s": round(events / elapsed), "worker_shares": shares,
            "cpu_s": round(total_cpu - startup_cpu, 2), "startup_s": round(startup_s, 3),
            "startup_cpu_s": round(startup_cpu, 2), "total_s": round(total_s, 3),
            "total_cpu_s": round(total_cpu, 2)}


def _spawn_and_wait(settings: Settings, worker_ids: list[str], n_messages: int | None,
                    log_dir: Path, transport: str
                    ) -> tuple[float, float, list[dict[str, float]], list[int]]:
    """Spawn the workers; wait until all are healthy (``n_messages`` None) or until they
    acknowledged ``n_messages``. Seconds from spawn, their CPU seconds, last metrics."""
    import subprocess

    ports = [free_port() for _ in worker_ids]
    env = worker_env(settings.replace(ingest_transport=transport))
    procs = []
    t_start = time.perf_counter()
    for wid, port in zip(worker_ids, ports, strict=True):
        out = (log_dir / f"{wid}.log").open("wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "ingest", "--worker-id", wid,
                                       "--metrics-port", str(port)],
                                      cwd=PROJECT_ROOT, env=env, stdout=out, stderr=out))
    cpu = [psutil.Process(p.pid) for p in procs]
    stats: list[dict[str, float]] = []
    try:
        while True:
            time.sleep(0.01)
            for p, wid in zip(procs, worker_ids, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(f"worker {wid} exited with {p.returncode}: "
                                       + (log_dir / f"{wid}.log").read_text()[-2000:])
            if n_messages is None:
                if all(healthy(port) for port in ports):
                    break
            else:
                try:
                    stats = [scrape(p) for p in ports]
                except OSError:
                    continue  # not listening yet
                acked = sum(s.get("cityops_ingest_messages_total", 0) for s in stats)
                queued = sum(s.get("cityops_ingest_queue_depth", 0) for s in stats)
                if acked >= n_messages and queued == 0:
                    break
            if time.perf_counter() - t_start > 900:
                raise RuntimeError("workers did not finish within 900 s")
        elapsed = time.perf_counter() - t_start
        cpu_used = sum(cpu_seconds(c) for c in cpu)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    return elapsed, cpu_used, stats, ports


def _events(metrics: dict[str, float]) -> float:
    """Events produced: the counter is labelled by district and domain."""
    return sum(v for k, v in metrics.items() if k.startswith("cityops_ingest_events_total"))


def run(args: argparse.Namespace) -> dict:
    state = Path(tempfile.mkdtemp(prefix="cityops-bench-"))
    state.chmod(0o755)
    settings = isolated_settings(state)
    stack = Stack(settings)
    stack.up(["mqtt", "kafka"])
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "load_avg_at_start": os.getloadavg()},
                     "method": "backlog drain (see bench/ingest.py docstring)", "runs": {}}
    try:
        singles = single_messages(args.messages)
        gateways = gateway_messages(args.gateways, args.per_gateway)

        def contender(name: str, msgs: list[tuple[str, bytes]], n_sessions: int,
                      measure) -> dict:  # type: ignore[no-untyped-def]
            if args.only and name not in args.only:
                return {"messages_per_s": 0, "events_per_s": 0}
            st = settings.replace(mqtt_share_group=f"b-{uuid.uuid4().hex[:6]}")
            # Worker ids; an ingest worker's MQTT client id is ``cityops-ingest-<worker id>``.
            ids = [f"{name.replace(' ', '-')}-{k}-{uuid.uuid4().hex[:6]}"
                   for k in range(n_sessions)]
            for wid in ids:
                register_session(st, client_id(name, wid))
            publish_all(st, msgs, window=1000)
            servers = [psutil.Process(stack.server(k).proc.pid) for k in ("mqtt", "kafka")]
            servers += [c for sp in servers for c in sp.children(recursive=True)]
            broker0 = sum(cpu_seconds(sp) for sp in servers)
            try:
                res = measure(st, ids)
                res["broker_cpu_s"] = round(sum(cpu_seconds(sp) for sp in servers) - broker0, 2)
            except Exception as exc:  # record it and go on with the other contenders
                print(f"{name:<28} FAILED: {exc}", flush=True)
                results["runs"][name] = {"error": str(exc)[-2000:]}
                return {"messages_per_s": 0, "events_per_s": 0}
            finally:
                for wid in ids:
                    drop_session(st, client_id(name, wid))
            res["cpu_us_per_message"] = round(res["cpu_s"] / res["messages"] * 1e6, 1)
            if "events" in res:
                res["cpu_us_per_event"] = round(res["cpu_s"] / max(res["events"], 1) * 1e6, 1)
            print(f"{name:<28} {json.dumps(res)}", flush=True)
            results["runs"][name] = res
            return res

        n = len(singles)

        def bare_aiomqtt(st: Settings, ids: list[str]) -> dict:
            c = cpu_seconds()
            s = asyncio.run(aiomqtt_loop(st, client_id("loop", ids[0]), n))
            return {"seconds": round(s, 3), "messages": n, "messages_per_s": round(n / s),
                    "cpu_s": round(cpu_seconds() - c, 2)}

        def bare_paho(st: Settings, ids: list[str]) -> dict:
            c = cpu_seconds()
            s = paho_loop(st, client_id("loop", ids[0]), n)
            return {"seconds": round(s, 3), "messages": n, "messages_per_s": round(n / s),
                    "cpu_s": round(cpu_seconds() - c, 2)}

        def workers(msgs_count: int, transport: str):  # type: ignore[no-untyped-def]
            return lambda st, ids: ingest_workers(st, ids, msgs_count, state, transport)

        base = contender("aiomqtt-loop single", singles, 1, bare_aiomqtt)
        contender("paho-loop single", singles, 1, bare_paho)
        one = contender("ingest x1 single", singles, 1, workers(n, "asyncio"))
        contender("ingest x1 single paho-thread", singles, 1, workers(n, "paho-thread"))
        contender("ingest x1 single aiomqtt", singles, 1, workers(n, "aiomqtt"))
        two = contender("ingest x2 single", singles, 2, workers(n, "asyncio"))
        g1 = contender("ingest x1 gateways", gateways, 1, workers(len(gateways), "asyncio"))
        g2 = contender("ingest x2 gateways", gateways, 2, workers(len(gateways), "asyncio"))
        b = base["messages_per_s"] or 1  # 0 when --only leaves the baseline out
        results["summary"] = {
            "baseline_aiomqtt_loop_msgs_per_s": b,
            "single_x1_msgs_per_s": one["messages_per_s"],
            "single_x2_msgs_per_s": two["messages_per_s"],
            "single_x1_vs_aiomqtt_loop": round(one["messages_per_s"] / b, 2),
            "single_x2_vs_aiomqtt_loop": round(two["messages_per_s"] / b, 2),
            "gateway_x1_readings_per_s": g1["events_per_s"],
            "gateway_x2_readings_per_s": g2["events_per_s"],
            "gateway_x1_readings_vs_aiomqtt_loop_msgs": round(g1["events_per_s"] / b, 2),
            "gateway_x2_readings_vs_aiomqtt_loop_msgs": round(g2["events_per_s"] / b, 2),
            "cpu_us_per_message": {k: v["cpu_us_per_message"] for k, v in results["runs"].items()
                                   if "cpu_us_per_message" in v},
            "cpu_us_per_event": {k: v["cpu_us_per_event"] for k, v in results["runs"].items()
                                 if "cpu_us_per_event" in v},
            # What one worker would do with a core to itself (1e6 / its CPU us per event):
            # a projection, since on this shared machine the workers got a fraction of a core.
            "cpu_bound_events_per_core_s": {
                k: round(1e6 / v["cpu_us_per_event"]) for k, v in results["runs"].items()
                if v.get("cpu_us_per_event")},
            "targets": {"single_msgs_per_s": 20_000, "gateway_readings_per_s": 150_000},
        }
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=60_000, help="single-reading messages")
    p.add_argument("--gateways", type=int, default=1_200, help="gateway batch messages")
    p.add_argument("--per-gateway", type=int, default=100, help="readings per gateway batch")
    p.add_argument("--only", type=lambda v: v.split(","), default=None,
                   help="comma-separated contender names to run (default: all)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = p.parse_args()
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
