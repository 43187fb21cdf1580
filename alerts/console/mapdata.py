"""The sensors layer of the console's map: every sensor of the fleet as GeoJSON, with a state.

A sensor's ``state`` is what the map colours it by: the severity of its worst active alert
(critical > major > minor > warning > info), ``offline`` when that worst alert is the
``sensor_offline`` rule's (we hear nothing from it, so its values say nothing either; a
worse alert still shows, e.g. a door forced just before the sensor went quiet), else ``ok``.

Why a cache: a fleet can hold 10k+ sensors, and every open console and wall asks. The
positions are fixed for the process's life (the fleet file), so their JSON is built once;
the states come from one small query over active alerts (there are few) and the whole
answer is kept for ``ttl_s`` seconds, built by one request while concurrent ones wait.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import BaseModel, Field

from cityops.registry import Fleet

SEVERITIES: tuple[str, ...] = ("critical", "major", "minor", "warning", "info")
OFFLINE_RULE = "sensor_offline"
SensorState = Literal["ok", "offline", "critical", "major", "minor", "warning", "info"]

# The worst active alert per sensor: lowest rank wins; at equal severity an offline alert
# wins (it explains the others). Served by the partial index alerts_one_active.
STATES = """
select distinct on (sensor_id) sensor_id, severity, rule_id = $1 as offline
  from alerts
 where state = 'active' and sensor_id is not null
 order by sensor_id, array_position($2::text[], severity), (rule_id = $1) desc
"""
REGISTRY = "select sensor_id, domain, type, district, landmark, lat, lon from sensors"


class SensorProps(BaseModel):
    sensor_id: str
    domain: str
    type: str
    district: str
    landmark: str
    state: SensorState = Field(description="worst active alert's severity, offline, or ok")


class PointGeometry(BaseModel):
    type: Literal["Point"] = "Point"
    coordinates: Annotated[list[float], Field(min_length=2, max_length=2,
                                              description="[lon, lat], WGS84")]


class SensorFeature(BaseModel):
    type: Literal["Feature"] = "Feature"
    geometry: PointGeometry
    properties: SensorProps


class SensorCollection(BaseModel):
    """The fleet as a GeoJSON FeatureCollection (RFC 7946)."""

    type: Literal["FeatureCollection"] = "FeatureCollection"
    generated_at: int = Field(description="epoch ms the states were read")
    features: list[SensorFeature]


def state_of(severity: str | None, offline: bool) -> str:
    """The map state from a sensor's worst active alert (None: no alert)."""
    if severity is None:
        return "ok"
    return "offline" if offline else severity


class SensorMap:
    """Builds and caches the sensors FeatureCollection (one per console)."""

    def __init__(self, fleet: Fleet | None, ttl_s: float = 5.0) -> None:
        self.fleet = fleet
        self.ttl_s = ttl_s
        self._sensors: list[tuple[str, str]] | None = None  # (sensor_id, JSON up to "state")
        self._body: bytes = b""
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def _positions(self, pool: asyncpg.Pool) -> list[tuple[str, str]]:
        """Each sensor's feature as JSON text up to its state (fixed: built once). Without
        a fleet file, the ``sensors`` registry table."""
        if self._sensors is None:
            if self.fleet is not None:
                rows: list[Any] = [(s.sensor_id, s.domain, s.type, s.district, s.landmark,
                                    s.lat, s.lon) for s in self.fleet]
            else:
                try:
                    rows = [tuple(r) for r in await pool.fetch(REGISTRY)]
                except asyncpg.UndefinedTableError:
                    rows = []
            self._sensors = [
                (sid, '{"type":"Feature","geometry":{"type":"Point","coordinates":['
                 f'{lon},{lat}]}},"properties":{{"sensor_id":{json.dumps(sid)},'
                 f'"domain":{json.dumps(dom)},"type":{json.dumps(typ)},'
                 f'"district":{json.dumps(dist)},"landmark":{json.dumps(lm)},"state":')
                for sid, dom, typ, dist, lm, lat, lon in rows]
        return self._sensors

    async def states(self, pool: asyncpg.Pool) -> dict[str, str]:
        """sensor_id -> state, for sensors with an active alert."""
        rows = await pool.fetch(STATES, OFFLINE_RULE, list(SEVERITIES))
        return {r["sensor_id"]: state_of(r["severity"], r["offline"]) for r in rows}

    async def geojson(self, pool: asyncpg.Pool) -> bytes:
        """The FeatureCollection as JSON bytes, at most ``ttl_s`` old."""
        if time.monotonic() - self._at < self.ttl_s and self._body:
            return self._body
        async with self._lock:
            if time.monotonic() - self._at < self.ttl_s and self._body:
                return self._body  # another request built it while this one waited
            positions = await self._positions(pool)
            states = await self.states(pool)
            now_ms = int(time.time() * 1000)
            feats = ",".join(f'{head}"{states.get(sid, "ok")}"}}}}'
                             for sid, head in positions)
            self._body = (f'{{"type":"FeatureCollection","generated_at":{now_ms},'
                          f'"features":[{feats}]}}').encode()
            self._at = time.monotonic()
            return self._body
