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
from pathlib import Path

from cityops.errors import ConfigError
from cityops.settings import Settings, SettingsError

SERVICES: dict[str, tuple[str, str]] = {
    "ingest": ("ingest.cli", "MQTT -> normalize -> Kafka events and dead letters"),
    "process": ("processors.cli", "Kafka events -> PostgreSQL/TimescaleDB and numpy rollups"),
    "alerts": ("alerts.cli", "rules over events (and the windows they compute) -> alerts"),
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

    devices = sub.add_parser(
        "devices", help="provision, rotate, revoke or list device MQTT identities (local stack)",
        description="Each sensor, gateway and vendor bridge logs in to MQTT as itself and may "
                    "publish only on its own topics. New passwords are printed once (or "
                    "written to --password-file); the local broker reloads at once, so a "
                    "revoked identity is refused at its next connect.")
    devices.add_argument("action", choices=["add", "rotate", "revoke", "list"])
    devices.add_argument("name", nargs="?", help="sensor id, gateway id or bridge name")
    devices.add_argument("--bridge", metavar="DISTRICT",
                         help="add: a vendor bridge that may publish for every sensor of "
                              "one district (<root>/DISTRICT/#)")
    devices.add_argument("--password-file", type=Path, metavar="PATH",
                         help="add/rotate: write the password here (0600) instead of "
                              "printing it")

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
    if args.command == "devices":
        return _devices(args, settings)
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
    weak = settings.default_secrets(settings.service_secrets(args.command))
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


def _devices(args: argparse.Namespace, settings: Settings) -> int:
    """``cityops devices``: the local stack's device identities (cityops/devices.py)."""
    from cityops.devices import DeviceStore, apply
    from cityops.registry import load_fleet

    store = DeviceStore.load(settings)
    if args.action == "list":
        print(f"{'identity':<32} {'kind':<8} topics")
        for ident in sorted(store.identities.values(), key=lambda i: (i.kind, i.name)):
            topics = ", ".join(ident.topics) or _own_topic(settings, ident.kind, ident.name)
            print(f"{ident.name:<32} {ident.kind:<8} {topics}")
        for name in sorted(store.revoked):
            print(f"{name:<32} {'revoked':<8} -")
        return 0
    if not args.name:
        print(f"cityops: devices {args.action} needs a NAME", file=sys.stderr)
        return 2
    if args.action == "add":
        if args.bridge:
            ident = store.add(args.name, "bridge", [f"{settings.mqtt_topic_root}/"
                                                    f"{args.bridge}/#"])
        else:
            fleet = load_fleet(settings.fleet_file)
            sensor = fleet.get(args.name)
            if sensor is not None and sensor.gateway:
                print(f"cityops: {args.name} sits behind gateway {sensor.gateway}, which "
                      f"connects for it: add the gateway", file=sys.stderr)
                return 2
            if sensor is None and args.name not in fleet.gateways():
                print(f"cityops: {args.name} is neither a sensor nor a gateway of the fleet "
                      f"({settings.fleet_file}); add it to the fleet file first, or give "
                      f"--bridge DISTRICT", file=sys.stderr)
                return 2
            ident = store.add(args.name, "sensor" if sensor is not None else "gateway")
    elif args.action == "rotate":
        ident = store.rotate(args.name)
    else:
        ident = store.revoke(args.name)
    reloaded = apply(settings, store)
    note = "broker reloaded" if reloaded else "applies at the next `cityops stack up`"
    if args.action == "revoke":
        print(f"revoked {ident.name}: refused at its next connect ({note})")
        return 0
    if args.password_file:
        args.password_file.touch(mode=0o600, exist_ok=True)
        args.password_file.chmod(0o600)
        args.password_file.write_text(ident.password + "\n")
        print(f"{args.action} {ident.name}: password written to {args.password_file} ({note})")
    else:
        print(f"{args.action} {ident.name}: username {ident.name}, password {ident.password} "
              f"(shown once; {note})")
    return 0


def _own_topic(settings: Settings, kind: str, name: str) -> str:
    root = settings.mqtt_topic_root
    return f"{root}/+/gateway/{name}" if kind == "gateway" else f"{root}/+/+/+/{name}"


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
