"""The fault matrix: the whole pipeline under load, broken on purpose, counted exactly.

Each case publishes a simulated load (QoS 1, ~1 % malformed, 1 % byte-for-byte resends)
while one part of the city fails: a worker killed with -9 and restarted, a server
restarted, the database unreachable for 30 s. Around the fault a scripted incident
happens live (a panic button pressed before the fault and again after it, or intruders
on camera at a site): it must raise exactly one alert, not zero and not two. Afterwards
the database is compared with the simulator's ground truth: every good reading stored
once per (event id, metric), every deliberately bad one in ``deadletters`` with the
reason the simulator expects. The pass criteria are exact counts, never timings.

The load is traffic of the 7,880-sensor load fleet with event times from one to about
sixteen minutes old (each case its own stretch, see ``_stretch``); the scripted incidents
carry the current time.

The module runs its own stack (not the session one): it restarts servers; a watcher
restarts workers that exit on their own (as a container runtime would). Ingest runs in
districts mode (``ingest_subscription``, see ingest/mqtt.py): its plain persistent
subscriptions survive a Mosquitto restart, so the broker is restarted while the fleet keeps
publishing, with nothing lost. Each case has
its own seed, its own stretch of simulated time and its own alert source, so cases never
count each other's data. The table (case, sent, stored, duplicates, lost, recovery) is
printed and written to tests/artifacts/e2e_faults.txt.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from cityops.registry import load_fleet
from cityops.settings import PROJECT_ROOT
from cityops.stack.process import port_open
from cityops.supervisor import metric_sum, scrape
from ingest import samples
from simulators.simulation import Simulation
from tests.e2e_harness import (
    City,
    alerts_for,
    deadletter_watermark,
    expected_from_truth,
    publish_load,
    publish_now,
    recent_base,
    sampling,
    wait_stored,
)

# Messages per second offered. 500 in the suite; a heavier run of the same matrix (issue
# 15 asks for >= 5,000 readings/s, ~1,200 msg/s of this fleet's ~4.4 readings each):
# CITYOPS_FAULT_RATE=1200 .venv/bin/pytest tests/test_e2e_faults.py
RATE = float(os.environ.get("CITYOPS_FAULT_RATE", "500"))
LOAD_S = 10.0  # seconds of load per case
FAULT_AT_S = 3.0  # the fault strikes this far into the load
# The load fleet (7,880 sensors, ~116 msg per simulated second): 10 s at 500 msg/s is
# ~45 simulated seconds, placed to end a minute before the case starts: live traffic.
LOAD_FLEET = PROJECT_ROOT / "simulators" / "fleets" / "load.toml"
OUTAGE_S = 30.0
# The processor's memory while the database is away: Kafka holds the backlog, so the
# processor may not grow by more than a batch or two of buffers.
PROCESSOR_RSS_GROWTH_MAX = 150 * 1024 * 1024
PANIC_BUTTONS = ("ninh_kieu_wharf-pb-sa001", "ninh_kieu_wharf-pb-sa002",
                 "ninh_kieu_wharf-pb-sa003", "ninh_kieu_wharf-pb-sa004",
                 "night_market-pb-sa001", "night_market-pb-sa002", "night_market-pb-sa003")
INTRUSION_CAMERAS = ("airport-cv-gu001", "airport-cv-gu002")


@dataclass(frozen=True)
class Script:
    """A live incident around the fault: ``before`` and ``after`` it, messages that must
    end as exactly one alert of ``rule`` at ``source``."""

    rule: str
    source: str
    sensors: tuple[str, ...]
    event: str  # panic | intrusion
    per_phase: int

    def messages(self, city: City, phase: int) -> list[tuple[str, bytes]]:
        fleet = load_fleet(city.settings.fleet_file)
        now = int(time.time() * 1000)
        out = []
        for k in range(self.per_phase):
            sensor = fleet.get(self.sensors[k % len(self.sensors)])
            assert sensor is not None
            ms = now + k
            doc = (samples.safecity(sensor.sensor_id, ms, "PANIC") if self.event == "panic"
                   else samples.guardeye_event(sensor.sensor_id, ms, "intrusion"))
            out.append((samples.topic_of(sensor, city.settings.mqtt_topic_root),
                        samples.encode(doc)))
        return out


def script_for(index: int) -> Script:
    if index < len(PANIC_BUTTONS):
        sid = PANIC_BUTTONS[index]
        return Script("panic_button", sid, (sid,), "panic", 1)
    # count 3 within 10 minutes per landmark: 2 before the fault, 2 after -> one alert
    return Script("intrusion_burst", "landmark:airport", INTRUSION_CAMERAS, "intrusion", 2)


@dataclass
class Row:
    case: str
    sent: int
    expected: int
    stored: int
    duplicates: int
    lost: int
    deadletters: str
    alerts: int
    recovery_s: float
    catchup_s: float
    respawned: str  # workers that exited on their own and were restarted by the watcher


ROWS: list[Row] = []


@pytest.fixture(scope="module")
def city() -> Iterator[City]:
    # Districts mode (one worker owns all nine districts): a shared subscription is not
    # restored by Mosquitto 2.0.11 after a restart, which an unplanned restart would cost
    # readings (tests/test_ingest_partitioned.py measures it).
    with City(ingest=1, process=1, alerts=1, prefix="cityops-faults-",
              fleet_file=LOAD_FLEET, ingest_subscription="districts") as c:
        c.watch()
        yield c


def _worker(city: City, service: str) -> Callable[[], float]:
    def fault() -> float:
        (w,) = city.workers(service)
        with city.lock:  # not the watcher's restart: ours
            return city.pipeline.restart(w)  # kill -9 of the process group, then start
    return fault


# An unplanned Mosquitto restart: SIGTERM (the broker saves its persistence file on the
# way out) and start again, while the fleet keeps publishing; the fleet's publisher
# buffers and resends what the broker had not acknowledged. Ingest's district
# subscriptions come back with its session, so what sensors publish before ingest has
# reconnected is queued for it, not dropped. The fault ends once ingest reconnected.
def _unplanned_mqtt_restart(city: City) -> Callable[[], float]:
    restart = _server(city, "mqtt")

    def fault() -> float:
        (ingest,) = city.workers("ingest")
        before = _reconnects(city, ingest.port)
        recovery = restart()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                _reconnects(city, ingest.port) > before
                and ingest.healthy(city.settings.host)):
            time.sleep(0.05)
        return recovery
    return fault


def _reconnects(city: City, port: int) -> float:
    return metric_sum(scrape(city.settings.host, port), "cityops_ingest_mqtt_reconnects_total")


def _server(city: City, name: str, down_s: float = 0.0,
            kill: bool = False) -> Callable[[], float]:
    """Stop a server (its controlled stop, or SIGKILL with ``kill``), wait ``down_s``,
    start it again; the fault's recovery time is how long the start took."""
    def fault() -> float:
        server = city.stack.server(name)
        if kill:
            server.proc.stop(timeout=10, sig=signal.SIGKILL)
        else:
            server.down()
        # The old process may hold its port a moment after it is reaped.
        deadline = time.monotonic() + 30
        while port_open(city.settings.host, server.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        if down_s:
            time.sleep(down_s)
        t0 = time.monotonic()
        server.up()
        return time.monotonic() - t0
    return fault


CASES: dict[str, Callable[[City], Callable[[], float] | None]] = {
    "baseline (no fault)": lambda c: None,
    "kill -9 ingest": lambda c: _worker(c, "ingest"),
    "kill -9 processor": lambda c: _worker(c, "process"),
    "kill -9 alerts": lambda c: _worker(c, "alerts"),
    "restart Mosquitto (unplanned)": lambda c: _unplanned_mqtt_restart(c),
    "restart PostgreSQL": lambda c: _server(c, "postgres"),
    "database away 30 s": lambda c: _server(c, "postgres", OUTAGE_S),
    # Apache Kafka (one KRaft node) stopped and started again under load: SIGTERM is its
    # controlled shutdown; SIGKILL is the crash whose promise cityops/stack/kafka.py
    # states: nothing acknowledged is lost (the page cache outlives the process), so
    # producers (idempotent, acks=all) and consumers (offsets committed after the
    # database commit) carry on with 0 lost and 0 duplicates stored.
    "restart Kafka broker (SIGTERM)": lambda c: _server(c, "kafka"),
    "kill -9 Kafka broker": lambda c: _server(c, "kafka", kill=True),
}


async def _during(city: City, load: Awaitable[object], fault: Callable[[], float] | None,
                  script: Script) -> float:
    """Run the load; the scripted incident's first phase 1 s in, the fault ``FAULT_AT_S``
    in, the second phase once the fault is over. Returns the recovery time (seconds from
    restart until the worker is healthy or the server listens again)."""
    task = asyncio.ensure_future(load)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(publish_now, city.settings, script.messages(city, 0))
    recovery = 0.0
    await asyncio.sleep(FAULT_AT_S - 1.0)
    if fault is not None:
        recovery = await asyncio.to_thread(fault)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(publish_now, city.settings, script.messages(city, 1))
    await task
    return recovery


_STRETCHES: list[int] = []  # simulated start of every case so far


def _stretch(span_ms: int) -> int:
    """A stretch of simulated time no earlier case used, ending a minute or more ago.

    Sensors report on a fixed cadence, so two cases whose stretches overlapped would send
    readings with the same (sensor, event time) and so the same event id, whatever their
    seeds: the second case would count the first one's rows as its own (seen: 82 of
    5,000), which could hide a loss. Each case goes a span and a minute further back than
    the one before (8 cases: ~16 minutes back; ingest marks readings older than two
    minutes late but stores them, and refuses only those older than a day)."""
    start = recent_base(int(time.time() * 1000), span_ms, margin_ms=60_000)
    if _STRETCHES:
        start = min(start, (_STRETCHES[-1] - span_ms - 60_000) // 60_000 * 60_000)
    _STRETCHES.append(start)
    return start


@pytest.mark.parametrize("case", list(CASES))
async def test_fault(case: str, city: City, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    index = list(CASES).index(case)
    s = city.settings
    script = script_for(index)
    span_ms = int(RATE * LOAD_S / Simulation(LOAD_FLEET).messages_per_sim_second() * 1000)
    start_ms = _stretch(span_ms)
    truth = tmp_path / "truth.jsonl"
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        dl_mark = await deadletter_watermark(conn)
    finally:
        await conn.close()
    respawned_before = len(city.respawned)
    (proc,) = city.workers("process")
    pids = {"process": lambda: proc.proc.pid if proc.proc is not None and proc.alive else None}
    with sampling(pids, interval=0.25) as sampler:
        rss_before = sampler.sample()[1].get("process", 0)
        load = asyncio.to_thread(
            publish_load, s, truth, seed=100 + index, start_ms=start_ms, rate=RATE,
            count=int(RATE * LOAD_S), malformed_share=0.01, scenarios=("duplicates:share=0.01",))
        recovery = await _during(city, load, CASES[case](city), script)
        t_end = time.monotonic()
        exp = expected_from_truth(truth)
        stored, catchup = await wait_stored(s.pg_dsn, exp, dl_mark, within_s=90.0)
        # The alert may come a moment after the last reading is stored; a second one
        # (the bug this looks for) a moment after the first.
        conn = await asyncpg.connect(s.pg_dsn)
        try:
            # The alerts worker replays the events since its last checkpoint after a
            # restart (it once also worked through the processor's rollup partials: lag up
            # to 40 s on a loaded 2-core machine), so the alert gets up to 90 s.
            deadline = time.monotonic() + 90
            while True:
                alerts = await alerts_for(conn, script.rule, script.source)
                if alerts or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(2.0)
            alerts = await alerts_for(conn, script.rule, script.source)
        finally:
            await conn.close()
        catchup = max(catchup, time.monotonic() - t_end)
    peak_rss = sampler.peak_rss("process")

    ROWS.append(Row(case, exp.messages, exp.events, stored.events_stored, stored.duplicates,
                    stored.lost,
                    f"{stored.deadletters_stored}/{stored.deadletters_expected}"
                    + (f" (+{stored.deadletter_copies} copies)" if stored.deadletter_copies
                       else ""),
                    alerts, recovery, catchup,
                    _tally(city.respawned[respawned_before:])))
    _print_table(capsys)

    assert exp.events > 1000 and exp.messages == int(RATE * LOAD_S)
    assert stored.lost == 0, f"{case}: {stored.lost} of {exp.events} good events never stored"
    assert stored.duplicates == 0, f"{case}: {stored.duplicates} rows stored twice"
    assert stored.deadletters_stored == stored.deadletters_expected, (
        f"{case}: dead letters by reason {stored.deadletter_reasons}, "
        f"expected {dict(exp.deadletters)}")
    assert alerts == 1, (f"{case}: scripted {script.event} at {script.source} raised {alerts} "
                         f"{script.rule} alerts, not 1")
    if "PostgreSQL" in case or case.startswith("database away"):
        # Processor and alerts ride a database outage out in-process: nobody restarts them.
        respawned = city.respawned[respawned_before:]
        assert not respawned, (f"{case}: workers exited and were restarted: {respawned}\n"
                               + _exit_reasons(city, respawned))
    if case.startswith("database away"):
        assert peak_rss - rss_before < PROCESSOR_RSS_GROWTH_MAX, (
            f"processor grew from {rss_before >> 20} to {peak_rss >> 20} MiB while the "
            "database was away")


def _exit_reasons(city: City, names: list[str], lines: int = 12) -> str:
    """The error lines and tracebacks in the logs of workers that exited: the reason, for
    a failure on CI, where the stack's folder is gone by the time anyone reads it."""
    out = []
    for w in city.pipeline.workers:
        if w.name in names and w.log_path is not None and w.log_path.exists():
            text = w.log_path.read_text(errors="replace").splitlines()
            bad = [ln for ln in text if '"level": "error"' in ln or '"level": "critical"' in ln
                   or "Traceback" in ln or "Error" in ln[:40]]
            out.append(f"--- {w.name} ---\n" + "\n".join(bad[-lines:]))
    return "\n".join(out)


def _tally(names: list[str]) -> str:
    counts = collections.Counter(names)
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.items()) or "-"


def _print_table(capsys: pytest.CaptureFixture[str]) -> None:
    head = (f"{'case':<30} {'sent':>6} {'expected':>8} {'stored':>7} {'dups':>5} {'lost':>5} "
            f"{'dead letters':>18} {'alerts':>6} {'recovery s':>10} {'catch-up s':>10} "
            "exited+respawned")
    lines = [head, "-" * len(head)]
    for r in ROWS:
        lines.append(f"{r.case:<30} {r.sent:>6} {r.expected:>8} {r.stored:>7} "
                     f"{r.duplicates:>5} {r.lost:>5} {r.deadletters:>18} {r.alerts:>6} "
                     f"{r.recovery_s:>10.1f} {r.catchup_s:>10.1f} {r.respawned}")
    text = "\n".join(lines)
    out = Path(__file__).parent / "artifacts"
    out.mkdir(exist_ok=True)
    (out / "e2e_faults.txt").write_text(text + "\n")
    with capsys.disabled():
        print("\n" + text)
