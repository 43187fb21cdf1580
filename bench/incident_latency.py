"""Incident latency: a new critical incident, from a panic button's MQTT publish to an open
console in a browser, under a background load of at least 5,000 readings/s (issue 16:
"a new critical incident reaches an open browser in p99 < 1 s").

Why a benchmark of its own: the e2e bench stops its alert clock at the alert row, and
bench/alert_latency.py starts its clock on Kafka and ends at an HTTP client. What an
operator waits for is neither: the press goes sensor -> Mosquitto -> ingest -> Kafka
(events) -> alerts (rule, alert and incident in one PostgreSQL transaction) -> Kafka
(incidents) -> console (feed, SSE) -> a page in a browser. Every piece here is the real
one: a ``City`` (own stack, real ``cityops`` worker processes: ingest, process, alerts and
console), the e2e bench's gateway load generator (``cityops simulate`` shards), a viewer
logged in to the console in headless Chromium.

What it measures:
  * latency publish -> browser: N panic presses (MQTT QoS 1, as the fault matrix scripts
    them, each at a different button, ~1-2 s apart); the page runs an
    ``EventSource('/api/stream')`` listener (installed with ``page.evaluate``) that stamps
    ``Date.now()`` on the first ``opened``/``announced`` change of each critical incident.
    One clock: the browser, PostgreSQL, Kafka and this script share the machine's.
  * where the time goes, per incident: the broker's PUBACK; ingest's receive time (the
    press's events record) and when a plain consumer here saw that record; the incident
    row's ``created_at`` (the alerts worker's transaction start) and its commit
    (``track_commit_timestamp``); the incidents record's Kafka CreateTime (the alerts
    worker's producer); a plain consumer of the incidents topic here (what the console's
    feed sees) and a plain HTTP client of ``/api/stream`` (the console's share); the
    browser; and when the console's incident list shows it (``li[data-incident-id]``), if
    the page has such a list. Plus what kept the page busy: its long tasks (main thread
    busy > 50 ms, during which no event handler runs) and the alerts raised meanwhile.
  * the same-run baseline, "the Kafka hop": small records produced to a scratch topic
    and consumed, in a child process, during the same load, with the services' batching
    (``cityops/settings.py``: producer linger/codec/acks/idempotence of ingest; consumer
    ``kafka_fetch_min_bytes``/``kafka_fetch_max_wait_ms`` of the processors and alerts);
    and a second consumer with aiokafka's defaults (fetch as soon as one byte is there),
    which is how the console's feed reads the incidents topic.
  * the background load actually carried during the measurement: sensor readings (the
    ingest's ``cityops_ingest_events_total``) and values (narrow ``readings`` rows, the
    processor's ``cityops_process_rows_written_total``) per second between the first
    injection and the last browser receipt, plus the publishers' own figures.

Each press must open a NEW incident, so the rules are the default rules with
``panic_button`` grouped by sensor (``group: {by: [sensor], wait_s: 0}``): by default its
alerts group by landmark, and every press at one wharf would join one open incident.
Buttons that already have an open incident are not used.

Usage (benchmarks only under the machine's lock; a run takes 3-4 minutes)::

    flock /tmp/cityops-bench.lock .venv/bin/python bench/incident_latency.py
    flock /tmp/cityops-bench.lock .venv/bin/python bench/incident_latency.py \\
        --rate 220 --injections 45 --profile

Writes ``bench/results/incident_latency.json`` and prints a short table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from bench.e2e import profile as profiling  # noqa: E402
from bench.e2e.run import (  # noqa: E402
    LoadStats,
    _kill_publishers,
    enable_commit_timestamps,
    machine,
    merge_expected,
    percentiles,
    publish_sharded,
    scaled_fleet,
)
from cityops.registry import Sensor, load_fleet  # noqa: E402
from cityops.settings import DEFAULT_RULES, Settings  # noqa: E402
from cityops.supervisor import metric_sum, scrape  # noqa: E402
from tests.e2e_harness import City, city_pids, tree_cpu  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET_P99_S = 1.0
TARGET_READINGS_PER_S = 5000.0
RULE = "panic_button"
# What makes each press a new incident (see the module docstring).
NEW_INCIDENT_GROUP: dict[str, Any] = {"by": ["sensor"], "wait_s": 0}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWER = "bench-viewer"


# --- pure helpers (tests/test_bench_incident_latency.py) ------------------------------------
def new_incident_rules(default_text: str, rule_id: str = RULE,
                       group: dict[str, Any] | None = None) -> str:
    """The default rules with ``rule_id`` grouped so that each of its alerts at another
    sensor opens an incident of its own (the rest of the file unchanged)."""
    doc = yaml.safe_load(default_text)
    rules = [r for r in doc["rules"] if r["id"] == rule_id]
    if len(rules) != 1:
        raise ValueError(f"rule {rule_id!r} not found once in the rules file")
    rules[0]["group"] = dict(group or NEW_INCIDENT_GROUP)
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def group_key(sensor_id: str, rule_id: str = RULE) -> str:
    """The incident group key of a press at ``sensor_id`` under ``NEW_INCIDENT_GROUP``,
    as ``alerts.incidents.grouping.group_of`` builds it."""
    return f"{rule_id}|sensor={sensor_id}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either is missing (a figure that was not measured
    must not turn into a ratio of 0 or infinity)."""
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 2)


def spread(items: Sequence[Sensor], n: int, key: str = "landmark") -> list[Sensor]:
    """``n`` items taken round-robin over the values of ``key`` (both panic-button
    landmarks, not the first n of one), in their order within each value."""
    by: dict[str, list[Sensor]] = {}
    for s in items:
        by.setdefault(str(getattr(s, key)), []).append(s)
    out: list[Sensor] = []
    queues = [list(v) for _, v in sorted(by.items())]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


