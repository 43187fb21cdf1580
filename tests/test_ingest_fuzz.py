"""Fuzzing ingest's front door (issue 14): hypothesis throws bytes, mutated vendor JSON and
topic strings at every vendor adapter and at the normalizer.

Properties held for every input:

- ``Normalizer.normalize`` never raises, and every adapter's ``decode_batch`` never raises
  (a bad payload is its ``Reject``);
- every message ends as events or dead letters, never both, never neither; a device
  message as exactly one of them, a gateway message as at most one dead letter (its
  refused elements together) next to the events of its good elements;
- every event passes the contract's validation: a registered sensor matching its topic,
  every measurement a known metric inside its physical range (after clamping), a count
  never negative, event time inside the accepted window, interval inside 0..7 days, and
  it encodes for Kafka;
- every dead letter has a documented reason and a detail, encodes for Kafka, and carries
  the message's raw bytes intact.

The suite runs a short fixed budget, reproducible (``derandomize=True``: the same
examples on every run and machine), under a minute in all. For a longer hunt set
``CITYOPS_FUZZ_EXAMPLES`` (examples per test; e.g. ``CITYOPS_FUZZ_EXAMPLES=20000``) and,
for new examples rather than the fixed ones, ``CITYOPS_FUZZ_RANDOM=1``::

    CITYOPS_FUZZ_EXAMPLES=20000 CITYOPS_FUZZ_RANDOM=1 \\
        .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_ingest_fuzz.py
"""

from __future__ import annotations

import base64
import copy
import json
import math
import os
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings

from cityops.registry import Sensor, load_fleet
from cityops.settings import Settings
from ingest import samples, strict
from ingest.adapters import Reject, all_adapters
from ingest.contract import (
    DEADLETTER_REASONS,
    METRICS,
    DeadLetter,
    Event,
    decode_deadletter,
    encode_deadletter,
    encode_event,
)
from ingest.normalize import MAX_INTERVAL_S, InboundMessage, Normalizer

T = 1_795_312_800_123
RECV = T + 1_500
EXAMPLES = int(os.environ.get("CITYOPS_FUZZ_EXAMPLES", "150"))
FUZZ = hyp_settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize=not os.environ.get("CITYOPS_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
SETTINGS = Settings()
FLEET = load_fleet(SETTINGS.fleet_file)
EACH = samples.one_of_each(FLEET)
VENDORS = sorted({v for v, _ in EACH})


@pytest.fixture(scope="module")
def norm() -> Normalizer:
    return Normalizer(FLEET, SETTINGS)


# -- strategies -----------------------------------------------------------------------------
leaves = (st.none() | st.booleans() | st.integers(min_value=-(10**6), max_value=10**6)
          | st.integers() | st.integers(min_value=10**18, max_value=10**60)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
          | st.sampled_from(["PT1M", "P1D", "2026-11-22T02:00:00Z", "event", "HEARTBEAT",
                            "door_open", "C1|x|1|2|T|1,2,3,4|5|6"]))
json_values = st.recursive(leaves, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=6), children, max_size=3),
                           max_leaves=10)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into the nested dicts of ``doc``."""
    out: list[tuple] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    return out


def _parent(doc: dict, path: tuple) -> dict:
    for k in path[:-1]:
        doc = doc[k]
    return doc


@st.composite
def mutated_json(draw: st.DrawFn, doc: dict) -> bytes:
    """A vendor document with a few field-level edits, then maybe one byte-level one."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "delete", "add", "negate"]))
        parent = _parent(doc, path)
        if op == "replace":
            parent[path[-1]] = draw(json_values)
        elif op == "delete":
            del parent[path[-1]]
        elif op == "add":
            parent[draw(st.text(max_size=6))] = draw(json_values)
        elif isinstance(parent[path[-1]], int | float) and not isinstance(parent[path[-1]],
                                                                          bool):
            parent[path[-1]] = -parent[path[-1]] - draw(st.integers(0, 3))
    raw = json.dumps(doc).encode()
    op = draw(st.sampled_from(["none", "none", "dup", "bytes", "bignum", "deep", "cut"]))
    if op == "dup" and doc:  # repeat a top-level key with another value
        key = draw(st.sampled_from(sorted(doc)))
        raw = b"{" + json.dumps(key).encode() + b": " + json.dumps(draw(leaves)).encode() \
            + b", " + raw[1:]
    elif op == "bytes":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(min_size=1, max_size=4)) + raw[i:]
    elif op == "bignum":
        digits = draw(st.sampled_from([b"9" * 25, b"1e400", b"-1E+999", b"7" * 400]))
        raw = raw.replace(b"1", digits, 1)
    elif op == "deep":
        n = draw(st.sampled_from([31, 33, 64, 5_000]))
        raw = raw[:-1] + b', "deep": ' + b"[" * n + b"]" * n + b"}"
    elif op == "cut":
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw


