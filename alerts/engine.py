"""The rule engine: every running rule's evaluator, fed batches, ticks and active alerts.

Rules reading windows (``input: rollup_1m``/``rollup_1h``) get them from ``Windows``, computed
here from the events (``alerts.windows``), not from the processors' rollup partials.

The engine is pure computation over events, time and alerts; it owns no I/O, so the
service decides when to checkpoint its state and the tests can drive it directly.
Reloading rules keeps the state of every rule whose definition did not change.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from alerts.batch import Batch, Place, SensorIndex
from alerts.evaluators import EVALUATORS, AbsenceEvaluator, CorrelationEvaluator, Evaluator
from alerts.metrics import EVAL_SECONDS, RULES_EVALUATED, RULES_LOADED
from alerts.model import Alert, Signal
from alerts.ruleset import Match, Rule, RuleSet, rule_hash, rule_input
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
        self.clock = self.index.clock
        self.windows = Windows(self.index, lateness_ms)
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
        self.windows.set_wants(window_wants(kept.values()))
        RULES_LOADED.set(len(kept))
        return dropped

    def evaluate(self, events: list[Event], source: str = "events",
                 partitions: np.ndarray | None = None) -> list[Signal]:
        """Run the rules reading ``source`` over a batch. For ``events`` (the stream),
        also fold the batch into the rules' windows and run the window rules over the
        windows that closed. ``partitions``: the events topic partition of each event
        (what the event-time clocks of absence and the windows follow)."""
        out: list[Signal] = []
        if not events:
            return out
        batch = Batch(events, self.index, partitions)
        self._run(batch, source, out)
        if source == "events" and self.windows.sets:
            for src, closed in self.windows.on_batch(batch, self.clock).items():
                self._run(Batch(closed, self.index), src, out)
        return out

    def _run(self, batch: Batch, source: str, out: list[Signal]) -> None:
        started = time.perf_counter()
        for ev in self.evaluators.values():
            if not isinstance(ev, CorrelationEvaluator) and rule_input(ev.rule) == source:
                ev.on_batch(batch, out)
                RULES_EVALUATED.labels(_kind(ev)).inc()
        EVAL_SECONDS.observe(time.perf_counter() - started)

    def tick(self, now_ms: int) -> list[Signal]:
        """The clock's turn: windows the watermarks closed, absence, count/geofence expiry."""
        out: list[Signal] = []
        for src, closed in self.windows.on_tick(self.clock).items():
            self._run(Batch(closed, self.index), src, out)
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
                arrays.full = True  # the failed delta is lost: write everything next
        for ws in self.windows.sets.values():
            ws.arrays.full = True

    def snapshot_blobs(self) -> list[tuple[str, str, bytes, bool]]:
        """(rule id, rule hash, blob, is_full) for every array state that changed: the
        array evaluators' and the window sets' (see ``alerts.slots``)."""
        out = []
        for rid, ev in self.evaluators.items():
            got = ev.snapshot_blob()
            if got is not None:
                out.append((rid, ev.hash, *got))
        for key, ws in self.windows.sets.items():
            got = ws.arrays.take()
            if got is not None:
                out.append((f"{WINDOWS_PREFIX}{key[0]}:{key[1]}", self.windows.digest(key),
                            *got))
        return out

    def restore_blobs(self, rows: Iterable[tuple[str, str, bytes]]) -> int:
        """Bases and deltas, in the order written."""
        n = 0
        for rid, h, blob in rows:
            if rid.startswith(WINDOWS_PREFIX):
                window, _, metric = rid.removeprefix(WINDOWS_PREFIX).partition(":")
                ws = self.windows.sets.get((window, metric))
                if ws is not None and self.windows.digest((window, metric)) == h:
                    ws.arrays.load_bytes(blob)
                    n += 1
                continue
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
