"""Event contract v2: which encoding of a columnar batch, measured against v1 and each other.

What is compared, on the same normalized events (ingest's ``Normalizer`` output for
realistic messages of the load fleet):

- ``v1-json``            today: one JSON ``Event`` per Kafka record (``encode_event``);
                         decoded with ``decode_batches`` (one JSON parse, then a loop per
                         event to columns: what a consumer of v1 must do to get arrays).
- ``v2-msgpack-buffers`` the contract's ``EventBatch``: msgpack map, columns as
                         little-endian raw buffers (``encode_batch`` / ``decode_batches``).
- ``v2-msgpack-tuple``   the same buffers, msgpack array instead of map (no field names).
- ``v2-msgpack-lists``   the same logical batch with columns as msgpack lists of numbers.
- ``v2-json-lists``      the same with JSON lists (readable with any JSON parser).
- ``v2-arrow-ipc``       an Arrow IPC stream of one record batch: row columns, metric and
                         value as list columns, names in the schema metadata (only if
                         ``pyarrow`` is importable; it is not a project dependency).

Three shapes of traffic, each decoded as one consumer poll of about 500 rows:

- ``single``     500 device messages of one row each (mixed vendors): 500 records.
- ``gateway25``  20 gateway messages of 25 sensors each: 20 records in v2, 500 in v1.
- ``batch500``   the same 500 single rows coalesced into one record (v2 only; v1 is 500).

``v2-msgpack-buffers`` is decoded by the contract's own ``decode_batches``, with every
check it makes (lengths, index bounds, finite values, per-record errors); the other v2
candidates by a leaner assembler here that checks nothing, so their decode figures
flatter them against it, never the other way round.

A row is one sensor sample (a v1 event), a reading one measurement of it (the unit
stored as one narrow row downstream): costs are per reading, with ratios to v1.
``encode`` starts from the v1 ``Event`` structs ingest holds today and ends with the
Kafka values; ``decode`` starts from the values and ends with per-reading arrays
(sensor code, time, metric code, value, quality). ``produce`` adds what the Kafka
client does per record on ingest's side (aiokafka's record-batch builder: append each
keyed record, zstd-compress the batch), ``consume`` what it does on a consumer's (parse
the fetched batches back to values) before ``decode``: per-record costs that v2 saves
where a record holds many readings. ``kafka_bytes`` is the size of those zstd record
batches: what the broker stores and consumers fetch.

Usage: ``.venv/bin/python bench/contract.py [--repeat 5]`` (about 20 s on 2 shared
cores); writes ``bench/results/contract.json``. Timings are the best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import numpy as np
import numpy.typing as npt
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from cityops.registry import Fleet, Sensor, load_fleet
from cityops.settings import PROJECT_ROOT, Settings
from ingest import samples
from ingest.contract import (
    Event,
    EventBatch,
    decode_batches,
    encode_batch,
    encode_event,
)
from ingest.normalize import InboundMessage, Normalizer

try:
    import pyarrow as pa
except ImportError:  # not a dependency: measured where installed
    pa = None

RESULTS = PROJECT_ROOT / "bench" / "results" / "contract.json"
LOAD_FLEET = PROJECT_ROOT / "simulators" / "fleets" / "load.toml"
POLL_ROWS = 500
CODEC_ZSTD = 4  # the record-batch attribute of zstd (Kafka protocol)


# -- inputs ----------------------------------------------------------------------------------
def gateway_fleet(size: int) -> Fleet:
    """The load fleet with every group behind gateways of ``size`` sensors (as
    ``bench/e2e/run.py --mode gateway`` builds it)."""
    text = re.sub(r"^gateway_size = \d+\n", "", LOAD_FLEET.read_text(), flags=re.M)
    text = text.replace("[[group]]\n", f"[[group]]\ngateway_size = {size}\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fleet.toml"
        path.write_text(text)
        return load_fleet(path)


def normalized(messages: list[tuple[str, bytes]], fleet: Fleet, t: int
               ) -> list[list[Event]]:
    """Events of each message, as ingest's normalizer makes them."""
    norm = Normalizer(fleet, Settings())
    out = []
    for topic, payload in messages:
        events, dead = norm.normalize([InboundMessage(topic, payload, t)])
        assert not dead, dead
        out.append(events)
    return out


