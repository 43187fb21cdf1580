// One incident: what happened where, since when, who is on it; what operators can do with
// it (acknowledge, assign, comment, resolve: the server refuses them to viewers whatever
// this page shows); the timeline of its alerts and of every action; the sensors that saw
// it with their recent readings; where it is; the incidents it suppresses.
import { $, ApiError, alertTitle, api, badge, boot, can, connectStream, districtName, domainText,
  el, fmtNumber, incidentTitle, placeName, t, toast, when } from "/static/common.js";
import { fmtTime, has } from "/static/i18n.js";
import { announce, setupDuty } from "/static/duty.js";
import { cityMap, colourSvg, translateSvg } from "/static/mapfallback.js";

const ID = Number(location.pathname.split("/").filter(Boolean).pop());
const SENSORS_SHOWN = 6;  // charts drawn at first: enough to see the pattern, few requests
const SERIES_REFRESH_MS = 60_000;
const state = { detail: null, showAll: false, charts: new Map(), uPlot: undefined, inset: null,
  insetSvg: false };

// --- loading -----------------------------------------------------------------------------------
async function load() {
  try {
    state.detail = await api(`/api/incidents/${ID}`);
  } catch (e) {
    if (e instanceof ApiError && (e.status === 404 || e.status === 422)) {
      $("inc-missing").textContent = t("incident:missing", { id: String(location.pathname.split("/").pop()) });
      $("inc-missing").hidden = false;
      for (const id of ["inc-head", "inc-actions"]) if ($(id)) $(id).hidden = true;
      document.querySelectorAll(".incident-page .panel").forEach((p) => { p.hidden = true; });
      return;
    }
    toast(e.text || e.message, "error");
    return;
  }
  draw();
}

let reloadTimer = null;
function reloadSoon() {
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(load, 250);  // a burst of changes is one reload
}

// --- drawing -----------------------------------------------------------------------------------
function draw() {
  if (!state.detail) return;
  const { incident: inc } = state.detail;
  const title = incidentTitle(inc);
  document.title = t("incident:page_title_of", { title });
  $("inc-title").textContent = title;
  drawTags(inc);
  drawFacts(inc);
  drawActions(inc);
  drawTimeline();
  drawAlerts();
  drawInhibited();
  drawSensors();
  drawInset();
}

function tag(cls, text, attrs = {}) { return el("span", { class: "tag " + cls, ...attrs }, text); }

function drawTags(inc) {
  $("inc-tags").replaceChildren(...[
    badge(inc.severity),
    tag("state-" + inc.state, t(`common:state.${inc.state}`), { id: "inc-state", "data-state": inc.state }),
    inc.storm ? tag("storm", t("incident:storm"), { title: t("incident:storm_help") }) : null,
    inc.inhibited_by ? el("a", { class: "tag inhibited-by", href: `/incident/${inc.inhibited_by}` },
      t("incident:inhibited_by", { id: fmtNumber(inc.inhibited_by, { useGrouping: false }) })) : null,
  ].filter(Boolean));
}

function fact(key, value, id) {
  if (value === null || value === undefined || value === "") return [];
  return [el("dt", {}, t(`incident:facts.${key}`)), el("dd", { id }, value)];
}

function drawFacts(inc) {
  const ackText = inc.acknowledged
    ? t("incident:facts.acked_by", { user: inc.acked_by || "", at: when(inc.acked_at) })
    : t("common:ack.no");
  $("inc-facts").replaceChildren(
    ...fact("number", "#" + inc.incident_id),
    ...fact("alerts", t("incident:facts.alerts_value", { active: fmtNumber(inc.active_count), total: fmtNumber(inc.alert_count) }), "f-alerts"),
    ...fact("sensors", fmtNumber(inc.sensor_count), "f-sensors"),
    ...fact("first_seen", fmtTime(inc.first_seen), "f-first"),
    ...fact("last_seen", fmtTime(inc.last_seen), "f-last"),
    ...fact("place", [placeName(inc.landmark, ""), districtName(inc.district)].filter(Boolean).join(", ")),
    ...fact("domain", domainText(inc.domain)),
    ...fact("gateway", inc.gateway),
    ...fact("ack", ackText, "f-ack"),
    ...fact("assignee", inc.assignee, "f-assignee"),
    ...(inc.state === "resolved" ? fact("resolved", t("incident:facts.resolved_value", {
      user: inc.resolved_by || "", at: fmtTime(inc.resolved_at) }), "f-resolved") : []),
  );
}

