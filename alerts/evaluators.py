"""One evaluator per rule type: conditions over batches and clock ticks, emitting signals.

Evaluators keep per-key state (a key is a sensor id, a landmark or a district) and emit
a RAISE when a condition starts, UPDATEs while it holds and a CLEAR when it has ended
for long enough: the hysteresis lives here, so the lifecycle only ever sees clean
transitions. State is plain JSON per key so the service can checkpoint it to
PostgreSQL with the Kafka offsets it corresponds to; ``dirty`` lists what changed.

Event-driven conditions use event time (the sensor's clock, corrected by ingest).
Absence uses event time too, through the partition watermarks of ``alerts.watermark``;
count windows and geofences going quiet use the wall clock passed to ``on_tick``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from alerts.batch import Batch, Place, SensorIndex, distance_m, matches, occurrence_rank
from alerts.model import Alert, Signal, SignalKind
from alerts.ruleset import (
    DAYS,
    AbsenceRule,
    AnomalyRule,
    CorrelationRule,
    CountRule,
    GeofenceRule,
    OutageRule,
    Rule,
    ThresholdRule,
    metric_key,
    parse_hhmm,
    render,
    rule_hash,
)
from alerts.scope import ScopeInput
from alerts.slots import SlotArrays
from alerts.watermark import NONE
from cityops.city import DISTRICTS_BY_CODE, LANDMARKS, LANDMARKS_BY_CODE

OPS: dict[str, Callable[[Any, Any], Any]] = {"<": operator.lt, "<=": operator.le,
                                              ">": operator.gt, ">=": operator.ge}
_DEFAULT_TITLES = {
    "threshold": "{metric} {op} {threshold} at {sensor_id}",
    "count": "{count} incidents at {landmark_name}",
    "anomaly": "Unusual {metric} at {sensor_id}",
    "absence": "Sensor {sensor_id} offline",
    "correlation": "Combined incident near {landmark_name}",
    "geofence": "Activity in restricted zone at {landmark_name}",
    "outage": "{count} sensors offline in {district_name}{gateway}",
}


class Evaluator:
    """Common plumbing: the rule, per-key JSON state, and signal construction."""

    def __init__(self, rule: Rule, index: SensorIndex) -> None:
        self.rule = rule
        self.hash = rule_hash(rule)
        self.index = index
        self.state: dict[str, dict[str, Any]] = {}
        self.dirty: set[str] = set()

    # --- state ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[str, Any] | None]:
        """Changed keys since the last snapshot (None: the key's state was dropped)."""
        out = {k: self.state.get(k) for k in self.dirty}
        self.dirty.clear()
        return out

    def restore(self, key: str, state: dict[str, Any]) -> None:
        self.state[key] = state

    def snapshot_blob(self) -> tuple[bytes, bool] | None:
        """Evaluators with array state return what changed as (blob, is_full), None if
        nothing did (see ``alerts.slots``)."""
        return None

    def restore_blob(self, data: bytes) -> None:
        raise NotImplementedError

    #: True when the state is keyed by a scope spanning sensors (landmark, district):
    #: it lives on the scope topic's partitions, not the events topic's (``alerts.scope``)
    scoped = False

    def drop_keys(self, gone: Callable[[str], bool]) -> None:
        """Forget the keys whose partition moved to another worker."""
        for key in [k for k in self.state if gone(k)]:
            del self.state[key]
        # a key deleted here since the last checkpoint too: its new owner's row stays
        self.dirty = {k for k in self.dirty if not gone(k)}

    def on_assigned(self, codes: np.ndarray) -> None:
        """Sensors of partitions just assigned, before their checkpoint is loaded."""

    def _set(self, key: str, state: dict[str, Any] | None) -> None:
        if state is None:
            self.state.pop(key, None)
        else:
            self.state[key] = state
        self.dirty.add(key)

    # --- hooks ------------------------------------------------------------------------
    def on_batch(self, batch: Batch, out: list[Signal]) -> None:
        pass

    def on_tick(self, now_ms: int, out: list[Signal]) -> None:
        pass

    def _match_mask(self, batch: Batch) -> np.ndarray:
        return batch.selected((self.rule.id, self.hash), lambda p: matches(self.rule.match, p))

    def _matched_readings(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Positions and values of this rule's metric in the batch, at places it matches."""
        pos, vals = batch.metric(metric_key(self.rule))  # type: ignore[arg-type]
        if pos.size == 0:
            return pos, vals
        keep = self._match_mask(batch)[pos]
        return pos[keep], vals[keep]

    def signal(self, kind: SignalKind, source: str, at_ms: int, place: Place | None = None,
               value: float | None = None, receive_ms: int | None = None,
               **extra: Any) -> Signal:
        r = self.rule
        values: dict[str, Any] = {"rule_id": r.id, "value": _fmt(value)}
        if place is not None:
            values.update(place.template_values())
        values.update(extra)
        title = render(r.title or _DEFAULT_TITLES[_type(r)], values)
        return Signal(kind=kind, rule_id=r.id, source=source, at_ms=at_ms, severity=r.severity,
                      title=title, message=r.description, value=value,
                      sensor_id=place.sensor_id if place and place.sensor_id else None,
                      domain=place.domain if place else "", district=place.district if place
                      else "", landmark=place.landmark if place else "",
                      lat=place.lat if place else None, lon=place.lon if place else None,
                      receive_ms=receive_ms,
                      details={k: v for k, v in extra.items() if _jsonable(v)})


def _type(rule: Rule) -> str:
    return str(type(rule).__struct_config__.tag)  # type: ignore[attr-defined]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _jsonable(v: Any) -> bool:
    return isinstance(v, str | int | float | bool | list) or v is None


class ThresholdEvaluator(Evaluator):
    """``metric op value`` sustained ``for_s`` raises; ``clear_value`` sustained clears."""

    rule: ThresholdRule

    def on_batch(self, batch: Batch, out: list[Signal]) -> None:
        r = self.rule
        pos, vals = self._matched_readings(batch)
        if pos.size == 0:
            return
        op = OPS[r.op]
        cond = op(vals, r.value)
        clear = ~op(vals, r.value if r.clear_value is None else r.clear_value)
        times = batch.times[pos]
        for j in range(pos.size):
            i = int(pos[j])
            sid = batch.sensor_id(i)
            st = self.state.get(sid)
            if st is None:
                if not cond[j]:
                    continue  # the common case: a normal value from an idle sensor
                st = {"since": None, "firing": False, "csince": None, "last": 0}
            t = int(times[j])
            if t < st["last"]:
                continue  # out of order: duration logic needs monotonic time per sensor
            st = dict(st, last=t)
            x = float(vals[j])
            place = batch.place(i)
            extra = {"metric": r.metric, "op": r.op, "threshold": r.value}
            if not st["firing"]:
                if cond[j]:
                    st["since"] = st["since"] if st["since"] is not None else t
                    if t - st["since"] >= r.for_s * 1000:
                        st.update(firing=True, csince=None)
                        out.append(self.signal(SignalKind.RAISE, sid, t, place, x,
                                               batch.receive_time(i), **extra))
                else:
                    st = None  # back to idle: forget the key
            elif clear[j]:
                st["csince"] = st["csince"] if st["csince"] is not None else t
                if t - st["csince"] >= r.clear_for_s * 1000:
                    out.append(self.signal(SignalKind.CLEAR, sid, t, place, x, **extra))
                    st = None
            else:
                st["csince"] = None
                if cond[j]:
                    out.append(self.signal(SignalKind.UPDATE, sid, t, place, x,
                                           batch.receive_time(i), **extra))
            self._set(sid, st)


class CountEvaluator(Evaluator):
    """``count`` incidents within ``window_s`` at one sensor, landmark or district."""

    rule: CountRule

    def _key(self, p: Place) -> str:
        per = self.rule.per
        return p.sensor_id if per == "sensor" else f"{per}:{getattr(p, per)}"

    def _place(self, key: str, p: Place) -> Place:
        if self.rule.per == "sensor":
            return p
        if self.rule.per == "landmark":
            lm = LANDMARKS_BY_CODE.get(p.landmark)
            lat, lon = (lm.lat, lm.lon) if lm else (p.lat, p.lon)
            return Place("", p.domain, p.type, p.district, p.landmark, lat, lon)
        d = DISTRICTS_BY_CODE.get(p.district)
        lat, lon = (d.lat, d.lon) if d else (p.lat, p.lon)
        return Place("", p.domain, p.type, p.district, "", lat, lon)

    @property
    def scoped(self) -> bool:  # type: ignore[override]
        return self.rule.per != "sensor"

    def collect(self, batch: Batch) -> list[ScopeInput]:
        """The batch's incidents this rule counts, as inputs keyed by the rule's scope:
        what the owner of that scope needs, and all it needs (``alerts.scope``)."""
        r = self.rule
        mask = batch.incidents(frozenset(r.incidents))
        if not mask.any():
            return []
        mask &= self._match_mask(batch)
        out = []
        for i in np.flatnonzero(mask).tolist():
            p = batch.place(i)
            out.append(ScopeInput(r.id, self.hash, self._key(p), batch.event_id(i),
                                  batch.event_time(i), batch.receive_time(i),
                                  batch.incident(i), p.sensor_id, p.domain, p.type,
                                  p.district, p.landmark, p.lat, p.lon))
        return out

    def on_batch(self, batch: Batch, out: list[Signal]) -> None:
        self.on_inputs(self.collect(batch), out)

    def on_inputs(self, inputs: list[ScopeInput], out: list[Signal]) -> None:
        """Count incidents (from this worker's batch, or from the scope topic). An event id
        counted already is dropped: a resent incident, or an input published again by a
        worker replaying from its checkpoint."""
        r = self.rule
        window = int(r.window_s * 1000)
        for inp in inputs:
            p = Place(inp.sensor_id, inp.domain, inp.type, inp.district, inp.landmark,
                      inp.lat, inp.lon)
            key = inp.key
            st = self.state.get(key) or {"hits": [], "firing": False, "place": None}
            if any(h[1] == inp.event_id for h in st["hits"]):
                continue  # a resend of an incident already counted
            t = inp.event_time
            newest = max([t] + [h[0] for h in st["hits"]])
            hits = [h for h in st["hits"] if h[0] > newest - window] + [[t, inp.event_id]]
            hits.sort()
            place = self._place(key, p)
            st = {"hits": hits, "firing": st["firing"],
                  "place": [place.domain, place.type, place.district, place.landmark,
                            place.lat, place.lon]}
            if len(hits) >= r.count:
                kind = SignalKind.UPDATE if st["firing"] else SignalKind.RAISE
                st["firing"] = True
                out.append(self.signal(kind, key, t, place, float(len(hits)),
                                       inp.receive_time, count=len(hits),
                                       incident=inp.incident))
            self._set(key, st)

    def on_tick(self, now_ms: int, out: list[Signal]) -> None:
        window = int(self.rule.window_s * 1000)
        for key, st in list(self.state.items()):
            hits = [h for h in st["hits"] if h[0] > now_ms - window]
            if len(hits) == len(st["hits"]):
                continue
            if st["firing"] and len(hits) < self.rule.count:
                d, ty, dist, lm, lat, lon = st["place"]
                place = Place(key if self.rule.per == "sensor" else "", d, ty, dist, lm, lat, lon)
                out.append(self.signal(SignalKind.CLEAR, key, now_ms, place, float(len(hits)),
                                       count=len(hits)))
                st = dict(st, firing=False)
            self._set(key, dict(st, hits=hits) if hits or st["firing"] else None)


class _AnomalyState(SlotArrays):
    FIELDS = (("mean", np.float64), ("var", np.float64), ("n", np.int64),
              ("last_v", np.float64), ("last_t", np.int64), ("firing", np.bool_),
              ("run", np.int64))


class AnomalyEvaluator(Evaluator):
    """EWMA z-score against the sensor's own history, or rate of change, vectorized.

    Events are processed in rounds of equal per-sensor rank (``occurrence_rank``):
    within a round every sensor appears once, so the EWMA recurrences of all sensors
    advance together in a handful of numpy operations while each sensor's events stay
    in order.
    """

    rule: AnomalyRule

    def __init__(self, rule: Rule, index: SensorIndex) -> None:
        super().__init__(rule, index)
        self.arrays = _AnomalyState(index)

    def snapshot(self) -> dict[str, dict[str, Any] | None]:
        return {}  # per-key rows: none; the arrays go in one blob (snapshot_blob)

    def snapshot_blob(self) -> tuple[bytes, bool] | None:
        return self.arrays.take()

    def restore_blob(self, data: bytes) -> None:
        self.arrays.load_bytes(data)

    def restore(self, key: str, state: dict[str, Any]) -> None:
        self.arrays.put(self.arrays.slot(key), state)

    def on_batch(self, batch: Batch, out: list[Signal]) -> None:
        r = self.rule
        pos, vals = self._matched_readings(batch)
        if pos.size == 0:
            return
        times = batch.times[pos]
        self.arrays.ensure()
        slots = batch.codes[pos]
        self.arrays.touch(slots)
        rank = occurrence_rank(slots)
        a = self.arrays.arr
        for rnd in range(int(rank.max()) + 1):
            m = rank == rnd
            sl, x, t = slots[m], vals[m], times[m]
            cnt = a["n"][sl]
            if r.method == "ewma_z":
                mu, va = a["mean"][sl], a["var"][sl]
                sd = np.maximum(np.sqrt(va), 1e-6 * np.abs(mu) + 1e-9)
                score = np.where(cnt >= r.min_samples, (x - mu) / sd, 0.0)
                anom = np.abs(score) >= r.z
                normal = np.abs(score) < r.clear_z
                d = x - mu
                first = cnt == 0
                a["mean"][sl] = np.where(first, x, mu + r.alpha * d)
                a["var"][sl] = np.where(first, 0.0, (1 - r.alpha) * (va + r.alpha * d * d))
                ok = np.ones(sl.size, bool)
            else:
                dt = (t - a["last_t"][sl]) / 1000.0
                ok = (cnt == 0) | (dt > 0)  # drop out-of-order samples
                valid = (cnt > 0) & (dt > 0)
                score = np.where(valid, (x - a["last_v"][sl]) / np.where(valid, dt, 1), 0.0)
                anom = valid & (np.abs(score) > r.max_rate_per_s)
                normal = ~anom
                # a reading arriving out of order leaves the state untouched
                sl, x, t, score, anom, normal, cnt = (v[ok] for v in
                                                      (sl, x, t, score, anom, normal, cnt))
            a["last_v"][sl] = x
            a["last_t"][sl] = t
            a["n"][sl] = cnt + 1
            f = a["firing"][sl]
            run = np.where(anom, 0, np.where(normal, a["run"][sl] + 1, a["run"][sl]))
            raise_ = ~f & anom
            update = f & anom
            clear = f & ~anom & (run >= r.clear_after_n)
            a["firing"][sl] = (f | raise_) & ~clear
            a["run"][sl] = np.where(clear | raise_, 0, run)
            positions = pos[m][ok]
            for j in np.flatnonzero(raise_ | update | clear):
                i = int(positions[j])
                kind = (SignalKind.RAISE if raise_[j] else SignalKind.CLEAR if clear[j]
                        else SignalKind.UPDATE)
                out.append(self.signal(kind, batch.sensor_id(i), batch.event_time(i),
                                       batch.place(i), float(x[j]), batch.receive_time(i),
                                       metric=r.metric,
                                       z=round(float(score[j]), 3), method=r.method))


class _AbsenceState(SlotArrays):
    FIELDS = (("last_seen", np.int64), ("mark", np.int64), ("limit", np.int64),
              ("firing", np.bool_), ("tracked", np.bool_))


class AbsenceEvaluator(Evaluator):
    """A sensor silent longer than its limit is offline; its next event brings it back.

    Silent is judged in EVENT time (``alerts.watermark``): how far the sensor's partition
    of the events topic has advanced since its last reading was read (``mark``), never
    the wall clock against the event time, so a lagging stream or a replay does not raise
    and clear ``sensor_offline`` per reading. A sensor of the fleet registry never heard
    from (``include_registry``) is marked at the first watermark there is.
    """

    rule: AbsenceRule

    def __init__(self, rule: Rule, index: SensorIndex, now_ms: int | None = None) -> None:
        super().__init__(rule, index)
        self.arrays = _AbsenceState(index)
        self._start = now_ms
        self._track_registry(None)

    def _track_registry(self, codes: np.ndarray | None) -> None:
        """Registry sensors (of ``codes``; None: all) are watched from now on, heard from
        or not (``include_registry``)."""
        if not self.rule.include_registry:
            return
        start = self._start or int(datetime.now(UTC).timestamp() * 1000)
        wanted = None if codes is None else set(codes.tolist())
        for p in self.index.registry.values():
            slot = self.arrays.slot(p.sensor_id)
            if (wanted is None or slot in wanted) and matches(self.rule.match, p):
                self.arrays.put(slot, {"last_seen": start, "mark": NONE,
                                       "limit": self._limit(p), "firing": False,
                                       "tracked": True})

    def on_assigned(self, codes: np.ndarray) -> None:
        """A partition taken over: its registry sensors are watched again (its checkpoint,
        loaded next, replaces this for the sensors it holds)."""
        self._track_registry(codes)

    def _limit(self, p: Place) -> int:
        r = self.rule
        return int((r.silence_s or r.factor * p.interval_s) * 1000)

    snapshot = AnomalyEvaluator.snapshot
    snapshot_blob = AnomalyEvaluator.snapshot_blob
    restore_blob = AnomalyEvaluator.restore_blob
    restore = AnomalyEvaluator.restore

    def on_batch(self, batch: Batch, out: list[Signal]) -> None:
        mask = self._match_mask(batch)
        if not mask.any():
            return
        idx = np.flatnonzero(mask)
        self.arrays.ensure()
        a = self.arrays.arr
        codes = batch.codes[idx]
        self.arrays.touch(codes)
        np.maximum.at(a["last_seen"], codes, batch.times[idx])
        a["mark"][codes] = self.index.clock.of_codes(codes)
        for j in np.flatnonzero(~a["tracked"][codes]):  # first sight: its own limit
            c = codes[j]
            a["tracked"][c] = True
            a["limit"][c] = self._limit(batch.place(int(idx[j])))
        back = a["firing"][codes]
        if back.any():  # silent sensors that spoke again
            for j in np.flatnonzero(back):
                c, i = codes[j], int(idx[j])
                if a["firing"][c]:
                    a["firing"][c] = False
                    out.append(self.signal(SignalKind.CLEAR, batch.sensor_id(i),
                                           batch.event_time(i), batch.place(i), None))

    def on_tick(self, now_ms: int, out: list[Signal]) -> None:
        """Raise the sensors whose partition moved on by more than their limit since they
        last spoke. ``now_ms`` (the wall clock) is not compared with event times."""
        self.arrays.ensure()
        n = len(self.index.ids)
        a = self.arrays.arr
        codes = np.flatnonzero(a["tracked"][:n] & ~a["firing"][:n])
        own = self.index.ownership
        if own is not None:  # another worker judges the sensors of its partitions
            codes = codes[own.owns_codes(codes)]
        if codes.size == 0:
            return
        wm = self.index.clock.of_codes(codes)
        mark = a["mark"][codes]
        unmarked = (mark == NONE) & (wm != NONE)
        if unmarked.any():  # registry sensors never heard: silent from the first watermark
            a["mark"][codes[unmarked]] = wm[unmarked]
            self.arrays.touch(codes[unmarked])
            mark = a["mark"][codes]
        judged = (wm != NONE) & (mark != NONE)
        silent_ms = np.where(judged, wm - np.where(judged, mark, 0), 0)
        for j in np.flatnonzero(judged & (silent_ms > a["limit"][codes])):
            c = int(codes[j])
            a["firing"][c] = True
            self.arrays.touch(c)
            sid = self.index.ids[c]
            place = self.index.places.get(sid) or Place(sid, "", "", "", "", 0.0, 0.0)
            out.append(self.signal(SignalKind.RAISE, sid, int(wm[j]), place, None,
                                   silent_s=round(int(silent_ms[j]) / 1000, 1),
                                   last_seen=int(a["last_seen"][c])))


class GeofenceEvaluator(Evaluator):
    """Matching activity inside a zone while its schedule is on; quiet for a while clears."""

    rule: GeofenceRule

    def __init__(self, rule: Rule, index: SensorIndex) -> None:
        super().__init__(rule, index)
        sch = self.rule.schedule
        if sch is not None:
            self._start, self._end = parse_hhmm(sch.start), parse_hhmm(sch.end)
            self._days = np.array([d in sch.days for d in DAYS])
            self._tz = ZoneInfo(sch.tz)

    def in_zone(self, p: Place) -> bool:
        z = self.rule.zone
        if p.landmark in z.landmarks or p.district in z.districts:
            return True
        if z.circle and distance_m(p.lat, p.lon, z.circle.lat, z.circle.lon) <= z.circle.radius_m:
            return True
        return bool(z.polygon and point_in_polygon(p.lat, p.lon, z.polygon))

    def scheduled(self, times: np.ndarray) -> np.ndarray:
        """Whether each epoch-ms time falls inside the schedule (local time, vectorized)."""
        if self.rule.schedule is None or times.size == 0:
            return np.ones(times.size, bool)
        off = datetime.fromtimestamp(int(times[0]) / 1000, self._tz).utcoffset()
        local = times + int(off.total_seconds() * 1000) if off else times
        minute = (local // 60_000) % 1440
        weekday = (local // 86_400_000 + 3) % 7  # 1970-01-01 was a Thursday
        if self._start <= self._end:
            inside = (minute >= self._start) & (minute < self._end)
            day = weekday
        else:  # wraps midnight: after midnight belongs to the previous day's window
            late, early = minute >= self._start, minute < self._end
            inside = late | early
            day = np.where(early, (weekday - 1) % 7, weekday)
        return inside & self._days[day]

    def on_batch(self, batch: Batch, out: list[Signal]) -> None:
        r = self.rule
        trig = np.zeros(len(batch), bool)
        if r.incidents:
            trig |= batch.incidents(frozenset(r.incidents))
        vals_at = np.full(len(batch), np.nan)
        if r.metric is not None and r.op is not None:
            pos, vals = batch.metric(r.metric)
            hit = OPS[r.op](vals, r.value)
            trig[pos[hit]] = True
            vals_at[pos] = vals
        if not trig.any():
            return
        trig &= batch.selected((r.id, self.hash),
                               lambda p: matches(r.match, p) and self.in_zone(p))
        idx = np.flatnonzero(trig)
        idx = idx[self.scheduled(batch.times[idx])]
        for i in idx.tolist():
            sid, t, place = batch.sensor_id(i), batch.event_time(i), batch.place(i)
            st = self.state.get(sid)
            kind = SignalKind.UPDATE if st and st["firing"] else SignalKind.RAISE
            v = None if np.isnan(vals_at[i]) else float(vals_at[i])
            out.append(self.signal(kind, sid, t, place, v, batch.receive_time(i),
                                   incident=batch.incident(i)))
            self._set(sid, {"firing": True, "last": max(t, st["last"] if st else 0)})

    def on_tick(self, now_ms: int, out: list[Signal]) -> None:
        if not self.state:
            return
        quiet_ms = int(self.rule.clear_after_s * 1000)
        on_now = bool(self.scheduled(np.array([now_ms], np.int64))[0])
        for sid, st in list(self.state.items()):
            if now_ms - st["last"] > quiet_ms or not on_now:
                out.append(self.signal(SignalKind.CLEAR, sid, now_ms, self.index.places.get(sid),
                                       None, reason="quiet" if on_now else "schedule ended"))
                self._set(sid, None)


def point_in_polygon(lat: float, lon: float, poly: list[tuple[float, float]]) -> bool:
    inside = False
    n = len(poly)
    for k in range(n):
        (y1, x1), (y2, x2) = poly[k], poly[(k + 1) % n]
        if (y1 > lat) != (y2 > lat) and lon < (x2 - x1) * (lat - y1) / (y2 - y1) + x1:
            inside = not inside
    return inside


class CorrelationEvaluator(Evaluator):
    """Active alerts of all listed rules near one landmark become one incident there.

    The first listed rule anchors the incident: its alert's landmark is the place, and
    every other rule needs an active alert within ``radius_m`` of that landmark.
    """

    rule: CorrelationRule
    scoped = True

    def reads(self) -> list[str]:
        """The rules whose active alerts this one reads."""
        return list(self.rule.rules)

    def on_alerts(self, active: list[Alert], now_ms: int, out: list[Signal]) -> None:
        r = self.rule
        by_rule: dict[str, list[Alert]] = {}
        for a in active:
            if a.rule_id in r.rules:
                by_rule.setdefault(a.rule_id, []).append(a)
        anchors = by_rule.get(r.rules[0], [])
        holding: dict[str, list[Alert]] = {}
        for anchor in anchors:
            lm = LANDMARKS_BY_CODE.get(anchor.landmark) or _nearest_landmark(anchor)
            if lm is None:
                continue
            members = [anchor]
            for other in r.rules[1:]:
                near = [a for a in by_rule.get(other, [])
                        if a.landmark == lm.code or (a.lat is not None and a.lon is not None
                        and distance_m(a.lat, a.lon, lm.lat, lm.lon) <= r.radius_m)]
                if not near:
                    break
                members.extend(near)
            else:
                holding.setdefault(lm.code, []).extend(members)
        own = self.index.ownership
        if own is not None:  # each landmark is judged by the owner of its scope partition
            holding = {c: m for c, m in holding.items() if own.owns_scope(f"landmark:{c}")}
        for code, members in holding.items():
            lm = LANDMARKS_BY_CODE[code]
            key = f"landmark:{code}"
            ids = sorted({m.alert_id for m in members})
            st = self.state.get(key)
            if st and st.get("members") == ids:
                continue
            kind = SignalKind.UPDATE if st else SignalKind.RAISE
            place = Place("", "multi", "", lm.district, lm.code, lm.lat, lm.lon)
            domains = sorted({m.domain for m in members})
            out.append(self.signal(kind, key, now_ms, place, float(len(ids)), members=ids,
                                   domains=domains, rules=list(r.rules)))
            self._set(key, {"members": ids})
        for key in [k for k in self.state if k.removeprefix("landmark:") not in holding]:
            gone = LANDMARKS_BY_CODE.get(key.removeprefix("landmark:"))
            where = Place("", "multi", "", gone.district, gone.code, gone.lat, gone.lon) \
                if gone else None
            out.append(self.signal(SignalKind.CLEAR, key, now_ms, where, None))
            self._set(key, None)


def _nearest_landmark(a: Alert):  # type: ignore[no-untyped-def]
    if a.lat is None or a.lon is None:
        return None
    return min(LANDMARKS, key=lambda lm: distance_m(a.lat, a.lon, lm.lat, lm.lon))  # type: ignore[arg-type]


class OutageEvaluator(CorrelationEvaluator):
    """Many active alerts of one rule under one district or gateway: the cause above them.

    Reads active alerts like a correlation (``Engine.correlate``); a place is judged by
    the owner of its scope partition (``district:<code>`` / ``gateway:<id>``). A place's
    size is its sensors in the fleet registry (else the sensors heard from); it holds at
    ``min_count`` and ``min_fraction`` of them, and clears below half of either, so a few
    sensors coming back do not make it flap.
    """

    rule: OutageRule  # type: ignore[assignment]

    def reads(self) -> list[str]:
        return [self.rule.rule]

    def _place_of(self, a: Alert) -> str:
        if self.rule.per == "district":
            return a.district
        return self.index.gateways.get(a.sensor_id or a.source, "")

    def _sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        places = self.index.registry or self.index.places
        for sid, p in places.items():
            where = p.district if self.rule.per == "district" else self.index.gateways.get(sid)
            if where:
                sizes[where] = sizes.get(where, 0) + 1
        return sizes

    def on_alerts(self, active: list[Alert], now_ms: int, out: list[Signal]) -> None:
        r = self.rule
        down: dict[str, set[str]] = {}
        for a in active:
            if a.rule_id == r.rule and (where := self._place_of(a)):
                down.setdefault(where, set()).add(a.sensor_id or a.source)
        sizes = self._sizes()
        own = self.index.ownership
        for where, sensors in down.items():
            key = f"{r.per}:{where}"
            if own is not None and not own.owns_scope(key):
                continue
            n, size = len(sensors), max(sizes.get(where, 0), len(sensors))
            held = key in self.state
            lo = 0.5 if held else 1.0  # hysteresis: clears below half of the thresholds
            if n < r.min_count * lo or n < r.min_fraction * size * lo:
                continue
            if held and self.state[key].get("n") == n:
                continue
            out.append(self._outage(SignalKind.UPDATE if held else SignalKind.RAISE, key,
                                    where, now_ms, n, size))
            self._set(key, {"n": n})
        for key in list(self.state):
            where = key.partition(":")[2]
            n = len(down.get(where, ()))
            size = max(sizes.get(where, 0), n)
            if n >= r.min_count * 0.5 and n >= r.min_fraction * size * 0.5:
                continue
            out.append(self._outage(SignalKind.CLEAR, key, where, now_ms, n, size))
            self._set(key, None)

    def _outage(self, kind: SignalKind, key: str, where: str, now_ms: int, n: int,
                size: int) -> Signal:
        d = DISTRICTS_BY_CODE.get(where) if self.rule.per == "district" else None
        place = Place("", "multi", "", where if d else "", "", d.lat if d else 0.0,
                      d.lon if d else 0.0) if d else None
        extra: dict[str, Any] = {"count": n, "of": size}
        if self.rule.per == "gateway":
            extra["gateway"] = where
        return self.signal(kind, key, now_ms, place, float(n), **extra)


EVALUATORS: dict[type, type[Evaluator]] = {
    ThresholdRule: ThresholdEvaluator, CountRule: CountEvaluator,
    AnomalyRule: AnomalyEvaluator, AbsenceRule: AbsenceEvaluator,
    GeofenceRule: GeofenceEvaluator, CorrelationRule: CorrelationEvaluator,
    OutageRule: OutageEvaluator,
}
