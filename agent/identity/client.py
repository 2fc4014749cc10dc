"""The host's HTTPS client for the authority: discovery by pin, enroll, renew, host config.

The join token carries the authority's URL and the sha256 pin of its API CA. Discovery reads
the CA once without verification, accepts it only if its public key matches the pin, and from
then on every request (the token's secret included) goes over TLS verified against that CA.
The hostname is not checked: the pinned CA is the authority's own and signs nothing else, so a
certificate it issued proves the peer is the authority whatever name or NAT address the host
used to reach it.

Two transports, one behaviour (agent/identity/transport*.py): the daemon's calls use the
standard library's `http.client`, so the long-running process stays lean; the short-lived
enroll and renew processes use httpx. Either goes directly or through a CONNECT tunnel of an
egress proxy, with TLS end to end inside it: a proxy that shows its own certificate is refused
by the pin like any other stranger.

The daemon's long poll and its reports each keep one connection open (per process, across
AuthorityClient objects: the daemon makes one per call), and its long poll asks for deltas
(agent/identity/delta.py): the client keeps the last document, applies what changed, checks
the result against the ETag, and hands the caller the whole document as before.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agent.errors import ClockSkewError, MeshagentError, RejectedError, TrustError, UnreachableError
from agent.logs import get_logger

from . import delta, transport
from .store import AuthorityRef
from .transport import DIRECT, ProxyConfig, Response, inspecting_proxy_hint

MAX_CLOCK_SKEW_S = 60.0
TIMEOUT_S = 10.0
# enroll and renew wait out a 503 (the authority's database restarting, a replica stopping) for
# this long, as its Retry-After says: a 503 never consumed the token. (A renewal is signed again
# for each attempt, enroll.renew: resent as it was, one the authority committed before its
# answer failed would be refused as replayed.)
UNAVAILABLE_RETRY_S = 15.0

log = get_logger("meshagent.identity")


def _verified_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.check_hostname = False  # see the module docstring: the pinned CA is the authority's own
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only to read the CA, which is then checked against the pin
    return ctx


# A gzip-encoded directory is inflated up to this: 10,000 hosts' directory is ~2 MB.
MAX_DIRECTORY_BYTES = 64 * 1024 * 1024


def _gunzipped(response: _Response) -> _Response:
    """The response with a `Content-Encoding: gzip` body decoded (zlib: the daemon imports no
    HTTP library); a body that does not inflate is the authority's bad answer."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    # (httpx, transport_httpx's, hands the body already decoded: JSON never starts with 1f 8b)
    if encoding != "gzip" or not response.body.startswith(b"\x1f\x8b"):
        return response
    inflater = zlib.decompressobj(wbits=31)  # (31: a gzip header and trailer)
    try:
        body = inflater.decompress(response.body, MAX_DIRECTORY_BYTES)
        complete = inflater.eof and not inflater.unconsumed_tail
    except zlib.error:
        complete = False
    if not complete:
        raise RejectedError(
            "the authority's directory is not a complete gzip stream"
            f" (or inflates past {MAX_DIRECTORY_BYTES // 2**20} MiB)",
            "check that the URL points at a meshagent authority, and any proxy in between",
            code="bad_response",
        )
    headers = {k: v for k, v in response.headers.items() if k != "content-encoding"}
    return _Response(response.status, body, headers)


class _Response(Response):
    def json(self) -> Any:
        return json.loads(self.body)


# A kept connection is reused when idle less than this, else replaced: the authority closes
# one idle for its idle_timeout (75 s, above the agents' 30 s report interval), and a reuse
# that races its close costs one retry.
KEEPALIVE_IDLE_S = 60.0


class _Stale(Exception):
    """A reused connection failed before any answer: the server closed it meanwhile."""