@dataclass
class Press:
    """One injected panic press and what became of it (wall seconds, one clock)."""

    sensor_id: str
    published: float
    event_ms: int = 0  # the press's event time (the wall clock, epoch ms)
    puback: float | None = None
    ingested: float | None = None  # ingest received the MQTT message (its receive time)
    on_events: float | None = None  # a plain consumer of the events topic got it
    incident_id: int | None = None
    created: float | None = None  # incident row created_at (the transaction's start)
    committed: float | None = None  # pg_xact_commit_timestamp of that transaction
    kafka: float | None = None  # incidents record CreateTime (the alerts producer)
    feed: float | None = None  # a plain consumer of the incidents topic got it
    sse: float | None = None  # an HTTP client of the console's /api/stream got it
    browser: float | None = None  # the page's EventSource got it
    listed: float | None = None  # the console's incident list showed it
    action: str | None = None  # the first change the browser saw: opened | announced


SEGMENTS: tuple[tuple[str, str, str], ...] = (
    ("publish_to_browser", "published", "browser"),
    ("publish_to_puback", "published", "puback"),
    ("publish_to_sse", "published", "sse"),
    ("publish_to_created", "published", "created"),
    ("created_to_browser", "created", "browser"),
    ("publish_to_ingested", "published", "ingested"),
    ("ingested_to_events", "ingested", "on_events"),
    ("events_to_created", "on_events", "created"),
    ("created_to_committed", "created", "committed"),
    ("committed_to_kafka", "committed", "kafka"),
    ("kafka_to_feed", "kafka", "feed"),
    ("kafka_to_sse", "kafka", "sse"),
    ("sse_to_browser", "sse", "browser"),
    ("kafka_to_browser", "kafka", "browser"),
    ("browser_to_listed", "browser", "listed"),
)


def breakdown(presses: Sequence[Press]) -> dict[str, dict[str, float | int | None]]:
    """Percentiles (ms) of each leg between two stamps, over the presses that have both."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name, a, b in SEGMENTS:
        vals = [getattr(p, b) - getattr(p, a) for p in presses
                if getattr(p, a) is not None and getattr(p, b) is not None]
        out[name] = percentiles(vals)
    return out


# --- the Kafka hop (a child process: its own event loop, like a service) ----------------------
@dataclass(frozen=True)
class HopConfig:
    bootstrap: str
    topic: str
    partitions: int
    hz: float
    codec: str | None
    linger_ms: int
    idempotent: bool
    max_batch_bytes: int
    fetch_min_bytes: int
    fetch_max_wait_ms: int


async def _hop(cfg: HopConfig, stop: Any, ready: Any, counting: Any) -> dict[str, Any]:
    """Produce a small record every 1/hz s; two consumers stamp their arrival. Only
    records sent once ``counting`` is set count: the hop warms up with the load."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.bootstrap)
    await admin.start()
    try:  # the local broker creates no topic on its own (auto.create.topics.enable=false)
        await admin.create_topics([NewTopic(cfg.topic, cfg.partitions, 1,
                                            topic_configs={"retention.ms": "600000"})])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(  # ingest's producer settings (ingest/kafka.py)
        bootstrap_servers=cfg.bootstrap, acks="all", enable_idempotence=cfg.idempotent,
        compression_type=cfg.codec, linger_ms=cfg.linger_ms, max_batch_size=cfg.max_batch_bytes)
    consumers = {  # the processors' and alerts' fetch; the console feed's (aiokafka defaults)
        "services": AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap, enable_auto_commit=False,
                                     fetch_min_bytes=cfg.fetch_min_bytes,
                                     fetch_max_wait_ms=cfg.fetch_max_wait_ms),
        "feed": AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap, enable_auto_commit=False),
    }
    sent: dict[int, float] = {}
    got: dict[str, dict[int, float]] = {name: {} for name in consumers}
    await producer.start()
    for c in consumers.values():
        await c.start()
        deadline = time.monotonic() + 30
        while not c.partitions_for_topic(cfg.topic):
            await c._client.force_metadata_update()
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {cfg.topic} not in the metadata")
            await asyncio.sleep(0.1)
        c.assign([TopicPartition(cfg.topic, p) for p in c.partitions_for_topic(cfg.topic)])
        await c.seek_to_end()

    async def consume(name: str, c: Any) -> None:
        while True:
            batch = await c.getmany(timeout_ms=1000)
            t = time.time()
            for msgs in batch.values():
                for m in msgs:
                    got[name].setdefault(struct.unpack(">Q", m.key)[0], t)

    tasks = [asyncio.create_task(consume(n, c)) for n, c in consumers.items()]
    ready.set()
    try:
        seq = 0
        nxt = time.monotonic()
        while not stop.is_set():
            key = struct.pack(">Q", seq)
            t_send = time.time()
            await producer.send(cfg.topic, key + b"cityops-bench-hop", key=key)
            if counting.is_set():
                sent[seq] = t_send
            seq += 1
            nxt += 1 / cfg.hz
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
        await producer.flush()
        await asyncio.sleep(1.5)  # the last fetches (services' settings: up to 0.5 s)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for c in consumers.values():
            await c.stop()
        await producer.stop()
    return {"sent": len(sent), **{name: [r[k] - sent[k] for k in sent if k in r]
                                  for name, r in got.items()}}


