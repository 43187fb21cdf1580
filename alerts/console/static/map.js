// Can Tho on a MapLibre GL map, for every console page (the index, an incident's inset, the
// wall). Works offline: with no tile server configured (/api/config map_style_url empty) the
// style is built here from the shipped GeoJSON (static/geo/cantho.geojson: districts, the
// Hau river, roads, landmarks), no tiles, no network. With a style URL, that is the base and
// our layers go on top. Symbol text would need glyph PBFs we do not ship, so every label
// (district and landmark names, in the user's language) is an HTML marker instead.
//
//   const m = await createCityMap(el, { onIncident: (id) => open(id) });
//   m.setSensors(await (await fetch("/api/map/sensors")).json());   // or m.refreshSensors()
//   m.setIncidents(incidents);   // as GET /api/incidents returns them
//   m.focusDistrict("ninh_kieu"); m.fitCity(); m.resize();  m.map is the maplibregl.Map
import * as maplibregl from "/vendor/maplibre-gl/maplibre-gl.mjs";
import { consoleConfig, ruleTitle, t } from "./i18n.js";

export const GEO_URL = "/static/geo/cantho.geojson";
export const SENSORS_URL = "/api/map/sensors";
// Severity colours: the same as app.css (--critical ... --info); states of a sensor add
// offline and ok.
export const COLORS = {
  critical: "#d32f2f", major: "#ef6c00", minor: "#f9a825", warning: "#1e88e5", info: "#78909c",
  offline: "#c7ced6", ok: "#43a047",
};
// Worst first: a cluster takes the colour of its worst member.
export const STATES = ["critical", "major", "minor", "warning", "offline", "info", "ok"];
const INCIDENT_PX = { critical: 40, major: 32, minor: 26, warning: 22, info: 18 };
const DISTRICT_TINT = { critical: "#5a1f22", major: "#5a3416", minor: "#55491a", warning: "#1b3a5a", info: "#33403f" };
const LAND = ["#1f2a22", "#243028"];
// Where a district's name sits relative to its centre ([anchor, offset px]): below it, clear
// of the sensors around the centre; the three small urban districts are close together,
// so their names are pushed apart.
const LABEL_PLACE = {
  ninh_kieu: ["left", [16, -6]], cai_rang: ["top-left", [4, 12]], binh_thuy: ["bottom-left", [8, -8]],
};
const LABEL_DEFAULT = ["top", [0, 14]];
const LANDMARK_LABEL_ZOOM = 12.5; // landmark names only when zoomed into a part of the city

const rankExpr = ["match", ["get", "state"], ...STATES.flatMap((s, i) => [s, i]), STATES.length - 1];
const colorOf = (expr) => ["match", expr, ...STATES.flatMap((s, i) => [i, COLORS[s]]), COLORS.ok];

function ensureCss(href) {
  if (![...document.querySelectorAll("link[rel=stylesheet]")].some((l) => l.getAttribute("href") === href)) {
    const link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = href;
    document.head.append(link);
  }
}

function bboxOf(coords, box = [Infinity, Infinity, -Infinity, -Infinity]) {
  for (const c of coords) {
    if (typeof c[0] === "number") {
      box[0] = Math.min(box[0], c[0]); box[1] = Math.min(box[1], c[1]);
      box[2] = Math.max(box[2], c[0]); box[3] = Math.max(box[3], c[1]);
    } else bboxOf(c, box);
  }
  return box;
}

const ofKind = (fc, ...kinds) => ({ type: "FeatureCollection", features: fc.features.filter((f) => kinds.includes(f.properties.kind)) });

