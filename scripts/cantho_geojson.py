"""Build ``alerts/console/static/geo/cantho.geojson``: Can Tho drawn for the console's map.

    .venv/bin/python scripts/cantho_geojson.py          # rewrite the shipped file
    .venv/bin/python scripts/cantho_geojson.py --check  # exit 1 if it is out of date

Why a generator rather than a hand-edited file: the nine districts are built from shared
boundary chains (each border between two districts is written once, below), so they can
neither overlap nor leave gaps, and the arterials and landmarks come from
``cityops/city.py``, so the map cannot drift from the coordinates the simulators, ingest
and alerts use. Edit the chains here, run this, commit both.

The shapes are approximate (drawn from general knowledge of the city, a few hundred metres
to a kilometre off), but recognisable: Ninh Kieu, Cai Rang and Binh Thuy small and urban on
the Hau river's south-west bank, Thot Not up-river in the north, Vinh Thanh, Co Do and Thoi
Lai the large rural west, Phong Dien south-west of Ninh Kieu. The city's north-east border
is the middle of the Hau river (the provincial border with Dong Thap and Vinh Long), so the
districts reach the river's centre line and the river polygon is drawn over them; the Can
Tho river is the border of Ninh Kieu and Cai Rang. Not cadastral data: replace it with the
city's own boundaries when the center has them (same ``kind``/``code`` properties).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cityops.city import DISTRICTS, LANDMARKS  # noqa: E402

OUT = ROOT / "alerts" / "console" / "static" / "geo" / "cantho.geojson"
LatLon = tuple[float, float]

# --- the Hau river's centre line, north-west to south-east: the city's north-east border -----
# (the first and last points run on beyond the city, so the river reaches the map's edges)
HAU: dict[str, LatLon] = {
    "h_up2": (10.430, 105.395), "h_up1": (10.385, 105.448),
    "c0": (10.345, 105.488), "c1": (10.312, 105.516), "c2": (10.287, 105.541),
    "c3": (10.262, 105.567), "c4": (10.235, 105.591), "c5": (10.200, 105.615),
    "c6": (10.165, 105.633), "c7": (10.137, 105.648), "c8": (10.119, 105.661),
    "c9": (10.110, 105.682), "c10": (10.110, 105.705), "c11": (10.104, 105.728),
    "c12": (10.090, 105.752), "c13": (10.075, 105.766), "c14": (10.058, 105.779),
    "c15": (10.0442, 105.7912), "c16": (10.0382, 105.7947), "c17": (10.0365, 105.812),
    "c18": (10.0385, 105.833), "c19": (10.031, 105.856), "c20": (10.010, 105.880),
    "h_dn1": (9.985, 105.905), "h_dn2": (9.950, 105.945),
}
HAU_HALF_WIDTH_M = 700.0  # ~1.4 km wide at Can Tho (it is 1.5-2 km; islands are left out)

# --- every other boundary vertex ----------------------------------------------------------------
V: dict[str, LatLon] = {
    **HAU,
    # the city's land border, clockwise from the north (An Giang, Kien Giang, Hau Giang)
    "o1": (10.320, 105.458), "o2": (10.325, 105.400), "o3": (10.300, 105.330),
    "o4": (10.262, 105.262), "o5": (10.205, 105.228), "o6": (10.150, 105.262),
    "o7": (10.092, 105.308), "o8": (10.045, 105.350), "o9": (10.006, 105.410),
    "o10": (9.982, 105.475), "o11": (9.962, 105.540), "o12": (9.948, 105.600),
    "o13": (9.945, 105.655), "o14": (9.958, 105.712), "o15": (9.962, 105.762),
    "o16": (9.976, 105.822), "o17": (9.995, 105.872),
    # inner borders
    "tn_w": (10.275, 105.492),  # Thot Not / Vinh Thanh
    "t1": (10.215, 105.525),  # Thot Not, Vinh Thanh, Co Do
    "t2": (10.185, 105.560),  # Thot Not, Co Do, O Mon
    "vc1": (10.175, 105.470), "vc2": (10.160, 105.400), "vc3": (10.158, 105.330),
    "co1": (10.140, 105.570),  # Co Do / O Mon
    "t3": (10.095, 105.575),  # Co Do, O Mon, Thoi Lai
    "ct1": (10.085, 105.520), "ct2": (10.055, 105.470),  # Co Do / Thoi Lai
    "t5": (10.050, 105.610),  # O Mon, Thoi Lai, Phong Dien
    "tp1": (10.000, 105.585),  # Thoi Lai / Phong Dien
    "t4": (10.055, 105.668),  # O Mon, Binh Thuy, Phong Dien
    "bp1": (10.045, 105.700),  # Binh Thuy / Phong Dien
    "t6": (10.030, 105.727),  # Binh Thuy, Ninh Kieu, Phong Dien
    "bn1": (10.0435, 105.7620),  # Binh Thuy / Ninh Kieu (between Vo Van Kiet and Nguyen Van Cu)
    "t7": (10.006, 105.738),  # Ninh Kieu, Cai Rang, Phong Dien (on the Can Tho river)
    # the Can Tho river, Ninh Kieu / Cai Rang, up to its mouth at Ninh Kieu wharf
    "k1": (10.0065, 105.750), "k2": (10.012, 105.760), "k3": (10.0175, 105.770),
    "k4": (10.025, 105.781), "k5": (10.0290, 105.7915),
}

# Each district's ring as chains of vertex names, walked in order (a chain is written the
# same way in both districts it separates, reversed in one of them).
RINGS: dict[str, list[str]] = {
    "thot_not": ["c0", "c1", "c2", "c3", "c4", "c5", "t2", "t1", "tn_w", "o1"],
    "vinh_thanh": ["o1", "tn_w", "t1", "vc1", "vc2", "vc3", "o6", "o5", "o4", "o3", "o2"],
    "co_do": ["t1", "t2", "co1", "t3", "ct1", "ct2", "o9", "o8", "o7", "o6", "vc3", "vc2",
              "vc1"],
    "o_mon": ["c5", "c6", "c7", "c8", "c9", "t4", "t5", "t3", "co1", "t2"],
    "thoi_lai": ["t3", "t5", "tp1", "o11", "o10", "o9", "ct2", "ct1"],
    "phong_dien": ["t5", "t4", "bp1", "t6", "t7", "o14", "o13", "o12", "o11", "tp1"],
    "binh_thuy": ["c9", "c10", "c11", "c12", "c13", "c14", "bn1", "t6", "bp1", "t4"],
    "ninh_kieu": ["c14", "c15", "c16", "k5", "k4", "k3", "k2", "k1", "t7", "t6", "bn1"],
    "cai_rang": ["c16", "c17", "c18", "c19", "c20", "o17", "o16", "o15", "o14", "t7", "k1",
                 "k2", "k3", "k4", "k5"],
}

# National roads (approximate courses; the ends run on beyond the city).
ROADS: dict[str, tuple[str, list[LatLon]]] = {
    # Can Tho bridge from Vinh Long, through Cai Rang, south to Hau Giang
    "ql1a": ("QL1A", [(10.049, 105.833), (10.033, 105.833), (10.020, 105.823),
                      (10.000, 105.801), (9.982, 105.783), (9.958, 105.766), (9.925, 105.752)]),
    # along the river's bank from Ninh Kieu up to Long Xuyen (An Giang)
    "ql91": ("QL91", [(10.041, 105.771), (10.055, 105.760), (10.070, 105.748),
                      (10.083, 105.730), (10.093, 105.705), (10.100, 105.680),
                      (10.108, 105.655), (10.130, 105.638), (10.160, 105.622),
                      (10.195, 105.603), (10.232, 105.580), (10.260, 105.550),
                      (10.285, 105.520), (10.308, 105.500), (10.338, 105.475),
                      (10.378, 105.440)]),
    # Nguyen Van Linh: the ring road from QL91 at Binh Thuy to QL1A at Cai Rang
    "ql91b": ("QL91B", [(10.068, 105.736), (10.052, 105.742), (10.036, 105.748),
                        (10.020, 105.754), (10.004, 105.762), (9.990, 105.774),
                        (9.982, 105.783)]),
    # Nam Song Hau (QL91C): Cai Rang down the river's bank towards Soc Trang
    "nam_song_hau": ("Nam Song Hau", [(9.995, 105.780), (9.992, 105.805), (9.986, 105.835),
                                      (9.976, 105.863), (9.958, 105.895), (9.935, 105.930)]),
}

KX = math.cos(math.radians(10.1))  # metres per degree of longitude / of latitude, here
M_PER_DEG = 111_320.0


def _xy(p: LatLon) -> tuple[float, float]:
    return p[1] * KX * M_PER_DEG, p[0] * M_PER_DEG


def _latlon(x: float, y: float) -> LatLon:
    return y / M_PER_DEG, x / (KX * M_PER_DEG)


def _pos(p: LatLon) -> list[float]:
    """A GeoJSON position ([lon, lat]), to ~1 m."""
    return [round(p[1], 5), round(p[0], 5)]


def signed_area(ring: list[list[float]]) -> float:
    """Shoelace over [lon, lat] positions: > 0 counter-clockwise."""
    return sum(a[0] * b[1] - b[0] * a[1] for a, b in pairwise(ring)) / 2


def _ring(points: list[LatLon]) -> list[list[float]]:
    """A closed, counter-clockwise ring (RFC 7946's right-hand rule for exterior rings)."""
    ring = [_pos(p) for p in points]
    ring.append(ring[0])
    return ring if signed_area(ring) > 0 else ring[::-1]


def _offset(line: list[LatLon], metres: float) -> list[LatLon]:
    """The line moved sideways by ``metres`` (left of its direction when positive), each
    vertex along the bisector of its two segments."""
    pts = [_xy(p) for p in line]
    out = []
    for i, (x, y) in enumerate(pts):
        a, b = pts[max(i - 1, 0)], pts[min(i + 1, len(pts) - 1)]
        dx, dy = b[0] - a[0], b[1] - a[1]
        n = math.hypot(dx, dy)
        out.append(_latlon(x - dy / n * metres, y + dx / n * metres))
    return out


def river_polygon() -> list[list[float]]:
    """The Hau river: its centre line widened to both banks."""
    line = list(HAU.values())
    # the line runs north-west to south-east: its left is the north-east bank
    left = _offset(line, HAU_HALF_WIDTH_M)
    right = _offset(line, -HAU_HALF_WIDTH_M)  # south-west bank: Can Tho's side
    return _ring(right + left[::-1])


def _feature(kind: str, code: str, geometry: dict[str, Any], **props: Any) -> dict[str, Any]:
    return {"type": "Feature", "properties": {"kind": kind, "code": code, **props},
            "geometry": geometry}


def build() -> dict[str, Any]:
    """The whole FeatureCollection, in drawing order: districts, river, roads, arterials,
    landmarks."""
    feats = [_feature("district", d.code,
                      {"type": "Polygon", "coordinates": [_ring([V[v] for v in RINGS[d.code]])]},
                      name=d.name, urban=d.urban, center=_pos((d.lat, d.lon)))
             for d in DISTRICTS]
    feats.append(_feature("river", "hau", {"type": "Polygon", "coordinates": [river_polygon()]},
                          name="Hau river"))
    feats += [_feature("road", code, {"type": "LineString",
                                      "coordinates": [_pos(p) for p in pts]}, name=name)
              for code, (name, pts) in ROADS.items()]
    feats += [_feature("arterial", lm.code,
                       {"type": "LineString",
                        "coordinates": [_pos((lm.lat, lm.lon)), _pos((lm.lat2, lm.lon2))]},
                       name=lm.name, district=lm.district)
              for lm in LANDMARKS if lm.lat2 is not None and lm.lon2 is not None]
    feats += [_feature("landmark", lm.code,
                       {"type": "Point", "coordinates": _pos((lm.lat, lm.lon))},
                       name=lm.name, district=lm.district, landmark_kind=lm.kind)
              for lm in LANDMARKS]
    return {"type": "FeatureCollection",
            "name": "cantho",
            "description": "Can Tho, approximate (scripts/cantho_geojson.py): districts, the "
                           "Hau river, national roads, arterials, landmarks. WGS84.",
            "features": feats}


def render(fc: dict[str, Any]) -> str:
    """One feature per line: small diffs when a chain moves."""
    head = {k: v for k, v in fc.items() if k != "features"}
    lines = ",\n".join(json.dumps(f, ensure_ascii=False, separators=(",", ":"))
                       for f in fc["features"])
    return json.dumps(head, ensure_ascii=False)[:-1] + ',"features":[\n' + lines + "\n]}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args()
    text = render(build())
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run scripts/cantho_geojson.py")
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
