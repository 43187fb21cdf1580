// What every logged-in console page shares: the session, the header (user, language
// switch, live dot, on-duty toggle, sign out), calls to the API, and how an incident is
// named. Every text goes through i18n.js: pages hold keys (data-i18n), never words, so
// switching language redraws everything without a reload.
import { applyI18n, fmtNumber, fmtTime, initI18n, lang, placeValues, ruleTitle, setLang, t, has,
  consoleConfig } from "/static/i18n.js";

export const SEV = ["critical", "major", "minor", "warning", "info"];
const ROLE = { reader: 0, viewer: 1, operator: 2, supervisor: 3 };
export const session = { me: null };
export const $ = (id) => document.getElementById(id);

/** An element; attributes ``on<event>`` are listeners, children are nodes or text (never HTML). */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}

/** Whether the logged-in user has at least ``role`` (the server checks again: this only
 *  decides what to show). */
export function can(role) { return !!session.me && ROLE[session.me.role] >= ROLE[role]; }

/** A refusal of the API as a sentence in the user's language. The server's own detail is
 *  English and written for developers, so it is shown only for unexpected statuses. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
  }
  get text() {
    if (this.status === 403) return t("common:error.forbidden");
    if (this.status === 404) return t("common:error.not_found");
    if (this.status === 409) return t("common:error.conflict");
    if (this.status === 422) return t("common:error.invalid");
    return t("common:error.generic", { detail: this.message });
  }
}

/** JSON from the API; changes carry the session's CSRF token; 401 goes to the login page. */
export async function api(path, opts = {}) {
  const headers = { "Content-Type": "application/json" };
  if (session.me && session.me.csrf) headers["X-CSRF-Token"] = session.me.csrf;
  const r = await fetch(path, { ...opts, credentials: "same-origin",
    headers: { ...headers, ...(opts.headers || {}) } });
  if (r.status === 401) { location.href = "/login"; throw new ApiError(401, "signed out"); }
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new ApiError(r.status, detail);
  }
  return r.json();
}

export function toast(text, kind = "") {
  const box = $("toast");
  box.textContent = text; box.className = "toast " + kind; box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 5000);
}

/** The user, the language, the header. Resolves once the page can draw translated text. */
export async function boot() {
  try {
    session.me = await api("/api/me");
  } catch (e) {
    if (e.status !== 401) throw e;
    return new Promise(() => {});  // on its way to /login
  }
  await initI18n(session.me.lang);
  document.body.dataset.csrf = session.me.csrf;  // setLang sends it with PUT /api/me/lang
  document.body.dataset.role = session.me.role;
  const select = $("lang-select");
  if (select) {
    select.replaceChildren(...consoleConfig().langs.map((l) => el("option", { value: l, lang: l }, t(`common:lang.${l}`))));
    select.value = lang();
    select.addEventListener("change", () => setLang(select.value));
  }
  const logout = $("logout");
  if (logout) logout.addEventListener("click", async () => {
    await api("/api/logout", { method: "POST" }).catch(() => {});
    location.href = "/login";
  });
  const drawMe = () => {
    if ($("me")) $("me").textContent = t("common:me", { user: session.me.user, role: t(`common:role.${session.me.role}`) });
    if (select) select.value = lang();
  };
  document.addEventListener("langchange", drawMe);
  drawMe();
  applyI18n();
  return session.me;
}

/** The live dot of the header: connected or not, said in words for screen readers. */
export function setLive(on) {
  const dot = $("live");
  if (!dot) return;
  dot.className = "live " + (on ? "on" : "off");
  const key = on ? "common:live.on" : "common:live.off";
  dot.dataset.i18nTitle = key; dot.dataset.i18nAriaLabel = key;
  dot.title = t(key); dot.setAttribute("aria-label", t(key));
}

/** Server-Sent Events with the handlers by event name; reconnects (the browser does) and,
 *  on ``reload`` (this client fell behind), starts over so nothing is missed. */
