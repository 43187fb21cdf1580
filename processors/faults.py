"""The ONE place that decides what a failed database step means, and text made storable.

Why one place: the processor and the alerts service must agree on which failures are
worth waiting for and which are a record's own fault. Waiting on a record's fault stops
the whole city (every restart meets the same record again); parking a record because
the database was away would drop good data during an outage. So every consumer asks
``classify`` and nobody keeps an exception list of its own.

* ``Fault.AWAY``: the database, not the data (connection lost, server shutting down,
  disk full, read-only, out of memory/connections). Wait with back-off and run the same
  step again, for as long as it takes: Kafka keeps the backlog meanwhile.
* ``Fault.CONTENTION``: another writer got in the way (deadlock, serialization
  failure, lock not available). Retried a bounded number of times (``MAX_RETRIES``); a
  step that still fails is then treated like poison, so it costs its records, not the
  stream.
* ``Fault.POISON``: everything else — a data error the server raised (invalid byte
  sequence, untranslatable character, numeric out of range, check violation, index row
  too large ...) or one the client raised while encoding a value (``OverflowError`` for
  an int4 column, ``UnicodeEncodeError`` for a lone surrogate). Retrying the same bytes
  gives the same answer, so the record is found and parked.
"""

from __future__ import annotations

from enum import StrEnum

import asyncpg

# The database went away (restart, failover, network): the connection is gone, not the
# batch. OSError includes TimeoutError (a connect to an unreachable host).
# InternalClientError: a connection whose server went away mid-operation can fail with
# "cannot switch to state ...; another operation is in progress" (seen in the fault
# matrix's PostgreSQL restart); the step is repeated on a fresh connection.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError, asyncpg.InternalClientError)

#: Bounded retries for ``Fault.CONTENTION`` (and for each piece while isolating poison).
MAX_RETRIES = 5

# SQLSTATE classes and codes that describe the server's state, whatever was written:
# 08 connection exception, 53 insufficient resources (disk full, out of memory, too many
# connections), 57 operator intervention (shutdown, crash recovery), 58 system error (I/O),
# 25006 read-only transaction (a standby after failover), 57014 (query canceled) is in 57.
_AWAY_CLASSES = frozenset({"08", "53", "57", "58"})
# 42703 undefined column, 42P01 undefined table, 42809 wrong object type: the schema is not
# the one this code expects (a rolling upgrade has migrated it under an older process, or
# the reverse). Not the record's fault: wait for the right code or schema, park nothing.
_AWAY_CODES = frozenset({"25006", "42703", "42P01", "42809"})
# 40001 serialization failure, 40P01 deadlock, 55P03 lock not available.
_CONTENTION_CODES = frozenset({"40001", "40P01", "55P03"})


class Fault(StrEnum):
    AWAY = "away"
    CONTENTION = "contention"
    POISON = "poison"


def classify(exc: BaseException) -> Fault:
    """What a failed database step means: wait, retry a little, or isolate and park."""
    if isinstance(exc, CONNECTION_LOST):
        return Fault.AWAY
    code = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    if isinstance(code, str):
        if code[:2] in _AWAY_CLASSES or code in _AWAY_CODES:
            return Fault.AWAY
        if code in _CONTENTION_CODES:
            return Fault.CONTENTION
    return Fault.POISON


def is_away(exc: BaseException) -> bool:
    """Whether to wait for the database and run the same step again (see ``Fault.AWAY``)."""
    return classify(exc) is Fault.AWAY


def safe_text(value: str | None, limit: int) -> str | None:
    """``value`` as PostgreSQL ``text`` accepts it, at most ``limit`` characters.

    PostgreSQL text cannot hold a NUL character and asyncpg cannot encode a lone
    surrogate: either makes the whole write fail. NUL becomes the visible escape ``\\x00``
    and a surrogate its ``\\udxxx`` escape, so a reader still sees what was there; the raw
    bytes are kept elsewhere (bytea) when they matter. The length bound keeps one hostile
    field from bloating a row or an index entry past its limit.
    """
    if value is None:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) > limit:
        value = value[: max(limit - 1, 0)] + "…"
    return value


def describe(exc: BaseException, limit: int = 2000) -> tuple[str, str]:
    """(error class, message) of an exception, both storable as text."""
    name = type(exc).__name__
    return safe_text(name, 200) or name, safe_text(str(exc), limit) or ""