/** The layers of our own, added on top of whatever base style the map has. */
function addCityLayers(map, geo, withBase) {
  map.addSource("cityops-districts", { type: "geojson", data: ofKind(geo, "district"), promoteId: "code" });
  map.addSource("cityops-river", { type: "geojson", data: ofKind(geo, "river") });
  map.addSource("cityops-roads", { type: "geojson", data: ofKind(geo, "road", "arterial") });
  map.addSource("cityops-landmarks", { type: "geojson", data: ofKind(geo, "landmark") });
  const codes = geo.features.filter((f) => f.properties.kind === "district").map((f) => f.properties.code);
  map.addLayer({ id: "cityops-districts-fill", type: "fill", source: "cityops-districts", paint: {
    "fill-color": ["case",
      ["!=", ["feature-state", "incident"], null],
      ["match", ["feature-state", "incident"], ...Object.entries(DISTRICT_TINT).flat(), LAND[0]],
      ["match", ["get", "code"], ...codes.flatMap((c, i) => [c, LAND[i % 2]]), LAND[0]]],
    "fill-opacity": withBase ? 0.35 : 1 } });
  // borders under the river (the city's runs mid-river), the focused district's over it
  map.addLayer({ id: "cityops-districts-line", type: "line", source: "cityops-districts",
    paint: { "line-color": "#5d7064", "line-width": 1.2 } });
  if (!withBase) {
    map.addLayer({ id: "cityops-river", type: "fill", source: "cityops-river",
      paint: { "fill-color": "#1d4a66", "fill-outline-color": "#2d6a8f" } });
  }
  map.addLayer({ id: "cityops-districts-focus", type: "line", source: "cityops-districts", paint: {
    "line-color": "#ffd54f", "line-width": 4,
    "line-opacity": ["case", ["boolean", ["feature-state", "focus"], false], 1, 0] } });
  if (!withBase) {
    map.addLayer({ id: "cityops-roads", type: "line", source: "cityops-roads",
      filter: ["==", ["get", "kind"], "road"], layout: { "line-cap": "round", "line-join": "round" },
      paint: { "line-color": "#8d7d5a", "line-width": ["interpolate", ["linear"], ["zoom"], 9, 1.5, 14, 5] } });
  }
  map.addLayer({ id: "cityops-arterials", type: "line", source: "cityops-roads",
    filter: ["==", ["get", "kind"], "arterial"], layout: { "line-cap": "round" },
    paint: { "line-color": "#d9c48f", "line-width": ["interpolate", ["linear"], ["zoom"], 9, 2, 14, 7] } });
  map.addLayer({ id: "cityops-landmarks", type: "circle", source: "cityops-landmarks",
    filter: ["!=", ["get", "landmark_kind"], "arterial"],
    paint: { "circle-radius": ["interpolate", ["linear"], ["zoom"], 9, 3, 14, 6], "circle-color": "#e8edf2",
      "circle-stroke-color": "#101418", "circle-stroke-width": 1 } });
  // sensors: clustered, coloured by state (a cluster by its worst member), sized by count
  map.addSource("cityops-sensors", { type: "geojson", data: { type: "FeatureCollection", features: [] },
    cluster: true, clusterRadius: 28, clusterMaxZoom: 15, clusterProperties: { worst: ["min", rankExpr] } });
  map.addLayer({ id: "cityops-clusters", type: "circle", source: "cityops-sensors", filter: ["has", "point_count"],
    paint: { "circle-color": colorOf(["get", "worst"]), "circle-opacity": 0.85,
      "circle-radius": ["step", ["get", "point_count"], 9, 10, 13, 50, 18, 200, 24, 1000, 30],
      "circle-stroke-color": "#101418", "circle-stroke-width": 2 } });
  map.addLayer({ id: "cityops-sensors", type: "circle", source: "cityops-sensors", filter: ["!", ["has", "point_count"]],
    paint: { "circle-color": colorOf(rankExpr),
      "circle-radius": ["match", ["get", "state"], "ok", 4, "info", 5, "offline", 5, 7],
      "circle-stroke-color": "#101418", "circle-stroke-width": 1.2 } });
}

/** A label (an HTML marker: MapLibre's own text needs glyphs we do not ship). */
function label(map, lngLat, cls, [anchor, offset] = ["center", [0, 0]]) {
  const el = document.createElement("div");
  el.className = `cityops-label ${cls}`;
  return { el, marker: new maplibregl.Marker({ element: el, anchor, offset }).setLngLat(lngLat).addTo(map) };
}

