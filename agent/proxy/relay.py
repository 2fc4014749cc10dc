"""The hot path: two legs of one proxied connection, relaying bytes with backpressure.

A `Leg` is an asyncio Protocol on one socket; `TlsLeg` runs TLS itself over memory BIOs
rather than asyncio's SSL transport because asyncio cannot half-close a TLS stream
(`can_write_eof()` is False): here an EOF on one side becomes a TLS 1.3 close_notify on the
other (which still reads), and a close_notify becomes a FIN, so request/response protocols
that shut down their write side work through the mesh.

Per chunk: one read, one write, one counter update. No logging, no lookups, no allocation
beyond the chunk itself: pairing binds each leg's `forward` to the other side's write (the
transport's own for a plaintext side), and a leg's written bytes are its peer's read bytes, so
only reads are counted. Backpressure: when one leg's transport buffer passes its high-water
mark, the other leg stops reading until it drains.

An L4 mTLS connection's plaintext and TLS legs are normally handed to the compiled relay once
paired (`relay_pair`, native_relay.pyx, `proxy.native_relay`); these legs still set it up, end it
and carry every other pair (routers, detectors, passthrough), and are its fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
from collections.abc import Callable
from typing import Any, cast

from .session_offer import KeptSession, ticketed

READ_SIZE = 16 * 1024  # one TLS record at most: a larger buffer is an mmap+munmap per read (glibc threshold)
WRITE_HIGH_WATER = 512 * 1024
# Reads of a client leg that look for the server's session ticket (TLS 1.3 sends it right after
# the handshake, so it comes with the first records); a server that sends none costs no more.
TICKET_READS = 4


def errno_name(exc: BaseException | None) -> str:
    """`ECONNRESET` for a reset, "" for a clean close (the tcp_close_total `errno` label)."""
    code = getattr(exc, "errno", None)
    return errno.errorcode.get(code, "") if isinstance(code, int) else ""


class Leg(asyncio.Protocol):
    """A plaintext side. `peer` is the other leg once the connection is paired."""

    __slots__ = (
        "accounting",
        "closed",
        "early",
        "forward",
        "metrics",
        "native",
        "on_closed",
        "peer",
        "read_eof",
        "rx",
        "tap",
        "transport",
        "tx_settled",
        "write_eof_sent",
    )

    def __init__(self, on_closed: Callable[[Leg, BaseException | None], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Leg | None = None
        self.forward: Callable[[bytes], object] | None = None  # the peer's sink, once paired
        self.rx = 0  # application bytes read from this side
        self.tx_settled = 0  # bytes written to this side, kept when the pair is undone
        self.read_eof = False
        self.write_eof_sent = False
        self.closed = False
        self.on_closed = on_closed
        self.early: list[bytes] = []  # bytes read before pairing
        # Telemetry, all optional: per-connection children (closed() at the end), a tap that
        # sees every chunk read from this side (protocol detection, HTTP accounting).
        self.metrics: Any = None
        self.tap: Callable[[bytes], object] | None = None
        self.accounting: Any = None
        # The compiled relay running this leg's bytes since pairing (native_relay.NativePair).
        self.native: Any = None

    @property
    def tx(self) -> int:
        """Application bytes written to this side: what the peer read (all of it is relayed)."""
        peer = self.peer
        return peer.rx if peer is not None else self.tx_settled

    # --- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.peer is None:
            transport.pause_reading()  # until paired: bytes wait in the kernel

    def data_received(self, data: bytes) -> None:
        self.rx += len(data)
        if self.tap is not None:
            try:
                self.tap(data)
            except Exception as exc:
                self.tap_failed(exc)
        forward = self.forward
        if forward is None:  # a read already in flight when reading was paused: keep it for pairing
            self.early.append(data)
            return
        forward(data)

    def eof_received(self) -> bool:
        self.read_eof = True
        if self.peer is not None:
            self.peer.send_eof()
            self._maybe_finish()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.native is not None:  # the compiled relay stops, and knows the socket's error
            exc = self.native.lost(self, exc)
        peer = self.peer
        if peer is not None:
            self.tx_settled = peer.rx
            if not peer.closed:
                peer.close()
        if self.metrics is not None:
            self.metrics.closed(self.rx, self.tx_settled, errno_name(exc))
        if self.accounting is not None:
            self.accounting.closed()
        if self.on_closed is not None:
            self.on_closed(self, exc)
        # Undo the pair's reference cycle (and the taps' closures) now: left to the cyclic
        # collector, closed connections' TLS state piled up to ~80 MB under connection churn.
        self.peer = self.forward = self.tap = self.accounting = self.metrics = self.native = None
        self.early.clear()

    def tap_failed(self, exc: Exception) -> None:
        """The tap (HTTP accounting's parser) refused these bytes: accounting decides what that
        means; the bytes are relayed all the same."""
        if self.accounting is None:
            raise exc
        self.accounting.failed(self, exc)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.read_eof:
            self.peer.transport.resume_reading()

    # --- called by the peer --------------------------------------------------------------

    def sink(self) -> Callable[[bytes], object]:
        """What the peer calls with bytes for this side: here the transport's own write."""
        return self.transport.write  # type: ignore[union-attr]

    def send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def send_many(self, chunks: list[bytes]) -> None:
        self.transport.writelines(chunks)  # type: ignore[union-attr]

    def send_eof(self) -> None:
        if self.write_eof_sent or self.transport is None or self.transport.is_closing():
            return
        self.write_eof_sent = True
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        if self.native is not None:  # the compiled relay stops first and hands over what it held
            self.native.stop(self, True)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # flushes what is buffered, then closes

    def abort(self) -> None:
        if self.native is not None:  # no byte relayed after this
            self.native.stop(self, False)
        if self.transport is not None:
            self.transport.abort()

    # --- pairing -------------------------------------------------------------------------

    def pair(self, other: Leg) -> None:
        """Join two legs and let bytes flow both ways."""
        self.peer, other.peer = other, self
        self.forward, other.forward = other.sink(), self.sink()
        self.start()
        other.start()

    def start(self) -> None:
        if self.early and self.forward is not None:
            for chunk in self.early:
                if self.tap is not None:
                    try:
                        self.tap(chunk)
                    except Exception as exc:
                        self.tap_failed(exc)
                self.forward(chunk)
            self.early.clear()
        if self.read_eof:  # the client finished writing before we were paired
            if self.peer is not None:
                self.peer.send_eof()
                self._maybe_finish()
        elif self.transport is not None:
            self.transport.resume_reading()

    def _maybe_finish(self) -> None:
        if self.read_eof and self.peer is not None and self.peer.read_eof:
            self.close()
            self.peer.close()


class TlsLeg(Leg):
    """A TLS side: TLS 1.3 over memory BIOs on a plain TCP transport."""

    __slots__ = (
        "handshake_error",
        "handshake_waiter",
        "incoming",
        "on_ticket",
        "outgoing",
        "raw",
        "sslobj",
        "ticket_reads",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None = None,
        on_closed: Callable[[Leg, BaseException | None], None] | None = None,
        session: KeptSession | None = None,
    ) -> None:
        super().__init__(on_closed)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # An ASCII name as bytes: CPython then skips its idna codec (~3 µs per connection).
        hostname: str | bytes | None = server_hostname
        if server_hostname and server_hostname.isascii():
            hostname = server_hostname.encode()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side, hostname)
        # The data path calls the C object itself: ssl.SSLObject's read/write/pending/do_handshake
        # are Python methods that only forward to it (one frame less per record; same errors).
        self.raw: Any = self.sslobj._sslobj  # type: ignore[attr-defined]
        if session is not None:
            session.offer(self.sslobj)  # (not wrap_bio's session=: it copies at ~370 µs)
        # Client side, set once the server's identity was checked: called once with the session
        # when the server's ticket has arrived (post-handshake, read with the first records).
        self.on_ticket: Callable[[KeptSession], object] | None = None
        self.ticket_reads = TICKET_READS
        self.handshake_waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.handshake_error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._handshake()  # the client's first flight; a server just waits for data

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if self.forward is not None:  # paired: the handshake is over
            self._read_records()
        elif not self.handshake_waiter.done():
            self._handshake()  # records after it wait in `incoming` until start()

    def eof_received(self) -> bool:
        # A FIN without close_notify: treat as end of stream (ragged EOF, common and harmless
        # for length-delimited protocols), after whatever was already decrypted.
        self.incoming.write_eof()
        if not self.handshake_waiter.done():
            self._fail(ConnectionResetError("peer closed during the TLS handshake"))
            return False
        if self.peer is not None:
            self._read_records()
        self._end_of_stream()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.handshake_waiter.done():
            self._fail(exc or ConnectionResetError("connection closed during the TLS handshake"))
        self.on_ticket = None
        super().connection_lost(exc)

    def _handshake(self) -> None:
        try:
            self.raw.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # send the alert, so the peer learns why
            self._fail(exc)
            return
        self._flush()
        if self.peer is None and self.transport is not None:
            self.transport.pause_reading()  # app data waits in the kernel until paired
        self.handshake_waiter.set_result(None)

    def time_out(self) -> None:
        """The handshake's deadline passed: fail it (a no-op once it is over)."""
        if not self.handshake_waiter.done():
            self._fail(TimeoutError("handshake timed out"))

    def _fail(self, exc: BaseException) -> None:
        """The handshake failed: `handshake_error` says why and the waiter completes. The error
        is a value, never raised at the waiter and kept without its traceback: a traceback's
        frames hold this leg, a cycle that kept each failed handshake's OpenSSL state (~130 KB)
        alive until the cyclic GC ran, so a flood of silent clients piled them up."""
        if self.handshake_error is None:
            self.handshake_error = exc.with_traceback(None)
            exc.__context__ = exc.__cause__ = None
        if not self.handshake_waiter.done():
            self.handshake_waiter.set_result(None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _read_records(self) -> None:
        peer = self.peer
        assert peer is not None
        sslobj, incoming = self.raw, self.incoming
        # One read of the socket carries up to 16 TLS records: decrypt them all, then hand them
        # to the peer in one write (one writev syscall instead of one send per record).
        chunks: list[bytes] = []
        eof = False
        try:
            while True:
                chunk = sslobj.read(READ_SIZE)
                if not chunk:
                    eof = True
                    break
                self.rx += len(chunk)
                if self.tap is not None:
                    try:
                        self.tap(chunk)
                    except Exception as exc:
                        self.tap_failed(exc)
                chunks.append(chunk)
                if not incoming.pending and not sslobj.pending():
                    break  # all consumed: skip the SSLWantReadError another read would raise
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify: the peer finished writing
            eof = True
        except ssl.SSLError:
            self.abort()
            return
        if len(chunks) == 1:
            self.forward(chunks[0])  # type: ignore[misc]
        elif chunks:
            peer.send_many(chunks)
        if eof:
            self._end_of_stream()
        if self.outgoing.pending:  # post-handshake messages (tickets, key updates)
            self._flush()
        if self.on_ticket is not None:  # the first reads only: then None for good
            self._take_ticket()

    def _take_ticket(self) -> None:
        kept = ticketed(self.sslobj)
        if kept is not None:
            on_ticket, self.on_ticket = self.on_ticket, None
            if on_ticket is not None:
                on_ticket(kept)
            return
        self.ticket_reads -= 1
        if self.ticket_reads <= 0:  # a server that sends no ticket: stop looking
            self.on_ticket = None

    def _end_of_stream(self) -> None:
        if self.read_eof:
            return
        self.read_eof = True
        if self.peer is not None:
            self.peer.send_eof()
            self._maybe_finish()

    def start(self) -> None:
        super().start()
        if self.incoming.pending or self.raw.pending():
            self._read_records()  # records that arrived with the handshake's last flight

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.transport is not None:
            self.transport.write(data)

    def sink(self) -> Callable[[bytes], object]:
        return self.send

    def send(self, data: bytes) -> None:
        self.raw.write(data)
        self.transport.write(self.outgoing.read())  # type: ignore[union-attr]

    def send_many(self, chunks: list[bytes]) -> None:
        write = self.raw.write
        for chunk in chunks:
            write(chunk)
        self.transport.write(self.outgoing.read())  # type: ignore[union-attr]

    def send_eof(self) -> None:
        if self.write_eof_sent or self.transport is None or self.transport.is_closing():
            return
        self.write_eof_sent = True
        with contextlib.suppress(ssl.SSLError):  # WantRead: close_notify sent, read side stays open
            self.sslobj.unwrap()
        self._flush()


def relay_pair(a: Leg, b: Leg, native: bool) -> None:
    """Pair `a` and `b`. With `native` (proxy.native_relay), a plaintext leg and a TLS leg are
    relayed by the compiled relay (native_relay.pyx) when it is built and can take them; any
    other pair, or one it cannot take, relays in Python (`Leg.pair`)."""
    if native and _native is not None:
        plain, tls = (b, a) if type(a) is TlsLeg else (a, b)
        if type(tls) is TlsLeg and _plain_relay(plain) and plain.transport and tls.transport:
            relay = _native.attach(plain, tls)
            if relay is not None:
                a.peer, b.peer = b, a
                plain.native = tls.native = relay
                relay.start()
                return
    a.pair(b)


def _plain_relay(leg: Leg) -> bool:
    """A plaintext leg whose bytes are Leg's to relay: not TLS, and no subclass's own data path
    (a router's, a detector's): an accepting leg that only overrides connection_made is one."""
    cls = type(leg)
    return (
        not isinstance(leg, TlsLeg)
        and cls.data_received is Leg.data_received
        and cls.eof_received is Leg.eof_received
        and cls.connection_lost is Leg.connection_lost
        and cls.sink is Leg.sink
    )


try:  # built by setup.py with the HTTP accounting; without a compiler, every pair is Python's
    from . import native_relay as _native
except ImportError:  # pragma: no cover - the build always makes it where the tests run
    _native = None  # type: ignore[assignment]


def relay_implementation(native: bool) -> str:
    """What relays L4 mTLS connections with `proxy.native_relay` = `native`: "native",
    "python", or "python (native not built)" when it was asked for but the extension is missing."""
    if not native:
        return "python"
    return "native" if _native is not None else "python (native not built)"
