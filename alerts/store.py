"""Alerts in PostgreSQL: the lifecycle, its audit trail, maintenance windows, checkpoints.

The database is the source of truth for "one active alert per (rule, source)": a partial
unique index enforces it, and every write is conditional on the alert's state, so the
alerts service and the console (operators acknowledging, supervisors clearing) can
change the same alert without either holding a stale copy. Each change is written
together with its audit row in one transaction and returned as an ``AlertChange`` for
the caller to publish on the alerts topic.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from alerts.incidents.model import IncidentChange
from alerts.metrics import (
    ALERTS_ACTIVE,
    ALERTS_CLEARED,
    ALERTS_ESCALATED,
    ALERTS_RAISED,
    ALERTS_SUPPRESSED,
    ALERTS_UPDATED,
    CHECKPOINTS,
    EVENT_TO_ALERT,
)
from alerts.model import SEVERITY_RANK, Alert, AlertChange, Signal, SignalKind

if TYPE_CHECKING:
    from alerts.incidents.store import IncidentStore

SYSTEM = "system"
_COLUMNS = ("rule_id, source, severity, state, title, message, domain, district, landmark, "
            "sensor_id, lat, lon, value, details, first_event_time, last_event_time")


def _ms(ts: datetime | None) -> int | None:
    return None if ts is None else int(ts.timestamp() * 1000)


def _ts(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def row_to_alert(row: asyncpg.Record) -> Alert:
    d = dict(row)
    for k in ("acked_at", "escalated_at", "first_event_time", "last_event_time", "raised_at",
              "updated_at", "cleared_at"):
        d[k] = _ms(d[k])
    d["details"] = json.loads(d["details"]) if isinstance(d["details"], str) else d["details"]
    d.pop("inserted", None)
    return Alert(**d)


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")


async def create_pool(dsn: str, size: int = 4) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=size, init=init_connection)
    assert pool is not None
    return pool


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    window_id: int
    scope: str  # sensor | district | landmark
    target: str
    starts_at: int
    ends_at: int
    reason: str
    created_by: str

    def covers(self, s: Signal, now_ms: int) -> bool:
        if not (self.starts_at <= now_ms < self.ends_at):
            return False
        value = {"sensor": s.sensor_id or s.source, "district": s.district,
                 "landmark": s.landmark}[self.scope]
        return value == self.target


def where_equal(args: list[Any], alias: str = "", **filters: Any) -> list[str]:
    """``column = $n`` for each filter that is given (not None), its value appended to
    ``args``: the list filters of the REST API (alerts and incidents)."""
    out: list[str] = []
    for col, val in filters.items():
        if val is not None:
            args.append(val)
            out.append(f"{alias}{col} = ${len(args)}")
    return out


def _count(ch: AlertChange) -> None:
    """The lifecycle counters, for a change that has been committed."""
    sev, dom = ch.alert.severity, ch.alert.domain or "none"
    if ch.action == "raised":
        ALERTS_RAISED.labels(sev, dom).inc()
    elif ch.action == "updated":
        ALERTS_UPDATED.labels(sev, dom).inc()
    elif ch.action == "cleared":
        ALERTS_CLEARED.labels(sev, dom, "system" if ch.actor == SYSTEM else "operator").inc()
    elif ch.action == "escalated":
        ALERTS_ESCALATED.labels(dom).inc()


def _runs(signals: list[Signal]) -> Iterator[list[Signal]]:
    """Consecutive runs of signals in which no (rule, source) repeats: a run can be written
    set-based, and runs in order keep a raise and a later clear of the same alert in order."""
    run: list[Signal] = []
    keys: set[tuple[str, str]] = set()
    for s in signals:
        if s.key in keys:
            yield run
            run, keys = [], set()
        run.append(s)
        keys.add(s.key)
    if run:
        yield run


class Fenced(Exception):
    """A checkpoint refused: another worker owns some of the partitions it covers now."""


class AlertStore:
    # ``_last_update`` is pruned once it holds this many keys (then at twice what survived)
    FORGET_AT = 1024

    def __init__(self, pool: asyncpg.Pool, *, update_every_s: float = 5.0,
                 incidents: IncidentStore | None = None) -> None:
        self.pool = pool
        # alerts join their incidents in the transaction that writes them (alerts.incidents)
        self.incidents = incidents
        self._incident_changes: list[IncidentChange] = []
        self.update_every_s = update_every_s
        self._last_update: dict[tuple[str, str], float] = {}
        self._forget_at = self.FORGET_AT
        self.windows: list[MaintenanceWindow] = []
        self._suppressed: set[tuple[str, str]] = set()

    # --- engine side -----------------------------------------------------------------------
    async def apply(self, signals: Sequence[Signal]) -> list[AlertChange]:
        """Turn signals into alert changes (one transaction); returns what changed.

        Set-based: a batch costs a handful of statements, not two round trips per signal.
        That matters when a district's sensors go quiet together (a power cut, a network
        outage): thousands of offline alerts are raised in one batch, and cleared in one
        when the sensors come back. Signals are split into runs in which every (rule,
        source) appears at most once, and each run is one UPDATE for the clears, one for
        the updates and one INSERT .. ON CONFLICT for the raises; the audit rows of the
        whole batch are one INSERT, in signal order.

        Safe to call again with the same signals after it raised (the alerts service does
        so when the database connection was lost): the writes are conditional on the
        alert's state, and what this object remembers (update throttle, metrics) changes
        only once the transaction has committed.
        """
        if not signals:
            return []
        now = time.time()
        now_ms = int(now * 1000)
        self._forget_updates(now)
        # In order, except that an update followed by any later signal for the same key is
        # superseded by it: a flapping source costs one write per batch, not one per event,
        # while a raise and a clear inside one batch still both happen.
        last = {s.key: i for i, s in enumerate(signals)}
        todo: list[Signal] = []
        for i, s in enumerate(signals):
            if s.kind == SignalKind.UPDATE and last[s.key] != i:
                continue
            if s.kind == SignalKind.CLEAR:
                self._suppressed.discard(s.key)
            elif s.kind == SignalKind.RAISE or s.key in self._suppressed:
                # a condition that began inside a maintenance window raises once the
                # window is over, if it still holds
                if any(w.covers(s, now_ms) for w in self.windows):
                    if s.key not in self._suppressed:
                        ALERTS_SUPPRESSED.labels(s.domain or "none").inc()
                        self._suppressed.add(s.key)
                    continue
                self._suppressed.discard(s.key)
                if s.kind != SignalKind.RAISE:
                    s = replace(s, kind=SignalKind.RAISE)
            elif now - self._last_update.get(s.key, 0.0) < self.update_every_s:
                continue
            todo.append(s)
        written: list[tuple[Signal, AlertChange]] = []
        async with self.pool.acquire() as conn, conn.transaction():
            for run in _runs(todo):
                rows = await self._write_run(conn, run)
                for s in run:
                    got = rows.get(s.key)
                    if got is not None:
                        row, action = got
                        written.append((s, AlertChange(action=action, actor=SYSTEM, at=now_ms,
                                                       alert=row_to_alert(row))))
            if written:
                await conn.execute(
                    "insert into alert_audit (alert_id, actor, action, detail) "
                    "select * from unnest($1::bigint[], $2::text[], $3::text[], $4::jsonb[])",
                    [ch.alert.alert_id for _, ch in written], [SYSTEM] * len(written),
                    [ch.action for _, ch in written],
                    [{"version": ch.alert.version} for _, ch in written])
            incident_changes = [] if self.incidents is None else \
                await self.incidents.attach(conn, [ch for _, ch in written])
        self._incident_changes += incident_changes
        for s, ch in written:  # committed: now it happened
            _count(ch)
            if ch.action == "cleared":
                self._last_update.pop(s.key, None)
            else:
                self._last_update[s.key] = now
            if ch.action == "raised" and s.receive_ms:
                EVENT_TO_ALERT.observe(max(0.0, now - s.receive_ms / 1000))
        return [ch for _, ch in written]

    def push_incident_changes(self, changes: list[IncidentChange]) -> None:
        """Incident changes made outside ``apply`` (the incidents' clock), to publish with
        the next ones."""
        self._incident_changes += changes

    def take_incident_changes(self) -> list[IncidentChange]:
        """The incident changes of the alert changes applied since the last call."""
        out, self._incident_changes = self._incident_changes, []
        return out

    def _forget_updates(self, now: float) -> None:
        """Drop update-throttle entries older than the throttle period: they no longer
        hold anything back, and without this every source that ever had an alert that was
        not cleared by the engine (a supervisor cleared it, rules changed) stays here."""
        if len(self._last_update) < self._forget_at:
            return
        horizon = now - self.update_every_s
        self._last_update = {k: t for k, t in self._last_update.items() if t >= horizon}
        self._forget_at = max(self.FORGET_AT, 2 * len(self._last_update))

    async def _write_run(self, conn: asyncpg.Connection, run: list[Signal]
                         ) -> dict[tuple[str, str], tuple[asyncpg.Record, str]]:
        """One statement per kind for signals with distinct keys: (rule, source) -> (row as
        written, action). A clear or update of an alert that is not active writes nothing
        (a supervisor cleared it: trust them until the condition ends and starts again)."""
        out: dict[tuple[str, str], tuple[asyncpg.Record, str]] = {}
        clears = [s for s in run if s.kind == SignalKind.CLEAR]
        updates = [s for s in run if s.kind == SignalKind.UPDATE]
        raises = [s for s in run if s.kind == SignalKind.RAISE]
        if clears:
            for row in await conn.fetch(
                    "update alerts a set state = 'cleared', cleared_at = now(), cleared_by = $3, "
                    " updated_at = now(), version = a.version + 1 "
                    "from unnest($1::text[], $2::text[]) as u(rule_id, source) "
                    "where a.rule_id = u.rule_id and a.source = u.source and a.state = 'active' "
                    "returning a.*",
                    [s.rule_id for s in clears], [s.source for s in clears], SYSTEM):
                out[(row["rule_id"], row["source"])] = (row, "cleared")
        if updates:
            for row in await conn.fetch(
                    "update alerts a set value = u.value, details = u.details, "
                    " last_event_time = u.at, updated_at = now(), updates = a.updates + 1, "
                    " version = a.version + 1 "
                    "from unnest($1::text[], $2::text[], $3::float8[], $4::jsonb[], "
                    "            $5::timestamptz[]) as u(rule_id, source, value, details, at) "
                    "where a.rule_id = u.rule_id and a.source = u.source and a.state = 'active' "
                    "returning a.*",
                    [s.rule_id for s in updates], [s.source for s in updates],
                    [s.value for s in updates], [s.details for s in updates],
                    [_ts(s.at_ms) for s in updates]):
                out[(row["rule_id"], row["source"])] = (row, "updated")
        if raises:
            cols = ([s.rule_id for s in raises], [s.source for s in raises],
                    [s.severity for s in raises], [s.title for s in raises],
                    [s.message for s in raises], [s.domain for s in raises],
                    [s.district for s in raises], [s.landmark for s in raises],
                    [s.sensor_id for s in raises], [s.lat for s in raises],
                    [s.lon for s in raises], [s.value for s in raises],
                    [s.details for s in raises], [_ts(s.at_ms) for s in raises])
            for row in await conn.fetch(
                    f"insert into alerts ({_COLUMNS}) "
                    "select u.rule_id, u.source, u.severity, 'active', u.title, u.message, "
                    " u.domain, u.district, u.landmark, u.sensor_id, u.lat, u.lon, u.value, "
                    " u.details, u.at, u.at "
                    "from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
                    "            $6::text[], $7::text[], $8::text[], $9::text[], $10::float8[], "
                    "            $11::float8[], $12::float8[], $13::jsonb[], $14::timestamptz[]) "
                    " as u(rule_id, source, severity, title, message, domain, district, "
                    "      landmark, sensor_id, lat, lon, value, details, at) "
                    "on conflict (rule_id, source) where state = 'active' do update set "
                    " value = excluded.value, details = excluded.details, "
                    " last_event_time = excluded.last_event_time, updated_at = now(), "
                    " updates = alerts.updates + 1, version = alerts.version + 1 "
                    "returning *, (xmax = 0) as inserted", *cols):
                out[(row["rule_id"], row["source"])] = (
                    row, "raised" if row["inserted"] else "updated")
        return out

    async def _record(self, conn: asyncpg.Connection, row: asyncpg.Record, action: str,
                      actor: str, now_ms: int, note: str | None = None,
                      detail: dict[str, Any] | None = None) -> AlertChange:
        alert = row_to_alert(row)
        await conn.execute("insert into alert_audit (alert_id, actor, action, detail) "
                           "values ($1, $2, $3, $4)", alert.alert_id, actor, action,
                           {**(detail or {}), **({"note": note} if note else {}),
                            "version": alert.version})
        return AlertChange(action=action, actor=actor, at=now_ms, alert=alert, note=note)

    async def escalate(self, default_after_s: float,
                       per_rule: dict[str, float]) -> list[AlertChange]:
        """Raise the escalation level of critical alerts nobody acknowledged in time."""
        changes: list[AlertChange] = []
        now_ms = int(time.time() * 1000)
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "select alert_id, rule_id, raised_at, escalated_at, escalation_level from alerts "
                "where state = 'active' and not acknowledged and severity = 'critical'")
            for r in rows:
                after = per_rule.get(r["rule_id"], default_after_s)
                since = r["escalated_at"] or r["raised_at"]
                if now_ms - _ms(since) < after * 1000:  # type: ignore[operator]
                    continue
                # conditional on the level seen: with N workers escalating, one wins
                row = await conn.fetchrow(
                    "update alerts set escalation_level = escalation_level + 1, "
                    " escalated_at = now(), updated_at = now(), version = version + 1 "
                    "where alert_id = $1 and state = 'active' and not acknowledged "
                    "and escalation_level = $2 returning *",
                    r["alert_id"], r["escalation_level"])
                if row is not None:
                    changes.append(await self._record(
                        conn, row, "escalated", SYSTEM, now_ms,
                        detail={"level": row["escalation_level"], "after_s": after}))
        for ch in changes:
            _count(ch)
        return changes

    async def count_active(self) -> dict[str, int]:
        """Active alerts per severity, into the ``cityops_alerts_active`` gauge."""
        rows = await self.pool.fetch("select severity, count(*) as n from alerts "
                                     "where state = 'active' group by severity")
        counts = {sev: 0 for sev in SEVERITY_RANK} | {r["severity"]: r["n"] for r in rows}
        for sev, n in counts.items():
            ALERTS_ACTIVE.labels(sev).set(n)
        return counts

    async def active(self, rule_ids: Sequence[str] | None = None) -> list[Alert]:
        """Active alerts, all or those of ``rule_ids`` (the correlation rules read only
        their inputs', every tick: not the thousands of offline-sensor alerts)."""
        if rule_ids is None:
            rows = await self.pool.fetch("select * from alerts where state = 'active'")
        else:
            rows = await self.pool.fetch("select * from alerts where state = 'active' "
                                         "and rule_id = any($1::text[])", list(rule_ids))
        return [row_to_alert(r) for r in rows]

    # --- operators --------------------------------------------------------------------------
    async def act(self, alert_id: int, action: str, actor: str, *, note: str | None = None,
                  assignee: str | None = None) -> AlertChange | None:
        """An operator's action; None if the alert does not exist (or is already cleared)."""
        sql = {
            "acknowledged": "update alerts set acknowledged = true, acked_by = $2, "
                            "acked_at = now(), updated_at = now(), version = version + 1 "
                            "where alert_id = $1 returning *",
            "commented": "update alerts set updated_at = now(), version = version + 1 "
                         "where alert_id = $1 and $2::text is not null returning *",
            "assigned": "update alerts set assignee = $3, updated_at = now(), "
                        "version = version + 1 where alert_id = $1 and $2::text is not null "
                        "returning *",
            "cleared": "update alerts set state = 'cleared', cleared_at = now(), "
                       "cleared_by = $2, updated_at = now(), version = version + 1 "
                       "where alert_id = $1 and state = 'active' returning *",
        }[action]
        args: list[Any] = [alert_id, actor] + ([assignee] if action == "assigned" else [])
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(sql, *args)
            if row is None:
                return None
            detail = {"assignee": assignee} if action == "assigned" else None
            change = await self._record(conn, row, action, actor, int(time.time() * 1000),
                                        note=note, detail=detail)
            if self.incidents is not None and action == "cleared":  # its incident's counts
                self._incident_changes += await self.incidents.attach(conn, [change])
        _count(change)
        return change

    async def get(self, alert_id: int) -> Alert | None:
        row = await self.pool.fetchrow("select * from alerts where alert_id = $1", alert_id)
        return None if row is None else row_to_alert(row)

    async def audit(self, alert_id: int) -> list[dict[str, Any]]:
        rows = await self.pool.fetch("select at, actor, action, detail from alert_audit "
                                     "where alert_id = $1 order by audit_id", alert_id)
        return [{"at": _ms(r["at"]), "actor": r["actor"], "action": r["action"],
                 "detail": r["detail"]} for r in rows]

    async def search(self, *, state: str | None = None, domain: str | None = None,
                     district: str | None = None, severity: str | None = None,
                     acknowledged: bool | None = None, limit: int = 500) -> list[Alert]:
        args: list[Any] = []
        where = where_equal(args, state=state, domain=domain, district=district,
                            severity=severity, acknowledged=acknowledged)
        args.append(limit)
        sql = ("select * from alerts" + (" where " + " and ".join(where) if where else "")
               + f" order by (state = 'active') desc, updated_at desc limit ${len(args)}")
        return [row_to_alert(r) for r in await self.pool.fetch(sql, *args)]

    # --- maintenance windows ----------------------------------------------------------------
    async def load_windows(self) -> list[MaintenanceWindow]:
        rows = await self.pool.fetch("select * from maintenance_windows where ends_at > now() "
                                     "order by starts_at")
        self.windows = [MaintenanceWindow(r["window_id"], r["scope"], r["target"],
                                          int(r["starts_at"].timestamp() * 1000),
                                          int(r["ends_at"].timestamp() * 1000), r["reason"],
                                          r["created_by"]) for r in rows]
        return self.windows

    async def add_window(self, scope: str, target: str, starts_ms: int, ends_ms: int,
                         reason: str, actor: str) -> int:
        return int(await self.pool.fetchval(
            "insert into maintenance_windows (scope, target, starts_at, ends_at, reason, "
            "created_by) values ($1,$2,$3,$4,$5,$6) returning window_id",
            scope, target, _ts(starts_ms), _ts(ends_ms), reason, actor))

    async def delete_window(self, window_id: int) -> bool:
        return (await self.pool.execute("delete from maintenance_windows where window_id = $1",
                                        window_id)) == "DELETE 1"

    # --- checkpoints --------------------------------------------------------------------------
    async def claim(self, group: str, owner: str, parts: Sequence[tuple[str, int]]) -> None:
        """Make ``owner`` the holder of these (topic, partition)s of ``group``: from now on
        a checkpoint of any previous holder that covers them is refused (``Fenced``)."""
        if parts:
            await self.pool.execute(
                "insert into alert_partition_owners (grp, topic, partition, owner) "
                "select $1, u.t, u.p, $4 from unnest($2::text[], $3::int[]) as u(t, p) "
                "on conflict (grp, topic, partition) do update set owner = excluded.owner, "
                "claimed_at = now()", group, [t for t, _ in parts], [p for _, p in parts],
                owner)

    async def checkpoint(self, group: str,
                         state: Iterable[tuple[Any, ...]],
                         offsets: dict[tuple[str, int], int],
                         blobs: Iterable[tuple[str, str, int, bytes, bool]] = (),
                         watermarks: dict[tuple[str, int], int] | None = None,
                         owner: tuple[str, Sequence[tuple[str, int]]] | None = None) -> None:
        """Rule state and the offsets it reflects, atomically: a restart resumes exactly here.

        ``state`` rows are (rule id, hash, key, state or None, topic, partition): the
        partition whose owner holds the key (``alerts.scope``). ``blobs`` are (rule id,
        hash, events partition, blob, is_full): a full one replaces the base of that
        (rule, partition) and drops its deltas, the others are appended (``alerts.slots``);
        other partitions' rows, another worker's, are not touched. ``watermarks`` go on
        the offset rows of their partitions (``alerts.watermark``). ``owner``: (this
        worker's claim, the partitions it holds): nothing is written unless every one of
        them is still claimed by it (``claim``; the rows are share-locked, so a claim by
        the next owner waits for this transaction and then loads what it wrote).
        """
        rows = [r if len(r) == 6 else (*r, "", -1) for r in state]
        async with self.pool.acquire() as conn, conn.transaction():
            if owner is not None and owner[1]:
                token, held = owner
                mine = len(await conn.fetch(
                    "select o.partition from alert_partition_owners o join unnest($2::text[], "
                    "$3::int[]) as h(topic, partition) using (topic, partition) "
                    "where o.grp = $1 and o.owner = $4 for share of o", group,
                    [t for t, _ in held], [p for _, p in held], token))
                if mine != len(held):
                    raise Fenced(f"{len(held) - mine} of the {len(held)} partitions this "
                                 "worker holds were claimed by another worker")
            dead = [(r[0], r[2]) for r in rows if r[3] is None]
            live = [r for r in rows if r[3] is not None]
            if dead:
                await conn.executemany("delete from alert_rule_state where rule_id = $1 and "
                                       "key = $2", dead)
            if live:  # one statement for thousands of keys
                await conn.execute(
                    "insert into alert_rule_state (rule_id, rule_hash, key, state, topic, "
                    " partition) select * from unnest($1::text[], $2::text[], $3::text[], "
                    " $4::jsonb[], $5::text[], $6::int[]) "
                    "on conflict (rule_id, key) do update set rule_hash = excluded.rule_hash, "
                    "state = excluded.state, topic = excluded.topic, "
                    "partition = excluded.partition, updated_at = now()",
                    *(list(col) for col in zip(*live, strict=True)))
            blob_rows = list(blobs)
            bases = [(r, p, h, b) for r, h, p, b, full in blob_rows if full]
            deltas = [(r, p, h, b) for r, h, p, b, full in blob_rows if not full]
            if bases:
                await conn.execute(
                    "delete from alert_rule_part_blob_deltas d using unnest($1::text[], "
                    "$2::int[]) as u(rule_id, partition) "
                    "where d.rule_id = u.rule_id and d.partition = u.partition",
                    [r for r, *_ in bases], [p for _, p, *_ in bases])
                await conn.executemany(
                    "insert into alert_rule_part_blobs (rule_id, partition, rule_hash, blob) "
                    "values ($1,$2,$3,$4) on conflict (rule_id, partition) do update set "
                    "rule_hash = excluded.rule_hash, blob = excluded.blob, "
                    "updated_at = now()", bases)
            if deltas:
                await conn.executemany("insert into alert_rule_part_blob_deltas (rule_id, "
                                       "partition, rule_hash, blob) values ($1,$2,$3,$4)",
                                       deltas)
            if offsets:
                await conn.executemany(
                    "insert into alert_consumer_offsets (grp, topic, partition, next_offset) "
                    "values ($1,$2,$3,$4) on conflict (grp, topic, partition) do update set "
                    "next_offset = excluded.next_offset, updated_at = now()",
                    [(group, t, p, o) for (t, p), o in offsets.items()])
            if watermarks:
                await conn.execute(
                    "update alert_consumer_offsets o set watermark_ms = w.ms "
                    "from unnest($2::text[], $3::int[], $4::int8[]) as w(topic, partition, ms) "
                    "where o.grp = $1 and o.topic = w.topic and o.partition = w.partition",
                    group, [t for t, _ in watermarks], [p for _, p in watermarks],
                    list(watermarks.values()))
        CHECKPOINTS.inc()

    async def load_state(self, parts: Sequence[tuple[str, int]] | None = None
                         ) -> list[tuple[str, str, str, dict[str, Any], str, int]]:
        """Per-key state rows of the given (topic, partition)s (None: all), and the rows
        written before partitioning (partition -1: the engine keeps those it owns)."""
        sql = ("select rule_id, rule_hash, key, state, topic, partition from alert_rule_state")
        if parts is None:
            rows = await self.pool.fetch(sql)
        else:
            rows = await self.pool.fetch(
                sql + " where partition = -1 or (topic, partition) in "
                "(select * from unnest($1::text[], $2::int[]))",
                [t for t, _ in parts], [p for _, p in parts])
        return [(r["rule_id"], r["rule_hash"], r["key"], r["state"], r["topic"],
                 r["partition"]) for r in rows]

    async def load_blobs(self, partitions: Sequence[int] | None = None
                         ) -> list[tuple[str, str, int, bytes]]:
        """(rule id, hash, partition, blob): each (rule, partition)'s base, then the deltas
        written since, in the order written, for the given events partitions (None: all).
        A rule with no partitioned base there yet gets its pre-partitioning blobs first, as
        partition -1 (the engine keeps the sensors of those partitions and writes them as
        partitioned bases at its next checkpoint)."""
        where, args = ("", []) if partitions is None else \
            (" where partition = any($1::int[])", [list(partitions)])
        # older than any partitioned row of the same rule and partition: applied first
        legacy = ("select rule_id, rule_hash, -1 as partition, blob from {} l where not "
                  "exists (select 1 from alert_rule_part_blobs b where b.rule_id = l.rule_id"
                  + (" and b.partition = any($1::int[])" if args else "") + ")")
        rows = await self.pool.fetch(legacy.format("alert_rule_blobs"), *args)
        rows += await self.pool.fetch(legacy.format("alert_rule_blob_deltas") + " order by seq",
                                      *args)
        rows += await self.pool.fetch("select rule_id, rule_hash, partition, blob from "
                                      "alert_rule_part_blobs" + where, *args)
        rows += await self.pool.fetch("select rule_id, rule_hash, partition, blob from "
                                      "alert_rule_part_blob_deltas" + where + " order by seq",
                                      *args)
        return [(r["rule_id"], r["rule_hash"], r["partition"], bytes(r["blob"])) for r in rows]

    async def load_watermarks(self, group: str, topic: str) -> dict[int, int]:
        rows = await self.pool.fetch("select partition, watermark_ms from "
                                     "alert_consumer_offsets where grp = $1 and topic = $2 "
                                     "and watermark_ms is not null", group, topic)
        return {r["partition"]: r["watermark_ms"] for r in rows}

    async def load_offsets(self, group: str) -> dict[tuple[str, int], int]:
        rows = await self.pool.fetch("select topic, partition, next_offset from "
                                     "alert_consumer_offsets where grp = $1", group)
        return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
