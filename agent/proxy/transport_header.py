"""Linkerd's opaque-transport header (ALPN `transport.l5d.io/v1`): a sans-IO codec.

An in-cluster linkerd2-proxy that negotiated the ALPN `transport.l5d.io/v1` on the inbound
proxy port writes, before any application byte:

    PREFACE (b"transport.l5d.io/v1\\r\\n\\r\\n") | u32 big-endian length | protobuf Header

with `Header{int32 port = 1; string name = 2; SessionProtocol session_protocol = 3}` and
`SessionProtocol{oneof kind {Http1 http1 = 1; Http2 http2 = 2}}` (package transport.l5d.io).
Facts from linkerd2-proxy `linkerd/transport-header/src/{lib.rs,server.rs}` and the prost
0.14 decoder it uses:

- The body may be at most `MAX_BODY_LEN` = 65536 bytes: server.rs:69 reads into
  `BytesMut::with_capacity(1024 * 64)`, and lib.rs:137 refuses `msg_len > buf.capacity() +
  PREFACE_AND_SIZE_LEN` once the 27 bytes of preface and length were consumed (capacity 65536 - 27).
- The body is decoded as prost does: unknown fields of every wire type skipped (groups nested at
  most 100 deep), the last of repeated singular fields wins, repeated `session_protocol` fields
  merge, `int32` is the low 32 bits of a varint (a negative port is a 10-byte varint), strings
  must be UTF-8, a varint is at most 10 bytes with a 10th byte of 0 or 1.
- Then `name`, when not empty, must be a DNS name (linkerd-dns-name: RFC 5280 with `_`; it is
  lowercased), then `port` must be in 1..=65535 (lib.rs:175). No header at all is refused too.

`HeaderReader` holds at most `len(PREFACE) + 4 + MAX_BODY_LEN` bytes, accepts bytes in any
split, never raises on what a peer sends, and decides once. Refusal reasons (a closed set, used
as metric labels; `REFUSAL_REASONS`):

- `bad_preface`: the first bytes are not the preface (Linkerd: "did not include a transport header").
- `empty`: the length is 0 (Linkerd decodes an empty Header and refuses its port 0).
- `too_large`: the length is over `MAX_BODY_LEN` (up to 2^32-1 is representable).
- `truncated`: the stream ended before the whole header arrived.
- `malformed`: the body is not a valid protobuf Header (bad varint, key, wire type, UTF-8, ...).
- `bad_name`: `name` is not a valid DNS name.
- `bad_port`: `port` is absent, 0, negative or over 65535.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Literal, get_args

ALPN: Final = "transport.l5d.io/v1"
PREFACE: Final = b"transport.l5d.io/v1\r\n\r\n"
MAX_BODY_LEN: Final = 64 * 1024
_LEN_SIZE: Final = 4
# The most a reader ever holds before it decides: preface, length, the largest body.
MAX_BUFFERED: Final = len(PREFACE) + _LEN_SIZE + MAX_BODY_LEN

RefusalReason = Literal["bad_preface", "empty", "too_large", "truncated", "malformed", "bad_name", "bad_port"]
REFUSAL_REASONS: Final[frozenset[str]] = frozenset(get_args(RefusalReason))


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
    """Why a header was refused: `reason` is a metric label, `detail` a sentence for the log."""

    reason: RefusalReason
    detail: str = field(default="", compare=False)


class NeedData:
    """More bytes are needed before the header can be decided (one instance, `NEED_DATA`)."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


# --- names, as linkerd-dns-name accepts them -------------------------------------------------

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_LAST_LABEL_NUMERIC = re.compile(r"(?:^|\.)[0-9]+\.?\Z")


def is_valid_name(name: str) -> bool:
    """A DNS name as Linkerd's `Name::from_str` takes it: labels of 1-63 letters, digits, `_`
    or inner `-`, 253 characters at most, an optional final dot, a last label not all digits."""
    return (
        len(name) <= 253
        and _DNS_NAME.fullmatch(name) is not None
        and _LAST_LABEL_NUMERIC.search(name) is None
    )


