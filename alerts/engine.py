"""The rule engine: every running rule's evaluator, fed batches, ticks and active alerts.

The engine is pure computation over events, time and alerts; it owns no I/O, so the
service decides when to checkpoint its state and the tests can drive it directly.
Reloading rules keeps the state of every rule whose definition did not change.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from alerts.batch import Batch, Place, SensorIndex
from alerts.evaluators import EVALUATORS, AbsenceEvaluator, CorrelationEvaluator, Evaluator
from alerts.metrics import EVAL_SECONDS, RULES_EVALUATED, RULES_LOADED
from alerts.model import Alert, Signal
from alerts.rollups import RollupMerger, Wants
from alerts.ruleset import Rule, RuleSet, rule_hash, rule_input
from cityops.registry import Fleet
from ingest.contract import Event
from processors.rollup import Rollup


def registry_places(fleet: Fleet | None) -> dict[str, Place]:
    if fleet is None:
        return {}
    return {s.sensor_id: Place(s.sensor_id, s.domain, s.type, s.district, s.landmark, s.lat,
                               s.lon, s.interval_s) for s in fleet}


class Engine:
    def __init__(self, rules: RuleSet, fleet: Fleet | None = None) -> None:
        self.index = SensorIndex(registry_places(fleet))
        self.merger = RollupMerger(self.index)
        self.evaluators: dict[str, Evaluator] = {}
        self.rules = rules
        self.set_rules(rules)

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
        self.merger.set_wants(rollup_wants(kept.values()))
        RULES_LOADED.set(len(kept))
        return dropped

    def evaluate(self, events: list[Event], source: str = "events") -> list[Signal]:
        """Run the rules reading ``source`` (``events`` or a rollup input) over a batch."""
        out: list[Signal] = []
        if not events:
            return out
        started = time.perf_counter()
        batch = Batch(events, self.index)
        for ev in self.evaluators.values():
            if not isinstance(ev, CorrelationEvaluator) and rule_input(ev.rule) == source:
                ev.on_batch(batch, out)
                RULES_EVALUATED.labels(_kind(ev)).inc()
        EVAL_SECONDS.observe(time.perf_counter() - started)
        return out

    def evaluate_rollups(self, rollups: list[Rollup]) -> list[Signal]:
        """Merge rollup partials and run the rules that read rollups over the windows."""
        out: list[Signal] = []
        for source, events in self.merger.merge(rollups).items():
            out += self.evaluate(events, source)
        return out

    def tick(self, now_ms: int) -> list[Signal]:
        out: list[Signal] = []
        for ev in self.evaluators.values():
            if isinstance(ev, AbsenceEvaluator) or type(ev).on_tick is not Evaluator.on_tick:
                ev.on_tick(now_ms, out)
                RULES_EVALUATED.labels(_kind(ev)).inc()
        return out

    def has_correlations(self) -> bool:
        return any(isinstance(e, CorrelationEvaluator) for e in self.evaluators.values())

    def correlated_rules(self) -> list[str]:
        """The rules whose active alerts the correlation rules read (and their own)."""
        ids: set[str] = set()
        for rid, ev in self.evaluators.items():
            if isinstance(ev, CorrelationEvaluator):
                ids.add(rid)
                ids.update(ev.rule.rules)
        return sorted(ids)

    def correlate(self, active: list[Alert], now_ms: int) -> list[Signal]:
        out: list[Signal] = []
        for ev in self.evaluators.values():
            if isinstance(ev, CorrelationEvaluator):
                ev.on_alerts(active, now_ms, out)
                RULES_EVALUATED.labels("correlation").inc()
        return out

    # --- checkpointing ---------------------------------------------------------------------
    def snapshot(self) -> list[tuple[str, str, str, dict[str, Any] | None]]:
        """(rule id, rule hash, key, state or None to delete) for every changed key."""
        rows = []
        for rid, ev in self.evaluators.items():
            for key, st in ev.snapshot().items():
                rows.append((rid, ev.hash, key, st))
        return rows

    def mark_all_dirty(self, failed: Iterable[tuple[str, str, str, Any]] = ()) -> None:
        """After a failed checkpoint: everything goes into the next one, including the
        keys of the failed snapshot (a key deleted since the last good checkpoint is no
        longer in ``state``, and its row must still be deleted)."""
        for rid, _, key, _ in failed:
            ev = self.evaluators.get(rid)
            if ev is not None:
                ev.dirty.add(key)
        for ev in self.evaluators.values():
            ev.dirty.update(ev.state)
            arrays = getattr(ev, "arrays", None)
            if arrays is not None:
                arrays.changed = True

    def snapshot_blobs(self) -> list[tuple[str, str, bytes]]:
        """(rule id, rule hash, blob) for every array-state evaluator that changed."""
        out = []
        for rid, ev in self.evaluators.items():
            blob = ev.snapshot_blob()
            if blob is not None:
                out.append((rid, ev.hash, blob))
        return out

    def restore_blobs(self, rows: Iterable[tuple[str, str, bytes]]) -> int:
        n = 0
        for rid, h, blob in rows:
            ev = self.evaluators.get(rid)
            if ev is not None and ev.hash == h:
                ev.restore_blob(blob)
                n += 1
        return n

    def restore(self, rows: Iterable[tuple[str, str, str, dict[str, Any]]]) -> int:
        """Load checkpointed state; rows of rules that changed since are ignored."""
        n = 0
        for rid, h, key, st in rows:
            ev = self.evaluators.get(rid)
            if ev is not None and ev.hash == h:
                ev.restore(key, st)
                n += 1
        return n


def rollup_wants(evaluators: Iterable[Evaluator]) -> Wants:
    """Which rollup windows and metrics the rules read (and for which domains), so the
    merger keeps only those: the processors publish every metric of every sensor."""
    wants: Wants = {}
    for ev in evaluators:
        source = rule_input(ev.rule)
        metric = getattr(ev.rule, "metric", None)
        if source == "events" or metric is None:
            continue
        per_metric = wants.setdefault(source.removeprefix("rollup_"), {})
        domains = ev.rule.match.domains
        if metric in per_metric and per_metric[metric] is None:
            continue
        per_metric[metric] = None if not domains else \
            (per_metric.get(metric) or frozenset()) | frozenset(domains)
    return wants


def _kind(ev: Evaluator) -> str:
    return str(type(ev.rule).__struct_config__.tag)  # type: ignore[attr-defined]
