"""A test peer that calls a meshed host the way an in-cluster linkerd2-proxy's outbound side does.

Written from linkerd2-proxy (29637b64), client side only; nothing here imports our proxy code,
so the host is checked against an independent reading of the wire:

- TLS (`linkerd/meshtls/src/client.rs`, `creds/store.rs`, `linkerd/rustls/src/crypto.rs`):
  TLS 1.3 only; SNI = the endpoint's `server_name` (the ExternalWorkload's
  `meshTLS.serverName`); the client certificate chain as the identity controller issued it
  (leaf with one DNS SAN, then the issuer); the server's chain verified against the trust
  bundle with any name (`AnySanVerifier`), then `verifier::verify_id`
  (`linkerd/meshtls/verifier/src/lib.rs`): some SAN of the same kind equals the expected
  identity (a URI for an ExternalWorkload's `meshTLS.identity`).
- Opaque transport (`linkerd/app/outbound/src/tcp/tagged_transport.rs`): the client dials the
  endpoint's inbound proxy port offering ALPN `transport.l5d.io/v1`, and only if the server
  selected it writes the header (`linkerd/transport-header/src/lib.rs`, `encode_prefaced`):
  preface `transport.l5d.io/v1\\r\\n\\r\\n`, a u32 big-endian length, the protobuf
  `transport.l5d.io.Header{port, name, session_protocol}`. The header is encoded here by
  `protoc --encode` from tests/linkerd/transport_header.proto, not by our codec.
  `session_protocol` is the HTTP client's variant (`http/endpoint.rs`, `Param<Option<
  SessionProtocol>> for Connect`): the orig-proto upgrade's h2 client dials with
  `Variant::H2` (`proxy/http/src/h2.rs`), so upgraded HTTP/1 says HTTP2; absent for TCP.
- Transparent mode (no opaque-transport hint): TLS straight to the app's `ip:port`, no ALPN.
- HTTP/1 upgraded to HTTP/2 (`linkerd/proxy/http/src/orig_proto.rs`, `Upgrade::call`): the
  request gets `l5d-orig-proto: HTTP/1.1` or `HTTP/1.0`, `; absolute-form` appended when the
  request was in absolute form; `transfer-encoding` dropped; HTTP/2 with prior knowledge, many
  requests as concurrent streams on one connection (`client.rs`, `Params::OrigProtoUpgrade`);
  the response's `l5d-orig-proto` removed (here: also required, as proof the host downgraded).
  hyper's h2 client drops the other connection-specific headers and keeps `host`;
  `normalize_uri.rs` took `:authority` from Host (or from the absolute-form target).

Subcommands (run inside a namespace with `ip netns exec NS python -m tests.linkerd.peer ...`):
`requests` (a JSON list of HTTP/1 requests, upgraded, results as JSON), `forward` (an opaque
forwarder for real clients such as redis-benchmark or grpcio), `probe` (one raw TLS
connection with chosen ALPN and bytes), `flood` (more concurrent streams than allowed),
`direct` (the same requests straight to the app over HTTP/1.1, for comparison), `header`
(print the protoc-encoded header as hex).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import ssl
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
from hyperframe.frame import HeadersFrame, SettingsFrame

ALPN = "transport.l5d.io/v1"
PREFACE = b"transport.l5d.io/v1\r\n\r\n"
HEADER_PROTO = Path(__file__).with_name("transport_header.proto")
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ORIG_PROTO = "l5d-orig-proto"
CONNECT_TIMEOUT_S = 10.0
# Connection-specific headers hyper's h2 client strips (illegal in HTTP/2, RFC 9113 8.2.2).
_CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)

Mode = Literal["header", "transparent"]
Session = Literal["http1", "http2"] | None


def _code(code: object) -> str:
    """An HTTP/2 error code by name (h2 leaves unknown codes as ints)."""
    return code.name if isinstance(code, h2.errors.ErrorCodes) else str(code)


class PeerError(Exception):
    """What went wrong, as a sentence the test can show."""


# --- the transport header, encoded by protoc ----------------------------------------------------


def encode_header(port: int, name: str = "", session: Session = None, proto: Path = HEADER_PROTO) -> bytes:
    """Preface, length and `Header` as linkerd2-proxy writes them; the body comes from protoc."""
    text = f"port: {port}\n"
    if name:
        text += f'name: "{name}"\n'
    if session is not None:
        text += f"session_protocol {{ {session} {{}} }}\n"
    done = subprocess.run(
        ["protoc", f"--proto_path={proto.parent}", "--encode=transport.l5d.io.Header", proto.name],
        input=text.encode(),
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise PeerError(f"protoc --encode failed: {done.stderr.decode(errors='replace').strip()}")
    return PREFACE + len(done.stdout).to_bytes(4, "big") + done.stdout


# --- TLS as linkerd's meshtls client ----------------------------------------------------------


@dataclass(frozen=True)
class PeerTls:
    cert: Path  # leaf then issuer, PEM
    key: Path
    bundle: Path  # the mesh's trust anchors
    server_name: str  # SNI: the ExternalWorkload's meshTLS.serverName
    server_id: str  # the expected identity: meshTLS.identity (a SPIFFE URI)

    def context(self, alpn: Sequence[str]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(cafile=self.bundle)
        ctx.check_hostname = False  # AnySanVerifier: the chain only; the identity is checked after
        ctx.verify_mode = ssl.CERT_REQUIRED
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    def verify_id(self, cert: dict[str, Any] | None) -> None:
        """verifier::verify_id: a SAN of the expected identity's kind equal to it."""
        kind = "URI" if self.server_id.startswith("spiffe://") else "DNS"
        sans = (cert or {}).get("subjectAltName", ())
        if (kind, self.server_id) not in sans:
            raise PeerError(f"server certificate does not match TLS identity {self.server_id}: SANs {sans}")


