"""What every vendor adapter shares: decoding a batch of payloads at once, and the row shape.

An adapter turns one vendor's payload into contract rows (sensor, event time, kind,
incident, interval, measurements in contract units). It never range-checks and never
looks at the clock: the normalizer does both over the whole batch with numpy, so the
rules live in one place and run vectorized.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, NamedTuple

import msgspec

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class Reject(Exception):
    """A payload (or one gateway element) cannot become an event; ``reason`` is a
    ``DEADLETTER_REASONS`` code and ``detail`` says which field and why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Row(NamedTuple):
    """One future event, before the normalizer's time and range checks."""

    sensor_id: str
    event_time: int  # epoch ms UTC
    kind: str = "reading"
    incident: str | None = None
    interval_s: int = 0
    measurements: dict[str, float] = {}  # noqa: RUF012 (NamedTuple default, never mutated)
    quality: int = 0


def reject_from_msgspec(exc: Exception) -> Reject:
    """Map msgspec's decode errors onto dead-letter reasons, keeping its precise message."""
    text = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return Reject("bad_json", text)
    if "missing required field" in text:
        return Reject("missing_field", text)
    if "Number out of range" in text:  # beyond a double: not a value, a broken number
        return Reject("number_out_of_range", text)
    return Reject("wrong_type", text)


def reject_of(exc: BaseException) -> Reject:
    """The dead-letter reason for any exception raised while decoding one payload.

    The expected ones keep their reason; an exception nobody foresaw (an adapter bug, a
    library's limit) becomes ``decode_failed`` naming its class and message, so one odd
    payload costs one dead letter and an operator can see what broke.
    """
    if isinstance(exc, Reject):
        return exc
    what = f"{type(exc).__name__}: {exc}"[:300]
    if isinstance(exc, msgspec.DecodeError):
        return reject_from_msgspec(exc)
    if isinstance(exc, RecursionError):
        return Reject("too_deep", what)
    if isinstance(exc, UnicodeError):
        return Reject("bad_encoding", what)
    if isinstance(exc, OverflowError):
        return Reject("number_out_of_range", what)
    return Reject("decode_failed", what)


def epoch_ms(dt: datetime) -> int:
    """Exact epoch milliseconds of an aware datetime (no float rounding)."""
    return (dt - _EPOCH) // _MS


class Adapter:
    """Base of the JSON vendor adapters: typed msgspec decoding, one call per batch.

    Subclasses set ``vendor`` and ``record`` (a msgspec Struct) and implement ``rows``.
    """

    vendor: ClassVar[str] = ""
    record: ClassVar[type] = object

    def __init__(self) -> None:
        self._one = msgspec.json.Decoder(self.record)
        self._many = msgspec.json.Decoder(list[self.record])  # type: ignore[name-defined]
        self._spans = msgspec.json.Decoder(list[msgspec.Raw])

    def decode_one(self, raw: bytes) -> Any:
        """Decode one payload; raises ``Reject``."""
        try:
            return self._one.decode(raw)
        except Exception as exc:  # msgspec's errors, and RecursionError, UnicodeDecodeError...
            raise reject_of(exc) from None

    def decode_batch(self, raws: list[bytes], whole: bool = False) -> list[Any]:
        """Decode many payloads; each result is a record or the ``Reject`` for that payload.

        Fast path: join the payloads into one JSON array and decode it in one call. Joining
        is only sound if every payload is one whole JSON value on its own (two broken
        payloads could otherwise merge into a well-formed pair), so the element spans of the
        joined array are checked against the payloads; any failure falls back to decoding
        one by one, which also yields each payload's precise error. ``whole=True`` says the
        caller already knows each payload is one whole JSON value (gateway elements).
        """
        if len(raws) > 1:
            joined = b"[" + b",".join(raws) + b"]"
            try:
                records = self._many.decode(joined)
                spans = None if whole else self._spans.decode(joined)
            except Exception:  # one by one below names the payload and its reason
                pass
            else:
                if len(records) == len(raws) and (spans is None or all(
                        memoryview(s) == r for s, r in zip(spans, raws, strict=True))):
                    return records
        return self.decode_each(raws)

    def decode_each(self, raws: list[bytes]) -> list[Any]:
        """One payload at a time: a bad one becomes its ``Reject``, the rest still decode."""
        out: list[Any] = []
        for raw in raws:
            try:
                out.append(self.decode_one(raw))
            except Exception as exc:
                out.append(reject_of(exc))
        return out

    def sensor_of(self, record: Any) -> str:
        """The sensor id the payload names itself."""
        raise NotImplementedError

    def rows(self, record: Any) -> list[Row]:
        """Contract rows of one decoded payload; raises ``Reject`` for semantic errors."""
        raise NotImplementedError
