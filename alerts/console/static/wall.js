// The video wall (/wall): the city map rotating through the districts, open incidents by
// severity, traffic against the usual for this hour, crowds against capacity, and the last
// three hours per domain. Nobody touches it: it polls GET /api/wall/summary (cached 5 s on
// the server, so any number of walls cost one query set), the open incidents and the
// sensors' states, and refreshes sooner when the live stream (/api/stream) says an alert
// or incident changed. If the data stops coming the header says since when.
import uPlot from "/vendor/uplot/uPlot.esm.js";
import { applyI18n, consoleConfig, fmtNumber, fmtTime, initI18n, t } from "./i18n.js";
import { createCityMap } from "./map.js";

const SUMMARY_MS = 15_000;
const INCIDENTS_MS = 15_000;
const SENSORS_MS = 30_000;
const ROTATE_MS = 20_000;
const STALE_MS = 60_000; // no good answer for this long: the header turns red
const SEVERITIES = ["critical", "major", "minor", "warning", "info"];
const CHART_COLORS = {
  flow_sum: "#4fc3f7", speed_kmh_mean: "#ffd54f", crowd_density_max: "#ef5350",
  crowd_density_mean: "#ffb74d", footfall_in_sum: "#81c784", footfall_out_sum: "#ce93d8",
};
const $ = (sel) => document.querySelector(sel);

const state = { summary: null, lastOk: 0, focus: null, rotation: [null], turn: 0, plots: {} };
let cityMap = null;

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (r.status === 401) { location.href = "/login?next=/wall"; throw new Error("signed out"); }
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
  return r.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...children.filter((c) => c != null));
  return node;
}

const pct = (ratio) => fmtNumber(ratio, { style: "percent", maximumFractionDigits: 0 });
const num = (v, digits = 0) => fmtNumber(v, { maximumFractionDigits: digits });

// --- tiles ---------------------------------------------------------------------------------
function renderIncidents(counts) {
  const list = $("#incident-counts");
  list.replaceChildren(...SEVERITIES.map((sev) => el("li",
    { class: `${sev}${counts[sev] ? "" : " zero"}`, "data-severity": sev, "data-count": String(counts[sev]) },
    el("span", { class: "name", textContent: t(`severity.${sev}`) }),
    el("span", { class: "n", textContent: num(counts[sev]) }))));
  $("#incident-total").textContent = counts.total
    ? t("wall:incidents.total", { count: num(counts.total) }) : t("wall:incidents.none");
}

function ratioSpan(ratio, kind, text = pct(ratio)) {
  const cls = ratio == null ? "" : kind === "speed" ? (ratio < 0.75 ? "low" : "normal")
    : ratio > 1.25 ? "high" : ratio < 0.75 ? "low" : "normal";
  return el("span", { class: `ratio ${cls}`, textContent: text });
}

function cityLine(level, kind) {
  const value = kind === "flow" ? level.flow_per_min : level.speed_kmh;
  const ratio = kind === "flow" ? level.flow_ratio : level.speed_ratio;
  const big = el("div", { class: "big", textContent: value == null ? "—" : num(value, kind === "flow" ? 0 : 1) });
  let sub;
  if (value == null) sub = el("span", { class: "muted", textContent: t("wall:traffic.no_data") });
  else if (!level.history_days) sub = el("span", { class: "muted", textContent: t("wall:traffic.no_history") });
  else sub = ratioSpan(ratio, kind, t("wall:traffic.of_usual", { pct: pct(ratio) }));
  return el("div", { "data-kind": kind },
    el("div", { class: "label", textContent: `${t(`wall:traffic.${kind}`)} · ${t(`wall:traffic.${kind}_unit`)}` }),
    big,
    el("div", { class: "sub" }, sub));
}

