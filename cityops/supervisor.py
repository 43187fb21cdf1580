"""Run the pipeline's services as child processes: the demo, the e2e benchmark and the
fault tests all start, kill and restart them the same way.

Each worker is a real ``cityops <service>`` process configured only through
``CITYOPS_*`` environment variables (``Settings.to_env``), with its own metrics port
and worker id, exactly as a container would run it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cityops.settings import Settings
from cityops.stack.process import pid_alive

# Which Settings field holds each service's metrics/health port.
PORT_FIELD = {
    "ingest": "ingest_metrics_port",
    "process": "process_metrics_port",
    "alerts": "alerts_metrics_port",
    "console": "console_port",
    "simulate": "simulate_metrics_port",
}


@dataclass
class Worker:
    """One service process; ``index`` distinguishes replicas of the same service."""

    service: str
    index: int
    port: int
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)  # extra CITYOPS_* for this worker only

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, host: str = "127.0.0.1") -> bool:
        try:
            url = f"http://{host}:{self.port}/healthz"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False


class Pipeline:
    """Starts and stops ``cityops`` service workers against one settings/stack."""

    def __init__(self, settings: Settings, log_dir: Path | None = None) -> None:
        self.settings = settings
        self.log_dir = log_dir or settings.state_dir / "logs"
        self.workers: list[Worker] = []

    def add(self, service: str, replicas: int = 1, args: list[str] | None = None,
            base_port: int | None = None, env: dict[str, str] | None = None) -> list[Worker]:
        """Declare ``replicas`` workers; replica i gets port base+i (base from settings)."""
        base = base_port if base_port is not None else getattr(self.settings, PORT_FIELD[service])
        existing = sum(1 for w in self.workers if w.service == service)
        added = []
        for i in range(replicas):
            idx = existing + i
            port = base if idx == 0 else _free_port()
            added.append(Worker(service, idx, port, list(args or []), env=dict(env or {})))
        self.workers.extend(added)
        return added

    def env_for(self, worker: Worker) -> dict[str, str]:
        env = {**os.environ, **self.settings.to_env()}
        env[f"CITYOPS_{PORT_FIELD[worker.service].upper()}"] = str(worker.port)
        env["CITYOPS_WORKER_ID"] = worker.name
        env[f"CITYOPS_{worker.service.upper()}_WORKER_ID"] = worker.name
        env["PYTHONUNBUFFERED"] = "1"
        env.update(worker.env)
        return env

    def start(self, worker: Worker) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        worker.log_path = self.log_dir / f"{worker.name}.log"
        log = worker.log_path.open("ab")
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "cityops.cli", worker.service, *worker.args],
            env=self.env_for(worker), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start_all(self, wait_healthy: float = 60.0) -> None:
        for w in self.workers:
            if not w.alive:
                self.start(w)
        if wait_healthy:
            self.wait_healthy(wait_healthy)

    def wait_healthy(self, timeout: float, workers: list[Worker] | None = None) -> None:
        pending = list(workers or self.workers)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for w in list(pending):
                if not w.alive:
                    code = w.proc.returncode if w.proc else "?"
                    raise RuntimeError(f"{w.name} exited with {code}; last log lines:\n"
                                       f"{self.tail(w)}")
                if w.healthy(self.settings.host):
                    pending.remove(w)
            time.sleep(0.1)
        if pending:
            names = ", ".join(w.name for w in pending)
            raise RuntimeError(f"not healthy after {timeout:.0f}s: {names}\n"
                               + "\n".join(self.tail(w) for w in pending))

    def kill(self, worker: Worker, sig: signal.Signals = signal.SIGKILL) -> None:
        """Kill a worker's whole process group (``kill -9`` by default)."""
        if worker.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.proc.pid, sig)
        try:
            worker.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait(timeout=5)

    def restart(self, worker: Worker, sig: signal.Signals = signal.SIGKILL,
                wait_healthy: float = 60.0) -> float:
        """Kill then start again; returns seconds until the worker is healthy again."""
        self.kill(worker, sig)
        t0 = time.monotonic()
        worker.restarts += 1
        self.start(worker)
        if wait_healthy:
            self.wait_healthy(wait_healthy, [worker])
        return time.monotonic() - t0

    def respawn_dead(self) -> list[Worker]:
        """Start again every worker whose process has exited (what a container runtime's
        restart policy does: a service that stops on a lost broker comes back). Returns
        the workers restarted."""
        dead = [w for w in self.workers if w.proc is not None and not w.alive]
        for w in dead:
            w.restarts += 1
            self.start(w)
        return dead

    def stop_all(self, timeout: float = 20.0) -> None:
        """SIGTERM every worker (they drain), then SIGKILL what is left."""
        for w in self.workers:
            if w.alive and w.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(w)
            if pid_alive(w.proc.pid):
                self.kill(w)

    def tail(self, worker: Worker, lines: int = 20) -> str:
        if worker.log_path is None or not worker.log_path.exists():
            return ""
        text = worker.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {worker.name} ---\n" + "\n".join(text)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(host: str, port: int) -> dict[str, float]:
    """Read a /metrics page into {'name{labels}': value} (sums are the caller's business)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total
