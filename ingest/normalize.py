"""Turn a batch of raw MQTT messages into contract events and dead letters.

``Normalizer.normalize`` is a pure function of the batch (the clock it uses is each
message's receive time), so tests and benchmarks drive it directly. The work is
organised so that the per-payload Python is as thin as the formats allow:

1. route every message (and every element of a gateway batch) to its vendor's adapter by
   the sensor id in the topic or element, looked up in the registry;
2. decode each vendor's payloads in one msgspec call (``Adapter.decode_batch``);
3. let each adapter map records to rows in contract units;
4. check every row's event time and every measurement's physical range with numpy over
   the whole batch (rows grouped by their measurement names into 2-D arrays);
5. build events, or one ``DeadLetter`` per refused payload. A payload is refused whole
   (all its rows), a gateway element alone: the rest of its gateway batch goes on, and
   all refused elements of one gateway message make ONE dead letter (their count and
   the first ``GATEWAY_REASONS_KEPT`` reasons): a 200 kB message of 100,000 bad
   elements must not become 100,000 Kafka records.

Before any of that, ``ingest.strict`` holds every payload to what msgspec lets through:
UTF-8 everywhere, sane numbers, bounded nesting, no duplicate keys.

Nothing a sender can put in a payload or topic makes ``normalize`` raise: every failure
is a ``Reject`` that becomes a dead letter, and any other exception while handling one
message dead-letters that message (``decode_failed``, naming the exception) while the
rest of the batch goes on (the hypothesis tests in tests/test_ingest_fuzz.py hold us to
that).
"""

from __future__ import annotations

import base64
from collections import defaultdict
from dataclasses import dataclass, field

import msgspec
import numpy as np
from msgspec.structs import replace

from cityops.registry import Fleet, Sensor
from cityops.settings import Settings
from ingest import strict
from ingest.adapters import Adapter, Reject, Row, all_adapters
from ingest.adapters.base import reject_of
from ingest.contract import METRICS, DeadLetter, Event, Quality, event_id

# Event time ahead of receive time by more than this (but inside the accepted future
# window) marks the reading CLOCK_SKEWED: the sensor's clock runs fast.
CLOCK_SKEW_TOLERANCE_MS = 2_000
# Beyond a metric's physical range by up to this share of the range: clamp and flag.
CLAMP_MARGIN = 0.10
MAX_INTERVAL_S = 7 * 86_400
TOPIC_CACHE_SIZE = 100_000
# Reasons of refused gateway elements kept in their message's one dead letter.
GATEWAY_REASONS_KEPT = 5


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One MQTT message as ingest received it."""

    topic: str
    payload: bytes
    received_at: int  # epoch ms UTC


class _IdProbe(msgspec.Struct):
    """Just enough of any vendor's JSON object to learn which sensor sent it."""

    sensor: str | None = None
    deviceId: str | None = None
    camera: str | None = None
    device_id: str | None = None
    probe: str | None = None

    def sensor_id(self) -> str | None:
        return self.sensor or self.deviceId or self.camera or self.device_id or self.probe


class _Gateway(msgspec.Struct):
    gateway: str
    readings: list[msgspec.Raw]
    sent_at: int | None = None


class _GatewayIds(msgspec.Struct):
    """Every element's sensor id in one parse (falls back per element if any is odd)."""

    readings: list[_IdProbe | str]


@dataclass(slots=True)
class Normalized:
    """What one batch of messages became, with where each event came from.

    ``origin`` says which message (index in the batch) each event was made from, and
    ``keys`` the Kafka key of each message that made events: contract v2 produces one
    record per message, keyed by the gateway id for a gateway message, else by the
    sensor's gateway if the registry puts it behind one, else by the sensor id (so a
    sensor's readings share one partition whichever way they came).
    """

    events: list[Event]
    dead: list[DeadLetter]
    origin: list[int]
    keys: dict[int, str]


