"""Simulated time: a clock that can run faster than real time, and Can Tho's calendar.

The simulators never read the wall clock to decide *what* a sensor says: every reading's
time comes from the deterministic report schedule, which starts at a settable simulated
start time. The wall clock only decides *when* a message goes out (``SimClock``), so the
same seed and start time give byte-identical payloads however fast the run goes.

Can Tho is UTC+7 all year (no daylight saving); rhythms are expressed in local hours.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

import numpy as np

TZ_OFFSET_MS = 7 * 3600 * 1000  # Indochina Time, UTC+7
DAY_MS = 86_400_000
HOUR_MS = 3_600_000


class SimClock:
    """Simulated time running ``speed`` times faster than the wall clock from ``start_ms``.

    The clock starts when ``start()`` is called (the first publish), so set-up time is not
    counted as simulated time.
    """

    def __init__(self, start_ms: int, speed: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if speed <= 0:
            raise ValueError(f"clock speed must be positive, got {speed}")
        self.start_ms = int(start_ms)
        self.speed = float(speed)
        self._monotonic = monotonic
        self._t0: float | None = None

    def start(self) -> None:
        if self._t0 is None:
            self._t0 = self._monotonic()

    def now_ms(self) -> int:
        """Current simulated time, epoch ms UTC."""
        if self._t0 is None:
            return self.start_ms
        return self.start_ms + int((self._monotonic() - self._t0) * self.speed * 1000)

    def seconds_until(self, sim_ms: int) -> float:
        """Real seconds to wait until the simulated clock reaches ``sim_ms`` (0 if past)."""
        return max(0.0, (sim_ms - self.now_ms()) / 1000.0 / self.speed)


def local_hour(t_ms: np.ndarray) -> np.ndarray:
    """Local (UTC+7) hour of day as a float in [0, 24)."""
    return ((t_ms + TZ_OFFSET_MS) % DAY_MS) / HOUR_MS


def local_day(t_ms: np.ndarray) -> np.ndarray:
    """Local calendar day as days since 1970-01-01."""
    return (t_ms + TZ_OFFSET_MS) // DAY_MS


def weekend(t_ms: np.ndarray) -> np.ndarray:
    """True on local Saturdays and Sundays (1970-01-01 was a Thursday)."""
    return ((local_day(t_ms) + 3) % 7) >= 5


# Days the city's tourism and evening crowds peak: Tet (lunar new year, with the days round
# it), Hung Kings' day, Reunification and Labour days, National day, Mid-autumn, the turn of
# the year, and the Southern folk-cake festival held at Ninh Kieu wharf.
_FESTIVALS = [
    "2025-01-01", "2025-01-28", "2025-01-29", "2025-01-30", "2025-01-31", "2025-04-07",
    "2025-04-30", "2025-05-01", "2025-05-22", "2025-05-23", "2025-09-02", "2025-10-06",
    "2025-12-24", "2025-12-31",
    "2026-01-01", "2026-02-16", "2026-02-17", "2026-02-18", "2026-02-19", "2026-04-26",
    "2026-04-30", "2026-05-01", "2026-05-14", "2026-05-15", "2026-09-02", "2026-09-25",
    "2026-12-24", "2026-12-31",
    "2027-01-01", "2027-02-05", "2027-02-06", "2027-02-07", "2027-02-08", "2027-04-16",
    "2027-04-30", "2027-05-01", "2027-09-02", "2027-09-15", "2027-12-31",
]
FESTIVAL_DAYS: np.ndarray = np.array(
    sorted((dt.date.fromisoformat(d) - dt.date(1970, 1, 1)).days for d in _FESTIVALS),
    dtype=np.int64)


def festival_day(t_ms: np.ndarray) -> np.ndarray:
    """True on the local days listed in ``FESTIVAL_DAYS``."""
    return np.isin(local_day(t_ms), FESTIVAL_DAYS)


def parse_start(text: str, now_ms: int | None = None) -> int:
    """``now``, ``now-2h``/``now+30m``, epoch ms, or ISO-8601 (naive means Can Tho local time)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    text = text.strip()
    if text.startswith("now"):
        rest = text[3:]
        if not rest:
            return now
        sign = -1 if rest[0] == "-" else 1
        if rest[0] not in "+-" or len(rest) < 3 or rest[-1] not in "smhd":
            raise ValueError(f"bad relative start {text!r}; use e.g. now-2h, now+30m")
        unit = {"s": 1000, "m": 60_000, "h": HOUR_MS, "d": DAY_MS}[rest[-1]]
        return now + sign * int(float(rest[1:-1]) * unit)
    if text.isdigit():
        return int(text)
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone(dt.timedelta(hours=7)))
    return int(when.timestamp() * 1000)