export function connectStream(handlers) {
  const es = new EventSource("/api/stream");
  es.onopen = () => { setLive(true); if (handlers.open) handlers.open(); };
  es.onerror = () => setLive(false);
  for (const [name, fn] of Object.entries(handlers)) {
    if (name !== "open") es.addEventListener(name, (m) => fn(JSON.parse(m.data)));
  }
  es.addEventListener("reload", () => { es.close(); connectStream(handlers); });
  return es;
}

// --- how things are named -------------------------------------------------------------------

/** Template values ready to show: numbers in the user's format, places translated. */
function shownArgs(args = {}) {
  const out = {};
  for (const [k, v] of Object.entries(args || {})) {
    const n = typeof v === "number" ? v : (typeof v === "string" && v.trim() !== "" && !Number.isNaN(Number(v)) && k !== "sensor_id" && k !== "gateway" ? Number(v) : null);
    out[k] = n === null ? v : fmtNumber(n, { maximumFractionDigits: 1 });
  }
  return out;
}

export function severityText(sev) { return t(`common:severity.${sev}`); }
export function domainText(d) { return d ? (has(`common:domain.${d}`) ? t(`common:domain.${d}`) : d) : ""; }

/** Landmark or district name in the user's language (the code when the catalog lacks it). */
export function placeName(landmark, district) {
  const v = placeValues({ landmark, district });
  return v.landmark_name || landmark || v.district_name || district || "";
}

export function districtName(code) {
  return has(`places:districts.${code}`) ? t(`places:districts.${code}`) : code;
}

/** An alert's title from its rule's template (the server's English title if unknown). */
export function alertTitle(a) {
  const args = { sensor_id: a.sensor_id, landmark: a.landmark, district: a.district,
    domain: a.domain, value: a.value, ...(a.details || {}) };
  return ruleTitle(a.rule_id, shownArgs(args), a.title);
}

/** Where an incident is, named by the field its rule groups by (``title_args.place_field``,
 *  as the server names it): a landmark or district in the user's language, a gateway or
 *  sensor by its id. */
function incidentPlace(inc, args) {
  const field = args.place_field;
  if (field === "landmark" || field === "district") {
    const key = `places:${field}s.${args[field]}`;
    return args[field] ? (has(key) ? t(key) : String(args[field])) : "";
  }
  if (field) return String(args[field] || args.source || "");
  return placeName(args.landmark, args.district);
}

/** An incident's heading: the rule's group name when it gathers several alerts (e.g.
 *  "Sudden speed changes"), else the rule's title; then where it happens, unless the
 *  rule's title names the place already. */
export function incidentTitle(inc) {
  const args = { landmark: inc.landmark, district: inc.district, gateway: inc.gateway,
    domain: inc.domain, ...(inc.title_args || {}) };
  const groupKey = `rules:group.${inc.rule_id}`;
  const grouped = inc.alert_count > 1 && has(groupKey);
  // a rule no catalog knows: the server's (English) heading, which names the place already
  if (!grouped && !has(`rules:title.${inc.rule_id}`)) return inc.title || inc.rule_id;
  const ruleText = grouped ? t(groupKey) : ruleTitle(inc.rule_id, shownArgs(args), inc.title);
  const place = incidentPlace(inc, args);
  if (!place || ruleText.includes(place)) return ruleText;
  return t("incidents:title", { rule_title: ruleText, place });
}

export function badge(sev) {
  return el("span", { class: "badge " + sev, "data-sev": sev }, severityText(sev));
}

/** A time of today as hh:mm, an older one with its date: an operator reads "since 14:02". */
export function when(ms) {
  if (ms == null) return "";
  const day = { dateStyle: "short" };
  return fmtTime(ms, day) === fmtTime(Date.now(), day) ? fmtTime(ms, { timeStyle: "short" })
    : fmtTime(ms, { dateStyle: "short", timeStyle: "short" });
}

export { t, fmtNumber };
