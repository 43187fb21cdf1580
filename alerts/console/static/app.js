// The operators' list: one item per incident (the alerts of one cause), not per alert, so
// an accident on a street is one thing to look at and act on, however many sensors see it.
// Kept live by Server-Sent Events (event: incident); the map pane shows the same incidents.
import { $, SEV, api, badge, boot, can, connectStream, districtName, el, fmtNumber,
  incidentTitle, placeName, t, toast, when } from "/static/common.js";
import { fmtTime } from "/static/i18n.js";
import { cityMap, colourSvg, loadSvg, translateSvg } from "/static/mapfallback.js";
import { announce, setupDuty } from "/static/duty.js";

const LIMIT = 500;  // open incidents fetched at once: far more than a shift can look at
const SHOWN = 300;  // items drawn; the rest are counted under the list
const state = { incidents: new Map(), complete: true, map: null, flash: new Set() };

function upsert(inc) {
  const old = state.incidents.get(inc.incident_id);
  if (old && inc.version < old.version) return;
  if (inc.inhibits === undefined && old) inc.inhibits = old.inhibits;
  state.incidents.set(inc.incident_id, inc);
}

function filters() {
  return { state: $("f-state").value, domain: $("f-domain").value, district: $("f-district").value,
    severity: $("f-severity").value, ack: $("f-ack").value };
}

/** Open incidents suppressed by another stay out of the list: their cause is shown. */
function visible(inc, f) {
  if (inc.state !== f.state) return false;
  if (inc.state === "open" && inc.inhibited_by) return false;
  if (f.domain && inc.domain !== f.domain) return false;
  if (f.district && inc.district !== f.district) return false;
  if (f.severity && inc.severity !== f.severity) return false;
  if (f.ack && String(inc.acknowledged) !== f.ack) return false;
  return true;
}

/** How many open incidents this one suppresses: counted here while every open incident is
 *  loaded (it follows live changes), else as the server last said. */
function inhibits(inc) {
  if (!state.complete) return inc.inhibits || 0;
  let n = 0;
  for (const o of state.incidents.values()) if (o.state === "open" && o.inhibited_by === inc.incident_id) n++;
  return n;
}

async function acknowledge(inc, button) {
  button.disabled = true;
  try {
    upsert(await api(`/api/incidents/${inc.incident_id}/acknowledge`, { method: "POST", body: "{}" }));
    schedule();
  } catch (e) {
    button.disabled = false;
    toast(t("console:item.ack_failed", { reason: e.text || e.message }), "error");
  }
}

function item(inc) {
  const title = incidentTitle(inc);
  const n = inhibits(inc);
  const place = inc.landmark ? [placeName(inc.landmark, ""), districtName(inc.district)].filter(Boolean).join(", ")
    : districtName(inc.district);
  const ack = inc.acknowledged
    ? el("span", { class: "ack-state ack" }, inc.acked_by ? t("common:ack.by", { user: inc.acked_by }) : t("common:ack.yes"))
    : el("span", { class: "ack-state unack" }, t("common:ack.no"));
  const actions = [];
  if (can("operator") && inc.state === "open" && !inc.acknowledged) {
    const b = el("button", { type: "button", class: "primary ack-btn",
      "aria-label": t("console:item.ack_aria", { title }) }, t("console:item.ack"));
    b.addEventListener("click", () => acknowledge(inc, b));
    actions.push(b);
  }
  return el("li", { class: `incident sev-${inc.severity} ${inc.state} ${inc.acknowledged ? "acked" : "unacked"}${state.flash.has(inc.incident_id) ? " flash" : ""}`,
    "data-incident-id": inc.incident_id, "data-state": inc.state, "data-ack": String(inc.acknowledged),
    "data-sev": inc.severity },
  el("div", { class: "bar " + inc.severity }),
  el("div", { class: "body" },
    el("div", { class: "row1" }, badge(inc.severity),
      el("a", { class: "title", href: `/incident/${inc.incident_id}`, title }, title),
      inc.storm ? el("span", { class: "tag storm", title: t("console:item.storm_help") }, t("console:item.storm")) : null,
      n ? el("span", { class: "tag inhibits", title: t("console:item.inhibits_help") },
        t("console:item.inhibits", { count: n, n: fmtNumber(n) })) : null),
    el("div", { class: "meta" },
      el("span", { class: "counts-line" },
        t("console:item.alerts", { count: inc.alert_count, n: fmtNumber(inc.alert_count) }), " · ",
        t("console:item.sensors", { count: inc.sensor_count, n: fmtNumber(inc.sensor_count) })),
      place ? el("span", { class: "place" }, place) : null,
      ack,
      inc.assignee ? el("span", { class: "assignee" }, t("common:assigned_to", { user: inc.assignee })) : null,
      el("span", { class: "times" }, t("console:item.seen", { first: when(inc.first_seen), last: when(inc.last_seen) })),
      inc.state === "resolved" ? el("span", { class: "resolved" }, t("console:item.resolved_at", { at: when(inc.resolved_at) })) : null),
    actions.length ? el("div", { class: "actions" }, ...actions) : null));
}