# --- encoding ----------------------------------------------------------------------------------

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_SESSION_PROTOCOL_BYTES: Final = {
    SessionProtocol.HTTP1: b"\x1a\x02\x0a\x00",  # field 3 {field 1 {}}
    SessionProtocol.HTTP2: b"\x1a\x02\x12\x00",  # field 3 {field 2 {}}
}


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_body(header: TransportHeader) -> bytes:
    """The protobuf `Header` alone, fields in number order as prost and protoc write them."""
    if not 1 <= header.port <= 0xFFFF:
        raise ValueError(f"transport header port {header.port} is not in 1..65535")
    if header.name and not is_valid_name(header.name):
        raise ValueError(f"transport header name {header.name!r} is not a DNS name")
    body = b"\x08" + _varint(header.port)
    if header.name:
        name = header.name.encode("ascii")
        body += b"\x12" + _varint(len(name)) + name
    if header.session_protocol is not None:
        body += _SESSION_PROTOCOL_BYTES[header.session_protocol]
    return body


def encode(header: TransportHeader) -> bytes:
    """Preface, length and body, as linkerd2-proxy's `encode_prefaced` writes them.

    Raises ValueError for a header Linkerd would refuse (port outside 1..65535, a name that is
    not a DNS name): what we send comes from validated configuration, so that is a bug here.
    """
    body = encode_body(header)
    return PREFACE + len(body).to_bytes(_LEN_SIZE, "big") + body


# --- decoding ----------------------------------------------------------------------------------

_RECURSION_LIMIT: Final = 100  # prost's RECURSION_LIMIT: nested messages and groups


class _Malformed(Exception):
    """Internal: the body is not a protobuf Header (turned into a refusal, never escapes)."""


class _Cursor:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def varint(self) -> int:
        # At most 10 bytes, the 10th 0 or 1 (no u64 overflow), as prost's decode_varint.
        value = 0
        for i in range(10):
            if self.pos >= self.end:
                raise _Malformed("varint cut short")
            byte = self.data[self.pos]
            self.pos += 1
            if i == 9 and byte >= 0x02:
                raise _Malformed("varint longer than 64 bits")
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                return value
        raise _Malformed("varint longer than 64 bits")  # unreachable: the 10th byte decided

    def key(self) -> tuple[int, int]:
        key = self.varint()
        if key > 0xFFFF_FFFF:
            raise _Malformed(f"field key {key} over 32 bits")
        wire_type, number = key & 7, key >> 3
        if wire_type > _I32:
            raise _Malformed(f"invalid wire type {wire_type}")
        if number == 0:
            raise _Malformed("field number 0")
        return number, wire_type

    def length_delimited(self) -> tuple[int, int]:
        """(start, end) of a length-delimited payload, the cursor moved past it."""
        length = self.varint()
        if length > self.end - self.pos:
            raise _Malformed("length-delimited field runs past its message")
        start = self.pos
        self.pos += length
        return start, self.pos

    def skip(self, number: int, wire_type: int, budget: int) -> None:
        """Skip an unknown field as prost's skip_field does (groups count against `budget`)."""
        if budget == 0:
            raise _Malformed("nested too deep")
        if wire_type == _VARINT:
            self.varint()
        elif wire_type == _LEN:
            self.length_delimited()
        elif wire_type in (_I64, _I32):
            size = 8 if wire_type == _I64 else 4
            if size > self.end - self.pos:
                raise _Malformed("fixed-width field cut short")
            self.pos += size
        elif wire_type == _SGROUP:
            while True:
                inner, inner_type = self.key()
                if inner_type == _EGROUP:
                    if inner != number:
                        raise _Malformed("end-group tag does not match its start")
                    return
                self.skip(inner, inner_type, budget - 1)
        else:
            raise _Malformed("end-group tag without a start")


def _expect(number: int, wire_type: int, wanted: int) -> None:
    if wire_type != wanted:
        raise _Malformed(f"field {number} has wire type {wire_type}, expected {wanted}")


def _decode_empty_message(cur: _Cursor, budget: int) -> None:
    """Http1 / Http2: no fields of their own; what is inside is skipped, but must be well-formed."""
    while cur.pos < cur.end:
        number, wire_type = cur.key()
        cur.skip(number, wire_type, budget)


def _decode_session_protocol(
    cur: _Cursor, kind: SessionProtocol | None, budget: int
) -> SessionProtocol | None:
    # Merged into what earlier session_protocol fields said: a later oneof member replaces it.
    while cur.pos < cur.end:
        number, wire_type = cur.key()
        if number in (1, 2):
            _expect(number, wire_type, _LEN)
            if budget == 0:
                raise _Malformed("nested too deep")
            start, end = cur.length_delimited()
            _decode_empty_message(_Cursor(cur.data, start, end), budget - 1)
            kind = SessionProtocol.HTTP1 if number == 1 else SessionProtocol.HTTP2
        else:
            cur.skip(number, wire_type, budget)
    return kind


