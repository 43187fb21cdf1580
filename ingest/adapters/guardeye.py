"""GuardEye CCTV video analytics and door sensors (JSON, epoch ms).

``kind: "stats"`` is a periodic crowd reading; ``kind: "event"`` an analytics incident
(intrusion, loitering, door_forced...; door sensors use the same shape), with the
analytics' confidence, people count and density as measurements.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from ingest.adapters.base import Adapter, Reject, Row

GuardEyeEvent = Literal["intrusion", "crowd_density", "loitering", "abandoned_object", "fight",
                        "door_forced", "door_open", "door_closed"]


class GuardEyeRecord(msgspec.Struct):
    camera: str
    ts: int
    kind: Literal["stats", "event"]
    event: GuardEyeEvent | None = None
    confidence: float | None = None
    people: int | None = None
    density: float | None = None


class GuardEye(Adapter):
    vendor = "guardeye"
    record = GuardEyeRecord

    def sensor_of(self, r: GuardEyeRecord) -> str:
        return r.camera

    def rows(self, r: GuardEyeRecord) -> list[Row]:
        m: dict[str, float] = {}
        if r.people is not None:
            m["people_count"] = float(r.people)
        if r.density is not None:
            m["crowd_density"] = r.density
        if r.kind == "stats":
            if not m:
                raise Reject("missing_field", "stats record without `people` or `density`")
            return [Row(r.camera, r.ts, measurements=m)]
        if r.event is None:
            raise Reject("missing_field", "Object missing required field `event`")
        if r.confidence is not None:
            m["confidence"] = r.confidence
        return [Row(r.camera, r.ts, "incident", r.event, measurements=m)]
