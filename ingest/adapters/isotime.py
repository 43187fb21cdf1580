"""ISO-8601 durations as vendors send them (``PT1M``, ``PT30S``, ``PT1H30M``, ``P1D``)."""

from __future__ import annotations

import re
from functools import lru_cache

from ingest.adapters.base import Reject

_DURATION = re.compile(
    r"P(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?")


@lru_cache(maxsize=256)
def _parse(text: str) -> int | None:
    m = _DURATION.fullmatch(text)
    if m is None or text in ("P", "PT") or text.endswith("T"):
        return None
    d, h, mi, s = (m.group(k) for k in "dhms")
    return int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi or 0) * 60 + round(float(s or 0))


def duration_s(text: str, field: str) -> int:
    """Seconds of an ISO-8601 duration; ``Reject(wrong_type)`` naming ``field`` if invalid."""
    seconds = _parse(text)
    if seconds is None:
        raise Reject("wrong_type", f"`{field}` is not an ISO-8601 duration: {text[:40]!r}")
    return seconds