function render() {
  const f = filters();
  const rank = (i) => SEV.indexOf(i.severity);
  const list = [...state.incidents.values()].filter((i) => visible(i, f)).sort((x, y) =>
    (f.state === "open" ? rank(x) - rank(y) : 0) || Math.max(y.updated_at, y.last_seen) - Math.max(x.updated_at, x.last_seen));
  $("incident-list").replaceChildren(...list.slice(0, SHOWN).map(item));
  $("empty").hidden = list.length > 0;
  $("empty").textContent = t(f.state === "open" ? "console:empty_open" : "console:empty_resolved");
  $("more").hidden = list.length <= SHOWN;
  $("more").textContent = t("console:more", { n: fmtNumber(list.length - SHOWN) });
  const open = [...state.incidents.values()].filter((i) => i.state === "open" && !i.inhibited_by);
  $("counts").replaceChildren(...SEV.map((s) => {
    const n = open.filter((i) => i.severity === s).length;
    return n ? el("span", { class: "count " + s, "data-sev": s }, t("console:count", { n: fmtNumber(n), severity: t(`common:severity.${s}`) })) : null;
  }).filter(Boolean));
  if (!open.length) $("counts").append(el("span", { class: "muted" }, t("console:no_open")));
  drawMap(open);
}

let pending = false;
function schedule() {
  if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; render(); }); }
}

async function load() {
  const got = await api(`/api/incidents?state=open&include_inhibited=true&limit=${LIMIT}`);
  for (const inc of [...state.incidents.values()]) if (inc.state === "open") state.incidents.delete(inc.incident_id);
  state.complete = got.length < LIMIT;
  got.forEach(upsert);
  if ($("f-state").value === "resolved") {
    const f = filters();
    const q = new URLSearchParams({ state: "resolved", limit: String(LIMIT) });
    for (const k of ["domain", "district", "severity"]) if (f[k]) q.set(k, f[k]);
    (await api(`/api/incidents?${q}`)).forEach(upsert);
  }
  schedule();
}

function onIncident(change) {
  upsert(change.incident);
  if (announce(change)) {
    const id = change.incident.incident_id;
    state.flash.add(id);
    setTimeout(() => { state.flash.delete(id); schedule(); }, 12000);
  }
  schedule();
}

// --- the map pane ---------------------------------------------------------------------------
async function setupMap() {
  const got = await cityMap($("map"), { view: "center" });
  state.map = got.map;
  $("map-missing").hidden = got.map !== null || got.svg;
  if (state.map) {  // the city map opens on the whole city
    document.querySelectorAll(".view-btn").forEach((x) => x.classList.toggle("active", x.dataset.view === "city"));
  }
  for (const b of document.querySelectorAll(".view-btn")) b.addEventListener("click", async () => {
    document.querySelectorAll(".view-btn").forEach((x) => x.classList.toggle("active", x === b));
    if (state.map) { if (b.dataset.view === "city") state.map.fitCity(); else state.map.focusDistrict("ninh_kieu"); }
    else { await loadSvg($("map"), b.dataset.view); schedule(); }
  });
  window.addEventListener("resize", () => state.map && state.map.resize());
  // sensors' states change without an incident changing: refresh them now and then
  if (state.map && state.map.refreshSensors) setInterval(() => state.map.refreshSensors().catch(() => {}), 30000);
  schedule();
}

function drawMap(open) {
  if (state.map) state.map.setIncidents(open);
  else colourSvg($("map"), open);
}

// --- maintenance windows (supervisors) -----------------------------------------------------------
async function loadWindows() {
  const rows = await api("/api/maintenance");
  $("maint-empty").hidden = rows.length > 0;
  $("maint-list").replaceChildren(...rows.map((w) => el("tr", { "data-window-id": w.window_id },
    el("td", {}, t(`console:maint.scopes.${w.scope}`)),
    el("td", {}, w.scope === "district" ? districtName(w.target) : w.scope === "landmark" ? placeName(w.target, "") : w.target),
    el("td", {}, fmtTime(w.ends_at)), el("td", {}, w.reason), el("td", {}, w.created_by),
    el("td", {}, el("button", { type: "button", class: "link", onclick: async () => {
      await api(`/api/maintenance/${w.window_id}`, { method: "DELETE" }); loadWindows();
    } }, t("console:maint.end"))))));
}

async function addWindow(e) {
  e.preventDefault();
  try {
    await api("/api/maintenance", { method: "POST", body: JSON.stringify({
      scope: $("m-scope").value, target: $("m-target").value.trim(),
      duration_s: Math.round(Number($("m-minutes").value) * 60), reason: $("m-reason").value }) });
    $("m-target").value = ""; $("m-reason").value = "";
    loadWindows();
  } catch (err) { toast(t("console:maint.refused", { reason: err.text || err.message }), "error"); }
}

function fillDistricts() {
  const sel = $("f-district"), keep = sel.value;
  const names = t("places:districts", { returnObjects: true });
  sel.replaceChildren(el("option", { value: "", "data-i18n": "console:filters.all" }, t("console:filters.all")),
    ...Object.keys(names).map((code) => el("option", { value: code }, names[code])));
  sel.value = keep;
}

async function main() {
  await boot();
  fillDistricts();
  setupDuty();
  $("f-state").addEventListener("change", () => load().catch((e) => toast(e.text || e.message, "error")));
  for (const id of ["f-domain", "f-district", "f-severity", "f-ack"]) $(id).addEventListener("change", schedule);
  $("f-district").addEventListener("change", () => { if (state.map && $("f-district").value) state.map.focusDistrict($("f-district").value); });
  if (can("supervisor")) {
    $("maint-open").hidden = false;
    $("maint-open").addEventListener("click", async () => { await loadWindows(); $("maint").showModal(); });
    $("maint-form").addEventListener("submit", addWindow);
  }
  document.addEventListener("langchange", () => {
    fillDistricts(); schedule();
    if (!state.map) translateSvg($("map"));
    if ($("maint").open) loadWindows();
  });
  connectStream({ open: () => load().catch((e) => toast(e.text || e.message, "error")), incident: onIncident });
  setupMap();
  setInterval(schedule, 60000);  // "today" becomes a date after midnight
}
main();
