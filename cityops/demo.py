"""``cityops demo``: the whole city on the local stack, with a live one-line status.

Starts the stack (if it is not up), one worker of each service, seeds the console's
demo accounts, then runs the simulators with the default fleet, rotating through
the scenarios so operators see congestion, crowds and intrusions come and go. The
status line reads every service's own ``/metrics``. Ctrl-C stops the workers and
the servers this command started, cleanly.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cityops.settings import CREDENTIALS_FILE, PROJECT_ROOT, Settings
from cityops.supervisor import Pipeline, Worker, metric_sum, scrape

# The city runs in real time (sensor clocks are the wall clock, as ingest expects), so each
# turn switches on scenarios that act at once; gridlock and intrusion act only in their own
# hours (rush hours, night in Can Tho), as they would in the real city.
ROTATION: tuple[tuple[str, ...], ...] = (
    ("accident:after=0s", "gridlock", "intrusion"),
    ("festival", "offline:after=0s,share=0.02", "duplicates"),
    ("stuck:after=0s,share=0.03", "disorder", "skew", "intrusion"),
)
LOAD_FLEET = PROJECT_ROOT / "simulators" / "fleets" / "load.toml"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", type=Path, default=LOAD_FLEET,
                        help="fleet file (default: simulators/fleets/load.toml, ~7,900 sensors, "
                             "~120 messages/s in real time)")
    parser.add_argument("--rotate", type=float, default=180.0,
                        help="seconds between scenario changes (180)")
    parser.add_argument("--malformed-share", type=float, default=0.01,
                        help="share of deliberately malformed payloads (0.01)")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="stop after this many seconds (0 = until Ctrl-C)")
    parser.add_argument("--keep-stack", action="store_true",
                        help="leave the servers running on exit")


@dataclass
class _Rates:
    t: float = 0.0
    messages: float = 0.0
    rows: float = 0.0


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cityops.stack import Stack

    # Every service must know the same fleet: ingest refuses sensors it has never heard of.
    settings = settings.replace(fleet_file=args.fleet.resolve())
    stack = Stack(settings)
    print("cityops demo: starting the stack (Mosquitto, Kafka broker, PostgreSQL, Prometheus)...")
    started = stack.up()
    # The stack settled the installation's generated secrets (credentials.toml): every
    # worker gets those, never the well-known defaults.
    settings = stack.settings
    pipeline = Pipeline(settings)
    seed = subprocess.run([sys.executable, "-m", "cityops.cli", "console", "--seed-dev-users"],
                          env=pipeline.env_for(Worker("console", 0, settings.console_port)),
                          capture_output=True, text=True, check=False)
    if seed.returncode != 0:
        print(f"cityops demo: could not seed console users:\n{seed.stderr}", file=sys.stderr)
        return 1
    for service in ("process", "alerts", "ingest", "console"):
        pipeline.add(service)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        print("cityops demo: starting ingest, processor, alerts and console...")
        pipeline.start_all(wait_healthy=90)
        url = f"http://{settings.host}:{settings.console_port}/"
        from alerts.console.cli import dev_user_passwords

        passwords = dev_user_passwords(settings)
        logins = ", ".join(f"{n} / {pw}" for n, pw in passwords.items() if n != "wall")
        print(f"\n  Console:    {url}   ({logins})")
        print(f"  Wallboard:  {url}wall   (wall / {passwords['wall']}; for the video wall, "
              "1920x1080)")
        print(f"  API docs:   {url}docs")
        print(f"  Prometheus: http://{settings.host}:{settings.prometheus_port}/")
        dsn = settings.pg_dsn.replace(f":{settings.pg_password}@", ":***@", 1)
        print(f"  Database:   {dsn}   (generated passwords: "
              f"{settings.state_dir / CREDENTIALS_FILE})")
        print("  Ctrl-C stops the demo.\n")
        _loop(args, settings, pipeline, lambda: stop)
    finally:
        print("\ncityops demo: stopping services...")
        pipeline.stop_all()
        if started and not args.keep_stack:
            print(f"cityops demo: stopping the servers it started ({', '.join(started)})")
            for server in reversed(stack.servers):
                if server.name in started:
                    server.down()
    return 0


def _loop(args: argparse.Namespace, settings: Settings, pipeline: Pipeline,
          stopped: object) -> None:
    t_start = time.monotonic()
    next_rotation = t_start
    turn = 0
    sim: Worker | None = None
    last = _Rates(t=time.monotonic())
    assert callable(stopped)
    while not stopped():
        now = time.monotonic()
        if args.duration and now - t_start >= args.duration:
            break
        if now >= next_rotation:
            scenarios = ROTATION[turn % len(ROTATION)]
            sim = _start_simulator(args, pipeline, sim, scenarios, seed=turn + 1)
            print(f"\n[scenarios] {', '.join(scenarios)}", flush=True)
            turn += 1
            next_rotation = now + args.rotate
        last = _status(settings, pipeline, last)
        time.sleep(2.0)


def _start_simulator(args: argparse.Namespace, pipeline: Pipeline, old: Worker | None,
                     scenarios: tuple[str, ...], seed: int) -> Worker:
    sim_args = ["--speed", "1", "--seed", str(seed), "--start", "now",
                "--malformed-share", str(args.malformed_share), "--no-progress"]
    for s in scenarios:
        sim_args += ["--scenario", s]
    (worker,) = pipeline.add("simulate", args=sim_args)
    pipeline.start(worker)
    if old is not None:  # the next turn starts before the last stops: no gap in the feed
        pipeline.wait_healthy(30, [worker])
        pipeline.kill(old, signal.SIGTERM)
        pipeline.workers.remove(old)
    return worker


def _status(settings: Settings, pipeline: Pipeline, last: _Rates) -> _Rates:
    """Print one status line from the services' own /metrics pages."""
    host = settings.host
    samples: dict[str, float] = {}
    for w in pipeline.workers:
        for k, v in scrape(host, w.port).items():
            samples[k] = samples.get(k, 0.0) + v
    now = time.monotonic()
    cur = _Rates(now, metric_sum(samples, "cityops_ingest_messages_total"),
                 metric_sum(samples, "cityops_process_rows_written_total"))
    dt = max(now - last.t, 1e-6)
    rate_in = (cur.messages - last.messages) / dt if last.messages else 0.0
    rate_out = (cur.rows - last.rows) / dt if last.rows else 0.0
    lag = metric_sum(samples, "cityops_process_consumer_lag")
    alerts = metric_sum(samples, "cityops_alerts_active")
    dead = metric_sum(samples, "cityops_ingest_rejections_total")
    down = [w.name for w in pipeline.workers if not w.alive]
    line = (f"in {rate_in:7.0f} msg/s | stored {rate_out:8.0f} rows/s | lag {lag:6.0f} | "
            f"dead letters {dead:6.0f} | open alerts {alerts:4.0f}"
            + (f" | DOWN: {', '.join(down)}" if down else ""))
    print("\r" + line, end="", flush=True)
    return cur
