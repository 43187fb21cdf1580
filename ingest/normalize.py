"""Turn a batch of raw MQTT messages into columns of readings and dead letters.

``Normalizer.normalize_batch`` is a pure function of the batch (the clock it uses is each
message's receive time), so tests and benchmarks drive it directly. The work is
organised so that the per-payload Python is as thin as the formats allow:

1. route every message (and every element of a gateway batch) to its vendor's adapter by
   the sensor id in the topic or element, looked up in the registry;
2. decode each vendor's payloads in one msgspec call (``Adapter.decode_batch``);
3. let each adapter map records to rows in contract units;
4. transpose the rows into columns (``ingest.columns.Normalized``): per row a sensor
   index into the batch's sensor table, event time, receive time, interval, quality,
   kind and a duplicate-window key; per reading a metric code and a value;
5. check every row's event time and every reading's physical range with numpy over the
   whole batch (bounds gathered by metric code), and clamp or refuse. A payload is
   refused whole (all its rows), a gateway element alone: the rest of its gateway batch
   goes on, and all refused elements of one gateway message make ONE dead letter (their
   count and the first ``GATEWAY_REASONS_KEPT`` reasons): a 200 kB message of 100,000
   bad elements must not become 100,000 Kafka records.

Why columns (issue 15, item 1): until then step 5 built one v1 ``Event`` struct per row
(sixteen fields, a 32-hex event id hashed per reading), the duplicate window looked up
each event id in Python sets, and the v2 encoder walked the events again to make the
columns it sends. Now nothing per reading is built after the adapters: the window takes
the rows' int64 keys (``ingest.dedup``), and ``ingest.kafka.v2_records_of`` encodes the
v2 records straight from the arrays (``ingest.contract.encode_columns``), byte for byte
what the event path made. ``Normalized.events`` still rebuilds v1 events from the
columns, for ``ingest_contract_version = 1`` and tests; it is not the hot path.

What stays Python per payload, and why: routing (a topic or gateway element names its
sensor; the registry lookup and the ownership checks are per payload), the strict JSON
checks, and the adapters' ``rows`` (each vendor's fields, units and optional parts differ,
and msgspec hands back one struct per payload). For a gateway message that is per
reading, and it is most of what ingest spends on one (``bench/ingest_normalize.py``).
Everything from the rows on is C-level iteration and numpy over the batch.

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
from itertools import chain

import msgspec
import numpy as np
import numpy.typing as npt

from cityops.registry import Fleet, Sensor
from cityops.settings import Settings, SettingsError
from ingest import strict
from ingest.adapters import Adapter, Reject, Row, all_adapters
from ingest.adapters.base import reject_of
from ingest.columns import METRIC_CODE, METRIC_NAMES, Normalized
from ingest.contract import METRICS, DeadLetter, Event, Quality, event_id
from ingest.dedup import event_key

# Event time ahead of receive time by more than this (but inside the accepted future
# window) marks the reading CLOCK_SKEWED: the sensor's clock runs fast.
CLOCK_SKEW_TOLERANCE_MS = 2_000
# Beyond a metric's physical range by up to this share of the range: clamp and flag.
CLAMP_MARGIN = 0.10
MAX_INTERVAL_S = 7 * 86_400
TOPIC_CACHE_SIZE = 100_000
# Reasons of refused gateway elements kept in their message's one dead letter.
GATEWAY_REASONS_KEPT = 5
MAX_KINDS = 1 << 10  # distinct (kind, incident) pairs one normalizer will code


def _bounds() -> tuple[npt.NDArray[np.float64], ...]:
    """Per metric code: the physical range, and how far past it a value is still clamped
    (a count below its floor is impossible, not noise: no margin there, see ``Metric``)."""
    lo = np.array([METRICS[n].lo for n in METRIC_NAMES], np.float64)
    hi = np.array([METRICS[n].hi for n in METRIC_NAMES], np.float64)
    exact = np.array([METRICS[n].exact for n in METRIC_NAMES], bool)
    margin = (hi - lo) * CLAMP_MARGIN
    return lo, hi, np.where(exact, lo, lo - margin), hi + margin


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


class Normalizer:
    """Vendor payloads in, columns of readings and dead letters out (see module doc)."""

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
        # Per metric code: lo, hi, lo - margin, hi + margin (``_bounds``), one row each.
        self._bounds = np.stack(_bounds(), axis=1)
        self._shape_codes = _Codes()
        self.kinds: list[tuple[str, str | None]] = []  # grows: (kind, incident) per code
        self._kind_codes = _KindCodes(self.kinds)
        # Device topics repeat (one per sensor): remember what each one routes to.
        self._topics: dict[str, Sensor | Reject] = {}
        self._escapes = True  # this batch has a backslash somewhere (strict.batch_facts)
        # Duplicate-window keys (``_keys``): registry index above enough event-time bits
        # to tell apart any two times the window can hold of one sensor, four times over.
        span = (settings.ingest_too_old_ms + settings.ingest_future_ms
                + settings.ingest_dedup_window_s * 1000)
        self._time_bits = max(1, span).bit_length() + 2
        self._time_mask = (1 << self._time_bits) - 1
        self._code = {s.sensor_id: k for k, s in enumerate(fleet)}
        if self._time_bits > 62 or len(self._code) >= 1 << (63 - self._time_bits):
            raise SettingsError(f"{len(self._code)} sensors and a {span} ms time span do "
                                f"not fit the duplicate window's 63-bit keys")

    # -- public ---------------------------------------------------------------------
    def normalize(self, messages: list[InboundMessage]) -> tuple[list[Event], list[DeadLetter]]:
        """v1 events in message order, and one dead letter per refused payload (the
        columns of ``normalize_batch`` rebuilt as ``Event`` structs: tests, contract v1)."""
        out = self.normalize_batch(messages)
        return out.events, out.dead

    def normalize_batch(self, messages: list[InboundMessage]) -> Normalized:
        """The batch as columns, with dead letters and each message's Kafka key.

        Never raises for what is in a message: if the batch-wide work fails on something
        no rule foresaw, the batch is done again one message at a time, and the message
        that still fails becomes a ``decode_failed`` dead letter naming the exception.
        """
        try:
            return self._normalize(messages)
        except Exception as exc:
            if len(messages) == 1:
                out = Normalized.empty(self.kinds)
                out.dead = [_dead(messages[0], messages[0].payload, reject_of(exc), None)]
                return out
        parts: list[tuple[int, Normalized]] = []
        dead: list[DeadLetter] = []
        for i, msg in enumerate(messages):
            try:
                one = self._normalize([msg])
            except Exception as exc:
                dead.append(_dead(msg, msg.payload, reject_of(exc), None))
                continue
            dead += one.dead
            if len(one):
                parts.append((i, one))
        return Normalized.joined(parts, dead, self.kinds)

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
        item_rows.sort(key=lambda ir: ir[0].msg)  # rows leave in arrival order
        out = self._check_and_build(messages, item_rows, dead, refused)
        dead += [(i, _gateway_dead(messages[i], r)) for i, r in refused.items() if r.count]
        dead.sort(key=lambda d: d[0])  # stable: a message's letters keep their order
        out.dead = [d for _, d in dead]
        return out

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

    # -- columns and vectorized checks ---------------------------------------------------
    def _check_and_build(self, messages: list[InboundMessage],
                         item_rows: list[tuple[_Item, list[Row]]],
                         dead: list[tuple[int, DeadLetter]],
                         refused: dict[int, _GatewayRefusals]) -> Normalized:
        """The rows that pass, as columns (see ``Normalized``); the items with a bad row
        refused whole (``_refuse``).

        Per item (payload) there is a little Python: its sensor's place in the batch's
        sensor table. Per row and reading only C-level iteration: ``zip(*rows)``
        transposes the adapters' rows, ``np.fromiter`` over ``map``/``chain`` fills the
        columns, and each distinct set of metric names is looked up once. The time and
        range rules then run as numpy over the whole batch; Python formats a reason only
        for a refused row.
        """
        if not item_rows:
            return Normalized.empty(self.kinds)
        table: dict[str, int] = {}
        sensors: list[Sensor] = []
        item_sensor: list[int] = []
        item_msg: list[int] = []
        item_nrows: list[int] = []
        rows: list[Row] = []
        for it, rs in item_rows:
            sid = it.sensor.sensor_id
            k = table.get(sid)
            if k is None:
                k = table[sid] = len(sensors)
                sensors.append(it.sensor)
            item_sensor.append(k)
            item_msg.append(it.msg)
            item_nrows.append(len(rs))
            rows += rs
        n = len(rows)
        if n == 0:
            return Normalized.empty(self.kinds)
        owner = np.repeat(np.arange(len(item_rows)), item_nrows)  # row -> item
        _, times, kinds, incidents, intervals, meas, quals = zip(*rows, strict=True)
        msg_of = np.array(item_msg, np.int64)[owner]
        received_at = np.fromiter((m.received_at for m in messages), np.int64, len(messages))
        received = received_at[msg_of]
        # Float for the checks, as any int a payload holds fits one (exact where it passes).
        etime = np.array(times, np.float64)
        interval = np.array(intervals, np.float64)
        quality = np.array(quals, np.int64)
        count = np.fromiter(map(len, meas), np.int64, n)
        codes = self._shape_codes
        metric = np.fromiter(chain.from_iterable(map(codes.__getitem__, map(tuple, meas))),
                             np.int64)
        value = np.fromiter(chain.from_iterable(map(dict.values, meas)), np.float64,
                            metric.size)
        kind = np.fromiter(map(self._kind_codes.__getitem__,
                               zip(kinds, incidents, strict=True)), np.int64, n)

        ahead = etime - received
        # Reason per row, later rules overriding earlier ones (as they always did):
        # too_old < in_future < interval < measurement range.
        why = np.zeros(n, np.int8)
        why[ahead < -self.too_old_ms] = 1
        why[ahead > self.future_ms] = 2
        why[(interval < 0) | (interval > MAX_INTERVAL_S)] = 3
        quality[ahead < -self.late_ms] |= Quality.LATE
        quality[ahead > CLOCK_SKEW_TOLERANCE_MS] |= Quality.CLOCK_SKEWED
        reading_row = np.repeat(np.arange(n), count)
        lo, hi, lo_tol, hi_tol = self._bounds[metric].T  # one gather for all four
        inside_tol = (value >= lo_tol) & (value <= hi_tol)
        first_bad: dict[int, int] = {}  # row -> its first reading out of range
        if not inside_tol.all():  # NaN/inf fail this too
            out_of_range = np.flatnonzero(~inside_tol)
            bad_rows, at = np.unique(reading_row[out_of_range], return_index=True)
            first_bad = dict(zip(bad_rows.tolist(), out_of_range[at].tolist(), strict=True))
            why[bad_rows] = 4
        # One dead letter per item with any bad row, in row order.
        bad_items: set[int] = set()
        if why.any():
            for j in np.flatnonzero(why).tolist():
                k = int(owner[j])
                if k in bad_items:
                    continue
                bad_items.add(k)
                rej = self._reason(int(why[j]), etime[j], ahead[j], interval[j],
                                   first_bad.get(j, -1), metric, value)
                self._refuse(messages, item_rows[k][0], rej, dead, refused)
        # Clamp what is past its bound by a little, in the rows that go on.
        outside = (value < lo) | (value > hi)
        if bad_items:
            keep_row = ~np.isin(owner, np.fromiter(bad_items, np.int64, len(bad_items)))
            keep_reading = keep_row[reading_row]
            outside &= keep_reading
        if outside.any():
            value = np.where(outside, np.clip(value, lo, hi), value)
            quality[np.unique(reading_row[outside])] |= Quality.CLAMPED
        row_sensor = np.array(item_sensor, np.int64)[owner]
        row_msg = msg_of
        if bad_items:  # the common case keeps every row: no copies then
            kept = np.flatnonzero(keep_row)
            row_sensor, row_msg, received, etime, interval, quality, kind, count = (
                a[kept] for a in (row_sensor, row_msg, received, etime, interval, quality,
                                  kind, count))
            metric, value = metric[keep_reading], value[keep_reading]
            owner = owner[kept]
        row_time = etime.astype(np.int64)
        out = Normalized(
            sensors, row_sensor, row_msg, row_time, received, interval.astype(np.int64),
            quality, kind, self._keys(sensors, row_sensor, row_time, kind), count, metric,
            value, self.kinds)
        # Each message's Kafka key, from its first kept row's item.
        if row_msg.size:
            first = np.flatnonzero(np.concatenate(([True], row_msg[1:] != row_msg[:-1])))
            for k in owner[first].tolist():
                it = item_rows[k][0]
                out.keys[it.msg] = it.gateway or it.sensor.gateway or it.sensor.sensor_id
        return out

    def _keys(self, sensors: list[Sensor], row_sensor: npt.NDArray[np.int64],
              row_time: npt.NDArray[np.int64], row_kind: npt.NDArray[np.int64]
              ) -> npt.NDArray[np.int64]:
        """Duplicate-window keys of the rows (``ingest.dedup``).

        A reading row: its sensor's registry index above the low ``_time_bits`` bits of
        its event time. Exact, not a hash: every row that passes lies within
        ``too_old + future`` of its receive time, and the window only holds rows
        received within ``ingest_dedup_window_s`` of each other, so two rows of one
        sensor in the window are less than a quarter of ``2**_time_bits`` ms apart and
        their low bits differ whenever their times do. An incident (rare): the hash of
        its v1 event id (``dedup.event_key``), negative, as kind and incident are part
        of what makes it the same.
        """
        codes = np.array([self._code[s.sensor_id] for s in sensors], np.int64)
        key = (codes[row_sensor] << self._time_bits) | (row_time & self._time_mask)
        if row_kind.any():
            for j in np.flatnonzero(row_kind).tolist():
                sid = sensors[int(row_sensor[j])].sensor_id
                kind, incident = self.kinds[int(row_kind[j])]
                key[j] = event_key(event_id(sid, int(row_time[j]), kind, incident))
        return key

    def _reason(self, why: int, etime: float, ahead: float, interval: float, reading: int,
                metric: npt.NDArray[np.int64], value: npt.NDArray[np.float64]) -> Reject:
        """The dead-letter reason of a refused row (the same words as ever)."""
        if why == 1:
            return Reject("too_old", f"event time {int(etime)} is {-ahead / 3.6e6:.1f} h "
                          f"before receive time (limit {self.too_old_ms / 3.6e6:g} h)")
        if why == 2:
            return Reject("in_future", f"event time {int(etime)} is {ahead / 1000:.0f} s "
                          f"ahead of receive time (limit {self.future_ms / 1000:g} s)")
        if why == 3:
            return Reject("out_of_range", f"interval {int(interval)} s outside "
                          f"0..{MAX_INTERVAL_S}")
        name = METRIC_NAMES[int(metric[reading])]
        m, v = METRICS[name], float(value[reading])
        if m.exact and v < m.lo:
            return Reject("out_of_range", f"{name} = {v!r}: a count cannot be negative")
        return Reject("out_of_range", f"{name} = {v!r} outside {m.lo:g}..{m.hi:g} "
                      f"by more than {CLAMP_MARGIN:.0%}")


class _Codes(dict):
    """Metric codes of each distinct tuple of metric names, made on first sight."""

    def __missing__(self, names: tuple[str, ...]) -> list[int]:
        codes = self[names] = [METRIC_CODE[n] for n in names]  # KeyError: not a metric
        return codes


class _KindCodes(dict):
    """A code per distinct (kind, incident) of rows, appended to ``kinds`` on first sight;
    (``reading``, None) is 0."""

    def __init__(self, kinds: list[tuple[str, str | None]]) -> None:
        super().__init__()
        self.kinds = kinds
        self[("reading", None)] = 0
        kinds.append(("reading", None))

    def __missing__(self, key: tuple[str, str | None]) -> int:
        if len(self) >= MAX_KINDS:
            raise ValueError(f"more than {MAX_KINDS} distinct incident types")
        code = self[key] = len(self.kinds)
        self.kinds.append(key)
        return code


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