function drawActions(inc) {
  // viewers never get the controls (the server refuses them anyway); a resolved incident
  // takes no more actions (409)
  const box = $("inc-actions");
  if (!box) return;
  const show = can("operator") && inc.state === "open";
  box.hidden = !show;
  if (!show) return;
  $("act-ack").hidden = inc.acknowledged;
}

async function act(action, body, button) {
  button.disabled = true;
  try {
    const inc = await api(`/api/incidents/${ID}/${action}`, { method: "POST", body: JSON.stringify(body) });
    if (state.detail && inc && inc.incident_id === ID) state.detail.incident = { ...state.detail.incident, ...inc };
    toast(t(`incident:done.${action}`));
    await load();
    return true;
  } catch (e) {
    toast(t("incident:failed", { reason: e.text || e.message }), "error");
    return false;
  } finally {
    button.disabled = false;
  }
}

function setupActions() {
  $("act-ack").addEventListener("click", () => act("acknowledge", {}, $("act-ack")));
  $("assign-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const who = $("assignee").value.trim();
    if (!who) return;
    if (await act("assign", { assignee: who }, $("act-assign"))) $("assignee").value = "";
  });
  $("comment-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const note = $("comment").value.trim();
    if (!note) return;
    if (await act("comment", { note }, $("act-comment"))) $("comment").value = "";
  });
  $("act-resolve").addEventListener("click", () => { $("resolve-note").value = ""; $("resolve-dialog").showModal(); });
  $("resolve-cancel").addEventListener("click", () => $("resolve-dialog").close());
  $("resolve-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const note = $("resolve-note").value.trim();
    if (await act("resolve", note ? { note } : {}, $("resolve-confirm"))) $("resolve-dialog").close();
  });
}

/** One line of the timeline: when, who, what, and the details that matter to a reader. */
function timelineItem(e, alerts) {
  const key = `incident:timeline.${e.kind === "alert" ? "alert" : "incident"}.${e.action}`;
  const what = has(key) ? t(key) : t("incident:timeline.other", { action: e.action });
  const d = e.detail || {};
  const alert = e.alert_id != null ? alerts.get(e.alert_id) : null;
  const extra = [];
  if (alert) {  // which sensor; the alert's own title only when it says more than the heading
    extra.push(alert.sensor_id
      ? el("a", { href: `/sensor/${encodeURIComponent(alert.sensor_id)}` }, alert.sensor_id) : alert.source);
    const own = alertTitle(alert);
    if (own !== $("inc-title").textContent) extra.push(own);
  }
  if (d.assignee) extra.push(t("common:assigned_to", { user: d.assignee }));
  if (d.level != null) extra.push(t("incident:timeline.level", { level: fmtNumber(d.level) }));
  if (d.severity && has(`common:severity.${d.severity}`)) extra.push(t("incident:timeline.severity", { severity: t(`common:severity.${d.severity}`) }));
  if (d.count != null && e.action === "storm") extra.push(t("incident:timeline.storm_count", { n: fmtNumber(d.count) }));
  for (const ref of ["inhibited_by", "by", "incident_id"]) {
    if (typeof d[ref] === "number" && d[ref] !== ID) {
      extra.push(el("a", { href: `/incident/${d[ref]}` }, t("incident:timeline.ref", { id: String(d[ref]) })));
      break;
    }
  }
  const actor = !e.actor || e.actor === "system" ? t("incident:timeline.system") : e.actor;
  return el("li", { class: `tl-item tl-${e.kind} tl-${e.action}`, "data-action": e.action, "data-kind": e.kind },
    el("time", { datetime: new Date(e.at).toISOString() }, fmtTime(e.at)),
    el("span", { class: "tl-actor" }, actor),
    el("span", { class: "tl-what" }, what),
    extra.length ? el("span", { class: "tl-detail" }, ...extra.flatMap((x, i) => (i ? [" · ", x] : [x]))) : null,
    d.note ? el("q", { class: "tl-note" }, d.note) : null);
}

function drawTimeline() {
  const { timeline = [], alerts = [] } = state.detail;
  const byId = new Map(alerts.map((a) => [a.alert_id, a]));
  $("timeline").replaceChildren(...timeline.map((e) => timelineItem(e, byId)));
  $("timeline-empty").hidden = timeline.length > 0;
}

