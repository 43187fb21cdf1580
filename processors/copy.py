"""Binary COPY payloads built straight from numpy arrays: no per-row Python object.

PostgreSQL's binary COPY format is a header, then per row a 16-bit field count and, per
field, a 32-bit length and the value in network byte order, then a -1 trailer. Every
column of the narrow ``readings`` row has a fixed width, so a whole batch is one numpy
structured array (46 bytes a row) filled column by column and handed to
``asyncpg.Connection.copy_to_table(..., format="binary")``. asyncpg's own
``copy_records_to_table`` encodes tuple by tuple in Python-visible objects: for 10k
readings it first needs 10k tuples and 40k boxed values, which this avoids.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_TRAILER = (-1).to_bytes(2, "big", signed=True)
#: Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
PG_EPOCH_US = 946_684_800_000_000


def _row_dtype(fields: list[tuple[str, str]]) -> np.dtype:
    """A structured dtype: the field count, then a (length, value) pair per column."""
    spec: list[tuple[str, str]] = [("nfields", ">i2")]
    for name, kind in fields:
        spec += [(f"{name}_len", ">i4"), (name, kind)]
    return np.dtype(spec)


READINGS_FIELDS: list[tuple[str, str]] = [
    ("time", ">i8"), ("sensor", ">i4"), ("metric", ">i2"), ("value", ">f8"), ("quality", ">i2")]
_READINGS = _row_dtype(READINGS_FIELDS)
_STAGE = _row_dtype([*READINGS_FIELDS, ("ord", ">i4")])


def payload(dtype: np.dtype, columns: dict[str, npt.NDArray[np.generic]]) -> bytes:
    """The binary COPY payload of rows whose fixed-width columns are ``columns`` (in the
    dtype's field order; ``time`` in epoch ms, sent as PostgreSQL's microseconds since
    2000-01-01)."""
    n = next(iter(columns.values())).size
    rows = np.empty(n, dtype=dtype)
    rows["nfields"] = len(dtype.names) // 2  # type: ignore[arg-type]
    for name in dtype.names or ():
        if name.endswith("_len"):
            rows[name] = dtype[name[:-4]].itemsize
        elif name != "nfields":
            col = columns[name]
            rows[name] = col * 1000 - PG_EPOCH_US if name == "time" else col
    return b"".join((_HEADER, rows.tobytes(), _TRAILER))


def readings_payload(time_ms: npt.NDArray[np.int64], sensor: npt.NDArray[np.integer],
                     metric: npt.NDArray[np.integer], value: npt.NDArray[np.float64],
                     quality: npt.NDArray[np.integer], *, ordinal: bool = False) -> bytes:
    """The binary COPY payload of ``readings`` rows (``time, sensor, metric, value,
    quality``), plus an ``ord`` column (the row's position) when ``ordinal``."""
    cols = {"time": time_ms, "sensor": sensor, "metric": metric, "value": value,
            "quality": quality}
    if ordinal:
        cols["ord"] = np.arange(time_ms.size)
    return payload(_STAGE if ordinal else _READINGS, cols)
