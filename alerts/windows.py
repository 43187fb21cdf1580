"""Per-sensor time windows for the rules that read them (``input: rollup_1m``/``rollup_1h``).

Why here and not the processors' rollups: the processors published one JSON partial per
(window, sensor or district, metric) and batch, ~9-12 Kafka records per event, and the
alerts worker consumed all of them to keep almost none (one metric of one domain). The
windows a rule needs are cheap to compute from the events the worker reads anyway, so
it computes exactly those, vectorized over each batch, and nobody publishes partials.

Semantics (what a rule sees): one value per (sensor, window), when the window *closes*,
with the statistics the processor's rollup gives for the same readings (n, sum, mean,
min, max, p95 as ``percentile_cont``), as an ``Event`` stamped at the window's end whose
measurements are ``metric`` (the mean) and ``metric:stat``. A window closes by EVENT time:
once the sensor's clock (its newest reading, advanced by its partition's watermark since
then, see ``alerts.watermark``) has passed the window's end plus ``lateness_ms``. Until
then a late or out-of-order reading of that window still counts; after it, a reading of
a closed window is dropped and counted (``late``). Two windows per sensor are open at
most (the newest and the one before), which is what a lateness below the window length
needs; a reading two windows ahead closes the older one.

State: arrays indexed by sensor code (``SlotArrays``), checkpointed with the rules'
state as deltas, so a restart resumes the open windows where the offsets resume.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec
import numpy as np

from alerts.batch import Batch, SensorIndex, matches, occurrence_rank
from alerts.ruleset import Match
from alerts.slots import SlotArrays
from alerts.watermark import NONE, Watermarks
from ingest.contract import Event

WINDOWS_MS: dict[str, int] = {"1m": 60_000, "1h": 3_600_000}
STATS = ("n", "sum", "min", "max")


class _WindowArrays(SlotArrays):
    FIELDS = (("cur_b", np.int64), ("cur_n", np.int64), ("cur_sum", np.float64),
              ("cur_min", np.float64), ("cur_max", np.float64),
              ("prev_b", np.int64), ("prev_n", np.int64), ("prev_sum", np.float64),
              ("prev_min", np.float64), ("prev_max", np.float64),
              ("done_b", np.int64), ("last_t", np.int64), ("mark", np.int64),
              ("used", np.bool_))


@dataclass(frozen=True, slots=True)
class Closed:
    """Windows that closed, in columns, in bucket order per sensor."""

    codes: np.ndarray
    buckets: np.ndarray
    n: np.ndarray
    sum: np.ndarray
    min: np.ndarray
    max: np.ndarray
    p95: np.ndarray


def _empty() -> Closed:
    z = np.empty(0, np.int64)
    f = np.empty(0, np.float64)
    return Closed(z, z, z, f, f, f, f)


class WindowSet:
    """The windows of one (resolution, metric) for the sensors some rule matches."""

    def __init__(self, window: str, metric: str, index: SensorIndex,
                 lateness_ms: int, p95: bool = False) -> None:
        self.window, self.metric = window, metric
        self.width = WINDOWS_MS[window]
        self.index = index
        self.lateness_ms = lateness_ms
        self.arrays = _WindowArrays(index)
        self.late = 0  # readings of windows already closed, dropped
        # p95 needs the values themselves: kept only when a rule reads it, per open window
        self.values: dict[tuple[int, int], list[float]] | None = {} if p95 else None

    # --- the batch ------------------------------------------------------------------------
    def add(self, codes: np.ndarray, times: np.ndarray, values: np.ndarray,
            clock: Watermarks) -> Closed:
        """Fold one batch's readings (stream order) into the windows; returns what closed."""
        self.arrays.ensure()
        a = self.arrays.arr
        out: list[Closed] = []
        if codes.size:
            buckets = times // self.width * self.width
            order = np.lexsort((buckets, codes))
            c, b, t, v = codes[order], buckets[order], times[order], values[order]
            brk = np.ones(c.size, bool)
            brk[1:] = (c[1:] != c[:-1]) | (b[1:] != b[:-1])
            starts = np.flatnonzero(brk)
            gc, gb = c[starts], b[starts]
            gn = np.diff(np.r_[starts, c.size])
            gsum = np.add.reduceat(v, starts)
            gmin = np.minimum.reduceat(v, starts)
            gmax = np.maximum.reduceat(v, starts)
            gt = np.maximum.reduceat(t, starts)
            if self.values is not None:
                for k, part in enumerate(np.split(v, starts[1:])):
                    self.values.setdefault((int(gc[k]), int(gb[k])), []).extend(part.tolist())
            fresh = ~a["used"][gc]
            if fresh.any():  # first reading of a sensor: nothing open, nothing closed yet
                fc = gc[fresh]
                a["used"][fc] = True
                for f in ("cur_b", "prev_b", "done_b", "last_t", "mark"):
                    a[f][fc] = NONE
            rank = occurrence_rank(gc)  # groups are in bucket order within each sensor
            for rnd in range(int(rank.max()) + 1):
                m = rank == rnd
                out.append(self._fold(gc[m], gb[m], gn[m], gsum[m], gmin[m], gmax[m]))
            # each sensor's clock: its newest reading, and its partition's watermark now
            touched = gc[np.r_[gc[1:] != gc[:-1], True]]
            newest = np.maximum.reduceat(gt, np.flatnonzero(np.r_[True, gc[1:] != gc[:-1]]))
            a["last_t"][touched] = np.maximum(a["last_t"][touched], newest)
            a["mark"][touched] = clock.of_codes(touched)
            self.arrays.touch(touched)
            out.append(self.close(clock, touched))
        return _concat(out)

    def _fold(self, c: np.ndarray, b: np.ndarray, n: np.ndarray, s: np.ndarray,
              lo: np.ndarray, hi: np.ndarray) -> Closed:
        """One group per sensor: merge into an open window, or open a new one."""
        a = self.arrays.arr
        cur, prev = a["cur_b"][c], a["prev_b"][c]
        late = b <= a["done_b"][c]
        in_cur = ~late & (b == cur)
        in_prev = ~late & ~in_cur & (b == prev)
        newer = ~late & (b > cur)
        late |= ~(in_cur | in_prev | newer)
        self.late += int(n[late].sum())
        for slot, mask in (("cur", in_cur), ("prev", in_prev)):
            if mask.any():
                k = c[mask]
                a[f"{slot}_n"][k] += n[mask]
                a[f"{slot}_sum"][k] += s[mask]
                a[f"{slot}_min"][k] = np.minimum(a[f"{slot}_min"][k], lo[mask])
                a[f"{slot}_max"][k] = np.maximum(a[f"{slot}_max"][k], hi[mask])
        if not newer.any():
            return _empty()
        k = c[newer]
        # the window before the newest is pushed out: it closes now, whatever the clock
        pushed = k[a["prev_b"][k] != NONE]
        closed = self._emit(pushed, "prev")
        for f in ("b", "n", "sum", "min", "max"):
            a[f"prev_{f}"][k] = a[f"cur_{f}"][k]
        a["cur_b"][k], a["cur_n"][k], a["cur_sum"][k] = b[newer], n[newer], s[newer]
        a["cur_min"][k], a["cur_max"][k] = lo[newer], hi[newer]
        return closed

    # --- closing --------------------------------------------------------------------------
    def close(self, clock: Watermarks, codes: np.ndarray | None = None) -> Closed:
        """Close the windows whose end + lateness the sensor's clock has passed."""
        a = self.arrays.arr
        if codes is None:
            n = len(self.index.ids)
            self.arrays.ensure()
            codes = np.flatnonzero(a["used"][:n] & (a["cur_b"][:n] != NONE))
            if codes.size == 0:
                return _empty()
        wm = clock.of_codes(codes)
        mark = a["mark"][codes]
        ahead = np.where((wm != NONE) & (mark != NONE), np.maximum(wm - mark, 0), 0)
        now = a["last_t"][codes] + ahead
        due = now - self.width - self.lateness_ms
        prev_due = codes[(a["prev_b"][codes] != NONE) & (a["prev_b"][codes] <= due)]
        cur_due = codes[(a["cur_b"][codes] != NONE) & (a["cur_b"][codes] <= due)]
        first = self._emit(prev_due, "prev")
        second = self._emit(cur_due, "cur")
        return _concat([first, second])

    def _emit(self, codes: np.ndarray, slot: str) -> Closed:
        if codes.size == 0:
            return _empty()
        a = self.arrays.arr
        b = a[f"{slot}_b"][codes].copy()
        closed = Closed(codes.copy(), b, a[f"{slot}_n"][codes].copy(),
                        a[f"{slot}_sum"][codes].copy(), a[f"{slot}_min"][codes].copy(),
                        a[f"{slot}_max"][codes].copy(), self._p95(codes, b))
        a["done_b"][codes] = np.maximum(a["done_b"][codes], b)
        a[f"{slot}_b"][codes] = NONE
        self.arrays.touch(codes)
        return closed

    def _p95(self, codes: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        out = np.full(codes.size, np.nan)
        if self.values is None:
            return out
        for j, key in enumerate(zip(codes.tolist(), buckets.tolist(), strict=True)):
            vals = self.values.pop(key, None)
            if vals:
                out[j] = float(np.percentile(vals, 95))  # = percentile_cont(0.95)
        return out

    def events(self, closed: Closed) -> list[Event]:
        """Closed windows as events stamped at their end, for the rules' ``Batch``."""
        ids, places, m, w = self.index.ids, self.index.places, self.metric, self.window
        now = int(time.time() * 1000)
        out = []
        for c, b, n, sm, lo, hi, p95 in zip(
                closed.codes.tolist(), closed.buckets.tolist(), closed.n.tolist(),
                closed.sum.tolist(), closed.min.tolist(), closed.max.tolist(),
                closed.p95.tolist(), strict=True):
            sid = ids[c]
            p = places.get(sid)
            meas = {m: sm / n if n else 0.0, f"{m}:min": lo, f"{m}:max": hi,
                    f"{m}:sum": sm, f"{m}:n": float(n)}
            if p95 == p95:  # not NaN
                meas[f"{m}:p95"] = p95
            out.append(Event(
                event_id=f"window:{w}:{sid}:{b}", sensor_id=sid,
                domain=p.domain if p else "", type=p.type if p else "",
                district=p.district if p else "", landmark=p.landmark if p else "",
                lat=p.lat if p else 0.0, lon=p.lon if p else 0.0, event_time=b + self.width,
                receive_time=now, interval_s=self.width // 1000, measurements=meas))
        return out


def _concat(parts: Iterable[Closed]) -> Closed:
    parts = [p for p in parts if p.codes.size]
    if not parts:
        return _empty()
    if len(parts) == 1:
        return parts[0]
    cols = [np.concatenate([getattr(p, f) for p in parts]) for f in Closed.__slots__]
    order = np.argsort(cols[1], kind="stable")  # bucket order; per sensor it already is
    return Closed(*(col[order] for col in cols))


class Windows:
    """Every (resolution, metric) window set the running rules read, fed per batch."""

    def __init__(self, index: SensorIndex, lateness_ms: int) -> None:
        self.index = index
        self.lateness_ms = lateness_ms
        self.sets: dict[tuple[str, str], WindowSet] = {}
        self.matches: dict[tuple[str, str], tuple[Match, ...]] = {}

    def set_wants(self, wants: dict[tuple[str, str], tuple[list[Match], bool]]) -> None:
        """(window, metric) -> (the matches of the rules reading it, whether p95 is read).
        Window sets nobody reads any more are dropped; kept ones keep their state."""
        kept: dict[tuple[str, str], WindowSet] = {}
        for key, (ms, p95) in wants.items():
            old = self.sets.get(key)
            kept[key] = old if old is not None and (old.values is not None) >= p95 else \
                WindowSet(key[0], key[1], self.index, self.lateness_ms, p95)
            self.matches[key] = tuple(ms)
        self.sets = kept

    def digest(self, key: tuple[str, str]) -> str:
        """Identity of the sensors a window set is kept for (its checkpoint's rule hash)."""
        text = msgspec.json.encode([key, self.matches[key], self.sets[key].values is not None])
        return hashlib.blake2b(text, digest_size=8).hexdigest()

    def _selected(self, key: tuple[str, str]) -> Callable[..., bool]:
        ms = self.matches[key]
        return lambda p: any(matches(m, p) for m in ms)

    def on_batch(self, batch: Batch, clock: Watermarks) -> dict[str, list[Event]]:
        """Fold a batch in; returns the closed windows per rule input (``rollup_1m``...)."""
        out: dict[str, list[Event]] = {}
        for key, ws in self.sets.items():
            pos, vals = batch.metric(ws.metric)
            if pos.size == 0:
                continue
            keep = batch.selected((f"__windows__:{key[0]}:{key[1]}", self.digest(key)),
                                  self._selected(key))[pos]
            if not keep.any():
                continue
            pos, vals = pos[keep], vals[keep]
            closed = ws.add(batch.codes[pos], batch.times[pos], vals, clock)
            if closed.codes.size:
                out.setdefault(f"rollup_{ws.window}", []).extend(ws.events(closed))
        return out

    def on_tick(self, clock: Watermarks) -> dict[str, list[Event]]:
        """Close what the watermarks' progress has closed (a stream that went quiet)."""
        out: dict[str, list[Event]] = {}
        for ws in self.sets.values():
            closed = ws.close(clock)
            if closed.codes.size:
                out.setdefault(f"rollup_{ws.window}", []).extend(ws.events(closed))
        return out
