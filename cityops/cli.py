"""``cityops``: one command for the stack, the services, the simulators and the demo.

Each long-running service owns its subcommand in ``<package>/cli.py`` with two
functions, ``configure(parser)`` and ``run(args, settings) -> int``; this module only
dispatches, so a service's options live next to its code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cityops.errors import ConfigError
from cityops.settings import SERVICE_SECRETS, Settings, SettingsError

SERVICES: dict[str, tuple[str, str]] = {
    "ingest": ("ingest.cli", "MQTT -> normalize -> Kafka events and dead letters"),
    "process": ("processors.cli", "Kafka events -> PostgreSQL/TimescaleDB and numpy rollups"),
    "alerts": ("alerts.cli", "rules over events and rollups -> alerts"),
    "console": ("alerts.console.cli", "operators' web console and REST API"),
    "simulate": ("simulators.cli", "publish a simulated Can Tho sensor fleet over MQTT"),
    "demo": ("cityops.demo", "the whole city on the local stack, with a live status line"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cityops", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML settings file (default: $CITYOPS_CONFIG or "
                        "./cityops.toml if present)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stack = sub.add_parser("stack", help="start, stop or inspect the local servers")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument("--only", nargs="*", metavar="SERVER",
                       help="only these servers (mqtt, kafka, postgres, prometheus)")

    migrate = sub.add_parser("migrate", help="apply pending database migrations")
    migrate.add_argument("--mode", choices=["auto", "timescale", "postgres"], default=None)

    for name, (module, help_text) in SERVICES.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_service_module=module)
        mod = _load(module)
        if mod is not None and hasattr(mod, "configure"):
            mod.configure(p)
    return parser


def _load(module: str):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cityops.service import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        from pathlib import Path

        settings = Settings.load(config_file=Path(args.config) if args.config else None)
    except SettingsError as exc:
        print(f"cityops: {exc}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args, settings)
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:  # bad configuration: one line, no traceback
        print(f"cityops: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "stack":
        return _stack(args, settings)
    if args.command == "migrate":
        import asyncio

        from processors.schema import migrate

        mode = asyncio.run(migrate(settings.pg_dsn, args.mode or settings.storage_mode,
                                   retention_days=settings.retention_days))
        print(f"schema up to date ({mode} mode)")
        return 0
    mod = _load(args._service_module)
    if mod is None or not hasattr(mod, "run"):
        print(f"cityops: '{args.command}' is not available in this build", file=sys.stderr)
        return 2
    # Before anything starts: a service never runs on a secret anyone can read in this
    # source tree (one line, no traceback). The demo generates its own via the stack.
    problem = settings.secrets_problem(args.command)
    if problem:
        print(f"cityops: {problem}", file=sys.stderr)
        return 2
    weak = settings.default_secrets(SERVICE_SECRETS.get(args.command, ()))
    if weak:  # dev_mode let it through
        logging.getLogger("cityops").warning(
            "dev_mode: %s runs with well-known default %s", args.command, ", ".join(weak))
    return int(mod.run(args, settings) or 0)


def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from cityops.stack import Stack

    stack = Stack(settings)
    if args.action == "up":
        started = stack.up(args.only)
        print("started: " + (", ".join(started) or "nothing (already running)"))
        return _print_status(stack)
    if args.action == "down":
        stopped = stack.down()
        print("stopped: " + (", ".join(stopped) or "nothing was running"))
        return 0
    return _print_status(stack)


def _print_status(stack: object) -> int:
    from cityops.stack import Stack

    assert isinstance(stack, Stack)
    ok = True
    print(f"{'server':<11} {'address':<22} {'pid':>8}  health")
    for server, h in zip(stack.servers, stack.status(), strict=True):
        state = "healthy" if h.healthy else ("UNHEALTHY" if h.running else "stopped")
        ok &= h.healthy
        pid = server.proc.pid or "-"
        detail = f" ({h.detail})" if h.detail and h.running else ""
        print(f"{h.name:<11} {stack.settings.host + ':' + str(h.port):<22} {pid!s:>8}  "
              f"{state}{detail}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
