"""Drop resent readings: the same reading seen again within a time window.

Sensors and gateways resend after a lost PUBACK, and MQTT redelivers after an ingest
restart, so the same reading can arrive twice. What makes two readings "the same" is
what made v1 event ids equal: (sensor, event time, kind, incident).

Since issue 15 the window works on int64 keys, a whole batch at a time (``keep_keys``),
so the hot path builds no per-reading object: the normalizer packs each reading row's
key from its sensor's registry index and its event time (``Normalizer._keys`` explains
why that packing is exact), and an incident's key is its event id's hash. Each bucket is
a set of ints: a batch with no duplicate (nearly every batch) costs one ``set`` of its
keys and one C-level ``isdisjoint`` per bucket, then one ``update``; only a batch that
has a duplicate walks its keys in Python to find which. Why not sorted arrays and
``np.searchsorted`` / ``np.isin``: membership would be vectorized, but adding a batch to
a sorted bucket copies the bucket (up to ``max_ids`` keys, megabytes, per batch), so the
cost grows with the window; a set's cost per batch grows only with the batch.

Memory stays bounded: keys live in a few time buckets; whole buckets expire with the
window, and the oldest go early when the key count passes ``max_ids``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ingest.contract import Event

BUCKETS = 4


def event_key(event_id: str) -> int:
    """The int64 key of a v1 event id (a 128-bit hash: its first 63 bits), negative so it
    never meets a packed reading key (``Normalizer``), which is never negative."""
    return -1 - (int(event_id[:16], 16) >> 1)


class DuplicateWindow:
    """Recently seen keys, bucketed by receive time."""

    def __init__(self, window_s: int, max_ids: int) -> None:
        self.bucket_ms = max(1, window_s * 1000 // BUCKETS)
        self.max_ids = max_ids
        self._buckets: deque[tuple[int, set[int]]] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _current(self, now_ms: int) -> set[int]:
        key = now_ms // self.bucket_ms
        if not self._buckets or self._buckets[-1][0] < key:
            self._buckets.append((key, set()))
        while self._buckets and (self._buckets[0][0] <= key - BUCKETS
                                 or (self._size > self.max_ids and len(self._buckets) > 1)):
            self._size -= len(self._buckets.popleft()[1])
        return self._buckets[-1][1]

    def keep_keys(self, keys: npt.NDArray[np.int64], now_ms: int) -> npt.NDArray[np.int64]:
        """Positions (ascending) of the keys not seen before, remembering them: a key
        already in the window, or earlier in ``keys``, is a duplicate."""
        current = self._current(now_ms)
        batch = np.asarray(keys, np.int64).tolist()
        fresh = set(batch)
        if len(fresh) == len(batch) and all(seen.isdisjoint(fresh)
                                            for _, seen in self._buckets):
            current |= fresh
            self._size += len(fresh)
            return np.arange(len(batch), dtype=np.int64)
        older = [seen for _, seen in self._buckets if seen is not current]
        kept: list[int] = []
        before = len(current)
        for k, key in enumerate(batch):  # a batch with a duplicate: find which (rare)
            if key in current or any(key in seen for seen in older):
                continue
            current.add(key)
            kept.append(k)
        self._size += len(current) - before
        return np.array(kept, np.int64)

    # -- v1 events (tests and callers holding Events; the service uses keep_keys) -------
    def filter(self, events: list[Event], now_ms: int) -> tuple[list[Event], int]:
        """Events not seen before (remembering them), and how many were dropped."""
        kept = self.keep(events, now_ms)
        return [events[k] for k in kept], len(events) - len(kept)

    def keep(self, events: Sequence[Event], now_ms: int) -> list[int]:
        """Positions of the events not seen before (remembering them), keyed by their
        event ids (``event_key``): what ``filter`` keeps, for callers that carry other
        per-event lists alongside."""
        keys = np.fromiter((event_key(e.event_id) for e in events), np.int64, len(events))
        return self.keep_keys(keys, now_ms).tolist()
