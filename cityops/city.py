"""Can Tho as the operations center sees it: districts, landmarks and arterial roads.

This is the shared geography of the domain model. Simulators place sensors on it,
ingest stamps events with it, the console draws its map from it. Coordinates are
WGS84 (approximate, good to a few hundred metres: enough to draw and to group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LandmarkKind = Literal["arterial", "bridge", "attraction", "market", "public_building", "transport",
                       "campus", "hotel_zone"]
CapacityUnit = Literal["p/m2", "people"]


@dataclass(frozen=True, slots=True)
class Capacity:
    """How much crowd a place takes comfortably: what the wall's crowd gauge shows a
    landmark's crowd against (100 % = at capacity, not yet a crush).

    ``p/m2``: a place watched by cameras that estimate crowd density (``crowd_density``,
    the densest view counts), judged the way crowd safety is: around 2 persons/m2 a moving
    crowd is slowed and tight, over 4 a standing crowd is packed (the analytics' alarm
    level). ``people``: a site counted at its gates (``footfall_in``/``footfall_out``),
    judged by how many are inside; the figures are the site's own visitor limit as the
    tourism office would set it (estimates until the city provides them).
    """

    value: float
    unit: CapacityUnit


@dataclass(frozen=True, slots=True)
class District:
    """One of Can Tho's nine districts (quan/huyen)."""

    code: str  # short slug used in topics and sensor ids
    name: str
    lat: float
    lon: float
    urban: bool  # urban districts have denser traffic and sharper rush hours


@dataclass(frozen=True, slots=True)
class Landmark:
    """A named place sensors cluster around; alerts correlate across domains by landmark."""

    code: str
    name: str
    district: str
    kind: LandmarkKind
    lat: float
    lon: float
    # For arterials, the far end of the road segment the sensors are strung along.
    lat2: float | None = None
    lon2: float | None = None
    # For places whose crowds the center watches (security and tourism landmarks).
    capacity: Capacity | None = None


DISTRICTS: tuple[District, ...] = (
    District("ninh_kieu", "Ninh Kieu", 10.0340, 105.7780, True),
    District("cai_rang", "Cai Rang", 9.9990, 105.7720, True),
    District("binh_thuy", "Binh Thuy", 10.0720, 105.7400, True),
    District("o_mon", "O Mon", 10.1150, 105.6300, True),
    District("thot_not", "Thot Not", 10.2700, 105.5350, True),
    District("phong_dien", "Phong Dien", 9.9980, 105.6700, False),
    District("co_do", "Co Do", 10.1000, 105.4400, False),
    District("thoi_lai", "Thoi Lai", 10.0620, 105.5550, False),
    District("vinh_thanh", "Vinh Thanh", 10.2050, 105.4000, False),
)

LANDMARKS: tuple[Landmark, ...] = (
    Landmark("ninh_kieu_wharf", "Ninh Kieu wharf", "ninh_kieu", "attraction", 10.0335, 105.7880,
             capacity=Capacity(2.0, "p/m2")),
    Landmark("night_market", "Ninh Kieu night market", "ninh_kieu", "market", 10.0322, 105.7869,
             capacity=Capacity(2.5, "p/m2")),
    Landmark("street_30_4", "30/4 street", "ninh_kieu", "arterial", 10.0300, 105.7790,
             10.0180, 105.7620),
    Landmark("nguyen_van_cu", "Nguyen Van Cu street", "ninh_kieu", "arterial", 10.0420, 105.7640,
             10.0250, 105.7380),
    Landmark("street_3_2", "3/2 street", "ninh_kieu", "arterial", 10.0330, 105.7700,
             10.0210, 105.7560),
    Landmark("hoa_binh", "Hoa Binh boulevard", "ninh_kieu", "arterial", 10.0380, 105.7830,
             10.0330, 105.7750),
    Landmark("ctu", "Can Tho University", "ninh_kieu", "campus", 10.0300, 105.7690),
    Landmark("city_hall", "City People's Committee", "ninh_kieu", "public_building",
             10.0355, 105.7860, capacity=Capacity(2.0, "p/m2")),
    Landmark("central_hospital", "Can Tho Central General Hospital", "cai_rang",
             "public_building", 10.0050, 105.7830),
    Landmark("cai_rang_market", "Cai Rang floating market", "cai_rang", "market",
             10.0005, 105.7480, capacity=Capacity(2.0, "p/m2")),
    Landmark("can_tho_bridge", "Can Tho bridge", "cai_rang", "bridge", 10.0330, 105.8330),
    Landmark("vo_nguyen_giap", "Vo Nguyen Giap avenue", "cai_rang", "arterial",
             10.0200, 105.8050, 9.9950, 105.7800),
    Landmark("airport", "Can Tho International Airport", "binh_thuy", "transport",
             10.0851, 105.7119, capacity=Capacity(2.5, "p/m2")),
    Landmark("vo_van_kiet", "Vo Van Kiet avenue", "binh_thuy", "arterial", 10.0450, 105.7600,
             10.0800, 105.7150),
    Landmark("binh_thuy_house", "Binh Thuy ancient house", "binh_thuy", "attraction",
             10.0780, 105.7390, capacity=Capacity(1200, "people")),
    Landmark("hotel_zone_nk", "Ninh Kieu riverside hotels", "ninh_kieu", "hotel_zone",
             10.0310, 105.7890),
    Landmark("o_mon_center", "O Mon town center", "o_mon", "arterial", 10.1100, 105.6350,
             10.1230, 105.6200),
    Landmark("o_mon_power", "O Mon power center", "o_mon", "public_building", 10.1190, 105.6230),
    Landmark("stork_garden", "Bang Lang stork garden", "thot_not", "attraction",
             10.2580, 105.5330, capacity=Capacity(1000, "people")),
    Landmark("thot_not_ql91", "National road 91, Thot Not", "thot_not", "arterial",
             10.2600, 105.5500, 10.2850, 105.5200),
    Landmark("phong_dien_market", "Phong Dien floating market", "phong_dien", "market",
             9.9990, 105.6850),
    Landmark("truc_lam", "Truc Lam Phuong Nam monastery", "phong_dien", "attraction",
             9.9917, 105.7010, capacity=Capacity(2500, "people")),
    Landmark("my_khanh", "My Khanh tourist village", "phong_dien", "attraction",
             10.0050, 105.7250, capacity=Capacity(1500, "people")),
    Landmark("co_do_center", "Co Do town", "co_do", "arterial", 10.0950, 105.4450,
             10.1050, 105.4300),
    Landmark("thoi_lai_center", "Thoi Lai town", "thoi_lai", "arterial", 10.0600, 105.5600,
             10.0650, 105.5450),
    Landmark("vinh_thanh_center", "Vinh Thanh town", "vinh_thanh", "arterial", 10.2000, 105.4050,
             10.2100, 105.3950),
)

DISTRICTS_BY_CODE: dict[str, District] = {d.code: d for d in DISTRICTS}
LANDMARKS_BY_CODE: dict[str, Landmark] = {lm.code: lm for lm in LANDMARKS}


def district(code: str) -> District:
    try:
        return DISTRICTS_BY_CODE[code]
    except KeyError:
        known = ", ".join(DISTRICTS_BY_CODE)
        raise KeyError(f"unknown district {code!r}; known: {known}") from None


def landmark(code: str) -> Landmark:
    try:
        return LANDMARKS_BY_CODE[code]
    except KeyError:
        known = ", ".join(LANDMARKS_BY_CODE)
        raise KeyError(f"unknown landmark {code!r}; known: {known}") from None
