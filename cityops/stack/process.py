"""Start, watch and stop one local server process by pid file.

Each server of the local stack runs detached in its own session, with its pid in
``<state>/<name>.pid`` and its output in ``<state>/<name>.log``. ``stack down``
stops exactly those pids (and their process groups), so it never touches a server
it did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cityops.errors import ConfigError


class StackError(ConfigError):
    """A server could not be started or is missing; the message says what to do."""


class MissingBinary(StackError):
    """A required program is not installed."""

    def __init__(self, program: str, package: str, install: str) -> None:
        super().__init__(
            f"{program} not found: install the {package!r} package ({install})"
        )
        self.program, self.package, self.install = program, package, install


def require(program: str, package: str, install: str | None = None,
            search: Sequence[str] = ()) -> str:
    """Find a program on PATH (or in extra folders) or raise with the install command."""
    for folder in search:
        candidate = Path(folder) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(program)
    if found:
        return found
    raise MissingBinary(program, package, install or f"sudo apt-get install -y {package}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead -- unless it is only the thread
    # group's leader that exited: a killed JVM's other threads go on closing its sockets
    # for a moment, and its ports are not free until the last one is gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().split(") ", 1)[1][0] != "Z":
                return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return True


class ManagedProcess:
    """A detached child identified by its pid file."""

    def __init__(self, name: str, state_dir: Path) -> None:
        self.name = name
        self.state_dir = state_dir
        self.pid_file = state_dir / f"{name}.pid"
        self.log_file = state_dir / f"{name}.log"

    @property
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("ab")
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **(env or {})}, cwd=cwd,
        )
        log.close()
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def adopt(self, pid: int) -> None:
        """Record a pid the server wrote itself (servers that daemonize)."""
        self.pid_file.write_text(f"{pid}\n")

    def stop(self, timeout: float = 15.0, sig: signal.Signals = signal.SIGTERM) -> bool:
        """Stop the process group; returns True if something was running."""
        pid = self.pid
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal_group(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            _reap(pid)
            time.sleep(0.05)
        if pid_alive(pid):
            _signal_group(pid, signal.SIGKILL)
            time.sleep(0.2)
            _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return True

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               proc: ManagedProcess | None = None, interval: float = 0.1) -> None:
    """Poll ``check`` until it is true; on timeout raise with the server's last log lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        if proc is not None and proc.pid is None and proc.pid_file.exists():
            break
        time.sleep(interval)
    log = f"\n--- last lines of {proc.log_file} ---\n{proc.tail()}" if proc else ""
    raise StackError(f"{what} did not become healthy within {timeout:.0f}s{log}")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0
