"""Event-time clocks for the alerts rules: a watermark per Kafka partition of the events topic.

Why not the wall clock: the stream is often behind it (a replay, a consumer catching up
after a restart, a simulator placing its load minutes in the past). Comparing a sensor's
last event time with the wall clock then calls every sensor offline at first sight and
clears it with its next reading: an alert write, an audit row and a Kafka record per
reading, and operators who stop trusting the rule.

What is used instead (see ``Watermarks``):

- A partition's watermark is the newest event time read from it (never ahead of the wall
  clock, never going back). Events of one sensor all live in one partition (the topic is
  keyed by sensor id), so a sensor is judged against the progress of its own partition.
- Silence is measured *relative* to that progress: each judged sensor keeps the
  partition's watermark as it stood when its last reading was read (its ``mark``), and
  is silent for ``watermark_now - mark``. A sensor whose clock sits minutes behind the
  others of its partition (a gateway buffering, a probe next to a replayed load) is
  therefore not silent while it keeps speaking: a jump of the partition's watermark can
  raise such a sensor at most once, never once per reading.
- When the whole stream stops, event time would stand still and no sensor would ever be
  offline. So a partition whose consumer has read everything there is (position equals
  the end offset, which the fetch responses tell without extra requests) and has had no
  records since wall time ``T`` advances its watermark with the wall clock: newest event
  time + (now - T). A lagging or replayed stream is never idle (there is more to read),
  so it never advances faster than its records; a stream that really stops makes every
  sensor offline once its limit has passed in wall time, which is what an operator wants
  to know.
"""

from __future__ import annotations

import numpy as np

NONE = np.iinfo(np.int64).min  # no watermark yet (a partition never read)


class Watermarks:
    """Per-partition event-time watermarks and which partition carries each sensor.

    Sensors are ``SensorIndex`` codes; ``part`` maps code -> partition (-1: not seen on
    any partition yet, judged against the lowest watermark of all partitions).
    """

    def __init__(self) -> None:
        self.wm: dict[int, int] = {}  # partition -> watermark (monotonic)
        self.newest: dict[int, int] = {}  # partition -> newest event time read (capped)
        self.last_record: dict[int, int] = {}  # partition -> wall time of its last records
        self.part = np.full(64, -1, np.int32)
        self.changed = False  # for the checkpoint: watermarks moved since the last one

    # --- stream side ------------------------------------------------------------------------
    def observe(self, partition: int, newest_ms: int, now_ms: int) -> None:
        """Records were read from ``partition``; the newest of their event times."""
        newest_ms = min(newest_ms, now_ms)  # a sensor clock in the future moves nobody
        if newest_ms > self.newest.get(partition, NONE):
            self.newest[partition] = newest_ms
        self.last_record[partition] = now_ms
        self._move(partition, self.newest[partition])

    def advance(self, now_ms: int, caught_up: dict[int, bool]) -> None:
        """Idle partitions (read to their end, nothing new since) follow the wall clock."""
        for p, done in caught_up.items():
            newest = self.newest.get(p)
            if newest is None:
                continue
            if done:
                idle = max(0, now_ms - self.last_record.get(p, now_ms))
                self._move(p, min(newest + idle, now_ms))

    def _move(self, partition: int, to_ms: int) -> None:
        if to_ms > self.wm.get(partition, NONE):
            self.wm[partition] = to_ms
            self.changed = True

    def learn(self, codes: np.ndarray, partitions: np.ndarray | None) -> None:
        """Which partition each sensor's events come from (the last one seen wins)."""
        if codes.size == 0:
            return
        self._grow(int(codes.max()) + 1)
        if partitions is not None:
            self.part[codes] = partitions

    def settle(self, codes: np.ndarray, partition: int) -> None:
        """Sensors whose checkpointed state came from ``partition``: that is their
        partition until their own events say otherwise."""
        if codes.size == 0:
            return
        self._grow(int(codes.max()) + 1)
        codes = codes[self.part[codes] < 0]
        self.part[codes] = partition

    def forget(self, partitions: set[int]) -> None:
        """Partitions that moved to another worker: their clocks go with them."""
        for p in partitions:
            for d in (self.wm, self.newest, self.last_record):
                d.pop(p, None)

    def _grow(self, need: int) -> None:
        if need > self.part.size:
            grown = np.full(max(need, 2 * self.part.size), -1, np.int32)
            grown[: self.part.size] = self.part
            self.part = grown

    # --- judging side -----------------------------------------------------------------------
    def lowest(self) -> int:
        """The lowest watermark of all partitions read so far (NONE before any)."""
        return min(self.wm.values()) if self.wm else NONE

    def of_codes(self, codes: np.ndarray) -> np.ndarray:
        """The watermark of each sensor's partition (NONE where there is none yet)."""
        parts = np.full(codes.size, -1, np.int64)
        known = codes < self.part.size
        parts[known] = self.part[codes[known]]
        n = max(max(self.wm) + 1 if self.wm else 0, int(parts.max()) + 1 if parts.size else 0)
        lut = np.full(n + 1, NONE, np.int64)  # the last slot: partition -1
        for p, w in self.wm.items():
            lut[p] = w
        lut[n] = self.lowest()
        return lut[np.where(parts < 0, n, parts)]

    # --- checkpoint -------------------------------------------------------------------------
    def snapshot(self) -> dict[int, int]:
        self.changed = False
        return dict(self.wm)

    def restore(self, marks: dict[int, int], now_ms: int) -> None:
        """Watermarks from the checkpoint: the idle clock starts again from the restart."""
        for p, w in marks.items():
            self.wm[p] = max(w, self.wm.get(p, NONE))
            self.newest[p] = max(w, self.newest.get(p, NONE))
            self.last_record.setdefault(p, now_ms)
