"""Kept TLS client sessions, offered to new connections without CPython's costly copy.

CPython 3.11 copies a session before `SSL_set_session` by encoding it and decoding it again
(`_ssl_session_dup`): OpenSSL marks a session not resumable when a connection holding it ends
without close_notify, and the copy keeps the kept one clean. Decoding re-parses the server's
certificate, and OpenSSL 3.0 builds a decoder context for its public key each time: ~370 µs per
resumed connection on this machine, more than the resumption saves on the client side.

Here a kept session is a private `SSL_SESSION_dup` (references, no parse) that no connection
ever holds, so no connection's end can mark it; each offer gives the connection its own
`SSL_SESSION_dup` of it: a few µs. This goes through ctypes on the libssl that CPython's `_ssl`
is linked to, reading the `SSL *` and `SSL_SESSION *` out of CPython's objects. The object layout
is checked against facts CPython exposes before any pointer is followed, and anything that does
not match falls back to CPython's own `sslobj.session = session`: never a guess at memory.
"""

from __future__ import annotations

import ctypes
import ssl
from typing import Final

from agent.logs import get_logger

log = get_logger("meshagent.proxy.tls")

_PTR: Final = ctypes.sizeof(ctypes.c_void_p)
# CPython 3.11 Modules/_ssl.c: PySSLSocket {PyObject_HEAD; Socket; SSL *ssl; PySSLContext *ctx; ...},
# PySSLContext {PyObject_HEAD; SSL_CTX *ctx; ...}, PySSLSession {PyObject_HEAD; SSL_SESSION *session;
# PySSLContext *ctx}. PyObject_HEAD is two pointers.
_HEAD: Final = 2 * _PTR
_SOCKET_SSL: Final = _HEAD + _PTR
_SOCKET_CTX: Final = _HEAD + 2 * _PTR
_CONTEXT_CTX: Final = _HEAD
_SESSION_SESSION: Final = _HEAD
_SESSION_CTX: Final = _HEAD + _PTR


class _LibSsl:
    """The few libssl calls this needs, resolved through `_ssl`'s own handle (same library)."""

    def __init__(self) -> None:
        import _ssl  # the extension module: its dependencies include the libssl it uses

        lib = ctypes.CDLL(_ssl.__file__)
        self.get_ssl_ctx = lib.SSL_get_SSL_CTX
        self.get_ssl_ctx.argtypes, self.get_ssl_ctx.restype = [ctypes.c_void_p], ctypes.c_void_p
        self.session_get_id = lib.SSL_SESSION_get_id
        self.session_get_id.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
        self.session_get_id.restype = ctypes.c_void_p
        self.session_dup = lib.SSL_SESSION_dup
        self.session_dup.argtypes, self.session_dup.restype = [ctypes.c_void_p], ctypes.c_void_p
        self.session_free = lib.SSL_SESSION_free
        self.session_free.argtypes, self.session_free.restype = [ctypes.c_void_p], None
        self.set_session = lib.SSL_set_session
        self.set_session.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.set_session.restype = ctypes.c_int


def _word(address: int) -> int:
    return ctypes.c_void_p.from_address(address).value or 0


def _load() -> _LibSsl | None:
    try:
        return _LibSsl()
    except (OSError, AttributeError) as exc:
        log.info("tls.session_offer_standard", reason=str(exc))
        return None


_LIB: Final = _load()
_socket_layout: bool | None = None  # checked on the first offer


class KeptSession:
    """A verified server's session, kept for resumption. `private` is its own SSL_SESSION copy
    (0: not made); `session` is offered through CPython whenever the copy cannot be."""

    __slots__ = ("context", "private", "session", "ticket_lifetime_hint", "timeout")

    def __init__(self, session: ssl.SSLSession, context: ssl.SSLContext) -> None:
        self.context = context
        self.ticket_lifetime_hint = session.ticket_lifetime_hint
        self.timeout = session.timeout
        self.private = _private_copy(session, context)
        self.session = session  # CPython's way, when the private copy cannot be offered

    def __del__(self) -> None:
        if self.private and _LIB is not None:
            _LIB.session_free(self.private)
            self.private = 0

    def offer(self, sslobj: ssl.SSLObject) -> None:
        """Make `sslobj` (a client of `context`, before its handshake) offer this session."""
        if self.private and _offer_private(sslobj, self.private, self.context):
            return
        sslobj.session = self.session  # CPython's own way (the costly copy)


def _private_copy(session: ssl.SSLSession, context: ssl.SSLContext) -> int:
    """A new SSL_SESSION copied from `session`'s (0 when its layout does not check out)."""
    if _LIB is None or _word(id(session) + _SESSION_CTX) != id(context):
        return 0
    pointer = _word(id(session) + _SESSION_SESSION)
    length = ctypes.c_uint()
    raw = _LIB.session_get_id(pointer, ctypes.byref(length)) if pointer else None
    if not raw or ctypes.string_at(raw, length.value) != session.id:
        log.info("tls.session_offer_standard", reason="the session's id does not match")
        return 0
    return int(_LIB.session_dup(pointer) or 0)


def _offer_private(sslobj: ssl.SSLObject, private: int, context: ssl.SSLContext) -> bool:
    """SSL_set_session(sslobj's SSL, a copy of `private`); False when not possible."""
    global _socket_layout
    assert _LIB is not None
    sslsocket = sslobj._sslobj  # type: ignore[attr-defined]
    if _word(id(sslsocket) + _SOCKET_CTX) != id(context):  # (a word inside the object: safe to read)
        return False
    ssl_ptr = _word(id(sslsocket) + _SOCKET_SSL)
    if _socket_layout is None:  # once: the SSL's SSL_CTX is the context's
        _socket_layout = bool(ssl_ptr) and _LIB.get_ssl_ctx(ssl_ptr) == _word(id(context) + _CONTEXT_CTX)
        if not _socket_layout:
            log.info("tls.session_offer_standard", reason="SSL_get_SSL_CTX does not match the context")
    if not _socket_layout or not ssl_ptr:
        return False
    copy = _LIB.session_dup(private)  # this connection's own: its end cannot mark the kept one
    if not copy:
        return False
    try:
        return bool(_LIB.set_session(ssl_ptr, copy))  # (takes its own reference)
    finally:
        _LIB.session_free(copy)


def fast() -> bool | None:
    """Whether offers take the private-copy path (None: no offer made yet in this process)."""
    return _socket_layout
