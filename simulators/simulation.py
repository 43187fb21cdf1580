"""The simulation engine: a deterministic, infinite stream of MQTT messages from a fleet.

Library API (what tests and benchmarks use)::

    from simulators import Simulation

    sim = Simulation(fleet, seed=7, start_ms=1795312800000, scenarios=["gridlock"],
                     malformed_share=0.01, shard=(0, 1))
    for topic, payload, truth in sim.messages(10_000):   # no MQTT involved
        ...
    stats = await sim.publish(settings, rate=2000, count=10_000, qos=1)   # over MQTT

``fleet`` is a ``cityops.registry.Fleet`` or a fleet file path (default: the shipped
fleet). ``Sent`` is ``(topic, payload, truth)``; ``truth`` is a
``simulators.groundtruth.Truth``. ``publish`` runs ``simulators.publisher.publish_blocking``
in a worker thread (options: ``rate``, ``count``, ``duration``, ``qos``, ``inflight``,
``pace_clock``, ``ground_truth``, ``progress``, ``prefetch``, ``stop``) and returns its
``PublishStats``; with ``prefetch`` (default) it publishes the stream from its beginning.

The stream is generated one window of simulated time at a time (one minute for large
fleets, up to an hour for small ones, so numpy always works on thousands of readings):
the readings due in the window are computed for the whole fleet at once, encoded in their
vendors' formats, batched behind gateways (one batch per gateway and minute), passed
through the delivery faults (duplicates, delays, corruption), and released in send-time
order. Random draws come from generators seeded by ``(seed, window)``, so the same seed
and start time give the same bytes, and the shards of a fleet (``shard=(i, n)``, by a
stable hash of the device or gateway id) partition exactly the stream the whole fleet
would send.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from cityops.registry import Fleet, load_fleet
from cityops.settings import DEFAULT_FLEET
from simulators import vendors
from simulators.behaviour import (
    FOREIGN_CODES as _FOREIGN,
)
from simulators.behaviour import KINDS, CityModel, FleetArrays, Incident, Window, window_for
from simulators.groundtruth import Reading, Truth
from simulators.scenarios import (
    SCENARIO_NAMES,
    Faults,
    Scenario,
    ScenarioError,
    Setup,
    parse_scenario,
    tag_names,
)

if TYPE_CHECKING:
    from cityops.settings import Settings
    from simulators.publisher import PublishStats

MINUTE_MS = 60_000
# Readings are generated a window at a time; small fleets get longer windows (up to an hour)
# so numpy works on a few thousand readings per call instead of a few dozen.
TARGET_PER_WINDOW = 3000
_BIT = {name: 1 << i for i, name in enumerate(SCENARIO_NAMES)}


class Sent(NamedTuple):
    """One MQTT message: where it goes, its bytes, and what it really is."""

    topic: str
    payload: bytes
    truth: Truth


def shard_of(unit: str, shards: int) -> int:
    """Which shard publishes a device or gateway: a stable hash, the same in every process."""
    return int.from_bytes(hashlib.blake2b(unit.encode(), digest_size=8).digest(), "big") % shards


def _send_time(entry: tuple[int, int, int, int, str, bytes, Truth, Truth | None]) -> int:
    return entry[0]


class _Item(NamedTuple):
    sensor: int
    t: int  # true time
    payload: bytes
    event_time: int  # as ingest reads it
    kind: str
    incident: str | None
    meas: dict[str, float]
    interval_s: int
    tags: int


class Simulation:
    """A simulated Can Tho fleet producing its MQTT traffic (see the module docstring)."""

    def __init__(self, fleet: Fleet | Path | str | None = None, *, seed: int = 0,
                 start_ms: int | None = None, speed: float = 1.0,
                 scenarios: Iterable[str | Scenario] = (), malformed_share: float = 0.0,
                 shard: tuple[int, int] = (0, 1), topic_root: str = "city") -> None:
        scenarios = list(scenarios)
        if fleet is None or isinstance(fleet, str | Path):
            fleet = load_fleet(Path(fleet) if fleet is not None else DEFAULT_FLEET)
        if not 0.0 <= malformed_share <= 1.0:
            raise ValueError(f"malformed share must be in [0, 1], got {malformed_share}")
        index, count = shard
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"bad shard {index}/{count}: need 0 <= i < n")
        if seed < 0:
            raise ValueError("seed must be non-negative")
        # How to rebuild this simulation elsewhere (the publisher's generator process).
        self.spec: dict[str, object] = {
            "fleet": fleet, "seed": seed, "start_ms": start_ms, "speed": speed,
            "scenarios": list(scenarios), "malformed_share": malformed_share,
            "shard": shard, "topic_root": topic_root}
        self.fleet = fleet
        self.seed = int(seed)
        self.start_ms = (int(time.time()) // 60 * 60_000) if start_ms is None else int(start_ms)
        self.spec["start_ms"] = self.start_ms
        self.speed = float(speed)
        self.malformed_share = float(malformed_share)
        self.shard = (index, count)
        self.topic_root = topic_root
        self.fa = FleetArrays(fleet, self.seed)
        self.model = CityModel(self.fa)
        self.faults = Faults.none(len(self.fa))
        self.scenarios = [s if isinstance(s, Scenario) else parse_scenario(s) for s in scenarios]
        names = [s.name for s in self.scenarios]
        if len(set(names)) != len(names):
            raise ScenarioError(f"scenario given twice: {names}")
        setup = Setup(self.fa, self.start_ms, self.seed, self.faults)
        for sc in self.scenarios:
            sc.prepare(setup)

        sensors = fleet.sensors
        self._topic = [f"{topic_root}/{s.topic_suffix}" for s in sensors]
        self._gateway = [s.gateway for s in sensors]
        self._gw_topic = {s.gateway: f"{topic_root}/{s.district}/gateway/{s.gateway}"
                          for s in sensors if s.gateway}
        self._vendor = self.fa.vendor
        units = [s.gateway or s.sensor_id for s in sensors]
        self.in_shard = np.array([shard_of(u, count) == index for u in units])
        per_minute = float((MINUTE_MS / self.fa.interval_ms).sum())
        self.window_ms = MINUTE_MS * int(min(60, max(1, TARGET_PER_WINDOW // per_minute)))
        self._reps = math.ceil(self.window_ms / int(self.fa.interval_ms.min()))
        self._pending: list[tuple[int, int, int, int, str, bytes, Truth, Truth | None]] = []
        self._window = 0
        self._seq = 0
        self._last_time: dict[str, int] = {}
        self._frozen: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self._tag_cache: dict[int, tuple[str, ...]] = {0: ()}
        # Python lists of the per-sensor faults: the per-message loops index them.
        self._in_shard: list[bool] = self.in_shard.tolist()
        self._offline: list[int] = self.faults.offline_from.tolist()
        self._skew: list[int] = self.faults.skew_ms.tolist()
        self._stream = self._generate()

    # --- public API --------------------------------------------------------------------
    @property
    def sensors(self) -> list[str]:
        """Ids of the sensors this shard publishes for."""
        return [sid for sid, ok in zip(self.fa.ids, self.in_shard, strict=True) if ok]

    def messages_per_sim_second(self) -> float:
        """Average messages this shard sends per simulated second (faults aside)."""
        solo = self.in_shard & np.array([g is None for g in self._gateway])
        gws = {g for g, ok in zip(self._gateway, self.in_shard, strict=True) if g and ok}
        return float((1000.0 / self.fa.interval_ms[solo]).sum()) + len(gws) * 1000.0 / MINUTE_MS

    def messages(self, n: int) -> list[Sent]:
        """The next ``n`` messages of the stream (continues where the last call stopped)."""
        out = []
        for _ in range(n):
            out.append(next(self._stream))
        return out

    def __iter__(self) -> Iterator[Sent]:
        return self._stream

    def batches(self) -> Iterator[list[Sent]]:
        """The stream in chunks (one generation window each, possibly empty)."""
        while True:
            yield self._next_window()

    async def publish(self, settings: Settings, **options: object) -> PublishStats:
        """Publish over MQTT; options as ``simulators.publisher.publish`` (rate, count...)."""
        from simulators.publisher import publish

        return await publish(self, settings, **options)  # type: ignore[arg-type]

    # --- generation ----------------------------------------------------------------------
    def _generate(self) -> Iterator[Sent]:
        while True:
            yield from self._next_window()

    def _next_window(self) -> list[Sent]:
        k = self._window
        self._window += 1
        t0 = self.start_ms + k * self.window_ms
        t1 = t0 + self.window_ms
        self._build(k, t0, t1)
        # Everything generated so far that leaves before the next window starts goes now;
        # later windows only produce messages sent at or after their own start.
        pending = self._pending
        pending.sort()  # by (send time, window, position, copy): unique, so never a Truth
        cut = bisect.bisect_left(pending, t1, key=_send_time)
        ready, self._pending = pending[:cut], pending[cut:]
        out: list[Sent] = []
        check_order = self.faults.disorder_share > 0
        last = self._last_time
        new_sent = tuple.__new__
        for _, _, _, _, topic, payload, truth, original in ready:
            truth.seq = self._seq
            self._seq += 1
            if original is not None:
                truth.duplicate_of = original.seq
            elif check_order and truth.malformed is None:
                for r in truth.readings:
                    if r.malformed:
                        continue
                    prev = last.get(r.sensor_id)
                    if prev is not None and r.event_time < prev:
                        r.out_of_order = True
                    else:
                        last[r.sensor_id] = r.event_time
            out.append(new_sent(Sent, (topic, payload, truth)))
        return out

    def _build(self, k: int, t0: int, t1: int) -> None:
        fa = self.fa
        rng = np.random.default_rng([self.seed, k])
        self.model.step(rng, self.window_ms / MINUTE_MS)
        first = t0 + (fa.phase_ms - t0) % fa.interval_ms
        times = first[None, :] + np.arange(self._reps)[:, None] * fa.interval_ms[None, :]
        due = times < t1
        sensor = np.nonzero(due)[1]
        t = times[due]
        w = window_for(k, t0, t1, sensor, t, np.random.default_rng([self.seed, k, 1]))
        for sc in self.scenarios:
            sc.apply(w, fa)
        stuck = t >= self.faults.stuck_from[sensor]
        w.tags[stuck] |= _BIT["stuck"]
        w.tags[self.faults.skew_ms[sensor] != 0] |= _BIT["skew"]

        items: list[_Item] = []
        kind_r = fa.kind[sensor]
        crowd_cols: dict[str, np.ndarray] = {}
        for ki, kind in enumerate(KINDS):
            m = kind_r == ki
            idx = np.flatnonzero(m)
            model = getattr(self.model, _MODEL[kind])
            cols = model(w, m, rng)
            self._apply_stuck(kind, sensor[idx], stuck[idx], cols)
            if kind == "crowd":
                crowd_cols = {"sensor": sensor[idx], "t": t[idx], **cols}
            if len(idx):
                items.extend(self._encode(kind, w, idx, cols))
        panic = sensor[kind_r == KINDS.index("panic")]
        incidents = self.model.background_incidents(
            w, crowd_cols["sensor"], crowd_cols["t"], crowd_cols["density"],
            crowd_cols["people"], panic, rng)
        incidents.extend(w.incidents)
        items.extend(self._encode_incidents(incidents))
        self._schedule(k, items, np.random.default_rng([self.seed, k, 2]))

    def _apply_stuck(self, kind: str, sensors: np.ndarray, stuck: np.ndarray,
                     cols: dict[str, np.ndarray]) -> None:
        """A stuck device repeats the values of its first reading after it got stuck."""
        for j in np.flatnonzero(stuck).tolist():
            key = (kind, int(sensors[j]))
            frozen = self._frozen.get(key)
            if frozen is None:
                self._frozen[key] = {c: np.copy(v[j]) for c, v in cols.items()}
            else:
                for c, v in cols.items():
                    v[j] = frozen[c]

    def _encode(self, kind: str, w: Window, idx: np.ndarray, cols: dict[str, np.ndarray]
                ) -> list[_Item]:
        fa = self.fa
        s_all = w.sensor[idx]
        true_t = w.t[idx]
        pay_t = true_t + self.faults.skew_ms[s_all]
        tags = w.tags[idx]
        vendor_r = np.array([self._vendor[s] for s in s_all.tolist()])
        out: list[_Item] = []
        for vendor in sorted(set(vendor_r.tolist())):
            vm = vendor_r == vendor
            s = s_all[vm]
            ids = [fa.ids[i] for i in s.tolist()]
            ts = pay_t[vm].tolist()
            iv = (fa.interval_ms[s] // 1000).tolist()
            c = {name: v[vm] for name, v in cols.items()}
            kinds: list[str] | str = "reading"
            incidents: list[str | None] | None = None
            interval: list[int] | int = iv
            if kind == "traffic":
                enc = vendors.TRAFFIC_ENCODERS[vendor](
                    ids, ts, iv, c["mc"].tolist(), c["car"].tolist(), c["truck"].tolist(),
                    c["bus"].tolist(), c["speed"].tolist(), c["occ"].tolist())
            elif kind == "signal":
                enc = vendors.saomai_signal(ids, ts, c["phase"].tolist(), c["fault"].tolist())
                faults = c["fault"].tolist()
                kinds = ["incident" if f else "reading" for f in faults]
                incidents = ["signal_fault" if f else None for f in faults]
                interval = 0
            elif kind == "crowd":
                people, dens = c["people"].tolist(), c["density"].tolist()
                if vendor == "guardeye":
                    enc = vendors.guardeye_stats(ids, ts, people, dens)
                else:
                    enc = vendors.safecity(ids, ts, ["HEARTBEAT"] * len(ids),
                                           [{"people": p, "density": d}
                                            for p, d in zip(people, dens, strict=True)])
                interval = 0
            elif kind == "door":
                opened = c["open"].tolist()
                if vendor == "guardeye":
                    names = ["door_open" if o else "door_closed" for o in opened]
                    enc = vendors.guardeye_event(ids, ts, names, [1.0] * len(ids),
                                                 [0] * len(ids), [0.0] * len(ids))
                    kinds, incidents = "incident", list(names)
                else:
                    enc = vendors.safecity(ids, ts, ["HEARTBEAT"] * len(ids),
                                           [{"door_open": o} for o in opened])
                interval = 0
            elif kind == "panic":
                enc = vendors.safecity(ids, ts, ["HEARTBEAT"] * len(ids), [{}] * len(ids))
                interval = 0
            elif kind == "footfall":
                enc = vendors.FOOTFALL_ENCODERS[vendor](ids, ts, iv, c["in"].tolist(),
                                                        c["out"].tolist())
            elif kind == "boats":
                enc = vendors.visitcount_boats(ids, ts, iv, c["boats"].tolist())
            elif kind == "probe":
                vn = c["vn"].tolist()
                foreign = c["foreign"].tolist()
                pairs = [[("VN", a), *((cc, n) for cc, n in zip(_FOREIGN, row, strict=True)
                                       if n)] if a else
                         [(cc, n) for cc, n in zip(_FOREIGN, row, strict=True) if n]
                         for a, row in zip(vn, foreign, strict=True)]
                enc = vendors.probenet_probe(ids, ts, iv, pairs)
            elif kind == "hotel":
                rooms, occ = c["rooms"].tolist(), c["occupied"].tolist()
                if vendor == "visitcount":
                    enc = vendors.visitcount_hotel(ids, ts, rooms, occ)
                    interval = 0
                else:
                    enc = vendors.probenet_hotel(ids, ts, iv, rooms, occ)
            else:  # pragma: no cover - KINDS is closed
                raise AssertionError(kind)
            n = len(enc)
            new_item = tuple.__new__
            kl = [kinds] * n if isinstance(kinds, str) else kinds
            il = incidents if incidents is not None else [None] * n
            ivl = [interval] * n if isinstance(interval, int) else interval
            for (payload, et, meas), si, tt, k, inc, ivs, tg in zip(
                    enc, s.tolist(), true_t[vm].tolist(), kl, il, ivl, tags[vm].tolist(),
                    strict=True):
                out.append(new_item(_Item, (si, tt, payload, et, k, inc, meas, ivs, tg)))
        return out

    def _encode_incidents(self, incidents: list[Incident]) -> list[_Item]:
        fa = self.fa
        out: list[_Item] = []
        for ev in incidents:
            vendor = self._vendor[ev.sensor]
            sid = fa.ids[ev.sensor]
            ts = ev.t + int(self.faults.skew_ms[ev.sensor])
            tags = ev.tags | (_BIT["skew"] if self.faults.skew_ms[ev.sensor] else 0)
            if vendor == "guardeye":
                (payload, et, meas), = vendors.guardeye_event(
                    [sid], [ts], [ev.incident], [ev.confidence], [ev.people], [ev.density])
            else:
                kind = KINDS[fa.kind[ev.sensor]]
                data: dict[str, object] = {}
                if kind == "crowd":
                    data = {"people": ev.people, "density": ev.density}
                elif kind == "door":
                    data = {"door_open": ev.incident != "door_closed"}
                (payload, et, meas), = vendors.safecity([sid], [ts], [ev.incident], [data])
            out.append(_Item(ev.sensor, ev.t, payload, et, "incident", ev.incident, meas, 0,
                             tags))
        return out

    def _reading(self, item: _Item, sensor_id: str | None = None) -> Reading:
        bits = item.tags
        tags = self._tag_cache.get(bits)
        if tags is None:
            tags = self._tag_cache[bits] = tuple(tag_names(bits))
        return Reading(sensor_id=sensor_id or self.fa.ids[item.sensor],
                       event_time=item.event_time, true_time=item.t, kind=item.kind,
                       incident=item.incident, interval_s=item.interval_s,
                       measurements=item.meas, skew_ms=self._skew[item.sensor],
                       tags=tags)

    def _schedule(self, k: int, items: list[_Item], frng: np.random.Generator) -> None:
        """Group into messages, apply delivery faults, and queue by send time.

        Every random decision is drawn for the whole fleet before the shard filter, so a
        shard's messages are exactly the whole fleet's messages for its devices.
        """
        u = frng.random((len(items), 5)).tolist()
        offline = self._offline
        in_shard = self._in_shard
        gateways: dict[tuple[str, int], list[int]] = {}
        pos = 0
        for j, it in enumerate(items):
            s = it.sensor
            if not in_shard[s] or it.t >= offline[s]:
                continue
            gw = self._gateway[s]
            if gw is not None:
                # a gateway flushes once a minute
                gateways.setdefault((gw, (it.t - self.start_ms) // MINUTE_MS), []).append(j)
                continue
            truth = Truth(topic=self._topic[s], send_time=it.t, unit=self.fa.ids[s],
                          vendor=self._vendor[s], readings=(self._reading(it),))
            self._queue(k, pos, truth, it.payload, u[j], self._vendor[s], [])
            pos += 1
        for (gw, _), members in gateways.items():
            its = [items[j] for j in members]
            sent_at = max(it.t for it in its) + 500
            truth = Truth(topic=self._gw_topic[gw], send_time=sent_at, unit=gw,
                          vendor=self._vendor[its[0].sensor], gateway=True,
                          readings=tuple(self._reading(it) for it in its))
            compact = [self._vendor[it.sensor] == "compact" for it in its]
            self._queue(k, pos, truth, [it.payload for it in its], u[members[0]],
                        self._vendor[its[0].sensor], compact)
            pos += 1

    def _queue(self, k: int, pos: int, truth: Truth, payload: bytes | list[bytes],
               u: list[float], vendor: str, compact: list[bool]) -> None:
        faults = self.faults
        if u[0] < self.malformed_share:
            payload = self._malform(truth, payload, u[1], vendor, compact)
            if isinstance(payload, list):
                payload = vendors.gateway_batch(truth.unit, truth.send_time, payload, compact)
            self._pending.append((truth.send_time, k, pos, 0, truth.topic, payload,
                                        truth, None))
            return
        if isinstance(payload, list):
            payload = vendors.gateway_batch(truth.unit, truth.send_time, payload, compact)
        if u[3] < faults.disorder_share:
            delay = 20_000 + int(u[4] * (faults.disorder_max_ms - 20_000))
            truth.send_time += delay
            for r in truth.readings:
                r.late = True
                r.tags = (*r.tags, "disorder")
        self._pending.append((truth.send_time, k, pos, 0, truth.topic, payload, truth,
                                    None))
        if u[2] < faults.duplicate_share:
            copy = Truth(topic=truth.topic, send_time=truth.send_time + 200 + int(u[4] * 4800),
                         unit=truth.unit, vendor=truth.vendor, gateway=truth.gateway,
                         readings=tuple(_retag(r, "duplicates") for r in truth.readings))
            self._pending.append((copy.send_time, k, pos, 1, copy.topic, payload, copy,
                                        truth))

    def _malform(self, truth: Truth, payload: bytes | list[bytes], u: float, vendor: str,
                 compact: list[bool]) -> bytes | list[bytes]:
        if isinstance(payload, list):  # a gateway batch: one bad element, or bad JSON
            first = payload[0]
            kinds = (*vendors.supported_malformations(vendor, first, True), "bad_json")
            reason = kinds[min(int(u * len(kinds)), len(kinds) - 1)]
            if reason == "bad_json":
                whole = vendors.gateway_batch(truth.unit, truth.send_time, payload, compact)
                truth.malformed = "bad_json"
                return whole[: len(whole) // 2]
            r = truth.readings[0]
            real = r.sensor_id
            fake = _fake_id(real)
            bad_first = vendors.malform(vendor, first, reason, real, fake)
            r.malformed = reason
            if reason == "unknown_sensor":
                r.sensor_id = fake
            return [bad_first, *payload[1:]]
        kinds = vendors.supported_malformations(vendor, payload, False)
        reason = kinds[min(int(u * len(kinds)), len(kinds) - 1)]
        r = truth.readings[0]
        fake = _fake_id(r.sensor_id)
        bad = vendors.malform(vendor, payload, reason, r.sensor_id, fake)
        truth.malformed = reason
        r.malformed = reason
        if reason == "unknown_sensor":
            truth.topic = truth.topic.rsplit("/", 1)[0] + "/" + fake
            truth.unit = fake
            r.sensor_id = fake
        return bad


def _fake_id(sensor_id: str) -> str:
    """An id shaped like the fleet's but provisioned nowhere (vendor part ``zz``)."""
    return sensor_id[:-5] + "zz" + sensor_id[-3:]


def _retag(r: Reading, tag: str) -> Reading:
    return Reading(sensor_id=r.sensor_id, event_time=r.event_time, true_time=r.true_time,
                   kind=r.kind, incident=r.incident, interval_s=r.interval_s,
                   measurements=r.measurements, late=r.late, skew_ms=r.skew_ms,
                   tags=(*r.tags, tag))


_MODEL = {"traffic": "traffic", "signal": "signals", "crowd": "crowd", "door": "doors",
          "panic": "panic_readings", "footfall": "footfall", "boats": "boats",
          "probe": "probes", "hotel": "hotels"}
