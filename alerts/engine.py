"""The rule engine: every running rule's evaluator, fed batches, ticks and active alerts.

Rules reading windows (``input: rollup_1m``/``rollup_1h``) get them from ``Windows``, computed
here from the events (``alerts.windows``), not from the processors' rollup partials.

The engine is pure computation over events, time and alerts; it owns no I/O, so the
service decides when to checkpoint its state and the tests can drive it directly.
Reloading rules keeps the state of every rule whose definition did not change.

As one of N workers (``own``, see ``alerts.scope``) the engine judges only what its
partitions own: the inputs of rules spanning sensors go to ``outbox`` for the scope topic
and come back through ``on_scoped`` on the scope's owner, and state is snapshotted,
dropped (``drop``) and restored per partition.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from alerts.batch import Batch, Place, SensorIndex
from alerts.evaluators import (
    EVALUATORS,
    AbsenceEvaluator,
    CorrelationEvaluator,
    CountEvaluator,
    Evaluator,
    OutageEvaluator,
)
from alerts.metrics import EVAL_SECONDS, RULES_EVALUATED, RULES_LOADED
from alerts.model import Alert, Signal
from alerts.rows import Rows
from alerts.ruleset import Match, Rule, RuleSet, rule_hash, rule_input
from alerts.scope import Ownership, ScopeInput
from alerts.windows import Windows
from cityops.registry import Fleet
from ingest.contract import Event

WINDOWS_PREFIX = "__windows__:"  # checkpoint rows of the window sets: not a rule id
DEFAULT_LATENESS_MS = 10_000


def registry_places(fleet: Fleet | None) -> dict[str, Place]:
    if fleet is None:
        return {}
    return {s.sensor_id: Place(s.sensor_id, s.domain, s.type, s.district, s.landmark, s.lat,
                               s.lon, s.interval_s) for s in fleet}


class Engine:
    def __init__(self, rules: RuleSet, fleet: Fleet | None = None,
                 lateness_ms: int = DEFAULT_LATENESS_MS) -> None:
        self.index = SensorIndex(registry_places(fleet))
        # sensor -> gateway, for rules judging gateways (outage per gateway)
        self.index.gateways = {s.sensor_id: s.gateway for s in fleet or () if s.gateway}
        self.clock = self.index.clock
        self.windows = Windows(self.index, lateness_ms)
        self.evaluators: dict[str, Evaluator] = {}
        self.rules = rules
        self.set_rules(rules)
        # Scale-out (``alerts.scope``): with an ownership, the inputs of rules spanning
        # sensors go to ``outbox`` (for the scope topic) instead of being judged here, and
        # state is checkpointed, dropped and loaded per partition.
        self.ownership: Ownership | None = None
        self.topics = ("", "")  # (events topic, scope topic) the partitions belong to
        self.outbox: list[ScopeInput] = []

    def own(self, ownership: Ownership, events_topic: str, scope_topic: str) -> None:
        """Run as one of N workers: see ``alerts.scope``."""
        self.ownership = self.index.ownership = ownership
        self.topics = (events_topic, scope_topic)

    def _build(self, rule: Rule) -> Evaluator:
        return EVALUATORS[type(rule)](rule, self.index)

    def set_rules(self, rules: RuleSet) -> list[str]:
        """Swap in a new rule set; returns ids of rules whose state was dropped."""
        kept: dict[str, Evaluator] = {}
        for rule in rules.rules:
            if not rule.enabled:
                continue
            old = self.evaluators.get(rule.id)
            kept[rule.id] = old if old is not None and old.hash == rule_hash(rule) \
                else self._build(rule)
        dropped = [rid for rid, ev in self.evaluators.items() if kept.get(rid) is not ev]
        self.evaluators, self.rules = kept, rules
        self.windows.set_wants(window_wants(kept.values()))
        RULES_LOADED.set(len(kept))
        return dropped

    def evaluate(self, events: Sequence[Event] | Sequence[Rows], source: str = "events",
                 partitions: np.ndarray | None = None) -> list[Signal]:
        """Run the rules reading ``source`` over a batch: ``Event`` structs, or decoded
        runs in columns (``alerts.decode.decode_rows``, the service's path). For
        ``events`` (the stream), also fold the batch into the rules' windows and run the
        window rules over the windows that closed. ``partitions``: the events topic
        partition of each event (what the event-time clocks of absence and the windows
        follow)."""
        out: list[Signal] = []
        if not events:
            return out
        if isinstance(events[0], Rows):
            if not any(len(r) for r in events):  # type: ignore[arg-type]
                return out
            batch = Batch(events, self.index, partitions)  # type: ignore[arg-type]
        else:
            batch = Batch.of_events(events, self.index, partitions)  # type: ignore[arg-type]
        self._run(batch, source, out)
        if source == "events" and self.windows.sets:
            for src, closed in self.windows.on_batch(batch, self.clock).items():
                self._run(Batch.of_events(closed, self.index), src, out)
        return out

    def _run(self, batch: Batch, source: str, out: list[Signal]) -> None:
        started = time.perf_counter()
        routed = self.ownership is not None
        for ev in self.evaluators.values():
            if not isinstance(ev, CorrelationEvaluator) and rule_input(ev.rule) == source:
                if routed and isinstance(ev, CountEvaluator) and ev.scoped:
                    self.outbox += ev.collect(batch)  # judged by the scope's owner
                else:
                    ev.on_batch(batch, out)
                RULES_EVALUATED.labels(_kind(ev)).inc()
        EVAL_SECONDS.observe(time.perf_counter() - started)

    def tick(self, now_ms: int) -> list[Signal]:
        """The clock's turn: windows the watermarks closed, absence, count/geofence expiry."""
        out: list[Signal] = []
        for src, closed in self.windows.on_tick(self.clock).items():
            self._run(Batch.of_events(closed, self.index), src, out)
        for ev in self.evaluators.values():
            if isinstance(ev, AbsenceEvaluator) or type(ev).on_tick is not Evaluator.on_tick:
                ev.on_tick(now_ms, out)
                RULES_EVALUATED.labels(_kind(ev)).inc()
        return out

    def take_outbox(self) -> list[ScopeInput]:
        out, self.outbox = self.outbox, []
        return out

    def on_scoped(self, inputs: list[ScopeInput]) -> list[Signal]:
        """Inputs read from the scope topic, judged by their rules (in order). Inputs of a
        rule that is gone or changed since they were published are dropped."""
        out: list[Signal] = []
        by_rule: dict[str, list[ScopeInput]] = {}
        for inp in inputs:
            by_rule.setdefault(inp.rule_id, []).append(inp)
        for rid, group in by_rule.items():
            ev = self.evaluators.get(rid)
            if isinstance(ev, CountEvaluator) and ev.hash == group[0].rule_hash:
                ev.on_inputs([i for i in group if i.rule_hash == ev.hash], out)
                RULES_EVALUATED.labels("count").inc()
        return out

    # --- ownership of partitions -------------------------------------------------------------
    def key_partition(self, ev: Evaluator, key: str) -> tuple[str, int]:
        """(topic, partition) whose owner holds ``key`` of ``ev``: ("", -1) when this
        engine owns everything."""
        own = self.ownership
        if own is None:
            return "", -1
        if ev.scoped:
            return self.topics[1], own.scope_of(key)
        return self.topics[0], int(own.parts_of(np.array([self.index.code(key)]))[0])

    def _array_sets(self) -> list[Any]:
        sets = [ev.arrays for ev in self.evaluators.values() if hasattr(ev, "arrays")]
        return sets + [ws.arrays for ws in self.windows.sets.values()]

    def assigned(self, events_parts: set[int]) -> None:
        """Partitions taken over, before their checkpoint is loaded: registry sensors of
        those partitions are set up as at start (absence with ``include_registry``)."""
        own = self.ownership
        if own is None or not events_parts:
            return
        codes = np.array([self.index.code(sid) for sid in self.index.registry], np.int64)
        if codes.size:
            codes = codes[np.isin(own.parts_of(codes), list(events_parts))]
        for ev in self.evaluators.values():
            ev.on_assigned(codes)

    def drop(self, events_parts: set[int], scope_parts: set[int]) -> None:
        """Forget the state of partitions revoked from this worker (checkpointed just
        before): its next owner loads it, and a stale copy here must never be judged or
        written again."""
        own = self.ownership
        if own is None:
            return
        sc_topic = self.topics[1]

        def gone(ev: Evaluator) -> Any:
            def test(key: str) -> bool:
                topic, p = self.key_partition(ev, key)
                return p in (scope_parts if topic == sc_topic else events_parts)
            return test

        for ev in self.evaluators.values():
            ev.drop_keys(gone(ev))
        if events_parts:
            n = len(self.index.ids)
            codes = np.arange(n)
            codes = codes[np.isin(own.parts_of(codes), list(events_parts))]
            for arrays in self._array_sets():
                arrays.drop(codes)
            dropped = set(codes.tolist())
            for ws in self.windows.sets.values():
                if ws.values:
                    for k in [k for k in ws.values if k[0] in dropped]:
                        del ws.values[k]
            self.clock.forget(events_parts)

    def _correlators(self, outages: bool) -> list[CorrelationEvaluator]:
        return [ev for ev in self.evaluators.values() if isinstance(ev, CorrelationEvaluator)
                and isinstance(ev, OutageEvaluator) == outages]

    def has_correlations(self, outages: bool = False) -> bool:
        """Correlation rules (``outages``: outage rules, which the service runs on a slower
        clock: they read every active alert of a rule that can have thousands)."""
        return bool(self._correlators(outages))

    def correlated_rules(self, outages: bool = False) -> list[str]:
        """The rules whose active alerts the correlation (or outage) rules read, and their
        own."""
        ids: set[str] = set()
        for ev in self._correlators(outages):
            ids.add(ev.rule.id)
            ids.update(ev.reads())
        return sorted(ids)

    def correlate(self, active: list[Alert], now_ms: int, outages: bool = False
                  ) -> list[Signal]:
        out: list[Signal] = []
        for ev in self._correlators(outages):
            ev.on_alerts(active, now_ms, out)
            RULES_EVALUATED.labels(_kind(ev)).inc()
        return out

    # --- checkpointing ---------------------------------------------------------------------
    def snapshot(self) -> list[tuple[str, str, str, dict[str, Any] | None, str, int]]:
        """(rule id, rule hash, key, state or None to delete, topic, partition) for every
        changed key; (topic, partition): whose owner holds the key (``key_partition``)."""
        rows = []
        own = self.ownership
        for rid, ev in self.evaluators.items():
            for key, st in ev.snapshot().items():
                topic, p = self.key_partition(ev, key)
                if own is not None and p not in (own.scope if ev.scoped else own.events):
                    continue  # another worker's key: its row is theirs to write
                rows.append((rid, ev.hash, key, st, topic, p))
        return rows

    def mark_all_dirty(self, failed: Iterable[tuple[Any, ...]] = ()) -> None:
        """After a failed checkpoint: everything goes into the next one, including the
        keys of the failed snapshot (a key deleted since the last good checkpoint is no
        longer in ``state``, and its row must still be deleted)."""
        for rid, _, key, *_ in failed:
            ev = self.evaluators.get(rid)
            if ev is not None:
                ev.dirty.add(key)
        for ev in self.evaluators.values():
            ev.dirty.update(ev.state)
            arrays = getattr(ev, "arrays", None)
            if arrays is not None:
                arrays.full = True  # the failed delta is lost: write everything next
        for ws in self.windows.sets.values():
            ws.arrays.full = True

    def snapshot_blobs(self) -> list[tuple[str, str, int, bytes, bool]]:
        """(rule id, rule hash, partition, blob, is_full) for every array state that
        changed: the array evaluators' and the window sets' (see ``alerts.slots``), one
        blob per owned events partition (-1: this engine owns everything)."""
        own = self.ownership
        parts: np.ndarray | None = None
        owned: set[int] | None = None
        if own is not None:
            parts = own.parts_of(np.arange(len(self.index.ids)))
            owned = set(own.events)
        out = []
        for rid, ev in self.evaluators.items():
            arrays = getattr(ev, "arrays", None)
            if arrays is not None:
                out += [(rid, ev.hash, *got) for got in arrays.take_parts(parts, owned)]
        for key, ws in self.windows.sets.items():
            out += [(f"{WINDOWS_PREFIX}{key[0]}:{key[1]}", self.windows.digest(key), *got)
                    for got in ws.arrays.take_parts(parts, owned)]
        return out

    def _keep(self, partition: int, events_parts: set[int] | None) -> Any:
        """Which rows of a stored blob to load: all of a partition's own blob; of a blob
        written before partitioning (-1), the sensors of the partitions being loaded."""
        own = self.ownership
        if own is None or partition >= 0:
            return None
        wanted = list(own.events if events_parts is None else events_parts)
        return lambda codes: np.isin(own.parts_of(codes), wanted)

    def restore_blobs(self, rows: Iterable[tuple[str, str, int, bytes]],
                      events_parts: set[int] | None = None) -> int:
        """Bases and deltas, in the order written; a partition's sensors are known to
        belong to it from then on (until their events say otherwise)."""
        n = 0
        for rid, h, partition, blob in rows:
            arrays = None
            if rid.startswith(WINDOWS_PREFIX):
                window, _, metric = rid.removeprefix(WINDOWS_PREFIX).partition(":")
                ws = self.windows.sets.get((window, metric))
                if ws is not None and self.windows.digest((window, metric)) == h:
                    arrays = ws.arrays
            else:
                ev = self.evaluators.get(rid)
                if ev is not None and ev.hash == h:
                    arrays = getattr(ev, "arrays", None)
            if arrays is None:
                continue
            codes = arrays.load_bytes(blob, self._keep(partition, events_parts))
            if partition >= 0:
                self.clock.settle(codes, partition)
            elif self.ownership is not None:  # rewritten as partitioned bases next time
                arrays.full_parts |= self.ownership.events if events_parts is None \
                    else events_parts
            n += 1
        return n

    def restore(self, rows: Iterable[tuple[Any, ...]], events_parts: set[int] | None = None,
                scope_parts: set[int] | None = None) -> int:
        """Load checkpointed state: (rule id, hash, key, state[, topic, partition]); rows
        of rules that changed since are ignored, and so are rows written before
        partitioning (partition -1) whose key is not in the partitions being loaded
        (default: all owned)."""
        n = 0
        ev_topic = self.topics[0]
        own = self.ownership
        if own is not None:
            events_parts = own.events if events_parts is None else events_parts
            scope_parts = own.scope if scope_parts is None else scope_parts
        for rid, h, key, st, *where in rows:
            ev = self.evaluators.get(rid)
            if ev is None or ev.hash != h:
                continue
            topic, partition = where if where else ("", -1)
            if own is not None:
                if partition < 0:
                    t, p = self.key_partition(ev, key)
                    if p not in ((scope_parts if t == self.topics[1] else events_parts)
                                 or ()):
                        continue
                elif topic == ev_topic and not ev.scoped:
                    self.clock.settle(np.array([self.index.code(key)]), partition)
            ev.restore(key, st)
            n += 1
        return n


def window_wants(evaluators: Iterable[Evaluator]
                 ) -> dict[tuple[str, str], tuple[list[Match], bool]]:
    """Which windows the rules read: (resolution, metric) -> (the matches of the rules
    reading it, whether one reads its p95), so only those sensors' windows are kept."""
    wants: dict[tuple[str, str], tuple[list[Match], bool]] = {}
    for ev in evaluators:
        source = rule_input(ev.rule)
        metric = getattr(ev.rule, "metric", None)
        if source == "events" or metric is None:
            continue
        key = (source.removeprefix("rollup_"), metric)
        ms, p95 = wants.get(key, ([], False))
        wants[key] = ([*ms, ev.rule.match], p95 or getattr(ev.rule, "stat", "") == "p95")
    return wants


def _kind(ev: Evaluator) -> str:
    return str(type(ev.rule).__struct_config__.tag)  # type: ignore[attr-defined]