class KeptConnection:
    """One HTTPS connection to the authority kept open between requests, for one caller at a
    time (a lock): the daemon's long poll, or its reports. A transport.request in all else
    (arguments, errors): one TLS handshake per connection, not per request, for the authority
    as much as for the host (10,000 hosts reporting every 10 s were 1,000 handshakes a second)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPSConnection | None = None
        self._idle_since = 0.0
        self.opened = 0  # connections opened (for tests and diagnostics)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self,
        url: str,
        context: ssl.SSLContext,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float,
        proxy: ProxyConfig = DIRECT,
    ) -> Response:
        with self._lock:
            if self._conn is not None and time.monotonic() - self._idle_since > KEEPALIVE_IDLE_S:
                self._drop()
            reused = self._conn is not None
            try:
                return self._exchange(url, context, method, path, body, headers, timeout, proxy, reused)
            except _Stale:
                return self._exchange(url, context, method, path, body, headers, timeout, proxy, False)

    def _exchange(
        self,
        url: str,
        context: ssl.SSLContext,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float,
        proxy: ProxyConfig,
        reused: bool,
    ) -> Response:
        if self._conn is None:
            self._conn = _connect(url, context, timeout, proxy)
            self.opened += 1
        conn = self._conn
        try:
            assert conn.sock is not None
            conn.sock.settimeout(timeout)
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            content = response.read()
        except TimeoutError as exc:  # (a long poll held too long: not a stale connection)
            self._drop()
            raise transport.unreachable(url, exc) from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            if reused:
                raise _Stale from None
            raise transport.unreachable(url, exc) from None
        if response.will_close:
            self._drop()
        else:
            self._idle_since = time.monotonic()
        return Response(response.status, content, {k.lower(): v for k, v in response.getheaders()})


def _connect(
    url: str, context: ssl.SSLContext, timeout: float, proxy: ProxyConfig
) -> http.client.HTTPSConnection:
    """A connected, verified HTTPS connection to the authority (through the proxy `proxy`
    names for `url`, in a CONNECT tunnel): transport.request's connection, kept."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    via = proxy.for_url(url)
    try:
        if via is None:
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
            try:
                conn.connect()
            except ssl.SSLCertVerificationError:
                raise transport.not_the_authority(url, None) from None
            except OSError as exc:
                raise transport.unreachable(url, exc) from None
            return conn
        conn = http.client.HTTPSConnection(via.host, via.port, timeout=timeout, context=context)
        conn.set_tunnel(host, port, headers=via.authorization())
        try:
            conn.sock = socket.create_connection((via.host, via.port), timeout)
        except OSError as exc:
            raise transport.proxy_unreachable(via, url, str(exc) or exc.__class__.__name__) from None
        transport.open_tunnel(conn, via, url)  # (its CONNECT and the proxy's refusals)
        try:
            conn.sock = context.wrap_socket(conn.sock, server_hostname=host)
        except ssl.SSLCertVerificationError:
            raise transport.not_the_authority(url, via) from None
        except OSError as exc:
            raise transport.unreachable(url, exc) from None
        return conn
    except BaseException:
        with contextlib.suppress(Exception):
            conn.close()
        raise


# The daemon makes an AuthorityClient per call: what outlives them is kept here, per process.
_kept_lock = threading.Lock()
_kept: dict[tuple[str, str, ProxyConfig, str], KeptConnection] = {}


def kept_connection(url: str, pin: str, proxy: ProxyConfig, channel: str) -> KeptConnection:
    """The connection kept for `channel` ("directory", "report") to the authority at `url`."""
    with _kept_lock:
        return _kept.setdefault((url, pin, proxy, channel), KeptConnection())


def close_kept_connections() -> None:
    """Close every kept connection (tests; a process about to exit need not)."""
    with _kept_lock:
        kept = list(_kept.values())
        _kept.clear()
    for connection in kept:
        connection.close()


@dataclass
class _Held:
    """The directory last fetched from an authority: what its deltas apply to."""

    etag: str
    version: str
    doc: dict[str, Any]


# Documents held, by (authority URL, CA pin, ETag): the daemon's one (a document it also holds,
# so no copy), and room for a second (tests and tools fetching for two hosts in one process).
HELD_DOCUMENTS = 2
_held_lock = threading.Lock()
_held: OrderedDict[tuple[str, str, str], _Held] = OrderedDict()


