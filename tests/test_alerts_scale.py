"""Alerts scale out (issue 15, item 5): N workers in one consumer group give the alerts one
worker gives, against the real Kafka and PostgreSQL of the test stack.

- The same recorded stream (per-sensor rules, counts per landmark and per district whose
  incidents come from sensors on partitions of different workers, a correlation, absence
  of registry sensors) gives the same alerts and the same transitions with 1 worker and
  with 2. A rule judged by both workers shows as an extra "updated" (the second raise of
  an active alert); one judged by neither, or with half its inputs, as a missing alert.
- A partition moving from one worker to the other (the first is stopped) keeps its
  state: a count that needs inputs before and after the move fires once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from alerts.scope import scope_partition
from alerts.testing import EventProducer, RunningService, make_event, now_ms
from cityops.city import LANDMARKS
from cityops.registry import Fleet, Sensor
from cityops.settings import Settings
from ingest.contract import Event
from tests.support import free_port

RUN = uuid.uuid4().hex[:6]
T0 = now_ms() - 30_000


def sid(name: str) -> str:
    return f"x{RUN}-{name}"


def pick(prefix: str, n: int, partitions: int, want: Callable[[list[int]], bool]) -> list[str]:
    """``n`` sensor ids whose events partitions (murmur2 of the id, as keyed) satisfy
    ``want``: the test places its sensors on chosen partitions, not by luck."""
    for k in range(10_000):
        ids = [sid(f"{prefix}{k}-{i}") for i in range(n)]
        if want([scope_partition(s, partitions) for s in ids]):
            return ids
    raise AssertionError("no sensor ids found")


def spans_both(parts: list[int]) -> bool:
    """Partitions of both parities: with round-robin assignment over two workers, on
    both workers (asserted against the real assignment below)."""
    return len({p % 2 for p in parts}) == 2


class Scenario:
    """The sensors, rules and recorded stream of the comparison."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.fillers = pick("f", 12, partitions, lambda ps: set(ps) == set(range(partitions)))
        self.intr = pick("i", 3, partitions, spans_both)
        self.doors = pick("d", 2, partitions, spans_both)
        self.crowd, self.jam, self.panic = sid("crowd"), sid("jam"), sid("panic")
        self.rate, self.quiet = sid("rate"), sid("quiet")
        self.reg = [sid("reg-a"), sid("reg-b")]

    def fleet(self) -> Fleet:
        lm = LANDMARKS[0]
        sensors = tuple(Sensor(s, "traffic", "lane_detector", "v", lm.district, lm.code,
                               lm.lat, lm.lon, 60, gateway=gw)
                        for s, gw in zip(self.reg, (f"gw{RUN}-a", None), strict=True))
        return Fleet(name="scale", groups=(), sensors=sensors)

    def rules(self, tag: str) -> str:
        return f"""
version: 1
rules:
  - id: crowd_{tag}
    type: threshold
    severity: major
    match: {{sensors: [{self.crowd}]}}
    metric: crowd_density
    op: ">="
    value: 4
  - id: jam_{tag}
    type: threshold
    severity: major
    match: {{sensors: [{self.jam}]}}
    metric: speed_kmh
    op: "<"
    value: 10
  - id: both_{tag}
    type: correlation
    severity: major
    rules: [crowd_{tag}, jam_{tag}]
    radius_m: 1500
  - id: intrusions_{tag}
    type: count
    severity: major
    match: {{sensors: [{", ".join(self.intr)}]}}
    incidents: [intrusion]
    count: 3
    window_s: 600
    per: landmark
  - id: breaches_{tag}
    type: count
    severity: major
    match: {{sensors: [{", ".join(self.doors)}]}}
    incidents: [door_forced]
    count: 2
    window_s: 600
    per: district
  - id: panic_{tag}
    type: count
    severity: major
    match: {{sensors: [{self.panic}]}}
    incidents: [panic]
    count: 2
    window_s: 600
  - id: jump_{tag}
    type: anomaly
    method: rate
    severity: warning
    match: {{sensors: [{self.rate}]}}
    metric: speed_kmh
    max_rate_per_s: 1.0
    clear_after_n: 2
  - id: offline_{tag}
    type: absence
    severity: warning
    match: {{sensors: [{", ".join([*self.reg, self.quiet])}]}}
    silence_s: 3
    include_registry: true
"""

    def stream(self) -> list[Event]:
        t = T0
        out = [make_event(s, t + 10 * i, speed_kmh=50.0) for i, s in enumerate(self.fillers)]
        out += [make_event(self.crowd, t + 1000, landmark="ninh_kieu_wharf",
                           domain="security", crowd_density=5.0),
                make_event(self.jam, t + 1100, landmark="ninh_kieu_wharf", speed_kmh=5.0),
                make_event(self.quiet, t + 1200, speed_kmh=40.0)]
        out += [make_event(s, t + 2000 + 100 * i, landmark="ctu", domain="security",
                           incident="intrusion") for i, s in enumerate(self.intr)]
        out += [make_event(s, t + 2500 + 100 * i, landmark="central_hospital",
                           domain="security", incident="door_forced")
                for i, s in enumerate(self.doors)]
        out += [make_event(self.panic, t + 3000 + 500 * i, domain="security",
                           incident="panic") for i in range(2)]
        out += [make_event(self.rate, t + 1000 * (i + 1), speed_kmh=v)
                for i, v in enumerate((50.0, 50.0, 10.0, 10.0, 10.0))]
        return out

    def expected(self) -> set[tuple[str, str, tuple[str, ...]]]:
        raised = ("raised",)
        return {("crowd", self.crowd, raised), ("jam", self.jam, raised),
                ("both", "landmark:ninh_kieu_wharf", raised),
                ("intrusions", "landmark:ctu", raised),
                ("breaches", "district:cai_rang", raised), ("panic", self.panic, raised),
                ("jump", self.rate, ("raised", "cleared")),
                *{("offline", s, raised) for s in [*self.reg, self.quiet]}}


