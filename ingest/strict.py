"""Strict decoding: the byte-level rules msgspec does not enforce, checked cheaply.

msgspec is the parser of the hot path, and it is lenient where a city must not be:

- a JSON object with a duplicate key decodes silently with the last value (two parsers
  of the same payload could disagree on a reading: ``duplicate_key``);
- bytes that are not UTF-8 inside a field it skips are never looked at, and inside a
  string field they surface later as a ``UnicodeDecodeError`` (``bad_encoding``);
- it recurses once per nesting level, so a deep enough array in any field raises
  ``RecursionError`` (``too_deep``; we refuse far earlier, at ``MAX_DEPTH``);
- a 400-digit integer decodes to a Python int that no float or int64 column holds, in
  a field it skips it is not even seen (``number_out_of_range``).

Ingest runs at 20k msg/s, so each rule starts with a check done by one or two C calls
over the payload (``bytes.isascii``, ``bytes.count``, ``bytes.translate``, a ``split``)
that clears ordinary payloads, and only when that check cannot clear a payload runs the
exact, slower test (a regex pass with strings removed, ``json.loads`` with a pairs
hook). The exact tests decide; the quick ones only ever say "certainly fine".
"""

from __future__ import annotations

import json
import re

from ingest.adapters.base import Reject

# No vendor nests deeper than 4 (gateway > readings > element > window); 32 is absurd.
MAX_DEPTH = 32
# An integer literal of 20 digits or more is outside int64 (and every sensor's range).
MAX_DIGITS = 19

# Digits become "0", "E" becomes "e", "+" goes: "1.5E+400" -> "0.0e000", a 20-digit
# number -> twenty "0"s, so two substring searches find every candidate.
_NUMBER_SHAPES = bytes.maketrans(b"123456789E", b"000000000e")
_ZEROS = b"0" * (MAX_DIGITS + 1)
_BIG_EXPONENT = b"0e000"
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BIG_NUMBER = re.compile(rb"(?<![\d.])\d{%d,}|[\d.]*\d[eE][+]?0*[1-9]\d{2,}" % (MAX_DIGITS + 1))
_KEY = re.compile(rb'"([^"\\]*)"\s*:')
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))


def batch_facts(payloads: list[bytes]) -> tuple[bool, bool]:
    """(bytes clear, escapes seen) for a whole batch, each from one pass over the joined
    payloads (a newline keeps neighbours' digits apart). Bytes clear: ``check_bytes``
    would pass every payload (else it must run per payload). Escapes seen: some payload
    has a backslash, so ``check_json`` cannot trust splitting on quotes without a look."""
    joined = b"\n".join(payloads)
    escapes = b"\\" in joined
    if not joined.isascii():
        return False, escapes
    shapes = joined.translate(_NUMBER_SHAPES, b"+")
    return _ZEROS not in shapes and _BIG_EXPONENT not in shapes, escapes


def check_bytes(raw: bytes) -> None:
    """Every byte is UTF-8 and no number is absurd, wherever it is; raises ``Reject``."""
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Reject("bad_encoding", f"payload is not UTF-8: {exc.reason} at byte "
                                         f"{exc.start} ({raw[exc.start:exc.start + 4]!r})"
                         ) from None
    shapes = raw.translate(_NUMBER_SHAPES, b"+")
    if _ZEROS in shapes or _BIG_EXPONENT in shapes:
        big = _BIG_NUMBER.search(_STRING.sub(b'""', raw))  # digits inside strings are text
        if big is not None:
            text = big.group()
            raise Reject("number_out_of_range",
                         f"number {text[:24].decode()}{'...' if len(text) > 24 else ''} "
                         f"({len(text)} characters) is beyond what int64 or a double holds "
                         f"(more than {MAX_DIGITS} digits, or an exponent of 100 or more)")


def brackets(raw: bytes) -> int:
    """Opening brackets in ``raw``: an upper bound of its nesting depth."""
    return raw.count(b"{") + raw.count(b"[")


def check_depth(raw: bytes, limit: int = MAX_DEPTH, opened: int | None = None) -> None:
    """Nesting depth at most ``limit``; raises ``Reject("too_deep")``. ``opened`` is
    ``brackets(raw)`` when the caller has it already."""
    if (brackets(raw) if opened is None else opened) <= limit:
        return
    only = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    depth = deepest = 0
    for b in only:  # only reached by payloads with more than ``limit`` brackets
        if b in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    raise Reject("too_deep", f"JSON nested deeper than {limit} levels")
        else:
            depth -= 1


def check_keys(raw: bytes) -> None:
    """No JSON object in ``raw`` repeats a key; raises ``Reject("duplicate_key")``.

    Quick check: without a backslash no string can hide a quote, so splitting on quotes
    yields every string; if all strings differ, no key repeats. Ordinary payloads stop
    there. Then the keys alone (a value may equal a key), then the exact test per object.
    """
    if b"\\" not in raw:
        strings = raw.split(b'"')[1::2]
        if len(set(strings)) == len(strings):
            return
        keys = _KEY.findall(raw)
        if len(set(keys)) == len(keys):
            return
    _exact_keys(raw)


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Reject("duplicate_key", f"JSON object repeats key {key[:60]!r} "
                                              f"(which value counts is up to the parser)")
            seen.add(key)
    return obj


def _exact_keys(raw: bytes) -> None:
    try:
        json.loads(raw, object_pairs_hook=_refuse_duplicates)
    except Reject:
        raise
    except (ValueError, RecursionError):
        pass  # not JSON (a compact line) or broken: the parser's own error decides


def check_json(raw: bytes, depth: int = MAX_DEPTH, opened: int | None = None,
               escapes: bool = True) -> None:
    """The JSON-structure rules (depth, then duplicate keys) for one payload or element;
    ``escapes=False`` when the caller knows ``raw`` holds no backslash (``batch_facts``).

    The quick checks of both are inlined: this runs once per payload on the hot path.
    """
    if (raw.count(b"{") + raw.count(b"[") if opened is None else opened) > depth:
        check_depth(raw, depth, opened)
    if not escapes or b"\\" not in raw:
        strings = raw.split(b'"')[1::2]
        if len(set(strings)) == len(strings):
            return
    check_keys(raw)
