# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The relay of a paired TLS/plaintext connection, in C: no Python frame per chunk.

relay.py's legs relay through asyncio transports and CPython's `ssl` objects: per chunk, a
protocol callback, MemoryBIO and SSLObject method calls, a bytes object per record and a
transport write, all in the interpreter. Once a plaintext leg and a TLS leg are paired (the
handshake is over, the identity checked), `NativePair` takes over their bytes: it reads each
socket itself (a duplicate of the transport's descriptor, watched with the loop's
`add_reader`), runs the TLS session's own `SSL*` with OpenSSL's functions, and writes the other
socket directly. The transports stay open, paused, and still own the connection's end: when
both directions are done, or on an error, `NativePair` closes them and the legs' usual
`connection_lost` does the bookkeeping (metrics, accounting, the proxy's connection set).

What it keeps of the legs' behaviour:
- `rx` counts on both legs, updated per chunk (the idle sweep and /metrics read them live);
- each leg's `tap` sees every chunk it read (HTTP accounting), as relay.py calls it;
- half-close: an EOF from the app becomes a TLS close_notify, a close_notify (or a FIN) from
  the peer becomes a FIN to the app; both directions ended, both sockets are closed;
- backpressure: a socket that will not take all of a write keeps the rest, and the side that
  feeds it stops reading until it drains (so at most one read's worth is ever held);
- a client leg's session ticket is taken from the first records, as `TlsLeg` does;
- an error (a reset, a bad record) aborts that leg and closes the other, with the errno the
  transport would have reported.

The `SSL*` and the memory BIOs come out of CPython's `_ssl` objects (their layout, not an API),
so `attach` checks them against each other first (the SSL's read and write BIOs must be the two
MemoryBIOs' own, and its app data the _ssl object itself, as CPython sets it) and takes nothing on
a Python other than 3.11; on a mismatch it returns None and the legs relay in Python as before.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memmove
from posix.unistd cimport close, read, write

import asyncio
import os
import sys

# The offsets below are CPython 3.11's _ssl structs (PySSLSocket: header, Socket, ssl;
# PySSLMemoryBIO: header, bio); another version relays in Python until they are checked there.
_LAYOUT_KNOWN = sys.version_info[:2] == (3, 11)


cdef extern from "<sys/socket.h>":
    int shutdown(int fd, int how)
    int SHUT_WR

cdef extern from "<openssl/ssl.h>":
    ctypedef struct SSL:
        pass
    ctypedef struct BIO:
        pass
    int SSL_read(SSL* ssl, void* buf, int num)
    int SSL_write(SSL* ssl, const void* buf, int num)
    int SSL_get_error(const SSL* ssl, int ret)
    int SSL_shutdown(SSL* ssl)
    int SSL_pending(const SSL* ssl)
    BIO* SSL_get_rbio(const SSL* ssl)
    BIO* SSL_get_wbio(const SSL* ssl)
    void* SSL_get_ex_data(const SSL* ssl, int idx)
    int SSL_ERROR_WANT_READ
    int SSL_ERROR_ZERO_RETURN

cdef extern from "<openssl/bio.h>":
    int BIO_read(BIO* b, void* data, int dlen)
    int BIO_write(BIO* b, const void* data, int dlen)
    size_t BIO_ctrl_pending(BIO* b)
    long BIO_ctrl(BIO* b, int cmd, long larg, void* parg)
    int BIO_C_SET_BUF_MEM_EOF_RETURN

cdef extern from "<openssl/err.h>":
    void ERR_clear_error()


cdef enum:
    RECORD = 16384  # one TLS record's plaintext at most
    SCRATCH = 65536  # one socket read: the app's bytes, or the peer's records
    OUT = SCRATCH + 4096  # one read's worth of plaintext, or of records (4 x 22 bytes of framing)


# One loop per thread and no thread releases the GIL here: a chunk is done with these before
# the next callback runs, so two buffers serve every pair.
cdef char _in[SCRATCH]
cdef char _out[OUT]


cdef struct Held:
    # Bytes a socket would not take yet, in order: `size` of them from `start`.
    char* data
    Py_ssize_t start
    Py_ssize_t size
    Py_ssize_t cap


cdef int held_add(Held* h, const char* p, Py_ssize_t n) except -1:
    cdef Py_ssize_t need
    cdef char* grown
    if h.start and h.start + h.size + n > h.cap:  # slide what is left to the front first
        memmove(h.data, h.data + h.start, h.size)
        h.start = 0
    need = h.start + h.size + n
    if need > h.cap:
        grown = <char*>realloc(h.data, need)
        if grown == NULL:
            raise MemoryError()
        h.data, h.cap = grown, need
    memcpy(h.data + h.start + h.size, p, n)
    h.size += n
    return 0


cdef void held_free(Held* h):
    free(h.data)
    h.data = NULL
    h.start = h.size = h.cap = 0


cdef inline void* _field(object obj, Py_ssize_t offset):
    # The pointer CPython's _ssl keeps `offset` bytes into the object (after its header).
    return (<void**>(<char*><void*>obj + offset))[0]


cdef Py_ssize_t HEADER = sizeof(Py_ssize_t) + sizeof(void*)  # PyObject_HEAD: refcount, type


cdef class NativePair:
    """One paired connection's relay: `plain` (a `Leg`) and `tls` (a `TlsLeg`)."""

    cdef SSL* ssl
    cdef BIO* rbio
    cdef BIO* wbio
    cdef int plain_fd
    cdef int tls_fd
    cdef object loop
    cdef readonly object plain
    cdef readonly object tls
    cdef object keep  # the _ssl objects whose SSL* and BIOs these are: alive until the end
    cdef Held to_plain
    cdef Held to_tls
    cdef bint plain_reading, tls_reading, plain_writing, tls_writing
    cdef bint fin_to_plain  # a FIN is owed to the app once `to_plain` drains
    cdef bint plain_ended, tls_ended  # the legs' read_eof, kept here too (read per chunk)
    cdef bint wants_ticket  # the TLS leg's on_ticket is set: look after each read
    cdef readonly bint done
    cdef object errors  # leg -> the OSError its transport would have reported

    def __cinit__(self) -> None:
        self.plain_fd = self.tls_fd = -1

    def __dealloc__(self) -> None:
        self._close_fds()
        held_free(&self.to_plain)
        held_free(&self.to_tls)

    cdef void _close_fds(self):
        if self.plain_fd >= 0:
            close(self.plain_fd)
            self.plain_fd = -1
        if self.tls_fd >= 0:
            close(self.tls_fd)
            self.tls_fd = -1

    # --- watching the sockets ------------------------------------------------------------

    cdef void _watch(self, bint plain_read, bint tls_read, bint plain_write, bint tls_write):
        """Make the loop's interest in the two descriptors exactly this."""
        if plain_read != self.plain_reading:
            if plain_read:
                self.loop.add_reader(self.plain_fd, self._on_plain)
            else:
                self.loop.remove_reader(self.plain_fd)
            self.plain_reading = plain_read
        if tls_read != self.tls_reading:
            if tls_read:
                self.loop.add_reader(self.tls_fd, self._on_tls)
            else:
                self.loop.remove_reader(self.tls_fd)
            self.tls_reading = tls_read
        if plain_write != self.plain_writing:
            if plain_write:
                self.loop.add_writer(self.plain_fd, self._on_plain_writable)
            else:
                self.loop.remove_writer(self.plain_fd)
            self.plain_writing = plain_write
        if tls_write != self.tls_writing:
            if tls_write:
                self.loop.add_writer(self.tls_fd, self._on_tls_writable)
            else:
                self.loop.remove_writer(self.tls_fd)
            self.tls_writing = tls_write

    cdef void _rewatch(self):
        """Read a side while it has not ended and what it feeds is not backed up; write a side
        while something waits for it."""
        self._watch(
            not self.plain_ended and self.to_tls.size == 0,
            not self.tls_ended and self.to_plain.size == 0,
            self.to_plain.size != 0,
            self.to_tls.size != 0,
        )

    # --- the two directions ----------------------------------------------------------------

    # Every entry from the loop fails closed: an exception (a tap's, say) would otherwise leave
    # the readers registered with a chunk lost, and the next one relayed: a hole in the stream.

    def _on_plain(self) -> None:
        try:
            self._read_plain()
        except Exception as exc:
            self._crashed(self.plain, exc)

    def _on_tls(self) -> None:
        try:
            self._read_tls()
        except Exception as exc:
            self._crashed(self.tls, exc)

    def _on_plain_writable(self) -> None:
        try:
            self._plain_writable()
        except Exception as exc:
            self._crashed(self.plain, exc)

    def _on_tls_writable(self) -> None:
        try:
            self._tls_writable()
        except Exception as exc:
            self._crashed(self.tls, exc)

    cdef void _crashed(self, object leg, object exc):
        """A callback raised: report it as the loop reports a callback's error, abort `leg`."""
        self.loop.call_exception_handler(
            {"message": "native relay: a callback failed; the connection is aborted", "exception": exc}
        )
        try:
            self._fail(leg, 0)
        except Exception:
            self._end()
            leg.abort()

    cdef void _read_plain(self):
        cdef Py_ssize_t n = read(self.plain_fd, _in, SCRATCH)
        if n > 0:
            self._from_plain(_in, n, True)
        elif n == 0:
            self._plain_ended()
        elif errno != EAGAIN and errno != EINTR:
            self._fail(self.plain, errno)

    cdef void _from_plain(self, const char* data, Py_ssize_t n, bint count):
        """Bytes the app sent: count (unless read before pairing: counted then), tap, encrypt,
        send to the peer."""
        plain = self.plain
        if count:
            plain.rx += n
        tap = plain.tap
        if tap is not None:
            try:
                tap(PyBytes_FromStringAndSize(data, n))
            except Exception as exc:
                plain.tap_failed(exc)
            if self.done:
                return
        ERR_clear_error()
        if SSL_write(self.ssl, data, <int>n) <= 0:
            self._fail(self.tls, 0)
            return
        self._send_records()

    cdef void _send_records(self):
        """Move what OpenSSL wrote into the write BIO to the TLS socket; keep what it will not
        take."""
        cdef int k
        cdef Py_ssize_t w
        while True:
            k = BIO_read(self.wbio, _out, OUT)
            if k <= 0:
                break
            if self.to_tls.size:
                held_add(&self.to_tls, _out, k)
                continue
            w = write(self.tls_fd, _out, k)
            if w < 0:
                if errno != EAGAIN and errno != EINTR:
                    self._fail(self.tls, errno)
                    return
                w = 0
            if w < k:
                held_add(&self.to_tls, _out + w, k - w)
        self._rewatch()

    cdef void _read_tls(self):
        cdef Py_ssize_t n = read(self.tls_fd, _in, SCRATCH)
        if n > 0:
            BIO_write(self.rbio, _in, <int>n)
            self._decrypt()
        elif n == 0:
            # A FIN without close_notify: the end of the stream after what was decrypted (as
            # TlsLeg: a ragged EOF).
            BIO_ctrl(self.rbio, BIO_C_SET_BUF_MEM_EOF_RETURN, 0, NULL)
            self._decrypt()
            if not self.done and not self.tls_ended:
                self._tls_ended()
        elif errno != EAGAIN and errno != EINTR:
            self._fail(self.tls, errno)

    cdef void _decrypt(self):
        """Decrypt every whole record in the read BIO and hand the plaintext to the app in one
        write; answer what the peer's records asked for (key updates); take a ticket."""
        cdef int k, err
        cdef Py_ssize_t total = 0
        cdef bint ended = False
        while True:
            ERR_clear_error()
            k = SSL_read(self.ssl, _out + total, RECORD)
            if k > 0:
                total += k
                if total > OUT - RECORD:
                    self._to_plain(_out, total, True)
                    total = 0
                    if self.done:
                        return
                continue
            err = SSL_get_error(self.ssl, k)
            if err == SSL_ERROR_ZERO_RETURN:
                ended = True
            elif err != SSL_ERROR_WANT_READ:
                self._fail(self.tls, 0)  # a bad record: abort, as TlsLeg does
                return
            break
        if total:
            self._to_plain(_out, total, True)
            if self.done:
                return
        if BIO_ctrl_pending(self.wbio):
            self._send_records()
            if self.done:
                return
        if self.wants_ticket:
            tls = self.tls
            if tls.on_ticket is not None:
                tls._take_ticket()
            self.wants_ticket = tls.on_ticket is not None
        if ended:
            self._tls_ended()
        else:
            self._rewatch()

    cdef void _to_plain(self, const char* data, Py_ssize_t n, bint count):
        """Plaintext from the peer: count (unless decrypted before pairing: counted then), tap,
        write to the app."""
        cdef Py_ssize_t w
        tls = self.tls
        if count:
            tls.rx += n
        tap = tls.tap
        if tap is not None:
            try:
                tap(PyBytes_FromStringAndSize(data, n))
            except Exception as exc:
                tls.tap_failed(exc)
            if self.done:
                return
        if self.to_plain.size:
            held_add(&self.to_plain, data, n)
            return
        w = write(self.plain_fd, data, n)
        if w < 0:
            if errno != EAGAIN and errno != EINTR:
                self._fail(self.plain, errno)
                return
            w = 0
        if w < n:
            held_add(&self.to_plain, data + w, n - w)

    # --- draining what was held ------------------------------------------------------------

    cdef void _plain_writable(self):
        if self._drain(&self.to_plain, self.plain_fd, self.plain) and self.fin_to_plain:
            self._fin_plain()
        if not self.done:
            self._rewatch()
            self._maybe_finish()

    cdef void _tls_writable(self):
        self._drain(&self.to_tls, self.tls_fd, self.tls)
        if not self.done:
            self._rewatch()
            self._maybe_finish()

    cdef bint _drain(self, Held* held, int fd, object leg):
        """Write what `held` keeps for `fd`; True once all of it is written."""
        cdef Py_ssize_t w = write(fd, held.data + held.start, held.size)
        if w < 0:
            if errno != EAGAIN and errno != EINTR:
                self._fail(leg, errno)
            return False
        held.start += w
        held.size -= w
        if held.size == 0:
            held_free(held)  # a burst's buffer is not kept for the connection's life
            return True
        return False

    # --- ends ------------------------------------------------------------------------------

    cdef void _plain_ended(self):
        """The app finished writing: a close_notify to the peer, which may still answer."""
        plain, tls = self.plain, self.tls
        plain.read_eof = self.plain_ended = True
        if not tls.write_eof_sent:
            tls.write_eof_sent = True
            ERR_clear_error()
            SSL_shutdown(self.ssl)
            self._send_records()
            if self.done:
                return
        self._rewatch()
        self._maybe_finish()

    cdef void _tls_ended(self):
        """The peer finished writing: a FIN to the app once what it sent is written."""
        self.tls.read_eof = self.tls_ended = True
        if self.to_plain.size:
            self.fin_to_plain = True
        else:
            self._fin_plain()
        self._rewatch()
        self._maybe_finish()

    cdef void _fin_plain(self):
        self.fin_to_plain = False
        plain = self.plain
        if not plain.write_eof_sent:
            plain.write_eof_sent = True
            shutdown(self.plain_fd, SHUT_WR)

    cdef void _maybe_finish(self):
        if (not self.done and self.plain_ended and self.tls_ended
                and self.to_plain.size == 0 and self.to_tls.size == 0):
            self._end()
            self.plain.close()
            self.tls.close()

    cdef void _fail(self, object leg, int code):
        """`leg`'s socket failed (`code` its errno; 0: a TLS error, which reports none): abort
        it and close the other."""
        if self.done:
            return
        if code:
            self.errors[leg] = OSError(code, os.strerror(code))
        other = self.tls if leg is self.plain else self.plain
        rest = self._held_for(other)
        self._end()
        leg.abort()
        if rest is not None:  # the other side still gets what it was owed, then its end
            other.transport.write(rest)
        other.close()

    cdef void _end(self):
        """Stop watching and let go of the duplicates; the transports close the sockets."""
        self.done = True
        self._watch(False, False, False, False)
        self._close_fds()

    @property
    def held(self) -> int:
        """Bytes read from one side that the other has not taken yet: backpressure keeps this
        to about one read."""
        return self.to_plain.size + self.to_tls.size

    cdef object _held_for(self, object leg):
        """The bytes held for `leg`'s socket, as bytes (None: nothing held)."""
        cdef Held* held = &self.to_plain if leg is self.plain else &self.to_tls
        if held.size == 0:
            return None
        return PyBytes_FromStringAndSize(held.data + held.start, held.size)

    # --- the legs' side --------------------------------------------------------------------

    def stop(self, leg: object, graceful: bool) -> None:
        """The proxy closes (`graceful`) or aborts `leg`: stop relaying now, before its transport
        acts (a revoked side gets no further byte). What is held for a side closed gracefully,
        and for the other side, goes to its transport, which sends it before it closes."""
        if self.done:
            return
        other = self.tls if leg is self.plain else self.plain
        for_leg = self._held_for(leg) if graceful else None
        for_other = self._held_for(other)
        self._end()
        if for_leg is not None:
            leg.transport.write(for_leg)
        if for_other is not None:
            other.transport.write(for_other)

    def lost(self, leg: object, exc: object) -> object:
        """`leg`'s transport closed (by us, by the proxy, or by its socket's error): stop, and
        say which error to report for it."""
        if not self.done:
            self._end()
        if exc is None:
            exc = self.errors.pop(leg, None)
        return exc

    def start(self) -> None:
        """Relay what the legs already hold (bytes read before pairing, records that came with
        the handshake's last flight), then watch both sockets."""
        try:
            self._start()
        except Exception as exc:
            self._crashed(self.plain, exc)

    cdef void _start(self):
        plain, tls = self.plain, self.tls
        for chunk in plain.early:
            self._from_plain(chunk, len(chunk), False)
            if self.done:
                return
        plain.early.clear()
        for chunk in tls.early:
            self._to_plain(chunk, len(chunk), False)
            if self.done:
                return
        tls.early.clear()
        if BIO_ctrl_pending(self.rbio) or SSL_pending(self.ssl):
            self._decrypt()
            if self.done:
                return
        if plain.read_eof:  # the app finished writing before pairing (a request, then EOF)
            self._plain_ended()
        else:
            self._rewatch()


def attach(plain: object, tls: object) -> NativePair | None:
    """Take over the relay of a freshly paired `plain` `Leg` and `TlsLeg`; None when this
    connection cannot be (a transport still writing, or _ssl's layout not the one expected):
    the caller then pairs the legs in Python."""
    cdef NativePair pair
    cdef SSL* ssl
    cdef BIO* rbio
    cdef BIO* wbio
    if plain.transport.get_write_buffer_size() or tls.transport.get_write_buffer_size():
        return None
    if tls.read_eof:  # (the peer's end before pairing: rare, left to the Python relay)
        return None
    if not _LAYOUT_KNOWN:
        return None
    ssl = <SSL*>_field(tls.raw, HEADER + sizeof(void*))  # PySSLSocket: header, Socket, ssl
    rbio = <BIO*>_field(tls.incoming, HEADER)  # PySSLMemoryBIO: header, bio
    wbio = <BIO*>_field(tls.outgoing, HEADER)
    if ssl == NULL or SSL_get_rbio(ssl) != rbio or SSL_get_wbio(ssl) != wbio:
        return None
    if SSL_get_ex_data(ssl, 0) != <void*>tls.raw:  # CPython's SSL_set_app_data(ssl, self)
        return None
    plain_sock = plain.transport.get_extra_info("socket")
    tls_sock = tls.transport.get_extra_info("socket")
    if plain_sock is None or tls_sock is None:
        return None
    pair = NativePair()
    pair.ssl, pair.rbio, pair.wbio = ssl, rbio, wbio
    pair.loop = asyncio.get_running_loop()
    pair.plain, pair.tls = plain, tls
    pair.keep = (tls.raw, tls.incoming, tls.outgoing)
    pair.errors = {}
    pair.wants_ticket = tls.on_ticket is not None
    try:
        pair.plain_fd = os.dup(plain_sock.fileno())
        pair.tls_fd = os.dup(tls_sock.fileno())
    except OSError:  # out of descriptors: the Python relay needs none more (dealloc closes one)
        return None
    plain.transport.pause_reading()  # from now on the transports only close the sockets
    tls.transport.pause_reading()
    return pair
