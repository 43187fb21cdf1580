"""ProbeNet Wi-Fi/BLE probes, some footfall counters and hotels (JSON, ISO-8601 windows).

A reading covers a time window: event time is the window's end and ``interval_s`` its
length. Probe counts by country map to ``visitors_{cc}``; countries the contract does
not list add up in ``visitors_other``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from ingest.adapters.base import Adapter, Reject, Row, epoch_ms
from ingest.adapters.visitcount import hotel_measurements
from ingest.contract import NATIONALITIES

AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
_KNOWN = frozenset(NATIONALITIES) - {"other"}


class Window(msgspec.Struct):
    start: AwareDatetime
    end: AwareDatetime


class ProbeNetRecord(msgspec.Struct):
    probe: str
    window: Window
    unique_devices: int | None = None
    by_country: dict[str, int] | None = None
    entries: int | None = None
    exits: int | None = None
    rooms_total: int | None = None
    rooms_occupied: int | None = None


class ProbeNet(Adapter):
    vendor = "probenet"
    record = ProbeNetRecord

    def sensor_of(self, r: ProbeNetRecord) -> str:
        return r.probe

    def rows(self, r: ProbeNetRecord) -> list[Row]:
        end = epoch_ms(r.window.end)
        interval_ms = end - epoch_ms(r.window.start)
        if interval_ms < 0:
            raise Reject("out_of_range", "window ends before it starts")
        if r.unique_devices is not None:
            m = {"visitors_total": float(r.unique_devices)}
            if r.by_country is not None:
                per = dict.fromkeys(NATIONALITIES, 0.0)
                for cc, n in r.by_country.items():
                    key = cc.lower()
                    per[key if key in _KNOWN else "other"] += n
                m.update({f"visitors_{cc}": v for cc, v in per.items()})
        elif r.entries is not None or r.exits is not None:
            if r.entries is None or r.exits is None:
                raise Reject("missing_field", "footfall record needs both `entries` and `exits`")
            m = {"footfall_in": float(r.entries), "footfall_out": float(r.exits)}
        elif r.rooms_total is not None or r.rooms_occupied is not None:
            if r.rooms_total is None or r.rooms_occupied is None:
                raise Reject("missing_field",
                             "hotel record needs both `rooms_total` and `rooms_occupied`")
            m = hotel_measurements(r.rooms_total, r.rooms_occupied)
        else:
            raise Reject("missing_field", "record has none of `unique_devices`, "
                                          "`entries`/`exits`, `rooms_total`/`rooms_occupied`")
        return [Row(r.probe, end, interval_s=interval_ms // 1000, measurements=m)]
