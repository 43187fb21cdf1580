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


class RollupMerger:
    def __init__(self, index: SensorIndex, keep_windows: int = 3) -> None:
        self.index = index
        self.keep_windows = keep_windows
        # (window, sensor_id, bucket) -> metric -> [n, sum, min, max, p95]
        self.windows: dict[tuple[str, str, int], dict[str, list[float]]] = {}
        self.newest: dict[str, int] = {}

    def merge(self, rollups: list[Rollup]) -> dict[str, list[Event]]:
        """Merge partials; returns, per input name, one event per updated sensor window."""
        touched: dict[tuple[str, str, int], Rollup] = {}
        for r in rollups:
            if r.scope != "sensor" or r.sensor_id is None or r.window not in WINDOWS_MS:
                continue
            key = (r.window, r.sensor_id, r.bucket)
            metrics = self.windows.setdefault(key, {})
            w = metrics.get(r.metric)
            if w is None:
                metrics[r.metric] = [r.n, r.sum, r.min, r.max, r.p95]
            else:
                w[0] += r.n
                w[1] += r.sum
                w[2] = min(w[2], r.min)
                w[3] = max(w[3], r.max)
                w[4] = max(w[4], r.p95)
            touched[key] = r
            self.newest[r.window] = max(self.newest.get(r.window, 0), r.bucket)
        out: dict[str, list[Event]] = {}
        now = int(time.time() * 1000)
        for key, r in sorted(touched.items(), key=lambda kv: kv[0][2]):
            window, sid, bucket = key
            meas: dict[str, float] = {}
            for metric, (n, sm, lo, hi, p95) in self.windows[key].items():
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
        self._evict()
        return out

    def _evict(self) -> None:
        for key in [k for k in self.windows
                    if k[2] < self.newest.get(k[0], 0) - self.keep_windows * WINDOWS_MS[k[0]]]:
            del self.windows[key]
