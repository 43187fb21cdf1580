// Translations and local formats for every console page (i18next from npm, served by the
// console under /vendor). Catalogs come from the server (GET /api/i18n/<lang>: the files in
// alerts/i18n/<lang>/*.json, one namespace each, plus the rules file's titles); placeholders
// are {name}, the same syntax as rule titles. Times are always shown in the center's zone
// (Asia/Ho_Chi_Minh by default), whatever the browser's; numbers and dates in the user's
// language. The user's choice is remembered on the server (PUT /api/me/lang) and in this
// browser (localStorage), so a wall screen without a login keeps it too.
import i18next from "/vendor/i18next/i18next.js";

const STORE_KEY = "cityops.lang";
let config = { default_lang: "vi", langs: ["vi", "en"], timezone: "Asia/Ho_Chi_Minh", map_style_url: "" };
const LOCALES = { vi: "vi-VN", en: "en-GB" };

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
  return r.json();
}

/** The console's configuration (language default, zone, map style). */
export function consoleConfig() { return config; }

/** Load the configuration and the catalog of the user's language; call once per page.
 *  ``userLang``: the language stored for the logged-in user (GET /api/me), if any. */
export async function initI18n(userLang = null) {
  config = await getJSON("/api/config");
  const stored = localStorage.getItem(STORE_KEY);
  const lng = [userLang, stored, config.default_lang].find((l) => l && config.langs.includes(l));
  const resources = { [lng]: await getJSON(`/api/i18n/${lng}`) };
  await i18next.init({
    lng, resources, defaultNS: "common", ns: Object.keys(resources[lng]),
    fallbackLng: false, returnEmptyString: false,
    // single braces, like rule titles; values are put into the page as text, never HTML
    interpolation: { prefix: "{", suffix: "}", escapeValue: false },
  });
  localStorage.setItem(STORE_KEY, lng);
  document.documentElement.lang = lng;
  return lng;
}

/** The current language code (vi | en). */
export function lang() { return i18next.language; }

/** A message: ``ns:path.key`` (namespace common when omitted), with {values}. */
export function t(key, values = {}) { return i18next.t(key, values); }

/** Whether a message exists in the current language. */
export function has(key) { return i18next.exists(key); }

/** Place names in the current language: landmark_name / district_name from their codes. */
export function placeValues(args = {}) {
  const out = { ...args };
  if (args.landmark && has(`places:landmarks.${args.landmark}`)) out.landmark_name = t(`places:landmarks.${args.landmark}`);
  if (args.district && has(`places:districts.${args.district}`)) out.district_name = t(`places:districts.${args.district}`);
  return out;
}

/** A rule's title from its template and the alert's or incident's template values;
 *  ``fallback`` (the server's English text) when the rule is unknown. */
export function ruleTitle(ruleId, args = {}, fallback = "") {
  const key = `rules:title.${ruleId}`;
  return has(key) ? t(key, placeValues(args)) : (fallback || ruleId);
}

/** Fill every [data-i18n] element's text and [data-i18n-<attr>] attribute under root. */
export function applyI18n(root = document) {
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const attr of ["title", "placeholder", "aria-label", "alt"]) {
    const data = "i18n" + attr.split("-").map((p) => p[0].toUpperCase() + p.slice(1)).join("");
    for (const el of root.querySelectorAll(`[data-i18n-${attr}]`)) el.setAttribute(attr, t(el.dataset[data]));
  }
}

/** Switch language: remembered for the user (server) and this browser; every
 *  [data-i18n] is refilled and a ``langchange`` event tells the page to redraw the rest. */
export async function setLang(lng, { remember = true } = {}) {
  if (!config.langs.includes(lng)) return;
  if (!i18next.hasResourceBundle(lng, "common")) {
    const res = await getJSON(`/api/i18n/${lng}`);
    for (const [ns, bundle] of Object.entries(res)) i18next.addResourceBundle(lng, ns, bundle, true, true);
  }
  await i18next.changeLanguage(lng);
  localStorage.setItem(STORE_KEY, lng);
  document.documentElement.lang = lng;
  if (remember) {
    const csrf = document.body.dataset.csrf || "";
    await fetch("/api/me/lang", { method: "PUT", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ lang: lng }) }).catch(() => {});
  }
  applyI18n();
  document.dispatchEvent(new CustomEvent("langchange", { detail: lng }));
}

function locale() { return LOCALES[lang()] || lang(); }

/** Epoch ms as a time in the center's zone, in the user's language. */
export function fmtTime(ms, opts = { dateStyle: "short", timeStyle: "medium" }) {
  if (ms == null) return "";
  return new Intl.DateTimeFormat(locale(), { timeZone: config.timezone, ...opts }).format(new Date(ms));
}

/** A number in the user's language (separators). */
export function fmtNumber(n, opts = {}) {
  if (n == null || Number.isNaN(n)) return "";
  return new Intl.NumberFormat(locale(), opts).format(n);
}

/** "5 minutes ago" in the user's language. */
export function fmtAgo(ms, now = Date.now()) {
  const s = Math.round((ms - now) / 1000);
  const rtf = new Intl.RelativeTimeFormat(locale(), { numeric: "auto" });
  const abs = Math.abs(s);
  if (abs < 60) return rtf.format(s, "second");
  if (abs < 3600) return rtf.format(Math.round(s / 60), "minute");
  if (abs < 86400) return rtf.format(Math.round(s / 3600), "hour");
  return rtf.format(Math.round(s / 86400), "day");
}