def _hop_main(cfg: HopConfig, stop: Any, ready: Any, counting: Any, out: Any) -> None:
    """Child process entry: run the hop until ``stop``, put its latencies on ``out``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when it ends
    try:
        out.put(asyncio.run(_hop(cfg, stop, ready, counting)))
    except BaseException as exc:
        out.put({"error": repr(exc)})
        raise


class KafkaHop:
    """The baseline in a child process, so its clock is not held up by this process's
    event loop (Playwright, PostgreSQL queries) or the injector thread."""

    def __init__(self, settings: Settings, hz: float) -> None:
        self.cfg = HopConfig(
            bootstrap=settings.kafka_bootstrap, topic=f"cityops.bench.hop.{os.getpid()}",
            partitions=3, hz=hz, codec=settings.kafka_codec, linger_ms=settings.kafka_linger_ms,
            idempotent=settings.kafka_idempotent,
            max_batch_bytes=settings.kafka_max_batch_bytes,
            fetch_min_bytes=settings.kafka_fetch_min_bytes,
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms)
        ctx = multiprocessing.get_context("spawn")
        self.stop_ev, self.ready, self.counting = ctx.Event(), ctx.Event(), ctx.Event()
        self.out = ctx.Queue()
        self.proc = ctx.Process(target=_hop_main, name="kafka-hop", args=(
            self.cfg, self.stop_ev, self.ready, self.counting, self.out))

    def start(self, within: float = 60.0) -> None:
        self.proc.start()
        if not self.ready.wait(within):
            raise TimeoutError("the Kafka hop did not start")

    def finish(self) -> dict[str, Any]:
        self.stop_ev.set()
        res: dict[str, Any] = self.out.get(timeout=60)
        self.proc.join(timeout=10)
        if "error" in res:
            raise RuntimeError(f"Kafka hop failed: {res['error']}")
        return res

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()


# --- injections (a thread: the paho sinks are driven by their caller) -------------------------
def inject(settings: Settings, sensors: list[Sensor], spacing: tuple[float, float],
           presses: list[Press], go: threading.Event, stop: threading.Event,
           seed: int = 16) -> None:
    """Warm up (one heartbeat per button: connects the district bridges), wait for ``go``,
    then press each button once, ``spacing`` seconds apart (uniform), stamping the wall
    time just before the publish and when the broker's PUBACK came back. A press carries
    the wall clock as its event time, as the fault matrix's scripted presses do."""
    from ingest import samples
    from simulators.publisher import open_sink

    rnd = random.Random(seed)
    sink = open_sink(settings, load_fleet(settings.fleet_file), qos=1,
                     client_id=f"cityops-bench-incident-{os.getpid()}")
    sink.connect()
    root = settings.mqtt_topic_root
    try:
        for s in sensors:
            sink.publish(*samples.device_message(s, int(time.time() * 1000), root))
        if not sink.drain(20) or sink.refused or sink.errors:
            raise RuntimeError("warm-up heartbeats not acknowledged")
        while not go.is_set():
            sink.idle(0.1)  # serving the connections (keepalives) while the load warms up
        for s in sensors:
            if stop.is_set():
                return
            ms = int(time.time() * 1000)
            payload = samples.encode(samples.safecity(s.sensor_id, ms, "PANIC"))
            topic = samples.topic_of(s, root)
            press = Press(s.sensor_id, time.time(), ms)
            sink.publish(topic, payload)
            presses.append(press)
            if sink.drain(5.0):
                press.puback = time.time()
            sink.idle(max(0.0, press.published + rnd.uniform(*spacing) - time.time()))
        sink.drain(10.0)
    finally:
        sink.close()


# --- the browser -------------------------------------------------------------------------------
# Installed in the console page: a second EventSource of its own (the page's one feeds its
# list), stamping the first opened/announced change of each critical incident, and a
# MutationObserver stamping the first time an incident's list item appears.
LISTENER_JS = """
() => new Promise((resolve, reject) => {
  const b = window.__bench = {incidents: {}, listed: {}, errors: 0, opened: null};
  const es = new EventSource('/api/stream');
  es.addEventListener('incident', (ev) => {
    const t = Date.now();
    let c;
    try { c = JSON.parse(ev.data); } catch (e) { return; }
    const inc = c.incident || {};
    if ((c.action === 'opened' || c.action === 'announced') && inc.severity === 'critical'
        && !(inc.incident_id in b.incidents)) {
      b.incidents[inc.incident_id] = {t, action: c.action, group_key: inc.group_key};
    }
  });
  es.onerror = () => { b.errors += 1; };
  b.longtasks = [];  // the page's main thread busy > 50 ms: events wait behind it
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries())
        b.longtasks.push([performance.timeOrigin + e.startTime, e.duration]);
    }).observe({type: 'longtask', buffered: false});
  } catch (e) { b.longtasks = null; }
  b.frames = [];  // long animation frames: which script, and how much style and layout
  try {
    new PerformanceObserver((list) => {
      for (const f of list.getEntries()) {
        const end = f.startTime + f.duration;
        b.frames.push({t: performance.timeOrigin + f.startTime, duration: f.duration,
                       layout: f.styleAndLayoutStart ? end - f.styleAndLayoutStart : 0,
                       scripts: f.scripts.map((x) => ({
                         what: `${x.invoker} ${x.sourceFunctionName || ''} `
                               + `${(x.sourceURL || '').split('/').pop()}`.trim(),
                         duration: x.duration}))});
      }
    }).observe({type: 'long-animation-frame', buffered: false});
  } catch (e) { b.frames = null; }
  es.onopen = () => { b.opened = Date.now(); resolve(b.opened); };
  const mark = (el, t) => {
    const id = el.getAttribute('data-incident-id');
    if (id !== null && !(id in b.listed)) b.listed[id] = t;
  };
  new MutationObserver((muts) => {
    const t = Date.now();
    for (const m of muts) {
      const nodes = m.type === 'attributes' ? [m.target] : m.addedNodes;
      for (const n of nodes) {
        if (n.nodeType !== 1) continue;
        if (n.matches('li[data-incident-id]')) mark(n, t);
        for (const el of n.querySelectorAll('li[data-incident-id]')) mark(el, t);
      }
    }
  }).observe(document.body, {childList: true, subtree: true, attributes: true,
                             attributeFilter: ['data-incident-id']});
  setTimeout(() => reject(new Error('the stream did not open within 20 s')), 20000);
})
"""