function drawAlerts() {
  const { alerts = [] } = state.detail;
  $("alerts").replaceChildren(...alerts.map((a) => el("tr", { "data-alert-id": a.alert_id, class: a.state },
    el("td", {}, badge(a.severity)),
    el("td", {}, alertTitle(a)),
    el("td", {}, a.sensor_id ? el("a", { href: `/sensor/${encodeURIComponent(a.sensor_id)}` }, a.sensor_id) : a.source),
    el("td", {}, t(`common:state.${a.state}`)),
    el("td", {}, fmtTime(a.raised_at)),
    el("td", { class: "num" }, a.value == null ? "–" : fmtNumber(a.value, { maximumFractionDigits: 2 })))));
  $("alerts-empty").hidden = alerts.length > 0;
}

function drawInhibited() {
  const { inhibited = [] } = state.detail;
  $("inhibited").replaceChildren(...inhibited.map((i) => el("li", { class: `incident sev-${i.severity}`, "data-incident-id": i.incident_id },
    el("div", { class: "bar " + i.severity }),
    el("div", { class: "body" },
      el("div", { class: "row1" }, badge(i.severity), el("a", { class: "title", href: `/incident/${i.incident_id}` }, incidentTitle(i))),
      el("div", { class: "meta" },
        el("span", {}, t("console:item.alerts", { count: i.alert_count, n: fmtNumber(i.alert_count) })),
        el("span", {}, t("console:item.seen", { first: when(i.first_seen), last: when(i.last_seen) })))))));
  $("inhibited-empty").hidden = inhibited.length > 0;
}

// --- the sensors and their readings ---------------------------------------------------------------
function metricName(m) { return has(`sensor:metric.${m}`) ? t(`sensor:metric.${m}`) : m; }

async function loadUPlot() {
  if (state.uPlot === undefined) {
    try { state.uPlot = (await import("/vendor/uplot/uPlot.esm.js")).default; } catch (e) { state.uPlot = null; }
  }
  return state.uPlot;
}

/** Which metric to plot for a sensor: the one its alert fired on, else the incident's,
 *  else the first the sensor reports. */
async function metricOf(sensorId) {
  const { alerts = [], incident } = state.detail;
  const a = alerts.find((x) => x.sensor_id === sensorId && x.details && x.details.metric);
  if (a) return a.details.metric;
  if (incident.title_args && incident.title_args.metric) return incident.title_args.metric;
  try {
    const info = await api(`/api/sensors/${encodeURIComponent(sensorId)}`);
    return Object.keys(info.latest)[0] || null;
  } catch (e) {
    return null;
  }
}

function seriesMinutes() {
  const inc = state.detail.incident;
  const since = Math.ceil((Date.now() - inc.first_seen) / 60000) + 30;  // half an hour before it began
  return Math.min(7 * 1440, Math.max(60, since));
}

async function fetchSeries(chart) {
  if (!chart.metric) chart.metric = await metricOf(chart.sensorId);
  if (!chart.metric) return;
  const ser = await api(`/api/sensors/${encodeURIComponent(chart.sensorId)}/series?metric=${encodeURIComponent(chart.metric)}&minutes=${seriesMinutes()}`);
  chart.points = ser.points;
  chart.fetchedAt = Date.now();
}

function summary(chart) {
  const pts = chart.points || [];
  if (!pts.length) return t("incident:sensors.no_data", { metric: metricName(chart.metric || "") });
  const vs = pts.map((p) => p[1]);
  const f = (v) => fmtNumber(v, { maximumFractionDigits: 2 });
  return t("incident:sensors.summary", { metric: metricName(chart.metric), n: fmtNumber(pts.length),
    min: f(Math.min(...vs)), max: f(Math.max(...vs)), last: f(vs[vs.length - 1]) });
}

