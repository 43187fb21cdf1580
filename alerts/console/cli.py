"""``cityops console``: serve the operators' console, or manage its accounts.

    cityops console                                   # serve on settings.console_port
    cityops console --create-user ana --role operator # password from stdin or
                                                      # $CITYOPS_NEW_PASSWORD
    cityops console --seed-dev-users                  # viewer/operator/supervisor/wall demo
                                                      # logins (passwords generated once,
                                                      # printed; wall: a viewer for /wall)
    cityops console --create-token water-agency       # read-only API token, printed once
    cityops console --list-tokens                     # id, agency, issued by/at, state
    cityops console --rotate-token ID                 # new token for the same agency, printed
                                                      # once; the old one stops working now
    cityops console --revoke-token ID                 # its next request gets 401
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys

from cityops.settings import Settings

# username -> role of the demo accounts (local demo only; never seed these in production).
# "wall" is the video wall's screen: a viewer that stays logged in on /wall.
DEV_USERS: dict[str, str] = {"viewer": "viewer", "operator": "operator",
                             "supervisor": "supervisor", "wall": "viewer"}
DEV_USERS_FILE = "console-dev-users.toml"


def dev_user_passwords(settings: Settings) -> dict[str, str]:
    """The demo accounts' passwords: generated once per installation and kept in the state
    folder (0600), like the stack's other secrets; a fixed demo password would let anyone
    who reads this file log in to any demo console as supervisor."""
    import json
    import tomllib

    from cityops.settings import is_default_secret, new_secret

    path = settings.state_dir / DEV_USERS_FILE
    stored: dict[str, object] = {}
    if path.is_file():
        with path.open("rb") as fh:
            stored = tomllib.load(fh)
    passwords = {name: pw if isinstance(pw := stored.get(name), str) and len(pw) >= 8
                 and not is_default_secret(pw) else new_secret()[:16] for name in DEV_USERS}
    if passwords != stored:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text("".join(f"{n} = {json.dumps(pw)}\n" for n, pw in passwords.items()))
    return passwords


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=None, help="default: settings.console_port")
    parser.add_argument("--create-user", metavar="NAME",
                        help="create or reset a console account and exit")
    parser.add_argument("--role", choices=["viewer", "operator", "supervisor"],
                        default="viewer", help="role for --create-user")
    parser.add_argument("--seed-dev-users", action="store_true",
                        help="create the demo accounts viewer/operator/supervisor/wall and exit")
    parser.add_argument("--create-token", metavar="AGENCY",
                        help="print a new read-only API token for an agency and exit")
    parser.add_argument("--list-tokens", action="store_true",
                        help="list the API tokens issued (ids, agencies, state) and exit")
    parser.add_argument("--rotate-token", metavar="ID", type=_token_id,
                        help="revoke token ID and print a new one for its agency, then exit")
    parser.add_argument("--revoke-token", metavar="ID", type=_token_id,
                        help="revoke token ID (effective on its next request) and exit")


def _token_id(raw: str) -> int:
    """argparse type: a token id as --list-tokens shows it (argparse prints one line)."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a token id (see --list-tokens)") \
            from None
    if not 1 <= value <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a token id (see --list-tokens)")
    return value


def run(args: argparse.Namespace, settings: Settings) -> int:
    if (args.create_user or args.seed_dev_users or args.create_token or args.list_tokens
            or args.rotate_token or args.revoke_token):
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
    from alerts.console.auth import (
        create_token,
        create_user,
        list_tokens,
        revoke_token,
        rotate_token,
    )
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
            passwords = dev_user_passwords(settings)
            for name, role in DEV_USERS.items():
                await create_user(pool, name, passwords[name], role)
            print("dev users: " + ", ".join(f"{n}/{passwords[n]} ({r})" for n, r in
                                            DEV_USERS.items()))
        if args.create_token:
            print(await create_token(pool, args.create_token, "cli"))
        if args.rotate_token:
            got = await rotate_token(pool, args.rotate_token, "cli")
            if got is None:
                print(f"cityops console: no active token {args.rotate_token}", file=sys.stderr)
                return 2
            print(f"token {args.rotate_token} revoked; new token {got[0]} for {got[1]}:",
                  file=sys.stderr)
            print(got[2])
        if args.revoke_token:
            if not await revoke_token(pool, args.revoke_token):
                print(f"cityops console: no active token {args.revoke_token}", file=sys.stderr)
                return 2
            print(f"token {args.revoke_token} revoked")
        if args.list_tokens:
            print(f"{'id':>6}  {'agency':<24} {'issued by':<20} {'issued (UTC)':<17} state")
            for t in await list_tokens(pool):
                state = "active" if t["revoked_at"] is None else f"revoked {_utc(t['revoked_at'])}"
                print(f"{t['token_id']:>6}  {t['agency']!s:<24} {t['created_by']!s:<20} "
                      f"{_utc(t['created_at'])}  {state}")
    finally:
        await pool.close()
    return 0


def _utc(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