@st.composite
def mutated_compact(draw: st.DrawFn, line: str) -> bytes:
    fields = line.split("|")
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(fields) - 1))
        fields[i] = draw(st.text(max_size=10) | st.integers().map(str)
                         | st.sampled_from(["9" * 400, "-1", "-5,0,0,0", "1e400", ""]))
    raw = "|".join(fields).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(max_size=3)) + raw[i:]
    return raw


def payloads_for(s: Sensor) -> st.SearchStrategy[bytes]:
    doc = samples.reading(s, T)
    if isinstance(doc, str):
        return mutated_compact(doc) | st.binary(max_size=80)
    return mutated_json(doc) | st.binary(max_size=80)


# -- what every output must satisfy ---------------------------------------------------------
def _raw(d: DeadLetter) -> bytes:
    return d.payload.encode() if d.payload_encoding == "utf-8" else base64.b64decode(d.payload)


def check_event(ev: Event, topic: str) -> None:
    sensor = FLEET.get(ev.sensor_id)
    assert sensor is not None, ev
    if "/gateway/" not in topic:
        assert topic == samples.topic_of(sensor), (topic, ev)
    ahead = ev.event_time - ev.receive_time
    assert -SETTINGS.ingest_too_old_ms <= ahead <= SETTINGS.ingest_future_ms, ev
    assert 0 <= ev.interval_s <= MAX_INTERVAL_S, ev
    for name, value in ev.measurements.items():
        m = METRICS[name]
        assert math.isfinite(value) and m.lo <= value <= m.hi, (name, value, ev)
    encode_event(ev)


def check_dead(d: DeadLetter) -> None:
    assert d.reason in DEADLETTER_REASONS and d.detail, d
    assert decode_deadletter(encode_deadletter(d)) == d
    assert d.bad_readings >= 0 and len(d.reasons) <= 5


def check_batch(norm: Normalizer, messages: list[InboundMessage]) -> tuple[list[Event],
                                                                          list[DeadLetter]]:
    """Normalize (each message has its own ``received_at``) and hold the outputs to the
    properties of the module doc."""
    events, dead = norm.normalize(messages)
    by_msg = {m.received_at: m for m in messages}
    assert len(by_msg) == len(messages)
    for ev in events:
        check_event(ev, by_msg[ev.receive_time].topic)
    for d in dead:
        check_dead(d)
        assert _raw(d) == by_msg[d.received_at].payload  # the raw bytes, intact
    for m in messages:
        n_ev = sum(e.receive_time == m.received_at for e in events)
        n_dl = sum(d.received_at == m.received_at for d in dead)
        assert n_dl <= 1, (m, dead)
        if "/gateway/" not in m.topic:
            assert (n_ev, n_dl) in ((1, 0), (0, 1)), (m, events, dead)
        elif n_dl == 0:
            assert n_ev > 0 or b'"readings": []' in m.payload, (m, dead)
    return events, dead


# -- the tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("vendor", VENDORS)
def test_adapter_decode_batch_never_raises(vendor: str) -> None:
    """Each adapter alone: a batch of fuzzed payloads decodes to records or Rejects, and a
    record of a payload that passes the strict checks yields rows or a Reject."""
    adapter = all_adapters()[vendor]
    sensors = [s for (v, _), s in EACH.items() if v == vendor]

    @FUZZ
    @given(raws=st.lists(st.one_of(*[payloads_for(s) for s in sensors]), min_size=1,
                         max_size=5))
    def run(raws: list[bytes]) -> None:
        for whole in (False, True):
            records = adapter.decode_batch(raws, whole=whole)
            assert len(records) == len(raws)
        for raw, rec in zip(raws, adapter.decode_batch(raws), strict=True):
            if isinstance(rec, Reject):
                assert rec.reason in DEADLETTER_REASONS
                continue
            try:
                strict.check_bytes(raw)
                strict.check_json(raw)
            except Reject:
                continue  # ingest refuses it before rows() ever sees it
            try:
                adapter.rows(rec)
            except Reject as rej:
                assert rej.reason in DEADLETTER_REASONS

    run()


