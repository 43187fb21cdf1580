"""The console in a real headless Chromium: log in, watch an alert's incident arrive live,
act on it, look at a sensor, set a maintenance window.

Everything is real: the alerts service consumes a scripted event from Kafka, stores the
alert and its incident in PostgreSQL, publishes them; the console streams them to the page
over SSE. The incident pages, both languages, accessibility and notifications are in
tests/test_console_incidents_browser.py. Screenshots land in tests/artifacts/ for a human
to look at.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from playwright.async_api import BrowserContext, Playwright, expect

from alerts.console.auth import create_user
from alerts.store import create_pool
from alerts.testing import ConsoleServer, EventProducer, RunningService, make_event, now_ms
from cityops.registry import load_fleet
from cityops.settings import Settings
from tests.browser import chromium, sign_in

pytestmark = pytest.mark.browser
RUN = uuid.uuid4().hex[:6]
USERS = {"viewer": f"viewer-{RUN}", "operator": f"operator-{RUN}",
         "supervisor": f"supervisor-{RUN}"}
PASSWORD = "browser-pass-1"
FLEET = load_fleet(Settings().fleet_file)
JAM = next(s for s in FLEET if s.landmark == "street_30_4" and s.domain == "traffic")


# autouse: the users it creates exist before any test logs in (the console fixture is shared)
@pytest.fixture(scope="module", autouse=True)
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.pg_dsn)
    for role, name in USERS.items():
        await create_user(p, name, PASSWORD, role)
    yield p
    await p.close()



@pytest.fixture(scope="module")
async def alerts_service(settings: Settings,
                         tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[None]:
    rules = tmp_path_factory.mktemp("browser-rules") / "rules.yaml"
    rules.write_text(f"""
rules:
  - id: browser_jam
    type: threshold
    severity: major
    title: "Jam on {{landmark_name}} {RUN}"
    match: {{sensors: [{JAM.sensor_id}]}}
    metric: speed_kmh
    op: "<"
    value: 10
    clear_value: 18
