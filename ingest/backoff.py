"""Capped exponential backoff with full jitter, for reconnecting and retrying.

Why jitter: after a broker restart every ingest worker of the city loses its connection
at the same instant; without randomness they would all knock again in lockstep. "Full
jitter" (a uniform delay between 0 and the capped exponential) spreads them best.
"""

from __future__ import annotations

import asyncio
import contextlib
import random


class Backoff:
    """``next()`` gives the delay before the next attempt; ``reset()`` after a success."""

    def __init__(self, first_s: float, cap_s: float) -> None:
        self.first_s, self.cap_s = max(first_s, 0.001), max(cap_s, first_s)
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap_s, self.first_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling) if self.attempt == 1 else \
            random.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


async def sleep_unless(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds or until ``stop`` is set; True if stop was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()