function plot(chart, uPlot) {
  if (chart.u) { chart.u.destroy(); chart.u = null; }
  const box = chart.box;
  box.replaceChildren();
  box.setAttribute("aria-label", summary(chart));
  box.dataset.points = String((chart.points || []).length);
  if (!uPlot || !chart.points || chart.points.length < 2) {
    box.append(el("p", { class: "muted" }, summary(chart)));
    return;
  }
  const xs = chart.points.map((p) => p[0] / 1000), ys = chart.points.map((p) => p[1]);
  const first = state.detail.incident.first_seen / 1000;
  const css = getComputedStyle(document.documentElement);
  const axis = { stroke: css.getPropertyValue("--muted").trim() || "#93a1b0", grid: { stroke: "#2c3540", width: 1 }, ticks: { stroke: "#2c3540" } };
  chart.u = new uPlot({
    width: Math.max(220, box.clientWidth || 300), height: 140, legend: { show: false },
    cursor: { y: false },
    scales: { x: { time: true } },
    axes: [
      { ...axis, values: (u, splits) => splits.map((s) => fmtTime(s * 1000, { timeStyle: "short" })) },
      { ...axis, size: 48, values: (u, splits) => splits.map((v) => fmtNumber(v, { maximumFractionDigits: 1 })) },
    ],
    series: [{}, { stroke: "#64b5f6", width: 1.5, points: { show: false } }],
    hooks: { draw: [(u) => {  // when the incident began
      const x = u.valToPos(first, "x", true);
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
      const ctx = u.ctx; ctx.save(); ctx.strokeStyle = "#ef5350"; ctx.setLineDash([4, 4]); ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke(); ctx.restore();
    }] },
  }, [xs, ys], box);
}

function chartCard(sensorId) {
  const box = el("div", { class: "chart", role: "img" });
  const metricLabel = el("span", { class: "metric" });
  const card = el("figure", { class: "sensor-chart", "data-sensor": sensorId },
    el("figcaption", {}, el("a", { href: `/sensor/${encodeURIComponent(sensorId)}` }, sensorId), " ", metricLabel), box);
  return { sensorId, card, box, metricLabel, metric: null, points: null, u: null, fetchedAt: 0 };
}

async function drawSensors() {
  const sensors = state.detail.sensors || [];
  const shown = state.showAll ? sensors : sensors.slice(0, SENSORS_SHOWN);
  $("sensors-note").textContent = sensors.length
    ? t("incident:sensors.note", { minutes: fmtNumber(seriesMinutes()) }) : t("incident:sensors.none");
  const more = $("show-all");
  more.hidden = sensors.length <= SENSORS_SHOWN;
  more.textContent = state.showAll ? t("incident:sensors.show_fewer")
    : t("incident:sensors.show_all", { n: fmtNumber(sensors.length) });
  const cards = [];
  for (const sid of shown) {
    if (!state.charts.has(sid)) state.charts.set(sid, chartCard(sid));
    cards.push(state.charts.get(sid).card);
  }
  $("sensor-charts").replaceChildren(...cards);
  const uPlot = await loadUPlot();
  await Promise.all(shown.map(async (sid) => {
    const chart = state.charts.get(sid);
    try {
      if (!chart.points || Date.now() - chart.fetchedAt > SERIES_REFRESH_MS) await fetchSeries(chart);
    } catch (e) { /* an unreadable sensor leaves its card with the summary text */ }
    chart.metricLabel.textContent = chart.metric ? metricName(chart.metric) : "";
    plot(chart, uPlot);
  }));
}

// --- where --------------------------------------------------------------------------------------
async function drawInset() {
  const inc = state.detail.incident;
  if (state.inset === null && !state.insetSvg) {
    state.inset = undefined;  // loading
    const got = await cityMap($("inset"), { view: "center", padding: 12 });
    state.inset = got.map; state.insetSvg = got.svg;
    $("inset-missing").hidden = got.map !== null || got.svg;
    if (state.inset && inc.district) state.inset.focusDistrict(inc.district);
  }
  if (state.inset) state.inset.setIncidents([inc]);
  else if (state.insetSvg) { translateSvg($("inset")); colourSvg($("inset"), [inc]); }
}

// --- live -------------------------------------------------------------------------------------
function onIncident(change) {
  announce(change);
  const inc = change.incident;
  const ours = state.detail && (inc.incident_id === ID || inc.inhibited_by === ID ||
    (state.detail.inhibited || []).some((i) => i.incident_id === inc.incident_id));
  if (ours) reloadSoon();
}

function onAlert(change) {
  if (change.alert && change.alert.incident_id === ID) reloadSoon();
}

async function main() {
  await boot();
  setupDuty();
  if (can("operator")) setupActions();
  else $("inc-actions").remove();  // nothing to act with, not even hidden
  $("show-all").addEventListener("click", () => { state.showAll = !state.showAll; drawSensors(); });
  document.addEventListener("langchange", draw);  // charts are redrawn from the readings they have
  await load();
  connectStream({ open: reloadSoon, incident: onIncident, alert: onAlert });
  setInterval(() => state.detail && drawSensors(), SERIES_REFRESH_MS);
  window.addEventListener("resize", () => { if (state.inset) state.inset.resize(); });
}
main();