def _decode_body(body: bytes) -> TransportHeader | HeaderRefused:
    port, raw_name = 0, b""
    kind: SessionProtocol | None = None
    cur = _Cursor(body, 0, len(body))
    budget = _RECURSION_LIMIT
    try:
        while cur.pos < cur.end:
            number, wire_type = cur.key()
            if number == 1:
                _expect(number, wire_type, _VARINT)
                port = cur.varint() & 0xFFFF_FFFF  # int32: the low 32 bits, two's complement
                if port >= 0x8000_0000:
                    port -= 0x1_0000_0000
            elif number == 2:
                _expect(number, wire_type, _LEN)
                start, end = cur.length_delimited()
                raw_name = body[start:end]
                try:
                    raw_name.decode("utf-8")
                except UnicodeDecodeError:
                    raise _Malformed("name is not UTF-8") from None
            elif number == 3:
                _expect(number, wire_type, _LEN)
                start, end = cur.length_delimited()
                kind = _decode_session_protocol(_Cursor(body, start, end), kind, budget - 1)
            else:
                cur.skip(number, wire_type, budget)
    except _Malformed as err:
        return HeaderRefused("malformed", str(err))
    name = raw_name.decode("utf-8")
    if name and not is_valid_name(name):
        return HeaderRefused("bad_name", f"name {name[:80]!r} is not a DNS name")
    if not 1 <= port <= 0xFFFF:
        return HeaderRefused("bad_port", f"port {port} is not in 1..65535")
    return TransportHeader(port, name.lower(), kind)


class HeaderReader:
    """Reads one transport header from bytes fed as they arrive.

    `feed` returns NEED_DATA until it decides, then a TransportHeader (the bytes that followed
    it are in `rest`) or a HeaderRefused; a decision is final and returned again by later
    calls (bytes fed after a header are appended to `rest`, after a refusal dropped).
    `eof()` says the stream ended: a refusal ("truncated" if it was still undecided).
    """

    __slots__ = ("_body_len", "_buf", "_result", "rest")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._body_len: int | None = None
        self._result: TransportHeader | HeaderRefused | None = None
        self.rest = b""

    @property
    def buffered(self) -> int:
        """Bytes held while undecided (never more than MAX_BUFFERED)."""
        return len(self._buf)

    def feed(self, data: bytes) -> TransportHeader | HeaderRefused | NeedData:
        if self._result is not None:
            if isinstance(self._result, TransportHeader) and data:
                self.rest += data
            return self._result
        view = memoryview(data)
        while True:
            wanted = self._wanted() - len(self._buf)
            took, view = view[:wanted], view[wanted:]
            self._buf += took
            if len(self._buf) < self._wanted():
                return self._check_preface() or NEED_DATA
            decided = self._advance()
            if decided is not None:
                self._buf = bytearray()
                if isinstance(decided, TransportHeader):
                    self.rest = bytes(view)
                self._result = decided
                return decided

    def eof(self) -> HeaderRefused:
        if isinstance(self._result, HeaderRefused):
            return self._result
        if self._result is not None:
            raise RuntimeError("eof() after the transport header was read: use reader.rest")
        self._result = HeaderRefused("truncated", f"stream ended after {len(self._buf)} header bytes")
        self._buf = bytearray()
        return self._result

    def _wanted(self) -> int:
        """How many bytes the current step needs buffered in all."""
        if self._body_len is None:
            return len(PREFACE) + _LEN_SIZE
        return self._body_len

    def _check_preface(self) -> HeaderRefused | None:
        # Refuse at the first wrong byte rather than wait for 27 bytes that cannot help.
        if self._body_len is None:
            seen = bytes(self._buf[: len(PREFACE)])
            if not PREFACE.startswith(seen):
                self._result = HeaderRefused("bad_preface", f"starts with {seen[:32]!r}")
                self._buf = bytearray()
                return self._result
        return None

    def _advance(self) -> TransportHeader | HeaderRefused | None:
        """The current step has all its bytes: decide, or move to the body (None)."""
        if self._body_len is None:
            if self._buf[: len(PREFACE)] != PREFACE:
                return HeaderRefused("bad_preface", f"starts with {bytes(self._buf[:32])!r}")
            length = int.from_bytes(self._buf[len(PREFACE) :], "big")
            if length == 0:
                return HeaderRefused("empty", "header length 0")
            if length > MAX_BODY_LEN:
                return HeaderRefused("too_large", f"header length {length} over {MAX_BODY_LEN}")
            self._body_len = length
            self._buf = bytearray()
            return None
        return _decode_body(bytes(self._buf))
