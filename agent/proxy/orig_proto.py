"""HTTP/1 requests an in-cluster linkerd2-proxy upgraded to HTTP/2 (`l5d-orig-proto`), sans-IO.

linkerd2-proxy's outbound side sends HTTP/1 requests to an HTTP/2-hinted endpoint (every
ExternalWorkload) over HTTP/2, with `l5d-orig-proto: HTTP/1.1` (or `HTTP/1.0`, plus
`; absolute-form` when the request target was absolute) and `transfer-encoding` removed; its
inbound side downgrades them and answers over HTTP/2 with `l5d-orig-proto` naming the version of
the app's response (linkerd/proxy/http/src/orig_proto.rs, `Upgrade` and `Downgrade`).

One connection carries one kind of request: the outbound endpoint stack is keyed by the request's
version (linkerd/app/outbound/src/http/concrete.rs), so upgraded HTTP/1 requests travel over the
`OrigProtoUpgrade` client's own HTTP/2 connection and native HTTP/2 requests over another. Hence
`detect_upgraded` decides per connection, at its first request: native HTTP/2 (gRPC) stays on the
raw relay and its accounting; upgraded connections go to the gateway (orig_proto_io.py), the only
place that loads `h2` and `h11`. This module needs only `hpack`.

Here: the detection, the header's parsing, and the two header translations (HTTP/2 request ->
HTTP/1 request head, HTTP/1 response head -> HTTP/2 response headers), all pure functions.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Final

from hpack import Decoder
from hpack.exceptions import HPACKError

from .detect import NEED_DATA, _NeedData

logging.getLogger("hpack.hpack").disabled = True  # a debug record per header

L5D_ORIG_PROTO: Final = "l5d-orig-proto"
_ORIG_PROTO: Final = b"l5d-orig-proto"
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_DETECT: Final = 64 * 1024  # bytes read for the decision, at most (hpack's default header list bound)

# Streams or connections the gateway refused, by reason (a closed set, usable as a label):
# orig_proto_bad_value, orig_proto_bad_request, orig_proto_mixed, h2_refused_stream,
# h2_protocol_error, app_connect_failed. Module-level as http1.STOPPED, for `status`.
REFUSED: Final[Counter[str]] = Counter()

_HEADERS, _CONTINUATION = 0x1, 0x9
_END_HEADERS, _PADDED, _PRIORITY = 0x4, 0x8, 0x20

# Connection-specific fields (RFC 9110 §7.6.1, RFC 9113 §8.2.2): never relayed across a hop.
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)

Headers = list[tuple[bytes, bytes]]


def detect_upgraded(data: bytes) -> bool | _NeedData:
    """Whether the HTTP/2 connection starting with `data` (the client's bytes, preface included)
    carries upgraded HTTP/1: True when its first request's headers hold `l5d-orig-proto`, False
    for native HTTP/2 and for anything that is not readable HTTP/2 within `MAX_DETECT` bytes (the
    raw relay takes those), NEED_DATA while the first HEADERS block is incomplete."""
    if len(data) < len(PREFACE):
        return NEED_DATA if PREFACE.startswith(data) else False
    if not data.startswith(PREFACE):
        return False
    pos, end = len(PREFACE), len(data)
    block = bytearray()
    block_stream = 0  # the stream whose header block is being continued
    while True:
        if pos + 9 > end:
            return NEED_DATA if end < MAX_DETECT else False
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        if pos + 9 + length > end:
            return NEED_DATA if pos + 9 + length <= MAX_DETECT else False
        payload = data[pos + 9 : pos + 9 + length]
        pos += 9 + length
        if block_stream:
            if kind != _CONTINUATION or stream != block_stream:
                return False  # RFC 9113 §6.10: a header block is contiguous
            block += payload
        elif kind == _HEADERS:
            if stream == 0 or stream % 2 == 0:
                return False
            fragment = _headers_fragment(payload, flags)
            if fragment is None:
                return False
            block += fragment
            block_stream = stream
        else:
            continue  # SETTINGS, WINDOW_UPDATE, PRIORITY, PING before the first request
        if flags & _END_HEADERS:
            return _has_orig_proto(bytes(block))


def _headers_fragment(payload: bytes, flags: int) -> bytes | None:
    start, pad = 0, 0
    if flags & _PADDED:
        if not payload:
            return None
        pad, start = payload[0], 1
    if flags & _PRIORITY:
        start += 5
    if start + pad > len(payload):
        return None
    return payload[start : len(payload) - pad]


def _has_orig_proto(block: bytes) -> bool:
    decoder = Decoder()
    decoder.max_header_list_size = MAX_DETECT
    try:
        fields = decoder.decode(block, raw=True)
    except (HPACKError, ValueError, IndexError):
        return False
    return any(name == _ORIG_PROTO for name, _value in fields)


@dataclass(frozen=True)
class OrigProto:
    """A parsed `l5d-orig-proto` value: the HTTP/1 version the client's app spoke, and whether its
    request target was in absolute form."""

    version: bytes  # b"1.1" | b"1.0"
    absolute_form: bool


def parse_orig_proto(value: bytes) -> OrigProto | None:
    """As linkerd's `Downgrade`: a value starting with HTTP/1.1 or HTTP/1.0, `absolute-form` at
    bytes 10..23 (`HTTP/1.1; absolute-form`); anything else is None (linkerd only warns and passes
    the request on as HTTP/2, which an HTTP/1 app cannot take: here it is refused)."""
    if value.startswith(b"HTTP/1.1"):
        version = b"1.1"
    elif value.startswith(b"HTTP/1.0"):
        version = b"1.0"
    else:
        return None
    return OrigProto(version, len(value) >= 23 and value[10:23] == b"absolute-form")


@dataclass(frozen=True)
class Http1Request:
    """The HTTP/1 request head an upgraded HTTP/2 request stands for. `headers` carry `host`
    and, for a body of unknown length on HTTP/1.1, `transfer-encoding: chunked`."""

    method: bytes
    target: bytes
    version: bytes
    headers: Headers


@dataclass(frozen=True)
class Refusal:
    """Why an upgraded request cannot be relayed (`reason`: a REFUSED key; `detail` for the log)."""

    reason: str
    detail: str


def downgrade_request(fields: Headers, end_stream: bool) -> Http1Request | Refusal | None:
    """The HTTP/1 request for an HTTP/2 request's header fields (names lower-case, as HTTP/2
    requires); None when it carries no `l5d-orig-proto` (a native HTTP/2 request).
    `end_stream`: the HEADERS frame ended the stream (no body)."""
    pseudo: dict[bytes, bytes] = {}
    headers: Headers = []
    cookies: list[bytes] = []
    orig: bytes | None = None
    has_host = has_length = False
    for name, value in fields:
        if name.startswith(b":"):
            pseudo[name] = value
        elif name == _ORIG_PROTO:
            orig = value
        elif name in HOP_BY_HOP:
            continue  # h2 refuses these inbound; `te: trailers` means nothing to an HTTP/1 app
        elif name == b"cookie":
            cookies.append(value)  # RFC 9113 §8.2.3: split crumbs are joined for HTTP/1
        else:
            has_host = has_host or name == b"host"
            has_length = has_length or name == b"content-length"
            headers.append((name, value))
    if orig is None:
        return None
    proto = parse_orig_proto(orig)
    if proto is None:
        return Refusal("orig_proto_bad_value", f"l5d-orig-proto {orig[:64]!r}")
    method = pseudo.get(b":method", b"")
    authority = pseudo.get(b":authority", b"")
    path = pseudo.get(b":path", b"")
    if not method or method == b"CONNECT" or not path:
        # linkerd never upgrades CONNECT (an HTTP/1 upgrade): not a request this can relay
        return Refusal("orig_proto_bad_request", f"method {method[:16]!r} path {path[:64]!r}")
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if not has_host:
        if not authority:
            if proto.version == b"1.1":
                return Refusal("orig_proto_bad_request", "no :authority and no host")
        else:
            headers.insert(0, (b"host", authority))
    target = path
    if proto.absolute_form and path != b"*":
        scheme = pseudo.get(b":scheme", b"http")
        target = scheme + b"://" + authority + path
    if not end_stream and not has_length:
        # The client's chunked body, its transfer-encoding dropped by linkerd's Upgrade: a body of
        # unknown length. HTTP/1.0 has no chunked coding, so such a request goes out as HTTP/1.1.
        headers.append((b"transfer-encoding", b"chunked"))
        return Http1Request(method, target, b"1.1", headers)
    return Http1Request(method, target, proto.version, headers)


def upgrade_response(status: int, version: bytes, fields: Headers) -> Headers:
    """The HTTP/2 response header fields for an HTTP/1 response head: connection-specific fields
    removed (and those `Connection` names), `l5d-orig-proto` naming the response's version."""
    named: set[bytes] = set()
    for name, value in fields:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    out: Headers = [(b":status", str(status).encode())]
    for name, value in fields:
        if name in HOP_BY_HOP or name in named or name == _ORIG_PROTO:
            continue
        out.append((name, value))
    out.append((_ORIG_PROTO, b"HTTP/1.0" if version == b"1.0" else b"HTTP/1.1"))
    return out


