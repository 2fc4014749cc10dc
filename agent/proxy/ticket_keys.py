"""One TLS session-ticket key shared by every worker's server context.

Stateless TLS 1.3 tickets are sealed with the server context's ticket key. OpenSSL makes a
random one per `SSLContext`, so with N workers behind SO_REUSEPORT a ticket would resume only on
the worker that issued it (~1/N of the time). Python has no API to set the key, so this calls
OpenSSL's `SSL_CTX_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, 80, key)` through ctypes, on the
`SSL_CTX*` that CPython's `PySSLContext` keeps right after the object header.

That layout is CPython's, not a promise: before any write the pointer is checked against the
context (the options OpenSSL reports must equal `ctx.options`, before and after flipping an
option from Python). If the check fails, the key is not set: the context keeps its own random
key (fewer resumptions across workers, nothing worse), and `tls.ticket_keys_unshared` is
logged once.
"""

from __future__ import annotations

import ctypes
import os
import platform
import ssl
from typing import Final

from agent.logs import get_logger

log = get_logger("meshagent.proxy.tls")

TICKET_KEY_BYTES: Final = 80  # 16 name + 32 HMAC + 32 AES (OpenSSL's tlsext_tick_* layout)
_SET_TICKET_KEYS: Final = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS (openssl/ssl.h)
_PROBE: Final = ssl.OP_CIPHER_SERVER_PREFERENCE  # flipped and restored by the check


def new_ticket_key() -> bytes:
    """A fresh random ticket key (the supervisor makes one per rotation and hands it out)."""
    return os.urandom(TICKET_KEY_BYTES)


def ticket_key_name(key: bytes | None) -> str:
    """The key's public name (the first 16 bytes, which tickets carry), short, for /status."""
    return key[:4].hex() if key else ""


class _OpenSSL:
    """`SSL_CTX_ctrl` and `SSL_CTX_get_options` from the libssl Python's `_ssl` is linked to."""

    def __init__(self) -> None:
        import _ssl

        # dlsym on _ssl's handle searches its dependencies: the same libssl, never another one.
        path = getattr(_ssl, "__file__", None)
        lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64


_openssl: _OpenSSL | None = None
_unshared_logged = False


def _ctx_pointer(lib: _OpenSSL, ctx: ssl.SSLContext) -> int | None:
    """The context's `SSL_CTX*`, or None when the layout is not the one expected."""
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        return None
    before = ctx.options
    if lib.get_options(ptr) != before:
        return None
    ctx.options = before ^ _PROBE  # a second, independent look: the write must show through
    try:
        seen = lib.get_options(ptr)
    finally:
        ctx.options = before
    if seen != ctx.options ^ _PROBE or lib.get_options(ptr) != ctx.options:
        return None
    return ptr


def ssl_ctx_pointer(ctx: ssl.SSLContext) -> tuple[int | None, str]:
    """The `SSL_CTX*` inside CPython's `ctx`, checked against what OpenSSL reports for it
    (`_ctx_pointer`); or None and why not. Also the verification cache's (verify_cache.pyx)."""
    global _openssl
    if not isinstance(ctx, ssl.SSLContext):  # the pointer read assumes _ssl._SSLContext's layout
        raise TypeError(f"not an SSLContext: {type(ctx).__name__}")
    if platform.python_implementation() != "CPython":
        return None, "not CPython"
    try:
        if _openssl is None:
            _openssl = _OpenSSL()
        ptr = _ctx_pointer(_openssl, ctx)
    except (OSError, AttributeError) as exc:  # no libssl symbols reachable
        return None, str(exc) or exc.__class__.__name__
    return ptr, "" if ptr is not None else "SSLContext layout not recognized"


def set_ticket_key(ctx: ssl.SSLContext, key: bytes) -> bool:
    """Make `ctx` seal and open tickets with `key` (only it: tickets under an older key get a
    full handshake). False, with the context's own key kept, when it cannot be done here."""
    if len(key) != TICKET_KEY_BYTES:
        raise ValueError(f"a ticket key is {TICKET_KEY_BYTES} bytes, not {len(key)}")
    ptr, reason = ssl_ctx_pointer(ctx)
    if ptr is not None and _openssl is not None:
        buf = ctypes.create_string_buffer(key, TICKET_KEY_BYTES)
        if _openssl.ctrl(ptr, _SET_TICKET_KEYS, TICKET_KEY_BYTES, buf) == 1:
            return True
        reason = "SSL_CTX_ctrl refused the key"
    _unshared(reason)
    return False


def _unshared(reason: str) -> None:
    global _unshared_logged
    if not _unshared_logged:
        _unshared_logged = True
        log.warning(
            "tls.ticket_keys_unshared",
            reason=reason,
            effect="each worker keeps its own ticket key: a ticket resumes only on its worker",
        )