async def open_console(pw: Any, url: str, password: str, home: Path) -> tuple[Any, Any]:
    """Chromium (Debian's, never ``playwright install``) logged in as the viewer, on the
    console page with its live stream up and the bench listener installed."""
    from playwright.async_api import expect

    ctx = await pw.chromium.launch_persistent_context(
        str(home / "profile"), executable_path="/usr/bin/chromium", headless=True,
        args=CHROMIUM_ARGS, env={"HOME": str(home), "TMPDIR": str(home)},
        viewport={"width": 1366, "height": 768})
    page = ctx.pages[0] if ctx.pages else await ctx.new_page()
    await page.goto(url + "/")
    await expect(page).to_have_url(url + "/login")
    await page.fill("#username", VIEWER)
    await page.fill("#password", password)
    await page.click("#login-button")
    await expect(page).to_have_url(url + "/", timeout=20_000)
    await expect(page.locator("#live")).to_have_class("live on", timeout=20_000)
    await page.evaluate(LISTENER_JS)
    return ctx, page


# --- the incidents topic, read here (the breakdown's Kafka stamps) -----------------------------
async def _tail(settings: Settings, topic: str, ready: asyncio.Event,
                on_record: Callable[[Any, float], None]) -> None:
    """Read ``topic`` from its end as the console's feed does (no group, fetch at once),
    calling ``on_record(record, receipt time)``; ``ready`` once positioned."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                         auto_offset_reset="latest", enable_auto_commit=False)
    await c.start()
    try:
        await c.seek_to_end()
        for tp in c.assignment():
            await c.position(tp)
        ready.set()
        while True:
            batch = await c.getmany(timeout_ms=1000)
            t = time.time()
            for msgs in batch.values():
                for m in msgs:
                    on_record(m, t)
    finally:
        await c.stop()


async def watch_incidents(settings: Settings, seen: dict[str, tuple[float, float]],
                          ready: asyncio.Event) -> None:
    """group key -> (record CreateTime, receipt) of the first critical opened/announced
    change: read the way the console's feed reads it (no group, fetch at once)."""
    from alerts.incidents.model import decode_incident_change

    def on_record(m: Any, t: float) -> None:
        ch = decode_incident_change(m.value)
        if ch.action in ("opened", "announced") and ch.incident.severity == "critical":
            seen.setdefault(ch.incident.group_key, (m.timestamp / 1000, t))

    await _tail(settings, settings.topics.incidents, ready, on_record)


async def watch_events(settings: Settings, sensors: set[str],
                       seen: dict[str, tuple[float, float]], ready: asyncio.Event) -> None:
    """sensor -> (ingest's receive time, receipt here) of the first panic press of each
    injected button on the events topic, read as soon as it is there (fetch at once, not
    the services' 16 KiB / 500 ms): where the MQTT and ingest legs end."""
    from ingest.contract import decode_batches

    def on_record(m: Any, t: float) -> None:
        if b"panic" not in m.value:  # cheap: most records are readings
            return
        for inc in decode_batches([m.value]).incidents:
            if inc.incident == "panic" and inc.sensor_id in sensors:
                seen.setdefault(inc.sensor_id, (inc.receive_time / 1000, t))

    await _tail(settings, settings.topics.events, ready, on_record)


