"""A poll's events in columns, so rules test conditions with numpy instead of per event.

The alerts hot path reads a few thousand events per Kafka poll, and with contract v2 most
of them arrive as columns already (``ingest.contract.decode_batches``). ``Batch`` keeps
them as columns (``alerts.rows.Rows``): sensor codes per row (the index learns each
distinct sensor of a v2 run once, not each row), event and receive times as arrays, a
metric as a mask over the reading arrays, incidents as a small dict. Rules read a row
through accessors (``sensor_id(i)``, ``place(i)``, ``receive_time(i)``...), never an
``Event``: building one per row and then columns again from them cost a good part of the
worker's CPU (py-spy at 8,000 msg/s: decoding 19% of it, ``events_of`` 7.6%, and the
per-event loops of the old ``Batch`` inside ``Engine.evaluate``'s 27%).

One type, two constructors: ``Batch(rows, ...)`` from decoded runs (v1 and v2 mixed in
stream order) and ``Batch.of_events`` (tests, the closed windows, the per-event path).
``SensorIndex`` remembers per sensor which rules select it, so matching a rule costs a
fancy-index per batch, not a YAML walk per event.

Places: a v1 event carries its own and the index learns it (``SensorIndex.learn``); a v2
row's sensor is where the fleet registry says (``SensorIndex.learn_fleet``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from alerts.rows import Note, Rows, rows_of_events
from alerts.ruleset import Match
from alerts.watermark import Watermarks
from cityops.city import DISTRICTS_BY_CODE, LANDMARKS_BY_CODE
from ingest.contract import Event, event_id

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
        self.gateways: dict[str, str] = {}  # sensor -> gateway (the fleet's; Engine sets it)
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

    def learn_fleet(self, sensor_id: str, interval_s: int) -> int:
        """A v2 row's sensor: it is where the fleet registry says (a sensor the registry
        lacks is nowhere: rules selecting by place do not match it). The same place
        ``learn`` would take from the event the per-event path made of that row."""
        known = self.registry.get(sensor_id)
        p = self.places.get(sensor_id)
        lm, lat, lon = (known.landmark, known.lat, known.lon) if known else ("unknown", 0.0,
                                                                             0.0)
        if p is None or p.landmark != lm or p.lat != lat or p.lon != lon:
            self.places[sensor_id] = (
                Place(sensor_id, known.domain, known.type, known.district, lm, lat, lon,
                      known.interval_s or interval_s or 60) if known else
                Place(sensor_id, "unknown", "unknown", "unknown", lm, lat, lon,
                      interval_s or 60))
            self._verdicts.clear()  # a sensor moved: rules decide again
        return self.code(sensor_id)

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
    """Columns of one poll's events (see the module doc); row ``i`` is the i-th event in
    stream order."""

    def __init__(self, parts: Sequence[Rows], index: SensorIndex,
                 partitions: np.ndarray | None = None) -> None:
        self.index = index
        #: the ``Event`` structs of a batch made ``of_events`` (closed windows: what tests
        #: inspect); None for decoded columns. Rules never read it.
        self.events: Sequence[Event] | None = None
        learn, fleet = index.learn, index.learn_fleet
        codes, times, receive, r_row, r_metric, r_value = [], [], [], [], [], []
        self._metric_ids: dict[str, int] = {}
        self._notes: dict[int, Note] = {}
        base = 0
        for part in parts:
            entries = np.fromiter((learn(e.event) if e.event is not None else
                                   fleet(e.sensor_id, e.interval_s) for e in part.learn),
                                  np.int64, len(part.learn))
            codes.append(entries[part.entry])
            times.append(part.time)
            receive.append(part.receive)
            ids = self._metric_ids
            lut = np.fromiter((ids.setdefault(m, len(ids)) for m in part.metric_names),
                              np.int64, len(part.metric_names))
            r_row.append(part.r_row + base if base else part.r_row)
            r_metric.append(lut[part.r_metric])
            r_value.append(part.r_value)
            if part.notes:
                self._notes.update({i + base: n for i, n in part.notes.items()})
            base += len(part)
        self.codes = _joined(codes, np.int64)
        self.times = _joined(times, np.int64)
        self.receive = _joined(receive, np.int64)
        self._r_row = _joined(r_row, np.int64)
        self._r_metric = _joined(r_metric, np.int64)
        self._r_value = _joined(r_value, np.float64)
        index.clock.learn(self.codes, partitions)
        self._metric: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def of_events(cls, events: Sequence[Event], index: SensorIndex,
                  partitions: np.ndarray | None = None) -> Batch:
        """A batch of ``Event`` structs (v1, tests, the windows that closed)."""
        batch = cls([rows_of_events(events)], index, partitions)
        batch.events = events
        return batch

    def __len__(self) -> int:
        return int(self.times.size)

    # --- one row ------------------------------------------------------------------------
    def sensor_id(self, i: int) -> str:
        return self.index.ids[int(self.codes[i])]

    def place(self, i: int) -> Place:
        return self.index.places[self.index.ids[int(self.codes[i])]]

    def event_time(self, i: int) -> int:
        return int(self.times[i])

    def receive_time(self, i: int) -> int:
        return int(self.receive[i])

    def incident(self, i: int) -> str | None:
        note = self._notes.get(int(i))
        return note.incident if note else None

    def event_id(self, i: int) -> str:
        """An incident's own event id; a reading's is derived from sensor and time (as
        ingest made it: rules only ever ask for the incidents')."""
        note = self._notes.get(int(i))
        return note.event_id if note else event_id(self.sensor_id(i), self.event_time(i))

    # --- columns ------------------------------------------------------------------------
    def selected(self, rule_key: tuple[str, str], pred) -> np.ndarray:  # type: ignore[no-untyped-def]
        """Boolean mask of rows whose sensor satisfies ``pred`` (decided once per sensor)."""
        verdict = self.index.verdicts(rule_key)
        v = verdict[self.codes]
        if (v < 0).any():
            for c in np.unique(self.codes[v < 0]):
                verdict[c] = bool(pred(self.index.places[self.index.ids[c]]))
            v = verdict[self.codes]
        return v == 1

    def metric(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows carrying ``name``, their values) in stream order: a mask over the
        reading arrays."""
        got = self._metric.get(name)
        if got is None:
            m = self._metric_ids.get(name)
            if m is None:
                got = (np.empty(0, np.int64), np.empty(0, np.float64))
            else:
                mask = self._r_metric == m
                got = (self._r_row[mask], self._r_value[mask])
            self._metric[name] = got
        return got

    def incidents(self, kinds: frozenset[str]) -> np.ndarray:
        """Mask of the incident rows of one of ``kinds``."""
        mask = np.zeros(len(self), bool)
        for i, note in self._notes.items():
            if note.is_incident and note.incident in kinds:
                mask[i] = True
        return mask


def _joined(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays) if arrays else np.empty(0, dtype)


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