@pytest.mark.parametrize("vendor", VENDORS)
def test_normalizer_fuzzed_device_payloads(norm: Normalizer, vendor: str) -> None:
    sensors = [s for (v, _), s in EACH.items() if v == vendor]

    @FUZZ
    @given(batch=st.lists(st.sampled_from(sensors).flatmap(
        lambda s: st.tuples(st.just(s), payloads_for(s))), min_size=1, max_size=4),
           good_first=st.booleans())
    def run(batch: list[tuple[Sensor, bytes]], good_first: bool) -> None:
        msgs = [InboundMessage(samples.topic_of(s), p, RECV + i)
                for i, (s, p) in enumerate(batch)]
        good = InboundMessage(*samples.device_message(sensors[0], T), RECV + 100)
        msgs = [good, *msgs] if good_first else [*msgs, good]
        events, _ = check_batch(norm, msgs)
        assert any(e.receive_time == RECV + 100 for e in events)  # the good one goes on

    run()


@FUZZ
@given(elements=st.lists(st.sampled_from(list(EACH.values())).flatmap(payloads_for),
                         min_size=1, max_size=6),
       raw_elements=st.lists(st.binary(max_size=20), max_size=2))
def test_normalizer_fuzzed_gateway_elements(norm: Normalizer, elements: list[bytes],
                                            raw_elements: list[bytes]) -> None:
    """Fuzzed elements inside an otherwise good gateway message, next to good elements:
    the good ones go on, the message has at most one dead letter."""
    gw, members = next(iter(FLEET.gateways().items()))
    goods = [json.dumps(samples.reading(s, T)).encode() for s in members]
    payload = (b'{"gateway": "%s", "sent_at": %d, "readings": [' % (gw.encode(), T)
               + b", ".join(goods[:1] + elements + raw_elements + goods[1:]) + b"]}")
    topic = samples.gateway_topic(members[0].district, gw)
    events, dead = check_batch(norm, [InboundMessage(topic, payload, RECV)])
    if not dead or dead[0].bad_readings:  # not refused whole: the good elements went on
        got = [e.sensor_id for e in events]
        assert all(s.sensor_id in got for s in members), (got, dead)


topic_parts = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/"),
                      max_size=12) | st.sampled_from(["city", "gateway", "traffic", "ninh_kieu",
                                                      "+", "#", "", "$SYS"])


@FUZZ
@given(parts=st.lists(topic_parts, max_size=7), whole=st.text(max_size=40),
       which=st.integers(0, 1000))
def test_normalizer_fuzzed_topics(norm: Normalizer, parts: list[str], whole: str,
                                  which: int) -> None:
    """Arbitrary topic strings (split into levels or not) with good payloads: a topic
    that is not exactly its sensor's is refused, never routed elsewhere."""
    sensor = list(EACH.values())[which % len(EACH)]
    payload = samples.device_message(sensor, T)[1]
    gw_payload = samples.gateway_message(*next(iter(FLEET.gateways().items())), T)[1]
    msgs = [InboundMessage("/".join(parts), payload, RECV),
            InboundMessage(whole, payload, RECV + 1),
            InboundMessage("/".join(parts), gw_payload, RECV + 2),
            InboundMessage(samples.topic_of(sensor).replace(sensor.sensor_id, "/".join(parts)),
                           payload, RECV + 3)]
    check_batch(norm, msgs)


@FUZZ
@given(docs=st.lists(json_values, min_size=1, max_size=5), which=st.integers(0, 1000))
def test_normalizer_arbitrary_json_on_every_topic(norm: Normalizer, docs: list,
                                                  which: int) -> None:
    sensors = list(EACH.values())
    msgs = [InboundMessage(samples.topic_of(sensors[(which + i) % len(sensors)]),
                           json.dumps(d).encode(), RECV + i) for i, d in enumerate(docs)]
    check_batch(norm, msgs)
