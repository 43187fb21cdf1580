"""Drop resent readings: the same event id seen again within a time window.

Sensors and gateways resend after a lost PUBACK, and MQTT redelivers after an ingest
restart, so the same reading can arrive twice. Its event id is a hash of sensor, time
and kind, so a resend has the same id. Memory stays bounded: ids live in a few
time buckets; whole buckets expire with the window, and the oldest go early when the
id count passes ``max_ids``.
"""

from __future__ import annotations

from collections import deque

from ingest.contract import Event

BUCKETS = 4


class DuplicateWindow:
    """Recently seen event ids, bucketed by receive time."""

    def __init__(self, window_s: int, max_ids: int) -> None:
        self.bucket_ms = max(1, window_s * 1000 // BUCKETS)
        self.max_ids = max_ids
        self._buckets: deque[tuple[int, set[str]]] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _current(self, now_ms: int) -> set[str]:
        key = now_ms // self.bucket_ms
        if not self._buckets or self._buckets[-1][0] < key:
            self._buckets.append((key, set()))
        while self._buckets and (self._buckets[0][0] <= key - BUCKETS
                                 or (self._size > self.max_ids and len(self._buckets) > 1)):
            self._size -= len(self._buckets.popleft()[1])
        return self._buckets[-1][1]

    def filter(self, events: list[Event], now_ms: int) -> tuple[list[Event], int]:
        """Events not seen before (remembering them), and how many were dropped."""
        kept = self.keep(events, now_ms)
        return [events[k] for k in kept], len(events) - len(kept)

    def keep(self, events: list[Event], now_ms: int) -> list[int]:
        """Positions of the events not seen before (remembering them): what ``filter``
        keeps, for callers that carry other per-event lists alongside (which message
        each came from)."""
        current = self._current(now_ms)
        older = [s for _, s in self._buckets if s is not current]
        kept: list[int] = []
        before = len(current)
        for k, ev in enumerate(events):
            eid = ev.event_id
            if eid in current or any(eid in s for s in older):
                continue
            current.add(eid)
            kept.append(k)
        self._size += len(current) - before
        return kept