RequestFn = Callable[
    [str, ssl.SSLContext, str, str, "bytes | None", dict[str, str], float, ProxyConfig], Response
]
"""transport.request (stdlib, the daemon's) or transport_httpx.request (enroll and renew)."""


def _request(
    url: str,
    context: ssl.SSLContext,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT_S,
    proxy: ProxyConfig = DIRECT,
    send: RequestFn = transport.request,
) -> _Response:
    """One HTTPS request; transport failures become UnreachableError / TrustError."""
    payload = None if body is None else json.dumps(body).encode()
    all_headers = {"Accept": "application/json", **(headers or {})}
    if payload is not None:
        all_headers["Content-Type"] = "application/json"
    r = send(url, context, method, path, payload, all_headers, timeout, proxy)
    return _Response(r.status, r.body, r.headers)


class AuthorityUnavailable(UnreachableError):
    """The authority answered 503 (its database away, or it is stopping): nothing was consumed,
    and the same call may be made again (exit code 5, like an authority out of reach)."""


def _refusal(response: _Response) -> MeshagentError:
    """The authority's error as an error value. A 503 (its database away, it is stopping) is
    "unreachable", not a refusal: nothing was consumed and the same call can simply be retried."""
    kind: type[MeshagentError] = AuthorityUnavailable if response.status == 503 else RejectedError
    try:
        doc = response.json()
        return kind(str(doc["message"]), str(doc.get("hint", "")), code=str(doc["code"]))
    except (ValueError, KeyError, TypeError):
        return RejectedError(
            f"the authority answered HTTP {response.status} without an error body",
            "check that the URL points at a meshagent authority",
            code="bad_response",
        )


def _retry_after(response: _Response) -> float:
    value = response.headers.get("retry-after", "")
    return float(min(int(value), 3600)) if value.isascii() and value.isdigit() and len(value) <= 6 else 0.0


def _directory_doc(response: _Response) -> dict[str, Any]:
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise RejectedError(
            "the authority's directory is not a JSON object",
            "check that the URL points at a meshagent authority",
            code="bad_response",
        )
    return doc


def check_clock(server_time: float, sent: float, received: float) -> float:
    """Skew (server minus local, seconds); raises if it is more than MAX_CLOCK_SKEW_S."""
    skew = server_time - (sent + received) / 2
    if abs(skew) > MAX_CLOCK_SKEW_S:
        direction = "behind" if skew > 0 else "ahead of"
        raise ClockSkewError(
            f"this host's clock is {abs(skew):.0f}s {direction} the authority's "
            f"(more than the {MAX_CLOCK_SKEW_S:.0f}s allowed)",
            "certificates would look not-yet-valid or expired: sync the clock "
            "(timedatectl set-ntp true, or chronyc makestep) and retry",
        )
    return skew


@dataclass(frozen=True)
class HostConfigFetch:
    """One read of the host's directory: `doc` and its `etag` (send it back to long poll), or
    `not_modified` (doc None) when the directory is still the one `etag` names.
    `retry_after_s`: the authority answered at once although asked to wait (its waiters are
    full): poll again no sooner than that. `delta`: `doc` was made from the document held and
    the authority's delta (checked against the ETag), not sent whole."""

    doc: dict[str, Any] | None
    etag: str | None
    not_modified: bool
    retry_after_s: float = 0.0
    delta: bool = False