def cases() -> dict[str, list[list[Event]]]:
    """Case name -> the events of each v2 record of one poll."""
    now = int(time.time() * 1000)
    t0 = now - 120_000
    plain = load_fleet(LOAD_FLEET)
    direct = [s for s in plain if s.gateway is None and s.type != "panic_button"]
    singles = normalized([samples.device_message(direct[i % len(direct)], t0 + i)
                          for i in range(POLL_ROWS)], plain, now)
    gw = gateway_fleet(25)
    full: dict[str, list[Sensor]] = {g: m for g, m in gw.gateways().items() if len(m) == 25}
    by_group: dict[tuple[str, str], list[str]] = {}
    for g, m in full.items():  # round-robin over vendors and types: a realistic mix
        by_group.setdefault((m[0].vendor, m[0].type), []).append(g)
    picked: list[str] = []
    while len(picked) < POLL_ROWS // 25:
        for ids in by_group.values():
            if ids and len(picked) < POLL_ROWS // 25:
                picked.append(ids.pop())
    gateways = normalized([samples.gateway_message(g, full[g], t0 + k)
                           for k, g in enumerate(picked)], gw, now)
    return {"single": singles, "gateway25": gateways,
            "batch500": [[e for evs in singles for e in evs]]}


# -- candidate encodings ---------------------------------------------------------------------
class ListBatch(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The v2 batch with columns as lists of numbers instead of raw buffers."""

    v: int = 2
    sensors: list[str] = []
    vendors: list[str] = []
    metrics: list[str] = []
    sensor: list[int] = []
    time: list[int] = []
    receive_time: list[int] = []
    interval_s: list[int] = []
    quality: list[int] = []
    count: list[int] = []
    metric: list[int] = []
    value: list[float] = []


class TupleBatch(EventBatch, array_like=True):
    """``EventBatch`` as a msgpack array (positional fields)."""


def lists_of(events: list[Event]) -> dict[str, Any]:
    """The v2 columns of ``events`` as Python lists (the same pass as ``batch_of``)."""
    sensor_at: dict[str, int] = {}
    metric_at: dict[str, int] = {}
    shapes: dict[tuple[str, ...], list[int]] = {}
    c: dict[str, Any] = {k: [] for k in ("sensors", "vendors", "sensor", "time",
                                         "receive_time", "interval_s", "quality", "count",
                                         "metric", "value")}
    for ev in events:
        s = sensor_at.get(ev.sensor_id)
        if s is None:
            s = sensor_at[ev.sensor_id] = len(c["sensors"])
            c["sensors"].append(ev.sensor_id)
            c["vendors"].append(ev.vendor)
        m = ev.measurements
        names = tuple(m)
        codes = shapes.get(names)
        if codes is None:
            codes = shapes[names] = [metric_at.setdefault(n, len(metric_at)) for n in names]
        c["sensor"].append(s)
        c["time"].append(ev.event_time)
        c["receive_time"].append(ev.receive_time)
        c["interval_s"].append(ev.interval_s)
        c["quality"].append(ev.quality)
        c["count"].append(len(codes))
        c["metric"].extend(codes)
        c["value"].extend(m.values())
    c["metrics"] = list(metric_at)
    return c


Arrays = dict[str, npt.NDArray[Any]]


def assemble(parts: list[tuple[list[str], list[str], Arrays]]) -> Arrays:
    """Per-record (sensors, metrics, local columns) -> per-reading arrays with codes
    global to the poll: the same steps as ``decode_batches``, per record."""
    sensor_at: dict[str, int] = {}
    metric_at: dict[str, int] = {}
    rs, rt, rq, cnt, mc, val = [], [], [], [], [], []
    for sensors, metrics, a in parts:
        slut = np.array([sensor_at.setdefault(s, len(sensor_at)) for s in sensors], np.int64)
        mlut = np.array([metric_at.setdefault(m, len(metric_at)) for m in metrics], np.int64)
        rs.append(slut[a["sensor"].astype(np.int64)])
        rt.append(a["time"].astype(np.int64))
        rq.append(a["quality"].astype(np.int32))
        cnt.append(a["count"].astype(np.int64))
        mc.append(mlut[a["metric"].astype(np.int64)])
        val.append(a["value"].astype(np.float64))
    row = np.repeat(np.arange(sum(x.size for x in rs)), np.concatenate(cnt))
    rsa, rta, rqa = np.concatenate(rs), np.concatenate(rt), np.concatenate(rq)
    return {"sensor": rsa[row], "time": rta[row], "metric": np.concatenate(mc),
            "value": np.concatenate(val), "quality": rqa[row],
            "sensor_ids": list(sensor_at), "metric_names": list(metric_at)}


def from_contract(values: list[bytes]) -> Arrays:
    c = decode_batches(values)
    return {"sensor": c.sensor, "time": c.time, "metric": c.metric, "value": c.value,
            "quality": c.quality, "sensor_ids": c.sensor_ids, "metric_names": c.metric_names}


_mp_lists = msgspec.msgpack.Encoder()
_mp_lists_dec = msgspec.msgpack.Decoder(ListBatch)
_js_lists = msgspec.json.Encoder()
_js_lists_dec = msgspec.json.Decoder(ListBatch)
_tuple_enc = msgspec.msgpack.Encoder()
_tuple_dec = msgspec.msgpack.Decoder(TupleBatch)
_LIST_DTYPES = {"sensor": np.int64, "time": np.int64, "quality": np.int32, "count": np.int64,
                "metric": np.int64, "value": np.float64}


def _lists_decode(decoder: Any) -> Callable[[list[bytes]], Arrays]:
    def decode(values: list[bytes]) -> Arrays:
        parts = []
        for v in values:
            b = decoder.decode(v)
            parts.append((b.sensors, b.metrics, {k: np.array(getattr(b, k), dt)
                                                 for k, dt in _LIST_DTYPES.items()}))
        return assemble(parts)
    return decode


def _tuple_encode(events: list[Event]) -> bytes:
    b = msgspec.msgpack.decode(encode_batch(events), type=EventBatch)  # same buffers
    return _tuple_enc.encode(TupleBatch(**msgspec.structs.asdict(b)))


def _tuple_decode(values: list[bytes]) -> Arrays:
    parts = []
    for v in values:
        b = _tuple_dec.decode(v)
        parts.append((b.sensors, b.metrics, {
            "sensor": np.frombuffer(b.sensor, "<u2"), "time": np.frombuffer(b.time, "<i8"),
            "quality": np.frombuffer(b.quality, "<u2"), "count": np.frombuffer(b.count, "<u2"),
            "metric": np.frombuffer(b.metric, "u1"), "value": np.frombuffer(b.value, "<f8")}))
    return assemble(parts)


def _arrow_encode(events: list[Event]) -> bytes:
    c = lists_of(events)
    offsets = pa.array(np.concatenate(([0], np.cumsum(c["count"]))).astype(np.int32))
    batch = pa.RecordBatch.from_arrays(
        [pa.array(c["sensor"], pa.uint16()), pa.array(c["time"], pa.int64()),
         pa.array(c["receive_time"], pa.int64()), pa.array(c["interval_s"], pa.int32()),
         pa.array(c["quality"], pa.uint16()),
         pa.ListArray.from_arrays(offsets, pa.array(c["metric"], pa.uint8())),
         pa.ListArray.from_arrays(offsets, pa.array(c["value"], pa.float64()))],
        names=["sensor", "time", "receive_time", "interval_s", "quality", "metric", "value"])
    meta = {b"sensors": json.dumps(c["sensors"]).encode(),
            b"vendors": json.dumps(c["vendors"]).encode(),
            b"metrics": json.dumps(c["metrics"]).encode()}
    batch = batch.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _arrow_decode(values: list[bytes]) -> Arrays:
    parts = []
    for v in values:
        b = pa.ipc.open_stream(v).read_next_batch()
        meta = b.schema.metadata
        metric, value = b.column("metric"), b.column("value")
        offs = metric.offsets.to_numpy()
        parts.append((json.loads(meta[b"sensors"]), json.loads(meta[b"metrics"]), {
            "sensor": b.column("sensor").to_numpy(), "time": b.column("time").to_numpy(),
            "quality": b.column("quality").to_numpy(), "count": np.diff(offs),
            "metric": metric.values.to_numpy(), "value": value.values.to_numpy()}))
    return assemble(parts)


Encoder = Callable[[list[Event]], bytes]
Decoder = Callable[[list[bytes]], Arrays]
CANDIDATES: dict[str, tuple[Encoder, Decoder]] = {
    "v2-msgpack-buffers": (encode_batch, from_contract),
    "v2-msgpack-tuple": (_tuple_encode, _tuple_decode),
    "v2-msgpack-lists": (lambda evs: _mp_lists.encode(ListBatch(**lists_of(evs))),
                         _lists_decode(_mp_lists_dec)),
    "v2-json-lists": (lambda evs: _js_lists.encode(ListBatch(**lists_of(evs))),
                      _lists_decode(_js_lists_dec)),
}
if pa is not None:
    CANDIDATES["v2-arrow-ipc"] = (_arrow_encode, _arrow_decode)


# -- measuring -------------------------------------------------------------------------------
def best(fn: Callable[[], object], repeat: int, min_s: float = 0.05) -> float:
    """Best seconds per call over ``repeat`` rounds of enough calls to last ``min_s``."""
    n, t = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - start
        if t >= min_s / 5:
            break
        n *= 4
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n)
    return min(times)


def _builder() -> DefaultRecordBatchBuilder:
    return DefaultRecordBatchBuilder(2, CODEC_ZSTD, 0, -1, -1, -1, 1024 * 1024)


def kafka_batches(records: list[tuple[bytes, bytes]]) -> list[bytes]:
    """``records`` (key, value) as zstd Kafka record batches of at most 1 MiB, built by
    aiokafka's own builder as the producer does (timestamps, keys and all)."""
    out: list[bytes] = []
    builder = _builder()
    for offset, (key, value) in enumerate(records):
        if builder.append(offset, 1_800_000_000_000, key, value, []) is None:
            out.append(bytes(builder.build()))
            builder = _builder()
            builder.append(offset, 1_800_000_000_000, key, value, [])
    out.append(bytes(builder.build()))
    return out


def kafka_values(batches: list[bytes]) -> list[bytes]:
    """The values of fetched record batches, as the consumer parses them."""
    values: list[bytes] = []
    for buf in batches:
        records = MemoryRecords(buf)
        while (batch := records.next_batch()) is not None:
            values.extend(r.value for r in batch)
    return values


def same(a: Arrays, b: Arrays) -> bool:
    """The same readings: values and times equal, codes meaning the same names."""
    names = lambda x, k, n: [x[n][c] for c in x[k].tolist()]  # noqa: E731
    return (np.array_equal(a["time"], b["time"]) and np.array_equal(a["value"], b["value"])
            and np.array_equal(a["quality"], b["quality"])
            and names(a, "sensor", "sensor_ids") == names(b, "sensor", "sensor_ids")
            and names(a, "metric", "metric_names") == names(b, "metric", "metric_names"))


def measure(name: str, groups: list[list[Event]], repeat: int) -> dict[str, Any]:
    events = [e for g in groups for e in g]
    readings = sum(len(e.measurements) for e in events)
    truth = from_contract([encode_event(e) for e in events])
    out: dict[str, Any] = {"rows": len(events), "readings": readings,
                           "v2_records": len(groups)}
    v1: tuple[Encoder, Decoder] = (encode_event, from_contract)  # type: ignore[assignment]
    contenders: dict[str, tuple[Encoder, Decoder, list[list[Event]] | list[Event]]] = {
        "v1-json": (*v1, events), **{c: (*ed, groups) for c, ed in CANDIDATES.items()}}
    res: dict[str, dict[str, Any]] = {}
    for cand, (encode, decode, units) in contenders.items():
        # a v1 record is keyed by its sensor, a v2 record by its gateway (same length here)
        keys = [(u.sensor_id if isinstance(u, Event) else u[0].sensor_id).encode()
                for u in units]
        values = [encode(u) for u in units]  # type: ignore[arg-type]
        if not same(decode(values), truth):
            raise AssertionError(f"{name}: {cand} does not decode to the readings it encoded")
        fetched = kafka_batches(list(zip(keys, values, strict=True)))
        if not same(decode(kafka_values(fetched)), truth):
            raise AssertionError(f"{name}: {cand} did not survive a Kafka record batch")
        enc = best(lambda encode=encode, units=units: [encode(u) for u in units], repeat)
        dec = best(lambda decode=decode, values=values: decode(values), repeat)
        produce = best(lambda encode=encode, units=units, keys=keys: kafka_batches(
            list(zip(keys, [encode(u) for u in units], strict=True))), repeat)
        consume = best(lambda decode=decode, fetched=fetched: decode(kafka_values(fetched)),
                       repeat)
        res[cand] = {
            "records": len(values),
            "encode_us_per_reading": enc * 1e6 / readings,
            "decode_us_per_reading": dec * 1e6 / readings,
            "produce_us_per_reading": produce * 1e6 / readings,
            "consume_us_per_reading": consume * 1e6 / readings,
            "raw_bytes_per_reading": sum(map(len, values)) / readings,
            "kafka_bytes_per_reading": sum(map(len, fetched)) / readings}
    base = res["v1-json"]
    for r in res.values():
        for k in FIGURES:
            r[k] = round(r[k], 3)
            r[k.replace("_per_reading", "_vs_v1")] = round(r[k] / base[k], 3)
    out["encodings"] = res
    return out


FIGURES = ("encode_us_per_reading", "decode_us_per_reading", "produce_us_per_reading",
           "consume_us_per_reading", "raw_bytes_per_reading", "kafka_bytes_per_reading")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    started = time.monotonic()
    results = {name: measure(name, groups, args.repeat) for name, groups in cases().items()}
    doc = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "numpy": np.__version__, "msgspec": msgspec.__version__,
                       "pyarrow": pa.__version__ if pa is not None else None,
                       "load_avg_at_start": list(os.getloadavg())},
           "method": "see bench/contract.py docstring; best of --repeat rounds",
           "unit": "per reading (one metric value of one row); ratios to v1-json",
           "seconds": round(time.monotonic() - started, 1), "cases": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    cols = FIGURES
    for name, r in results.items():
        print(f"\n{name}: {r['rows']} rows, {r['readings']} readings, "
              f"{r['v2_records']} v2 records")
        print(f"  {'encoding':20} {'records':>7} " + " ".join(f"{c.split('_')[0]:>16}"
                                                            for c in cols))
        for cand, m in r["encodings"].items():
            cells = " ".join(f"{m[c]:8.3f} ({m[c.replace('_per_reading', '_vs_v1')]:5.2f}x)"
                             for c in cols)
            print(f"  {cand:20} {m['records']:>7} {cells}")
    print(f"\nunits: us (encode, decode, produce, consume) and bytes (raw, kafka) per "
          f"reading; written {RESULTS} "
          f"in {doc['seconds']} s")


if __name__ == "__main__":
    main()
