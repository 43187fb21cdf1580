// The sensor page: who and where it is, its active alerts, latest values with sparklines.
import { $, ApiError, alertTitle, api, badge, boot, districtName, domainText, el, fmtNumber,
  placeName, t } from "/static/common.js";
import { fmtTime, has } from "/static/i18n.js";

const sid = decodeURIComponent(location.pathname.split("/").pop());
let data = null;
const series = new Map();  // metric -> points (kept across language changes)

function sparkline(points, label) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "spark"); svg.setAttribute("viewBox", "0 0 160 32");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img"); svg.setAttribute("aria-label", label);
  svg.setAttribute("data-points", String(points.length));
  if (points.length < 2) return svg;
  const ts = points.map((p) => p[0]), vs = points.map((p) => p[1]);
  const t0 = Math.min(...ts), t1 = Math.max(...ts), v0 = Math.min(...vs), v1 = Math.max(...vs);
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", points.map(([x, v]) =>
    `${((x - t0) / Math.max(1, t1 - t0) * 158 + 1).toFixed(1)},${(30 - (v - v0) / ((v1 - v0) || 1) * 28).toFixed(1)}`).join(" "));
  svg.append(line);
  return svg;
}

function metricName(m) { return has(`sensor:metric.${m}`) ? t(`sensor:metric.${m}`) : m; }

function sparkLabel(m, points) {
  if (!points.length) return t("sensor:spark_empty", { metric: metricName(m) });
  const vs = points.map((p) => p[1]);
  const f = (v) => fmtNumber(v, { maximumFractionDigits: 2 });
  return t("sensor:spark", { metric: metricName(m), min: f(Math.min(...vs)), max: f(Math.max(...vs)) });
}

function draw() {
  if (!data) return;
  const s = data.sensor;
  document.title = t("sensor:page_title_of", { sensor: s.sensor_id });
  $("sensor-title").textContent = s.sensor_id;
  $("sensor-where").textContent = t("sensor:where", {
    domain: domainText(s.domain), type: has(`sensor:type.${s.type}`) ? t(`sensor:type.${s.type}`) : s.type, vendor: s.vendor || "–",
    district: districtName(s.district), landmark: placeName(s.landmark, "") || "–",
    interval: fmtNumber(s.interval_s) });
  $("sensor-alerts").replaceChildren(...(data.alerts.length ? data.alerts.map((a) =>
    el("li", { class: `incident sev-${a.severity}` }, el("div", { class: "bar " + a.severity }),
      el("div", { class: "body" }, el("div", { class: "row1" }, badge(a.severity),
        el("span", { class: "title" }, alertTitle(a))),
        el("div", { class: "meta" }, t("sensor:raised_at", { at: fmtTime(a.raised_at) })))))
    : [el("li", { class: "muted empty" }, t("sensor:no_alerts"))]));
  const metrics = Object.keys(data.latest);
  $("no-latest").hidden = metrics.length > 0;
  $("latest").replaceChildren(...metrics.map((m) => {
    const v = data.latest[m];
    const cell = el("td", { "data-metric": m });
    if (series.has(m)) cell.append(sparkline(series.get(m), sparkLabel(m, series.get(m))));
    return el("tr", {}, el("td", {}, metricName(m)),
      el("td", { class: "value num" }, fmtNumber(v.value, { maximumFractionDigits: 3 })),
      el("td", {}, fmtTime(v.time, { timeStyle: "medium" })), cell);
  }));
}

async function main() {
  await boot();
  document.addEventListener("langchange", draw);
  try {
    data = await api("/api/sensors/" + encodeURIComponent(sid));
  } catch (e) {
    if (e instanceof ApiError && (e.status === 404 || e.status === 422)) {
      $("sensor-title").textContent = t("sensor:unknown", { sensor: sid });
      return;
    }
    throw e;
  }
  draw();
  await Promise.all(Object.keys(data.latest).map(async (m) => {
    const ser = await api(`/api/sensors/${encodeURIComponent(sid)}/series?metric=${encodeURIComponent(m)}`);
    series.set(m, ser.points);
  }));
  draw();
}
main();