/** Create the map in ``container``; resolves once it is drawn with the city's layers.
 *  opts: onIncident(id) (default: open /incident/<id>), onSensor(id) (default: open
 *  /sensor/<id>), interactive (default true), styleUrl (default /api/config's
 *  map_style_url), padding (fit padding in px or {top, right, bottom, left}, default 24),
 *  preserveDrawingBuffer (default false). Throws where WebGL is missing. */
export async function createCityMap(container, opts = {}) {
  ensureCss("/vendor/maplibre-gl/maplibre-gl.css");
  ensureCss("/static/map.css");
  const styleUrl = opts.styleUrl ?? consoleConfig().map_style_url ?? "";
  const geo = await (await fetch(GEO_URL, { credentials: "same-origin" })).json();
  const districts = Object.fromEntries(geo.features.filter((f) => f.properties.kind === "district")
    .map((f) => [f.properties.code, f]));
  const cityBox = bboxOf(Object.values(districts).map((f) => f.geometry.coordinates));
  const padding = opts.padding ?? 24;
  container.classList.add("cityops-map");
  if (!container.hasAttribute("aria-label")) container.setAttribute("aria-label", t("map:aria"));
  const map = new maplibregl.Map({
    container,
    style: styleUrl || { version: 8, sources: {}, layers: [
      { id: "background", type: "background", paint: { "background-color": "#0e1317" } }] },
    bounds: [[cityBox[0], cityBox[1]], [cityBox[2], cityBox[3]]],
    fitBoundsOptions: { padding },
    attributionControl: styleUrl ? { compact: true } : false,
    interactive: opts.interactive ?? true,
    dragRotate: false, pitchWithRotate: false, touchPitch: false,
    // keep the last frame readable (tests sample its pixels; screenshots of the canvas)
    canvasContextAttributes: { preserveDrawingBuffer: !!opts.preserveDrawingBuffer },
  });
  await new Promise((resolve, reject) => {
    map.once("load", resolve);
    map.once("error", (e) => { if (!map.loaded()) reject(e.error || e); });
  });
  addCityLayers(map, geo, !!styleUrl);

  // --- labels, in the user's language (redrawn on langchange) ---
  const labels = [];
  for (const [code, f] of Object.entries(districts)) {
    const { el } = label(map, f.properties.center, "district", LABEL_PLACE[code] || LABEL_DEFAULT);
    el.dataset.district = code;
    labels.push([el, `places:districts.${code}`]);
  }
  for (const f of geo.features.filter((x) => x.properties.kind === "landmark")) {
    const { el } = label(map, f.geometry.coordinates, "landmark", ["left", [6, 0]]);
    el.dataset.landmark = f.properties.code;
    labels.push([el, `places:landmarks.${f.properties.code}`]);
  }
  const drawLabels = () => { for (const [el, key] of labels) el.textContent = t(key); };
  drawLabels();
  const onLang = () => { drawLabels(); drawIncidents(); };
  document.addEventListener("langchange", onLang);
  const zoomClass = () => container.classList.toggle("cityops-zoomed", map.getZoom() >= LANDMARK_LABEL_ZOOM);
  map.on("zoomend", zoomClass);
  zoomClass();

  // --- sensors ---
  const openSensor = opts.onSensor || ((id) => { location.href = `/sensor/${encodeURIComponent(id)}`; });
  map.on("click", "cityops-sensors", (e) => { const f = e.features?.[0]; if (f) openSensor(f.properties.sensor_id); });
  map.on("click", "cityops-clusters", async (e) => {
    const f = e.features?.[0];
    if (!f) return;
    const zoom = await map.getSource("cityops-sensors").getClusterExpansionZoom(f.properties.cluster_id);
    map.easeTo({ center: f.geometry.coordinates, zoom });
  });
  for (const layer of ["cityops-sensors", "cityops-clusters"]) {
    map.on("mouseenter", layer, () => { map.getCanvas().style.cursor = "pointer"; });
    map.on("mouseleave", layer, () => { map.getCanvas().style.cursor = ""; });
  }

  // --- incidents: HTML markers sized by severity ---
  const openIncident = opts.onIncident || ((id) => { location.href = `/incident/${encodeURIComponent(id)}`; });
  let incidents = [];
  let incidentMarkers = [];
  let tinted = [];
  const landmarks = Object.fromEntries(geo.features.filter((f) => f.properties.kind === "landmark")
    .map((f) => [f.properties.code, f.geometry.coordinates]));
  const placeOf = (i) => (i.lat != null && i.lon != null ? [i.lon, i.lat]
    : landmarks[i.landmark] || districts[i.district]?.properties.center || null);
  function drawIncidents() {
    for (const m of incidentMarkers) m.remove();
    incidentMarkers = [];
    for (const code of tinted) map.setFeatureState({ source: "cityops-districts", id: code }, { incident: null });
    const worst = {};
    // worst last, so the biggest marker is drawn on top
    const sorted = [...incidents].sort((a, b) => STATES.indexOf(b.severity) - STATES.indexOf(a.severity));
    for (const inc of sorted) {
      if (inc.district && districts[inc.district]
          && (!worst[inc.district] || STATES.indexOf(inc.severity) < STATES.indexOf(worst[inc.district]))) {
        worst[inc.district] = inc.severity;
      }
      const at = placeOf(inc);
      if (!at) continue;
      const el = document.createElement("button");
      el.type = "button";
      el.className = `cityops-incident sev-${inc.severity}`;
      el.dataset.incidentId = inc.incident_id;
      el.dataset.severity = inc.severity;
      const px = INCIDENT_PX[inc.severity] || 18;
      el.style.width = el.style.height = `${px}px`;
      const title = ruleTitle(inc.rule_id, inc.title_args || {}, inc.title);
      el.title = title;
      el.setAttribute("aria-label", t("map:incident", { severity: t(`severity.${inc.severity}`), title }));
      el.addEventListener("click", (e) => { e.stopPropagation(); openIncident(inc.incident_id); });
      incidentMarkers.push(new maplibregl.Marker({ element: el }).setLngLat(at).addTo(map));
    }
    tinted = Object.keys(worst);
    for (const [code, sev] of Object.entries(worst)) map.setFeatureState({ source: "cityops-districts", id: code }, { incident: sev });
  }

  let focused = null;
  const fit = (box, animate) => map.fitBounds([[box[0], box[1]], [box[2], box[3]]],
    { padding, duration: animate === false ? 0 : 1200 });
  const api = {
    map,
    /** Replace the sensors (a GeoJSON FeatureCollection as GET /api/map/sensors gives);
     *  resolves once the map's worker has them. */
    setSensors(fc) { return map.getSource("cityops-sensors").setData(fc); },
    /** Fetch GET /api/map/sensors and show it; resolves to the number of sensors. */
    async refreshSensors() {
      const r = await fetch(SENSORS_URL, { credentials: "same-origin" });
      if (!r.ok) throw new Error(`${SENSORS_URL}: ${r.status}`);
      const fc = await r.json();
      await api.setSensors(fc);
      return fc.features.length;
    },
    /** Replace the incident markers (objects as GET /api/incidents returns them; without
     *  lat/lon an incident sits on its landmark or district). Districts are tinted by
     *  their worst incident. */
    setIncidents(list) { incidents = [...(list || [])]; drawIncidents(); },
    /** Zoom to a district and outline it (null: no outline). */
    focusDistrict(code, { animate = true } = {}) {
      if (focused) map.setFeatureState({ source: "cityops-districts", id: focused }, { focus: false });
      focused = districts[code] ? code : null;
      if (!focused) return;
      map.setFeatureState({ source: "cityops-districts", id: code }, { focus: true });
      fit(bboxOf(districts[code].geometry.coordinates), animate);
    },
    /** The whole city in view (and no district outlined). */
    fitCity({ animate = true } = {}) {
      if (focused) map.setFeatureState({ source: "cityops-districts", id: focused }, { focus: false });
      focused = null;
      fit(cityBox, animate);
    },
    /** Call after the container changed size. */
    resize() { map.resize(); },
    /** District codes, in the order of cityops/city.py. */
    districts: Object.keys(districts),
    /** Remove the map and its listeners. */
    remove() { document.removeEventListener("langchange", onLang); map.remove(); },
  };
  return api;
}
