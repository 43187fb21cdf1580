"""The whole city on its own stack, driven by the simulators and counted against their
ground truth: shared by the fault matrix (tests/test_e2e_faults.py) and the end-to-end
benchmark (bench/e2e/).

Why a harness and not fixtures: the benchmark runs outside pytest, and both need the
same three things done the same way — start an isolated stack plus real ``cityops``
worker processes (``City``), publish a simulated load over MQTT while recording what
was sent (``publish_load``), and compare what reached the database with that record
(``expected_from_truth`` + ``count_stored``). Counting is exact: every good reading
stored once per (event id, metric), every deliberately bad reading in the dead-letter
table with the reason the simulator expects, every scripted alert raised once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import psutil

from cityops.settings import Settings
from cityops.stack import Stack
from cityops.supervisor import Pipeline, Worker
from ingest.contract import event_id
from simulators.groundtruth import Truth
from tests.support import isolated_settings

HOUR_MS = 3_600_000


# --- the city: stack + workers ------------------------------------------------------------
class City:
    """An isolated stack (own ports and folder) with ``cityops`` workers on top."""

    def __init__(self, *, ingest: int = 1, process: int = 1, alerts: int = 1,
                 prefix: str = "cityops-e2e-", **overrides: Any) -> None:
        self.state = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("CITYOPS_TEST_TMP")))
        self.state.chmod(0o755)  # the servers drop to their own users
        self.settings: Settings = isolated_settings(self.state, **overrides)
        self.stack = Stack(self.settings)
        self.pipeline = Pipeline(self.settings)
        self.replicas = {"process": process, "alerts": alerts, "ingest": ingest}
        self.lock = threading.Lock()  # held while restarting workers on purpose
        self.respawned: list[str] = []  # workers the watcher restarted after they exited
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, wait_healthy: float = 90.0) -> None:
        self.stack.up()
        for service, n in self.replicas.items():
            for i in range(n):
                # Static group membership needs one instance id per processor on a host.
                env = ({"CITYOPS_PROCESS_INSTANCE_ID": f"e2e-process-{i}"}
                       if service == "process" else None)
                self.pipeline.add(service, 1, env=env)
        self.pipeline.start_all(wait_healthy=wait_healthy)

    def watch(self, interval: float = 0.5) -> None:
        """Restart workers that exit on their own (a lost broker ends a worker by design:
        the runtime brings it back), in a background thread until ``stop``."""
        def loop() -> None:
            while not self._watch_stop.wait(interval):
                with self.lock:
                    for w in self.pipeline.respawn_dead():
                        self.respawned.append(w.name)
        self._watcher = threading.Thread(target=loop, name="e2e-watch", daemon=True)
        self._watcher.start()

    def workers(self, service: str) -> list[Worker]:
        return [w for w in self.pipeline.workers if w.service == service]

    def stop(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        try:
            self.pipeline.stop_all()
        finally:
            self.stack.down()
            if not os.environ.get("CITYOPS_E2E_KEEP"):  # keep logs and data to debug a run
                shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self) -> City:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- time placement -----------------------------------------------------------------------
def recent_base(now_ms: int, span_ms: int, margin_ms: int = 5 * 60_000) -> int:
    """A simulated start such that ``span_ms`` of simulated time ends ``margin_ms`` before
    now (whole minutes)."""
    if span_ms + margin_ms > 22 * HOUR_MS:
        raise ValueError("the simulated span does not fit inside ingest's 24-hour window")
    return (now_ms - span_ms - margin_ms) // 60_000 * 60_000


# --- load ----------------------------------------------------------------------------------
def publish_now(settings: Settings, messages: list[tuple[str, bytes]],
                timeout: float = 20.0) -> None:
    """Publish a few messages at QoS 1 and wait for the broker's acknowledgements (the
    scripted incidents of a fault case: a panic button pressed, intruders on camera)."""
    from cityops.registry import load_fleet
    from simulators.publisher import open_sink

    # As the devices' own identities (the load fleet's: its district bridges).
    sink = open_sink(settings, load_fleet(settings.fleet_file), qos=1,
                     client_id=f"cityops-e2e-script-{os.getpid()}-{time.monotonic_ns()}")
    sink.connect()
    try:
        for topic, payload in messages:
            sink.publish(topic, payload)
        assert sink.drain(timeout) and not sink.refused and not sink.errors, \
            "scripted messages not all acknowledged"
    finally:
        sink.close()


def publish_load(settings: Settings, truth_path: Path, *, seed: int, start_ms: int,
                 rate: float, count: int | None = None, duration: float | None = None,
                 scenarios: tuple[str, ...] = (), malformed_share: float = 0.0,
                 fleet: Path | None = None, inflight: int = 1000,
                 stop: threading.Event | None = None, pause: threading.Event | None = None,
                 drained: threading.Event | None = None) -> Any:
    """Publish a simulation over MQTT (QoS 1) and record its ground truth; blocking."""
    from simulators.publisher import publish_blocking
    from simulators.simulation import Simulation

    sim = Simulation(fleet or settings.fleet_file, seed=seed, start_ms=start_ms,
                     scenarios=list(scenarios), malformed_share=malformed_share,
                     topic_root=settings.mqtt_topic_root)
    return publish_blocking(sim, settings, rate=rate, count=count, duration=duration, qos=1,
                            inflight=inflight, pace_clock=False, ground_truth=truth_path,
                            progress=False, stop=stop, pause=pause, drained=drained,
                            client_id=f"cityops-e2e-{seed}-{os.getpid()}")


# --- what should be there -------------------------------------------------------------------
@dataclass
class Expected:
    """What the pipeline must have stored for one ground-truth file."""

    messages: int = 0
    duplicates_sent: int = 0
    # (sensor id, event time ms) -> metrics: a reading's natural key, as stored
    readings: dict[tuple[str, int], int] = field(default_factory=dict)
    incidents: set[str] = field(default_factory=set)
    deadletters: collections.Counter[str] = field(default_factory=collections.Counter)
    # (MQTT topic, reason) -> dead letters owed: a device can send two bad payloads that
    # are byte-for-byte equal (a JSON cut in half before its timestamp), so dead letters
    # are counted per topic, not told apart by payload
    deadletter_topics: collections.Counter[tuple[str, str]] = field(
        default_factory=collections.Counter)
    heartbeats: int = 0  # readings without measurements (panic buttons' HEARTBEAT)
    min_time_ms: int = 2**62
    max_time_ms: int = 0

    @property
    def events(self) -> int:
        return len(self.readings) + len(self.incidents)

    @property
    def rows(self) -> int:
        return sum(self.readings.values()) + len(self.incidents)


_truth_decoder = msgspec.json.Decoder(Truth)


def expected_from_truth(path: Path) -> Expected:
    """Read a ground-truth file: the good events (by contract event id) and the dead
    letters (by reason) the pipeline owes. A byte-for-byte resend owes nothing new."""
    exp = Expected()
    with Path(path).open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            t = _truth_decoder.decode(line)
            exp.messages += 1
            if t.duplicate_of is not None:
                exp.duplicates_sent += 1
                continue
            if t.malformed is not None:
                exp.deadletters[t.malformed] += 1
                exp.deadletter_topics[(t.topic, t.malformed)] += 1
                continue
            for r in t.readings:
                if r.malformed is not None:
                    exp.deadletters[r.malformed] += 1
                    exp.deadletter_topics[(t.topic, r.malformed)] += 1
                    continue
                if r.kind != "incident" and not r.measurements:
                    exp.heartbeats += 1  # a liveness ping: no row to store, nothing to count
                    continue
                if r.kind == "incident":
                    exp.incidents.add(event_id(r.sensor_id, r.event_time, r.kind, r.incident))
                else:
                    exp.readings[(r.sensor_id, r.event_time)] = len(r.measurements)
                exp.min_time_ms = min(exp.min_time_ms, r.event_time)
                exp.max_time_ms = max(exp.max_time_ms, r.event_time)
    return exp


# --- what is there ------------------------------------------------------------------------
@dataclass
class Stored:
    """The database compared with an ``Expected``."""

    events_expected: int
    events_stored: int  # distinct expected event ids found with all their metrics
    rows_stored: int
    duplicates: int  # rows beyond one per (event id, metric)
    deadletters_expected: int
    deadletters_stored: int  # rows since the case's watermark whose reason was expected
    deadletter_reasons: dict[str, int]
    deadletter_copies: int  # the same dead letter stored more than once

    @property
    def lost(self) -> int:
        return self.events_expected - self.events_stored

    @property
    def complete(self) -> bool:
        return (self.events_stored == self.events_expected
                and self.deadletters_stored >= self.deadletters_expected)


async def deadletter_watermark(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("select coalesce(max(id), 0) from deadletters"))


async def count_stored(conn: asyncpg.Connection, exp: Expected, dl_after_id: int = 0) -> Stored:
    """Count the expected events and dead letters in the database (temp-table joins).

    A reading is found by its natural key (sensor, event time), through the registry's
    integer key: the narrow ``readings`` row carries no text. An incident by its event id.
    """
    await conn.execute("create temp table if not exists e2e_expected "
                       "(sensor_id text, time_ms int8, event_id text, metrics int not null)")
    await conn.execute("truncate e2e_expected")
    records = [(k[0], k[1], None, v) for k, v in exp.readings.items()] + [
        (None, None, k, 1) for k in exp.incidents]
    await conn.copy_records_to_table("e2e_expected", records=records)
    await conn.execute("analyze e2e_expected")
    lo = datetime.fromtimestamp(exp.min_time_ms / 1000 - 1, UTC) if records else None
    hi = datetime.fromtimestamp(exp.max_time_ms / 1000 + 1, UTC) if records else None
    row = await conn.fetchrow(
        """
        with want as (
            select e.metrics, s.sensor_key,
                   timestamptz 'epoch' + e.time_ms * interval '1 millisecond' as time
              from e2e_expected e join sensors s using (sensor_id)),
        got as (
            select w.metrics, count(*) as n, count(distinct r.metric) as nd
              from want w join readings r
                on r.sensor = w.sensor_key and r.time = w.time and r.time between $1 and $2
             group by w.sensor_key, w.time, w.metrics
            union all
            select 1, count(*), count(*) from incidents i join e2e_expected e using (event_id)
             where i.time between $1 and $2 group by event_id)
        select count(*) filter (where g.nd >= g.metrics) as complete,
               coalesce(sum(g.n), 0) as rows,
               coalesce(sum(g.n - g.nd), 0) as dups
          from got g
        """, lo, hi)
    # Per (topic, reason): what was owed is stored if there are at least as many rows;
    # rows beyond that are copies (a resent bad payload is dead-lettered again, as is
    # one redelivered after an ingest restart).
    dl = await conn.fetch(
        "select mqtt_topic, reason, count(*) as n from deadletters where id > $1 "
        "group by 1, 2", dl_after_id)
    got = {(r["mqtt_topic"], r["reason"]): int(r["n"]) for r in dl}
    stored_dl = sum(min(got.get(k, 0), v) for k, v in exp.deadletter_topics.items())
    copies = sum(max(0, n - exp.deadletter_topics.get(k, 0)) for k, n in got.items())
    reasons: dict[str, int] = collections.Counter()
    for (_, reason), n in got.items():
        reasons[reason] += n
    reasons = dict(reasons)
    return Stored(exp.events, int(row["complete"]), int(row["rows"]), int(row["dups"]),
                  sum(exp.deadletters.values()), stored_dl, reasons, copies)


async def wait_stored(dsn: str, exp: Expected, dl_after_id: int, within_s: float,
                      poll: float = 0.5) -> tuple[Stored, float]:
    """Poll until everything expected is in the database (or ``within_s``); returns the
    last count and the seconds waited. Keeps polling through a database outage."""
    t0 = time.monotonic()
    last: Stored | None = None
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                last = await count_stored(conn, exp, dl_after_id)
            finally:
                await conn.close()
        except (TimeoutError, OSError, asyncpg.PostgresError):
            pass
        waited = time.monotonic() - t0
        if (last is not None and last.complete) or waited >= within_s:
            if last is None:
                raise TimeoutError(f"database unreachable for {within_s:.0f}s")
            return last, waited
        await asyncio.sleep(poll)


async def alerts_for(conn: asyncpg.Connection, rule_id: str, source: str) -> int:
    """How many alerts of ``rule_id`` were ever raised at ``source``."""
    return int(await conn.fetchval(
        "select count(*) from alerts where rule_id = $1 and source = $2", rule_id, source))


# --- resources ----------------------------------------------------------------------------
def process_tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


class ResourceSampler:
    """Samples RSS and CPU seconds of named process trees in a background thread."""

    def __init__(self, pids: dict[str, Any], interval: float = 0.5) -> None:
        self.pids = pids  # name -> pid or a callable returning the current pid
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int], dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2e-sampler", daemon=True)

    def _pid(self, name: str) -> int | None:
        p = self.pids[name]
        return p() if callable(p) else p

    def sample(self) -> tuple[float, dict[str, int], dict[str, float]]:
        rss: dict[str, int] = {}
        cpu: dict[str, float] = {}
        for name in self.pids:
            pid = self._pid(name)
            if pid:
                rss[name] = tree_rss(pid)
                cpu[name] = tree_cpu(pid)
        return time.monotonic(), rss, cpu

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def start(self) -> ResourceSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peak_rss(self, name: str) -> int:
        return max((s[1].get(name, 0) for s in self.samples), default=0)


def city_pids(city: City) -> dict[str, Any]:
    """Name -> pid getter for every worker and server of a city (pids change on restart)."""
    out: dict[str, Any] = {}
    for w in city.pipeline.workers:
        out[w.name] = (lambda w=w: w.proc.pid if w.proc is not None and w.alive else None)
    for s in city.stack.servers:
        out[s.name] = (lambda s=s: s.proc.pid)
    return out


@contextlib.contextmanager
def sampling(pids: dict[str, Any], interval: float = 0.5) -> Iterator[ResourceSampler]:
    sampler = ResourceSampler(pids, interval).start()
    try:
        yield sampler
    finally:
        sampler.stop()
