"""What every long-running cityops service shares: /metrics, /healthz, structured logs,
and a clean stop on SIGINT/SIGTERM.

Services call ``serve_http(service, host, port, health=...)`` once at start. The
server runs in a daemon thread (prometheus-client's own WSGI app), so a slow scrape
never blocks the event loop; ``/healthz`` answers 200 while the service's
``health()`` callable returns true and 503 otherwise (Kubernetes probes use it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Gauge, make_wsgi_app

BUILD_INFO = Gauge("cityops_service_up", "1 while the service process is running",
                   ["service"])


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_http(service: str, host: str, port: int,
               health: Callable[[], bool] = lambda: True) -> WSGIServer:
    """Serve ``/metrics`` and ``/healthz`` in a background thread; returns the server."""
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok = False
            try:
                ok = bool(health())
            except Exception:
                ok = False
            body = json.dumps({"service": service, "healthy": ok}).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [body]
        return metrics_app(environ, start_response)

    server = make_server(host, port, app, server_class=_ThreadingWSGIServer,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name=f"{service}-http", daemon=True).start()
    BUILD_INFO.labels(service).set(1)
    return server


def static_member_id(service: str, port: int) -> str:
    """A Kafka static-membership id (KIP-345) for one consumer process on this host.

    Static membership lets a worker killed with -9 take its old place in the consumer
    group at once, with its old partitions and no rebalance, instead of the group waiting
    up to ``session.timeout.ms`` for the broker to expire the dead member. The service's
    metrics port is unique per process on a host (it binds it) and stable across
    restarts; in a pod the host name is the pod name.
    """
    return f"{socket.gethostname()}-{service}-{port}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers (Loki, ELK) ingest without parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            doc.update(extra)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set ``stop`` so the service drains and exits cleanly."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
