"""Drop resent readings: the same reading seen again within a time window.

Sensors and gateways resend after a lost PUBACK, and MQTT redelivers after an ingest
restart, so the same reading can arrive twice. What makes two readings "the same" is
what made v1 event ids equal: (sensor, event time, kind, incident).

Since issue 15 the window works on int64 keys, a whole batch at a time (``keep_keys``),
so the hot path builds no per-reading object: the normalizer packs each reading row's
key from its sensor's registry index and its event time (``Normalizer._keys`` explains
why that packing is exact), and an incident's key is its event id's hash.

The keys live in ONE preallocated numpy hash table (open addressing, ``PROBES`` slots
per key at quadratic offsets, each slot stamped with when its key was seen), so a batch
is a handful of vectorized gathers and scatters and the memory is fixed from the start
(``2 * max_ids`` slots of 16 bytes, rounded up to a power of two: 64 MiB at the default
2M): a 30-minute soak at 2,000 msg/s showed the former per-bucket Python sets growing
ingest's RSS by ~30 MiB over the first ten minutes (the window filling) and ~0.4 MiB/min
after. Same cost per key (0.43 against 0.35-0.40 us, 2.4M keys through a 600 s window,
back to back). A slot whose stamp is older than the window is free; a key finding all
its slots taken by live keys takes the oldest of them, so at more than ``max_ids`` keys
the window forgets its oldest first, as the buckets did (and at a full table about
0.5**PROBES of keys early). Forgetting early only lets a resend through: the processors
store a reading once by its natural key anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ingest.contract import Event

#: Slots a key may live in (from its hash, at quadratic offsets).
PROBES = 8
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads nearby keys apart


def event_key(event_id: str) -> int:
    """The int64 key of a v1 event id (a 128-bit hash: its first 63 bits), negative so it
    never meets a packed reading key (``Normalizer``), which is never negative."""
    return -1 - (int(event_id[:16], 16) >> 1)


class DuplicateWindow:
    """Keys seen in the last ``window_s`` seconds (of receive time), at most about
    ``max_ids`` of them, in a fixed table of twice that many slots."""

    def __init__(self, window_s: int, max_ids: int) -> None:
        self.window_ms = window_s * 1000
        bits = max(int(2 * max(max_ids, PROBES) - 1).bit_length(), 4)
        self.capacity = 1 << bits
        self._shift = np.uint64(64 - bits)
        # quadratic offsets (0, 1, 3, 6, ...): neighbouring keys' runs do not pile up
        # into one long cluster, as consecutive slots do
        self._probe = np.cumsum(np.arange(PROBES, dtype=np.int64))
        # np.full writes every page now: the table's memory is taken at start, not
        # as the window fills
        self._keys = np.full(self.capacity, 0, np.int64)
        self._seen = np.full(self.capacity, np.iinfo(np.int64).min, np.int64)
        self._now = 0

    def __len__(self) -> int:
        """Keys in the window (as of the last batch)."""
        return int(np.count_nonzero(self._seen > self._now - self.window_ms))

    def _slots(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Each key's ``PROBES`` candidate slots, shape (n, PROBES)."""
        with np.errstate(over="ignore"):
            h = ((keys.view(np.uint64) * _GOLDEN) >> self._shift).astype(np.int64)
        return (h[:, None] + self._probe) & (self.capacity - 1)

    def keep_keys(self, keys: npt.NDArray[np.int64], now_ms: int) -> npt.NDArray[np.int64]:
        """Positions (ascending) of the keys not seen before, remembering them: a key
        already in the window, or earlier in ``keys``, is a duplicate."""
        keys = np.ascontiguousarray(keys, np.int64)
        if keys.size == 0:
            return np.empty(0, np.int64)
        self._now = now_ms
        horizon = now_ms - self.window_ms
        _, first = np.unique(keys, return_index=True)  # earlier in the batch wins
        first.sort()
        slots = self._slots(keys[first])
        seen = (self._seen[slots] > horizon) & (self._keys[slots] == keys[first][:, None])
        fresh = first[~seen.any(axis=1)]
        self._remember(keys[fresh], now_ms, horizon)
        return fresh

    def _remember(self, keys: npt.NDArray[np.int64], now_ms: int, horizon: int) -> None:
        """Put each key in a free slot of its own (else its oldest), a few rounds: keys of
        one batch that chose the same slot try again where they lost."""
        for _ in range(PROBES):
            if keys.size == 0:
                return
            slots = self._slots(keys)
            stamps = self._seen[slots]
            free = stamps <= horizon
            pick = np.where(free.any(axis=1), free.argmax(axis=1), stamps.argmin(axis=1))
            chosen = slots[np.arange(keys.size), pick]
            self._keys[chosen] = keys
            self._seen[chosen] = now_ms
            keys = keys[self._keys[chosen] != keys]  # lost a slot to a key of this batch

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
