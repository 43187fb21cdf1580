"""The compact one-line text format of low-bandwidth (2G/NB-IoT) counters.

``C1|sensor|epoch_s|interval_s|T|mc,car,truck,bus|speed_kmh|occupancy_pct`` (traffic) or
``C1|sensor|epoch_s|interval_s|F|in,out`` (footfall). Time is epoch *seconds*, occupancy
percent. Inside a gateway batch a compact reading is a JSON string element.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ingest.adapters.base import Adapter, Reject, Row


class CompactRecord(NamedTuple):
    sensor: str
    fields: list[str]


def _ints(text: str, what: str, n: int) -> list[int]:
    parts = text.split(",")
    if len(parts) != n:
        raise Reject("missing_field", f"{what}: expected {n} comma-separated values, "
                                      f"got {len(parts)}")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise Reject("wrong_type", f"{what}: not integers: {text[:60]!r}") from None


def _num(text: str, what: str, kind: type = float) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise Reject("wrong_type", f"{what}: not a number: {text[:40]!r}") from None


class Compact(Adapter):
    vendor = "compact"

    def __init__(self) -> None:  # no JSON decoders: the format is text
        pass

    def decode_one(self, raw: bytes) -> CompactRecord:
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise Reject("unknown_format", "compact payload is not ASCII text") from None
        fields = text.split("|")
        if fields[0] != "C1":
            raise Reject("unknown_format", f"compact payload must start with 'C1|', "
                                           f"got {text[:20]!r}")
        if len(fields) < 5:
            raise Reject("missing_field", f"compact payload has {len(fields)} fields, "
                                          f"needs at least 5")
        return CompactRecord(fields[1], fields)

    def decode_batch(self, raws: list[bytes], whole: bool = False) -> list[Any]:
        return self.decode_each(raws)  # a text format: no JSON-array fast path

    def sensor_of(self, r: CompactRecord) -> str:
        return r.sensor

    def rows(self, r: CompactRecord) -> list[Row]:
        f = r.fields
        ts_s = _num(f[2], "epoch seconds (field 3)", int)
        interval = _num(f[3], "interval (field 4)", int)
        record_type = f[4]
        if record_type == "T":
            if len(f) != 8:
                raise Reject("missing_field", f"compact T record has {len(f)} fields, needs 8")
            mc, car, truck, bus = _ints(f[5], "counts (field 6)", 4)
            m = {"count_motorbike": float(mc), "count_car": float(car),
                 "count_truck": float(truck), "count_bus": float(bus),
                 "flow": float(mc + car + truck + bus),
                 "speed_kmh": _num(f[6], "speed (field 7)"),
                 "occupancy": _num(f[7], "occupancy (field 8)") / 100.0}
        elif record_type == "F":
            if len(f) != 6:
                raise Reject("missing_field", f"compact F record has {len(f)} fields, needs 6")
            fin, fout = _ints(f[5], "footfall (field 6)", 2)
            m = {"footfall_in": float(fin), "footfall_out": float(fout)}
        else:
            raise Reject("unknown_format", f"compact record type {record_type[:10]!r} "
                                           f"is neither T nor F")
        return [Row(r.sensor, ts_s * 1000, interval_s=interval, measurements=m)]
