"""Protocol detection on a connection's first bytes, without I/O (the caller peeks and feeds).

`detect(data)` returns `NEED_DATA` until it can tell: a TLS ClientHello (with its SNI, which
says whether a mesh peer is talking to us), an HTTP/1.x request line, the HTTP/2 preface, or
opaque TCP.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

# Up to this many bytes are looked at; a ClientHello larger than this is treated as TLS without SNI.
MAX_PEEK: Final = 16 * 1024

_HTTP_METHODS: Final = (
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
)
_H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Protocol(Enum):
    TLS = "tls"
    HTTP1 = "http1"
    HTTP2 = "h2"
    OPAQUE = "opaque"


@dataclass(frozen=True)
class Detected:
    protocol: Protocol
    sni: str | None = None


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


def detect(data: bytes) -> Detected | _NeedData:
    if not data:
        return NEED_DATA
    if data[0] == 0x16:
        return _detect_tls(data)
    if data.startswith(_H2_PREFACE[: len(data)]) and len(data) < len(_H2_PREFACE):
        return NEED_DATA
    if data.startswith(_H2_PREFACE):
        return Detected(Protocol.HTTP2)
    for method in _HTTP_METHODS:
        if data.startswith(method):
            return Detected(Protocol.HTTP1)
        if method.startswith(data):
            return NEED_DATA
    return Detected(Protocol.OPAQUE)


def _detect_tls(data: bytes) -> Detected | _NeedData:
    if len(data) < 5:
        return NEED_DATA
    if data[1] != 0x03:  # record version major
        return Detected(Protocol.OPAQUE)
    record_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + record_len:
        return NEED_DATA if len(data) < MAX_PEEK else Detected(Protocol.TLS)
    return Detected(Protocol.TLS, _client_hello_sni(data[5 : 5 + record_len]))


def _client_hello_sni(body: bytes) -> str | None:
    """The server_name of a ClientHello handshake message, or None (absent or malformed)."""
    try:
        if body[0] != 0x01:  # handshake type: client_hello
            return None
        pos = 4 + 2 + 32  # handshake header, client_version, random
        pos += 1 + body[pos]  # session_id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher_suites
        pos += 1 + body[pos]  # compression_methods
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            ext_type = int.from_bytes(body[pos : pos + 2], "big")
            ext_len = int.from_bytes(body[pos + 2 : pos + 4], "big")
            pos += 4
            if ext_type == 0:  # server_name: list length, then (type, length, name)
                if body[pos + 2] != 0:
                    return None
                name_len = int.from_bytes(body[pos + 3 : pos + 5], "big")
                return body[pos + 5 : pos + 5 + name_len].decode("ascii").lower()
            pos += ext_len
    except (IndexError, UnicodeDecodeError):
        return None
    return None
