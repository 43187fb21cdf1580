"""The operators' console shows incidents, in Vietnamese and English, in a real headless
Chromium against the real stack.

Slow readings go through Kafka to the real alerts service (a rules file of this module:
a critical "traffic stopped" rule and a warning "slow traffic" rule it inhibits, grouped
by landmark), which stores the alerts and their incidents in PostgreSQL and publishes the
changes; the console streams them to the page. The sensors are this module's own (ids
with the run's tag, readings seeded like the processors store them), so nothing here
touches the fleet's rows. Screenshots land in tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from playwright.async_api import BrowserContext, Page, Playwright, expect

from alerts.console.auth import create_user
from alerts.store import create_pool
from alerts.testing import ConsoleServer, EventProducer, RunningService, make_event, now_ms
from cityops.registry import Sensor
from cityops.settings import Settings
from processors.testing import seed_readings
from tests.browser import axe_violations, chromium, first_page, sign_in, untranslated
from tests.support import free_port

pytestmark = pytest.mark.browser
RUN = uuid.uuid4().hex[:6]
USERS = {"viewer": f"viewer-{RUN}", "operator": f"operator-{RUN}",
         "supervisor": f"supervisor-{RUN}"}
PASSWORD = "browser-pass-1"
JAM, SLOW = f"ui_jam_{RUN}", f"ui_slow_{RUN}"
# what a page may fail to load: the city map (map.js, another part of the console) is loaded
# only if it is there
OPTIONAL = ("/static/map.js",)
MAP_DRAWN = re.compile(r"^(city|svg)$")  # map.js's map, or the server's SVG without it
SIZES = {"1366x768": (1366, 768), "1920x1080": (1920, 1080), "phone": (390, 844)}


def sensors(landmark: str, n: int, district: str = "ninh_kieu") -> list[Sensor]:
    tag = landmark.replace("_", "")
    return [Sensor(f"t{RUN}-{tag}-ld{i}", "traffic", "lane_detector", "compact", district,
                   landmark, 10.03 + i * 0.001, 105.77 + i * 0.001, 60) for i in range(n)]


STREET = sensors("street_30_4", 8)  # the incident most tests look at
AVENUE = sensors("hoa_binh", 2)  # acted on and resolved by the operator test
BRIDGE = sensors("nguyen_van_cu", 1)  # announced while an operator is on duty
LATER = sensors("street_3_2", 2)  # arrives while the list is open
ALL = STREET + AVENUE + BRIDGE + LATER


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ids = ", ".join(s.sensor_id for s in ALL)
    path = tmp_path_factory.mktemp("incident-rules") / "rules.yaml"
    path.write_text(f"""
rules:
  - id: {JAM}
    type: threshold
    severity: critical
    title: "Traffic stopped on {{landmark_name}} {RUN}"
    titles:
      vi: "Giao thông ngưng trệ trên {{landmark_name}} {RUN}"
      en: "Traffic stopped on {{landmark_name}} {RUN}"
    match: {{sensors: [{ids}]}}
    metric: speed_kmh
    op: "<"
    value: 10
    clear_value: 18
    group: {{by: [landmark], wait_s: 0, interval_s: 900}}
  - id: {SLOW}
    type: threshold
    severity: warning
    title: "Slow traffic on {{landmark_name}} {RUN}"
    titles:
      vi: "Giao thông chậm trên {{landmark_name}} {RUN}"
      en: "Slow traffic on {{landmark_name}} {RUN}"
    match: {{sensors: [{ids}]}}
    metric: speed_kmh
    op: "<"
    value: 30
    clear_value: 35
    group: {{by: [landmark], wait_s: 0, interval_s: 900}}
inhibit:
  - source: {{rules: [{JAM}]}}
    target: {{rules: [{SLOW}]}}
    equal: [landmark]
