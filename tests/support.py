"""Helpers shared by tests and benchmarks (not fixtures: plain functions)."""

from __future__ import annotations

import socket
from pathlib import Path

from cityops.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_settings(state_dir: Path, **overrides: object) -> Settings:
    """Settings for an isolated stack: fresh ports, own state folder."""
    ports = {name: free_port() for name in (
        "mqtt_port", "kafka_port", "pg_port", "prometheus_port", "ingest_metrics_port",
        "process_metrics_port", "alerts_metrics_port", "simulate_metrics_port", "console_port")}
    return Settings(state_dir=state_dir, **{**ports, **overrides})  # type: ignore[arg-type]
