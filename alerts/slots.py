"""Per-sensor numeric rule state in numpy arrays, checkpointed as deltas.

Why deltas: the array evaluators (anomaly, absence, the rules' windows) hold a row per
sensor, 31.5k sensors with the x4 load fleet. Writing all of them as one ``.npz`` with
every sensor id as ``<U25`` each second was ~3 MB per rule per checkpoint (~13 MB/s of
bytea), although a few seconds of traffic touch only the sensors that reported in them.
So each array set remembers which rows changed (``dirty``) and a checkpoint writes only
those rows (ids as bytes, not UCS-4); every ``FULL_EVERY`` deltas, after a failed
checkpoint, and for a new rule, it writes all rows instead, and the store drops the
deltas that base replaces. Restoring is the base, then the deltas in order.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from alerts.batch import SensorIndex

FULL_EVERY = 60  # deltas between two full writes (at 5 s checkpoints: every 5 minutes)


class SlotArrays:
    """Parallel numpy arrays indexed by ``SensorIndex`` code, plus a dirty-row mask."""

    FIELDS: tuple[tuple[str, Any], ...] = ()

    def __init__(self, index: SensorIndex) -> None:
        self.index = index
        self.arr: dict[str, np.ndarray] = {n: np.zeros(64, dt) for n, dt in self.FIELDS}
        self.dirty = np.zeros(64, bool)
        self.changed = False
        self.full = True  # nothing written yet: the first checkpoint is a base
        self.deltas = 0

    def ensure(self) -> None:
        """Grow the arrays to cover every code the index has handed out."""
        need = len(self.index.ids)
        size = self.dirty.size
        if need > size:
            new = max(need, 2 * size)
            for n, a in self.arr.items():
                grown = np.zeros(new, a.dtype)
                grown[:size] = a
                self.arr[n] = grown
            dirty = np.zeros(new, bool)
            dirty[:size] = self.dirty
            self.dirty = dirty

    def touch(self, codes: np.ndarray | int) -> None:
        """Rows that changed: they go into the next checkpoint."""
        self.dirty[codes] = True
        self.changed = True

    def slot(self, key: str) -> int:
        c = self.index.code(key)
        self.ensure()
        return c

    def get(self, slot: int) -> dict[str, Any]:
        return {n: self.arr[n][slot].item() for n, _ in self.FIELDS}

    def put(self, slot: int, state: dict[str, Any]) -> None:
        for n, _ in self.FIELDS:
            self.arr[n][slot] = state.get(n, 0)
        self.touch(slot)

    def take(self) -> tuple[bytes, bool] | None:
        """What changed since the last call, as (blob, is_full); None when nothing did."""
        if not self.changed and not self.full:
            return None
        self.ensure()
        n = len(self.index.ids)
        full = self.full or self.deltas >= FULL_EVERY
        codes = np.arange(n) if full else np.flatnonzero(self.dirty[:n])
        self.dirty[:] = False
        self.changed = False
        self.full = False
        self.deltas = 0 if full else self.deltas + 1
        return self.to_bytes(codes), full

    def to_bytes(self, codes: np.ndarray) -> bytes:
        """The given rows as one .npz: their sensor ids and each array, no pickling."""
        ids = self.index.ids
        buf = io.BytesIO()
        keys = np.array([ids[c].encode() for c in codes.tolist()], dtype=bytes)
        np.savez(buf, __keys__=keys, **{name: a[codes] for name, a in self.arr.items()})
        return buf.getvalue()

    def load_bytes(self, data: bytes) -> None:
        """Apply a base or a delta (rows by sensor id; ids new to this process are added)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            keys = z["__keys__"]
            codes = np.array([self.index.code(k.decode() if isinstance(k, bytes) else str(k))
                              for k in keys.tolist()], np.int64)
            self.ensure()
            for name, _ in self.FIELDS:
                if name in z.files:
                    self.arr[name][codes] = z[name]
        self.full = False
