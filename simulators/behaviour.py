"""How Can Tho behaves over a day: the numbers behind every simulated reading.

Everything here is vectorized over the readings of one simulated window (numpy arrays
indexed by reading), because a window of a large fleet holds tens of thousands of them.

The model, in words:

* **Traffic** follows the motorbike city's rhythm: sharp rush hours at 7-8 h and 17-18 h
  local time on weekdays (flatter at weekends), a lunch dip, quiet nights with trucks taking
  a larger share. Occupancy grows with demand and speed falls with occupancy
  (a simple speed-density curve), so congestion shows up in all three quantities at once.
* **Crowds** (CCTV people counts, footfall, Wi-Fi probes) follow each place's own day: the
  wharf and the night market fill in the evening, the floating markets at dawn, public
  buildings in office hours, the airport with its flights. Weekends and festival days lift
  the tourist places; foreign visitors are a larger share at the airport and the markets.
* **Correlation**: every landmark and every district carries a slowly varying latent
  state (an AR(1) process stepped once per window). All sensors at a landmark share it, and
  landmarks of one district share the district's part, so nearby sensors rise and fall
  together the way real neighbouring detectors do.
* **Incidents** arrive as rare Poisson events whose rates depend on place and hour
  (loitering at night near the markets, abandoned objects at the airport, fights late at
  the night market); a crowd reading above 4 persons/m2 may raise a ``crowd_density`` event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cityops.city import LANDMARKS_BY_CODE, district
from cityops.registry import Fleet
from simulators.clock import festival_day, local_hour, weekend

# What a sensor type reports, so models and encoders work per report kind.
REPORT_KIND: dict[str, str] = {
    "lane_detector": "traffic", "traffic_camera": "traffic", "traffic_signal": "signal",
    "cctv": "crowd", "door_sensor": "door", "panic_button": "panic",
    "footfall_counter": "footfall", "boat_counter": "boats", "wifi_probe": "probe",
    "hotel": "hotel",
}
KINDS: tuple[str, ...] = ("traffic", "signal", "crowd", "door", "panic", "footfall", "boats",
                          "probe", "hotel")


def _curve(values: list[float]) -> np.ndarray:
    assert len(values) == 24
    return np.array([*values, values[0]], dtype=np.float64)


# Relative activity by local hour (0..23), 1.0 at the busiest hour.
TRAFFIC_WEEKDAY = _curve([.08, .05, .04, .04, .06, .20, .60, 1.0, .95, .60, .55, .58, .60, .52,
                          .55, .62, .78, 1.0, .95, .70, .55, .45, .30, .15])
TRAFFIC_WEEKEND = _curve([.10, .07, .05, .04, .05, .12, .30, .50, .60, .65, .68, .70, .65, .58,
                          .60, .65, .70, .78, .80, .72, .62, .50, .35, .20])
PLACE_PROFILES: dict[str, np.ndarray] = {
    "riverfront": _curve([.10, .06, .04, .03, .03, .08, .20, .25, .22, .20, .22, .25, .25, .22,
                          .22, .25, .35, .55, .80, .95, 1.0, .90, .60, .25]),
    "night_market": _curve([.15, .05, .02, .01, .01, .02, .03, .05, .05, .05, .05, .05, .05,
                            .05, .05, .08, .15, .40, .75, .95, 1.0, .95, .75, .40]),
    "floating_market": _curve([.02, .02, .03, .10, .35, .80, 1.0, .90, .60, .35, .20, .12, .08,
                               .06, .06, .06, .06, .05, .04, .03, .02, .02, .02, .02]),
    "office": _curve([.02] * 6 + [.10, .45, .95, 1.0, .95, .90, .60, .85, .95, .90, .80, .40,
                                  .10, .05, .03, .02, .02, .02]),
    "hospital": _curve([.25, .20, .20, .20, .20, .30, .60, .90, 1.0, 1.0, .95, .90, .80, .85,
                        .90, .85, .75, .60, .50, .45, .40, .35, .30, .28]),
    "plant": _curve([.20] * 6 + [.40, .70, 1.0, 1.0, 1.0, 1.0, .80, 1.0, 1.0, 1.0, .90, .50,
                                 .30, .25, .20, .20, .20, .20]),
    "airport": _curve([.10, .05, .03, .03, .05, .30, .60, .80, .90, .85, .80, .80, .75, .80,
                       .85, .90, .95, 1.0, .95, .90, .80, .70, .50, .25]),
    "attraction": _curve([0, 0, 0, 0, 0, .05, .20, .45, .75, .90, 1.0, .95, .85, .85, .90, .85,
                          .70, .50, .30, .10, .05, .02, 0, 0]),
}
PROFILE_OF: dict[str, str] = {
    "ninh_kieu_wharf": "riverfront", "night_market": "night_market",
    "cai_rang_market": "floating_market", "phong_dien_market": "floating_market",
    "city_hall": "office", "ctu": "office", "central_hospital": "hospital",
    "o_mon_power": "plant", "airport": "airport", "hotel_zone_nk": "riverfront",
}
TOURIST_PROFILES = {"riverfront", "night_market", "floating_market", "attraction"}
# Typical people in a camera's view at the busiest hour, per landmark (default 30).
PEOPLE_PEAK = {"ninh_kieu_wharf": 220, "night_market": 260, "cai_rang_market": 120,
               "airport": 300, "city_hall": 40, "central_hospital": 60, "o_mon_power": 8}
# Entries per minute per footfall counter at the busiest hour (default 12).
FOOTFALL_PEAK = {"ninh_kieu_wharf": 45, "night_market": 50, "binh_thuy_house": 10,
                 "stork_garden": 8, "truc_lam": 14, "my_khanh": 12}
BOATS_PEAK = {"cai_rang_market": 70, "phong_dien_market": 25}
# Unique devices a Wi-Fi/BLE probe sees in 5 minutes at the busiest hour (default 200).
PROBE_PEAK = {"ninh_kieu_wharf": 500, "cai_rang_market": 250, "airport": 700}
FOREIGN_SHARE = {"airport": 0.25, "cai_rang_market": 0.30, "ninh_kieu_wharf": 0.18}
# Visitors by nationality (upper case as the probes send them); GB, TW and XX (unknown
# vendor code) are not contract nationalities and count as "other".
FOREIGN_CODES = ("KR", "CN", "US", "FR", "DE", "AU", "JP", "TH", "GB", "TW", "XX")
FOREIGN_MIX = np.array([.22, .18, .10, .09, .06, .06, .08, .07, .05, .04, .05])
FOREIGN_MIX = FOREIGN_MIX / FOREIGN_MIX.sum()


def interp(curve: np.ndarray, hour: np.ndarray) -> np.ndarray:
    return np.interp(hour, np.arange(25), curve)


@dataclass
class FleetArrays:
    """Per-sensor constants of a fleet as numpy arrays (index = position in the fleet)."""

    fleet: Fleet
    seed: int
    ids: list[str] = field(init=False)
    kind: np.ndarray = field(init=False)  # index into KINDS
    landmark: np.ndarray = field(init=False)  # index into landmarks
    landmarks: list[str] = field(init=False)
    lm_district: np.ndarray = field(init=False)  # per landmark: index into districts
    districts: list[str] = field(init=False)
    urban: np.ndarray = field(init=False)
    interval_ms: np.ndarray = field(init=False)
    phase_ms: np.ndarray = field(init=False)
    rank: np.ndarray = field(init=False)  # position among the sensors of its landmark and type
    group_size: np.ndarray = field(init=False)
    free_speed: np.ndarray = field(init=False)
    peak_flow_h: np.ndarray = field(init=False)
    view_m2: np.ndarray = field(init=False)
    rooms: np.ndarray = field(init=False)
    base_occupancy: np.ndarray = field(init=False)
    vendor: list[str] = field(init=False)

    def __post_init__(self) -> None:
        sensors = self.fleet.sensors
        n = len(sensors)
        rng = np.random.default_rng([self.seed, 7919])
        self.ids = [s.sensor_id for s in sensors]
        self.vendor = [s.vendor for s in sensors]
        self.kind = np.array([KINDS.index(REPORT_KIND[s.type]) for s in sensors], dtype=np.int8)
        self.landmarks = sorted({s.landmark for s in sensors})
        self.landmark = np.array([self.landmarks.index(s.landmark) for s in sensors],
                                 dtype=np.int32)
        self.districts = sorted({s.district for s in sensors})
        self.lm_district = np.array(
            [self.districts.index(LANDMARKS_BY_CODE[lm].district) for lm in self.landmarks],
            dtype=np.int32)
        self.urban = np.array([district(s.district).urban for s in sensors])
        self.interval_ms = np.array([s.interval_s * 1000 for s in sensors], dtype=np.int64)
        # Each device reports at its own offset within its interval, as real fleets do.
        self.phase_ms = (rng.random(n) * self.interval_ms).astype(np.int64)
        counters: dict[tuple[str, str], int] = {}
        rank = []
        for s in sensors:
            key = (s.landmark, s.type)
            rank.append(counters.get(key, 0))
            counters[key] = rank[-1] + 1
        self.rank = np.array(rank, dtype=np.int32)
        self.group_size = np.array([counters[(s.landmark, s.type)] for s in sensors],
                                   dtype=np.int32)
        kinds = [LANDMARKS_BY_CODE[s.landmark].kind for s in sensors]
        self.free_speed = np.where(self.urban, 42.0, 58.0) + rng.normal(0, 3, n)
        self.free_speed[np.array([k == "bridge" for k in kinds])] += 22.0
        self.peak_flow_h = np.where(self.urban, 2400.0, 900.0) * rng.uniform(0.8, 1.2, n)
        self.view_m2 = rng.uniform(120, 220, n)
        self.rooms = rng.integers(40, 260, n)
        self.base_occupancy = rng.uniform(0.45, 0.75, n)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Window:
    """The readings due in one simulated window, and the knobs scenarios turn.

    Scenarios multiply ``demand`` (traffic volume), ``speed_factor``, add to ``occ_add``
    (detector occupancy), multiply ``crowd`` (people, footfall, probes) and ``foreign``
    (foreign visitors' weight), add ``hotel_add`` to hotel occupancy, set bits in ``tags``,
    and append scheduled ``incidents``.
    """

    index: int
    t0: int
    t1: int
    sensor: np.ndarray  # fleet index of each reading
    t: np.ndarray  # true event time ms of each reading
    hour: np.ndarray
    weekend: np.ndarray
    festival: np.ndarray
    rng: np.random.Generator  # for scenarios only: keeps the baseline draws untouched
    demand: np.ndarray = field(init=False)
    speed_factor: np.ndarray = field(init=False)
    occ_add: np.ndarray = field(init=False)
    crowd: np.ndarray = field(init=False)
    foreign: np.ndarray = field(init=False)
    hotel_add: np.ndarray = field(init=False)
    tags: np.ndarray = field(init=False)
    force_open: np.ndarray = field(init=False)  # door sensors reporting a forced-open door
    incidents: list[Incident] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.sensor)
        self.demand = np.ones(n)
        self.speed_factor = np.ones(n)
        self.occ_add = np.zeros(n)
        self.crowd = np.ones(n)
        self.foreign = np.ones(n)
        self.hotel_add = np.zeros(n)
        self.tags = np.zeros(n, dtype=np.uint32)
        self.force_open = np.zeros(n, dtype=bool)


@dataclass(frozen=True, slots=True)
class Incident:
    """A discrete event a security device reports (besides its periodic readings)."""

    sensor: int
    t: int
    incident: str  # contract incident name
    confidence: float = 1.0
    people: int = 0
    density: float = 0.0
    door_open: bool | None = None
    tags: int = 0


class CityModel:
    """The latent state of the city and the models that turn it into readings."""

    def __init__(self, fa: FleetArrays) -> None:
        self.fa = fa
        self.z_landmark = np.zeros(len(fa.landmarks))
        self.z_district = np.zeros(len(fa.districts))
        self.place_profile = [PROFILE_OF.get(lm, "attraction") for lm in fa.landmarks]

    def step(self, rng: np.random.Generator, minutes: float = 1.0) -> None:
        """Advance the shared latent states by a window (AR(1), about half an hour's memory)."""
        rho = 0.97 ** minutes
        sd = np.sqrt(1 - rho * rho)
        self.z_landmark = rho * self.z_landmark + sd * rng.normal(size=self.z_landmark.shape)
        self.z_district = rho * self.z_district + sd * rng.normal(size=self.z_district.shape)

    def latent(self, sensor: np.ndarray) -> np.ndarray:
        """Multiplier shared by the sensors of one landmark (and, weaker, one district)."""
        lm = self.fa.landmark[sensor]
        return np.exp(0.12 * self.z_landmark[lm] + 0.08 * self.z_district[self.fa.lm_district[lm]])

    def place_activity(self, sensor: np.ndarray, hour: np.ndarray, wkend: np.ndarray,
                       fest: np.ndarray) -> np.ndarray:
        """How busy each reading's place is (1.0 = its usual busiest hour)."""
        out = np.empty(len(sensor))
        lm = self.fa.landmark[sensor]
        for li in np.unique(lm):
            m = lm == li
            prof = self.place_profile[li]
            a = interp(PLACE_PROFILES[prof], hour[m])
            if prof in TOURIST_PROFILES:
                a = a * np.where(wkend[m], 1.4, 1.0) * np.where(fest[m], 1.8, 1.0)
            elif prof == "office":
                a = a * np.where(wkend[m] | fest[m], 0.15, 1.0)
            out[m] = a
        return out

    # --- traffic ---------------------------------------------------------------------------
    def traffic(self, w: Window, m: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        s, hour = w.sensor[m], w.hour[m]
        fa = self.fa
        curve = np.where(w.weekend[m], interp(TRAFFIC_WEEKEND, hour),
                         interp(TRAFFIC_WEEKDAY, hour))
        base_demand = curve * self.latent(s)
        demand = base_demand * w.demand[m]
        iv = fa.interval_ms[s] / 1000.0
        total = rng.poisson(fa.peak_flow_h[s] * demand * iv / 3600.0)
        night = (hour < 5) | (hour >= 22)
        p_mc = np.where(night, 0.74, 0.84)
        p_car = np.where(night, 0.12, 0.10)
        p_truck = np.where(night, 0.12, 0.03)
        mc = rng.binomial(total, p_mc)
        car = rng.binomial(total - mc, p_car / (1 - p_mc))
        truck = rng.binomial(total - mc - car, p_truck / (1 - p_mc - p_car))
        bus = total - mc - car - truck
        occ = np.clip(0.02 + 0.30 * base_demand + w.occ_add[m] + rng.normal(0, 0.012, len(s)),
                      0.0, 0.97)
        speed = fa.free_speed[s] * np.clip(1 - 0.75 * (occ / 0.5) ** 1.6, 0.12, 1.0)
        speed = np.clip(speed * w.speed_factor[m] + rng.normal(0, 1.2, len(s)), 2.0, 110.0)
        return {"mc": mc, "car": car, "truck": truck, "bus": bus, "speed": speed, "occ": occ}

    def signals(self, w: Window, m: np.ndarray, rng: np.random.Generator
                ) -> dict[str, np.ndarray]:
        s, hour = w.sensor[m], w.hour[m]
        pos = ((w.t[m] // 1000) + self.fa.phase_ms[s] // 1000) % 90
        phase = np.where(pos < 40, "green", np.where(pos < 44, "amber", "red"))
        phase = np.where((hour >= 23) | (hour < 5), "flashing", phase)
        fault = rng.random(len(s)) < 0.001
        return {"phase": phase, "fault": fault}

    # --- security ---------------------------------------------------------------------------
    def crowd(self, w: Window, m: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        s = w.sensor[m]
        act = self.place_activity(s, w.hour[m], w.weekend[m], w.festival[m])
        peak = np.array([PEOPLE_PEAK.get(lm, 30) for lm in self.fa.landmarks])[self.fa.landmark[s]]
        people = rng.poisson(np.maximum(peak * act * self.latent(s) * w.crowd[m], 0.2))
        # a view holds at most ~7 persons/m2 (a crush); analytics saturate there
        people = np.minimum(people, (7.0 * self.fa.view_m2[s]).astype(np.int64))
        density = people / self.fa.view_m2[s]
        return {"people": people, "density": density}

    def doors(self, w: Window, m: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        s = w.sensor[m]
        act = self.place_activity(s, w.hour[m], w.weekend[m], w.festival[m])
        return {"open": (rng.random(len(s)) < 0.7 * act) | w.force_open[m]}

    def panic_readings(self, w: Window, m: np.ndarray, rng: np.random.Generator
                       ) -> dict[str, np.ndarray]:
        """Panic buttons only send heartbeats between presses: nothing to compute."""
        return {}

    def background_incidents(self, w: Window, crowd_sensors: np.ndarray,
                             crowd_t: np.ndarray, crowd_density: np.ndarray,
                             crowd_people: np.ndarray, panic_sensors: np.ndarray,
                             rng: np.random.Generator) -> list[Incident]:
        """Rare everyday incidents, plus crowd-density alarms when a view gets packed."""
        out: list[Incident] = []
        # crowd-density analytics: packed views raise an event a second after the reading
        packed = np.flatnonzero(crowd_density > 4.0)
        fire = rng.random(len(packed)) < 0.5
        for j in packed[fire]:
            out.append(Incident(int(crowd_sensors[j]), int(crowd_t[j]) + 1000, "crowd_density",
                                round(float(0.7 + 0.25 * rng.random()), 2), int(crowd_people[j]),
                                float(crowd_density[j])))
        # everyday analytics events: per camera reading, a Poisson draw per incident type
        lm = self.fa.landmark[crowd_sensors]
        names = np.array(self.fa.landmarks)[lm]
        busy = np.isin(names, ("night_market", "ninh_kieu_wharf"))
        hour = local_hour(crowd_t)
        late = (hour >= 22) | (hour < 5)
        iv_h = self.fa.interval_ms[crowd_sensors] / 3_600_000
        rates = {
            "loitering": np.where(busy, 0.05, 0.02) * np.where(late, 3.0, 1.0),
            "abandoned_object": np.where(names == "airport", 0.03, 0.004),
            "fight": np.where(busy, 0.004, 0.001),
        }
        for name, per_hour in rates.items():
            hits = np.flatnonzero(rng.random(len(crowd_sensors)) < per_hour * iv_h)
            conf = 0.6 + 0.35 * rng.random(len(hits))
            for j, c in zip(hits.tolist(), conf.tolist(), strict=True):
                out.append(Incident(int(crowd_sensors[j]), int(crowd_t[j]) + 500, name,
                                    round(c, 2), int(crowd_people[j]), float(crowd_density[j])))
        # panic buttons: someone presses one about once in 500 button-hours
        ps = panic_sensors
        hit = ps[rng.random(len(ps)) < 0.002 * self.fa.interval_ms[ps] / 3_600_000]
        when = rng.integers(w.t0, w.t1, len(hit))
        out.extend(Incident(int(s), int(t), "panic") for s, t in zip(hit, when, strict=True))
        return out

    # --- tourism ----------------------------------------------------------------------------
    def footfall(self, w: Window, m: np.ndarray, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
        s, hour = w.sensor[m], w.hour[m]
        lms = self.fa.landmarks
        peak = np.array([FOOTFALL_PEAK.get(lm, 12) for lm in lms])[self.fa.landmark[s]]
        lat = self.latent(s) * w.crowd[m]
        iv_min = self.fa.interval_ms[s] / 60_000
        act_in = self.place_activity(s, hour, w.weekend[m], w.festival[m])
        act_out = self.place_activity(s, (hour - 0.75) % 24, w.weekend[m], w.festival[m])
        n_in = rng.poisson(peak * act_in * lat * iv_min)
        n_out = rng.poisson(peak * act_out * lat * iv_min)
        return {"in": n_in, "out": n_out}

    def boats(self, w: Window, m: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        s = w.sensor[m]
        peak = np.array([BOATS_PEAK.get(lm, 10) for lm in self.fa.landmarks])[self.fa.landmark[s]]
        act = self.place_activity(s, w.hour[m], w.weekend[m], w.festival[m])
        return {"boats": rng.poisson(np.maximum(peak * act * self.latent(s) * w.crowd[m], 1.0))}

    def probes(self, w: Window, m: np.ndarray, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
        s = w.sensor[m]
        lms = self.fa.landmarks
        peak = np.array([PROBE_PEAK.get(lm, 200) for lm in lms])[self.fa.landmark[s]]
        fshare = np.array([FOREIGN_SHARE.get(lm, 0.12) for lm in lms])[self.fa.landmark[s]]
        act = self.place_activity(s, w.hour[m], w.weekend[m], w.festival[m])
        iv_5min = self.fa.interval_ms[s] / 300_000
        total = rng.poisson(np.maximum(peak * act * self.latent(s) * w.crowd[m] * iv_5min, 1.0))
        fshare = np.clip(fshare * w.foreign[m], 0.0, 0.9)
        foreign = rng.binomial(total, fshare)
        by = rng.multinomial(foreign, FOREIGN_MIX)  # (n, len(FOREIGN_CODES))
        return {"vn": total - foreign, "foreign": by}

    def hotels(self, w: Window, m: np.ndarray, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
        s = w.sensor[m]
        fa = self.fa
        occ = (fa.base_occupancy[s] + 0.12 * w.weekend[m] + 0.20 * w.festival[m]
               + 0.05 * self.z_landmark[fa.landmark[s]] + w.hotel_add[m])
        occ = np.clip(occ, 0.05, 1.0)
        occupied = rng.binomial(fa.rooms[s], occ)
        return {"rooms": fa.rooms[s], "occupied": occupied}


def window_for(index: int, t0: int, t1: int, sensor: np.ndarray, t: np.ndarray,
               rng: np.random.Generator) -> Window:
    return Window(index, t0, t1, sensor, t, local_hour(t), weekend(t), festival_day(t), rng)