@dataclass
class Dialed:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    alpn: str | None
    header: bytes = b""  # what was written before the session, if anything


async def tls_connect(tls: PeerTls, host: str, port: int, alpn: Sequence[str]) -> Dialed:
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls.context(alpn), server_hostname=tls.server_name
        )
    sslobj = writer.get_extra_info("ssl_object")
    try:
        tls.verify_id(sslobj.getpeercert())
    except PeerError:
        writer.close()
        raise
    return Dialed(reader, writer, sslobj.selected_alpn_protocol())


async def dial(
    tls: PeerTls,
    host: str,
    mode: Mode,
    target_port: int,
    inbound_port: int = 4143,
    session: Session = None,
    header: bytes | None = None,
) -> Dialed:
    """TaggedTransport: opaque transport dials the proxy port with the ALPN and writes the
    header only if it was selected; transparent mode dials the app's port without ALPN."""
    if mode == "transparent":
        return await tls_connect(tls, host, target_port, ())
    dialed = await tls_connect(tls, host, inbound_port, (ALPN,))
    if dialed.alpn == ALPN:
        dialed.header = header if header is not None else encode_header(target_port, session=session)
        dialed.writer.write(dialed.header)
        await dialed.writer.drain()
    return dialed


# --- HTTP/1 upgraded to HTTP/2 -----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """An HTTP/1 request as the client's app sent it to its linkerd2-proxy."""

    method: str = "GET"
    target: str = "/"  # origin-form, or absolute-form "http://host/path"
    version: str = "HTTP/1.1"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    chunked: bool = False  # the app sent the body chunked: no content-length reaches h2
    upgrade: bool = True  # False: send as native HTTP/2 (gRPC), headers as given

    def h2_headers(self) -> list[tuple[str, str]]:
        fields = [(k.lower(), v) for k, v in self.headers]
        path, authority = self.target, dict(fields).get("host", "")
        absolute = self.target.startswith(("http://", "https://"))
        if absolute:
            rest = self.target.split("://", 1)[1]
            authority, _, tail = rest.partition("/")
            path = "/" + tail
        out = [(":method", self.method), (":scheme", "http"), (":authority", authority), (":path", path)]
        if not self.upgrade:
            return out + fields
        out += [
            (k, v) for k, v in fields if k not in _CONNECTION_HEADERS and not (k == "te" and v != "trailers")
        ]
        if self.body and not self.chunked and "content-length" not in dict(fields):
            out.append(("content-length", str(len(self.body))))  # hyper: exact size hint
        orig = self.version + ("; absolute-form" if absolute else "")
        return [*out, (ORIG_PROTO, orig)]