@pytest.fixture(scope="module")
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    from alerts.store import create_pool

    p = await create_pool(settings.pg_dsn)
    yield p
    await p.close()


def worker(settings: Settings, rules: Path, group: str, fleet: Fleet | None = None
           ) -> RunningService:
    """A worker with its own static member id (a process of its own would have it)."""
    own = dataclasses.replace(settings, alerts_metrics_port=free_port())
    return RunningService(own, rules, group, update_every_s=0.0, checkpoint_s=0.2, tick_s=0.2,
                          fleet=fleet)


async def settled_split(workers: list[RunningService], partitions: int,
                        within: float = 60.0) -> None:
    """Until the group's assignment covers every partition of both topics, each exactly
    once, every worker has some, and it held for a second (no rebalance under way)."""
    deadline = time.monotonic() + within
    stable_since = None
    while time.monotonic() < deadline:
        owns = [w.service.ownership for w in workers]  # type: ignore[union-attr]
        ok = all(o is not None and o.events and o.scope for o in owns)
        if ok:
            for kind in ("events", "scope"):
                sets = [getattr(o, kind) for o in owns]
                ok = ok and sum(len(s) for s in sets) == partitions \
                    and set().union(*sets) == set(range(partitions))
        if ok:
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= 1.0:
                return
        else:
            stable_since = None
        await asyncio.sleep(0.1)
    raise AssertionError("the group's assignment did not settle")


async def outcome(pool: asyncpg.Pool, tag: str) -> set[tuple[str, str, tuple[str, ...]]]:
    """(rule without its tag, source, every action of its audit trail) per alert."""
    rows = await pool.fetch(
        "select a.rule_id, a.source, array_agg(u.action order by u.audit_id) as actions "
        "from alerts a join alert_audit u using (alert_id) where a.rule_id like $1 "
        "group by a.alert_id, a.rule_id, a.source", f"%\\_{tag}")
    return {(r["rule_id"].removesuffix(f"_{tag}"), r["source"], tuple(r["actions"]))
            for r in rows}


async def run_stream(settings: Settings, pool: asyncpg.Pool, sc: Scenario, tag: str,
                     n_workers: int, tmp: Path) -> tuple[set[Any], list[RunningService]]:
    rules = tmp / f"rules-{tag}.yaml"
    rules.write_text(sc.rules(tag))
    group = f"alerts-scale-{RUN}-{tag}"
    workers = [worker(settings, rules, group, sc.fleet()) for _ in range(n_workers)]
    try:
        for w in workers:
            await w.start()
        await settled_split(workers, sc.partitions)
        async with EventProducer(settings) as producer:
            await producer.send(*sc.stream())
        want = sc.expected()
        deadline = time.monotonic() + 45
        got: set[Any] = set()
        while time.monotonic() < deadline:
            got = await outcome(pool, tag)
            if {(r, s) for r, s, _ in got} >= {(r, s) for r, s, _ in want} and got >= want:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)  # room for a duplicate to show up
        return await outcome(pool, tag), workers
    finally:
        for w in workers:
            await w.stop()


