"""VisitCount footfall counters, boat counters and hotels (JSON, epoch ms).

The payload's shape says what it counts: ``in``/``out`` footfall, ``boats``, or
``rooms``/``occupied`` for a hotel (which becomes an occupancy ratio).
"""

from __future__ import annotations

import msgspec

from ingest.adapters.base import Adapter, Reject, Row


class VisitCountRecord(msgspec.Struct):
    sensor: str
    ts: int
    interval_s: int | None = None
    in_: int | None = msgspec.field(name="in", default=None)
    out: int | None = None
    boats: int | None = None
    rooms: int | None = None
    occupied: int | None = None


def hotel_measurements(rooms: int, occupied: int) -> dict[str, float]:
    if rooms <= 0:
        raise Reject("out_of_range", f"hotel rooms must be positive, got {rooms}")
    return {"hotel_occupancy": occupied / rooms, "rooms_occupied": float(occupied)}


class VisitCount(Adapter):
    vendor = "visitcount"
    record = VisitCountRecord

    def sensor_of(self, r: VisitCountRecord) -> str:
        return r.sensor

    def rows(self, r: VisitCountRecord) -> list[Row]:
        if r.rooms is not None or r.occupied is not None:
            if r.rooms is None or r.occupied is None:
                raise Reject("missing_field", "hotel record needs both `rooms` and `occupied`")
            return [Row(r.sensor, r.ts, measurements=hotel_measurements(r.rooms, r.occupied))]
        if r.in_ is not None or r.out is not None:
            if r.in_ is None or r.out is None:
                raise Reject("missing_field", "footfall record needs both `in` and `out`")
            m = {"footfall_in": float(r.in_), "footfall_out": float(r.out)}
        elif r.boats is not None:
            m = {"boats": float(r.boats)}
        else:
            raise Reject("missing_field", "record has none of `in`/`out`, `boats`, `rooms`")
        if r.interval_s is None:
            raise Reject("missing_field", "Object missing required field `interval_s`")
        return [Row(r.sensor, r.ts, interval_s=r.interval_s, measurements=m)]
