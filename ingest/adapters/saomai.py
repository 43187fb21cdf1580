"""Saomai lane detectors, traffic cameras and signal controllers (JSON, epoch ms, km/h, %).

Counts are per ``interval_s``; occupancy arrives in percent and leaves as a ratio; a
signal controller reports its phase, and a report with ``fault: true`` becomes a
``signal_fault`` incident (carrying the phase too) instead of a plain reading.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from ingest.adapters.base import Adapter, Reject, Row

PHASES: tuple[str, ...] = ("off", "green", "amber", "red", "flashing")


class Counts(msgspec.Struct):
    motorbike: int
    car: int
    truck: int
    bus: int


class SaomaiRecord(msgspec.Struct):
    sensor: str
    ts: int
    interval_s: int | None = None
    counts: Counts | None = None
    speed_kmh: float | None = None
    occupancy_pct: float | None = None
    phase: Literal["off", "green", "amber", "red", "flashing"] | None = None
    fault: bool | None = None


class Saomai(Adapter):
    vendor = "saomai"
    record = SaomaiRecord

    def sensor_of(self, r: SaomaiRecord) -> str:
        return r.sensor

    def rows(self, r: SaomaiRecord) -> list[Row]:
        if r.phase is not None:
            fault = bool(r.fault)
            m = {"signal_state": float(PHASES.index(r.phase)), "signal_fault": float(fault)}
            if fault:
                return [Row(r.sensor, r.ts, "incident", "signal_fault", measurements=m)]
            return [Row(r.sensor, r.ts, measurements=m)]
        c = r.counts
        if c is None:
            raise Reject("missing_field", "Object missing required field `counts` (or `phase`)")
        if r.interval_s is None:
            raise Reject("missing_field", "Object missing required field `interval_s`")
        m = {"count_motorbike": float(c.motorbike), "count_car": float(c.car),
             "count_truck": float(c.truck), "count_bus": float(c.bus),
             "flow": float(c.motorbike + c.car + c.truck + c.bus)}
        if r.speed_kmh is not None:
            m["speed_kmh"] = r.speed_kmh
        if r.occupancy_pct is not None:
            m["occupancy"] = r.occupancy_pct / 100.0
        return [Row(r.sensor, r.ts, interval_s=r.interval_s, measurements=m)]