function renderTraffic(tr) {
  $("#traffic-heading").textContent = t("wall:traffic.title", { hour: String(tr.hour).padStart(2, "0") });
  const city = $("#traffic-city");
  city.dataset.historyDays = tr.city.history_days;
  city.dataset.flowRatio = tr.city.flow_ratio ?? "";
  city.replaceChildren(cityLine(tr.city, "flow"), cityLine(tr.city, "speed"));
  const rows = tr.districts.map((d) => {
    const flow = d.flow_per_min == null ? el("span", { class: "muted", textContent: "—" })
      : d.history_days ? ratioSpan(d.flow_ratio, "flow")
        : el("span", { textContent: t("wall:traffic.flow_value", { value: num(d.flow_per_min) }) });
    const speed = d.speed_kmh == null ? el("span", { class: "muted", textContent: "—" })
      : el("span", {}, t("wall:traffic.speed_value", { value: num(d.speed_kmh) }), " ",
        d.history_days ? ratioSpan(d.speed_ratio, "speed") : null);
    return el("tr", { "data-district": d.district, "data-history-days": String(d.history_days),
      "data-flow-ratio": d.flow_ratio ?? "", class: d.district === state.focus ? "focus" : "" },
    el("td", { textContent: t(`places:districts.${d.district}`) }), el("td", {}, flow), el("td", {}, speed));
  });
  $("#traffic-districts tbody").replaceChildren(...rows);
}

function renderCrowds(crowds) {
  $("#crowd-list").replaceChildren(...crowds.map((c) => {
    const ratio = c.ratio;
    const level = ratio == null ? "" : ratio >= 0.9 ? " full" : ratio >= 0.7 ? " busy" : "";
    const detail = c.value == null ? t("wall:crowds.no_data")
      : t(`wall:crowds.${c.unit === "p/m2" ? "density" : "people"}`,
        { value: num(c.value, c.unit === "p/m2" ? 1 : 0), capacity: num(c.capacity, c.unit === "p/m2" ? 1 : 0) });
    const bar = el("div", { class: `bar${level}` }, el("span"));
    bar.firstChild.style.width = `${Math.min(ratio ?? 0, 1) * 100}%`;
    return el("li", { "data-landmark": c.landmark, "data-district": c.district, "data-ratio": ratio ?? "",
      class: c.district === state.focus ? "focus" : "" },
    el("div", { class: "row" }, el("span", { class: "name", textContent: t(`places:landmarks.${c.landmark}`) }),
      el("span", { class: "pct", textContent: ratio == null ? "—" : pct(ratio) })),
    el("div", { class: "detail", textContent: detail }), bar);
  }));
}

// --- charts (uPlot) --------------------------------------------------------------------------
function chartOptions(chart, width) {
  const muted = "#b9c6d3";
  const axis = (scale, side = 3) => ({ scale, side, stroke: muted, font: "16px system-ui", size: 58,
    grid: { show: side === 3, stroke: "#26323e", width: 1 }, ticks: { stroke: "#2c3844" },
    values: (_u, ticks) => ticks.map((v) => fmtNumber(v, { notation: "compact", maximumFractionDigits: 1 })) });
  const scales = [...new Set(chart.series.map((s) => s.unit))];
  return {
    width, height: 176, legend: { show: false }, cursor: { show: false },
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), consoleConfig().timezone),
    scales: Object.fromEntries([["x", { time: true }], ...scales.map((u) => [u, {
      range: (_u, min, max) => (min == null || max == null ? [0, 1] : [Math.min(0, min), (max || 1) * 1.1]) }])]),
    axes: [{ stroke: muted, font: "16px system-ui", grid: { show: false }, ticks: { stroke: "#2c3844" },
      values: (_u, ticks) => ticks.map((ts) => fmtTime(ts * 1000, { hour: "2-digit", minute: "2-digit" })) },
      ...scales.map((u, i) => axis(u, i === 0 ? 3 : 1))],
    series: [{}, ...chart.series.map((s) => ({ label: `${s.metric}_${s.stat}`, scale: s.unit,
      stroke: CHART_COLORS[`${s.metric}_${s.stat}`] || "#fff", width: 3, spanGaps: false, points: { show: false } }))],
  };
}

function renderCharts(charts) {
  for (const chart of charts) {
    const fig = document.querySelector(`.chart[data-domain="${chart.domain}"]`);
    if (!fig) continue;
    const data = [chart.t, ...chart.series.map((s) => s.values)];
    const cap = fig.querySelector("figcaption");
    cap.replaceChildren(t(`wall:charts.${chart.domain}`), ...chart.series.map((s) => {
      const key = `${s.metric}_${s.stat}`;
      const i = el("i");
      i.style.background = CHART_COLORS[key] || "#fff";
      return el("span", { class: "key" }, i, t(`wall:charts.series.${key}`));
    }));
    fig.dataset.points = String(chart.t.length);
    fig.dataset.values = String(chart.series.reduce((n, s) => n + s.values.filter((v) => v != null).length, 0));
    const plot = state.plots[chart.domain];
    if (plot) plot.setData(data);
    else {
      const box = fig.querySelector(".plot");
      state.plots[chart.domain] = new uPlot(chartOptions(chart, box.clientWidth || 320), data, box);
    }
  }
}