def upgrade_trailers(fields: Headers) -> Headers:
    """A chunked response's trailers as HTTP/2 trailers (no pseudo or connection fields)."""
    return [(n, v) for n, v in fields if n not in HOP_BY_HOP and not n.startswith(b":")]


class FrameGuard:
    """Follows the client's frame boundaries to refuse an oversized frame at its header: `h2`
    checks a frame's length only once the whole frame arrived, so a header announcing 16 MiB
    would have it buffer 16 MiB first. `feed` returns False at the first frame over `max_frame`."""

    __slots__ = ("head", "max_frame", "skip")

    def __init__(self, max_frame: int = 16384) -> None:
        self.max_frame = max_frame
        self.skip = len(PREFACE)  # payload bytes still to pass over (the preface first)
        self.head = bytearray()  # a frame header split across reads

    def feed(self, data: bytes) -> bool:
        pos, end = 0, len(data)
        while pos < end:
            if self.skip:
                take = min(self.skip, end - pos)
                self.skip -= take
                pos += take
                continue
            need = 9 - len(self.head)
            self.head += data[pos : pos + need]
            pos += need
            if len(self.head) < 9:
                return True
            length = int.from_bytes(self.head[:3], "big")
            self.head.clear()
            if length > self.max_frame:
                return False
            self.skip = length
        return True
