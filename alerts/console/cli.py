"""``cityops console``: serve the operators' console, or manage its accounts.

    cityops console                                   # serve on settings.console_port
    cityops console --create-user ana --role operator # password from stdin or
                                                      # $CITYOPS_NEW_PASSWORD
    cityops console --seed-dev-users                  # viewer/operator/supervisor demo logins
    cityops console --create-token water-agency       # read-only API token, printed once
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys

from cityops.settings import Settings

DEV_USERS: dict[str, tuple[str, str]] = {
    # username: (password, role) -- for the local demo only; never seed these in production
    "viewer": ("viewer-dev", "viewer"),
    "operator": ("operator-dev", "operator"),
    "supervisor": ("supervisor-dev", "supervisor"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=None, help="default: settings.console_port")
    parser.add_argument("--create-user", metavar="NAME",
                        help="create or reset a console account and exit")
    parser.add_argument("--role", choices=["viewer", "operator", "supervisor"],
                        default="viewer", help="role for --create-user")
    parser.add_argument("--seed-dev-users", action="store_true",
                        help="create the demo accounts viewer/operator/supervisor and exit")
    parser.add_argument("--create-token", metavar="AGENCY",
                        help="print a new read-only API token for an agency and exit")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.create_user or args.seed_dev_users or args.create_token:
        return asyncio.run(_manage(args, settings))
    import uvicorn

    from alerts.console.app import create_app

    config = uvicorn.Config(create_app(settings), host=settings.bind_host,
                            port=args.port or settings.console_port, log_level="warning",
                            access_log=False, proxy_headers=False,
                            timeout_graceful_shutdown=5)  # open SSE streams
    uvicorn.Server(config).run()  # handles SIGINT/SIGTERM: stops accepting, drains, exits
    return 0


def _password(name: str) -> str:
    if os.environ.get("CITYOPS_NEW_PASSWORD"):
        return os.environ["CITYOPS_NEW_PASSWORD"]
    if sys.stdin.isatty():
        return getpass.getpass(f"password for {name}: ")
    return sys.stdin.readline().rstrip("\n")


async def _manage(args: argparse.Namespace, settings: Settings) -> int:
    from alerts.console.auth import create_token, create_user
    from alerts.store import create_pool

    pool = await create_pool(settings.pg_dsn, size=1)
    try:
        if args.create_user:
            try:
                await create_user(pool, args.create_user, _password(args.create_user), args.role)
            except ValueError as exc:
                print(f"cityops console: {exc}", file=sys.stderr)
                return 2
            print(f"user {args.create_user} ({args.role}) ready")
        if args.seed_dev_users:
            for name, (pw, role) in DEV_USERS.items():
                await create_user(pool, name, pw, role)
            print("dev users: " + ", ".join(f"{n}/{pw} ({r})" for n, (pw, r) in
                                            DEV_USERS.items()))
        if args.create_token:
            print(await create_token(pool, args.create_token, "cli"))
    finally:
        await pool.close()
    return 0
