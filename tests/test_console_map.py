"""The city map and the wall against the real stack: GET /api/map/sensors and
GET /api/wall/summary checked against rows inserted here, then static/map.js and /wall in a
real headless Chromium with WebGL (SwiftShader: tests/support.py CHROMIUM_ARGS), pixels
sampled from the map's canvas, axe-core on the wall. Screenshots land in tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from playwright.async_api import BrowserContext, Page, Playwright, expect

from alerts.console.auth import create_user
from alerts.console.mapdata import SensorCollection
from alerts.console.wall import WallSummary
from alerts.model import Signal, SignalKind
from alerts.store import AlertStore, create_pool
from alerts.testing import ConsoleServer, now_ms
from cityops.city import LANDMARKS
from cityops.registry import Sensor, load_fleet
from cityops.settings import PROJECT_ROOT, Settings
from processors.testing import seed_readings
from tests.support import CHROMIUM, CHROMIUM_ARGS

RUN = uuid.uuid4().hex[:6]
PASSWORD = "map-pass-1"
VIEWER, WALL = f"mapviewer-{RUN}", f"wall-{RUN}"
FLEET = load_fleet(Settings().fleet_file)
TZ = ZoneInfo(Settings().console_timezone)
AXE = PROJECT_ROOT / "alerts" / "console" / "web" / "node_modules" / "axe-core" / "axe.min.js"
# one sensor per state under test, in quiet outer towns (nobody else raises alerts there)
MAJOR = next(s for s in FLEET if s.landmark == "vinh_thanh_center")
OFFLINE = next(s for s in FLEET if s.landmark == "co_do_center")
CRITICAL = next(s for s in FLEET if s.landmark == "thoi_lai_center")
COLORS = {"critical": (0xD3, 0x2F, 0x2F), "major": (0xEF, 0x6C, 0x00)}


# --- fixtures -------------------------------------------------------------------------------
# autouse: the users it creates exist before any test logs in (the console fixture is shared)
@pytest.fixture(scope="module", autouse=True)
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.pg_dsn)
    await create_user(p, VIEWER, PASSWORD, "viewer")
    await create_user(p, WALL, PASSWORD, "viewer")
    yield p
    await p.close()



@pytest.fixture(scope="module")
async def map_alerts(pool: asyncpg.Pool) -> AsyncIterator[dict[str, str]]:
    """Active alerts as the alerts service stores them: a major one, an offline sensor,
    and an offline sensor that also has a critical alert (the worse one shows)."""
    def sig(s: Sensor, rule: str, severity: str) -> Signal:
        return Signal(kind=SignalKind.RAISE, rule_id=rule, source=s.sensor_id, at_ms=now_ms(),
                      severity=severity, title=f"map test {RUN}", sensor_id=s.sensor_id,
                      domain=s.domain, district=s.district, landmark=s.landmark,
                      lat=s.lat, lon=s.lon)

    changes = await AlertStore(pool).apply([
        sig(MAJOR, f"map_major_{RUN}", "major"), sig(MAJOR, f"map_info_{RUN}", "info"),
        sig(OFFLINE, "sensor_offline", "warning"),
        sig(CRITICAL, "sensor_offline", "warning"), sig(CRITICAL, f"map_crit_{RUN}", "critical")])
    yield {MAJOR.sensor_id: "major", OFFLINE.sensor_id: "offline",
           CRITICAL.sensor_id: "critical"}
    await pool.execute("update alerts set state = 'cleared', cleared_at = now() "
                       "where alert_id = any($1::bigint[])", [c.alert.alert_id for c in changes])


@contextlib.asynccontextmanager
async def chromium(playwright: Playwright, width: int, height: int
                   ) -> AsyncIterator[BrowserContext]:
    """A fresh Chromium profile; HOME/TMPDIR kept inside a throwaway folder."""
    with tempfile.TemporaryDirectory(prefix="cityops-chromium-") as home:
        ctx = await playwright.chromium.launch_persistent_context(
            str(Path(home) / "profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, env={"HOME": home, "TMPDIR": home},
            viewport={"width": width, "height": height})
        try:
            yield ctx
        finally:
            await ctx.close()


@contextlib.asynccontextmanager
async def logged_in(console: ConsoleServer, user: str = VIEWER
                    ) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=console.url, timeout=15) as c:
        r = await c.post("/api/login", json={"username": user, "password": PASSWORD})
        assert r.status_code == 200, r.text
        yield c


def page_errors(page: Page) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


# --- GET /api/map/sensors -----------------------------------------------------------------------
async def test_map_sensors_are_the_fleet_with_their_worst_state(
        console: ConsoleServer, pool: asyncpg.Pool, map_alerts: dict[str, str]) -> None:
    async with logged_in(console) as c:
        deadline = time.monotonic() + 15  # answers are cached for 5 s
        while True:
            r = await c.get("/api/map/sensors")
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            body = r.json()
            states = {f["properties"]["sensor_id"]: f["properties"]["state"]
                      for f in body["features"]}
            if all(states.get(s) == v for s, v in map_alerts.items()):
                break
            assert time.monotonic() < deadline, {s: states.get(s) for s in map_alerts}
            await asyncio.sleep(0.5)
        SensorCollection.model_validate(body)
        assert body["type"] == "FeatureCollection"
        assert len(body["features"]) == len(FLEET)
        for f, s in zip(body["features"], FLEET, strict=True):
            assert f["geometry"] == {"type": "Point", "coordinates": [s.lon, s.lat]}
            assert {k: f["properties"][k] for k in ("sensor_id", "domain", "type", "district",
                                                    "landmark")} == {
                "sensor_id": s.sensor_id, "domain": s.domain, "type": s.type,
                "district": s.district, "landmark": s.landmark}
        active = {r["sensor_id"] for r in await pool.fetch(
            "select sensor_id from alerts where state = 'active' and sensor_id is not null")}
        assert {st for sid, st in states.items() if sid not in active} == {"ok"}
        schema = (await c.get("/openapi.json")).json()
        for path, model in (("/api/map/sensors", "SensorCollection"),
                            ("/api/wall/summary", "WallSummary")):
            ref = schema["paths"][path]["get"]["responses"]["200"]["content"][
                "application/json"]["schema"]["$ref"]
            assert ref.endswith(f"/{model}")
    async with httpx.AsyncClient(base_url=console.url) as anon:
        assert (await anon.get("/api/map/sensors")).status_code == 401
        assert (await anon.get("/api/wall/summary")).status_code == 401
        r = await anon.get("/wall", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/wall"


# --- GET /api/wall/summary against inserted rows -----------------------------------------------
async def upsert_rollups(pool: asyncpg.Pool, window: str,
                         rows: list[tuple[datetime, str, str, str, float, float, float]]) -> None:
    """district_rollup_<window> rows (bucket, district, domain, metric, n, sum, max)."""
    await pool.executemany(
        f"insert into district_rollup_{window} (bucket, district, domain, metric, n, sum, min, "
        "max, mean, p95) values ($1, $2, $3, $4, $5::bigint, $6::float8, 0, $7::float8, "
        "$6::float8 / $5::bigint, $7::float8) "
        "on conflict (district, domain, metric, bucket) do update set n = excluded.n, "
        "sum = excluded.sum, max = excluded.max, mean = excluded.mean", rows)


async def open_incidents(pool: asyncpg.Pool, specs: list[tuple[str, str, float | None]],
                         tag: str) -> list[int]:
    """alert_incidents rows (severity, state, lat) as the incident workers open them."""
    ids = []
    for i, (severity, state, lat) in enumerate(specs):
        ids.append(await pool.fetchval(
            "insert into alert_incidents (group_key, rule_id, state, severity, title, "
            "title_args, district, landmark, lat, lon, alert_count, active_count, "
            "sensor_count) values ($1, 'speed_drop', $2, $3, $4, $5::jsonb, 'ninh_kieu', "
            "'street_30_4', $6, $7, 2, 2, 2) returning incident_id",
            f"map-{tag}-{RUN}-{i}", state, severity, f"Test incident {i}",
            json.dumps({"landmark": "street_30_4", "district": "ninh_kieu"}), lat,
            None if lat is None else 105.779 + i * 0.003))
    return ids


async def summary(console: ConsoleServer, at: datetime | None = None) -> dict[str, Any]:
    async with logged_in(console) as c:
        params = {} if at is None else {"at": int(at.timestamp() * 1000)}
        r = await c.get("/api/wall/summary", params=params)
        assert r.status_code == 200, r.text
        WallSummary.model_validate(r.json())
        return r.json()  # type: ignore[no-any-return]


async def test_wall_summary_numbers_match_the_rows(console: ConsoleServer,
                                                   pool: asyncpg.Pool) -> None:
    # a morning long ago, so no other test's rollups are in its hour
    at = datetime(2001, 3, 4, 10, 30, 20, tzinfo=TZ)
    hour = datetime(2001, 3, 4, 10, 0, tzinfo=TZ).astimezone(UTC)
    minute = timedelta(minutes=1)
    rows = []
    for i in range(30):  # 10:00 .. 10:29: Ninh Kieu 120 veh/min at 25 km/h, Cai Rang 60 at 40
        b = hour + i * minute
        rows += [(b, "ninh_kieu", "traffic", "flow", 4, 120, 40),
                 (b, "ninh_kieu", "traffic", "speed_kmh", 4, 100, 30),
                 (b, "cai_rang", "traffic", "flow", 2, 60, 35),
                 (b, "cai_rang", "traffic", "speed_kmh", 2, 80, 45)]
    rows += [(hour - minute, "ninh_kieu", "traffic", "flow", 4, 90, 30),  # the hour before
             (hour + 30 * minute, "ninh_kieu", "traffic", "flow", 4, 9999, 9999)]  # still open
    await upsert_rollups(pool, "1m", rows)
    # usual: 100 veh/min at 20 km/h in Ninh Kieu on the three days before; Cai Rang: none
    history = [(hour - timedelta(days=k), "ninh_kieu", "traffic", metric, n, total, 0)
               for k in (1, 2, 3)
               for metric, n, total in (("flow", 240, 6000), ("speed_kmh", 200, 4000))]
    history.append((hour - timedelta(days=9), "ninh_kieu", "traffic", "flow", 1, 1e7, 0))
    await upsert_rollups(pool, "1h", history)

    before = (await summary(console, at))["incidents"]
    mine = await open_incidents(pool, [("critical", "open", None), ("critical", "open", None),
                                       ("major", "open", None), ("minor", "resolved", None),
                                       ("warning", "open", None)], "count")
    await pool.execute("update alert_incidents set inhibited_by = $1 where incident_id = $2",
                       mine[0], mine[4])
    # crowds: cameras where density is the measure, gate counters where people inside is
    now = datetime.now(UTC)
    cams = [Sensor(f"t{RUN}-cv{i}", "security", "cctv", "guardeye", "ninh_kieu", "city_hall",
                   10.0355, 105.786, 30) for i in range(2)]
    for cam, density in zip(cams, (6.5, 3.0), strict=True):
        await seed_readings(pool, cam, [(now - timedelta(seconds=30), "crowd_density", density)])
    gates = [Sensor(f"t{RUN}-ff{i}", "tourism", "footfall_counter", "visitcount", "phong_dien",
                    "truc_lam", 9.9917, 105.701, 60) for i in range(2)]
    for gate in gates:
        await seed_readings(pool, gate, [
            (now - timedelta(minutes=m, seconds=5), metric, value)
            for m in range(60) for metric, value in (("footfall_in", 10), ("footfall_out", 4))])
        # entries before the window do not count
        await seed_readings(pool, gate, [(now - timedelta(hours=3, minutes=5), "footfall_in",
                                          5000)], latest=False)
    try:
        got = await summary(console, at)
        # incidents: open and not inhibited, by severity
        after = got["incidents"]
        assert {k: after[k] - before[k] for k in after} == {
            "critical": 2, "major": 1, "minor": 0, "warning": 0, "info": 0, "total": 3}

        tr = got["traffic"]
        assert tr["hour"] == 10 and got["at"] == int(at.timestamp() * 1000)
        assert tr["window_start"] == int(hour.timestamp() * 1000)
        assert tr["window_end"] == int((hour + 30 * minute).timestamp() * 1000)
        nk = next(d for d in tr["districts"] if d["district"] == "ninh_kieu")
        assert nk["minutes"] == 30 and nk["history_days"] == 3
        assert nk["flow_per_min"] == pytest.approx(120) and nk["usual_flow_per_min"] == \
            pytest.approx(100) and nk["flow_ratio"] == pytest.approx(1.2)
        assert nk["speed_kmh"] == pytest.approx(25) and nk["usual_speed_kmh"] == \
            pytest.approx(20) and nk["speed_ratio"] == pytest.approx(1.25)
        cr = next(d for d in tr["districts"] if d["district"] == "cai_rang")
        assert cr["flow_per_min"] == pytest.approx(60) and cr["speed_kmh"] == pytest.approx(40)
        assert cr["history_days"] == 0 and cr["usual_flow_per_min"] is None
        assert cr["flow_ratio"] is None and cr["speed_ratio"] is None  # "no history yet"
        others = [d for d in tr["districts"] if d["district"] not in ("ninh_kieu", "cai_rang")]
        assert len(others) == 7
        assert all(d["flow_per_min"] is None and d["history_days"] == 0 for d in others)
        city = tr["city"]
        assert city["flow_per_min"] == pytest.approx(180)  # the whole city
        assert city["usual_flow_per_min"] == pytest.approx(100)  # where there is history
        assert city["flow_ratio"] == pytest.approx(1.2)  # compared where there is history
        assert city["speed_kmh"] == pytest.approx(30) and city["speed_ratio"] == \
            pytest.approx(1.25)
        assert city["history_days"] == 3

        # the charts: 07:30 .. 10:29, a point a minute; traffic summed across districts
        charts = {c["domain"]: c for c in got["charts"]}
        assert set(charts) == {"traffic", "security", "tourism"}
        t = charts["traffic"]["t"]
        assert len(t) == 180 and t[-1] == int((hour + 29 * minute).timestamp())
        flow = next(s for s in charts["traffic"]["series"] if s["metric"] == "flow")
        speed = next(s for s in charts["traffic"]["series"] if s["metric"] == "speed_kmh")
        assert [v for v in flow["values"] if v is not None] == [90] + [180] * 30
        assert speed["values"][-1] == pytest.approx(30)
        assert all(v is None for s in charts["security"]["series"] for v in s["values"])

        # crowds: the densest fresh view against 2.0 p/m2; entries - exits over 3 h (2,500)
        crowds = {c["landmark"]: c for c in got["crowds"]}
        assert set(crowds) == {lm.code for lm in LANDMARKS if lm.capacity}
        hall = crowds["city_hall"]
        assert hall["unit"] == "p/m2" and hall["capacity"] == 2.0
        assert hall["value"] == pytest.approx(6.5) and hall["ratio"] == pytest.approx(3.25)
        assert hall["sensors"] >= 2 and hall["updated_at"] is not None
        truc = crowds["truc_lam"]
        assert truc["unit"] == "people" and truc["capacity"] == 2500
        if truc["sensors"] == 2:  # only this test's gates report there
            assert truc["value"] == pytest.approx(2 * 60 * (10 - 4))
            assert truc["ratio"] == pytest.approx(720 / 2500)
        # the cache: the current answer is built once per 5 s, an explicit time is not cached
        a, b = await summary(console), await summary(console)
        assert a["generated_at"] == b["generated_at"]
    finally:
        await pool.execute("update alert_incidents set state = 'resolved', resolved_at = now() "
                           "where incident_id = any($1::bigint[])", mine)


# --- the map in Chromium ------------------------------------------------------------------------
MAP_HARNESS = """async () => {
  document.body.innerHTML = '<div id="m" style="width:1200px;height:800px"></div>';
  const i18n = await import('/static/i18n.js');
  await i18n.initI18n('en');
  window.i18n = i18n;
  const { createCityMap } = await import('/static/map.js');
  window.opened = [];
  window.cm = await createCityMap(document.getElementById('m'),
    { preserveDrawingBuffer: true, onIncident: (id) => window.opened.push(id) });
  // settled (loaded and still for 150 ms: a source's new data lands a frame or two after
  // setData resolves), then one more frame drawn
  window.idle = async () => {
    for (let i = 0, still = 0; i < 200 && still < 3; i += 1) {
      await new Promise((r) => setTimeout(r, 50));
      still = cm.map.loaded() && !cm.map.isMoving() ? still + 1 : 0;
    }
    await new Promise((r) => { cm.map.once('idle', r); cm.map.triggerRepaint(); });
  };
  window.pixels = () => {
    const c = cm.map.getCanvas();
    const cv = document.createElement('canvas');
    cv.width = c.width; cv.height = c.height;
    const ctx = cv.getContext('2d');
    ctx.drawImage(c, 0, 0);
    return { ratio: c.width / c.clientWidth, data: ctx.getImageData(0, 0, c.width, c.height) };
  };
  window.pixelAt = (lng, lat) => {
    const { ratio, data } = pixels();
    const p = cm.map.project([lng, lat]);
    const i = (Math.round(p.y * ratio) * data.width + Math.round(p.x * ratio)) * 4;
    return Array.from(data.data.slice(i, i + 3));
  };
  const n = await cm.refreshSensors();
  await idle();
  return n;
}"""


def close(rgb: list[int], want: tuple[int, int, int], tol: int = 14) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(rgb, want, strict=True))


@pytest.mark.browser
async def test_map_renders_the_city_sensors_by_state_and_incidents(
        playwright: Playwright, console: ConsoleServer, map_alerts: dict[str, str],
        artifacts: Path) -> None:
    async with chromium(playwright, 1300, 900) as ctx:
        page = await ctx.new_page()
        errors = page_errors(page)
        r = await ctx.request.post(console.url + "/api/login",
                                   data={"username": VIEWER, "password": PASSWORD})
        assert r.status == 200
        await page.goto(console.url + "/login")  # any page of the console's origin
        assert await page.evaluate(MAP_HARNESS) == len(FLEET)
        await page.wait_for_function("cm.map.loaded()")
        data = await page.evaluate("cm.map.getSource('cityops-sensors').getData()")
        assert len(data["features"]) == len(FLEET)
        codes = await page.evaluate("""[...new Set(cm.map.queryRenderedFeatures(
            {layers: ['cityops-districts-fill']}).map((f) => f.properties.code))].sort()""")
        assert len(codes) == 9 and "ninh_kieu" in codes
        # not blank: many colours, little background, land where Co Do is, water on the Hau
        stats = await page.evaluate("""() => {
            const { data } = pixels(); const seen = new Set(); let bg = 0, n = 0;
            for (let y = 0; y < data.height; y += 9) for (let x = 0; x < data.width; x += 9) {
              const i = (y * data.width + x) * 4; n += 1;
              seen.add(data.data.slice(i, i + 3).join(','));
              const [r, g, b] = data.data.slice(i, i + 3);
              if (r === 14 && g === 19 && b === 23) bg += 1;
            }
            return { colours: seen.size, background: bg / n };
        }""")
        assert stats["colours"] >= 8 and stats["background"] < 0.7, stats
        land = await page.evaluate("pixelAt(105.44, 10.13)")  # Co Do, clear of its sensors
        assert close(land, (0x1F, 0x2A, 0x22), 6) or close(land, (0x24, 0x30, 0x28), 6), land
        water = await page.evaluate("pixelAt(105.603, 10.2175)")  # mid-river off Thot Not
        assert water[2] > water[0] + 40, water
        await page.screenshot(path=str(artifacts / "map-city.png"))

        # a cluster takes its worst member's colour: Thoi Lai's two sensors, one critical
        worst = await page.evaluate("""([lng, lat]) => {
            const p = cm.map.project([lng, lat]);
            const near = cm.map.queryRenderedFeatures([[p.x - 30, p.y - 30], [p.x + 30, p.y + 30]],
              {layers: ['cityops-clusters', 'cityops-sensors']});
            return near.map((f) => f.properties.worst ?? f.properties.state);
        }""", [CRITICAL.lon, CRITICAL.lat])
        assert 0 in worst or "critical" in worst, worst
        # close up, a sensor is drawn in its state's colour
        for sensor, state in ((MAJOR, "major"), (CRITICAL, "critical")):
            await page.evaluate("""async ([lng, lat]) => {
                cm.map.jumpTo({ center: [lng, lat], zoom: 16.5 }); await idle(); }""",
                                [sensor.lon, sensor.lat])
            rgb = await page.evaluate("([lng, lat]) => pixelAt(lng, lat)",
                                      [sensor.lon, sensor.lat])
            assert close(rgb, COLORS[state]), (state, rgb)
            props = await page.evaluate("""([lng, lat]) => cm.map.queryRenderedFeatures(
                cm.map.project([lng, lat]), {layers: ['cityops-sensors']})
                .map((f) => [f.properties.sensor_id, f.properties.state])""",
                                        [sensor.lon, sensor.lat])
            assert [sensor.sensor_id, state] in props
        await page.screenshot(path=str(artifacts / "map-sensor-critical.png"))

        # incidents: markers sized by severity, a click opens the incident
        await page.evaluate("""async () => { cm.fitCity({ animate: false });
          cm.setIncidents([
            { incident_id: 11, rule_id: 'speed_drop', severity: 'info', state: 'open', title: 'i',
              title_args: {}, lat: 10.06, lon: 105.56, district: 'thoi_lai', landmark: '' },
            { incident_id: 12, rule_id: 'crowd_surge', severity: 'critical', state: 'open',
              title: 'Crowd', title_args: { landmark: 'night_market' }, lat: 10.0322,
              lon: 105.7869, district: 'ninh_kieu', landmark: 'night_market' },
            { incident_id: 13, rule_id: 'speed_drop', severity: 'major', state: 'open', title: 'j',
              title_args: {}, lat: null, lon: null, district: 'o_mon', landmark: 'o_mon_center' },
          ]); await idle(); }""")
        markers = page.locator(".cityops-incident")
        await expect(markers).to_have_count(3)
        size = {}
        for sev in ("critical", "major", "info"):
            box = await page.locator(f".cityops-incident.sev-{sev}").bounding_box()
            assert box is not None
            size[sev] = box["width"]
        assert size["critical"] > size["major"] > size["info"], size
        assert (await page.locator(".cityops-incident.sev-critical").get_attribute(
            "aria-label") or "").startswith("critical incident: Crowd surge at Ninh Kieu night")
        await page.locator(".cityops-incident.sev-critical").click()
        assert await page.evaluate("window.opened") == [12]
        # the districts with incidents are tinted by the worst
        assert await page.evaluate("cm.map.getFeatureState({source: 'cityops-districts', "
                                   "id: 'ninh_kieu'}).incident") == "critical"
        # labels follow the language
        label = page.locator('.cityops-label.district[data-district="ninh_kieu"]')
        await expect(label).to_have_text("Ninh Kieu")
        await page.evaluate("i18n.setLang('vi', { remember: false })")
        await expect(label).to_have_text("Ninh Kiều")
        # focusDistrict zooms in and outlines it
        await page.evaluate("async () => { cm.focusDistrict('o_mon', { animate: false }); "
                            "await idle(); }")
        assert await page.evaluate("cm.map.getFeatureState({source: 'cityops-districts', "
                                   "id: 'o_mon'}).focus") is True
        assert await page.evaluate("cm.map.getZoom()") > 11
        await page.screenshot(path=str(artifacts / "map-incidents-o-mon.png"))
        assert errors == []


@pytest.mark.browser
async def test_map_on_a_base_style_puts_the_citys_layers_on_top(
        playwright: Playwright, console: ConsoleServer) -> None:
    """With console_map_style_url set (the city's tile server), that style is the base: a
    stand-in style here (a blob URL: still no network)."""
    async with chromium(playwright, 800, 600) as ctx:
        page = await ctx.new_page()
        errors = page_errors(page)
        r = await ctx.request.post(console.url + "/api/login",
                                   data={"username": VIEWER, "password": PASSWORD})
        assert r.status == 200
        await page.goto(console.url + "/login")
        layers = await page.evaluate("""async () => {
          document.body.innerHTML = '<div id="m" style="width:700px;height:500px"></div>';
          const i18n = await import('/static/i18n.js');
          await i18n.initI18n('en');
          const { createCityMap } = await import('/static/map.js');
          const style = { version: 8, sources: {}, layers: [{ id: 'tiles-stand-in',
            type: 'background', paint: { 'background-color': '#203040' } }] };
          const styleUrl = URL.createObjectURL(new Blob([JSON.stringify(style)],
                                                        { type: 'application/json' }));
          const cm = await createCityMap(document.getElementById('m'), { styleUrl });
          return cm.map.getStyle().layers.map((l) => l.id);
        }""")
        assert layers[0] == "tiles-stand-in"  # the base first, ours on top
        assert {"cityops-districts-fill", "cityops-arterials", "cityops-sensors",
                "cityops-clusters"} <= set(layers)
        assert "cityops-river" not in layers and "cityops-roads" not in layers  # the base's
        assert errors == []


# --- the wall --------------------------------------------------------------------------------
async def seed_wall(pool: asyncpg.Pool) -> None:
    """Three hours of district rollups up to now, a week of this hour before, crowds and
    incidents: what a running city gives the wall."""
    now = datetime.now(UTC)
    end = now.replace(second=0, microsecond=0)
    codes = ["ninh_kieu", "cai_rang", "binh_thuy", "o_mon", "thot_not", "phong_dien", "co_do",
             "thoi_lai", "vinh_thanh"]
    rows = []
    for m in range(1, 181):
        b = end - timedelta(minutes=m)
        wave = 1 + 0.3 * math.sin(m / 25)
        for i, d in enumerate(codes):
            size = 9 - i
            rows += [(b, d, "traffic", "flow", size * 2, size * 40 * wave, 60),
                     (b, d, "traffic", "speed_kmh", size * 2, size * 2 * (30 - 6 * wave), 60)]
        rows += [(b, "ninh_kieu", "security", "crowd_density", 16, 16 * 1.1 * wave, 2.2 * wave),
                 (b, "ninh_kieu", "tourism", "footfall_in", 10, 300 * wave, 40),
                 (b, "ninh_kieu", "tourism", "footfall_out", 10, 250 * wave, 40)]
    await upsert_rollups(pool, "1m", rows)
    hour = now.astimezone(TZ).replace(minute=0, second=0, microsecond=0)
    history = []
    for k in range(1, 8):
        b = (hour.replace(tzinfo=None) - timedelta(days=k)).replace(tzinfo=TZ).astimezone(UTC)
        for i, d in enumerate(codes):
            if d in ("co_do", "thoi_lai"):  # their detectors are new: no history yet
                continue
            size = 9 - i
            history += [(b, d, "traffic", "flow", size * 120, size * 60 * 36 * (1 + i / 10), 60),
                        (b, d, "traffic", "speed_kmh", size * 120, size * 120 * 24, 60)]
    await upsert_rollups(pool, "1h", history)
    for lm, dist, density in (("ninh_kieu_wharf", "ninh_kieu", 1.3),
                              ("night_market", "ninh_kieu", 2.4),
                              ("airport", "binh_thuy", 0.9)):
        cam = Sensor(f"t{RUN}-w-{lm}", "security", "cctv", "guardeye", dist, lm, 10.0, 105.7, 30)
        await seed_readings(pool, cam, [(now - timedelta(seconds=20), "crowd_density", density)])
    await open_incidents(pool, [("critical", "open", 10.0322), ("major", "open", 10.045),
                                ("major", "open", 10.02), ("warning", "open", 10.01)], "wall")


@pytest.mark.browser
async def test_wall_at_1920x1080_renders_every_tile_and_passes_axe(
        playwright: Playwright, console: ConsoleServer, pool: asyncpg.Pool,
        artifacts: Path) -> None:
    await seed_wall(pool)
    try:
        async with chromium(playwright, 1920, 1080) as ctx:
            page = await ctx.new_page()
            errors = page_errors(page)
            # no session: the login page, then back to the wall
            await page.goto(console.url + "/wall")
            await expect(page).to_have_url(console.url + "/login?next=/wall")
            await page.fill("#username", WALL)
            await page.fill("#password", PASSWORD)
            await page.click("#login-button")
            await expect(page).to_have_url(console.url + "/wall")
            await expect(page.locator("body")).to_have_attribute("data-ready", "true",
                                                                 timeout=30_000)
            assert await page.evaluate("wall.map.map.loaded()")
            # every tile
            counts = page.locator("#incident-counts li")
            await expect(counts).to_have_count(5)
            critical = int(await page.locator('#incident-counts li[data-severity="critical"]')
                           .get_attribute("data-count") or 0)
            assert critical >= 1
            await expect(page.locator("#traffic-districts tbody tr")).to_have_count(9)
            nk = page.locator('#traffic-districts tr[data-district="ninh_kieu"]')
            assert float(await nk.get_attribute("data-flow-ratio") or 0) > 0
            await expect(page.locator('#traffic-districts tr[data-district="co_do"]')
                         ).to_have_attribute("data-history-days", "0")
            assert float(await page.locator("#traffic-city").get_attribute("data-flow-ratio")
                         or 0) > 0
            await expect(page.locator("#crowd-list li")).to_have_count(
                sum(1 for lm in LANDMARKS if lm.capacity))
            assert float(await page.locator('#crowd-list li[data-landmark="night_market"]')
                         .get_attribute("data-ratio") or 0) == pytest.approx(2.4 / 2.5)
            # the charts (uPlot), each with three hours of minutes
            await expect(page.locator(".chart .uplot canvas")).to_have_count(3)
            traffic = page.locator('.chart[data-domain="traffic"]')
            await expect(traffic).to_have_attribute("data-points", "180")
            assert int(await traffic.get_attribute("data-values") or 0) >= 2 * 170
            # the map: the open incidents, and the tour's first stop (the whole city)
            assert await page.locator(".cityops-incident").count() >= 4
            await expect(page.locator("#wall-focus")).to_have_text("Toàn thành phố")
            await expect(page.locator("#wall-status")).to_have_attribute("data-state", "live")
            # fits the screen: nothing scrolls
            assert await page.evaluate("document.documentElement.scrollHeight") <= 1080
            assert await page.evaluate("document.documentElement.scrollWidth") <= 1920
            await page.screenshot(path=str(artifacts / "wall-1920x1080.png"))
            # the tour moves on to a district, its name large
            await page.evaluate("wall.rotate()")
            await expect(page.locator("#wall-focus")).to_have_text("Ninh Kiều")
            await expect(page.locator('#traffic-districts tr[data-district="ninh_kieu"]')
                         ).to_have_class("focus")
            # it updates itself: a new critical incident shows within a poll (15 s)
            await open_incidents(pool, [("critical", "open", 10.03)], "wall-late")
            await expect(page.locator('#incident-counts li[data-severity="critical"]')
                         ).to_have_attribute("data-count", str(critical + 1), timeout=25_000)
            # accessibility: axe-core finds nothing serious or critical
            await page.add_script_tag(path=str(AXE))
            result = await page.evaluate("axe.run()")
            bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
                   for v in result["violations"] if v["impact"] in ("serious", "critical")]
            assert bad == []
            assert errors == []
    finally:
        await pool.execute("update alert_incidents set state = 'resolved', resolved_at = now() "
                           "where group_key like $1", f"map-wall%-{RUN}-%")


def test_map_and_wall_catalogs_have_the_same_keys_in_every_language() -> None:
    def keys(node: Any, prefix: str = "") -> set[str]:
        return {k for name, v in node.items() for k in (
            keys(v, f"{prefix}{name}.") if isinstance(v, dict) else {prefix + name})}

    for ns in ("map", "wall"):
        vi, en = (json.loads((PROJECT_ROOT / "alerts" / "i18n" / lang / f"{ns}.json")
                             .read_text(encoding="utf-8")) for lang in ("vi", "en"))
        assert keys(vi) == keys(en), ns
