"""Where a captured connection was going: the kernel knows, the proxy never guesses.

- REDIRECT (NAT): conntrack keeps the pre-NAT destination; `getsockopt(SOL_IP, SO_ORIGINAL_DST)`
  returns it as a `sockaddr_in`, `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` as a
  `sockaddr_in6`. A dual-stack (`::`) listener accepting IPv4 has a v4-mapped local address;
  its conntrack entry is IPv4, so it is asked at SOL_IP.
- TPROXY (or a connection that was not redirected): the accepted socket's own address *is* the
  original destination. Conntrack may still know the connection (ENOENT only when it does not);
  its answer is then the same address.

`OriginalDst.via` says which, so the proxy can refuse a connection that was made straight to
its own listener (via="socket" and port == its own port) instead of looping to itself.
"""

from __future__ import annotations

import _socket
import errno
import socket
import struct
from dataclasses import dataclass
from typing import Any, Literal

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IP = 0
SOL_IPV6 = 41
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, addr, zero
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flowinfo, addr, scope id


@dataclass(frozen=True)
class OriginalDst:
    host: str
    port: int
    via: Literal["nat", "socket"]
    """nat: conntrack says the destination was rewritten (REDIRECT); socket: it was not (TPROXY, or
    a connection made straight to this socket), so the socket's own address is the answer."""

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _v4(raw: bytes) -> tuple[str, int]:
    port, addr = _SOCKADDR_IN.unpack(raw[: _SOCKADDR_IN.size])
    return socket.inet_ntop(socket.AF_INET, addr), port


def _v6(raw: bytes) -> tuple[str, int]:
    port, _flow, addr, _scope = _SOCKADDR_IN6.unpack(raw[: _SOCKADDR_IN6.size])
    return socket.inet_ntop(socket.AF_INET6, addr), port


def _unmapped(host: str) -> str:
    """A local address as conntrack knows it: an IPv4-mapped IPv6 address in its IPv4 form, and
    without a %zone (string work only: this runs for every accepted connection)."""
    host = host.partition("%")[0]
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def original_dst(sock: Any) -> OriginalDst:
    """The destination the client asked for, for an accepted TCP socket (a socket, or the
    event loop's stand-in for one: anything with `fileno()` and `family`)."""
    # One bare socket object on the same descriptor for both calls, detached after: uvloop's
    # stand-in makes (and detaches) a full Python socket for each call it forwards.
    fd = _socket.socket(sock.family, socket.SOCK_STREAM, 0, sock.fileno())
    try:
        return _ask(fd)
    finally:
        fd.detach()  # the descriptor is the caller's: never closed here


def _ask(sock: _socket.socket) -> OriginalDst:
    local = sock.getsockname()
    host, port = _unmapped(local[0]), int(local[1])
    try:
        if sock.family == socket.AF_INET or ":" not in host:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
            orig_host, orig_port = _v4(raw)
        else:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
            orig_host, orig_port = _v6(raw)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return OriginalDst(host, port, "socket")
    if orig_host == host and orig_port == port:
        return OriginalDst(host, port, "socket")
    return OriginalDst(orig_host, orig_port, "nat")
