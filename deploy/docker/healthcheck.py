"""Container health check: GET the running cityops service's own ``/healthz``.

Docker runs this inside the container (``HEALTHCHECK`` in the Dockerfile). The service is
the ``cityops`` subcommand of PID 1 (or the first argument, for tests and for probing by
hand); its port comes from ``Settings.metrics_ports``, the same table the service binds
with, so the check can never disagree with the service about where it listens. One-shot
commands (``migrate``, ``stack``) have no health endpoint and count as healthy.

Exit status: 0 healthy, 1 unhealthy (Docker's convention).
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

from cityops.settings import Settings, SettingsError


def service_of(argv: list[str]) -> str | None:
    """The cityops subcommand in a command line (options before it are skipped)."""
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            continue
        if i > 0 and argv[i - 1] == "--config":
            continue
        if Path(arg).name in {"cityops", "python", "python3"} or arg.endswith(".py"):
            continue
        return arg
    return None


def pid1_command() -> list[str]:
    raw = Path("/proc/1/cmdline").read_bytes()
    return [part.decode() for part in raw.split(b"\0") if part]


def main(argv: list[str]) -> int:
    service = argv[0] if argv else service_of(pid1_command())
    try:
        settings = Settings.load()
    except SettingsError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    port = settings.metrics_ports.get(service or "")
    if port is None:
        print(f"healthcheck: '{service}' serves no /healthz; nothing to check")
        return 0
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            body = resp.read().decode(errors="replace")
            print(f"healthcheck: {url} -> {resp.status} {body}")
            return 0 if resp.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"healthcheck: {url} -> {exc.code}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"healthcheck: {url} unreachable: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