""")
    return path


@pytest.fixture(scope="module")
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.pg_dsn)
    for role, name in USERS.items():
        await create_user(p, name, PASSWORD, role)
    yield p
    await p.close()


@pytest.fixture(scope="module")
async def console(settings: Settings, pool: asyncpg.Pool,
                  rules_file: Path) -> AsyncIterator[ConsoleServer]:
    # the console reads the rules file for rule titles in each language
    srv = ConsoleServer(dataclasses.replace(settings, rules_file=rules_file), free_port())
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture(scope="module")
async def alerts_service(settings: Settings, rules_file: Path) -> AsyncIterator[None]:
    svc = RunningService(settings, rules_file, f"incidents-browser-{RUN}",
                         update_every_s=0.0, tick_s=0.2)
    await svc.start()
    yield
    await svc.stop()


@pytest.fixture
async def context(playwright: Playwright) -> AsyncIterator[BrowserContext]:
    """A fresh browser; the test fails on any script error of any of its pages."""
    async with chromium(playwright) as ctx:
        errors: list[str] = []

        def watch(page: Page) -> None:
            page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
            page.on("console", lambda m: errors.append(f"{page.url}: console: {m.text} "
                                                       f"({m.location.get('url')})")
                    if m.type == "error" and not m.location.get("url", "").endswith(OPTIONAL)
                    else None)

        for page in ctx.pages:
            watch(page)
        ctx.on("page", watch)
        yield ctx
        assert not errors, "\n".join(errors)


async def seed_series(pool: asyncpg.Pool, group: list[Sensor]) -> None:
    """Forty minutes of speeds falling to a standstill, as the processors store them."""
    t0 = now_ms() - 40 * 60_000
    for k, s in enumerate(group):
        await seed_readings(pool, s, [
            (datetime.fromtimestamp((t0 + 60_000 * i) / 1000, UTC), "speed_kmh",
             max(3.0, 42 - k - (i - 25) * 3.5 if i > 25 else 42 - k + (i % 5)))
            for i in range(40)])


async def jam(settings: Settings, pool: asyncpg.Pool, group: list[Sensor],
              timeout_s: float = 20) -> asyncpg.Record:
    """Readings of a standstill from every sensor of ``group``: one critical incident for
    their landmark (its 'slow traffic' incident inhibited under it). Returns its row."""
    async with EventProducer(settings) as prod:
        await prod.send(*[make_event(s.sensor_id, now_ms(), landmark=s.landmark, lat=s.lat,
                                     lon=s.lon, speed_kmh=4) for s in group])
    deadline = time.monotonic() + timeout_s
    while True:
        row = await pool.fetchrow(
            "select * from alert_incidents where rule_id = $1 and landmark = $2 and "
            "state = 'open'", JAM, group[0].landmark)
        if row is not None and row["alert_count"] == len(group):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"no incident of {len(group)} alerts on {group[0].landmark}: "
                                 f"{dict(row) if row else None}")
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def street(settings: Settings, pool: asyncpg.Pool, alerts_service: None,
                 console: ConsoleServer) -> asyncpg.Record:
    await seed_series(pool, STREET)
    return await jam(settings, pool, STREET)


async def no_axe_violations(page: Page) -> None:
    found = await axe_violations(page)
    assert not found, json.dumps(found, indent=1, ensure_ascii=False)


async def open_incident(page: Page, console: ConsoleServer, incident_id: int) -> None:
    await page.goto(f"{console.url}/incident/{incident_id}")
    await expect(page.locator("#inc-title")).not_to_be_empty()
    await expect(page.locator("#timeline li").first).to_be_visible()


# --- the list ---------------------------------------------------------------------------------
async def test_list_shows_one_item_per_incident_live(
        context: BrowserContext, console: ConsoleServer, street: asyncpg.Record,
        settings: Settings, pool: asyncpg.Pool) -> None:
    # the accident on 30/4 street of issue 16, as the incident store leaves it: 296 alerts of
    # the default rules' speed_drop collapsed by storm control into one incident
    storm = await pool.fetchval(
        "insert into alert_incidents (group_key, rule_id, severity, title, title_args, domain, "
        " district, landmark, alert_count, active_count, sensor_count, storm) values ($1, "
        " 'speed_drop', 'warning', 'Sudden speed changes — 30/4 street', $2, 'traffic', "
        " 'ninh_kieu', 'street_30_4', 296, 296, 296, true) returning incident_id",
        f"speed_drop|landmark=street_30_4|{RUN}",
        {"sensor_id": "street_30_4-ld-sa017", "landmark": "street_30_4",
         "place_field": "landmark"})
    page = await first_page(context)
    await sign_in(page, console, USERS["operator"], PASSWORD)
    await expect(page).to_have_url(console.url + "/")
    await expect(page.locator("#live")).to_have_class("live on")
    try:
        collapsed = page.locator(f'li.incident[data-incident-id="{storm}"]')
        await expect(collapsed.locator(".title")).to_have_text(
            "Tốc độ thay đổi đột ngột — Đường 30/4")
        await expect(collapsed.locator(".tag.storm")).to_have_text("bão cảnh báo")
        await expect(collapsed.locator(".counts-line")).to_have_text(
            "296 cảnh báo · 296 cảm biến")
        # one item per open incident on the operators' list, each once (other tests of the
        # session leave incidents of their own in the shared database)
        shown = await page.locator("li.incident").evaluate_all(
            "els => els.map(e => e.dataset.incidentId)")
        listed = await pool.fetchval("select count(*) from alert_incidents where state = "
                                     "'open' and inhibited_by is null")
        assert shown.count(str(storm)) == 1 and len(shown) == len(set(shown))
        assert len(shown) == min(listed, 500)
    finally:
        await pool.execute("update alert_incidents set state = 'resolved', resolved_at = now() "
                           "where incident_id = $1", storm)
    # Vietnamese by default: eight alerts of one street are one item
    item = page.locator(f'li.incident[data-incident-id="{street["incident_id"]}"]')
    await expect(item.locator(".title")).to_have_text(
        f"Giao thông ngưng trệ trên Đường 30/4 {RUN}")
    await expect(item.locator(".badge")).to_have_text("nghiêm trọng")
    await expect(item.locator(".counts-line")).to_have_text("8 cảnh báo · 8 cảm biến")
    await expect(item.locator(".ack-state")).to_have_text("Chưa tiếp nhận")
    # the 'slow traffic' incident of the same street is suppressed under it
    await expect(item.locator(".tag.inhibits")).to_have_text("ẩn 1 sự cố hệ quả")
    slow = await pool.fetchval("select incident_id from alert_incidents where rule_id = $1 "
                               "and landmark = 'street_30_4' and state = 'open'", SLOW)
    await expect(page.locator(f'li.incident[data-incident-id="{slow}"]')).to_have_count(0)
    await expect(page.locator('#counts .count[data-sev="critical"]')).to_contain_text(
        "nghiêm trọng")
    # a new incident arrives live, without a reload
    row = await jam(settings, pool, LATER)
    live = page.locator(f'li.incident[data-incident-id="{row["incident_id"]}"]')
    await expect(live).to_have_count(1, timeout=10_000)
    await expect(live.locator(".title")).to_have_text(
        f"Giao thông ngưng trệ trên Đường 3/2 {RUN}")
    # filters: severity and acknowledgement are applied in the page
    await page.select_option("#f-severity", "warning")
    await expect(item).to_have_count(0)
    await page.select_option("#f-severity", "")
    await page.select_option("#f-district", "cai_rang")
    await expect(item).to_have_count(0)
    await page.select_option("#f-district", "ninh_kieu")
    await expect(item).to_have_count(1)
    # without the city map (map.js missing, or no WebGL) the server's SVG map stands in,
    # its districts in the colour of their worst incident
    plain = await context.new_page()
    await plain.route("**/static/map.js", lambda route: route.abort())
    await plain.goto(console.url + "/")
    await expect(plain.locator("#map")).to_have_attribute("data-map", "svg")
    await expect(plain.locator('#map .district[data-district="ninh_kieu"]')).to_have_class(
        "district alert-critical")
    await expect(plain.locator('#map .district[data-district="ninh_kieu"] title')).to_have_text(
        "Ninh Kiều")
    await plain.close()
    # clicking the title opens the incident's page
    await item.locator(".title").click()
    await expect(page).to_have_url(f"{console.url}/incident/{street['incident_id']}")


# --- acting on an incident ----------------------------------------------------------------------
async def test_operator_acknowledges_assigns_comments_and_resolves(
        context: BrowserContext, console: ConsoleServer, alerts_service: None,
        settings: Settings, pool: asyncpg.Pool) -> None:
    row = await jam(settings, pool, AVENUE)
    iid = row["incident_id"]
    page = await first_page(context)
    await sign_in(page, console, USERS["operator"], PASSWORD)
    await expect(page).to_have_url(console.url + "/")
    await open_incident(page, console, iid)
    await expect(page.locator("#inc-title")).to_have_text(
        f"Giao thông ngưng trệ trên Đại lộ Hòa Bình {RUN}")
    await expect(page.locator("#inc-state")).to_have_text("đang mở")
    await expect(page.locator("#f-alerts")).to_have_text("2 đang hoạt động / 2")
    await expect(page.locator("#alerts tr")).to_have_count(2)
    op = USERS["operator"]

    await page.click("#act-ack")
    await expect(page.locator("#f-ack")).to_contain_text(op)
    await expect(page.locator("#act-ack")).to_be_hidden()
    await page.fill("#assignee", "tổ CSGT số 2")
    await page.click("#act-assign")
    await expect(page.locator("#f-assignee")).to_have_text("tổ CSGT số 2")
    await page.fill("#comment", "Đã điều xe cứu hộ đến hiện trường")
    await page.click("#act-comment")
    await expect(page.locator('#timeline li[data-action="commented"]')).to_contain_text(
        "Đã điều xe cứu hộ đến hiện trường")
    await page.click("#act-resolve")
    await expect(page.locator("#resolve-dialog")).to_be_visible()
    await page.fill("#resolve-note", "Đã thông xe")
    await page.click("#resolve-confirm")
    await expect(page.locator("#inc-state")).to_have_text("đã giải quyết")
    await expect(page.locator("#inc-actions")).to_be_hidden()
    await expect(page.locator("#f-alerts")).to_have_text("0 đang hoạt động / 2")
    # the timeline shows every action, by whom
    for action in ("acknowledged", "assigned", "commented", "resolved"):
        entry = page.locator(f'#timeline li.tl-incident[data-action="{action}"]')
        await expect(entry).to_have_count(1)
        await expect(entry.locator(".tl-actor")).to_have_text(op)
    await expect(page.locator('#timeline li.tl-alert[data-action="raised"]')).to_have_count(2)
    await expect(page.locator('#timeline li[data-action="resolved"] .tl-note')).to_have_text(
        "Đã thông xe")
    # ... and so does the stored audit trail
    trail = [(r["actor"], r["action"]) for r in await pool.fetch(
        "select actor, action from incident_audit where incident_id = $1 and actor = $2 "
        "order by audit_id", iid, op)]
    assert trail == [(op, "acknowledged"), (op, "assigned"), (op, "commented"),
                     (op, "resolved")]
    stored = await pool.fetchrow("select * from alert_incidents where incident_id = $1", iid)
    assert (stored["state"], stored["assignee"], stored["acked_by"], stored["active_count"]) \
        == ("resolved", "tổ CSGT số 2", op, 0)
    # resolved incidents are under their own filter on the list
    await page.goto(console.url + "/")
    item = page.locator(f'li.incident[data-incident-id="{iid}"]')
    await expect(page.locator("li.incident").first).to_be_visible()
    await expect(item).to_have_count(0)
    await page.select_option("#f-state", "resolved")
    await expect(item).to_have_count(1)
    await expect(item.locator(".assignee")).to_have_text("Giao cho tổ CSGT số 2")


async def test_viewer_has_no_actions_and_the_server_refuses_them(
        context: BrowserContext, console: ConsoleServer, street: asyncpg.Record) -> None:
    iid = street["incident_id"]
    page = await first_page(context)
    await sign_in(page, console, USERS["viewer"], PASSWORD)
    await expect(page).to_have_url(console.url + "/")
    await expect(page.locator(f'li.incident[data-incident-id="{iid}"]')).to_have_count(1)
    assert await page.locator("button.ack-btn").count() == 0
    await expect(page.locator("#duty")).to_be_hidden()
    await open_incident(page, console, iid)
    assert await page.locator("#inc-actions, #act-ack, #act-assign, #act-comment, "
                              "#act-resolve").count() == 0
    await expect(page.locator("#duty")).to_be_hidden()
    # the same requests the operator's page sends, with the viewer's cookie and CSRF token
    csrf = await page.evaluate("document.body.dataset.csrf")
    assert csrf
    for action, body in (("acknowledge", {}), ("assign", {"assignee": "team-b"}),
                         ("comment", {"note": "seen"}), ("resolve", {})):
        r = await page.request.post(f"{console.url}/api/incidents/{iid}/{action}",
                                    data=body, headers={"X-CSRF-Token": csrf})
        assert r.status == 403, (action, r.status, await r.text())
        assert (await r.json())["detail"] == "requires the operator role"


# --- languages ----------------------------------------------------------------------------------
async def switch(page: Page, lang: str) -> None:
    async with page.expect_response(lambda r: r.url.endswith("/api/me/lang")) as resp:
        await page.select_option("#lang-select", lang)
    assert (await resp.value).ok
    await expect(page.locator("html")).to_have_attribute("lang", lang)


async def test_no_untranslated_key_in_either_language(
        context: BrowserContext, console: ConsoleServer, street: asyncpg.Record,
        pool: asyncpg.Pool) -> None:
    iid = street["incident_id"]
    page = await first_page(context)
    await sign_in(page, console, USERS["supervisor"], PASSWORD)
    await expect(page).to_have_url(console.url + "/")
    vi_index = ["Đăng xuất", "Trạng thái", "Quận/huyện", "Mức độ", "Trực ca", "Bảo trì",
                "Tiếp nhận"]
    en_index = ["Sign out", "State", "District", "Severity", "On duty", "Maintenance",
                "Acknowledge"]
    vi_incident = ["Diễn biến", "Cảm biến liên quan", "Phân công", "Thêm ghi chú",
                   "Đóng sự cố…", "Tất cả sự cố"]
    en_incident = ["Timeline", "Affected sensors", "Assign", "Add comment", "Resolve…",
                   "All incidents"]
    item = page.locator(f'li.incident[data-incident-id="{iid}"]')
    await expect(item).to_have_count(1)

    async def check(words: list[str], absent: list[str]) -> None:
        assert await untranslated(page) == []
        text = await page.locator("body").inner_text()
        for w in words:
            assert w in text, w
        for w in absent:
            assert w not in text, w

    await check(vi_index, ["Sign out", "Severity"])
    # the check itself finds what it is meant to find
    await page.evaluate("""() => {
        const probe = document.createElement("div");
        probe.id = "probe";
        probe.innerHTML = '<span>console.filters.state</span><span>incident:facts.alerts</span>' +
            '<span>{count} alerts</span><b data-i18n="common:sign_out">common:sign_out</b>' +
            '<i title="console:map.city"></i><input placeholder="sensor.metric.flow">';
        document.body.append(probe);
    }""")
    assert len(await untranslated(page)) == 7
    await page.evaluate("document.getElementById('probe').remove()")
    await switch(page, "en")
    await expect(item.locator(".title")).to_have_text(f"Traffic stopped on 30/4 street {RUN}")
    await check(en_index, ["Đăng xuất", "Mức độ"])
    assert await pool.fetchval("select lang from console_users where username = $1",
                               USERS["supervisor"]) == "en"
    # the maintenance dialog too
    await page.click("#maint-open")
    await expect(page.locator("#maint-title")).to_have_text("Maintenance windows")
    assert await untranslated(page) == []
    await page.keyboard.press("Escape")
    # the choice is remembered: the incident page opens in English
    await open_incident(page, console, iid)
    await expect(page.locator("#inc-title")).to_have_text(f"Traffic stopped on 30/4 street {RUN}")
    await expect(page.locator(".sensor-chart").first).to_be_visible()
    await check(en_incident, ["Diễn biến", "Phân công"])
    await switch(page, "vi")
    await expect(page.locator("#inc-title")).to_have_text(
        f"Giao thông ngưng trệ trên Đường 30/4 {RUN}")
    await check(vi_incident, ["Timeline", "Affected sensors"])
    await page.goto(console.url + "/")
    await expect(item).to_have_count(1)
    await check(vi_index, ["Sign out", "Severity"])
    # the sign-in and sensor pages as well
    await page.goto(f"{console.url}/sensor/{STREET[0].sensor_id}")
    await expect(page.locator('td[data-metric="speed_kmh"] svg.spark')).to_have_count(1)
    await check(["Giá trị mới nhất", "tốc độ (km/h)"], ["Latest values"])
    await page.click("#logout")
    await expect(page).to_have_url(console.url + "/login")
    await expect(page.locator("#login-button")).to_have_text("Đăng nhập")
    await check(["Tên đăng nhập", "Mật khẩu"], ["Password"])


# --- how it looks, and whether everyone can use it ----------------------------------------------
async def test_screenshots_and_accessibility(
        context: BrowserContext, console: ConsoleServer, street: asyncpg.Record,
        artifacts: Path) -> None:
    iid = street["incident_id"]
    page = await first_page(context)
    await page.goto(console.url + "/login")
    await expect(page.locator("#login-button")).not_to_be_empty()
    await no_axe_violations(page)
    await page.screenshot(path=str(artifacts / "incidents-login.png"))
    await sign_in(page, console, USERS["operator"], PASSWORD)
    await expect(page).to_have_url(console.url + "/")
    for name, (w, h) in SIZES.items():
        await page.set_viewport_size({"width": w, "height": h})
        await page.goto(console.url + "/")
        item = page.locator(f'li.incident[data-incident-id="{iid}"]')
        await expect(item).to_be_visible()
        await expect(page.locator("#map")).to_have_attribute("data-map", MAP_DRAWN)
        # the list is redrawn as changes arrive: measure in the page, on the item it has now
        assert await item.evaluate("e => e.getBoundingClientRect().right") <= w
        await page.screenshot(path=str(artifacts / f"incidents-index-{name}.png"),
                              full_page=name == "phone")
        if name == "1366x768":
            await no_axe_violations(page)
        await open_incident(page, console, iid)
        await expect(page.locator(".sensor-chart")).to_have_count(6)  # a handful of eight
        await expect(page.locator("#show-all")).to_have_text("Xem tất cả 8 cảm biến")
        await expect(page.locator(".sensor-chart .chart canvas").first).to_be_visible()
        await expect(page.locator("#inset")).to_have_attribute("data-map", MAP_DRAWN)
        if name == "1366x768":
            await no_axe_violations(page)
            await page.click("#show-all")
            await expect(page.locator(".sensor-chart")).to_have_count(8)
            await expect(page.locator(
                f'.sensor-chart[data-sensor="{STREET[0].sensor_id}"] .chart')).to_have_attribute(
                    "data-points", "40")
        await page.screenshot(path=str(artifacts / f"incidents-incident-{name}.png"),
                              full_page=True)
    # the incidents it suppresses are listed on its page
    await expect(page.locator("#inhibited li.incident")).to_have_count(1)
    await expect(page.locator("#inhibited li.incident .title")).to_have_text(
        f"Giao thông chậm trên Đường 30/4 {RUN}")


# --- getting attention --------------------------------------------------------------------------
RECORD_NOTIFICATIONS = """
window.__notifications = [];
window.__tones = 0;
const RealNotification = window.Notification;
class RecordedNotification extends RealNotification {
  constructor(title, options) {
    window.__notifications.push({title, body: (options || {}).body, tag: (options || {}).tag});
    super(title, options);
  }
}
RecordedNotification.requestPermission = (...a) => RealNotification.requestPermission(...a);
Object.defineProperty(RecordedNotification, "permission", {get: () => RealNotification.permission});
window.Notification = RecordedNotification;
const realStart = OscillatorNode.prototype.start;
OscillatorNode.prototype.start = function (...a) {
  window.__tones++;
  return realStart.apply(this, a);
};
"""


async def test_on_duty_operator_is_notified_of_a_new_critical_incident(
        context: BrowserContext, console: ConsoleServer, alerts_service: None,
        settings: Settings, pool: asyncpg.Pool) -> None:
    await context.grant_permissions(["notifications"], origin=console.url)
    await context.add_init_script(RECORD_NOTIFICATIONS)
    page = await first_page(context)
    await sign_in(page, console, USERS["operator"], PASSWORD)
    await expect(page).to_have_url(console.url + "/")
    await expect(page.locator("#live")).to_have_class("live on")
    duty = page.locator("#duty")
    await expect(duty).to_have_attribute("aria-pressed", "false")  # off by default
    await duty.click()
    await expect(duty).to_have_attribute("aria-pressed", "true")
    row = await jam(settings, pool, BRIDGE)
    item = page.locator(f'li.incident[data-incident-id="{row["incident_id"]}"]')
    await expect(item).to_have_class(re.compile(r"(^|\s)flash(\s|$)"), timeout=10_000)
    notes = await page.evaluate("window.__notifications")
    assert [n["tag"] for n in notes] == [f"incident-{row['incident_id']}"]
    assert notes[0]["title"] == "Sự cố mới, mức nghiêm trọng"
    assert notes[0]["body"] == f"Giao thông ngưng trệ trên Đường Nguyễn Văn Cừ {RUN}"
    assert await page.evaluate("window.__tones") == 3
    # remembered in this browser: still on duty after a reload; off again with a click
    await page.reload()
    await expect(page.locator("#duty")).to_have_attribute("aria-pressed", "true")
    await page.locator("#duty").click()
    await expect(page.locator("#duty")).to_have_attribute("aria-pressed", "false")

