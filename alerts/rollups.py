"""The processors' rollups as rule input: merged window statistics per sensor.

The processors publish *partials* (``processors.rollup.Rollup``): a window that gets
readings over several of their batches arrives as several messages. ``RollupMerger``
keeps the recent windows of every (sensor, metric) and merges partials the way the
contract says (n and sum add, min/max take the extremes; p95 keeps the worst partial),
then presents each updated window as an ``Event`` stamped at the window's end whose
measurements are ``metric`` (the mean) and ``metric:stat`` for the other statistics,
so threshold and anomaly rules read rollups with the same code as raw events.
"""

from __future__ import annotations

import time

import msgspec

from alerts.batch import SensorIndex
from ingest.contract import Event
from processors.rollup import WINDOWS_MS, Rollup

_decoder = msgspec.json.Decoder(list[Rollup])
_one = msgspec.json.Decoder(Rollup)


def decode_rollups(values: list[bytes]) -> list[Rollup]:
    return _decoder.decode(b"[" + b",".join(values) + b"]") if values else []


def decode_rollup(value: bytes) -> Rollup:
    return _one.decode(value)


# How far behind the newest window of its resolution a partial may still be merged, in
# event time. Windows older than this are dropped, and so are partials that arrive for
# them: the rules reading windows ignore a window older than the last one they judged
# for that sensor anyway (out of order), so an old window only costs memory.
KEEP_MS: dict[str, int] = {"1m": 3 * 60_000, "1h": 3_600_000}
# Hard cap on the (window, sensor, bucket) entries held, whatever the clock does: the
# oldest buckets go first. 200k entries is ~6 windows per sensor of the x4 load fleet.
MAX_WINDOWS = 200_000

# window ("1m") -> metric -> domains some rule reads it for (None: any domain)
Wants = dict[str, dict[str, frozenset[str] | None]]


class RollupMerger:
    """Merges partials into windows, keeping only what rules can still use.

    Bounded by construction: only (window, metric) pairs some running rule reads are kept
    (``set_wants``; the processors publish every metric of every sensor, most of which no
    rule reads), windows expire by event time (``KEEP_MS`` behind the newest bucket of
    their resolution, the newest capped at the wall clock so a sensor with a clock in the
    future cannot expire everyone's current window), and ``max_windows`` caps the total.
    """

    def __init__(self, index: SensorIndex, keep_ms: dict[str, int] | None = None,
                 max_windows: int = MAX_WINDOWS) -> None:
        self.index = index
        self.keep_ms = dict(KEEP_MS if keep_ms is None else keep_ms)
        self.max_windows = max_windows
        # (window, bucket) -> sensor_id -> metric -> [n, sum, min, max, p95]; one entry per
        # bucket, so expiring a bucket is one delete, not a scan of every window
        self.buckets: dict[tuple[str, int], dict[str, dict[str, list[float]]]] = {}
        self.newest: dict[str, int] = {}
        self.size = 0  # (window, sensor, bucket) entries held
        self.wants: Wants | None = None  # None: keep everything (no rule set given yet)
        self.dropped = 0  # partials not kept: not read by any rule, or too old

    def set_wants(self, wants: Wants) -> None:
        """What the running rules read; windows nobody reads any more are dropped."""
        self.wants = wants
        for key in [k for k in self.buckets if k[0] not in wants]:
            self._drop(key)

    def _wanted(self, r: Rollup) -> bool:
        if self.wants is None:
            return True
        metrics = self.wants.get(r.window)
        if not metrics or r.metric not in metrics:
            return False
        domains = metrics[r.metric]
        return domains is None or r.domain in domains

    def merge(self, rollups: list[Rollup]) -> dict[str, list[Event]]:
        """Merge partials; returns, per input name, one event per updated sensor window."""
        now = int(time.time() * 1000)
        for r in rollups:
            if r.scope == "sensor" and r.window in WINDOWS_MS and r.bucket <= now:
                self.newest[r.window] = max(self.newest.get(r.window, 0), r.bucket)
        self._expire()
        touched: dict[tuple[str, str, int], Rollup] = {}
        for r in rollups:
            if r.scope != "sensor" or r.sensor_id is None or r.window not in WINDOWS_MS \
                    or not self._wanted(r) or r.bucket < self._horizon(r.window):
                self.dropped += 1
                continue
            sensors = self.buckets.setdefault((r.window, r.bucket), {})
            metrics = sensors.get(r.sensor_id)
            if metrics is None:
                metrics = sensors[r.sensor_id] = {}
                self.size += 1
            w = metrics.get(r.metric)
            if w is None:
                metrics[r.metric] = [r.n, r.sum, r.min, r.max, r.p95]
            else:
                w[0] += r.n
                w[1] += r.sum
                w[2] = min(w[2], r.min)
                w[3] = max(w[3], r.max)
                w[4] = max(w[4], r.p95)
            touched[(r.window, r.sensor_id, r.bucket)] = r
        out: dict[str, list[Event]] = {}
        for key, r in sorted(touched.items(), key=lambda kv: kv[0][2]):
            window, sid, bucket = key
            meas: dict[str, float] = {}
            for metric, (n, sm, lo, hi, p95) in self.buckets[(window, bucket)][sid].items():
                meas[metric] = sm / n if n else 0.0
                meas.update({f"{metric}:min": lo, f"{metric}:max": hi, f"{metric}:p95": p95,
                             f"{metric}:sum": sm, f"{metric}:n": float(n)})
            place = self.index.places.get(sid)
            out.setdefault(f"rollup_{window}", []).append(Event(
                event_id=f"rollup:{window}:{sid}:{bucket}", sensor_id=sid, domain=r.domain,
                type=place.type if place else "", district=r.district,
                landmark=place.landmark if place else "", lat=place.lat if place else 0.0,
                lon=place.lon if place else 0.0, event_time=bucket + WINDOWS_MS[window],
                receive_time=now, interval_s=WINDOWS_MS[window] // 1000, measurements=meas))
        self._cap()
        return out

    def _horizon(self, window: str) -> int:
        """Oldest bucket of ``window`` still merged."""
        newest = self.newest.get(window)
        if newest is None:
            return -(1 << 62)
        return newest - self.keep_ms.get(window, 3 * WINDOWS_MS[window])

    def _expire(self) -> None:
        for key in [k for k in self.buckets if k[1] < self._horizon(k[0])]:
            self._drop(key)

    def _cap(self) -> None:
        if self.size <= self.max_windows:
            return
        for key in sorted(self.buckets, key=lambda k: k[1]):  # oldest buckets first
            self._drop(key)
            if self.size <= self.max_windows:
                return

    def _drop(self, key: tuple[str, int]) -> None:
        self.size -= len(self.buckets.pop(key))
