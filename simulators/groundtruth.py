"""Ground truth: what the simulator sent, so tests and benchmarks can check the pipeline
lost nothing and kept nothing wrong.

Every published message carries a ``Truth``: its sequence number in this process's stream,
topic, send time, whether it was deliberately malformed (and the dead-letter reason ingest
must give) or a duplicate of an earlier message, and one ``Reading`` per reading inside it
(a gateway batch holds many). ``GroundTruthWriter`` writes one JSON object per message
(JSON lines), in send order.

Reading fields: ``sensor_id`` (as written in the payload: an ``unknown_sensor`` corruption
carries the fake id), ``event_time`` (epoch ms as ingest reads it from the payload, i.e.
including the sensor's clock skew and the whole-second precision of some formats),
``true_time`` (when the reading was really taken), ``kind``/``incident`` as in the event
contract, ``interval_s``, ``measurements`` (the normalized values ingest should produce),
``malformed`` (expected dead-letter reason, else null), ``late``/``out_of_order`` (held back
on purpose; out of order = an older reading sent after a newer one of the same sensor),
``skew_ms`` (the sensor clock's offset), ``tags`` (scenarios that shaped the reading).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import IO

import msgspec


class Reading(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    sensor_id: str
    event_time: int
    true_time: int
    kind: str = "reading"
    incident: str | None = None
    interval_s: int = 0
    measurements: dict[str, float] = {}
    malformed: str | None = None
    late: bool = False
    out_of_order: bool = False
    skew_ms: int = 0
    tags: tuple[str, ...] = ()


class Truth(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    seq: int = -1  # position in this process's stream, set when the message is sent
    topic: str
    send_time: int  # simulated time the message left the device or gateway, epoch ms
    unit: str  # the sensor id, or the gateway id for a batch
    vendor: str
    gateway: bool = False
    malformed: str | None = None  # the whole message is bad: one dead letter, no events
    duplicate_of: int | None = None  # seq of the message this one repeats byte for byte
    readings: tuple[Reading, ...] = ()

    @property
    def bad(self) -> bool:
        """True when the message, or one reading in it, was corrupted on purpose."""
        return self.malformed is not None or any(r.malformed for r in self.readings)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Truth)


def encode_truth(truth: Truth) -> bytes:
    return _encoder.encode(truth)


def read_ground_truth(path: Path) -> list[Truth]:
    """Load a ground-truth file written by ``GroundTruthWriter``."""
    with Path(path).open("rb") as fh:
        return [_decoder.decode(line) for line in fh if line.strip()]


class GroundTruthWriter:
    """Appends truths as JSON lines; buffered, flushed on close."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] = self.path.open("wb", buffering=1 << 20)
        self.count = 0

    def write(self, truth: Truth) -> None:
        self._fh.write(_encoder.encode(truth) + b"\n")
        self.count += 1

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> GroundTruthWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
