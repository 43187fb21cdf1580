"""AlertStore.apply against the session's PostgreSQL: the lifecycle, written set-based.

A batch is written as a few statements per run of distinct (rule, source) keys, so these
tests pin what must not change with that: signal order per key (a raise and a clear in
one batch both happen, in order), the audit trail in the same order, an update of a
cleared alert writes nothing, a raise of an active alert is an update, and a mass
raise/clear (a district's sensors going quiet together) is every alert exactly once.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from alerts.model import Signal, SignalKind
from alerts.store import AlertStore, create_pool
from cityops.settings import Settings

RULE = f"store-test-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.pg_dsn)
    yield p
    await p.close()


def sig(kind: SignalKind, source: str, value: float = 1.0, rule: str = RULE) -> Signal:
    return Signal(kind=kind, rule_id=rule, source=source, at_ms=1_700_000_000_000,
                  severity="warning", title=f"{source} offline", value=value,
                  sensor_id=source, domain="traffic", district="ninh_kieu",
                  details={"v": value})


def src(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


async def audit(pool: asyncpg.Pool, source: str) -> list[tuple[str, int]]:
    rows = await pool.fetch(
        "select action, (detail->>'version')::int as v from alert_audit u join alerts a "
        "using (alert_id) where a.rule_id = $1 and a.source = $2 order by audit_id",
        RULE, source)
    return [(r["action"], r["v"]) for r in rows]


async def test_raise_clear_raise_in_one_batch_keeps_order(pool: asyncpg.Pool) -> None:
    store = AlertStore(pool, update_every_s=0.0)
    s = src("flap")
    changes = await store.apply([sig(SignalKind.RAISE, s, 1), sig(SignalKind.CLEAR, s),
                                 sig(SignalKind.RAISE, s, 3)])
    assert [c.action for c in changes] == ["raised", "cleared", "raised"]
    first, second = changes[0].alert.alert_id, changes[2].alert.alert_id
    assert changes[1].alert.alert_id == first and second != first
    rows = await pool.fetch("select alert_id, state, value from alerts where rule_id = $1 "
                            "and source = $2 order by alert_id", RULE, s)
    assert [(r["state"], r["value"]) for r in rows] == [("cleared", 1.0), ("active", 3.0)]
    assert await audit(pool, s) == [("raised", 1), ("cleared", 2), ("raised", 1)]


async def test_raise_of_active_alert_is_an_update_and_update_of_cleared_writes_nothing(
        pool: asyncpg.Pool) -> None:
    store = AlertStore(pool, update_every_s=0.0)
    a, b = src("again"), src("gone")
    await store.apply([sig(SignalKind.RAISE, a, 1), sig(SignalKind.RAISE, b, 1)])
    await store.apply([sig(SignalKind.CLEAR, b)])
    changes = await store.apply([sig(SignalKind.RAISE, a, 5), sig(SignalKind.UPDATE, b, 9),
                                 sig(SignalKind.CLEAR, b)])
    assert [(c.action, c.alert.source, c.alert.value) for c in changes] == [
        ("updated", a, 5.0)]
    assert changes[0].alert.version == 2 and changes[0].alert.updates == 1
    assert await audit(pool, b) == [("raised", 1), ("cleared", 2)]


async def test_updates_are_throttled_and_superseded_within_a_batch(pool: asyncpg.Pool) -> None:
    store = AlertStore(pool, update_every_s=3600.0)
    s = src("busy")
    await store.apply([sig(SignalKind.RAISE, s, 1)])
    # raised just now: an update inside the throttle period writes nothing
    assert await store.apply([sig(SignalKind.UPDATE, s, 2)]) == []
    fresh = AlertStore(pool, update_every_s=0.0)
    changes = await fresh.apply([sig(SignalKind.UPDATE, s, v) for v in (2, 3, 4)])
    assert [(c.action, c.alert.value) for c in changes] == [("updated", 4.0)]


async def test_mass_raise_and_clear_writes_every_alert_once(pool: asyncpg.Pool) -> None:
    """A district's 2,000 sensors go quiet together, then report again."""
    store = AlertStore(pool, update_every_s=0.0)
    tag = src("district")
    sources = [f"{tag}-{i:04d}" for i in range(2000)]
    raised = await store.apply([sig(SignalKind.RAISE, s, i) for i, s in enumerate(sources)])
    assert [c.alert.source for c in raised] == sources
    assert {c.action for c in raised} == {"raised"}
    assert [c.alert.value for c in raised] == [float(i) for i in range(2000)]
    cleared = await store.apply([sig(SignalKind.CLEAR, s) for s in reversed(sources)])
    assert [c.alert.source for c in cleared] == sources[::-1]
    counts = await pool.fetchrow(
        "select count(*) filter (where state = 'cleared') as cleared, "
        " count(*) filter (where state = 'active') as active, "
        " (select count(*) from alert_audit u join alerts b using (alert_id) "
        "   where b.rule_id = $1 and b.source like $2 || '-%') as audit "
        "from alerts where rule_id = $1 and source like $2 || '-%'", RULE, tag)
    assert dict(counts) == {"cleared": 2000, "active": 0, "audit": 4000}


async def test_active_can_be_limited_to_rules(pool: asyncpg.Pool) -> None:
    store = AlertStore(pool, update_every_s=0.0)
    other = f"{RULE}-other"
    a, b = src("mine"), src("theirs")
    await store.apply([sig(SignalKind.RAISE, a), sig(SignalKind.RAISE, b, rule=other)])
    got = {(x.rule_id, x.source) for x in await store.active([other])}
    assert (other, b) in got and all(r == other for r, _ in got)
    assert {(RULE, a), (other, b)} <= {(x.rule_id, x.source) for x in await store.active()}


async def test_a_checkpoint_of_a_worker_whose_partitions_were_claimed_is_refused(
        pool: asyncpg.Pool) -> None:
    """Two alerts workers: the one that lost a partition without hearing of it (stuck past
    the rebalance timeout) must not overwrite what its successor checkpoints."""
    from alerts.store import Fenced

    store = AlertStore(pool)
    group, held = f"fence-{uuid.uuid4().hex[:6]}", [("ev", 0), ("sc", 0)]
    row = (RULE, "h", src("fence"), {"n": 1}, "ev", 0)
    await store.claim(group, "old", held)
    await store.checkpoint(group, [row], {("ev", 0): 10}, owner=("old", held))
    await store.claim(group, "new", held[:1])  # the successor took events partition 0
    with pytest.raises(Fenced):
        await store.checkpoint(group, [(*row[:3], {"n": 2}, *row[4:])], {("ev", 0): 5},
                               owner=("old", held))
    assert (await store.load_offsets(group))[("ev", 0)] == 10
    got = [r for r in await store.load_state([("ev", 0)]) if r[2] == row[2]]
    assert got[0][3] == {"n": 1}
    await store.checkpoint(group, [], {("ev", 0): 12}, owner=("new", held[:1]))
    assert (await store.load_offsets(group))[("ev", 0)] == 12
