"""Can Tho drawn from the project's own data, as SVG (no tile server is reachable).

Districts are known by their centres only, so their areas are drawn as the Voronoi
cells of those centres clipped to the city's frame: not cadastral borders, but each
place lands in the right district's cell and every district has an area to colour.
Every drawn thing carries ``data-district``/``data-landmark``/``data-sensor`` so the
page colours places with active alerts without redrawing the map.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from html import escape

from cityops.city import DISTRICTS, LANDMARKS
from cityops.registry import Fleet

VIEWS: dict[str, tuple[float, float, float, float]] = {
    # (lat_min, lat_max, lon_min, lon_max)
    "city": (9.94, 10.33, 105.33, 105.90),
    "center": (9.975, 10.095, 105.695, 105.845),
}
# The Hau river (approximate course, for orientation only).
HAU_RIVER = ((10.36, 105.45), (10.29, 105.53), (10.20, 105.60), (10.12, 105.66),
             (10.07, 105.73), (10.045, 105.775), (10.036, 105.792), (10.028, 105.815),
             (10.01, 105.85), (9.97, 105.91))
WIDTH = 1000.0


class Projection:
    def __init__(self, view: str) -> None:
        self.lat0, self.lat1, self.lon0, self.lon1 = VIEWS[view]
        self.kx = math.cos(math.radians((self.lat0 + self.lat1) / 2))
        self.scale = WIDTH / ((self.lon1 - self.lon0) * self.kx)
        self.height = (self.lat1 - self.lat0) * self.scale

    def xy(self, lat: float, lon: float) -> tuple[float, float]:
        return ((lon - self.lon0) * self.kx * self.scale, (self.lat1 - lat) * self.scale)


def _clip(poly: list[tuple[float, float]], a: tuple[float, float],
          b: tuple[float, float]) -> list[tuple[float, float]]:
    """Keep the half of ``poly`` nearer to ``a`` than to ``b`` (Sutherland-Hodgman)."""
    mx, my = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
    nx, ny = b[0] - a[0], b[1] - a[1]

    def side(p: tuple[float, float]) -> float:
        return (p[0] - mx) * nx + (p[1] - my) * ny

    out: list[tuple[float, float]] = []
    for i, p in enumerate(poly):
        q = poly[(i + 1) % len(poly)]
        sp, sq = side(p), side(q)
        if sp <= 0:
            out.append(p)
        if (sp <= 0) != (sq <= 0):
            t = sp / (sp - sq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def district_cells(proj: Projection) -> dict[str, list[tuple[float, float]]]:
    pts = {d.code: proj.xy(d.lat, d.lon) for d in DISTRICTS}
    frame = [(0.0, 0.0), (WIDTH, 0.0), (WIDTH, proj.height), (0.0, proj.height)]
    cells = {}
    for code, p in pts.items():
        poly = frame
        for other, q in pts.items():
            if other != code and poly:
                poly = _clip(poly, p, q)
        cells[code] = poly
    return cells


def _path(points: Iterable[tuple[float, float]]) -> str:
    pts = list(points)
    return "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in pts) + " Z"


def render_map(fleet: Fleet | None, view: str = "city") -> str:
    proj = Projection(view)
    h = proj.height
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH:.0f} {h:.0f}" '
           f'class="citymap" data-view="{view}" role="img" '
           'aria-label="Map of Can Tho: districts, landmarks and sensors">',
           f'<defs><clipPath id="frame"><rect x="0" y="0" width="{WIDTH:.0f}" '
           f'height="{h:.0f}"/></clipPath></defs><g clip-path="url(#frame)">',
           '<rect class="water-bg" x="0" y="0" width="100%" height="100%"/>',
           '<g class="districts">']
    for code, poly in district_cells(proj).items():
        if len(poly) < 3:  # outside this view: no path (an empty one is an SVG error)
            continue
        d = next(x for x in DISTRICTS if x.code == code)
        out.append(f'<path class="district" data-district="{code}" d="{_path(poly)}">'
                   f'<title>{escape(d.name)}</title></path>')
    out.append("</g>")
    river = " ".join(f"{x:.1f},{y:.1f}" for x, y in (proj.xy(a, b) for a, b in HAU_RIVER))
    out.append(f'<polyline class="river" points="{river}"><title>Hau river (approximate)'
               "</title></polyline>")
    out.append('<g class="roads">')
    for lm in LANDMARKS:
        if lm.lat2 is not None and lm.lon2 is not None:
            (x1, y1), (x2, y2) = proj.xy(lm.lat, lm.lon), proj.xy(lm.lat2, lm.lon2)
            out.append(f'<line class="road" data-landmark="{lm.code}" x1="{x1:.1f}" '
                       f'y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"><title>{escape(lm.name)}'
                       "</title></line>")
    out.append('</g><g class="district-labels">')
    for d in DISTRICTS:
        x, y = proj.xy(d.lat, d.lon)
        if 0 <= x <= WIDTH and 0 <= y <= h:
            out.append(f'<text class="district-label" x="{x:.1f}" y="{y:.1f}">'
                       f"{escape(d.name)}</text>")
    out.append('</g><g class="landmarks">')
    for lm in LANDMARKS:
        if lm.lat2 is None:
            x, y = proj.xy(lm.lat, lm.lon)
            out.append(f'<rect class="landmark" data-landmark="{lm.code}" x="{x - 4:.1f}" '
                       f'y="{y - 4:.1f}" width="8" height="8" transform="rotate(45 {x:.1f} '
                       f'{y:.1f})"><title>{escape(lm.name)}</title></rect>')
    out.append('</g><g class="sensors">')
    r = 2.2 if view == "city" else 3.5
    for s in fleet or ():
        x, y = proj.xy(s.lat, s.lon)
        if not (0 <= x <= WIDTH and 0 <= y <= h):
            continue
        out.append(f'<a href="/sensor/{escape(s.sensor_id)}"><circle class="sensor '
                   f'dom-{s.domain}" data-sensor="{escape(s.sensor_id)}" '
                   f'data-district="{s.district}" data-landmark="{s.landmark}" cx="{x:.1f}" '
                   f'cy="{y:.1f}" r="{r}"><title>{escape(s.sensor_id)} ({s.type})</title>'
                   "</circle></a>")
    out.append("</g></g></svg>")
    return "\n".join(out)
