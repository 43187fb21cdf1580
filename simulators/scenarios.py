"""Scenarios a run can switch on: city situations and device faults.

Pass them as ``--scenario NAME`` (repeatable), with optional parameters
``--scenario NAME:key=value,key=value``. Durations take ``s``/``m``/``h`` suffixes; ``after``
is counted from the simulated start of the run. Every reading a scenario shaped carries
the scenario's name in its ground-truth ``tags``.

City situations change what sensors measure; device faults change how (or whether)
readings reach the broker. Scenarios draw from their own random stream, so switching one
on leaves the baseline behaviour of the rest of the city as it was.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cityops.city import DISTRICTS_BY_CODE, LANDMARKS_BY_CODE, landmark
from simulators.behaviour import KINDS, FleetArrays, Incident, Window
from simulators.clock import DAY_MS, HOUR_MS, TZ_OFFSET_MS

NEVER = np.iinfo(np.int64).max


class ScenarioError(ValueError):
    """A scenario name or parameter is wrong; the message says which and what is allowed."""


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``10m``, ``2h`` -> milliseconds."""
    text = str(text).strip()
    units = {"s": 1000, "m": 60_000, "h": HOUR_MS, "d": DAY_MS}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text) * 1000)
    except ValueError:
        raise ScenarioError(f"bad duration {text!r}; use e.g. 30s, 10m, 2h") from None


@dataclass
class Faults:
    """Per-sensor device faults and per-message delivery faults the engine applies."""

    offline_from: np.ndarray  # ms; readings at or after it are never sent
    stuck_from: np.ndarray  # ms; from then on the device repeats its last values
    skew_ms: np.ndarray  # the device clock's offset, added to the time it writes
    disorder_share: float = 0.0
    disorder_max_ms: int = 600_000
    duplicate_share: float = 0.0

    @classmethod
    def none(cls, n: int) -> Faults:
        return cls(np.full(n, NEVER, dtype=np.int64), np.full(n, NEVER, dtype=np.int64),
                   np.zeros(n, dtype=np.int64))


@dataclass
class Setup:
    """What a scenario may look at and change when a run is prepared."""

    fa: FleetArrays
    start_ms: int
    seed: int
    faults: Faults


