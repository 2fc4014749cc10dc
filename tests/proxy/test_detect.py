"""Protocol detection on first bytes (agent/proxy/detect.py): real ClientHellos made by OpenSSL,
HTTP request lines, the HTTP/2 preface, every partial prefix, opaque bytes."""

from __future__ import annotations

import ssl

import pytest

from agent.proxy.detect import MAX_PEEK, NEED_DATA, Detected, Protocol, detect


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of a TLS client, as OpenSSL writes it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


NAME = "db.shop.serviceaccount.identity.linkerd.cluster.local"


@pytest.mark.parametrize(
    ("server_name", "alpn", "sni"),
    [
        (NAME, None, NAME),
        (NAME, ["transport.l5d.io/v1"], NAME),  # linkerd2-proxy's opaque transport
        ("API.Example.COM", ["h2", "http/1.1"], "api.example.com"),  # lowercased
        (None, None, None),
    ],
)
def test_client_hello(server_name: str | None, alpn: list[str] | None, sni: str | None) -> None:
    hello = client_hello(server_name, alpn)
    assert detect(hello) == Detected(Protocol.TLS, sni)
    assert detect(hello + b"more records") == Detected(Protocol.TLS, sni)


def test_every_truncation_of_a_client_hello_needs_data() -> None:
    hello = client_hello(NAME)
    for cut in range(1, len(hello)):
        assert detect(hello[:cut]) is NEED_DATA, cut


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x16\x02\x00\x00\x05hello", Detected(Protocol.OPAQUE)),  # not a TLS record version
        # A handshake record that is not a ClientHello, or whose ClientHello is cut inside: TLS,
        # no SNI (what a mesh peer sends always parses, so this never admits one by mistake).
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", Detected(Protocol.TLS, None)),
        (b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03", Detected(Protocol.TLS, None)),
        # A ClientHello longer than detection reads: TLS without SNI.
        (b"\x16\x03\x01\xff\xff" + b"\x01" * (MAX_PEEK - 5), Detected(Protocol.TLS, None)),
        (b"\x16\x03\x01\xff\xff" + b"\x01" * 100, NEED_DATA),
    ],
)
def test_odd_tls_records(data: bytes, expected: object) -> None:
    assert detect(data) == expected


def test_sni_of_another_name_type_is_no_sni() -> None:
    hello = bytearray(client_hello(NAME))
    at = hello.find(NAME.encode()) - 3  # the server_name entry's type byte (0: host_name)
    assert hello[at] == 0
    hello[at] = 1
    assert detect(bytes(hello)) == Detected(Protocol.TLS, None)


METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"]


@pytest.mark.parametrize("method", METHODS)
def test_http1_methods_and_their_prefixes(method: bytes) -> None:
    line = method + b" / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert detect(line) == Detected(Protocol.HTTP1)
    assert detect(method + b" ") == Detected(Protocol.HTTP1)
    for cut in range(1, len(method) + 1):  # could still become this method
        assert detect(method[:cut]) is NEED_DATA, method[:cut]


def test_h2_preface_and_its_prefixes() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert detect(preface) == Detected(Protocol.HTTP2)
    assert detect(preface + b"\x00\x00\x12\x04") == Detected(Protocol.HTTP2)
    for cut in range(1, len(preface)):
        assert detect(preface[:cut]) is NEED_DATA, preface[:cut]
    # "P" could be POST, PUT, PATCH or PRI; "PRI * HTTP/1.1" is none of them.
    assert detect(b"PRI * HTTP/1.1\r\n") == Detected(Protocol.OPAQUE)


@pytest.mark.parametrize(
    "data",
    [
        b"*1\r\n$4\r\nPING\r\n",  # redis
        b"get / HTTP/1.1\r\n",  # methods are case-sensitive
        b"GETX / HTTP/1.1\r\n",
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # postgres SSLRequest
        b"transport.l5d.io/v1\r\n\r\n",  # a transport header without TLS
        b"SSH-2.0-OpenSSH_9.2\r\n",
    ],
)
def test_opaque(data: bytes) -> None:
    assert detect(data) == Detected(Protocol.OPAQUE)


def test_nothing_yet_needs_data() -> None:
    assert detect(b"") is NEED_DATA