@dataclass
class Response:
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    reset: str | None = None  # the RST_STREAM / GOAWAY error code that ended it instead
    orig_proto: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "headers": self.headers,
            "trailers": self.trailers,
            "reset": self.reset,
            "orig_proto": self.orig_proto,
            "body_len": len(self.body),
            "body_sha256": hashlib.sha256(self.body).hexdigest(),
            "body_head": base64.b64encode(bytes(self.body[:256])).decode(),
        }


class H2Client:
    """One HTTP/2 connection (prior knowledge) carrying many concurrent streams."""

    def __init__(self, dialed: Dialed) -> None:
        self.io = dialed
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.streams: dict[int, tuple[Response, asyncio.Future[Response]]] = {}
        self.changed = asyncio.Condition()  # windows or stream slots moved
        self.closed: str | None = None
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 * 1024 * 1024)
        self._flush()
        self.reading = asyncio.create_task(self._read())

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.io.writer.write(data)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.io.reader.read(65536)
                if not data:
                    self._fail("eof")
                    return
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as err:
                    self._fail(f"protocol_error: {err}")
                    return
                for event in events:
                    self._event(event)
                self._flush()
                async with self.changed:
                    self.changed.notify_all()
        except (ConnectionError, ssl.SSLError, OSError) as err:
            self._fail(f"io: {err}")

    def _event(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        entry = self.streams.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and entry:
            headers = [(str(k), str(v)) for k, v in event.headers]
            status = next((v for k, v in headers if k == ":status"), "")
            if status.startswith("1"):
                return  # interim (100 Continue): the final head follows
            entry[0].status = int(status)
            entry[0].headers = [(k, v) for k, v in headers if not k.startswith(":")]
        elif isinstance(event, h2.events.DataReceived):
            if entry:
                entry[0].body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and entry:
            entry[0].trailers = [(str(k), str(v)) for k, v in event.headers]
        elif isinstance(event, h2.events.StreamEnded) and entry:
            self._done(event.stream_id)
        elif isinstance(event, h2.events.StreamReset) and entry:
            entry[0].reset = _code(event.error_code)
            self._done(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._fail(f"goaway {_code(event.error_code)}")

    def _done(self, sid: int) -> None:
        response, fut = self.streams.pop(sid)
        if not fut.done():
            fut.set_result(response)

    def _fail(self, why: str) -> None:
        self.closed = self.closed or why
        for sid in list(self.streams):
            response, _ = self.streams[sid]
            response.reset = response.reset or why
            self._done(sid)

    async def _wait(self, ready: Any) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: ready() or self.closed is not None)

    async def request(self, req: Request) -> Response:
        await self._wait(
            lambda: self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams
        )
        if self.closed is not None:
            return Response(reset=self.closed)
        sid = self.conn.get_next_available_stream_id()
        response = Response()
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.streams[sid] = (response, fut)
        self.conn.send_headers(sid, req.h2_headers(), end_stream=not req.body)
        self._flush()
        body = memoryview(req.body)
        while body and self.closed is None and sid in self.streams:
            await self._wait(lambda: sid not in self.streams or self.conn.local_flow_control_window(sid) > 0)
            if sid not in self.streams or self.closed is not None:
                break
            n = min(len(body), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            chunk, body = body[:n], body[n:]
            self.conn.send_data(sid, bytes(chunk), end_stream=not body)
            self._flush()
        await self.io.writer.drain()
        got = await fut
        if req.upgrade and got.status is not None:
            values = [v for k, v in got.headers if k == ORIG_PROTO]
            got.orig_proto = values[0] if values else None
            got.headers = [(k, v) for k, v in got.headers if k != ORIG_PROTO]
        return got

    async def close(self) -> None:
        if self.closed is None:
            self.conn.close_connection()
            self._flush()
            with contextlib.suppress(OSError):  # the other side may have gone first
                await self.io.writer.drain()
        self.reading.cancel()
        self.io.writer.close()
        with contextlib.suppress(OSError):  # the other side may have gone first
            await self.io.writer.wait_closed()


def _spec_request(item: dict[str, Any]) -> Request:
    body = base64.b64decode(item["body"]) if item.get("body") else b"x" * int(item.get("body_size", 0))
    return Request(
        method=item.get("method", "GET"),
        target=item.get("target", "/"),
        version=item.get("version", "HTTP/1.1"),
        headers=tuple((str(k), str(v)) for k, v in item.get("headers", [])),
        body=body,
        chunked=bool(item.get("chunked", False)),
        upgrade=bool(item.get("upgrade", True)),
    )


async def run_requests(dialed: Dialed, spec: list[dict[str, Any]]) -> dict[str, Any]:
    """Each spec entry's `count` copies at once on the one connection; entries in order."""
    client = H2Client(dialed)
    out: dict[str, Any] = {"alpn": dialed.alpn, "results": {}}
    try:
        for item in spec:
            req = _spec_request(item)
            got = await asyncio.gather(*(client.request(req) for _ in range(int(item.get("count", 1)))))
            out["results"][item["name"]] = [r.summary() for r in got]
    finally:
        out["closed"] = client.closed
        await client.close()
    return out


def run_direct(host: str, port: int, spec: list[dict[str, Any]]) -> dict[str, Any]:
    """The same requests straight to the app over HTTP/1.1 (http.client), once each."""
    results: dict[str, Any] = {}
    for item in spec:
        req = _spec_request(item)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        headers = {k: v for k, v in req.headers if k.lower() != "l5d-orig-proto"}
        body: Any = req.body or None
        if req.chunked and req.body:
            body, headers["Transfer-Encoding"] = iter([req.body]), "chunked"
        conn.request(req.method, req.target, body=body, headers=headers, encode_chunked=req.chunked)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        got = Response(status=resp.status, headers=[(k.lower(), v) for k, v in resp.getheaders()])
        got.body += data
        results[item["name"]] = [got.summary()]
    return {"results": results}


# --- misbehaving peers ---------------------------------------------------------------------


async def probe(
    tls: PeerTls, host: str, port: int, alpn: Sequence[str], send: bytes, wait: float
) -> dict[str, Any]:
    """One TLS connection: the handshake, then `send`, then what comes back until EOF or `wait`."""
    try:
        dialed = await tls_connect(tls, host, port, alpn)
    except (TimeoutError, ssl.SSLError, OSError, PeerError) as err:
        return {
            "handshake": f"failed: {type(err).__name__}: {err}",
            "alpn": None,
            "received_len": 0,
            "eof": "handshake failed",
        }
    received, eof = bytearray(), ""  # eof: "" open, "eof", or the error that ended it
    try:
        if send:
            dialed.writer.write(send)
            await dialed.writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while loop.time() < deadline:
            data = await asyncio.wait_for(dialed.reader.read(65536), deadline - loop.time())
            if not data:
                eof = "eof"
                break
            received += data
    except TimeoutError:
        pass
    except (ssl.SSLError, OSError) as err:
        eof = f"{type(err).__name__}: {err}"
    dialed.writer.close()
    with contextlib.suppress(OSError):  # the other side may have gone first
        await dialed.writer.wait_closed()
    return {
        "handshake": "ok",
        "alpn": dialed.alpn,
        "received_len": len(received),
        "received_head": bytes(received[:200]).decode("latin-1"),
        "eof": eof,
    }


async def flood(dialed: Dialed, streams: int, authority: str, path: str, wait: float) -> dict[str, Any]:
    """`streams` requests opened at once whatever the server's SETTINGS_MAX_CONCURRENT_STREAMS
    (raw frames: the h2 library would refuse to), then what came back."""
    enc = hpack.Encoder()
    frames = bytearray(H2_PREFACE + SettingsFrame(0).serialize())
    head = [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path)]
    head.append((ORIG_PROTO, "HTTP/1.1"))
    for i in range(streams):
        frame = HeadersFrame(2 * i + 1, data=enc.encode(head), flags=["END_HEADERS", "END_STREAM"])
        frames += frame.serialize()
    dialed.writer.write(bytes(frames))
    await dialed.writer.drain()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.data_to_send()
    # Replay what we sent into a client state machine that allows it, to parse the answers.
    conn.remote_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = deque([2**31 - 1])
    for i in range(streams):
        conn.send_headers(2 * i + 1, head, end_stream=True)
    conn.data_to_send()
    out: dict[str, Any] = {"responses": {}, "resets": {}, "goaway": None, "max_concurrent_streams": None}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        while loop.time() < deadline:
            data = await asyncio.wait_for(dialed.reader.read(65536), deadline - loop.time())
            if not data:
                break
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError as err:
                out["protocol_error"] = str(err)
                break
            for ev in events:
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    mcs = ev.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                    if mcs is not None:
                        out["max_concurrent_streams"] = mcs.new_value
                elif isinstance(ev, h2.events.ResponseReceived):
                    status = next((str(v) for k, v in ev.headers if str(k) == ":status"), "?")
                    out["responses"][status] = out["responses"].get(status, 0) + 1
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    code = _code(ev.error_code)
                    out["resets"][code] = out["resets"].get(code, 0) + 1
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    out["goaway"] = _code(ev.error_code)
            dialed.writer.write(conn.data_to_send())
            done = sum(out["responses"].values()) + sum(out["resets"].values())
            if out["goaway"] is not None or done >= streams:
                break
    except (TimeoutError, ssl.SSLError, OSError):
        pass
    dialed.writer.close()
    with contextlib.suppress(OSError):  # the other side may have gone first
        await dialed.writer.wait_closed()
    return out


# --- the opaque forwarder ---------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()  # TLS: close_notify is the end of the stream
    except (ConnectionError, ssl.SSLError, OSError):
        writer.close()


async def forward(
    tls: PeerTls,
    listen: tuple[str, int],
    host: str,
    mode: Mode,
    target_port: int,
    inbound_port: int,
    session: Session,
) -> None:
    """Like linkerd2-proxy's outbound for an opaque (or h2) endpoint: each local connection
    becomes one mTLS connection carrying the header, bytes relayed both ways."""
    header = encode_header(target_port, session=session) if mode == "header" else None

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up = await dial(tls, host, mode, target_port, inbound_port, session, header)
        except (TimeoutError, OSError, ssl.SSLError, PeerError) as err:
            print(f"forward: dial failed: {err}", file=sys.stderr, flush=True)
            writer.close()
            return
        if mode == "header" and up.alpn != ALPN:
            print(f"forward: ALPN {up.alpn!r} not selected", file=sys.stderr, flush=True)
        await asyncio.gather(_pipe(reader, up.writer), _pipe(up.reader, writer))
        for w in (writer, up.writer):
            w.close()

    server = await asyncio.start_server(serve, *listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# --- command line -------------------------------------------------------------------------------


def _tls(args: argparse.Namespace) -> PeerTls:
    return PeerTls(Path(args.cert), Path(args.key), Path(args.bundle), args.server_name, args.server_id)


def _addr(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.linkerd.peer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def tls_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cert", required=True, help="client chain PEM (leaf, issuer)")
        sp.add_argument("--key", required=True)
        sp.add_argument("--bundle", required=True, help="the mesh's trust anchors PEM")
        sp.add_argument("--server-name", required=True, help="SNI (meshTLS.serverName)")
        sp.add_argument("--server-id", required=True, help="expected identity (meshTLS.identity)")
        sp.add_argument("--host", required=True, help="the endpoint's address")

    def dial_args(sp: argparse.ArgumentParser) -> None:
        tls_args(sp)
        sp.add_argument("--mode", choices=["header", "transparent"], default="header")
        sp.add_argument("--target-port", type=int, required=True, help="the app's port")
        sp.add_argument("--inbound-port", type=int, default=4143)
        sp.add_argument("--session", choices=["http1", "http2"], default=None)
        sp.add_argument("--header-hex", default=None, help="write these bytes instead of the header")

    sp = sub.add_parser("requests", help="HTTP/1 requests upgraded to HTTP/2 on one connection")
    dial_args(sp)
    sp.add_argument("--spec", required=True, help="JSON list of requests")

    sp = sub.add_parser("direct", help="the same requests straight to the app over HTTP/1.1")
    sp.add_argument("--to", required=True, help="host:port")
    sp.add_argument("--spec", required=True)

    sp = sub.add_parser("forward", help="opaque forwarder: local plaintext in, mTLS + header out")
    dial_args(sp)
    sp.add_argument("--listen", required=True, help="host:port")

    sp = sub.add_parser("probe", help="one TLS connection with chosen ALPN and bytes")
    tls_args(sp)
    sp.add_argument("--port", type=int, required=True)
    sp.add_argument("--alpn", action="append", default=[])
    sp.add_argument("--send-hex", default="")
    sp.add_argument("--wait", type=float, default=3.0)

    sp = sub.add_parser("flood", help="more concurrent streams than the server allows")
    dial_args(sp)
    sp.add_argument("--streams", type=int, default=300)
    sp.add_argument("--path", default="/")
    sp.add_argument("--wait", type=float, default=10.0)

    sp = sub.add_parser("header", help="print the protoc-encoded header as hex")
    sp.add_argument("--port", type=int, required=True)
    sp.add_argument("--name", default="")
    sp.add_argument("--session", choices=["http1", "http2"], default=None)

    args = p.parse_args(argv)
    if args.cmd == "header":
        print(encode_header(args.port, args.name, args.session).hex())
        return 0
    if args.cmd == "direct":
        host, port = _addr(args.to)
        print(json.dumps(run_direct(host, port, json.loads(Path(args.spec).read_text()))))
        return 0
    if args.cmd == "probe":
        got = asyncio.run(
            probe(_tls(args), args.host, args.port, args.alpn, bytes.fromhex(args.send_hex), args.wait)
        )
        print(json.dumps(got))
        return 0
    header = bytes.fromhex(args.header_hex) if getattr(args, "header_hex", None) else None
    if args.cmd == "forward":
        asyncio.run(
            forward(
                _tls(args),
                _addr(args.listen),
                args.host,
                args.mode,
                args.target_port,
                args.inbound_port,
                args.session,
            )
        )
        return 0

    async def dialed() -> Dialed:
        return await dial(
            _tls(args), args.host, args.mode, args.target_port, args.inbound_port, args.session, header
        )

    if args.cmd == "requests":
        spec = json.loads(Path(args.spec).read_text())

        async def go() -> dict[str, Any]:
            return await run_requests(await dialed(), spec)

        print(json.dumps(asyncio.run(go())))
        return 0
    assert args.cmd == "flood"

    async def go_flood() -> dict[str, Any]:
        d = await dialed()
        return {"alpn": d.alpn, **await flood(d, args.streams, args.server_name, args.path, args.wait)}

    print(json.dumps(asyncio.run(go_flood())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
