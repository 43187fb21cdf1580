"""The shipped Can Tho GeoJSON agrees with the project's own geography (cityops/city.py).

The map is approximate, but what the center relies on must hold: every district centre,
landmark and fleet sensor lies in its own district's polygon, districts neither overlap
nor have invalid rings, the arterials are drawn where the sensors are strung, and nothing
but the bridge stands in the river. Plain geometry by hand (no GIS dependency).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any

import pytest

from cityops.city import DISTRICTS, LANDMARKS
from cityops.registry import load_fleet
from cityops.settings import PROJECT_ROOT, Settings

GEOJSON = PROJECT_ROOT / "alerts" / "console" / "static" / "geo" / "cantho.geojson"
Pos = tuple[float, float]  # (lon, lat), as GeoJSON
FC: dict[str, Any] = json.loads(GEOJSON.read_text(encoding="utf-8"))


def features(kind: str) -> dict[str, dict[str, Any]]:
    return {f["properties"]["code"]: f for f in FC["features"]
            if f["properties"]["kind"] == kind}


def ring(feature: dict[str, Any]) -> list[Pos]:
    assert feature["geometry"]["type"] == "Polygon"
    return [(p[0], p[1]) for p in feature["geometry"]["coordinates"][0]]


def inside(p: Pos, poly: list[Pos]) -> bool:
    """Even-odd ray casting; ``poly`` is a closed ring."""
    x, y = p
    hit = False
    for (x1, y1), (x2, y2) in pairwise(poly):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            hit = not hit
    return hit


def _orient(a: Pos, b: Pos, c: Pos) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def crosses(a: Pos, b: Pos, c: Pos, d: Pos) -> bool:
    """Segments ab and cd cross properly (touching at an end or along a shared edge does
    not count: neighbouring districts share their border)."""
    o1, o2, o3, o4 = _orient(a, b, c), _orient(a, b, d), _orient(c, d, a), _orient(c, d, b)
    return o1 * o2 < 0 and o3 * o4 < 0


def metres(p: Pos, q: Pos) -> float:
    kx = math.cos(math.radians((p[1] + q[1]) / 2))
    return math.hypot((p[0] - q[0]) * kx, p[1] - q[1]) * 111_320


DISTRICT_RINGS = {code: ring(f) for code, f in features("district").items()}


def test_nine_districts_with_the_projects_codes() -> None:
    assert FC["type"] == "FeatureCollection"
    assert set(DISTRICT_RINGS) == {d.code for d in DISTRICTS}
    assert len(DISTRICT_RINGS) == 9
    for f in FC["features"]:
        assert {"kind", "code"} <= set(f["properties"]), f


@pytest.mark.parametrize("code", sorted(DISTRICT_RINGS))
def test_district_ring_is_valid(code: str) -> None:
    r = DISTRICT_RINGS[code]
    assert len(r) >= 4 and r[0] == r[-1], "closed ring of at least 3 corners"
    assert len(set(r[:-1])) == len(r) - 1, "no repeated corner"
    area = sum(a[0] * b[1] - b[0] * a[1] for a, b in pairwise(r)) / 2
    assert area > 0, "exterior ring counter-clockwise (RFC 7946)"
    edges = list(pairwise(r))
    for (i, e), (j, g) in combinations(enumerate(edges), 2):
        assert not crosses(*e, *g), f"ring crosses itself: edges {i} and {j}"


def test_districts_do_not_overlap() -> None:
    for (a, ra), (b, rb) in combinations(DISTRICT_RINGS.items(), 2):
        for e in pairwise(ra):
            for g in pairwise(rb):
                assert not crosses(*e, *g), f"{a} and {b} borders cross"
        assert not any(inside(p, rb) for p in ra if p not in rb), f"{a} corner inside {b}"
        assert not any(inside(p, ra) for p in rb if p not in ra), f"{b} corner inside {a}"
    # and a grid over the city: no point is in two districts
    lons = [p[0] for r in DISTRICT_RINGS.values() for p in r]
    lats = [p[1] for r in DISTRICT_RINGS.values() for p in r]
    for i in range(60):
        for j in range(60):
            p = (min(lons) + (max(lons) - min(lons)) * (i + 0.5) / 60,
                 min(lats) + (max(lats) - min(lats)) * (j + 0.5) / 60)
            assert sum(inside(p, r) for r in DISTRICT_RINGS.values()) <= 1, p


def test_district_centres_are_inside_their_district() -> None:
    for d in DISTRICTS:
        assert inside((d.lon, d.lat), DISTRICT_RINGS[d.code]), d.code


def test_landmarks_are_inside_their_district() -> None:
    for lm in LANDMARKS:
        assert inside((lm.lon, lm.lat), DISTRICT_RINGS[lm.district]), lm.code
        if lm.lat2 is not None and lm.lon2 is not None:
            assert inside((lm.lon2, lm.lat2), DISTRICT_RINGS[lm.district]), f"{lm.code} end"


def test_fleet_sensors_are_inside_their_district() -> None:
    fleet = load_fleet(Settings().fleet_file)
    outside = [s.sensor_id for s in fleet
               if not inside((s.lon, s.lat), DISTRICT_RINGS[s.district])]
    assert outside == []


def test_landmark_points_and_arterial_lines_match_city_py() -> None:
    points = features("landmark")
    lines = features("arterial")
    assert set(points) == {lm.code for lm in LANDMARKS}
    assert set(lines) == {lm.code for lm in LANDMARKS if lm.kind == "arterial"}
    for lm in LANDMARKS:
        assert metres(tuple(points[lm.code]["geometry"]["coordinates"]), (lm.lon, lm.lat)) < 5
        assert points[lm.code]["properties"]["district"] == lm.district
        if lm.kind == "arterial":
            assert lm.lat2 is not None and lm.lon2 is not None
            coords = lines[lm.code]["geometry"]["coordinates"]
            assert lines[lm.code]["geometry"]["type"] == "LineString"
            assert metres(tuple(coords[0]), (lm.lon, lm.lat)) < 50, lm.code
            assert metres(tuple(coords[-1]), (lm.lon2, lm.lat2)) < 50, lm.code


def test_river_and_national_roads() -> None:
    (river,) = features("river").values()
    hau = ring(river)
    assert hau[0] == hau[-1] and len(hau) >= 4
    # the river runs along the city's north-east edge: Ninh Kieu and Thot Not touch it,
    # the rural west does not
    for code in ("ninh_kieu", "cai_rang", "binh_thuy", "o_mon", "thot_not"):
        assert any(inside(p, hau) for p in DISTRICT_RINGS[code]), code
    for code in ("vinh_thanh", "co_do", "thoi_lai", "phong_dien"):
        assert not any(inside(p, hau) for p in DISTRICT_RINGS[code]), code
    # on land: every place but the bridge, which stands in the river
    for lm in LANDMARKS:
        assert inside((lm.lon, lm.lat), hau) == (lm.kind == "bridge"), lm.code
    for d in DISTRICTS:
        assert not inside((d.lon, d.lat), hau), d.code
    roads = features("road")
    assert {"ql1a", "ql91", "ql91b", "nam_song_hau"} <= set(roads)
    for code in ("ql91", "ql91b", "nam_song_hau"):
        for p in roads[code]["geometry"]["coordinates"]:
            assert not inside(tuple(p), hau), (code, p)
    # QL1A crosses the river on Can Tho bridge
    bridge = next(lm for lm in LANDMARKS if lm.kind == "bridge")
    assert min(metres(tuple(p), (bridge.lon, bridge.lat))
               for p in roads["ql1a"]["geometry"]["coordinates"]) < 100


def test_shipped_file_is_what_the_generator_makes() -> None:
    """The file is built by scripts/cantho_geojson.py: edit the chains there, not here."""
    proc = subprocess.run([sys.executable, str(Path("scripts") / "cantho_geojson.py"),
                           "--check"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
