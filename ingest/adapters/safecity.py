"""SafeCity panic buttons, door sensors and some CCTV (JSON, ISO-8601 UTC ``Z``).

``HEARTBEAT`` is a reading (its ``data`` may hold door state, people, density); every
other type is an incident, lower-cased (``CROWD`` becomes ``crowd_density``). The
vendor's ``severity`` is not a measurement: operators' rules decide what matters.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from ingest.adapters.base import Adapter, Row, epoch_ms

SafeCityType = Literal["HEARTBEAT", "PANIC", "DOOR_OPEN", "DOOR_CLOSED", "DOOR_FORCED",
                       "INTRUSION", "LOITERING", "ABANDONED_OBJECT", "FIGHT", "CROWD"]
_INCIDENT = {"CROWD": "crowd_density"}


class SafeCityData(msgspec.Struct):
    door_open: bool | None = None
    people: int | None = None
    density: float | None = None


class SafeCityRecord(msgspec.Struct):
    device_id: str
    occurred_at: Annotated[datetime, msgspec.Meta(tz=True)]
    type: SafeCityType
    severity: int | None = None
    data: SafeCityData | None = None


class SafeCity(Adapter):
    vendor = "safecity"
    record = SafeCityRecord

    def sensor_of(self, r: SafeCityRecord) -> str:
        return r.device_id

    def rows(self, r: SafeCityRecord) -> list[Row]:
        m: dict[str, float] = {}
        d = r.data
        if d is not None:
            if d.door_open is not None:
                m["door_open"] = float(d.door_open)
            if d.people is not None:
                m["people_count"] = float(d.people)
            if d.density is not None:
                m["crowd_density"] = d.density
        t = epoch_ms(r.occurred_at)
        if r.type == "HEARTBEAT":
            return [Row(r.device_id, t, measurements=m)]
        incident = _INCIDENT.get(r.type, r.type.lower())
        return [Row(r.device_id, t, "incident", incident, measurements=m)]
