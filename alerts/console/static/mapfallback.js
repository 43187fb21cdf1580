// The console's maps: the city map of static/map.js (MapLibre) when the page can load it,
// else the server's SVG drawing of Can Tho (GET /api/map.svg) coloured by incident, so a
// page never breaks or waits because the richer map is missing or fails.
import { SEV, districtName, placeName, t } from "/static/common.js";
import { has } from "/static/i18n.js";

let serverNames = null;  // the SVG's district labels (server names) -> district codes

/** ``{map, svg}``: the map.js handle (null without it or without WebGL), or whether the
 *  SVG was drawn instead. ``opts`` go to createCityMap; ``view`` (center | city) is the
 *  SVG's. */
export async function cityMap(container, opts = {}) {
  try {
    const mod = await import("./map.js");
    const map = await mod.createCityMap(container, opts);
    // its sensors, coloured by state; a failure leaves the map with its incidents
    if (typeof map.refreshSensors === "function") map.refreshSensors().catch(() => {});
    // which map is drawn, once it has painted (tests wait for it before screenshots)
    await new Promise((done) => { if (map.map && map.map.once) map.map.once("idle", done); setTimeout(done, 5000); });
    container.dataset.map = "city";
    return { map, svg: false };
  } catch (e) {
    const svg = await loadSvg(container, opts.view || "center");
    container.dataset.map = svg ? "svg" : "none";
    return { map: null, svg };
  }
}

export async function loadSvg(container, view) {
  try {
    const r = await fetch("/api/map.svg?view=" + encodeURIComponent(view));
    if (!r.ok) return false;
    const text = await r.text();
    container.innerHTML = text;  // our own server's SVG; its labels are escaped there
    if (!container.querySelector("svg")) return false;
    if (serverNames === null) {
      serverNames = {};
      try {
        const places = await (await fetch("/api/places")).json();
        for (const [code, name] of Object.entries(places.districts)) serverNames[name] = code;
      } catch (e) { /* labels stay as the server wrote them */ }
    }
    translateSvg(container);
    return true;
  } catch (e) {
    return false;
  }
}

/** The SVG's names are the server's (English): put the user's language in, by the codes
 *  its elements carry; called again when the language changes. */
export function translateSvg(container) {
  const svg = container.querySelector("svg");
  if (!svg) return;
  // a group, not an image: it holds links to the sensors' pages
  svg.setAttribute("role", "group");
  svg.setAttribute("aria-label", t("common:map_label"));
  for (const e of svg.querySelectorAll(".district[data-district] > title")) e.textContent = districtName(e.parentElement.dataset.district);
  for (const e of svg.querySelectorAll(".road[data-landmark] > title, .landmark[data-landmark] > title")) {
    e.textContent = placeName(e.parentElement.dataset.landmark, "");
  }
  for (const e of svg.querySelectorAll(".district-label")) {
    const code = e.dataset.district || (serverNames || {})[e.textContent];
    if (code) { e.dataset.district = code; e.textContent = districtName(code); }
  }
  const river = svg.querySelector(".river > title");
  if (river && has("places:river")) river.textContent = t("places:river");
  for (const e of svg.querySelectorAll("circle.sensor > title")) {
    const [sid, type] = [e.parentElement.dataset.sensor, (e.textContent.match(/\(([^)]*)\)$/) || [])[1]];
    const typeKey = `sensor:type.${e.parentElement.dataset.type || type}`;
    if (type && has(typeKey)) { e.parentElement.dataset.type = e.parentElement.dataset.type || type; e.textContent = `${sid} (${t(typeKey)})`; }
  }
}

/** Districts, roads and landmarks in the colour of their worst open incident. */
export function colourSvg(container, incidents) {
  const svg = container.querySelector("svg");
  if (!svg) return;
  svg.querySelectorAll("[class*='alert-']").forEach((e) => e.classList.remove(...SEV.map((s) => "alert-" + s)));
  const worst = (m, k, s) => { if (k && (!m.has(k) || SEV.indexOf(s) < SEV.indexOf(m.get(k)))) m.set(k, s); };
  const byDistrict = new Map(), byLandmark = new Map();
  for (const i of incidents) { worst(byDistrict, i.district, i.severity); worst(byLandmark, i.landmark, i.severity); }
  for (const [k, s] of byDistrict) svg.querySelectorAll(`.district[data-district="${CSS.escape(k)}"]`).forEach((e) => e.classList.add("alert-" + s));
  for (const [k, s] of byLandmark) svg.querySelectorAll(`.road[data-landmark="${CSS.escape(k)}"], .landmark[data-landmark="${CSS.escape(k)}"]`).forEach((e) => e.classList.add("alert-" + s));
}