@dataclass(slots=True)
class _GatewayRefusals:
    """The refused elements of one gateway message: counted, the first few kept."""

    gateway: str
    readings: int  # elements in the message
    count: int = 0
    first: list[tuple[int, Reject]] = field(default_factory=list)  # (element, reason)

    def add(self, element: int, rej: Reject) -> None:
        self.count += 1
        self.first.append((element, rej))
        if len(self.first) > 8 * GATEWAY_REASONS_KEPT:  # phases add out of element order
            self.first.sort(key=lambda er: er[0])
            del self.first[GATEWAY_REASONS_KEPT:]


@dataclass(slots=True)
class _Item:
    """One payload to decode: a whole device message or one element of a gateway batch."""

    msg: int  # index of the message in the batch
    raw: bytes
    sensor: Sensor
    gateway: str | None = None  # set for an element of a gateway batch...
    element: int = 0  # ...at this position

    @property
    def where(self) -> str:
        """Prefix for dead-letter details: which element of which gateway batch."""
        return f"gateway {self.gateway} reading #{self.element}: " if self.gateway else ""


def _metric_bounds(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                   np.ndarray]:
    lo = np.array([METRICS[n].lo for n in names], dtype=np.float64)
    hi = np.array([METRICS[n].hi for n in names], dtype=np.float64)
    exact = np.array([METRICS[n].exact for n in names], dtype=bool)
    margin = (hi - lo) * CLAMP_MARGIN
    # A count below its floor is impossible, not noise: no margin there (see Metric).
    return lo, hi, np.where(exact, lo, lo - margin), hi + margin