async def watch_sse(url: str, password: str, seen: dict[str, float],
                    ready: asyncio.Event) -> None:
    """group key -> receipt of the first critical opened/announced change by a plain HTTP
    client of the console's stream (logged in as the same viewer): the console's share of
    the time, without the browser's."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=None) as c:
        r = await c.post("/api/login", json={"username": VIEWER, "password": password})
        r.raise_for_status()
        async with c.stream("GET", "/api/stream") as resp:
            resp.raise_for_status()
            ready.set()
            event = ""
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "incident":
                    t = time.time()
                    ch = json.loads(line[6:])
                    inc = ch.get("incident") or {}
                    if ch.get("action") in ("opened", "announced") and \
                            inc.get("severity") == "critical":
                        seen.setdefault(inc.get("group_key", ""), t)


# --- the load's figures ---------------------------------------------------------------------
@dataclass
class Counters:
    t: float
    events: float  # sensor readings produced by ingest
    messages: float  # MQTT messages received by ingest
    rows: float  # readings rows (one value each) stored by the processor
    lag: float  # the processor's messages behind on the events topic
    cpu_busy: float  # the machine's CPU seconds not idle (all cores)
    city_cpu: float  # CPU seconds of the city's workers and servers (process trees)


def counters(city: City) -> Counters:
    s = city.settings
    ev = msg = rows = lag = 0.0
    for w in city.workers("ingest"):
        m = scrape(s.host, w.port)
        ev += metric_sum(m, "cityops_ingest_events_total")
        msg += metric_sum(m, "cityops_ingest_messages_total")
    for w in city.workers("process"):
        m = scrape(s.host, w.port)
        rows += metric_sum(m, "cityops_process_rows_written_total", table="readings")
        lag += metric_sum(m, "cityops_process_consumer_lag")
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    city_cpu = sum(tree_cpu(pid) for get in city_pids(city).values() if (pid := get()))
    return Counters(time.time(), ev, msg, rows, lag, busy, city_cpu)


def carried(a: Counters, b: Counters) -> dict[str, float]:
    """Per-second rates between two counter snapshots."""
    dt = max(b.t - a.t, 1e-6)
    return {"seconds": round(dt, 1),
            "sensor_readings_per_s": round((b.events - a.events) / dt, 1),
            "values_per_s": round((b.rows - a.rows) / dt, 1),
            "mqtt_msgs_per_s": round((b.messages - a.messages) / dt, 1),
            "processor_lag_at_end": b.lag,
            # the 2 cores are shared: how busy they were, and how much of it was the city's
            # (the rest: this script, Chromium, the publisher, and anyone else's work)
            "machine_cores_busy": round((b.cpu_busy - a.cpu_busy) / dt, 2),
            "city_cores": round((b.city_cpu - a.city_cpu) / dt, 2)}


# --- the run -------------------------------------------------------------------------------------
@dataclass
class Run:
    presses: list[Press] = field(default_factory=list)
    load: LoadStats | None = None
    load_error: BaseException | None = None
    load_end: float | None = None


async def measure(city: City, args: argparse.Namespace, fleet: Path, work: Path,
                  password: str) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    s = city.settings
    fl = load_fleet(fleet)
    conn = await asyncpg.connect(s.pg_dsn)
    busy = {r["group_key"] for r in await conn.fetch(
        "select group_key from alert_incidents where state = 'open' and rule_id = $1", RULE)}
    buttons = spread([b for b in fl if b.type == "panic_button"
                      and group_key(b.sensor_id) not in busy], args.injections)
    if len(buttons) < args.injections:
        raise SystemExit(f"only {len(buttons)} panic buttons free for new incidents")
    url = f"http://{s.host}:{s.console_port}"
    seen_kafka: dict[str, tuple[float, float]] = {}
    seen_events: dict[str, tuple[float, float]] = {}
    seen_sse: dict[str, float] = {}
    ready = [asyncio.Event() for _ in range(3)]
    watchers = [asyncio.create_task(watch_incidents(s, seen_kafka, ready[0])),
                asyncio.create_task(watch_events(s, {b.sensor_id for b in buttons},
                                                 seen_events, ready[1])),
                asyncio.create_task(watch_sse(url, password, seen_sse, ready[2]))]
    hop = KafkaHop(s, args.hop_hz)
    run = Run()
    go, stop = threading.Event(), threading.Event()
    injector: threading.Thread | None = None
    load_thread: threading.Thread | None = None
    try:
        async with async_playwright() as pw:
            ctx, page = await open_console(pw, url, password, work)
            try:
                await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 30)
                # the load, sized to outlast the measurement (warm-up + presses + tail)
                per_sim_s = _messages_per_sim_second(fl)
                load_s = args.warmup_s + args.injections * sum(args.spacing) / 2 + 25
                count = int(args.rate * load_s) // args.publishers * args.publishers
                span_ms = count / per_sim_s * 1000
                start_ms = int(time.time() * 1000 - span_ms - 60_000) // 1000 * 1000
                truths = [work / f"truth-{i}.jsonl" for i in range(args.publishers)]

                def load() -> None:
                    try:
                        run.load = publish_sharded(s, fleet, truths, seed=16,
                                                   start_ms=start_ms, rate=args.rate,
                                                   count=count)
                    except BaseException as exc:  # reported once the measurement ends
                        run.load_error = exc
                    finally:
                        run.load_end = time.time()

                load_thread = threading.Thread(target=load, name="load", daemon=True)
                load_thread.start()
                injector = threading.Thread(target=inject, name="injector", daemon=True,
                                            args=(s, buttons, tuple(args.spacing),
                                                  run.presses, go, stop))
                injector.start()
                print(f"load: {args.rate:g} msg/s gateway messages for ~{load_s:.0f} s; "
                      f"warm-up {args.warmup_s:g} s", flush=True)
                t_warm = time.monotonic()
                await asyncio.to_thread(hop.start)
                await asyncio.sleep(max(0.0, args.warmup_s - (time.monotonic() - t_warm)))
                if run.load_error is not None or run.load_end is not None:
                    raise RuntimeError(f"the load ended during the warm-up: {run.load_error}")
                c0 = counters(city)
                workers = [w.name for w in city.pipeline.workers
                           if w.service in ("ingest", "alerts", "console")]
                with profiling.recording(
                        city_pids(city), workers if args.profile else [],
                        args.injections * sum(args.spacing) / 2, args.out_dir / "profiles",
                        "incident") as profiles:
                    go.set()
                    hop.counting.set()
                    print(f"pressing {args.injections} panic buttons, {args.spacing[0]:g}-"
                          f"{args.spacing[1]:g} s apart", flush=True)
                    await asyncio.to_thread(injector.join)
                    got = await _wait_browser(page, run.presses, args.tail_s)
                    c1 = counters(city)
                hop_res = hop.finish()
                listed = await page.evaluate("() => window.__bench.listed")
                stream_errors = await page.evaluate("() => window.__bench.errors")
                has_list = await page.locator("li[data-incident-id]").count()
                page_stats = await _page_stats(page, run.presses, c1.t)
            finally:
                await ctx.close()
        await asyncio.to_thread(load_thread.join, 600)
        if run.load_error is not None:
            raise RuntimeError(f"load generator failed: {run.load_error}")
        await _stamp_database(conn, run.presses)
        alerts = await _alert_counts(conn, c0.t, c1.t)
    finally:
        stop.set()
        go.set()
        hop.kill()
        for w in watchers:
            w.cancel()
        for w in watchers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w
        await conn.close()
    by_key = {group_key(p.sensor_id): p for p in run.presses}
    for p in run.presses:
        k = seen_kafka.get(group_key(p.sensor_id))
        if k is not None:
            p.kafka, p.feed = k
        e = seen_events.get(p.sensor_id)
        if e is not None:
            p.ingested, p.on_events = e
        p.sse = seen_sse.get(group_key(p.sensor_id))
    for iid, rec in got.items():
        hit = by_key.get(rec["group_key"])
        if hit is not None:
            hit.browser, hit.action = rec["t"] / 1000, rec["action"]
            hit.incident_id = hit.incident_id or int(iid)
            if str(hit.incident_id) in listed:
                hit.listed = listed[str(hit.incident_id)] / 1000
    result = _report(args, city, fl, run, c0, c1, hop_res, truths, profiles,
                     has_list=bool(has_list) or bool(listed), stream_errors=stream_errors)
    result["page"] = page_stats
    result["alerts_during_measurement"] = alerts
    return result


async def _page_stats(page: Any, presses: list[Press], until: float) -> dict[str, Any]:
    """What the page had to do besides our listener: its incident list, the map's sensors,
    and the long tasks (main thread busy > 50 ms, during which no event handler runs) while
    we measured."""
    items = await page.locator("li[data-incident-id]").count()
    longtasks = await page.evaluate("() => window.__bench.longtasks")
    frames = await page.evaluate("() => window.__bench.frames")
    drawn = await page.evaluate("() => document.getElementById('map')?.dataset.map ?? null")
    out: dict[str, Any] = {"incident_list_items_at_end": items,
                           "map": drawn}  # "city" (MapLibre), "svg" (no WebGL) or "none"
    start = min((p.published for p in presses), default=until) * 1000
    if frames is not None:
        out["long_animation_frames"] = frame_summary(
            [f for f in frames if start <= f["t"] <= until * 1000])
    if longtasks is None:
        return out | {"longtasks": "not supported by this browser"}
    inside = [d for t, d in longtasks if start <= t <= until * 1000]
    span = max(until * 1000 - start, 1.0)
    return out | {"longtasks": {"count": len(inside), "busy_ms": round(sum(inside), 1),
                                "busy_share": round(sum(inside) / span, 3),
                                "longest_ms": round(max(inside, default=0.0), 1)}}


def frame_summary(frames: list[dict[str, Any]], top: int = 6) -> dict[str, Any]:
    """Long animation frames (> 50 ms) of the page: how many, how long in all, how much
    of it style and layout, and the scripts that took the most (by invoker, function,
    file), so the report can say what kept the page from handling the incident."""
    by: dict[str, float] = {}
    for f in frames:
        for sc in f["scripts"]:
            by[sc["what"]] = by.get(sc["what"], 0.0) + sc["duration"]
    return {"count": len(frames), "total_ms": round(sum(f["duration"] for f in frames), 1),
            "style_layout_ms": round(sum(f["layout"] for f in frames), 1),
            "longest_ms": round(max((f["duration"] for f in frames), default=0.0), 1),
            "scripts_ms": {k: round(v, 1) for k, v in
                           sorted(by.items(), key=lambda kv: -kv[1])[:top]}}


async def _alert_counts(conn: asyncpg.Connection, t0: float, t1: float) -> dict[str, int]:
    """Alerts raised per rule while we measured (what the console streamed besides the
    presses' incidents)."""
    rows = await conn.fetch(
        "select rule_id, count(*) as n from alerts where raised_at between "
        "to_timestamp($1) and to_timestamp($2) group by 1 order by 2 desc", t0, t1)
    return {r["rule_id"]: int(r["n"]) for r in rows}


def _messages_per_sim_second(fl: Any) -> float:
    from simulators.simulation import Simulation

    return float(Simulation(fl, seed=1, start_ms=0).messages_per_sim_second())


async def _wait_browser(page: Any, presses: list[Press], within: float
                        ) -> dict[str, dict[str, Any]]:
    """The browser's stamps, once every press's incident arrived (or ``within`` s after
    the last press)."""
    want = {group_key(p.sensor_id) for p in presses}
    deadline = time.monotonic() + within
    while True:
        got: dict[str, dict[str, Any]] = await page.evaluate("() => window.__bench.incidents")
        if want <= {r["group_key"] for r in got.values()} or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.25)