class Scenario:
    """Base class: ``prepare`` once per run, ``apply`` to every window."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, str]] = {}
    tag: int = 0  # this scenario's bit in ``Window.tags``

    def __init__(self, **params: str) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            allowed = ", ".join(self.defaults) or "none"
            raise ScenarioError(f"scenario {self.name!r}: unknown parameter(s) "
                                f"{', '.join(sorted(unknown))}; allowed: {allowed}")
        self.params = {**self.defaults, **params}
        self.tag = 1 << SCENARIO_NAMES.index(self.name)

    def p_float(self, key: str) -> float:
        try:
            return float(self.params[key])
        except ValueError:
            raise ScenarioError(f"scenario {self.name!r}: {key}={self.params[key]!r} is not "
                                "a number") from None

    def p_ms(self, key: str) -> int:
        return parse_duration(self.params[key])

    def p_landmark(self, key: str = "target") -> str:
        code = self.params[key]
        try:
            landmark(code)
        except KeyError as exc:
            raise ScenarioError(f"scenario {self.name!r}: {exc.args[0]}") from None
        return code

    def rng(self, setup: Setup) -> np.random.Generator:
        return np.random.default_rng([setup.seed, zlib.crc32(self.name.encode())])

    def sensors_at(self, setup: Setup, code: str, kind: str) -> np.ndarray:
        fa = setup.fa
        if code not in fa.landmarks:
            return np.array([], dtype=np.int64)
        return np.flatnonzero((fa.landmark == fa.landmarks.index(code))
                              & (fa.kind == KINDS.index(kind)))

    def prepare(self, setup: Setup) -> None:
        pass

    def apply(self, w: Window, fa: FleetArrays) -> None:
        pass


def _ramp(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0)


class Gridlock(Scenario):
    """Rush-hour gridlock on an arterial: in the morning (7-9 h) and evening (16:30-19 h)
    rush, traffic on ``target`` locks up: mean speed falls to a walking pace, detector
    occupancy rises above 70 %, and the counts fall because little moves. Outside the rush
    hours the arterial behaves normally (start the run in a rush hour to see it).
    Parameters: target (an arterial landmark, default street_30_4)."""

    name = "gridlock"
    defaults: ClassVar[dict[str, str]] = {"target": "street_30_4"}

    def prepare(self, setup: Setup) -> None:
        self.lm = setup.fa.landmarks.index(self.p_landmark()) \
            if self.p_landmark() in setup.fa.landmarks else -1
        if self.lm < 0 or not len(self.sensors_at(setup, self.p_landmark(), "traffic")):
            raise ScenarioError(f"scenario 'gridlock': no traffic sensors at "
                                f"{self.params['target']!r} in this fleet")

    def apply(self, w: Window, fa: FleetArrays) -> None:
        m = (fa.landmark[w.sensor] == self.lm) & (fa.kind[w.sensor] == KINDS.index("traffic"))
        if not m.any():
            return
        h = w.hour[m]
        sev = np.maximum(_ramp(np.minimum(h - 6.5, 9.25 - h) / 0.25),
                         _ramp(np.minimum(h - 16.25, 19.25 - h) / 0.25))
        w.speed_factor[m] *= 1 - 0.8 * sev
        w.occ_add[m] += 0.55 * sev
        w.demand[m] *= 1 - 0.45 * sev
        w.tags[np.flatnonzero(m)[sev > 0]] |= self.tag


class Accident(Scenario):
    """Accident with spreading congestion: ``after`` the start, a crash blocks ``target``
    at its middle detector. The queue grows upstream one detector every ``every``, with
    severity fading by ``fade`` per detector of distance; downstream traffic thins. After
    ``duration`` the road is cleared and traffic recovers over 15 minutes. (A street with
    detectors every few metres, as the load fleet's, fills faster: ``every=10s``.)
    Parameters: target (default nguyen_van_cu), after (5m), duration (40m), every (2m),
    fade (0.12)."""

    name = "accident"
    defaults: ClassVar[dict[str, str]] = {"target": "nguyen_van_cu", "after": "5m",
                                          "duration": "40m", "every": "2m", "fade": "0.12"}

    def prepare(self, setup: Setup) -> None:
        sensors = self.sensors_at(setup, self.p_landmark(), "traffic")
        if not len(sensors):
            raise ScenarioError(f"scenario 'accident': no traffic sensors at "
                                f"{self.params['target']!r} in this fleet")
        self.sensors = sensors
        self.t_crash = setup.start_ms + self.p_ms("after")
        self.t_clear = self.t_crash + self.p_ms("duration")
        self.every_ms = self.p_ms("every")
        self.fade = self.p_float("fade")
        if self.every_ms <= 0 or not 0 <= self.fade <= 1:
            raise ScenarioError("scenario 'accident': every must be positive, fade in [0, 1]")

    def apply(self, w: Window, fa: FleetArrays) -> None:
        if w.t1 <= self.t_crash or w.t0 > self.t_clear + 900_000:
            return
        m = np.isin(w.sensor, self.sensors)
        if not m.any():
            return
        s, t = w.sensor[m], w.t[m]
        mid = fa.group_size[s] // 2
        # detectors upstream of the crash (negative: downstream)
        d = (mid - fa.rank[s]).astype(np.int64)
        reached = t >= self.t_crash + np.maximum(d, 0) * self.every_ms
        recover = _ramp(1 - (t - self.t_clear) / 900_000)
        sev = np.where(d >= 0, np.maximum(0.3, 1 - self.fade * d), 0.0) * reached * recover
        down = np.where(d < 0, 0.5, 0.0) * (t >= self.t_crash) * recover
        idx = np.flatnonzero(m)
        w.speed_factor[idx] *= 1 - 0.85 * sev
        w.occ_add[idx] += 0.5 * sev
        w.demand[idx] *= (1 - 0.5 * sev) * (1 - down)
        w.tags[idx[(sev > 0) | (down > 0)]] |= self.tag


def _distance_m(a: str, b: str) -> float:
    la, lb = LANDMARKS_BY_CODE[a], LANDMARKS_BY_CODE[b]
    dy = (la.lat - lb.lat) * 111_320
    dx = (la.lon - lb.lon) * 111_320 * math.cos(math.radians(la.lat))
    return math.hypot(dx, dy)


class Festival(Scenario):
    """Festival crowd surge at Ninh Kieu wharf: from ``after``, crowds at every landmark
    within ``radius_m`` of ``target`` build up over 20 minutes to five times their usual
    size: CCTV people counts and densities, footfall and Wi-Fi probe counts rise (with more
    foreign visitors), packed camera views raise ``crowd_density`` incidents, and riverside
    hotels fill. Lasts ``duration``.
    Parameters: target (ninh_kieu_wharf), radius_m (400), after (0), duration (6h)."""

    name = "festival"
    defaults: ClassVar[dict[str, str]] = {"target": "ninh_kieu_wharf", "radius_m": "400",
                                          "after": "0", "duration": "6h"}

    def prepare(self, setup: Setup) -> None:
        target = self.p_landmark()
        radius = self.p_float("radius_m")
        near = [i for i, lm in enumerate(setup.fa.landmarks)
                if _distance_m(target, lm) <= radius]
        self.landmarks = np.array(near, dtype=np.int32)
        self.t_start = setup.start_ms + self.p_ms("after")
        self.t_end = self.t_start + self.p_ms("duration")

    def apply(self, w: Window, fa: FleetArrays) -> None:
        if w.t1 <= self.t_start or w.t0 >= self.t_end + 1_200_000:
            return
        m = np.isin(fa.landmark[w.sensor], self.landmarks)
        if not m.any():
            return
        t = w.t[m]
        sev = _ramp((t - self.t_start) / 1_200_000) * _ramp((self.t_end + 1_200_000 - t)
                                                            / 1_200_000)
        idx = np.flatnonzero(m)
        w.crowd[idx] *= 1 + 4 * sev
        w.foreign[idx] *= 1 + 0.6 * sev
        w.hotel_add[idx] += 0.25 * sev
        w.tags[idx[sev > 0]] |= self.tag


def _first_night(t_ms: int) -> int:
    """The first moment at or after ``t_ms`` when it is night in Can Tho (22:00-04:30)."""
    for step in range(0, 2 * 24 * 60):
        t = t_ms + step * 60_000
        h = ((t + TZ_OFFSET_MS) % DAY_MS) / HOUR_MS
        if h >= 22 or h < 4.5:
            return t
    raise AssertionError("unreachable: every day has a night")


class Intrusion(Scenario):
    """Night intrusion at a public building: at the first night moment (22:00-04:30 local)
    after ``after``, a door of ``target`` is forced and stays open, a camera reports someone
    loitering just before, and the cameras report ``intrusion`` every two minutes for
    ``duration`` as the intruders move through the building.
    Parameters: target (a public building, default city_hall), after (0), duration (20m)."""

    name = "intrusion"
    defaults: ClassVar[dict[str, str]] = {"target": "city_hall", "after": "0",
                                          "duration": "20m"}

    def prepare(self, setup: Setup) -> None:
        target = self.p_landmark()
        cams = self.sensors_at(setup, target, "crowd")
        doors = self.sensors_at(setup, target, "door")
        if not len(cams) and not len(doors):
            raise ScenarioError(f"scenario 'intrusion': no cameras or door sensors at "
                                f"{target!r} in this fleet")
        rng = self.rng(setup)
        t0 = _first_night(setup.start_ms + self.p_ms("after")) + 60_000
        dur = self.p_ms("duration")
        self.t_start, self.t_end = t0, t0 + dur
        self.door = int(doors[0]) if len(doors) else -1
        ev: list[Incident] = []
        if len(cams):
            ev.append(Incident(int(cams[0]), t0 - 180_000, "loitering", 0.71, 2, 0.01,
                               tags=self.tag))
        if self.door >= 0:
            ev.append(Incident(self.door, t0, "door_forced", 1.0, 0, 0.0, True, tags=self.tag))
        for j, t in enumerate(range(t0 + 40_000, t0 + dur, 120_000)):
            if len(cams):
                ev.append(Incident(int(cams[j % len(cams)]), t, "intrusion",
                                   round(0.85 + 0.12 * float(rng.random()), 2),
                                   int(rng.integers(1, 4)), 0.02, tags=self.tag))
        self.events = ev

    def apply(self, w: Window, fa: FleetArrays) -> None:
        w.incidents.extend(e for e in self.events if w.t0 <= e.t < w.t1)
        if self.door >= 0:
            m = (w.sensor == self.door) & (w.t >= self.t_start) & (w.t < self.t_end)
            w.force_open[m] = True
            w.tags[m] |= self.tag


class _DeviceFault(Scenario):
    """Shared parts of faults that pick a share of the fleet's devices."""

    defaults: ClassVar[dict[str, str]] = {"share": "0.05", "target": "", "district": ""}

    def pick(self, setup: Setup, kinds: tuple[str, ...] | None = None) -> np.ndarray:
        fa = setup.fa
        ok = np.ones(len(fa), dtype=bool)
        if self.params["target"]:
            code = self.p_landmark()
            ok &= fa.landmark == (fa.landmarks.index(code) if code in fa.landmarks else -1)
        if self.params["district"]:  # a whole district's devices (a power or network cut)
            code = self.params["district"]
            if code not in DISTRICTS_BY_CODE:
                raise ScenarioError(f"scenario {self.name!r}: unknown district {code!r}")
            ok &= np.array([s.district == code for s in fa.fleet.sensors], dtype=bool)
        if kinds is not None:
            ok &= np.isin(fa.kind, [KINDS.index(k) for k in kinds])
        pool = np.flatnonzero(ok)
        if not len(pool):
            raise ScenarioError(f"scenario {self.name!r}: no matching sensors in this fleet")
        share = self.p_float("share")
        if not 0 < share <= 1:
            raise ScenarioError(f"scenario {self.name!r}: share must be in (0, 1]")
        n = max(1, round(share * len(pool)))
        chosen = np.sort(self.rng(setup).choice(pool, size=n, replace=False))
        self.sensors = chosen
        return chosen


class Offline(_DeviceFault):
    """Sensors go offline: ``after`` the start, a ``share`` of the devices (optionally only
    at landmark ``target`` or in ``district``) stop sending anything at all.
    Parameters: share (0.05), after (10m), target (any), district (any)."""

    name = "offline"
    defaults: ClassVar[dict[str, str]] = {**_DeviceFault.defaults, "after": "10m"}

    def prepare(self, setup: Setup) -> None:
        setup.faults.offline_from[self.pick(setup)] = setup.start_ms + self.p_ms("after")


class Stuck(_DeviceFault):
    """Stuck values: ``after`` the start, a ``share`` of the measuring devices (traffic
    detectors, cameras, counters, probes, hotels) keep sending the values of their last
    good reading, unchanged, with fresh timestamps.
    Parameters: share (0.05), after (10m), target (any)."""

    name = "stuck"
    defaults: ClassVar[dict[str, str]] = {**_DeviceFault.defaults, "after": "10m"}

    def prepare(self, setup: Setup) -> None:
        kinds = ("traffic", "crowd", "footfall", "boats", "probe", "hotel")
        setup.faults.stuck_from[self.pick(setup, kinds)] = setup.start_ms + self.p_ms("after")


class Skew(_DeviceFault):
    """Clock skew: a ``share`` of the devices have clocks that are off by a fixed amount,
    one of +45 s, +150 s (ahead, within ingest's 5-minute future limit), -4 min or -15 min;
    every time they write is shifted by it (ground truth ``skew_ms``).
    Parameters: share (0.05), target (any)."""

    name = "skew"
    OFFSETS = (45_000, 150_000, -240_000, -900_000)

    def prepare(self, setup: Setup) -> None:
        chosen = self.pick(setup)
        offsets = np.array(self.OFFSETS, dtype=np.int64)
        setup.faults.skew_ms[chosen] = offsets[np.arange(len(chosen)) % len(offsets)]


class Disorder(Scenario):
    """Out-of-order and late readings: a ``share`` of the messages are held back (a
    flaky link, a buffering gateway) and sent between 20 s and ``max_delay`` later; when the
    delay exceeds the device's interval they arrive after newer readings of the same
    device. Ground truth marks them ``late``, and ``out_of_order`` when a newer reading of
    the sensor went out first.
    Parameters: share (0.02), max_delay (10m)."""

    name = "disorder"
    defaults: ClassVar[dict[str, str]] = {"share": "0.02", "max_delay": "10m"}

    def prepare(self, setup: Setup) -> None:
        setup.faults.disorder_share = self.p_float("share")
        setup.faults.disorder_max_ms = max(20_000, self.p_ms("max_delay"))


class Duplicates(Scenario):
    """Duplicate sends: a ``share`` of the messages are sent twice (a device that missed
    its acknowledgement and retried), byte for byte, 0.2-5 s apart. Ground truth gives the
    copy ``duplicate_of`` = the first send's ``seq``.
    Parameters: share (0.02)."""

    name = "duplicates"
    defaults: ClassVar[dict[str, str]] = {"share": "0.02"}

    def prepare(self, setup: Setup) -> None:
        setup.faults.duplicate_share = self.p_float("share")


SCENARIOS: dict[str, type[Scenario]] = {cls.name: cls for cls in (
    Gridlock, Accident, Festival, Intrusion, Offline, Stuck, Skew, Disorder, Duplicates)}
SCENARIO_NAMES: list[str] = list(SCENARIOS)


def parse_scenario(spec: str) -> Scenario:
    """``name`` or ``name:key=value,key=value`` -> a scenario instance."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in SCENARIOS:
        raise ScenarioError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    params: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ScenarioError(f"scenario {name!r}: parameter {part!r} is not key=value")
        params[key.strip()] = value.strip()
    return SCENARIOS[name](**params)


def tag_names(bits: int) -> list[str]:
    return [n for i, n in enumerate(SCENARIO_NAMES) if bits >> i & 1]


def describe() -> str:
    """Every scenario's documentation, for ``cityops simulate --help``."""
    lines = []
    for name, cls in SCENARIOS.items():
        doc = " ".join((cls.__doc__ or "").split())
        lines.append(f"  {name:<11} {doc}")
    return "\n".join(lines)