""")
    svc = RunningService(settings, rules, f"browser-{RUN}", update_every_s=0.0, tick_s=0.2)
    await svc.start()
    yield
    await svc.stop()


@pytest.fixture
async def context(playwright: Playwright) -> AsyncIterator[BrowserContext]:
    """A fresh Chromium profile per test (tests/browser.py)."""
    async with chromium(playwright) as ctx:
        yield ctx


async def test_login_rejects_wrong_password(context: BrowserContext,
                                            console: ConsoleServer) -> None:
    page = context.pages[0] if context.pages else await context.new_page()
    await sign_in(page, console, USERS["operator"], "not-the-password")
    await expect(page.locator("#login-error")).to_have_text("Sai tên đăng nhập hoặc mật khẩu.")
    await expect(page).to_have_url(console.url + "/login")
    assert not [c for c in await context.cookies() if c["name"] == "cityops_session"]


async def test_operator_sees_incident_live_and_acknowledges(
        context: BrowserContext, console: ConsoleServer, alerts_service: None,
        settings: Settings, pool: asyncpg.Pool, artifacts: Path) -> None:
    page = context.pages[0] if context.pages else await context.new_page()
    await sign_in(page, console, USERS["operator"], PASSWORD)
    await expect(page).to_have_url(console.url + "/")
    await expect(page.locator("#me")).to_have_text(f"{USERS['operator']} (vận hành)")
    await expect(page.locator("#live")).to_have_class("live on")
    await expect(page.locator("#map")).to_have_attribute("data-map", "city")  # map.js drew it
    # the rule is not in the console's rules file: the server's English title is shown
    title = f"Jam on 30/4 street {RUN}"
    item = page.locator("li.incident", has_text=title)
    await expect(item).to_have_count(0)
    # a slow reading goes through Kafka, the rules and PostgreSQL to this open page
    async with EventProducer(settings) as prod:
        await prod.send(make_event(JAM.sensor_id, now_ms(), landmark=JAM.landmark,
                                   lat=JAM.lat, lon=JAM.lon, speed_kmh=4))
    await expect(item).to_have_count(1, timeout=15_000)
    await expect(item.locator(".ack-state")).to_have_text("Chưa tiếp nhận")
    await expect(item.locator(".badge")).to_have_text("cao")
    await expect(item.locator(".counts-line")).to_have_text("1 cảnh báo · 1 cảm biến")
    # the incident is on the map, at its place, in its colour
    iid = int(await item.get_attribute("data-incident-id") or 0)
    await expect(page.locator(f'#map .cityops-incident[data-incident-id="{iid}"]')
                 ).to_have_attribute("data-severity", "major")
    await page.screenshot(path=str(artifacts / "console-1366x768.png"))
    await item.locator(".ack-btn").click()
    await expect(item.locator(".ack-state")).to_have_text(f"{USERS['operator']} đã tiếp nhận")
    await expect(item.locator(".ack-btn")).to_have_count(0)
    # the incident and its alert were acknowledged, with who did it
    row = await pool.fetchrow("select acknowledged, acked_by from alert_incidents "
                              "where incident_id = $1", iid)
    assert row["acknowledged"] and row["acked_by"] == USERS["operator"]
    row = await pool.fetchrow("select acknowledged, acked_by from alerts where incident_id = $1 "
                              "and sensor_id = $2", iid, JAM.sensor_id)
    assert row["acknowledged"] and row["acked_by"] == USERS["operator"]
    await page.click('button[data-view="center"]')  # the city center, then the whole city
    await expect(page.locator('button[data-view="center"]')).to_have_class(re.compile("active"))
    await page.locator("#map").screenshot(path=str(artifacts / "console-map-center.png"))
    await page.click('button[data-view="city"]')
    await expect(page.locator('button[data-view="city"]')).to_have_class(re.compile("active"))
    await page.locator("#map").screenshot(path=str(artifacts / "console-map-city.png"))
    # the same console on a phone
    phone = await context.new_page()
    await phone.set_viewport_size({"width": 390, "height": 844})
    await phone.goto(console.url + "/")
    await expect(phone.locator("li.incident", has_text=title)).to_be_visible()
    box = await phone.locator("li.incident", has_text=title).bounding_box()
    assert box is not None and box["width"] <= 390
    await phone.screenshot(path=str(artifacts / "console-phone.png"), full_page=True)


async def test_viewer_has_no_acknowledge_and_api_refuses(
        context: BrowserContext, console: ConsoleServer, alerts_service: None,
        settings: Settings) -> None:
    page = context.pages[0] if context.pages else await context.new_page()
    async with EventProducer(settings) as prod:  # make sure the incident exists
        await prod.send(make_event(JAM.sensor_id, now_ms(), landmark=JAM.landmark,
                                   lat=JAM.lat, lon=JAM.lon, speed_kmh=4))
    await sign_in(page, console, USERS["viewer"], PASSWORD)
    await expect(page.locator("#me")).to_have_text(f"{USERS['viewer']} (theo dõi)")
    item = page.locator("li.incident", has_text=f"Jam on 30/4 street {RUN}")
    await expect(item).to_have_count(1, timeout=15_000)
    await expect(page.locator("li.incident").first).to_be_visible()
    assert await page.locator("button.ack-btn, #duty:visible, #maint-open:visible").count() == 0
    iid = await item.get_attribute("data-incident-id")
    status = await page.evaluate("""async (iid) => {
        const me = await (await fetch('/api/me')).json();
        const r = await fetch(`/api/incidents/${iid}/acknowledge`, {method: 'POST',
            headers: {'X-CSRF-Token': me.csrf, 'Content-Type': 'application/json'}, body: '{}'});
        return [r.status, (await r.json()).detail];
    }""", iid)
    assert status == [403, "requires the operator role"]


async def test_sensor_page_latest_values_and_sparkline(
        context: BrowserContext, console: ConsoleServer, pool: asyncpg.Pool,
        artifacts: Path) -> None:
    from cityops.registry import Sensor
    from processors.testing import seed_readings

    # a sensor of this test only (the processors' tests own the fleet's rows)
    s = Sensor(f"t{RUN}-ld", "traffic", "lane_detector", "compact", "ninh_kieu", "street_3_2",
               10.03, 105.77, 60)
    t0 = now_ms() - 40 * 60_000
    await seed_readings(pool, s, [
        (datetime.fromtimestamp((t0 + 60_000 * i) / 1000, UTC), m, v)
        for i in range(40) for m, v in (("speed_kmh", 35 + 10 * ((i % 12) / 12) - i * 0.4),
                                        ("flow", 40.0 + (i * 7) % 23))])
    page = context.pages[0] if context.pages else await context.new_page()
    await sign_in(page, console, USERS["viewer"], PASSWORD)
    await expect(page).to_have_url(console.url + "/")
    await page.goto(f"{console.url}/sensor/{s.sensor_id}")
    await expect(page.locator("#sensor-title")).to_have_text(s.sensor_id)
    await expect(page.locator('td[data-metric="speed_kmh"] svg.spark')).to_have_attribute(
        "data-points", "40")
    await expect(page.locator('td[data-metric="flow"] svg.spark')).to_have_count(1)
    await page.screenshot(path=str(artifacts / "sensor-page.png"))


async def test_supervisor_comments_assigns_resolves_and_silences(
        context: BrowserContext, console: ConsoleServer, pool: asyncpg.Pool,
        artifacts: Path) -> None:
    from alerts.incidents.store import IncidentStore
    from alerts.model import Signal, SignalKind
    from alerts.store import AlertStore

    title = f"Door forced {RUN}"
    (change,) = [c for c in await AlertStore(pool, incidents=IncidentStore(pool)).apply([Signal(
        kind=SignalKind.RAISE, rule_id="browser_door", source=f"t{RUN}-door", at_ms=now_ms(),
        severity="critical", title=title, sensor_id=f"t{RUN}-door", domain="security",
        district="o_mon", landmark="o_mon_power")]) if c.action == "raised"]
    iid = await pool.fetchval("select incident_id from alerts where alert_id = $1",
                              change.alert.alert_id)
    page = context.pages[0] if context.pages else await context.new_page()
    await sign_in(page, console, USERS["supervisor"], PASSWORD)
    item = page.locator(f'li.incident[data-incident-id="{iid}"]')
    await expect(item.locator(".title")).to_have_text(f"{title} — O Mon power center")
    await item.locator(".title").click()
    await expect(page).to_have_url(f"{console.url}/incident/{iid}")
    await page.fill("#comment", "gate camera checked")
    await page.click("#act-comment")
    await expect(page.locator('#timeline li[data-action="commented"]')).to_have_count(1)
    await page.fill("#assignee", "team-b")
    await page.click("#act-assign")
    await expect(page.locator("#f-assignee")).to_have_text("team-b")
    await page.click("#act-resolve")
    await page.click("#resolve-confirm")
    await expect(page.locator("#inc-state")).to_have_attribute("data-state", "resolved")
    await page.goto(console.url + "/")
    await expect(page.locator("li.incident").first).to_be_visible()
    await expect(item).to_have_count(0)  # the open filter hides it
    await page.select_option("#f-state", "resolved")
    await expect(item.locator(".resolved")).to_be_visible()
    # the incident's actions reached its alert's trail too (a comment stays on the incident)
    trail = [(r["actor"], r["action"]) for r in await pool.fetch(
        "select actor, action from alert_audit where alert_id = $1 order by audit_id",
        change.alert.alert_id)]
    sup = USERS["supervisor"]
    assert trail == [("system", "raised"), (sup, "assigned"), (sup, "resolved")]
    assert await pool.fetchval("select state from alerts where alert_id = $1",
                               change.alert.alert_id) == "cleared"
    # a maintenance window for a district, from the console
    await page.click("#maint-open")
    await page.select_option("#m-scope", "district")
    await page.fill("#m-target", "co_do")
    await page.fill("#m-reason", f"fibre works {RUN}")
    await page.click("#m-add")
    await expect(page.locator("#maint-list tr", has_text=f"fibre works {RUN}")).to_have_count(1)
    await page.screenshot(path=str(artifacts / "console-maintenance.png"))
    assert await pool.fetchval("select count(*) from maintenance_windows where reason = $1",
                               f"fibre works {RUN}") == 1
