"""``cityops simulate``: publish the simulated Can Tho fleet over MQTT.

Examples::

    cityops simulate --speed 1                        # the city in real time, until Ctrl-C
    cityops simulate --rate 20000 --duration 60 --qos 1 --ground-truth gt.jsonl
    cityops simulate --scenario gridlock --scenario festival --start 2026-11-22T07:00 \\
        --speed 60 --duration 300
    cityops simulate --rate 10000 --count 500000 --shard 0/2 &   # two processes, one fleet
    cityops simulate --rate 10000 --count 500000 --shard 1/2

Timing: messages carry simulated event times. With ``--speed`` (or no ``--rate``) each
message waits for the simulated clock; with ``--rate`` alone the token bucket sets the pace
and the simulated clock follows the stream. Unless ``--start`` is given, the run is
placed so that its simulated span ends about now (capped at 23 h back), which keeps event
times inside ingest's accepted window (not older than 24 h, not more than 5 min ahead).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cityops.settings import Settings

if TYPE_CHECKING:
    from simulators.publisher import PublishStats
    from simulators.simulation import Simulation

log = logging.getLogger("cityops.simulate")

MAX_BACK_MS = 23 * 3_600_000


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must look like i/n (e.g. 0/2), got {text!r}"
                                         ) from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need n >= 1 and 0 <= i < n")
    return i, n


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("a share is between 0 and 1")
    return value


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    from simulators.scenarios import describe

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.epilog = "scenarios (--scenario NAME[:key=value,...]):\n" + describe()
    parser.add_argument("--fleet", type=Path, default=None,
                        help="fleet file (default: settings.fleet_file, the shipped fleet)")
    parser.add_argument("--scenario", action="append", default=[], metavar="NAME[:k=v,...]",
                        help="switch a scenario on (repeatable); see the list below")
    parser.add_argument("--rate", type=_positive(float), default=None,
                        help="target messages per second (token bucket)")
    run_len = parser.add_mutually_exclusive_group()
    run_len.add_argument("--duration", type=_positive(float), default=None,
                         help="stop after this many seconds")
    run_len.add_argument("--count", type=_positive(int), default=None,
                         help="stop after this many messages")
    parser.add_argument("--seed", type=int, default=1, help="same seed, same stream (1)")
    parser.add_argument("--start", default=None,
                        help="simulated start: now, now-2h, epoch ms, or ISO-8601 (naive = "
                             "Can Tho local time)")
    parser.add_argument("--speed", type=_positive(float), default=None,
                        help="simulated clock factor; paces messages by their send time")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--inflight", type=int, default=1000,
                        help="most messages unacknowledged at once (QoS 1; default 1000)")
    parser.add_argument("--malformed-share", type=_share, default=0.0,
                        help="share of messages corrupted on purpose (0..1)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="i/n",
                        help="publish only shard i of n of the fleet (devices never overlap)")
    parser.add_argument("--ground-truth", type=Path, default=None, metavar="PATH",
                        help="write what was sent, one JSON object per message")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress line on stderr")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="generate in the publishing process (slower)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve /metrics and /healthz here (default: "
                             "settings.simulate_metrics_port + shard index; 0 = off)")


def default_start(now_ms: int, span_ms: float) -> int:
    """Place a run so its simulated span ends about now."""
    return int(now_ms - min(span_ms, MAX_BACK_MS)) // 1000 * 1000


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cityops.registry import FleetError, load_fleet
    from cityops.service import serve_http
    from simulators.clock import parse_start
    from simulators.publisher import PublishError
    from simulators.scenarios import ScenarioError
    from simulators.simulation import Simulation

    pace_clock = args.speed is not None or args.rate is None
    speed = args.speed or 1.0
    try:
        fleet = load_fleet(args.fleet or settings.fleet_file)
        now = int(time.time() * 1000)
        probe = Simulation(fleet, seed=args.seed, start_ms=now, shard=args.shard)
        if args.start is not None:
            start = parse_start(args.start, now)
        else:
            per_s = max(probe.messages_per_sim_second(), 1e-9)
            if args.count is not None:
                span = args.count / per_s * 1000
            elif args.duration is not None:
                span = args.duration * (speed * 1000 if pace_clock else args.rate / per_s * 1000)
            else:
                span = 0 if pace_clock and speed == 1 else MAX_BACK_MS
            start = default_start(now, span)
        sim = Simulation(fleet, seed=args.seed, start_ms=start, speed=speed,
                         scenarios=args.scenario, malformed_share=args.malformed_share,
                         shard=args.shard, topic_root=settings.mqtt_topic_root)
    except (FleetError, ScenarioError, ValueError) as exc:
        print(f"cityops simulate: {exc}", file=sys.stderr)
        return 2

    port = args.metrics_port
    if port is None:
        port = settings.simulate_metrics_port + args.shard[0]
    if port:
        try:
            serve_http("simulate", settings.bind_host, port)
        except OSError as exc:
            log.warning("metrics port %s unavailable (%s); continuing without /metrics", port,
                        exc)
    log.info("simulating", extra={"fields": {
        "fleet": fleet.name, "sensors": len(sim.sensors),
        "shard": f"{args.shard[0]}/{args.shard[1]}",
        "seed": args.seed, "start_ms": start, "scenarios": args.scenario,
        "rate": args.rate, "speed": speed if pace_clock else None}})
    options = {"rate": args.rate, "count": args.count, "duration": args.duration,
               "qos": args.qos, "inflight": args.inflight, "pace_clock": pace_clock,
               "ground_truth": args.ground_truth, "progress": not args.no_progress,
               "prefetch": not args.no_prefetch,
               "client_id": f"cityops-sim-{args.shard[0]}of{args.shard[1]}-{args.seed}"}
    try:
        stats = asyncio.run(_publish(sim, settings, options))
    except PublishError as exc:
        print(f"cityops simulate: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. an in-flight window paho cannot honour
        print(f"cityops simulate: {exc}", file=sys.stderr)
        return 2
    print(f"cityops simulate: {stats.summary()}", file=sys.stderr)
    log.info("simulation finished", extra={"fields": stats.as_dict()})
    return 1 if stats.errors else 0


async def _publish(sim: Simulation, settings: Settings, options: dict[str, object]
                   ) -> PublishStats:
    from cityops.service import install_stop_signals
    from simulators.publisher import publish

    stop_requested = asyncio.Event()
    install_stop_signals(stop_requested)
    stop = threading.Event()
    task = asyncio.create_task(publish(sim, settings, stop=stop, **options))
    waiter = asyncio.create_task(stop_requested.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        stop.set()
    waiter.cancel()
    return await task
