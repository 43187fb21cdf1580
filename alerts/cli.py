"""``cityops alerts``: run the rule engine as a consumer-group member, or check a rules file."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from cityops.settings import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", type=Path, default=None,
                        help="rules file (default: settings.rules_file)")
    parser.add_argument("--check", action="store_true",
                        help="validate the rules file, print a summary and exit")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from alerts.ruleset import RuleError, load_rules

    path = args.rules or settings.rules_file
    if args.check:
        try:
            rules = load_rules(path)
        except RuleError as exc:
            print(f"cityops alerts: {exc}", file=sys.stderr)
            return 1
        for r in rules.rules:
            kind = type(r).__struct_config__.tag  # type: ignore[attr-defined]
            print(f"{r.id:<28} {kind:<12} {r.severity:<9} {'' if r.enabled else '(disabled)'}")
        print(f"{len(rules.rules)} rules OK in {path}")
        return 0
    return asyncio.run(_serve(settings, path))


async def _serve(settings: Settings, path: Path) -> int:
    from alerts.service import AlertService
    from cityops.service import install_stop_signals, serve_http

    service = AlertService(settings, rules_file=path)
    stop = asyncio.Event()
    install_stop_signals(stop)
    server = serve_http("alerts", settings.bind_host, settings.alerts_metrics_port,
                        health=service.healthy)
    try:
        await service.run(stop)
    finally:
        server.shutdown()
    return 0