class Normalizer:
    """Vendor payloads in, contract events and dead letters out (see module doc)."""

    def __init__(self, fleet: Fleet, settings: Settings) -> None:
        self.fleet = fleet
        self.root = settings.mqtt_topic_root
        self.max_payload = settings.ingest_max_payload_bytes
        self.late_ms = settings.ingest_late_ms
        self.too_old_ms = settings.ingest_too_old_ms
        self.future_ms = settings.ingest_future_ms
        self.adapters: dict[str, Adapter] = all_adapters()
        self._gateway = msgspec.json.Decoder(_Gateway)
        self._probe = msgspec.json.Decoder(_IdProbe | str)
        self._gateway_ids = msgspec.json.Decoder(_GatewayIds)
        self._bounds: dict[tuple[str, ...], tuple[np.ndarray, ...]] = {}
        # Device topics repeat (one per sensor): remember what each one routes to.
        self._topics: dict[str, Sensor | Reject] = {}
        # Per sensor, an event with its static fields filled: ``structs.replace`` on it
        # costs a fifth of building an Event from sixteen keyword arguments.
        self._templates: dict[str, Event] = {}
        self._escapes = True  # this batch has a backslash somewhere (strict.batch_facts)

    # -- public ---------------------------------------------------------------------
    def normalize(self, messages: list[InboundMessage]) -> tuple[list[Event], list[DeadLetter]]:
        """Events in message order, and one dead letter per refused payload."""
        out = self.normalize_batch(messages)
        return out.events, out.dead

    def normalize_batch(self, messages: list[InboundMessage]) -> Normalized:
        """``normalize``, saying which message each event came from and its Kafka key.

        Never raises for what is in a message: if the batch-wide work fails on something
        no rule foresaw, the batch is done again one message at a time, and the message
        that still fails becomes a ``decode_failed`` dead letter naming the exception.
        """
        try:
            return self._normalize(messages)
        except Exception as exc:
            if len(messages) == 1:
                return Normalized([], [_dead(messages[0], messages[0].payload,
                                             reject_of(exc), None)], [], {})
        out = Normalized([], [], [], {})
        for i, msg in enumerate(messages):
            try:
                one = self._normalize([msg])
            except Exception as exc:
                out.dead.append(_dead(msg, msg.payload, reject_of(exc), None))
                continue
            out.events += one.events
            out.dead += one.dead
            out.origin += [i] * len(one.events)
            if 0 in one.keys:
                out.keys[i] = one.keys[0]
        return out

    def _normalize(self, messages: list[InboundMessage]) -> Normalized:
        dead: list[tuple[int, DeadLetter]] = []  # (message index, letter)
        refused: dict[int, _GatewayRefusals] = {}  # message index -> its refused elements
        by_vendor: dict[str, list[_Item]] = defaultdict(list)
        # Encoding and numbers over the whole batch at once: per message only if flagged.
        clear, self._escapes = strict.batch_facts([m.payload for m in messages])
        for i, msg in enumerate(messages):
            try:
                self._route(i, msg, by_vendor, refused, clear)
            except Exception as exc:
                refused.pop(i, None)
                dead.append((i, _dead(msg, msg.payload, reject_of(exc), None)))
        # Decode per vendor, then rows per item.
        item_rows: list[tuple[_Item, list[Row]]] = []
        for vendor, items in by_vendor.items():
            adapter = self.adapters[vendor]
            # Gateway elements were cut out of a parsed array: each is one whole JSON
            # value already, so the joined decode needs no boundary check for them.
            records = adapter.decode_batch([it.raw for it in items],
                                           whole=all(it.gateway for it in items))
            for it, rec in zip(items, records, strict=True):
                try:
                    if isinstance(rec, Reject):
                        raise rec
                    if adapter.sensor_of(rec) != it.sensor.sensor_id:
                        raise Reject("not_owner", f"payload names sensor "
                                     f"{adapter.sensor_of(rec)[:80]!r}, topic names "
                                     f"{it.sensor.sensor_id!r}")
                    item_rows.append((it, adapter.rows(rec)))
                except Exception as exc:  # an adapter bug must not lose the rest of the batch
                    self._refuse(messages, it, reject_of(exc), dead, refused)
        item_rows.sort(key=lambda ir: ir[0].msg)  # events leave in arrival order
        events, origin, keys = self._check_and_build(messages, item_rows, dead, refused)
        dead += [(i, _gateway_dead(messages[i], r)) for i, r in refused.items() if r.count]
        dead.sort(key=lambda d: d[0])  # stable: a message's letters keep their order
        return Normalized(events, [d for _, d in dead], origin, keys)

    def _refuse(self, messages: list[InboundMessage], it: _Item, rej: Reject,
                dead: list[tuple[int, DeadLetter]],
                refused: dict[int, _GatewayRefusals]) -> None:
        """A refused item: a device payload's own dead letter, or one more refused
        element in its gateway message's letter."""
        if it.gateway is not None:
            refused[it.msg].add(it.element, rej)
        else:
            dead.append((it.msg, _dead(messages[it.msg], it.raw, rej, it.sensor.sensor_id)))

    # -- routing --------------------------------------------------------------------
    def _route(self, i: int, msg: InboundMessage, out: dict[str, list[_Item]],
               refused: dict[int, _GatewayRefusals], clear: bool) -> None:
        payload = msg.payload
        if len(payload) > self.max_payload:
            raise Reject("too_large", f"payload is {len(payload)} bytes, "
                                      f"limit {self.max_payload}")
        routed = self._topics.get(msg.topic)
        if routed is None:
            parts = msg.topic.split("/")
            if len(parts) == 4 and parts[0] == self.root and parts[2] == "gateway":
                self._route_gateway(i, msg, parts[3], out, refused, clear)
                return
            try:
                routed = self._device_topic(msg.topic, parts)
            except Reject as rej:
                routed = rej
            if len(self._topics) >= TOPIC_CACHE_SIZE:
                self._topics.clear()
            self._topics[msg.topic] = routed
        if isinstance(routed, Reject):
            raise routed
        if not clear:
            strict.check_bytes(payload)
        strict.check_json(payload, escapes=self._escapes)
        out[routed.vendor].append(_Item(i, payload, routed))

    def _device_topic(self, topic: str, parts: list[str]) -> Sensor:
        if len(parts) != 5 or parts[0] != self.root:
            raise Reject("bad_topic", f"topic {topic[:120]!r} is not "
                         f"{self.root}/district/domain/type/sensor or "
                         f"{self.root}/district/gateway/id")
        _, district, domain, typ, sid = parts
        sensor = self.fleet.get(sid)
        if sensor is None:
            raise Reject("unknown_sensor", f"sensor {sid[:80]!r} is not in the registry")
        if (sensor.district, sensor.domain, sensor.type) != (district, domain, typ):
            raise Reject("bad_topic", f"sensor {sid} is registered under "
                         f"{sensor.district}/{sensor.domain}/{sensor.type}, "
                         f"topic says {district}/{domain}/{typ}")
        return sensor

    def _route_gateway(self, i: int, msg: InboundMessage, gw: str,
                       out: dict[str, list[_Item]], refused: dict[int, _GatewayRefusals],
                       clear: bool) -> None:
        payload = msg.payload
        suspect: Reject | None = None
        try:
            if not clear:
                strict.check_bytes(payload)
        except Reject as rej:  # refuse only the elements at fault, if any is
            suspect = rej
        try:
            env = self._gateway.decode(payload)
        except Exception as exc:  # RecursionError: an element deeper than msgspec recurses
            raise reject_of(exc) from None
        if env.gateway != gw:
            raise Reject("bad_topic", f"payload names gateway {env.gateway[:80]!r}, "
                                      f"topic names {gw[:80]!r}")
        try:
            probes: list[_IdProbe | str | None] = list(
                self._gateway_ids.decode(payload).readings)
        except Exception:
            probes = [None] * len(env.readings)  # some element is odd: probe one by one
        raws = [bytes(span) for span in env.readings]
        at_fault: dict[int, Reject] = {}
        if suspect is not None:
            for n, raw in enumerate(raws):
                try:
                    strict.check_bytes(raw)
                except Reject as rej:
                    at_fault[n] = rej
            if not at_fault:
                raise suspect  # the envelope's own bytes: the whole message
        opened = [strict.brackets(raw) for raw in raws]
        self._check_envelope(payload, env, raws, opened)
        fleet = self.fleet
        bad = refused[i] = _GatewayRefusals(gw, len(raws))
        for n, (raw, probe, opens) in enumerate(zip(raws, probes, opened, strict=True)):
            try:
                if n in at_fault:
                    raise at_fault[n]
                # Two levels are the envelope's: an element may nest MAX_DEPTH - 2.
                strict.check_json(raw, strict.MAX_DEPTH - 2, opens, self._escapes)
                sid, raw = self._element_sensor(raw, probe)
                sensor = fleet.get(sid)
                if sensor is None:
                    raise Reject("unknown_sensor", f"sensor {sid[:80]!r} is not in the registry")
                if sensor.gateway != gw:  # the broker binds identity to topic, not payload
                    raise Reject("not_owner", f"sensor {sid} belongs to gateway "
                                 f"{sensor.gateway or 'none'}, not {gw[:80]}")
                if (sensor.vendor == "compact") != (probe.__class__ is str or
                                                    raw.startswith(b"C1|")):
                    raise Reject("unknown_format", f"element is not in {sensor.vendor} format")
            except Exception as exc:
                bad.add(n, reject_of(exc))
                continue
            out[sensor.vendor].append(_Item(i, raw, sensor, gw, n))

    @staticmethod
    def _check_envelope(payload: bytes, env: _Gateway, raws: list[bytes],
                        opened: list[int]) -> None:
        """Depth and duplicate keys of the envelope itself, by arithmetic on the elements.

        Whatever is not inside an element is the envelope's; in a plain envelope that is
        two brackets (the object and the readings array) and one colon per key msgspec
        saw (``gateway``, ``readings``, maybe ``sent_at``). Then no key can repeat, and
        it nests no deeper than its deepest element plus two: no need to scan it. Anything
        else (an extra field, a colon in the gateway id) gets the exact checks.
        """
        own_brackets = strict.brackets(payload) - sum(opened)
        own_colons = payload.count(b":") - sum(raw.count(b":") for raw in raws)
        if own_brackets != 2:
            strict.check_depth(payload)
        if own_colons != 2 + (env.sent_at is not None):
            strict.check_keys(payload)

    def _element_sensor(self, raw: bytes, probe: _IdProbe | str | None) -> tuple[str, bytes]:
        """The sensor id of one gateway element, and the bytes its adapter decodes."""
        if probe is None:
            try:
                probe = self._probe.decode(raw)
            except msgspec.ValidationError:
                raise Reject("unknown_format", f"gateway element is neither a JSON object "
                                               f"nor a compact line: {raw[:40]!r}") from None
        if isinstance(probe, str):  # a compact line carried as a JSON string
            fields = probe.split("|", 2)
            if len(fields) < 3:
                raise Reject("unknown_format", f"string element is not a compact line: "
                                               f"{probe[:40]!r}")
            return fields[1], probe.encode()
        sid = probe.sensor_id()
        if sid is None:
            raise Reject("missing_field", "element names no sensor (sensor, deviceId, "
                                          "camera, device_id or probe)")
        return sid, raw

    # -- vectorized checks ------------------------------------------------------------
    def _check_and_build(self, messages: list[InboundMessage],
                         item_rows: list[tuple[_Item, list[Row]]],
                         dead: list[tuple[int, DeadLetter]],
                         refused: dict[int, _GatewayRefusals]
                         ) -> tuple[list[Event], list[int], dict[int, str]]:
        """Events of the rows that pass, the message each came from, and the Kafka key
        of each message with events (see ``Normalized``)."""
        rows: list[Row] = []
        owner: list[int] = []  # row -> index into item_rows
        for k, (_, rs) in enumerate(item_rows):
            rows.extend(rs)
            owner.extend([k] * len(rs))
        n = len(rows)
        if n == 0:
            return [], [], {}
        received = np.fromiter((messages[item_rows[k][0].msg].received_at for k in owner),
                               dtype=np.float64, count=n)
        etime = np.fromiter((r.event_time for r in rows), dtype=np.float64, count=n)
        interval = np.fromiter((r.interval_s for r in rows), dtype=np.float64, count=n)
        ahead = etime - received
        reason: list[tuple[str, str] | None] = [None] * n
        quality = np.fromiter((r.quality for r in rows), dtype=np.int64, count=n)
        for j in np.flatnonzero(ahead < -self.too_old_ms).tolist():
            reason[j] = ("too_old", f"event time {int(etime[j])} is {-ahead[j] / 3.6e6:.1f} h "
                         f"before receive time (limit {self.too_old_ms / 3.6e6:g} h)")
        for j in np.flatnonzero(ahead > self.future_ms).tolist():
            reason[j] = ("in_future", f"event time {int(etime[j])} is {ahead[j] / 1000:.0f} s "
                         f"ahead of receive time (limit {self.future_ms / 1000:g} s)")
        for j in np.flatnonzero((interval < 0) | (interval > MAX_INTERVAL_S)).tolist():
            reason[j] = ("out_of_range", f"interval {int(interval[j])} s outside "
                         f"0..{MAX_INTERVAL_S}")
        quality[ahead < -self.late_ms] |= Quality.LATE
        quality[ahead > CLOCK_SKEW_TOLERANCE_MS] |= Quality.CLOCK_SKEWED
        measurements = self._check_ranges(rows, reason, quality)

        # One dead letter per item with any bad row; events for the others.
        bad_items: set[int] = set()
        for j in range(n):
            r = reason[j]
            if r is not None and owner[j] not in bad_items:
                bad_items.add(owner[j])
                self._refuse(messages, item_rows[owner[j]][0], Reject(*r), dead, refused)
        events: list[Event] = []
        origin: list[int] = []
        keys: dict[int, str] = {}
        q = quality.tolist()
        for j, row in enumerate(rows):
            if owner[j] in bad_items:
                continue
            it = item_rows[owner[j]][0]
            sid = it.sensor.sensor_id
            template = self._templates.get(sid) or self._template(it.sensor)
            events.append(replace(
                template, event_id=event_id(sid, row.event_time, row.kind, row.incident),
                event_time=row.event_time, receive_time=messages[it.msg].received_at,
                kind=row.kind, incident=row.incident, interval_s=row.interval_s,
                measurements=measurements[j], quality=q[j]))
            origin.append(it.msg)
            if it.msg not in keys:
                keys[it.msg] = it.gateway or it.sensor.gateway or sid
        return events, origin, keys

    def _template(self, s: Sensor) -> Event:
        if len(self._templates) >= TOPIC_CACHE_SIZE:
            self._templates.clear()
        ev = self._templates[s.sensor_id] = Event(
            event_id="", sensor_id=s.sensor_id, domain=s.domain, type=s.type,
            district=s.district, landmark=s.landmark, lat=s.lat, lon=s.lon, event_time=0,
            receive_time=0, vendor=s.vendor)
        return ev

    def _check_ranges(self, rows: list[Row], reason: list[tuple[str, str] | None],
                      quality: np.ndarray) -> list[dict[str, float]]:
        """Range-check all measurements: rows sharing metric names form one 2-D array."""
        measurements = [r.measurements for r in rows]
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for j, m in enumerate(measurements):
            if m:
                groups[tuple(m)].append(j)
        for names, idx in groups.items():
            bounds = self._bounds.get(names)
            if bounds is None:
                bounds = self._bounds[names] = _metric_bounds(names)
            lo, hi, lo_tol, hi_tol = bounds
            vals = np.array([list(measurements[j].values()) for j in idx], dtype=np.float64)
            inside_tol = (vals >= lo_tol) & (vals <= hi_tol)  # NaN/inf fail this too
            outside = (vals < lo) | (vals > hi)
            bad_rows = ~inside_tol.all(axis=1)
            for r in np.flatnonzero(bad_rows).tolist():
                c = int(np.flatnonzero(~inside_tol[r])[0])
                metric, value = METRICS[names[c]], float(vals[r, c])
                if metric.exact and value < metric.lo:
                    reason[idx[r]] = ("out_of_range", f"{names[c]} = {value!r}: a count "
                                      f"cannot be negative")
                    continue
                reason[idx[r]] = ("out_of_range", f"{names[c]} = {value!r} outside "
                                  f"{metric.lo:g}..{metric.hi:g} "
                                  f"by more than {CLAMP_MARGIN:.0%}")
            clamp_rows = np.flatnonzero(outside.any(axis=1) & ~bad_rows)
            if clamp_rows.size:
                clipped = np.clip(vals[clamp_rows], lo, hi).tolist()
                for r, values in zip(clamp_rows.tolist(), clipped, strict=True):
                    measurements[idx[r]] = dict(zip(names, values, strict=True))
                    quality[idx[r]] |= Quality.CLAMPED
        return measurements


