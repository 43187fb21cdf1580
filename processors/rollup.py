"""Vectorized rollups: count, sum, min, max, mean and p95 per group and time window.

A batch of readings arrives as parallel numpy arrays (integer codes for the sensor,
metric, district and domain, the event time in epoch ms and the value). Each rollup
groups them by a key (sensor+metric, or district+domain+metric) and a window (1 minute,
1 hour) without a Python loop over readings:

1. the group of every reading becomes one int64 (key code x window index), compacted
   to dense ids with ``np.unique(..., return_inverse=True)``;
2. every value gets its rank in the batch (one ``argsort`` shared by all rollups);
3. ``group * N + rank`` is a single int64 whose sort orders readings by group, then by
   value: one ``np.sort`` (SIMD radix/quick sort in numpy 2) per rollup;
4. group boundaries come from comparing neighbours; min and max are the first and
   last value of each group, n the run lengths, sum ``np.add.reduceat`` (few groups)
   or a weighted ``np.bincount`` (many) and
   p95 the linear interpolation between the two order statistics around
   ``(n - 1) * 0.95`` (PostgreSQL's ``percentile_cont(0.95)``, numpy's default).

Merging: n, sum, min and max of two partials of the same window merge exactly; p95
does not. The plain-PostgreSQL sink therefore merges n/sum/min/max on upsert, keeps
``max(p95)`` of the partials meanwhile and queues the window for an exact recompute
from raw readings (``processors.storage``); TimescaleDB computes it in its continuous
aggregates.

The ``Rollup`` struct is what the processors publish on the aggregates topic.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np
import numpy.typing as npt

P95 = 0.95
WINDOWS_MS: dict[str, int] = {"1m": 60_000, "1h": 3_600_000}

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


class Rollup(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One window's statistics over the readings a processor batch newly stored.

    Published on ``settings.topics.aggregates`` (JSON, one per Kafka message, keyed
    by ``sensor_id`` for ``scope == "sensor"`` and by ``district`` for
    ``scope == "district"``).

    It is a *partial*: the readings of that window stored by one batch. A window that
    receives readings over several batches (a district minute, an hour, late data)
    gets one Rollup per batch. Consumers that need the whole window merge partials
    with the same (scope, window, bucket, sensor_id | district+domain, metric):
    n and sum add, min/max take the min/max, mean = sum / n. p95 is the partial's own
    (exact over the partial; for exact whole-window p95 read the rollup tables).
    A redelivered batch stores nothing new and so publishes nothing: partials are
    never counted twice.

    ``scope``   ``sensor`` (key: sensor_id, metric) or ``district`` (key: district,
                domain, metric).
    ``window``  ``1m`` or ``1h``; ``bucket`` the window start, epoch ms UTC.
    ``sensor_id`` is set for sensor scope; ``district`` and ``domain`` are set for
    both scopes (a sensor's own district and domain) so alerts can route either.
    """

    v: int = 1
    scope: str
    window: str
    bucket: int
    sensor_id: str | None = None
    district: str
    domain: str
    metric: str
    n: int
    sum: float
    min: float
    max: float
    mean: float
    p95: float


_rollup_encoder = msgspec.json.Encoder()
_rollup_decoder = msgspec.json.Decoder(Rollup)


def encode_rollup(r: Rollup) -> bytes:
    return _rollup_encoder.encode(r)


def decode_rollup(data: bytes) -> Rollup:
    return _rollup_decoder.decode(data)


@dataclass(frozen=True, slots=True)
class Groups:
    """The result of one rollup: one row per (key, window bucket), sorted by key then bucket.

    ``key`` is the key code the caller passed in (e.g. sensor*metrics + metric), so the
    caller decodes it back into names with its own vocabularies.
    """

    window_ms: int
    key: I64
    bucket_ms: I64
    n: I64
    sum: F64
    min: F64
    max: F64
    p95: F64

    @property
    def mean(self) -> F64:
        return self.sum / self.n

    def __len__(self) -> int:
        return int(self.key.size)


@dataclass(frozen=True, slots=True)
class Ranked:
    """The batch's values in ascending order and each reading's rank: shared by all rollups."""

    ranks: I64
    ascending: F64


def rank_values(values: F64) -> Ranked:
    order = np.argsort(values)
    ranks = np.empty(values.size, dtype=np.int64)
    ranks[order] = np.arange(values.size, dtype=np.int64)
    return Ranked(ranks, values[order])


@dataclass(frozen=True, slots=True)
class Windowed:
    """One window's per-reading terms shared by every key of a batch: bucket and rank packed."""

    window_ms: int
    first_bucket: int
    span_bits: int  # bits taken by the bucket offset (buckets covered by the batch)
    shift: int  # bits taken by the rank
    packed: I64  # (bucket - first_bucket) << shift | rank


