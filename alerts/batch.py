"""A batch of events in columns, so rules test conditions with numpy instead of per event.

The alerts hot path reads a few thousand events per Kafka poll. Each rule needs only a
slice (one metric, some incident kinds, some sensors); ``Batch`` builds each column
once per batch and caches it, and ``SensorIndex`` remembers per sensor which rules
select it, so matching a rule costs a dictionary lookup per event, not a YAML walk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from alerts.ruleset import Match
from alerts.watermark import Watermarks
from cityops.city import DISTRICTS_BY_CODE, LANDMARKS_BY_CODE
from ingest.contract import Event

if TYPE_CHECKING:
    from alerts.scope import Ownership


@dataclass(frozen=True, slots=True)
class Place:
    """What rules need to know about a sensor (from its events, or the fleet registry)."""

    sensor_id: str
    domain: str
    type: str
    district: str
    landmark: str
    lat: float
    lon: float
    interval_s: int = 60

    @classmethod
    def of(cls, ev: Event, interval_s: int | None = None) -> Place:
        return cls(ev.sensor_id, ev.domain, ev.type, ev.district, ev.landmark, ev.lat, ev.lon,
                   interval_s or ev.interval_s or 60)

    def template_values(self) -> dict[str, object]:
        lm = LANDMARKS_BY_CODE.get(self.landmark)
        d = DISTRICTS_BY_CODE.get(self.district)
        return {"sensor_id": self.sensor_id, "landmark": self.landmark,
                "landmark_name": lm.name if lm else self.landmark, "district": self.district,
                "district_name": d.name if d else self.district, "domain": self.domain,
                "type": self.type}


def matches(match: Match, p: Place) -> bool:
    if match.sensors and p.sensor_id not in match.sensors:
        return False
    if match.domains and p.domain not in match.domains:
        return False
    if match.types and p.type not in match.types:
        return False
    if match.districts and p.district not in match.districts:
        return False
    if match.landmarks and p.landmark not in match.landmarks:
        return False
    if match.landmark_kinds:
        lm = LANDMARKS_BY_CODE.get(p.landmark)
        if lm is None or lm.kind not in match.landmark_kinds:
            return False
    return True


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Equirectangular distance: exact enough inside one city."""
    x = math.radians(lon2 - lon1) * math.cos(math.radians((lat1 + lat2) / 2))
    y = math.radians(lat2 - lat1)
    return 6_371_000.0 * math.hypot(x, y)


class SensorIndex:
    """Every sensor seen gets a small integer code, stable for the process's life.

    Codes index numpy arrays: per-rule match verdicts here, and the per-sensor state of
    the array evaluators, so a batch maps its events to all of them in one fancy-index.
    """

    def __init__(self, registry: dict[str, Place] | None = None) -> None:
        self.registry = registry or {}
        self.places: dict[str, Place] = dict(self.registry)
        self.codes: dict[str, int] = {}
        self.ids: list[str] = []
        self._verdicts: dict[tuple[str, str], np.ndarray] = {}
        # event-time clocks: the events topic's partition watermarks, and which partition
        # carries each sensor (what absence and the windows judge time by)
        self.clock = Watermarks()
        # which partitions this worker owns (``alerts.scope``); None: all (one worker,
        # or the engine driven directly by tests and benchmarks)
        self.ownership: Ownership | None = None
        for sid in self.registry:
            self.code(sid)

    def code(self, sensor_id: str) -> int:
        c = self.codes.get(sensor_id)
        if c is None:
            c = self.codes[sensor_id] = len(self.ids)
            self.ids.append(sensor_id)
        return c

    def learn(self, ev: Event) -> int:
        p = self.places.get(ev.sensor_id)
        if p is None or p.landmark != ev.landmark or p.lat != ev.lat or p.lon != ev.lon:
            known = self.registry.get(ev.sensor_id)
            self.places[ev.sensor_id] = Place.of(ev, known.interval_s if known else None)
            self._verdicts.clear()  # a sensor moved: rules decide again
        return self.code(ev.sensor_id)

    def verdicts(self, rule_key: tuple[str, str]) -> np.ndarray:
        """int8 per sensor code: -1 not decided yet, 0 no, 1 yes."""
        v = self._verdicts.get(rule_key)
        if v is None or v.size < len(self.ids):
            grown = np.full(max(64, 2 * len(self.ids)), -1, np.int8)
            if v is not None:
                grown[: v.size] = v
            v = self._verdicts[rule_key] = grown
        return v


class Batch:
    """Columns of one poll's events, each built on first use."""

    def __init__(self, events: list[Event], index: SensorIndex,
                 partitions: np.ndarray | None = None) -> None:
        self.events = events
        self.index = index
        learn = index.learn
        self.codes = np.fromiter((learn(ev) for ev in events), np.int64, len(events))
        index.clock.learn(self.codes, partitions)
        self._metric: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.events)

    def place(self, i: int) -> Place:
        return self.index.places[self.events[i].sensor_id]

    @cached_property
    def places(self) -> list[Place]:
        return [self.index.places[e.sensor_id] for e in self.events]

    @cached_property
    def times(self) -> np.ndarray:
        return np.fromiter((e.event_time for e in self.events), np.int64, len(self.events))

    @cached_property
    def sensor_ids(self) -> list[str]:
        return [e.sensor_id for e in self.events]

    def selected(self, rule_key: tuple[str, str], pred) -> np.ndarray:  # type: ignore[no-untyped-def]
        """Boolean mask of events whose sensor satisfies ``pred`` (decided once per sensor)."""
        verdict = self.index.verdicts(rule_key)
        v = verdict[self.codes]
        if (v < 0).any():
            for c in np.unique(self.codes[v < 0]):
                verdict[c] = bool(pred(self.index.places[self.index.ids[c]]))
            v = verdict[self.codes]
        return v == 1

    def metric(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(positions of events carrying ``name``, their values) in stream order."""
        got = self._metric.get(name)
        if got is None:
            pos, vals = [], []
            for i, e in enumerate(self.events):
                v = e.measurements.get(name)
                if v is not None:
                    pos.append(i)
                    vals.append(v)
            got = (np.asarray(pos, np.int64), np.asarray(vals, np.float64))
            self._metric[name] = got
        return got

    def incidents(self, kinds: frozenset[str]) -> np.ndarray:
        return np.fromiter((e.kind == "incident" and e.incident in kinds for e in self.events),
                           bool, len(self.events))


def occurrence_rank(slots: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions share its slot (0 for the first).

    Rounds of equal rank touch each slot at most once, so a per-sensor recurrence
    (EWMA, last value) can be updated for all sensors at once with fancy indexing
    while each sensor's own events stay in order.
    """
    if slots.size == 0:
        return slots.copy()
    order = np.argsort(slots, kind="stable")
    s = slots[order]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, s.size]))
    rank = np.empty_like(slots)
    rank[order] = np.arange(s.size) - group_start
    return rank
