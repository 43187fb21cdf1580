// "On duty": an operator at the console asks to be called when a new critical incident is
// announced, even with the tab in the background: a browser notification (asked for when
// the toggle is switched on, so the permission prompt follows a click of theirs), a short
// tone made with WebAudio (no sound file to ship or cache), and the item flashes.
// Off by default and remembered in this browser only: being on duty is about this screen
// and this shift, not the account. Viewers do not get the toggle (they cannot act).
import { $, can, session, t, toast, incidentTitle, severityText } from "/static/common.js";

const KEY = "cityops.onduty";
let audio = null;  // AudioContext, created on a click (browsers start audio only after one)

export function onDuty() {
  return can("operator") && localStorage.getItem(KEY) === session.me.user;
}

function draw() {
  const btn = $("duty");
  if (!btn) return;
  const on = onDuty();
  btn.setAttribute("aria-pressed", String(on));
  btn.classList.toggle("on", on);
  const key = on ? "common:duty.on_title" : "common:duty.off_title";
  btn.dataset.i18nTitle = key;
  btn.title = t(key);
}

function unlockAudio() {
  const Ctx = window.AudioContext || window.webkitAudioContext;
  if (!Ctx) return;
  if (!audio) audio = new Ctx();
  if (audio.state === "suspended") audio.resume().catch(() => {});
}

/** Two short tones, loud enough to notice across a control room, short enough not to
 *  annoy the next desk. */
export function chime() {
  if (!audio) return false;
  const now = audio.currentTime;
  for (const [i, freq] of [[0, 880], [1, 660], [2, 880]]) {
    const osc = audio.createOscillator(), gain = audio.createGain();
    osc.type = "square"; osc.frequency.value = freq;
    const start = now + i * 0.22;
    gain.gain.setValueAtTime(0.0001, start);
    gain.gain.exponentialRampToValueAtTime(0.25, start + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, start + 0.18);
    osc.connect(gain).connect(audio.destination);
    osc.start(start); osc.stop(start + 0.2);
  }
  return true;
}

async function toggle() {
  if (onDuty()) {
    localStorage.removeItem(KEY);
  } else {
    localStorage.setItem(KEY, session.me.user);
    unlockAudio();
    if (!("Notification" in window)) toast(t("common:duty.unsupported"));
    else if (Notification.permission === "default") {
      const answer = await Notification.requestPermission();
      if (answer !== "granted") toast(t("common:duty.denied"));
    } else if (Notification.permission === "denied") toast(t("common:duty.denied"));
  }
  draw();
}

/** Show the toggle to operators and supervisors; call once the header is translated. */
export function setupDuty() {
  const btn = $("duty");
  if (!btn || !can("operator")) return;
  btn.hidden = false;
  btn.addEventListener("click", toggle);
  // a remembered "on" needs one click on the page before the browser lets it play sound
  if (onDuty()) document.addEventListener("pointerdown", unlockAudio, { once: true });
  document.addEventListener("langchange", draw);
  draw();
}

/** The announcement of an incident reached this page: call the operator if it is a
 *  critical one and they are on duty. Returns whether it did. */
export function announce(change) {
  const inc = change.incident;
  if (change.action !== "announced" || inc.severity !== "critical" || !onDuty()) return false;
  chime();
  if ("Notification" in window && Notification.permission === "granted") {
    let n;
    try {
      n = new Notification(t("common:duty.notify_title", { severity: severityText(inc.severity) }), {
        body: incidentTitle(inc),
        tag: `incident-${inc.incident_id}`, requireInteraction: true, lang: document.documentElement.lang,
      });
    } catch (e) {
      return true;  // some browsers only notify from a service worker: sound and flash still do
    }
    n.onclick = () => { window.focus(); location.href = `/incident/${inc.incident_id}`; n.close(); };
  }
  return true;
}
