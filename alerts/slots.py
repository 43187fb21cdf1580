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
from collections.abc import Callable
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
        self.full_parts: set[int] = set()  # partitions whose next write must be a base
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
        got = self.take_parts(None)
        return None if not got else (got[0][1], got[0][2])

    def take_parts(self, parts: np.ndarray | None, owned: set[int] | None = None
                   ) -> list[tuple[int, bytes, bool]]:
        """What changed since the last call, one (partition, blob, is_full) per partition.

        ``parts``: the events partition of each code (``Ownership.parts_of``); None: one
        blob for every row, as partition -1 (a single worker that owns everything). Only
        ``owned`` partitions are written: rows of other partitions belong to another
        worker's checkpoint, and writing them would clobber it."""
        self.ensure()
        n = len(self.index.ids)
        if parts is None:
            parts = np.full(n, -1, np.int32)
            owned = {-1}
        assert owned is not None
        if not owned:  # nothing is ours yet (before the first assignment): keep it all
            return []
        every = self.full or self.deltas >= FULL_EVERY
        dirty = self.dirty[:n]
        out: list[tuple[int, bytes, bool]] = []
        for p in sorted(owned):
            in_p = parts[:n] == p
            full = every or p in self.full_parts
            if not full and not (dirty & in_p).any():
                continue
            codes = np.flatnonzero(in_p if full else dirty & in_p)
            out.append((p, self.to_bytes(codes), full))
        self.dirty[:] = False
        self.changed = False
        self.full = False
        self.full_parts.clear()
        self.deltas = 0 if every else self.deltas + 1
        return out

    def drop(self, codes: np.ndarray) -> None:
        """Forget these rows (their partition moved to another worker): back to zeros,
        which every array set reads as "no state"."""
        if codes.size == 0:
            return
        self.ensure()
        for a in self.arr.values():
            a[codes] = 0
        self.dirty[codes] = False

    def to_bytes(self, codes: np.ndarray) -> bytes:
        """The given rows as one .npz: their sensor ids and each array, no pickling."""
        ids = self.index.ids
        buf = io.BytesIO()
        keys = np.array([ids[c].encode() for c in codes.tolist()], dtype=bytes)
        np.savez(buf, __keys__=keys, **{name: a[codes] for name, a in self.arr.items()})
        return buf.getvalue()

    def load_bytes(self, data: bytes,
                   keep: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Apply a base or a delta (rows by sensor id; ids new to this process are added);
        returns the codes applied. ``keep``: gives a mask over the codes: which rows to apply
        (a pre-partitioning blob holds every worker's sensors)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            keys = z["__keys__"]
            codes = np.array([self.index.code(k.decode() if isinstance(k, bytes) else str(k))
                              for k in keys.tolist()], np.int64)
            self.ensure()
            sel = np.ones(codes.size, bool) if keep is None else keep(codes)
            for name, _ in self.FIELDS:
                if name in z.files:
                    self.arr[name][codes[sel]] = z[name][sel]
        self.full = False
        return codes[sel]  # type: ignore[no-any-return]