def _dead(msg: InboundMessage, raw: bytes, rej: Reject, sensor_id: str | None,
          **extra: object) -> DeadLetter:
    try:
        payload, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    return DeadLetter(reason=rej.reason, detail=_text(rej.detail), mqtt_topic=_text(msg.topic),
                      payload=payload, payload_encoding=encoding, received_at=msg.received_at,
                      sensor_id=sensor_id, **extra)  # type: ignore[arg-type]


def _gateway_dead(msg: InboundMessage, r: _GatewayRefusals) -> DeadLetter:
    """The one dead letter of a gateway message's refused elements: the whole message
    (its raw bytes, so nothing is lost), how many were refused, the first reasons. Its
    reason is the first refused element's, so per-reason counts still say what broke."""
    first = sorted(r.first, key=lambda er: er[0])[:GATEWAY_REASONS_KEPT]
    reasons = [_text(f"#{n} {rej.reason}: {rej.detail}")[:300] for n, rej in first]
    detail = (f"gateway {r.gateway[:80]}: {r.count} of {r.readings} readings refused "
              f"(the others went on); first: " + "; ".join(reasons))
    return _dead(msg, msg.payload, Reject(first[0][1].reason, detail), None,
                 bad_readings=r.count, reasons=reasons)


def _text(s: str) -> str:
    """``s`` as text Kafka's JSON can carry: a lone surrogate (from a topic or an
    exception message) would make encoding the dead letter itself fail."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s
