"""Linkerd's transport header (agent/proxy/transport_header.py), without sockets.

A table of named cases, each with its exact result; the protobuf body checked byte for byte
against `protoc` run on our transcription of linkerd2-proxy's header.proto (an encoder that is
not ours); bytes fed in every split, and what follows the header kept exactly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.proxy.transport_header import (
    ALPN,
    MAX_BODY_LEN,
    MAX_BUFFERED,
    NEED_DATA,
    PREFACE,
    REFUSAL_REASONS,
    HeaderReader,
    HeaderRefused,
    NeedData,
    SessionProtocol,
    TransportHeader,
    encode,
    encode_body,
    is_valid_name,
)
from tests.linkerd.wire import prefaced, varint

PROTO = Path(__file__).resolve().parent.parent / "linkerd" / "transport_header.proto"
PROTOC = shutil.which("protoc")
needs_protoc = pytest.mark.skipif(
    PROTOC is None, reason="protoc not found: install Debian's protobuf-compiler (scripts/bootstrap does)"
)

H1, H2 = SessionProtocol.HTTP1, SessionProtocol.HTTP2


def with_length(length: int, body: bytes = b"") -> bytes:
    return PREFACE + length.to_bytes(4, "big") + body


def read_all(data: bytes, *, eof: bool = True) -> TransportHeader | HeaderRefused | NeedData:
    reader = HeaderReader()
    result = reader.feed(data)
    if result is NEED_DATA and eof:
        return reader.eof()
    return result


def nested_groups(depth: int) -> bytes:
    # Unknown field 9 as groups nested `depth` deep: start-group keys, then their end-group keys.
    return b"\x4b" * depth + b"\x4c" * depth


PORT_80 = b"\x08\x50"
# The largest body Linkerd takes: port 80, then an unknown length-delimited field 15 as filler.
_FILL = MAX_BODY_LEN - len(PORT_80) - 1 - len(varint(MAX_BODY_LEN))
LARGEST_BODY = PORT_80 + b"\x7a" + varint(_FILL) + b"\x00" * _FILL
assert len(LARGEST_BODY) == MAX_BODY_LEN


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expected: TransportHeader | HeaderRefused


CASES = [
    # --- accepted ---------------------------------------------------------------------------
    Case("port only", prefaced(PORT_80), TransportHeader(80)),
    Case(
        "with name",
        prefaced(b"\x08\xc8\x1f\x12\x1aweb.shop.svc.cluster.local"),
        TransportHeader(4040, "web.shop.svc.cluster.local"),
    ),
    Case("with http1", prefaced(b"\x08\x90\x3f\x1a\x02\x0a\x00"), TransportHeader(8080, "", H1)),
    Case("with http2", prefaced(b"\x08\x90\x3f\x1a\x02\x12\x00"), TransportHeader(8080, "", H2)),
    Case("port 1", prefaced(b"\x08\x01"), TransportHeader(1)),
    Case("port 65535", prefaced(b"\x08\xff\xff\x03"), TransportHeader(65535)),
    Case(
        "name lowercased as Linkerd's Name does",
        prefaced(PORT_80 + b"\x12\x05A.Bc_"),
        TransportHeader(80, "a.bc_"),
    ),
    Case("name with a trailing dot", prefaced(PORT_80 + b"\x12\x02a."), TransportHeader(80, "a.")),
    Case(
        "fields in any order", prefaced(b"\x1a\x02\x12\x00\x12\x01a" + PORT_80), TransportHeader(80, "a", H2)
    ),
    Case("last port wins", prefaced(b"\x08\x00\x08\x50"), TransportHeader(80)),
    Case(
        "port is the low 32 bits of its varint", prefaced(b"\x08" + varint(2**32 + 80)), TransportHeader(80)
    ),
    Case("empty session_protocol is none", prefaced(PORT_80 + b"\x1a\x00"), TransportHeader(80)),
    Case(
        "session_protocols merge: http1 then empty",
        prefaced(PORT_80 + b"\x1a\x02\x0a\x00\x1a\x00"),
        TransportHeader(80, "", H1),
    ),
    Case(
        "session_protocols merge: http1 then http2",
        prefaced(PORT_80 + b"\x1a\x02\x0a\x00\x1a\x02\x12\x00"),
        TransportHeader(80, "", H2),
    ),
    Case(
        "oneof: the last member wins",
        prefaced(PORT_80 + b"\x1a\x04\x12\x00\x0a\x00"),
        TransportHeader(80, "", H1),
    ),
    Case(
        "unknown fields of every wire type skipped",
        prefaced(
            b"\x48\x96\x01"  # 9: varint
            + b"\x51"
            + b"\x01" * 8  # 10: 64-bit
            + b"\x5a\x03abc"  # 11: length-delimited
            + b"\x63\x08\x01\x64"  # 12: group holding a varint
            + b"\x6d"
            + b"\x02" * 4  # 13: 32-bit
            + PORT_80
        ),
        TransportHeader(80),
    ),
    Case(
        "unknown fields inside session_protocol and http2",
        prefaced(PORT_80 + b"\x1a\x06\x18\x01\x12\x02\x08\x01"),
        TransportHeader(80, "", H2),
    ),
    Case(
        "groups nested 100 deep (prost's limit)", prefaced(PORT_80 + nested_groups(100)), TransportHeader(80)
    ),
    Case("largest body (65536 bytes)", prefaced(LARGEST_BODY), TransportHeader(80)),
    # --- refused ----------------------------------------------------------------------------
    Case("length 0", with_length(0), HeaderRefused("empty")),
    Case("length 2^31", with_length(2**31), HeaderRefused("too_large")),
    Case("length 2^32-1", with_length(2**32 - 1), HeaderRefused("too_large")),
    Case("length one over the bound", with_length(MAX_BODY_LEN + 1, b"\x08\x50"), HeaderRefused("too_large")),
    Case("nothing at all", b"", HeaderRefused("truncated")),
    Case("truncated in the preface", PREFACE[:10], HeaderRefused("truncated")),
    Case("truncated after the preface", PREFACE, HeaderRefused("truncated")),
    Case("truncated mid-length", PREFACE + b"\x00\x00", HeaderRefused("truncated")),
    Case("truncated mid-body", with_length(6, b"\x08\x50"), HeaderRefused("truncated")),
    Case(
        "garbage after the preface: an HTTP request",
        PREFACE + b"GET / HTTP/1.1\r\n\r\n",
        HeaderRefused("too_large"),
    ),
    Case(
        "garbage after the preface: a junk body",
        with_length(4, b"\xff\xff\xff\xff"),
        HeaderRefused("malformed"),
    ),
    Case("no preface: an HTTP request", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", HeaderRefused("bad_preface")),
    Case(
        "no preface: another version",
        b"transport.l5d.io/v2\r\n\r\n" + b"\x00\x00\x00\x02\x08\x50",
        HeaderRefused("bad_preface"),
    ),
    Case("no preface: a TLS ClientHello", b"\x16\x03\x01\x02\x00\x01", HeaderRefused("bad_preface")),
    Case(
        "preface without its blank line",
        b"transport.l5d.io/v1\r\n\x00\x00\x00\x02\x08\x50",
        HeaderRefused("bad_preface"),
    ),
    Case("port 0", prefaced(b"\x08\x00"), HeaderRefused("bad_port")),
    Case("port absent", prefaced(b"\x12\x01a"), HeaderRefused("bad_port")),
    Case("port 65536", prefaced(b"\x08" + varint(65536)), HeaderRefused("bad_port")),
    Case("port 70000", prefaced(b"\x08" + varint(70000)), HeaderRefused("bad_port")),
    Case("port -1 (10-byte varint)", prefaced(b"\x08" + b"\xff" * 9 + b"\x01"), HeaderRefused("bad_port")),
    Case("port -65536 as int32", prefaced(b"\x08" + varint(2**64 - 65536)), HeaderRefused("bad_port")),
    Case("port 2^31 is negative as int32", prefaced(b"\x08" + varint(2**31)), HeaderRefused("bad_port")),
    Case(
        "malformed varint: 11 bytes", prefaced(b"\x08" + b"\x80" * 10 + b"\x01"), HeaderRefused("malformed")
    ),
    Case(
        "malformed varint: over 64 bits",
        prefaced(b"\x08" + b"\xff" * 9 + b"\x02"),
        HeaderRefused("malformed"),
    ),
    Case("malformed varint: cut at the body's end", prefaced(b"\x08\x80"), HeaderRefused("malformed")),
    Case("malformed key: over 32 bits", prefaced(varint(2**32 + 8) + b"\x50"), HeaderRefused("malformed")),
    Case("field number 0", prefaced(b"\x00\x00" + PORT_80), HeaderRefused("malformed")),
    Case("wire type 6", prefaced(PORT_80 + b"\x4e"), HeaderRefused("malformed")),
    Case("wire type 7", prefaced(PORT_80 + b"\x4f"), HeaderRefused("malformed")),
    Case("wrong wire type: port length-delimited", prefaced(b"\x0a\x01\x50"), HeaderRefused("malformed")),
    Case("wrong wire type: port 32-bit", prefaced(b"\x0d\x50\x00\x00\x00"), HeaderRefused("malformed")),
    Case("wrong wire type: name varint", prefaced(PORT_80 + b"\x10\x01"), HeaderRefused("malformed")),
    Case(
        "wrong wire type: session_protocol varint",
        prefaced(PORT_80 + b"\x18\x01"),
        HeaderRefused("malformed"),
    ),
    Case(
        "wrong wire type: http1 varint", prefaced(PORT_80 + b"\x1a\x02\x08\x00"), HeaderRefused("malformed")
    ),
    Case("name runs past the body", prefaced(PORT_80 + b"\x12\x05ab"), HeaderRefused("malformed")),
    Case(
        "session_protocol runs past the body",
        prefaced(PORT_80 + b"\x1a\x04\x0a\x00"),
        HeaderRefused("malformed"),
    ),
    Case(
        "http2 runs past session_protocol",
        prefaced(PORT_80 + b"\x1a\x02\x12\x02\x08\x01"),
        HeaderRefused("malformed"),
    ),
    Case("unknown field runs past the body", prefaced(PORT_80 + b"\x5a\x05\x00"), HeaderRefused("malformed")),
    Case("fixed 64-bit field cut short", prefaced(PORT_80 + b"\x51\x00\x00"), HeaderRefused("malformed")),
    Case("fixed 32-bit field cut short", prefaced(PORT_80 + b"\x6d\x00"), HeaderRefused("malformed")),
    Case("end group without a start", prefaced(PORT_80 + b"\x4c"), HeaderRefused("malformed")),
    Case("end group of another field", prefaced(PORT_80 + b"\x4b\x54"), HeaderRefused("malformed")),
    Case("group never ended", prefaced(PORT_80 + b"\x4b\x48\x01"), HeaderRefused("malformed")),
    Case("groups nested 101 deep", prefaced(PORT_80 + nested_groups(101)), HeaderRefused("malformed")),
    Case("name not UTF-8", prefaced(PORT_80 + b"\x12\x02\xc3\x28"), HeaderRefused("malformed")),
    Case("malformed before a bad port", prefaced(b"\x08\x00\x12\x01\xff"), HeaderRefused("malformed")),
    Case("bad name: leading hyphen", prefaced(PORT_80 + b"\x12\x04-bad"), HeaderRefused("bad_name")),
    Case("bad name: empty label", prefaced(PORT_80 + b"\x12\x04a..b"), HeaderRefused("bad_name")),
    Case("bad name: an IP address", prefaced(PORT_80 + b"\x12\x071.2.3.4"), HeaderRefused("bad_name")),
    Case("bad name: with a port", prefaced(PORT_80 + b"\x12\x0eexample.com:80"), HeaderRefused("bad_name")),
    Case("bad name: non-ASCII", prefaced(PORT_80 + b"\x12\x04" + "é.a".encode()), HeaderRefused("bad_name")),
    Case(
        "bad name: 254 characters",
        prefaced(PORT_80 + b"\x12\xfe\x01" + b"a." * 126 + b"ab"),
        HeaderRefused("bad_name"),
    ),
    Case("bad name is reported before a bad port", prefaced(b"\x08\x00\x12\x01-"), HeaderRefused("bad_name")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_table(case: Case) -> None:
    result = read_all(case.data)
    assert result == case.expected
    if isinstance(result, HeaderRefused):
        assert result.reason in REFUSAL_REASONS
        assert result.detail  # a sentence for the log, beside the label


def test_the_table_covers_every_refusal_reason() -> None:
    covered = {c.expected.reason for c in CASES if isinstance(c.expected, HeaderRefused)}
    assert covered == REFUSAL_REASONS


def test_names_as_linkerd_dns_name_tests_them() -> None:
    # The cases of linkerd2-proxy linkerd/dns/name/src/name.rs `test_parse`.
    cases = {
        "": False, ".": False, "..": False, "...": False, "*": False, "a": True, "a.": True,
        "d.c.b.a": True, "d.c.b.a.": True, " d.c.b.a.": False, "d.c.b.a-": False, "*.a.": False,
        ".a.": False, "a1": True, "_m.foo.bar": True, "m.foo.bar_": True, "example.com:80": False,
        "1": False, "1.a": True, "a.1": False, "1.2.3.4": False, "::1": False,
        "xn--poema-9qae5a.com.br": True, "a" * 63: True, "a" * 64: False, "a.1.": False,
        "a\n": False,
    }  # fmt: skip
    assert {name: is_valid_name(name) for name in cases} == cases


# --- protoc: an encoder and decoder that are not ours --------------------------------------------

PROTOC_CASES = [
    ("port: 80", TransportHeader(80), "port: 80"),
    (
        'port: 4040 name: "web.shop.svc.cluster.local"',
        TransportHeader(4040, "web.shop.svc.cluster.local"),
        'port: 4040 name: "web.shop.svc.cluster.local"',
    ),
    (
        "port: 8080 session_protocol { http1 {} }",
        TransportHeader(8080, "", H1),
        "port: 8080 session_protocol { http1 { } }",
    ),
    (
        'port: 65535 name: "linkerd-gateway.linkerd.svc.cluster.local." session_protocol { http2 {} }',
        TransportHeader(65535, "linkerd-gateway.linkerd.svc.cluster.local.", H2),
        'port: 65535 name: "linkerd-gateway.linkerd.svc.cluster.local." session_protocol { http2 { } }',
    ),
]


def protoc(mode: str, data: bytes) -> bytes:
    assert PROTOC is not None
    done = subprocess.run(
        [PROTOC, f"--{mode}=transport.l5d.io.Header", f"--proto_path={PROTO.parent}", PROTO.name],
        input=data,
        capture_output=True,
        check=False,
        cwd=PROTO.parent,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


@needs_protoc
@pytest.mark.parametrize(("text", "header", "printed"), PROTOC_CASES, ids=[c[0] for c in PROTOC_CASES])
def test_body_is_byte_for_byte_what_protoc_encodes(text: str, header: TransportHeader, printed: str) -> None:
    theirs = protoc("encode", text.encode())
    assert encode_body(header) == theirs
    assert encode(header) == prefaced(theirs)
    # And their bytes, framed, read back as the header.
    assert read_all(prefaced(theirs)) == header


@needs_protoc
@pytest.mark.parametrize(("text", "header", "printed"), PROTOC_CASES, ids=[c[0] for c in PROTOC_CASES])
def test_protoc_decodes_our_bytes_to_the_same_fields(
    text: str, header: TransportHeader, printed: str
) -> None:
    decoded = protoc("decode", encode_body(header)).decode()
    assert " ".join(decoded.split()) == printed


@needs_protoc
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("port: -1", "bad_port"),
        ("port: 70000", "bad_port"),
        ("port: -2147483648", "bad_port"),
        ('name: "a"', "bad_port"),
    ],
)
def test_protoc_encoded_bad_ports_are_refused(text: str, reason: str) -> None:
    body = protoc("encode", text.encode())
    if text == "port: -1":
        assert body == b"\x08" + b"\xff" * 9 + b"\x01"  # the 10-byte varint of a negative int32
    assert read_all(prefaced(body)) == HeaderRefused(reason)  # type: ignore[arg-type]


# --- encode ------------------------------------------------------------------------------------


def test_constants() -> None:
    assert ALPN == "transport.l5d.io/v1"
    assert ALPN.encode() + b"\r\n\r\n" == PREFACE
    assert len(PREFACE) + 4 + 65536 == MAX_BUFFERED


@pytest.mark.parametrize(
    "header", [TransportHeader(0), TransportHeader(70000), TransportHeader(-1), TransportHeader(80, "-x")]
)
def test_encode_refuses_what_linkerd_would_refuse(header: TransportHeader) -> None:
    with pytest.raises(ValueError, match="transport header"):
        encode(header)


# --- incremental feed and rest ----------------------------------------------------------------

SPLIT_CASES = [c for c in CASES if len(c.data) < 400]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c.name for c in SPLIT_CASES])
def test_every_split_point_gives_the_same_result(case: Case) -> None:
    for cut in range(len(case.data) + 1):
        reader = HeaderReader()
        first = reader.feed(case.data[:cut])
        result = first if first is not NEED_DATA else reader.feed(case.data[cut:])
        if result is NEED_DATA:
            result = reader.eof()
        assert result == case.expected, cut
        assert reader.buffered == 0


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c.name for c in SPLIT_CASES])
def test_byte_at_a_time(case: Case) -> None:
    reader = HeaderReader()
    results = [reader.feed(case.data[i : i + 1]) for i in range(len(case.data))]
    decided = [r for r in results if r is not NEED_DATA]
    final = decided[0] if decided else reader.eof()
    assert final == case.expected
    assert all(r == final for r in decided)  # a decision is final


def test_a_wrong_preface_is_refused_at_its_first_byte() -> None:
    reader = HeaderReader()
    assert reader.feed(b"transport.l5d") is NEED_DATA
    assert reader.feed(b"X") == HeaderRefused("bad_preface")
    assert reader.buffered == 0


def test_a_too_large_length_is_refused_before_its_body() -> None:
    reader = HeaderReader()
    assert reader.feed(with_length(2**31)) == HeaderRefused("too_large")
    assert reader.buffered == 0
    assert reader.feed(b"\x00" * 1000) == HeaderRefused("too_large")  # sticky, nothing kept
    assert reader.eof() == HeaderRefused("too_large")


def test_the_largest_body_byte_by_byte_never_holds_more_than_the_bound() -> None:
    data = prefaced(LARGEST_BODY) + b"after"
    reader = HeaderReader()
    most = 0
    for i in range(len(data) - 5):
        assert reader.feed(data[i : i + 1]) is NEED_DATA or i == len(data) - 6
        most = max(most, reader.buffered)
    assert most == MAX_BUFFERED - len(PREFACE) - 4 - 1  # only the body is held, then dropped
    assert reader.feed(b"after") == TransportHeader(80)
    assert reader.rest == b"after"


@pytest.mark.parametrize("after", [b"", b"x", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 40, PREFACE])
def test_rest_keeps_the_bytes_after_the_header_exactly(after: bytes) -> None:
    header = TransportHeader(6379, "redis.db.svc.cluster.local", None)
    data = encode(header) + after
    for cut in (1, len(PREFACE), len(data) - len(after), len(data) - 1):
        reader = HeaderReader()
        first = reader.feed(data[:cut])
        assert first is NEED_DATA or first == header
        assert reader.feed(data[cut:]) == header  # more bytes after a header join `rest`
        assert reader.rest == after


def test_bytes_fed_after_the_header_join_rest() -> None:
    reader = HeaderReader()
    assert reader.feed(encode(TransportHeader(80)) + b"ab") == TransportHeader(80)
    assert reader.feed(b"cd") == TransportHeader(80)
    assert reader.rest == b"abcd"
    with pytest.raises(RuntimeError, match="rest"):
        reader.eof()


def test_eof_is_truncated_then_sticky() -> None:
    reader = HeaderReader()
    assert reader.feed(PREFACE[:5]) is NEED_DATA
    refused = reader.eof()
    assert refused == HeaderRefused("truncated")
    assert re.search(r"5 header bytes", refused.detail)
    assert reader.feed(PREFACE[5:]) == refused


def test_a_negative_port_is_logged_as_the_int32_linkerd_reads() -> None:
    refused = read_all(prefaced(b"\x08" + b"\xff" * 9 + b"\x01"))
    assert isinstance(refused, HeaderRefused)
    assert refused.detail == "port -1 is not in 1..65535"