class AuthorityClient:
    """`proxy`: how to reach the authority (transport.resolve_proxy; default: the environment's,
    HTTPS_PROXY / NO_PROXY). `send`: the transport (default the standard library's; enroll and
    renew pass httpx's)."""

    def __init__(
        self, ref: AuthorityRef, proxy: ProxyConfig | None = None, send: RequestFn = transport.request
    ) -> None:
        self.ref = ref
        self.proxy = transport.proxy_from_environment() if proxy is None else proxy
        self._send = send
        self._context = _verified_context(ref.ca_pem)

    def close(self) -> None:
        pass  # the kept connections (long poll, reports) outlive a client on purpose

    def __enter__(self) -> AuthorityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def discover(
        cls, url: str, pin: str, proxy: ProxyConfig | None = None, send: RequestFn = transport.request
    ) -> AuthorityClient:
        """Fetch the authority's CA, check it against `pin`, return a client that trusts only it
        (`proxy`, `send`: as for the constructor)."""
        from agent.identity.pki import load_certs, spki_pin  # enrollment only: the daemon never runs this

        proxy = transport.proxy_from_environment() if proxy is None else proxy
        sent = time.time()
        response = _request(url, _unverified_context(), "GET", "/v1/authority", proxy=proxy, send=send)
        received = time.time()
        if response.status != 200:
            raise _refusal(response)
        try:
            info = response.json()
            ca = load_certs(info["api_ca"].encode())[0]
        except Exception:
            raise TrustError(
                f"{url} did not answer like a meshagent authority", "check the URL in the token"
            ) from None
        if spki_pin(ca) != pin:
            raise TrustError(
                f"the authority at {url} has CA pin {spki_pin(ca)}, the token expects {pin}",
                inspecting_proxy_hint(url)
                if proxy.for_url(url)
                else "the token belongs to another authority, or something intercepts this "
                "connection: create a new token on the authority you mean to join",
            )
        # A skewed clock makes every certificate look not-yet-valid or expired: say so first,
        # rather than as a confusing verification failure.
        with contextlib.suppress(KeyError, TypeError, ValueError):
            check_clock(float(info["server_time"]), sent, received)
        client = cls(
            AuthorityRef(url, pin, info["api_ca"], str(info["trust_domain"]), str(info["mesh"])), proxy, send
        )
        # Prove the server holds the pinned CA's certificate (the CA itself is public), and
        # check the clocks agree before anything is signed.
        client.check_clock()
        return client

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = TIMEOUT_S,
        channel: str | None = None,
    ) -> _Response:
        """`channel`: the kept connection to use (with the standard library's transport)."""
        send = self._send
        if channel is not None and send is transport.request:
            send = kept_connection(self.ref.url, self.ref.ca_pin, self.proxy, channel).request
        return _request(self.ref.url, self._context, method, path, body, headers, timeout, self.proxy, send)

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        retry_unavailable_s: float = 0.0,
    ) -> dict[str, Any]:
        give_up = time.monotonic() + retry_unavailable_s
        response = self._request(method, path, body, headers)
        while response.status == 503 and time.monotonic() < give_up:
            pause = min(max(_retry_after(response), 0.5), 5.0, max(give_up - time.monotonic(), 0.0))
            log.warning("authority.unavailable", path=path, code=_refusal(response).code, retry_in_s=pause)
            time.sleep(pause)
            response = self._request(method, path, body, headers)
        if response.status != 200:
            raise _refusal(response)
        doc = response.json()
        assert isinstance(doc, dict)
        return doc

    def check_clock(self) -> float:
        sent = time.time()
        info = self._call("GET", "/v1/authority")
        return check_clock(float(info["server_time"]), sent, time.time())

    def enroll(
        self, token_secret: str, csr_pem: bytes, host_name: str, addresses: list[str]
    ) -> dict[str, Any]:
        return self._call(
            "POST",
            "/v1/enroll",
            {
                "token_secret": token_secret,
                "csr": csr_pem.decode(),
                "host_name": host_name,
                "addresses": addresses,
            },
            retry_unavailable_s=UNAVAILABLE_RETRY_S,
        )

    def host_config(self, api_token: str) -> dict[str, Any]:
        """The catalog and this host's policy, authorized by the host token from its last certificate."""
        return self._call("GET", "/v1/host/config", headers={"Authorization": f"Bearer {api_token}"})

    def fetch_host_config(
        self, api_token: str, etag: str | None = None, wait_s: float = 0
    ) -> HostConfigFetch:
        """The directory, or, given the `etag` of the one held and `wait_s` > 0, a long poll:
        the authority answers when the directory changes, or after `wait_s` (at most 60) with
        not_modified. Blocks up to wait_s plus the usual timeout.

        When `etag` is that of the document this process fetched last, it asks for a delta
        (agent/identity/delta.py) and returns the document the delta makes, checked against
        the new ETag; a delta that does not check out is dropped for a full fetch."""
        wait_s = round(max(0.0, min(float(wait_s), 60.0)), 3)
        path = f"/v1/host/config?wait={wait_s:g}" if wait_s else "/v1/host/config"
        # gzip: 10,000 hosts' directory is 1.9 MB, 121 KB gzipped, sent to every host on a change.
        headers = {"Authorization": f"Bearer {api_token}", "Accept-Encoding": "gzip"}
        held = None
        if etag:
            headers["If-None-Match"] = etag
            with _held_lock:
                held = _held.get((self.ref.url, self.ref.ca_pin, etag))
            if held is not None:
                headers["A-IM"] = delta.DELTA_IM
                headers[delta.BASE_HEADER] = held.version
        response = self._request(
            "GET", path, headers=headers, timeout=wait_s + TIMEOUT_S, channel="directory"
        )
        new_etag = response.headers.get("etag") or None
        if response.status == 304:
            return HostConfigFetch(None, new_etag or etag, True, _retry_after(response))
        if response.status == 226:
            doc = self._applied(held, response, new_etag)
            if doc is None:
                self._forget(etag)
                return self.fetch_host_config(api_token)  # the whole document, no delta
        elif response.status != 200:
            raise _refusal(_gunzipped(response))
        else:
            doc = _directory_doc(_gunzipped(response))
        self._forget(etag)  # (the caller moves on to the new document)
        version = response.headers.get(delta.VERSION_HEADER, "")
        if new_etag and delta.is_version(version):
            with _held_lock:
                _held[(self.ref.url, self.ref.ca_pin, new_etag)] = _Held(new_etag, version, doc)
                while len(_held) > HELD_DOCUMENTS:
                    _held.popitem(last=False)
        return HostConfigFetch(doc, new_etag, False, delta=response.status == 226)

    def _applied(self, held: _Held | None, response: _Response, etag: str | None) -> dict[str, Any] | None:
        """The document a 226's delta makes of `held`, if it checks out against `etag`."""
        reason = ""
        try:
            if held is None or etag is None:
                raise delta.DeltaError("a delta that was not asked for, or without an ETag")
            doc = delta.apply(held.doc, _gunzipped(response).json(), held.version)
            if delta.digest(doc) != etag.strip('"'):
                raise delta.DeltaError("the document it makes does not match the ETag")
            return doc
        except (ValueError, RejectedError) as exc:  # (DeltaError and JSON errors are ValueErrors)
            reason = str(exc)[:200]
        log.warning(
            "directory.delta_rejected",
            reason=reason,
            hint="fetching the whole directory instead; if this repeats, check the authority's version",
        )
        return None

    def _forget(self, etag: str | None) -> None:
        if etag:
            with _held_lock:
                _held.pop((self.ref.url, self.ref.ca_pin, etag), None)

    def send_report(self, api_token: str, doc: dict[str, Any]) -> None:
        """This host's health report (POST /v1/host/report); refusals raise RejectedError."""
        response = self._request(
            "POST", "/v1/host/report", doc, headers={"Authorization": f"Bearer {api_token}"}, channel="report"
        )
        if response.status not in (200, 204):
            raise _refusal(response)

    def renew(self, chain_pem: bytes, csr_pem: bytes, timestamp: int, signature: str) -> dict[str, Any]:
        return self._call(
            "POST",
            "/v1/renew",
            {
                "certificate_chain": chain_pem.decode(),
                "csr": csr_pem.decode(),
                "timestamp": timestamp,
                "signature": signature,
            },
        )
