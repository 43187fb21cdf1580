"""The lean MQTT v5 client's framing: packets split anywhere across socket reads."""

from __future__ import annotations

import random
import struct

from ingest.mqtt5 import PINGRESP, PUBLISH, SUBACK, _Wire, packet, utf8, varint


def publish(topic: str, payload: bytes, qos: int, mid: int, props: bytes = b"") -> bytes:
    body = utf8(topic) + (struct.pack("!H", mid) if qos else b"") + varint(len(props)) + props
    return packet(PUBLISH | (qos << 1), body + payload)


def test_varint_matches_the_spec_examples() -> None:
    assert [varint(n) for n in (0, 127, 128, 16_383, 16_384, 2_097_152)] == [
        b"\x00", b"\x7f", b"\x80\x01", b"\xff\x7f", b"\x80\x80\x01", b"\x80\x80\x80\x01"]


async def test_packets_split_across_reads_are_reassembled() -> None:
    big = bytes(range(256)) * 800  # 204,800 bytes: a 3-byte remaining length
    stream = b"".join([
        publish("city/ninh_kieu/traffic/lane_detector/a", b'{"x":1}', 1, 7),
        bytes([PINGRESP, 0]),
        publish("city/ninh_kieu/gateway/gw-1", big, 1, 65_535, props=b"\x01\x01"),
        publish("city/cai_rang/tourism/hotel/h", b"", 0, 0),
        packet(SUBACK, b"\x00\x01\x00\x01"),
    ])
    rng = random.Random(4)
    for _ in range(20):
        wire = _Wire()
        pos = 0
        while pos < len(stream):
            step = rng.choice([1, 2, 3, 5, 64, 4096, 70_000])
            wire.data_received(stream[pos:pos + step])
            pos += step
        assert wire.inbox == [
            ("city/ninh_kieu/traffic/lane_detector/a", b'{"x":1}', 7, 1),
            ("city/ninh_kieu/gateway/gw-1", big, 65_535, 1),
            ("city/cai_rang/tourism/hotel/h", b"", 0, 0),
        ]
        assert wire.control.get_nowait() == (SUBACK, b"\x00\x01\x00\x01")
        assert wire.buf == bytearray()