async def test_one_and_two_workers_give_the_same_alerts(
        settings: Settings, pool: asyncpg.Pool, tmp_path: Path) -> None:
    sc = Scenario(settings.kafka_partitions)
    one, _ = await run_stream(settings, pool, sc, f"a{RUN}", 1, tmp_path)
    two, workers = await run_stream(settings, pool, sc, f"b{RUN}", 2, tmp_path)
    # the scope inputs really crossed workers: the counted incidents came from partitions
    # of both (so neither could have counted them alone)
    owns = [w.service.ownership for w in workers]  # type: ignore[union-attr]
    for ids in (sc.intr, sc.doors):
        parts = {scope_partition(s, sc.partitions) for s in ids}
        assert all(parts & o.events for o in owns), (parts, [o.events for o in owns])
    assert one == sc.expected()
    assert two == one


async def test_partition_moving_between_workers_keeps_its_state(
        settings: Settings, pool: asyncpg.Pool, tmp_path: Path) -> None:
    n = settings.kafka_partitions
    tag = f"m{RUN}"
    rules = tmp_path / "rules-move.yaml"
    panic = sid("mv-panic")
    rules.write_text(f"""
version: 1
rules:
  - id: panic3_{tag}
    type: count
    severity: major
    match: {{sensors: [{panic}]}}
    incidents: [panic]
    count: 3
    window_s: 600
  - id: intr3_{tag}
    type: count
    severity: major
    match: {{domains: [security], landmarks: [{", ".join(lm.code for lm in LANDMARKS)}]}}
    incidents: [intrusion]
    count: 3
    window_s: 600
    per: landmark
""")
    group = f"alerts-move-{RUN}"
    a, b = worker(settings, rules, group), worker(settings, rules, group)
    try:
        await a.start()
        await b.start()
        await settled_split([a, b], n)
        # the worker owning the panic sensor's partition, and a landmark whose scope
        # partition it owns too: stopping it moves both kinds of state
        first, other = (a, b) if scope_partition(panic, n) in a.service.ownership.events \
            else (b, a)  # type: ignore[union-attr]
        own = first.service.ownership  # type: ignore[union-attr]
        lm = next(lm for lm in LANDMARKS if own.owns_scope(f"landmark:{lm.code}"))
        intruders = [sid(f"mv-i{k}") for k in range(3)]

        def panic_at(k: int) -> Event:
            return make_event(panic, T0 + 1000 * k, domain="security", incident="panic")

        def intrusion(k: int) -> Event:
            return make_event(intruders[k], T0 + 1000 * k, domain="security",
                              landmark=lm.code, incident="intrusion")

        async with EventProducer(settings) as producer:
            await producer.send(panic_at(0), panic_at(1), intrusion(0), intrusion(1))
            engine = first.service.engine  # type: ignore[union-attr]
            deadline = time.monotonic() + 20
            while True:
                p = engine.evaluators[f"panic3_{tag}"].state.get(panic)
                i = engine.evaluators[f"intr3_{tag}"].state.get(f"landmark:{lm.code}")
                if p and i and len(p["hits"]) == 2 and len(i["hits"]) == 2:
                    break
                assert time.monotonic() < deadline, (p, i)
                await asyncio.sleep(0.1)
            await first.stop()  # checkpoints on the way out
            await producer.send(panic_at(2), intrusion(2))
        survivor = other.service
        assert survivor is not None

        async def actions() -> set[tuple[str, str, tuple[str, ...]]]:
            return await outcome(pool, tag)

        want = {("panic3", panic, ("raised",)), ("intr3", f"landmark:{lm.code}", ("raised",))}
        deadline = time.monotonic() + 60
        while (got := await actions()) != want:
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.2)
        assert survivor.ownership is not None
        assert survivor.ownership.events == set(range(n))
        await asyncio.sleep(1.5)
        assert await actions() == want
    finally:
        await a.stop()
        await b.stop()