async def _stamp_database(conn: asyncpg.Connection, presses: list[Press]) -> None:
    """Each press's incident row: created_at (the alerts transaction's start) and, if no
    later transaction touched the row, its commit time."""
    rows = await conn.fetch(
        "select group_key, incident_id, extract(epoch from created_at)::float8 as created, "
        "(updated_at = created_at) as untouched, "
        "extract(epoch from pg_xact_commit_timestamp(xmin))::float8 as committed "
        "from alert_incidents where group_key = any($1::text[])",
        [group_key(p.sensor_id) for p in presses])
    by = {r["group_key"]: r for r in rows}
    for p in presses:
        r = by.get(group_key(p.sensor_id))
        if r is not None:
            p.incident_id, p.created = int(r["incident_id"]), float(r["created"])
            if r["untouched"] and r["committed"] is not None:
                p.committed = float(r["committed"])


def _report(args: argparse.Namespace, city: City, fl: Any, run: Run, c0: Counters,
            c1: Counters, hop: dict[str, Any], truths: list[Path],
            profiles: dict[str, Path], *, has_list: bool, stream_errors: int) -> dict[str, Any]:
    s = city.settings
    lat = [p.browser - p.published for p in run.presses if p.browser is not None]
    browser = percentiles(lat)
    hop_services, hop_feed = percentiles(hop["services"]), percentiles(hop["feed"])
    window = carried(c0, c1)
    exp = merge_expected(truths)
    assert run.load is not None
    whole = {"published_msgs": run.load.sent, "seconds": round(run.load.elapsed_s, 1),
             "mqtt_msgs_per_s": round(run.load.rate, 1),
             "sensor_readings_per_s": round(exp.events / run.load.elapsed_s, 1),
             "values_per_s": round(exp.rows / run.load.elapsed_s, 1),
             "ended_after_last_browser_receipt": bool(run.load_end and run.load_end >= c1.t)}
    reached = window["sensor_readings_per_s"] >= TARGET_READINGS_PER_S
    per_reading = ratio(window["values_per_s"], window["sensor_readings_per_s"])
    p99 = browser["p99"]
    return {
        "benchmark": "incident_latency",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {**args.machine_at_start,
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "path": "panic button MQTT publish -> Mosquitto -> ingest -> Kafka events -> alerts "
                "(rule, alert + incident in one PostgreSQL transaction) -> Kafka incidents -> "
                "cityops console (feed, SSE) -> EventSource in headless Chromium",
        "method": _method(),
        "config": {"mode": "gateway", "fleet_scale": args.scale,
                   "gateway_size": args.gateway_size, "sensors": len(fl),
                   "offered_msgs_per_s": args.rate, "publishers": args.publishers,
                   "injections": args.injections, "spacing_s": list(args.spacing),
                   "warmup_s": args.warmup_s, "hop_records_per_s": args.hop_hz,
                   "workers": {"ingest": 1, "process": 1, "alerts": 1, "console": 1},
                   "kafka": {"linger_ms": s.kafka_linger_ms, "codec": s.kafka_codec,
                             "idempotent": s.kafka_idempotent,
                             "fetch_min_bytes": s.kafka_fetch_min_bytes,
                             "fetch_max_wait_ms": s.kafka_fetch_max_wait_ms}},
        "new_incidents": {"how": "rules = alerts/rules/default.yaml with panic_button "
                                 f"group {json.dumps(NEW_INCIDENT_GROUP)} (by default its "
                                 "alerts group by landmark), each press at a different "
                                 "button with no open incident",
                          "rule_group": NEW_INCIDENT_GROUP},
        "background_load": {"during_measurement": window, "whole_load": whole,
                            "target_readings_per_s": TARGET_READINGS_PER_S,
                            "target_reached": reached,
                            "readings": "sensor readings = events (one sensor's reading, "
                                        "ingest's count); values = narrow readings rows "
                                        f"({per_reading} per sensor reading here)"},
        "latency_browser_ms": browser,
        "missing_in_browser": len(run.presses) - len(lat),
        "first_change_seen": {a: sum(1 for p in run.presses if p.action == a)
                              for a in ("opened", "announced")},
        "breakdown_ms": breakdown(run.presses),
        "incident_list": ("console page has an incident list (li[data-incident-id])"
                          if has_list else "no incident list on the console page "
                          "(li[data-incident-id]) at this commit: not measured"),
        "browser_stream_errors": stream_errors,
        "kafka_hop_ms": {"services_fetch": hop_services, "feed_fetch": hop_feed,
                         "records_sent": hop["sent"]},
        "ratios": {
            "browser_p99_vs_kafka_hop_p99": ratio(p99, hop_services["p99"]),
            "browser_p50_vs_kafka_hop_p50": ratio(browser["p50"], hop_services["p50"]),
            "browser_p99_vs_feed_hop_p99": ratio(p99, hop_feed["p99"]),
        },
        "target": {"p99_ms": TARGET_P99_S * 1000, "readings_per_s": TARGET_READINGS_PER_S,
                   "p99_met": p99 is not None and p99 < TARGET_P99_S * 1000
                   and len(lat) == len(run.presses),
                   "margin_ms": round(TARGET_P99_S * 1000 - p99, 1) if p99 is not None
                   else None, "load_met": reached},
        "presses": [asdict(p) for p in run.presses],
        **({"profile": {n: profiling.summary(p) for n, p in profiles.items()}}
           if profiles else {}),
    }


def _method() -> str:
    """The docstring's "What it measures" part, for the results file."""
    text = __doc__ or ""
    start = text.find("What it measures:")
    end = text.find("Usage")
    return " ".join(text[start:end].split()) if start >= 0 else ""


def table(r: dict[str, Any]) -> str:
    """The short table printed at the end."""
    def row(name: str, st: dict[str, Any]) -> str:
        cells = [f"{st[k]:>8.1f}" if st.get(k) is not None else f"{'-':>8}"
                 for k in ("p50", "p95", "p99", "max")]
        return f"{name:<40}{''.join(cells)}{st.get('n', 0):>6}"

    bl = r["background_load"]["during_measurement"]
    lines = [f"{'ms':<40}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}{'n':>6}",
             row("publish -> browser", r["latency_browser_ms"])]
    labels = {"publish_to_puback": "  publish -> PUBACK",
              "publish_to_created": "  publish -> incident created_at",
              "publish_to_ingested": "    publish -> ingest received",
              "ingested_to_events": "    ingest -> on events topic",
              "events_to_created": "    events topic -> created_at (alerts)",
              "created_to_browser": "  created_at -> browser",
              "created_to_committed": "    created_at -> commit",
              "committed_to_kafka": "    commit -> incidents record",
              "kafka_to_feed": "    incidents record -> plain consumer",
              "kafka_to_sse": "    incidents record -> SSE client",
              "sse_to_browser": "    SSE client -> browser",
              "publish_to_sse": "  publish -> SSE client (no browser)",
              "browser_to_listed": "  browser -> incident list"}
    for key, label in labels.items():
        if r["breakdown_ms"][key]["n"]:
            lines.append(row(label, r["breakdown_ms"][key]))
    lines += [row("Kafka hop (services' fetch)", r["kafka_hop_ms"]["services_fetch"]),
              row("Kafka hop (feed's fetch)", r["kafka_hop_ms"]["feed_fetch"]),
              f"ratio p99 browser / Kafka hop: {r['ratios']['browser_p99_vs_kafka_hop_p99']} "
              f"(feed's fetch: {r['ratios']['browser_p99_vs_feed_hop_p99']})",
              f"target p99 < {r['target']['p99_ms']:.0f} ms: "
              f"{'met' if r['target']['p99_met'] else 'MISSED'} "
              f"(margin {r['target']['margin_ms']} ms); missing in browser: "
              f"{r['missing_in_browser']}",
              f"background load during the measurement: {bl['sensor_readings_per_s']:,.0f} "
              f"sensor readings/s ({bl['values_per_s']:,.0f} values/s, "
              f"{bl['mqtt_msgs_per_s']:,.0f} MQTT msg/s) over {bl['seconds']} s; "
              f"cores busy {bl['machine_cores_busy']} of {os.cpu_count()}, the city's "
              f"{bl['city_cores']}; "
              f">= {TARGET_READINGS_PER_S:,.0f}: "
              f"{'yes' if r['background_load']['target_reached'] else 'NO'}",
              f"new incidents: {r['new_incidents']['how']}",
              r["incident_list"]]
    page = r.get("page", {})
    lt, laf = page.get("longtasks"), page.get("long_animation_frames")
    if isinstance(lt, dict):
        lines.append(f"page main thread: {lt['count']} long tasks, busy {lt['busy_share']:.0%} "
                     f"of the measurement, longest {lt['longest_ms']:.0f} ms "
                     f"({page.get('incident_list_items_at_end', '?')} list items, "
                     f"{page.get('map', '?')} map)")
    if isinstance(laf, dict) and laf.get("scripts_ms"):
        what, ms = next(iter(laf["scripts_ms"].items()))
        lines.append(f"  long frames {laf['total_ms']:.0f} ms, of it style+layout "
                     f"{laf['style_layout_ms']:.0f} ms; top script {what}: {ms:.0f} ms")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace, city: City, fleet: Path,
                     work: Path) -> dict[str, Any]:
    """Stack, workers (ingest, process, alerts, console), a viewer account, the run."""
    from alerts.console.auth import create_user
    from alerts.store import create_pool

    try:
        city.stack.up()
        await enable_commit_timestamps(city)
        city.start()
        password = f"bench-{os.urandom(6).hex()}"
        pool = await create_pool(city.settings.pg_dsn)
        try:
            await create_user(pool, VIEWER, password, "viewer")
        finally:
            await pool.close()
        return await measure(city, args, fleet, work, password)
    finally:
        _kill_publishers()
        with contextlib.suppress(Exception):
            city.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=220.0,
                   help="background gateway messages/s (220: ~5,400 sensor readings/s, "
                        "~24,000 values/s with 25 sensors a gateway)")
    p.add_argument("--publishers", type=int, default=1,
                   help="simulator processes (1): shards of the gateway fleet carry different "
                        "messages per simulated second, so at one rate each their clocks drift "
                        "apart (~1.1 simulated s per s here) and the absence rule calls the "
                        "slower shard's sensors offline (~1,900 sensor_offline raises in a "
                        "67 s run with 2); one publisher reaches 220 msg/s")
    p.add_argument("--scale", type=int, default=4, help="load fleet x SCALE (4)")
    p.add_argument("--gateway-size", type=int, default=25, help="sensors per gateway (25)")
    p.add_argument("--injections", type=int, default=45, help="panic presses (45, >= 40)")
    p.add_argument("--spacing", type=float, nargs=2, default=(1.0, 2.0),
                   metavar=("MIN", "MAX"), help="seconds between presses, uniform (1 2)")
    p.add_argument("--warmup-s", type=float, default=12.0,
                   help="load before the first press (12)")
    p.add_argument("--tail-s", type=float, default=20.0,
                   help="wait for the last incidents after the last press (20)")
    p.add_argument("--hop-hz", type=float, default=10.0,
                   help="Kafka hop records per second (10)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy ingest, alerts and console during the presses")
    p.add_argument("--out", default="incident_latency", help="result name (incident_latency)")
    p.add_argument("--out-dir", type=Path, default=RESULTS,
                   help="folder for the JSON (bench/results); a smoke run can write elsewhere")
    args = p.parse_args()
    if args.injections < 1 or args.spacing[0] > args.spacing[1]:
        p.error("--injections >= 1 and --spacing MIN <= MAX")

    # SIGTERM (timeout, kill) stops the run like Ctrl-C: publishers and the stack go too.
    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    args.machine_at_start = {**machine(),
                             "cpu_percent_at_start": psutil.cpu_percent(interval=1.0)}
    work = Path(tempfile.mkdtemp(prefix="cityops-bench-incident-"))
    work.chmod(0o755)  # the servers drop to their own users and read the fleet file
    try:
        fleet = scaled_fleet(work / "fleet.toml", args.scale, "gateway", args.gateway_size)
        rules = work / "rules.yaml"
        rules.write_text(new_incident_rules(Path(DEFAULT_RULES).read_text()))
        city = City(ingest=1, process=1, alerts=1, prefix="cityops-bench-incident-",
                    fleet_file=fleet, rules_file=rules)
        city.replicas["console"] = 1  # a real `cityops console` process, like the others
        result = asyncio.run(main_async(args, city, fleet, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.out}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