// --- refreshing ------------------------------------------------------------------------------
function render() {
  const s = state.summary;
  if (!s) return;
  renderIncidents(s.incidents);
  renderTraffic(s.traffic);
  renderCrowds(s.crowds);
  renderCharts(s.charts);
}

async function refreshSummary() {
  try {
    state.summary = await getJSON("/api/wall/summary");
    state.lastOk = Date.now();
    render();
  } catch (e) { console.warn("wall summary:", e); }
  renderStatus();
}

async function refreshIncidents() {
  if (!cityMap) return;
  try {
    cityMap.setIncidents(await getJSON("/api/incidents?state=open&limit=200"));
  } catch (e) { console.warn("wall incidents:", e); }
}

async function refreshSensors() {
  if (!cityMap) return;
  try { await cityMap.refreshSensors(); } catch (e) { console.warn("wall sensors:", e); }
}

function renderStatus() {
  const box = $("#wall-status");
  const stale = !state.lastOk || Date.now() - state.lastOk > STALE_MS;
  box.classList.toggle("stale", stale);
  box.dataset.state = stale ? "stale" : "live";
  $("#wall-status-text").textContent = stale
    ? t("wall:status.stale", { time: state.lastOk ? fmtTime(state.lastOk, { timeStyle: "short" }) : "—" })
    : `${t("wall:status.live")} · ${t("wall:status.updated", { time: fmtTime(state.lastOk, { timeStyle: "medium" }) })}`;
}

function tick() {
  $("#wall-clock").textContent = fmtTime(Date.now(), { hour: "2-digit", minute: "2-digit" });
  renderStatus();
}

/** Next stop of the tour: the whole city, then each district in turn. */
function rotate() {
  const code = state.rotation[state.turn % state.rotation.length];
  state.turn += 1;
  state.focus = code;
  if (cityMap) {
    if (code) cityMap.focusDistrict(code);
    else cityMap.fitCity();
  }
  const focus = $("#wall-focus");
  focus.dataset.district = code || "";
  focus.textContent = code ? t(`places:districts.${code}`) : t("wall:whole_city");
  for (const row of document.querySelectorAll("#traffic-districts tr[data-district]")) row.classList.toggle("focus", row.dataset.district === code);
  for (const li of document.querySelectorAll("#crowd-list li")) li.classList.toggle("focus", li.dataset.district === code);
}

let soonTimer = null;
/** A change arrived on the stream: refresh shortly (changes come in bursts). */
function soon() {
  clearTimeout(soonTimer);
  soonTimer = setTimeout(() => { refreshIncidents(); refreshSensors(); refreshSummary(); }, 2000);
}

function listen() {
  const es = new EventSource("/api/stream");
  es.addEventListener("alert", soon);
  es.addEventListener("incident", soon);
  es.addEventListener("reload", () => { es.close(); setTimeout(listen, 1000); soon(); });
}

async function main() {
  const me = await getJSON("/api/me");
  await initI18n(me.lang);
  applyI18n();
  document.title = t("wall:page_title");
  tick();
  try {
    cityMap = await createCityMap($("#wall-map"), { interactive: false,
      padding: { top: 110, right: 28, bottom: 28, left: 28 }, // the district's name sits on top
      onIncident: () => {}, onSensor: () => {} });
    state.rotation = [null, ...cityMap.districts];
  } catch (e) {
    console.error("wall map:", e);
    $("#wall-focus").textContent = t("map:no_webgl");
  }
  window.wall = { state, map: cityMap, refreshSummary, rotate };
  await Promise.all([refreshSummary(), refreshIncidents(), refreshSensors()]);
  rotate();
  setInterval(refreshSummary, SUMMARY_MS);
  setInterval(refreshIncidents, INCIDENTS_MS);
  setInterval(refreshSensors, SENSORS_MS);
  setInterval(rotate, ROTATE_MS);
  setInterval(tick, 1000);
  listen();
  document.addEventListener("langchange", () => { render(); state.turn -= 1; rotate(); });
  document.body.dataset.ready = "true";
}

main().catch((e) => console.error("wall:", e));
