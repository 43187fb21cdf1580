"""Who may do what in the console: accounts, sessions, roles and read-only API tokens.

Passwords are stored as argon2id hashes (argon2-cffi); a login hands out a session
cookie signed with HMAC-SHA256 over ``settings.console_secret`` (no server-side session
table to grow or clean). State-changing requests from a browser must also carry a CSRF
token derived from the same session, so another site cannot act with the cookie.
Other agencies get API tokens: random, shown once, stored as SHA-256, read-only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

SESSION_COOKIE = "cityops_session"
_hasher = PasswordHasher()
# verifying against this when the user does not exist keeps response times alike
_DUMMY_HASH = _hasher.hash("not-a-real-password")


class Role(IntEnum):
    """Ordered: each role can do everything the ones below it can."""

    READER = 0  # API token of another agency: read alerts and latest values
    VIEWER = 1
    OPERATOR = 2  # acknowledge, comment
    SUPERVISOR = 3  # clear, assign, maintenance windows, tokens

    @classmethod
    def named(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r}; use viewer, operator or supervisor") \
                from None


USER_ROLES = ("viewer", "operator", "supervisor")


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role
    via: str  # "session" | "token"
    session: str = ""  # the signed session value (to derive the CSRF token)


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise ValueError("password must be at least 8 characters")
    return _hasher.hash(password)


async def create_user(pool: asyncpg.Pool, username: str, password: str, role: str) -> None:
    Role.named(role)
    if role not in USER_ROLES:
        raise ValueError(f"unknown role {role!r}; use viewer, operator or supervisor")
    if not username or not username.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError("username: letters, digits, '.', '-' and '_' only")
    await pool.execute(
        "insert into console_users (username, password_hash, role) values ($1, $2, $3) "
        "on conflict (username) do update set password_hash = excluded.password_hash, "
        "role = excluded.role, disabled = false", username, hash_password(password), role)


async def verify_user(pool: asyncpg.Pool, username: str, password: str) -> Role | None:
    row = await pool.fetchrow("select password_hash, role from console_users "
                              "where username = $1 and not disabled", username)
    try:
        _hasher.verify(row["password_hash"] if row else _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    return Role.named(row["role"]) if row else None


async def create_token(pool: asyncpg.Pool, agency: str, created_by: str) -> str:
    return (await issue_token(pool, agency, created_by))[1]


async def issue_token(pool: asyncpg.Pool, agency: str, created_by: str) -> tuple[int, str]:
    """A new read-only token: (token id, for listing and revoking; the token, shown once)."""
    token = "cot_" + secrets.token_urlsafe(32)
    token_id = await pool.fetchval("insert into api_tokens (token_hash, agency, created_by) "
                                   "values ($1, $2, $3) returning token_id",
                                   _token_hash(token), agency, created_by)
    return int(token_id), token


async def list_tokens(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """Every API token ever issued (never the token itself: only its hash is stored),
    newest first; revoked ones carry ``revoked_at`` so an audit sees what existed."""
    rows = await pool.fetch(
        "select token_id, agency, scope, created_by, "
        "(extract(epoch from created_at) * 1000)::bigint as created_at, "
        "(extract(epoch from revoked_at) * 1000)::bigint as revoked_at "
        "from api_tokens order by token_id desc")
    return [dict(r) for r in rows]


async def revoke_token(pool: asyncpg.Pool, token_id: int) -> bool:
    """Revoke a live token; True if it was live. Takes effect on the next request: every
    request looks its token up (``token_principal``), nothing caches a grant."""
    done = await pool.execute("update api_tokens set revoked_at = now() "
                              "where token_id = $1 and revoked_at is null", token_id)
    return bool(done == "UPDATE 1")


async def rotate_token(pool: asyncpg.Pool, token_id: int,
                       by: str) -> tuple[int, str, str] | None:
    """Replace a live token by a new one for the same agency (old revoked at once, in the
    same transaction); returns (new id, agency, new token), or None if no such live token."""
    token = "cot_" + secrets.token_urlsafe(32)
    async with pool.acquire() as conn, conn.transaction():
        agency = await conn.fetchval("update api_tokens set revoked_at = now() where "
                                     "token_id = $1 and revoked_at is null returning agency",
                                     token_id)
        if agency is None:
            return None
        new_id = await conn.fetchval("insert into api_tokens (token_hash, agency, created_by) "
                                     "values ($1, $2, $3) returning token_id",
                                     _token_hash(token), agency, by)
    return int(new_id), str(agency), token


async def token_principal(pool: asyncpg.Pool, token: str) -> Principal | None:
    agency = await pool.fetchval("select agency from api_tokens where token_hash = $1 and "
                                 "revoked_at is null", _token_hash(token))
    return None if agency is None else Principal(f"token:{agency}", Role.READER, "token")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    """Stateless signed sessions: ``base64(json).signature``."""

    def __init__(self, secret: str, lifetime_s: int) -> None:
        self.key = hashlib.sha256(secret.encode()).digest()
        self.lifetime_s = lifetime_s

    def _sign(self, data: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self.key, data, "sha256").digest()).decode()

    def issue(self, user: str, role: Role) -> str:
        body = json.dumps({"u": user, "r": role.name.lower(),
                           "exp": int(time.time()) + self.lifetime_s}).encode()
        b = base64.urlsafe_b64encode(body).decode()
        return f"{b}.{self._sign(body)}"

    def read(self, value: str) -> Principal | None:
        """The session in a cookie value, or None for anything else: a cookie is input from
        anyone, so no value of it (non-ASCII, not base64, not JSON, wrong shape) may raise."""
        b, dot, sig = value.partition(".")
        if not dot or not value.isascii():
            return None
        try:
            body = base64.urlsafe_b64decode(b.encode())
        except ValueError:  # binascii.Error
            return None
        # compare bytes: compare_digest refuses str with non-ASCII characters
        if not hmac.compare_digest(sig.encode(), self._sign(body).encode()):
            return None
        try:  # signed by us, so it is what issue() wrote; still, never trust a shape
            doc = json.loads(body)
            user, role, exp = doc["u"], Role.named(doc["r"]), doc["exp"]
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(user, str) or not isinstance(exp, int | float) or exp < time.time():
            return None
        return Principal(user, role, "session", value)

    def csrf(self, session: str) -> str:
        return self._sign(b"csrf:" + session.encode())[:32]
