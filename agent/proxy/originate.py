"""One upstream connection, ready for bytes: connect, mTLS to the expected identity, verify,
revocation, resumption, transport header. No app, no pairing.

The L4 path (`listeners._outbound`) pairs the result with the app's leg; the HTTP routers' pools
(http_pool.py, h2_upstream.py) keep it and send requests over it. Every check the L4 path makes
is made here, once: a pooled upstream is as verified as a relayed one, and a revocation cuts it
(it is registered in `proxy.peers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agent.logs import get_logger

from .decisions import Originate, Passthrough
from .peer_certs import NO_CERT
from .relay import Leg, TlsLeg
from .revocation import PeerConnection
from .session_offer import KeptSession
from .sessions import SessionCache, SessionKey
from .tls import wrong_server
from .transport_header import ALPN, SessionProtocol, TransportHeader, encode

if TYPE_CHECKING:
    from .listeners import Proxy

log = get_logger("meshagent.proxy")

FailureKind = Literal["connect", "tls", "identity", "revoked", "alpn"]
OnClosed = Callable[[Leg, BaseException | None], None]


@dataclass
class Originated:
    """A connected upstream: `leg` is tracked by the proxy, paused until paired (or until its
    owner resumes reading), `tls_labels` its metric labels, `kind` the `opened` counter's name."""

    leg: Leg
    server_label: str | None
    serial: str | None
    tls_labels: str
    kind: Literal["passthrough", "mtls", "mtls_header"]


@dataclass
class Failed:
    """Why no upstream: `reason` a short sentence (logs, status), `kind` which step failed."""

    reason: str
    kind: FailureKind


async def originate(
    proxy: Proxy,
    action: Originate | Passthrough,
    dst: str,
    session_protocol: SessionProtocol | None = None,
    on_closed: OnClosed | None = None,
) -> Originated | Failed:
    """Connect for `action` (`dst`: the address the app dialled, for logs). `on_closed` replaces
    the proxy's close bookkeeping of the leg once connected (it must call `proxy._closed`).
    `session_protocol`: named in the transport header (a pooled HTTP upstream; L4 names none).
    A failure is counted, logged and returned; the leg, if any, is aborted."""
    if isinstance(action, Passthrough):
        try:
            upstream = await proxy.connect(action.target, Leg())
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or "timeout"
            proxy.stats.error("outbound_connect", dst=dst, reason=reason)
            return Failed(reason, "connect")
        if on_closed is not None:
            upstream.on_closed = on_closed
        return Originated(upstream, None, None, action.tls_labels, "passthrough")
    # An endpoint that expects the transport header: offer its ALPN, on its proxy port.
    header = action.header_port is not None
    context = proxy.credentials.client_opaque if header else proxy.credentials.client
    key: SessionKey | None = None
    session = None
    if proxy.settings.tls_resumption:
        key = (action.target[0], action.target[1], action.identity, action.header_port)
        session = proxy.sessions.get(key, context)
    tls = TlsLeg(context, server_side=False, server_hostname=action.server_name, session=session)
    connected = False
    try:
        await proxy.connect(action.target, tls)
        connected = True
        if on_closed is not None:  # from here its close runs the caller's bookkeeping
            tls.on_closed = on_closed
        failure = await handshake(tls, proxy.settings.handshake_timeout_s)
    except (OSError, TimeoutError) as exc:
        failure = exc.with_traceback(None)
    cert = proxy.peer_certs.lookup(tls.sslobj) if failure is None else NO_CERT
    wrong = wrong_server(cert.identity, action.identity) if failure is None else None
    serial = cert.serial
    matched = None
    if failure is None and wrong is None and proxy.revoked:
        matched = proxy.revoked.match(action.identity, serial)  # (the server proved action.identity)
    if session is not None and key is not None and (failure or wrong or matched):
        proxy.sessions.drop(key)  # not offered again: the next connection makes a full handshake
    if failure is not None:
        reason = tls_reason(failure)
        proxy.stats.error("outbound_tls", dst=dst, server_id=action.identity, reason=reason)
        proxy.tls_failed("outbound", failure)
        log.warning(
            "tls.handshake_failed", direction="outbound", dst=dst, server_id=action.identity, reason=reason
        )
        tls.abort()
        return Failed(reason, "tls" if connected else "connect")
    if wrong is not None:
        proxy.stats.error("outbound_identity", dst=dst, expected=action.identity, got=wrong)
        log.warning("tls.wrong_identity", dst=dst, expected=action.identity, got=wrong)
        tls.abort()
        return Failed(f"server is {wrong}, not {action.identity}", "identity")
    if matched is not None:
        proxy.refuse_revoked("outbound", matched, server_id=action.identity, serial=serial or "", dst=dst)
        tls.abort()
        return Failed(f"{action.identity} is revoked ({matched})", "revoked")
    if header:
        if tls.sslobj.selected_alpn_protocol() != ALPN:
            # It would read our header as the app's bytes: fail rather than corrupt the stream.
            proxy.refuse("outbound", "transport_alpn_not_selected", dst=dst, server_id=action.identity)
            tls.abort()
            return Failed("the endpoint did not select the transport header's ALPN", "alpn")
        assert action.header_port is not None
        tls.send(encode(TransportHeader(port=action.header_port, session_protocol=session_protocol)))
    if tls.sslobj.session_reused:
        proxy.tls_resumed("outbound")
    elif key is not None:  # verified and not revoked: its ticket may be kept
        tls.on_ticket = _keep_session(proxy.sessions, key, context, cert.not_after)
    server = cert.identity
    server_label = server.label if server is not None else None
    if not tls.closed:  # (else nothing would ever take it out again)
        label = server_label if server_label is not None else action.identity
        proxy.peers.add(tls, PeerConnection("outbound", action.identity, serial, label, dst))
    kind: Literal["mtls", "mtls_header"] = "mtls_header" if header else "mtls"
    return Originated(tls, server_label, serial, action.tls_labels(server_label), kind)


def _keep_session(
    sessions: SessionCache, key: SessionKey, context: ssl.SSLContext, cert_not_after: float
) -> Callable[[KeptSession], None]:
    """The capture a verified outbound leg calls once with its ticketed session (kept until
    `cert_not_after` at the latest: 0.0, a certificate without a date, is never kept)."""

    def keep(session: KeptSession) -> None:
        sessions.put(key, session, context, cert_not_after)

    return keep


async def handshake(tls: TlsLeg, deadline_s: float) -> BaseException | None:
    """Wait for `tls`'s handshake: None when done, else why it failed (a value, no traceback)."""
    if not tls.handshake_waiter.done():
        # The leg fails itself at the deadline: one timer, no wait_for task or shield per connection.
        timer = asyncio.get_running_loop().call_later(deadline_s, tls.time_out)
        try:
            await tls.handshake_waiter
        finally:
            timer.cancel()
    return tls.handshake_error


def tls_reason(exc: BaseException) -> str:
    """A short sentence for logs and status from an OpenSSL error or a timeout."""
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    text = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
    with contextlib.suppress(Exception):
        text = str(text).replace("_", " ").lower()
    return str(text) or exc.__class__.__name__
