"""Incidents in PostgreSQL: alerts joined into incidents, inhibition, announcements, and
what operators do to them.

The alert store calls ``attach`` inside the transaction that writes alert changes, so an
alert and its incident membership commit together: with N alerts workers, the
one-open-incident-per-group index makes them agree on the incident (``insert .. on
conflict``), and counts are recomputed from the alerts themselves, never incremented, so
a replayed batch or two workers touching one incident cannot make them drift. Everything
is set-based: a district outage joining 2,000 alerts is a handful of statements.

The clock (``tick``) announces incidents whose group wait is over, re-checks inhibition
and resolves incidents that stayed quiet (no active alert) for their group interval.
Operator actions (``act``) act on the incident's alerts too, with both audit trails.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from alerts.incidents.grouping import DEFAULT_GROUP, Grouped, group_config, group_of
from alerts.incidents.model import Incident, IncidentChange
from alerts.incidents.storm import StormControl
from alerts.incidents.texts import incident_title
from alerts.incidents.webhook import enqueue_critical
from alerts.metrics import INCIDENT_CHANGES, INCIDENTS_OPEN, INCIDENTS_OPENED
from alerts.model import SEVERITY_RANK, Alert, AlertChange
from alerts.ruleset import SEVERITIES, Group, Inhibit, InhibitSide, RuleSet
from alerts.store import row_to_alert, where_equal

SYSTEM = "system"
_SEVS = "array['critical','major','minor','warning','info']"
_RANK = f"array_position({_SEVS}, {{}})"  # 1 = critical
_TIMES = ("first_seen", "last_seen", "acked_at", "announced_at", "resolved_at", "created_at",
          "updated_at")


def _ms(ts: datetime | None) -> int | None:
    return None if ts is None else int(ts.timestamp() * 1000)


def row_to_incident(row: asyncpg.Record) -> Incident:
    d = {k: v for k, v in dict(row).items() if k in Incident.__struct_fields__}
    for k in _TIMES:
        d[k] = _ms(d.get(k))
    if isinstance(d.get("title_args"), str):
        d["title_args"] = json.loads(d["title_args"])
    return Incident(**d)


def _side_sql(side: InhibitSide, alias: str, args: list[Any]) -> str:
    """SQL conditions on incident ``alias`` for one side of an inhibit rule."""
    conds: list[str] = []
    if side.rules:
        args.append(list(side.rules))
        conds.append(f"{alias}.rule_id = any(${len(args)}::text[])")
    if side.min_severity is not None:
        conds.append(f"{_RANK.format(alias + '.severity')} <= "
                     f"{SEVERITIES.index(side.min_severity) + 1}")
    if side.max_severity is not None:
        conds.append(f"{_RANK.format(alias + '.severity')} >= "
                     f"{SEVERITIES.index(side.max_severity) + 1}")
    return " and ".join(conds) or "true"


@dataclass(frozen=True, slots=True)
class Acted:
    """What an operator's action changed: the incident, its alerts, and the incidents it
    released (resolving a cause shows what it held back)."""

    change: IncidentChange
    alerts: list[AlertChange]
    released: list[IncidentChange]


class IncidentStore:
    def __init__(self, pool: asyncpg.Pool, rules: RuleSet | None = None,
                 gateways: dict[str, str] | None = None) -> None:
        self.pool = pool
        self.gateways = gateways or {}
        self.storm = StormControl()
        self.set_rules(rules)

    def set_rules(self, rules: RuleSet | None) -> None:
        self.rules = rules
        self.groups: dict[str, Group] = group_config(rules)
        self.inhibit: tuple[Inhibit, ...] = rules.inhibit if rules else ()

    def _group(self, rule_id: str) -> Group:
        return self.groups.get(rule_id, DEFAULT_GROUP)

    def _per_rule(self, attr: str) -> tuple[list[str], list[float]]:
        ids = list(self.groups)
        return ids, [float(getattr(self.groups[r], attr)) for r in ids]

    # --- the engine side: inside the alert store's transaction ------------------------------
    async def attach(self, conn: asyncpg.Connection, changes: Sequence[AlertChange]
                     ) -> list[IncidentChange]:
        """Put raised alerts into their incidents, recount the incidents whose alerts
        changed, re-check inhibition, announce what needs no wait. Returns the incident
        changes (to publish once the transaction has committed)."""
        if not changes:
            return []
        now_ms = int(time.time() * 1000)
        raised = [c.alert for c in changes if c.action == "raised"]
        storming = self.storm.observe(
            Counter(a.rule_id for a in raised),
            {r: g.storm_per_min for r, g in self.groups.items()}, time.time())
        opened: set[int] = set()
        joined: Counter[int] = Counter()
        touched: set[int] = {c.alert.incident_id for c in changes
                             if c.action == "cleared" and c.alert.incident_id}
        if raised:
            groups: dict[str, tuple[Grouped, Alert]] = {}
            members: list[tuple[int, str]] = []
            for a in raised:
                g = group_of(a, self._group(a.rule_id), self.gateways)
                groups.setdefault(g.key, (g, a))
                members.append((a.alert_id, g.key))
            rows = await self._open(conn, list(groups.values()))
            ids = {r["group_key"]: r["incident_id"] for r in rows}
            opened = {r["incident_id"] for r in rows if r["inserted"]}
            await conn.execute(
                "update alerts a set incident_id = u.iid from unnest($1::bigint[], "
                "$2::bigint[]) as u(aid, iid) where a.alert_id = u.aid",
                [aid for aid, _ in members], [ids[k] for _, k in members])
            for a, (_, k) in zip(raised, members, strict=True):
                joined[ids[k]] += 1
                a.incident_id = ids[k]  # the change published says where it went
            touched |= set(ids.values())
        out: dict[int, IncidentChange] = {}
        if touched:
            for row in await conn.fetch(
                    "update alert_incidents i set alert_count = c.n, active_count = c.active, "
                    " sensor_count = c.sensors, severity = c.worst, last_seen = now(), "
                    " storm = i.storm or i.rule_id = any($2::text[]), "
                    " updated_at = now(), version = i.version + 1 "
                    "from (select incident_id, count(*) as n, "
                    "       count(*) filter (where state = 'active') as active, "
                    "       count(distinct coalesce(sensor_id, source)) as sensors, "
                    f"      ({_SEVS})[min({_RANK.format('severity')})] as worst "
                    "      from alerts where incident_id = any($1::bigint[]) "
                    "      group by incident_id) c "
                    "where i.incident_id = c.incident_id returning i.*",
                    list(touched), list(storming)):
                iid = row["incident_id"]
                action = "opened" if iid in opened else "joined" if joined[iid] else "updated"
                out[iid] = IncidentChange(action=action, actor=SYSTEM, at=now_ms,
                                          incident=row_to_incident(row))
            audits = [(iid, "opened" if iid in opened else "joined", {"alerts": n})
                      for iid, n in joined.items()]
            await self._audit(conn, audits)
            for iid in opened:
                if iid in out:
                    INCIDENTS_OPENED.labels(out[iid].incident.severity).inc()
        # in order: what happened to each incident, then its inhibition and announcement
        return [*out.values(), *await self._inhibit(conn, now_ms),
                *await self._announce(conn, now_ms, wait=False)]

    async def _open(self, conn: asyncpg.Connection, groups: list[tuple[Grouped, Alert]]
                    ) -> list[asyncpg.Record]:
        """One open incident per group key: the existing one, or a new one named after the
        group's first alert."""
        cols: list[list[Any]] = [[] for _ in range(12)]
        for g, a in groups:
            args = {**(a.details or {}), "sensor_id": a.sensor_id or "", "value": a.value,
                    "landmark": a.landmark, "district": a.district, "source": a.source,
                    **g.fields}
            args = {k: v for k, v in args.items() if isinstance(v, str | int | float)}
            fields = {**{"landmark": a.landmark, "district": a.district, "gateway": "",
                         "domain": a.domain}, **{k: v for k, v in g.fields.items()
                                                 if k in ("landmark", "district", "gateway",
                                                          "domain")}}
            for col, v in zip(cols, (
                    g.key, a.rule_id, a.severity,
                    incident_title("en", a.rule_id, args, g.place, a.title),
                    {**args, "place_field": g.place}, fields["domain"], fields["district"],
                    fields["landmark"], fields["gateway"], a.lat, a.lon,
                    datetime.fromtimestamp(a.raised_at / 1000, UTC)), strict=True):
                col.append(v)
        return await conn.fetch(
            "insert into alert_incidents (group_key, rule_id, severity, title, title_args, "
            " domain, district, landmark, gateway, lat, lon, first_seen, last_seen) "
            "select u.*, u.first_seen from unnest($1::text[], $2::text[], $3::text[], "
            " $4::text[], $5::jsonb[], $6::text[], $7::text[], $8::text[], $9::text[], "
            " $10::float8[], $11::float8[], $12::timestamptz[]) as u(group_key, rule_id, "
            " severity, title, title_args, domain, district, landmark, gateway, lat, lon, "
            " first_seen) "
            "on conflict (group_key) where state = 'open' do update set updated_at = now() "
            "returning incident_id, group_key, (xmax = 0) as inserted", *cols)

    async def _audit(self, conn: asyncpg.Connection,
                     rows: list[tuple[int, str, dict[str, Any]]], actor: str = SYSTEM) -> None:
        if rows:
            await conn.execute(
                "insert into incident_audit (incident_id, actor, action, detail) "
                "select u.i, $4, u.a, u.d from unnest($1::bigint[], $2::text[], $3::jsonb[]) "
                "as u(i, a, d)", [r[0] for r in rows], [r[1] for r in rows],
                [r[2] for r in rows], actor)

    async def _inhibit(self, conn: asyncpg.Connection, now_ms: int) -> list[IncidentChange]:
        """Point open incidents under the open incident that inhibits them (the lowest id
        of those matching), and release those whose cause is no longer open."""
        out: list[IncidentChange] = []
        for rule in self.inhibit:
            args: list[Any] = []
            src = _side_sql(rule.source, "s", args)
            tgt = _side_sql(rule.target, "t2", args)
            eq = " and ".join(f"s.{f} = t2.{f} and s.{f} <> ''" for f in rule.equal)
            rows = await conn.fetch(
                "update alert_incidents t set inhibited_by = x.sid, updated_at = now(), "
                " version = t.version + 1 "
                "from (select t2.incident_id as tid, min(s.incident_id) as sid "
                "      from alert_incidents t2 join alert_incidents s "
                "      on s.state = 'open' and s.incident_id <> t2.incident_id "
                f"     and s.inhibited_by is null and {src} and {eq} "
                f"     where t2.state = 'open' and {tgt} group by t2.incident_id) x "
                "where t.incident_id = x.tid and t.inhibited_by is null returning t.*", *args)
            out += [IncidentChange(action="inhibited", actor=SYSTEM, at=now_ms,
                                   incident=row_to_incident(r)) for r in rows]
        rows = await conn.fetch(
            "update alert_incidents t set inhibited_by = null, updated_at = now(), "
            " version = t.version + 1 where t.state = 'open' and t.inhibited_by is not null "
            "and not exists (select 1 from alert_incidents s where s.incident_id = "
            " t.inhibited_by and s.state = 'open') returning t.*")
        out += [IncidentChange(action="released", actor=SYSTEM, at=now_ms,
                               incident=row_to_incident(r)) for r in rows]
        await self._audit(conn, [(c.incident.incident_id, c.action,
                                  {"by": c.incident.inhibited_by}) for c in out])
        return out

    async def _announce(self, conn: asyncpg.Connection, now_ms: int, *, wait: bool
                        ) -> list[IncidentChange]:
        """Announce open, not inhibited incidents whose group wait is over (``wait``
        False: only those of rules with no wait), and announced ones whose severity got
        worse since. Critical ones go to the webhook outbox in this transaction."""
        ids, waits = self._per_rule("wait_s")
        rows = await conn.fetch(
            "update alert_incidents i set announced_at = now(), announced_severity = "
            " i.severity, updated_at = now(), version = i.version + 1 "
            "where i.state = 'open' and i.inhibited_by is null and ("
            " (i.announced_at is null and i.first_seen <= now() - make_interval(secs => "
            "  coalesce((select w from unnest($1::text[], $2::float8[]) as g(r, w) "
            "            where g.r = i.rule_id), 0))"
            "  and ($3 or coalesce((select w from unnest($1::text[], $2::float8[]) as g(r, w) "
            "            where g.r = i.rule_id), 0) = 0)) "
            f" or (i.announced_at is not null and {_RANK.format('i.severity')} < "
            f"     {_RANK.format('i.announced_severity')})) returning i.*", ids, waits, wait)
        changes = [IncidentChange(action="announced", actor=SYSTEM, at=now_ms,
                                  incident=row_to_incident(r)) for r in rows]
        await self._audit(conn, [(c.incident.incident_id, "announced",
                                  {"severity": c.incident.severity}) for c in changes])
        critical = [c.incident for c in changes if c.incident.severity == "critical"]
        if critical:
            await enqueue_critical(conn, critical)
        return changes

    async def tick(self) -> list[IncidentChange]:
        """The clock's turn: announce incidents whose wait is over, resolve the ones quiet
        for their group interval, re-check inhibition; count the open ones."""
        now_ms = int(time.time() * 1000)
        ids, intervals = self._per_rule("interval_s")
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "update alert_incidents i set state = 'resolved', resolved_at = now(), "
                " resolved_by = $3, updated_at = now(), version = i.version + 1 "
                "where i.state = 'open' and i.active_count = 0 and i.last_seen <= now() - "
                " make_interval(secs => coalesce((select v from unnest($1::text[], "
                "  $2::float8[]) as g(r, v) where g.r = i.rule_id), $4)) returning i.*",
                ids, intervals, SYSTEM, DEFAULT_GROUP.interval_s)
            out = [IncidentChange(action="resolved", actor=SYSTEM, at=now_ms,
                                  incident=row_to_incident(r)) for r in rows]
            await self._audit(conn, [(c.incident.incident_id, "resolved", {"quiet": True})
                                     for c in out])
            out += await self._inhibit(conn, now_ms)
            out += await self._announce(conn, now_ms, wait=True)
            counts = await conn.fetch("select severity, count(*) as n from alert_incidents "
                                      "where state = 'open' and inhibited_by is null "
                                      "group by severity")
        got = {r["severity"]: r["n"] for r in counts}
        for sev in SEVERITY_RANK:
            INCIDENTS_OPEN.labels(sev).set(got.get(sev, 0))
        return out

    # --- operators ---------------------------------------------------------------------------
    async def act(self, incident_id: int, action: str, actor: str, *, note: str | None = None,
                  assignee: str | None = None) -> Acted | None:
        """An operator's action on an open incident and its active alerts (acknowledged,
        assigned, commented, resolved): None if there is no such open incident."""
        sql = {
            "acknowledged": "acknowledged = true, acked_by = $2, acked_at = now(),",
            "assigned": "assignee = $3,",
            "commented": "",
            "resolved": "state = 'resolved', resolved_at = now(), resolved_by = $2,",
        }[action]
        alert_sql = {
            "acknowledged": "acknowledged = true, acked_by = $2, acked_at = now(),",
            "assigned": "assignee = $3,",
            "commented": None,
            "resolved": "state = 'cleared', cleared_at = now(), cleared_by = $2,",
        }[action]
        now_ms = int(time.time() * 1000)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"update alert_incidents set {sql} updated_at = now(), version = version + 1 "
                "where incident_id = $1 and state = 'open' and $2::text is not null "
                "and ($3::text is null or true) returning *", incident_id, actor, assignee)
            if row is None:
                return None
            detail: dict[str, Any] = {"version": row["version"]}
            if note:
                detail["note"] = note
            if assignee:
                detail["assignee"] = assignee
            await self._audit(conn, [(incident_id, action, detail)], actor)
            alert_changes: list[AlertChange] = []
            if alert_sql is not None:
                alerts = await conn.fetch(
                    f"update alerts set {alert_sql} updated_at = now(), version = version + 1 "
                    "where incident_id = $1 and state = 'active' and $2::text is not null "
                    "and ($3::text is null or true) returning *", incident_id, actor, assignee)
                if alerts:
                    await conn.execute(
                        "insert into alert_audit (alert_id, actor, action, detail) "
                        "select u, $2, $3, $4 from unnest($1::bigint[]) as u",
                        [a["alert_id"] for a in alerts], actor, action,
                        {**detail, "incident_id": incident_id})
                alert_changes = [AlertChange(action=action, actor=actor, at=now_ms,
                                             alert=row_to_alert(a), note=note) for a in alerts]
                if action == "resolved" and alerts:
                    row = await conn.fetchrow(
                        "update alert_incidents set active_count = 0 where incident_id = $1 "
                        "returning *", incident_id)
            if action == "resolved":
                changes = await self._inhibit(conn, now_ms)  # what it held back shows again
            else:
                changes = []
        assert row is not None
        change = IncidentChange(action=action, actor=actor, at=now_ms,
                                incident=row_to_incident(row), note=note)
        return Acted(change, alert_changes, changes)

    # --- reads -------------------------------------------------------------------------------
    async def get(self, incident_id: int) -> Incident | None:
        row = await self.pool.fetchrow("select * from alert_incidents where incident_id = $1",
                                       incident_id)
        return None if row is None else row_to_incident(row)

    async def search(self, *, state: str | None = None, domain: str | None = None,
                     district: str | None = None, severity: str | None = None,
                     acknowledged: bool | None = None, include_inhibited: bool = False,
                     limit: int = 200) -> list[tuple[Incident, int]]:
        """Incidents, open first, newest change first, each with how many open incidents
        it inhibits."""
        args: list[Any] = []
        where = where_equal(args, "i.", state=state, domain=domain, district=district,
                            severity=severity, acknowledged=acknowledged)
        if not include_inhibited:
            where.append("i.inhibited_by is null")
        args.append(limit)
        rows = await self.pool.fetch(
            "select i.*, (select count(*) from alert_incidents x where x.inhibited_by = "
            " i.incident_id and x.state = 'open') as inhibits from alert_incidents i"
            + (" where " + " and ".join(where) if where else "")
            + f" order by (i.state = 'open') desc, {_RANK.format('i.severity')}, "
            f"i.updated_at desc limit ${len(args)}", *args)
        return [(row_to_incident(r), r["inhibits"]) for r in rows]

    async def detail(self, incident_id: int, alert_limit: int = 500) -> dict[str, Any] | None:
        """The incident, its alerts (active first), the incidents it inhibits, the
        sensors, and one timeline of alert raises/clears and every action on it."""
        inc = await self.get(incident_id)
        if inc is None:
            return None
        alerts = await self.pool.fetch(
            "select * from alerts where incident_id = $1 order by (state = 'active') desc, "
            "raised_at desc limit $2", incident_id, alert_limit)
        inhibited = await self.pool.fetch(
            "select *, 0 as inhibits from alert_incidents where inhibited_by = $1 "
            "order by updated_at desc limit 100", incident_id)
        sensors = await self.pool.fetch(
            "select distinct sensor_id from alerts where incident_id = $1 and sensor_id is "
            "not null order by sensor_id limit 1000", incident_id)
        timeline = await self.pool.fetch(
            "(select at, 'incident' as kind, actor, action, null::bigint as alert_id, detail "
            " from incident_audit where incident_id = $1) union all "
            "(select au.at, 'alert', au.actor, au.action, au.alert_id, au.detail "
            " from alert_audit au join alerts a using (alert_id) where a.incident_id = $1 "
            " and au.action in ('raised', 'cleared', 'escalated') order by au.at desc "
            " limit $2) order by at", incident_id, alert_limit)
        return {
            "incident": msgspec.to_builtins(inc),
            "inhibits": len(inhibited),
            "alerts": [msgspec.to_builtins(row_to_alert(r)) for r in alerts],
            "inhibited": [msgspec.to_builtins(row_to_incident(r)) for r in inhibited],
            "sensors": [r["sensor_id"] for r in sensors],
            "timeline": [{"at": _ms(r["at"]), "kind": r["kind"], "actor": r["actor"],
                          "action": r["action"], "alert_id": r["alert_id"],
                          "detail": r["detail"] if isinstance(r["detail"], dict)
                          else json.loads(r["detail"] or "{}")} for r in timeline],
        }


def count_change(change: IncidentChange) -> None:
    INCIDENT_CHANGES.labels(change.action).inc()
