"""MekongFlow traffic cameras and detectors (JSON, ISO-8601 with offset, SI units).

Speed arrives in m/s (× 3.6 → km/h), occupancy already as a ratio, the count period as
an ISO-8601 duration (``PT1M``); ``mc`` are motorbikes and ``hgv`` trucks.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from ingest.adapters.base import Adapter, Row, epoch_ms
from ingest.adapters.isotime import duration_s

AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class Flow(msgspec.Struct):
    mc: int
    car: int
    hgv: int
    bus: int


class MekongRecord(msgspec.Struct):
    deviceId: str
    time: AwareDatetime
    period: str
    flow: Flow
    avgSpeedMs: float | None = None
    occ: float | None = None


class MekongFlow(Adapter):
    vendor = "mekongflow"
    record = MekongRecord

    def sensor_of(self, r: MekongRecord) -> str:
        return r.deviceId

    def rows(self, r: MekongRecord) -> list[Row]:
        f = r.flow
        m = {"count_motorbike": float(f.mc), "count_car": float(f.car),
             "count_truck": float(f.hgv), "count_bus": float(f.bus),
             "flow": float(f.mc + f.car + f.hgv + f.bus)}
        if r.avgSpeedMs is not None:
            m["speed_kmh"] = r.avgSpeedMs * 3.6
        if r.occ is not None:
            m["occupancy"] = r.occ
        return [Row(r.deviceId, epoch_ms(r.time), interval_s=duration_s(r.period, "period"),
                    measurements=m)]
