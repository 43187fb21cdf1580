// The alerts console page: the list and the map, kept live by Server-Sent Events.
"use strict";
const SEV = ["critical", "major", "minor", "warning", "info"];
const ROLE = {viewer: 1, operator: 2, supervisor: 3};
const state = {me: null, alerts: new Map(), places: {districts: {}, landmarks: {}}, view: "center"};
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
}

function toast(text) {
  const t = $("toast"); t.textContent = text; t.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
}

async function api(path, opts = {}) {
  const headers = {"Content-Type": "application/json"};
  if (state.me && state.me.csrf) headers["X-CSRF-Token"] = state.me.csrf;
  const r = await fetch(path, {...opts, headers: {...headers, ...(opts.headers || {})}});
  if (r.status === 401) { location.href = "/login"; throw new Error("signed out"); }
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not json */ }
    throw new Error(detail);
  }
  return r.json();
}

function upsert(alert) {
  const old = state.alerts.get(alert.alert_id);
  if (!old || alert.version >= old.version) state.alerts.set(alert.alert_id, alert);
}

function filters() {
  return {state: $("f-state").value, domain: $("f-domain").value,
          district: $("f-district").value, ack: $("f-ack").value};
}

function visible(a, f) {
  if (f.state && a.state !== f.state) return false;
  if (f.domain && a.domain !== f.domain) return false;
  if (f.district && a.district !== f.district) return false;
  if (f.ack && String(a.acknowledged) !== f.ack) return false;
  return true;
}

function can(role) { return state.me && ROLE[state.me.role] >= ROLE[role]; }

async function act(a, action) {
  let body = {};
  if (action === "comment") {
    const note = prompt("Note for alert #" + a.alert_id);
    if (!note) return;
    body = {note};
  } else if (action === "assign") {
    const who = prompt("Assign alert #" + a.alert_id + " to", a.assignee || "");
    if (!who) return;
    body = {assignee: who};
  }
  try {
    upsert(await api(`/api/alerts/${a.alert_id}/${action}`, {method: "POST", body: JSON.stringify(body)}));
    schedule();
  } catch (e) { toast(action + " failed: " + e.message); }
}

async function showDetail(a) {
  const d = await api(`/api/alerts/${a.alert_id}`);
  const rows = d.audit.map((x) => el("tr", {}, el("td", {}, new Date(x.at).toLocaleString()),
    el("td", {}, x.actor), el("td", {}, x.action),
    el("td", {}, x.detail.note || x.detail.assignee || (x.detail.level ? "level " + x.detail.level : ""))));
  const body = $("detail-body");
  body.replaceChildren(
    el("h3", {}, `#${a.alert_id} ${d.alert.title}`),
    el("p", {class: "muted"}, `${d.alert.rule_id} · ${d.alert.source} · value ${d.alert.value ?? "–"} · ${d.alert.updates} updates`),
    d.alert.message ? el("p", {}, d.alert.message) : null,
    d.alert.sensor_id ? el("p", {}, el("a", {href: "/sensor/" + encodeURIComponent(d.alert.sensor_id)}, "Sensor page →")) : null,
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "when"), el("th", {}, "who"), el("th", {}, "what"), el("th", {}, "note"))),
      el("tbody", {}, ...rows)));
  $("detail").showModal();
}

function card(a) {
  const place = [state.places.districts[a.district] || a.district,
                 state.places.landmarks[a.landmark] || a.landmark].filter(Boolean).join(" · ");
  const ackText = a.acknowledged ? `Acknowledged${a.acked_by ? " by " + a.acked_by : ""}` : "Unacknowledged";
  const actions = el("div", {class: "actions"});
  if (can("operator") && !a.acknowledged)
    actions.append(el("button", {class: "primary ack-btn", onclick: () => act(a, "acknowledge")}, "Acknowledge"));
  if (can("operator")) actions.append(el("button", {class: "comment-btn", onclick: () => act(a, "comment")}, "Comment"));
  if (can("supervisor")) actions.append(el("button", {class: "assign-btn", onclick: () => act(a, "assign")}, "Assign"));
  if (can("supervisor") && a.state === "active")
    actions.append(el("button", {class: "clear-btn", onclick: () => act(a, "clear")}, "Clear"));
  return el("li", {class: `alert sev-${a.severity} ${a.state} ${a.acknowledged ? "acked" : "unacked"}`,
                   "data-alert-id": a.alert_id, "data-state": a.state, "data-ack": String(a.acknowledged)},
    el("div", {class: "bar " + a.severity}),
    el("div", {class: "body"},
      el("div", {class: "row1"}, el("span", {class: "badge " + a.severity}, a.severity),
        el("span", {class: "title", title: a.title, onclick: () => showDetail(a)}, a.title)),
      el("div", {class: "meta"},
        el("span", {class: "alert-state"}, a.state === "active" ? "Active" : "Cleared"),
        el("span", {class: "state " + (a.acknowledged ? "ack" : "unack")}, ackText),
        a.assignee ? el("span", {}, "→ " + a.assignee) : null,
        a.escalation_level ? el("span", {class: "error"}, "escalated ×" + a.escalation_level) : null,
        el("span", {}, place), el("span", {}, ago(a.raised_at))),
      actions.childElementCount ? actions : null));
}

