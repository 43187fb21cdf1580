// The sensor page: who and where it is, its active alerts, latest values with sparklines.
"use strict";
const sid = decodeURIComponent(location.pathname.split("/").pop());
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function sparkline(points) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "spark"); svg.setAttribute("viewBox", "0 0 160 32");
  svg.setAttribute("preserveAspectRatio", "none");
  if (points.length < 2) return svg;
  const ts = points.map((p) => p[0]), vs = points.map((p) => p[1]);
  const t0 = Math.min(...ts), t1 = Math.max(...ts), v0 = Math.min(...vs), v1 = Math.max(...vs);
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", points.map(([t, v]) =>
    `${((t - t0) / Math.max(1, t1 - t0) * 158 + 1).toFixed(1)},${(30 - (v - v0) / ((v1 - v0) || 1) * 28).toFixed(1)}`).join(" "));
  svg.append(line);
  svg.setAttribute("data-points", String(points.length));
  return svg;
}

async function main() {
  const r = await fetch("/api/sensors/" + encodeURIComponent(sid));
  if (r.status === 401) { location.href = "/login"; return; }
  if (!r.ok) { $("sensor-title").textContent = "Unknown sensor " + sid; return; }
  const d = await r.json();
  const s = d.sensor;
  $("sensor-title").textContent = s.sensor_id;
  $("sensor-where").textContent = `${s.domain} · ${s.type} (${s.vendor}) · ${s.district} · ${s.landmark} · every ${s.interval_s} s`;
  $("sensor-alerts").replaceChildren(...(d.alerts.length ? d.alerts.map((a) =>
    el("li", {class: `alert sev-${a.severity}`}, el("div", {class: "bar " + a.severity}),
      el("div", {class: "body"}, el("span", {class: "badge " + a.severity}, a.severity), " ", a.title)))
    : [el("li", {class: "muted"}, "none")]));
  const metrics = Object.keys(d.latest);
  $("no-latest").hidden = metrics.length > 0;
  const rows = [];
  for (const m of metrics) {
    const v = d.latest[m];
    const cell = el("td", {"data-metric": m});
    rows.push(el("tr", {}, el("td", {}, m), el("td", {class: "value"}, String(Math.round(v.value * 1000) / 1000)),
      el("td", {}, new Date(v.time).toLocaleTimeString()), cell));
    fetch(`/api/sensors/${encodeURIComponent(sid)}/series?metric=${encodeURIComponent(m)}`)
      .then((x) => x.json()).then((ser) => cell.append(sparkline(ser.points)));
  }
  $("latest").replaceChildren(...rows);
}
main();
