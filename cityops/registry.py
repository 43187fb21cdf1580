"""The sensor registry: which devices the city has provisioned, where, from which vendor.

A fleet file (TOML) lists groups of sensors ("12 lane detectors from vendor
``saomai`` along 30/4 street"); expanding it is deterministic, so the simulators
that impersonate the sensors and the ingest service that validates them agree on
every sensor id without talking to each other. In production the same file is the
city's device inventory.

Fleet file format::

    [fleet]
    name = "can-tho-default"
    identities = "devices"       # how the devices log in to MQTT: "devices" (one account
                                 # per sensor and per gateway) or "bridges" (one per
                                 # district: a vendor cloud publishing for its devices;
                                 # load fleets, see cityops/devices.py)

    [[group]]
    domain = "traffic"           # traffic | security | tourism
    type = "lane_detector"       # a sensor type of that domain (see SENSOR_TYPES)
    vendor = "saomai"            # payload format the devices speak (see VENDORS)
    landmark = "street_30_4"     # where they are; the district comes from the landmark
    count = 12
    interval_s = 60              # expected reporting interval (offline detection)
    gateway_size = 0             # >0: devices sit behind gateways batching this many
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cityops.city import landmark

# Sensor types per domain, and the vendors (payload formats) each type may speak.
SENSOR_TYPES: dict[str, tuple[str, ...]] = {
    "traffic": ("lane_detector", "traffic_camera", "traffic_signal"),
    "security": ("cctv", "panic_button", "door_sensor"),
    "tourism": ("footfall_counter", "boat_counter", "wifi_probe", "hotel"),
}

VENDORS: dict[str, tuple[str, ...]] = {
    "lane_detector": ("saomai", "mekongflow", "compact"),
    "traffic_camera": ("saomai", "mekongflow", "compact"),
    "traffic_signal": ("saomai",),
    "cctv": ("guardeye", "safecity"),
    "panic_button": ("safecity",),
    "door_sensor": ("safecity", "guardeye"),
    "footfall_counter": ("visitcount", "probenet", "compact"),
    "boat_counter": ("visitcount",),
    "wifi_probe": ("probenet",),
    "hotel": ("probenet", "visitcount"),
}

TYPE_CODES: dict[str, str] = {
    "lane_detector": "ld", "traffic_camera": "tc", "traffic_signal": "ts", "cctv": "cv",
    "panic_button": "pb", "door_sensor": "ds", "footfall_counter": "ff", "boat_counter": "bc",
    "wifi_probe": "wp", "hotel": "ho",
}


IDENTITY_MODES = ("devices", "bridges")


class FleetError(ValueError):
    """The fleet file is invalid; the message names the group and field."""


@dataclass(frozen=True, slots=True)
class Sensor:
    """One provisioned device."""

    sensor_id: str
    domain: str
    type: str
    vendor: str
    district: str
    landmark: str
    lat: float
    lon: float
    interval_s: int
    gateway: str | None = None

    @property
    def topic_suffix(self) -> str:
        """``{district}/{domain}/{type}/{sensor_id}``: the part of the MQTT topic after the root."""
        return f"{self.district}/{self.domain}/{self.type}/{self.sensor_id}"


@dataclass(frozen=True, slots=True)
class SensorGroup:
    domain: str
    type: str
    vendor: str
    landmark: str
    count: int
    interval_s: int
    gateway_size: int = 0


@dataclass(frozen=True, slots=True)
class Fleet:
    """An expanded fleet: sensors in a stable order, indexable by id."""

    name: str
    groups: tuple[SensorGroup, ...]
    sensors: tuple[Sensor, ...]
    identities: str = "devices"  # "devices" | "bridges" (see the module doc)
    by_id: dict[str, Sensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", {s.sensor_id: s for s in self.sensors})

    def get(self, sensor_id: str) -> Sensor | None:
        return self.by_id.get(sensor_id)

    def __len__(self) -> int:
        return len(self.sensors)

    def __iter__(self) -> Iterator[Sensor]:
        return iter(self.sensors)

    def gateways(self) -> dict[str, list[Sensor]]:
        out: dict[str, list[Sensor]] = {}
        for s in self.sensors:
            if s.gateway:
                out.setdefault(s.gateway, []).append(s)
        return out


def load_fleet(path: Path) -> Fleet:
    """Read and expand a fleet file; errors name the group and field at fault."""
    try:
        with Path(path).open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise FleetError(f"fleet file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(f"fleet file {path}: {exc}") from None
    name = str(doc.get("fleet", {}).get("name", Path(path).stem))
    identities = str(doc.get("fleet", {}).get("identities", "devices"))
    if identities not in IDENTITY_MODES:
        raise FleetError(f"fleet file {path}: [fleet] identities must be one of "
                         f"{', '.join(IDENTITY_MODES)}, got {identities!r}")
    groups = tuple(_parse_group(i, g) for i, g in enumerate(doc.get("group", [])))
    if not groups:
        raise FleetError(f"fleet file {path} has no [[group]] entries")
    return expand(name, groups, identities)


def _parse_group(index: int, raw: dict[str, object]) -> SensorGroup:
    where = f"group #{index + 1}"
    for key in ("domain", "type", "vendor", "landmark", "count"):
        if key not in raw:
            raise FleetError(f"{where}: missing field {key!r}")
    domain, typ, vendor = str(raw["domain"]), str(raw["type"]), str(raw["vendor"])
    if domain not in SENSOR_TYPES:
        raise FleetError(f"{where}: field 'domain': unknown domain {domain!r}")
    if typ not in SENSOR_TYPES[domain]:
        raise FleetError(f"{where}: field 'type': {typ!r} is not a {domain} sensor type")
    if vendor not in VENDORS[typ]:
        raise FleetError(f"{where}: field 'vendor': {typ} devices do not speak {vendor!r}")
    try:
        landmark(str(raw["landmark"]))
    except KeyError as exc:
        raise FleetError(f"{where}: field 'landmark': {exc.args[0]}") from None
    numbers: dict[str, int] = {}
    for key, default in (("count", None), ("interval_s", 60), ("gateway_size", 0)):
        value = raw.get(key, default)
        if (not isinstance(value, int) or isinstance(value, bool) or value < 0
                or (key != "gateway_size" and value == 0)):
            raise FleetError(f"{where}: field {key!r} must be a positive integer, got {value!r}")
        numbers[key] = value
    return SensorGroup(domain, typ, vendor, str(raw["landmark"]), numbers["count"],
                       numbers["interval_s"], numbers["gateway_size"])


def expand(name: str, groups: tuple[SensorGroup, ...], identities: str = "devices") -> Fleet:
    """Give every sensor a stable id and a position along or around its landmark."""
    sensors: list[Sensor] = []
    seen: dict[tuple[str, str, str], int] = {}
    for group in groups:
        lm = landmark(group.landmark)
        key = (group.landmark, group.type, group.vendor)
        start = seen.get(key, 0)
        seen[key] = start + group.count
        for j in range(group.count):
            n = start + j
            lat, lon = _place(lm.lat, lm.lon, lm.lat2, lm.lon2, n, group.count + start)
            sid = f"{lm.code}-{TYPE_CODES[group.type]}-{group.vendor[:2]}{n + 1:03d}"
            gw = None
            if group.gateway_size:
                gw = f"gw-{lm.code}-{TYPE_CODES[group.type]}-{n // group.gateway_size + 1:02d}"
            sensors.append(Sensor(sid, group.domain, group.type, group.vendor, lm.district,
                                  lm.code, round(lat, 6), round(lon, 6), group.interval_s, gw))
    ids = [s.sensor_id for s in sensors]
    if len(set(ids)) != len(ids):
        raise FleetError("fleet expands to duplicate sensor ids")
    return Fleet(name, groups, tuple(sensors), identities)


def _place(lat: float, lon: float, lat2: float | None, lon2: float | None,
           n: int, total: int) -> tuple[float, float]:
    """Spread sensors along an arterial, or on a small golden-angle spiral round a point."""
    if lat2 is not None and lon2 is not None:
        f = (n + 0.5) / max(total, 1)
        return lat + (lat2 - lat) * f, lon + (lon2 - lon) * f
    r = 0.0009 * math.sqrt(n + 1)
    a = n * 2.399963
    return lat + r * math.sin(a), lon + r * math.cos(a)
