"""Protobuf and framing pieces for building transport headers by hand in tests, written apart
from agent/proxy/transport_header.py so the tests do not check the codec against itself."""

from __future__ import annotations

PREFACE = b"transport.l5d.io/v1\r\n\r\n"


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def delimited(payload: bytes) -> bytes:
    return varint(len(payload)) + payload


def prefaced(body: bytes) -> bytes:
    """A whole header on the wire: preface, 4-byte big-endian length, body."""
    return PREFACE + len(body).to_bytes(4, "big") + body
