// The sign-in page, translated like the others (the catalogs and /api/config are public).
// The language picked here is kept in this browser; once signed in, the user's own choice
// (stored on the server) wins.
import { applyI18n, consoleConfig, initI18n, lang, setLang, t } from "/static/i18n.js";

const $ = (id) => document.getElementById(id);
let shown = null;  // the error on screen, {key, status}: redrawn when the language changes

function drawError() {
  const err = $("login-error");
  if (!err) return;  // the page was replaced (tests reuse it as an empty page of this site)
  err.hidden = !shown;
  if (shown) err.textContent = t(shown.key, { status: shown.status });
}

async function main() {
  await initI18n();
  const select = $("lang-select");
  if (!select || !$("login-form")) return;  // the page was replaced meanwhile (see drawError)
  for (const l of consoleConfig().langs) {
    const o = document.createElement("option");
    o.value = l; o.lang = l; o.textContent = t(`common:lang.${l}`);
    select.append(o);
  }
  select.value = lang();
  select.addEventListener("change", () => setLang(select.value, { remember: false }));
  document.addEventListener("langchange", drawError);
  applyI18n();
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    shown = null;
    drawError();
    $("login-button").disabled = true;
    try {
      const r = await fetch("/api/login", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ username: $("username").value, password: $("password").value }) });
      if (r.ok) {
        // back to the page that sent us here (?next=/wall), on this site only
        const next = new URLSearchParams(location.search).get("next") || "/";
        location.href = /^\/(?![\/\\])/.test(next) ? next : "/";
        return;
      }
      shown = { key: r.status === 401 ? "login:wrong" : "login:failed", status: String(r.status) };
    } catch (x) {
      shown = { key: "login:offline", status: "" };
    } finally {
      $("login-button").disabled = false;
    }
    drawError();
  });
}
main();