def window_terms(time_ms: I64, window_ms: int, ranked: Ranked) -> Windowed:
    shift = max(int(ranked.ranks.size - 1).bit_length(), 1)
    bucket = time_ms // window_ms
    b0 = int(bucket.min())
    span_bits = max(int(bucket.max()) - b0, 1).bit_length()
    bucket -= b0
    bucket <<= shift
    bucket |= ranked.ranks
    return Windowed(window_ms, b0, span_bits, shift, bucket)


def rollup(key: I64, time_ms: I64, values: F64, window_ms: int,
           ranked: Ranked | None = None, windowed: Windowed | None = None) -> Groups:
    """Aggregate ``values`` per (``key``, window of ``window_ms``) with array operations only.

    ``key`` is any non-negative int64 code per reading. ``ranked`` (``rank_values``) and
    ``windowed`` (``window_terms``) may be passed in when several rollups run over the
    same batch, so each rollup costs one multiply-add, one sort and a few linear passes.
    """
    size = int(values.size)
    if size == 0:
        empty_i, empty_f = np.empty(0, np.int64), np.empty(0, np.float64)
        return Groups(window_ms, empty_i, empty_i, empty_i, empty_f, empty_f, empty_f, empty_f)
    if ranked is None:
        ranked = rank_values(values)
    if windowed is None:
        windowed = window_terms(time_ms, window_ms, ranked)
    span_bits, shift = windowed.span_bits, windowed.shift
    if (int(key.max()) + 1) << (span_bits + shift) >= 1 << 63:
        # The key space is too wide to pack: compact keys to dense codes first.
        uniq, dense = np.unique(key, return_inverse=True)
        out = rollup(dense.astype(np.int64, copy=False), time_ms, values, window_ms,
                     ranked, windowed)
        return Groups(out.window_ms, uniq[out.key], out.bucket_ms, out.n, out.sum,
                      out.min, out.max, out.p95)
    # combined = (key, bucket, rank) in one int64: sorting it sorts by group, then by value.
    combined = key << (span_bits + shift)
    combined |= windowed.packed
    combined.sort()
    sorted_values = ranked.ascending[combined & ((1 << shift) - 1)]
    combined >>= shift  # now the group of each sorted reading
    is_start = np.empty(size, dtype=bool)
    is_start[0] = True
    np.not_equal(combined[1:], combined[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    group_ids = combined[starts]
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = size
    n = ends - starts
    last = ends - 1
    if starts.size * 4 < size:  # few, large groups (districts): segment sums
        sums = np.add.reduceat(sorted_values, starts)
    else:  # many small groups (sensors): each reading's group number, one weighted bincount
        dense_group = np.cumsum(is_start, dtype=np.int64)
        dense_group -= 1
        sums = np.bincount(dense_group, weights=sorted_values, minlength=starts.size)
    # p95: linear interpolation between the order statistics around (n - 1) * 0.95.
    h = (n - 1) * P95
    lo = h.astype(np.int64)  # h >= 0, so truncation is floor
    frac = h - lo
    lo += starts
    v_lo = sorted_values[lo]
    p95 = v_lo + frac * (sorted_values[np.minimum(lo + 1, last)] - v_lo)
    out_key = group_ids >> span_bits
    out_bucket = ((group_ids & ((1 << span_bits) - 1)) + windowed.first_bucket) * window_ms
    return Groups(window_ms, out_key, out_bucket, n, sums, sorted_values[starts],
                  sorted_values[last], p95)


#: The rollups of a batch: name -> (scope, window). Table names are ``{scope}_rollup_{window}``.
ROLLUPS: dict[str, tuple[str, str]] = {
    "sensor_rollup_1m": ("sensor", "1m"),
    "sensor_rollup_1h": ("sensor", "1h"),
    "district_rollup_1m": ("district", "1m"),
    "district_rollup_1h": ("district", "1h"),
}


def aggregate(sensor_key: I64, area_key: I64, time_ms: I64, values: F64) -> dict[str, Groups]:
    """Every rollup of one batch: per (sensor, metric) and per (district, domain, metric),
    1-minute and 1-hour windows. The value ranking and the window terms are shared."""
    if values.size == 0:
        return {name: rollup(sensor_key, time_ms, values, WINDOWS_MS[w])
                for name, (_, w) in ROLLUPS.items()}
    ranked = rank_values(values)
    out: dict[str, Groups] = {}
    for window, window_ms in WINDOWS_MS.items():
        windowed = window_terms(time_ms, window_ms, ranked)
        out[f"sensor_rollup_{window}"] = rollup(sensor_key, time_ms, values, window_ms,
                                                ranked, windowed)
        out[f"district_rollup_{window}"] = rollup(area_key, time_ms, values, window_ms,
                                                  ranked, windowed)
    return out
