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
        self.get0_session = lib.SSL_get_session  # (SSL_get0_session is a macro for it: no reference taken)
        self.get0_session.argtypes, self.get0_session.restype = [ctypes.c_void_p], ctypes.c_void_p
        self.session_has_ticket = lib.SSL_SESSION_has_ticket
        self.session_has_ticket.argtypes = [ctypes.c_void_p]
        self.session_has_ticket.restype = ctypes.c_int
        self.session_lifetime_hint = lib.SSL_SESSION_get_ticket_lifetime_hint
        self.session_lifetime_hint.argtypes = [ctypes.c_void_p]
        self.session_lifetime_hint.restype = ctypes.c_ulong
        self.session_timeout = lib.SSL_SESSION_get_timeout
        self.session_timeout.argtypes, self.session_timeout.restype = [ctypes.c_void_p], ctypes.c_long


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
    (0: not made); `session`, when there is one, is offered through CPython whenever the copy
    cannot be."""

    __slots__ = ("context", "private", "session", "ticket_lifetime_hint", "timeout")

    def __init__(self, session: ssl.SSLSession, context: ssl.SSLContext) -> None:
        self.context = context
        self.ticket_lifetime_hint = session.ticket_lifetime_hint
        self.timeout = session.timeout
        self.private = _private_copy(session, context)
        self.session: ssl.SSLSession | None = session  # CPython's way, when the copy cannot be offered

    @classmethod
    def _copied(cls, pointer: int, context: ssl.SSLContext) -> KeptSession | None:
        """Kept from a connection's own SSL_SESSION (no CPython object: see `ticketed`)."""
        assert _LIB is not None
        private = int(_LIB.session_dup(pointer) or 0)
        if not private:
            return None
        kept = cls.__new__(cls)
        kept.context, kept.private, kept.session = context, private, None
        kept.ticket_lifetime_hint = int(_LIB.session_lifetime_hint(private))
        kept.timeout = int(_LIB.session_timeout(private))
        return kept

    def __del__(self) -> None:
        if self.private and _LIB is not None:
            _LIB.session_free(self.private)
            self.private = 0

    def offer(self, sslobj: ssl.SSLObject) -> None:
        """Make `sslobj` (a client of `context`, before its handshake) offer this session."""
        if self.private and _offer_private(sslobj, self.private, self.context):
            return
        if self.session is not None:
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


def _ssl_pointer(sslobj: ssl.SSLObject, context: ssl.SSLContext) -> int:
    """`sslobj`'s SSL * when its layout checks out (made by `context`), else 0."""
    global _socket_layout
    if _LIB is None or _socket_layout is False:
        return 0
    sslsocket = sslobj._sslobj  # type: ignore[attr-defined]
    if _word(id(sslsocket) + _SOCKET_CTX) != id(context):  # (a word inside the object: safe to read)
        return 0
    ssl_ptr = _word(id(sslsocket) + _SOCKET_SSL)
    if _socket_layout is None:  # once: the SSL's SSL_CTX is the context's
        _socket_layout = bool(ssl_ptr) and _LIB.get_ssl_ctx(ssl_ptr) == _word(id(context) + _CONTEXT_CTX)
        if not _socket_layout:
            log.info("tls.session_offer_standard", reason="SSL_get_SSL_CTX does not match the context")
            return 0
    return ssl_ptr


def _offer_private(sslobj: ssl.SSLObject, private: int, context: ssl.SSLContext) -> bool:
    """SSL_set_session(sslobj's SSL, a copy of `private`); False when not possible."""
    ssl_ptr = _ssl_pointer(sslobj, context)
    if not ssl_ptr:
        return False
    assert _LIB is not None
    copy = _LIB.session_dup(private)  # this connection's own: its end cannot mark the kept one
    if not copy:
        return False
    try:
        return bool(_LIB.set_session(ssl_ptr, copy))  # (takes its own reference)
    finally:
        _LIB.session_free(copy)


def ticketed(sslobj: ssl.SSLObject) -> KeptSession | None:
    """The client connection's session, kept, once the server's ticket has arrived (None before,
    and when the server sends none). Read through its SSL_SESSION: CPython's `sslobj.session`
    getter copies by encoding and decoding too (~190 µs), and a connection may look after each of
    its first reads."""
    context = sslobj.context
    ssl_ptr = _ssl_pointer(sslobj, context)
    if not ssl_ptr:
        session = sslobj.session  # CPython's way
        return KeptSession(session, context) if session is not None and session.has_ticket else None
    assert _LIB is not None
    pointer = _LIB.get0_session(ssl_ptr)
    if not pointer or not _LIB.session_has_ticket(pointer):
        return None
    return KeptSession._copied(pointer, context)


def fast() -> bool | None:
    """Whether offers take the private-copy path (None: no offer made yet in this process)."""
    return _socket_layout