function render() {
  const f = filters();
  const list = [...state.alerts.values()].filter((a) => visible(a, f)).sort((x, y) =>
    (x.state === y.state ? 0 : x.state === "active" ? -1 : 1) ||
    SEV.indexOf(x.severity) - SEV.indexOf(y.severity) || y.updated_at - x.updated_at);
  $("alert-list").replaceChildren(...list.slice(0, 300).map(card));
  $("empty").hidden = list.length > 0;
  const active = [...state.alerts.values()].filter((a) => a.state === "active");
  $("counts").replaceChildren(...SEV.map((s) => {
    const n = active.filter((a) => a.severity === s).length;
    return n ? el("span", {class: "count " + s, "data-sev": s}, `${n} ${s}`) : null;
  }).filter(Boolean));
  colourMap(active);
}

function colourMap(active) {
  const svg = $("map").querySelector("svg");
  if (!svg) return;
  svg.querySelectorAll("[class*='sev-'], [class*='alert-']").forEach((e) => {
    e.classList.remove(...SEV.map((s) => "sev-" + s), ...SEV.map((s) => "alert-" + s));
  });
  const worst = (m, k, s) => { if (k && (!m.has(k) || SEV.indexOf(s) < SEV.indexOf(m.get(k)))) m.set(k, s); };
  const bySensor = new Map(), byDistrict = new Map(), byLandmark = new Map();
  for (const a of active) {
    worst(bySensor, a.sensor_id, a.severity); worst(byDistrict, a.district, a.severity);
    worst(byLandmark, a.landmark, a.severity);
  }
  for (const [k, s] of bySensor) svg.querySelectorAll(`[data-sensor="${CSS.escape(k)}"]`).forEach((e) => e.classList.add("sev-" + s));
  for (const [k, s] of byDistrict) svg.querySelectorAll(`.district[data-district="${CSS.escape(k)}"]`).forEach((e) => e.classList.add("alert-" + s));
  for (const [k, s] of byLandmark) svg.querySelectorAll(`.road[data-landmark="${CSS.escape(k)}"], .landmark[data-landmark="${CSS.escape(k)}"]`).forEach((e) => e.classList.add("alert-" + s));
}

async function loadWindows() {
  const rows = await api("/api/maintenance");
  $("maint-list").replaceChildren(...rows.map((w) => el("tr", {"data-window-id": w.window_id},
    el("td", {}, w.scope), el("td", {}, w.target), el("td", {}, new Date(w.ends_at).toLocaleString()),
    el("td", {}, w.reason), el("td", {}, w.created_by),
    el("td", {}, el("button", {class: "link", onclick: async () => {
      await api(`/api/maintenance/${w.window_id}`, {method: "DELETE"}); loadWindows();
    }}, "end")))));
}

async function addWindow(e) {
  e.preventDefault();
  try {
    await api("/api/maintenance", {method: "POST", body: JSON.stringify({
      scope: $("m-scope").value, target: $("m-target").value.trim(),
      duration_s: Math.round(Number($("m-minutes").value) * 60), reason: $("m-reason").value})});
    $("m-target").value = ""; $("m-reason").value = "";
    loadWindows();
  } catch (err) { toast("maintenance window refused: " + err.message); }
}

let pending = false;
function schedule() { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; render(); }); } }

async function loadMap(view) {
  state.view = view;
  document.querySelectorAll(".view-btn").forEach((b) => b.classList.toggle("active", b.dataset.view === view));
  const r = await fetch("/api/map.svg?view=" + view);
  $("map").innerHTML = await r.text();  // our own server's SVG; labels are escaped there
  schedule();
}

async function loadAlerts() {
  for (const a of await api("/api/alerts?limit=1000")) upsert(a);
  schedule();
}

function connect() {
  const es = new EventSource("/api/stream");
  es.onopen = () => { $("live").className = "live on"; loadAlerts(); };
  es.onerror = () => { $("live").className = "live off"; };
  es.addEventListener("alert", (m) => { upsert(JSON.parse(m.data).alert); schedule(); });
  es.addEventListener("reload", () => { es.close(); state.alerts.clear(); connect(); });
}

async function main() {
  state.me = await api("/api/me");
  $("me").textContent = `${state.me.user} (${state.me.role})`;
  document.body.dataset.role = state.me.role;
  state.places = await api("/api/places");
  for (const [code, name] of Object.entries(state.places.districts))
    $("f-district").append(el("option", {value: code}, name));
  for (const id of ["f-state", "f-domain", "f-district", "f-ack"]) $(id).addEventListener("change", schedule);
  document.querySelectorAll(".view-btn").forEach((b) => b.addEventListener("click", () => loadMap(b.dataset.view)));
  if (can("supervisor")) {
    $("maint-open").hidden = false;
    $("maint-open").addEventListener("click", async () => { await loadWindows(); $("maint").showModal(); });
    $("maint-form").addEventListener("submit", addWindow);
  }
  $("logout").addEventListener("click", async () => { await api("/api/logout", {method: "POST"}); location.href = "/login"; });
  connect();
  loadMap(state.view);
  setInterval(schedule, 30000);  // refresh the "x min ago" texts
}
main();
