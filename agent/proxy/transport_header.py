"""Linkerd's opaque-transport header (ALPN transport.l5d.io/v1): sans-IO codec.

Skeleton: constants and types pinned in the team interfaces; the codec follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

ALPN: Final = "transport.l5d.io/v1"
PREFACE: Final = b"transport.l5d.io/v1\r\n\r\n"


class SessionProtocol(Enum):
    HTTP1 = "http1"
    HTTP2 = "http2"


@dataclass(frozen=True)
class TransportHeader:
    port: int
    name: str = ""
    session_protocol: SessionProtocol | None = None


@dataclass(frozen=True)
class HeaderRefused:
    reason: str


class NeedData:
    """More bytes are needed before the header can be decided."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


def encode(header: TransportHeader) -> bytes:
    raise NotImplementedError


class HeaderReader:
    rest: bytes = b""

    def feed(self, data: bytes) -> TransportHeader | HeaderRefused | NeedData:
        raise NotImplementedError

    def eof(self) -> HeaderRefused:
        return HeaderRefused("truncated")
