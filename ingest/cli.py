"""``cityops ingest``: run one ingest worker. Start several to split the load: in shared mode
they split the ``$share`` subscription; in districts mode each needs its own
``CITYOPS_INGEST_WORKER_INDEX`` (see ``ingest/mqtt.py``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket

from cityops.settings import Settings

log = logging.getLogger("cityops.ingest")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-id", default=os.environ.get("CITYOPS_INGEST_WORKER_ID")
                        or socket.gethostname(),
                        help="stable id of this worker: its MQTT session survives restarts "
                             "(default: $CITYOPS_INGEST_WORKER_ID or the host name)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="port for /metrics and /healthz (default: ingest_metrics_port; "
                             "0 disables)")
    parser.add_argument("--transport", choices=["asyncio", "paho-thread", "aiomqtt"], default=None,
                        help="MQTT client (default: the ingest_transport setting)")


def tune_gc() -> None:
    """Make the cyclic GC cheap for a process that allocates millions of short-lived,
    acyclic objects (events, their dicts, tuples). By default a collection runs every
    700 allocations and full passes walk every live object, the fleet and all modules
    included: measured, that doubled normalize's CPU per event. Freeze what exists at
    start-up out of the GC's view, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_main(args, settings))


async def _main(args: argparse.Namespace, settings: Settings) -> int:
    from cityops.service import install_stop_signals, serve_http
    from ingest.service import IngestService

    service = IngestService(settings, args.worker_id, transport=args.transport)
    tune_gc()
    port = settings.ingest_metrics_port if args.metrics_port is None else args.metrics_port
    server = (serve_http("ingest", settings.bind_host, port, health=service.healthy)
              if port else None)
    stop = asyncio.Event()
    install_stop_signals(stop)
    stopper = asyncio.create_task(stop.wait())
    stopper.add_done_callback(lambda _: service.stop())
    try:
        await service.run()
    except Exception:
        log.exception("ingest worker %s failed", args.worker_id)
        return 1
    finally:
        stopper.cancel()
        if server is not None:
            server.shutdown()
    s = service.stats
    log.info("ingest worker %s stopped", args.worker_id, extra={"fields": {
        "messages": s.messages, "events": s.events, "duplicates": s.duplicates,
        "deadletters": dict(s.deadletters), "mqtt_reconnects": s.mqtt_reconnects,
        "left_to_redelivery": s.left_to_redelivery, "kafka_retries": s.kafka_retries}})
    return 0
