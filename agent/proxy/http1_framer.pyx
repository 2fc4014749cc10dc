# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: always_allow_keywords=False
"""HTTP/1.x request accounting, compiled: the same job as http1.py's `Http1Accounting` (which is
the fallback when this module was not built), at a small fraction of its per-request cost.

It watches the two byte streams of a connection as the relay forwards them and never changes
or holds them. It frames messages itself (request and status lines, Content-Length, chunked
transfer coding, bodiless responses: HEAD, 1xx, 204, 304, and bodies that run to the close)
without building any header object, and it keeps each exchange's result in C: per status code,
a count, the latency histogram's buckets and their sum. Nothing in Python runs per request.
`drain()` hands those totals to the sink (`HttpMetrics.add`); the connection's end drains, and
so do /metrics and the stat snapshots, through the live legs (`ProxyMetrics.settle`).

Latency is linkerd's `response_latency_ms`: from the end of a request's head to the first byte of
its response's body (the read that brings it), or to the end of the response when it has no body
bytes (HEAD, 204, 304, an empty Content-Length or chunked body, a 101), in whole milliseconds,
truncated: linkerd/http/metrics/src/requests/service.rs records it at the response body's first
frame, linkerd/metrics/src/latency.rs makes the Duration whole milliseconds, and those go into
the buckets and the sum. An exchange is still counted when its response ends: one cut short
after its head counts as no response (status 0), as before. Pipelined requests wait in a ring;
each response answers, and is timed from, the oldest. A CONNECT, an Upgrade request or a 101
response, bytes that are not HTTP/1, a head or chunk line over 64 KiB, or more than 64 requests
awaiting their responses end accounting for the connection (its bytes still flow).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.math cimport llround
from libc.string cimport memchr, memcmp, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from agent.telemetry.proxy_metrics import LATENCY_BOUNDS_MS


cdef extern from "<strings.h>":
    int strncasecmp(const char* a, const char* b, size_t n)


cdef enum:
    NBOUNDS = 25  # len(LATENCY_BOUNDS_MS); the bucket after them is +Inf
    PIPELINE = 64  # requests awaiting their responses, at most
    SLOTS = 4  # distinct status codes kept between two drains
    MAX_STASH = 65536  # a head or a line longer than this ends accounting


assert len(LATENCY_BOUNDS_MS) == NBOUNDS
cdef long long BOUNDS_MS[NBOUNDS]
for _i, _bound in enumerate(LATENCY_BOUNDS_MS):
    BOUNDS_MS[_i] = _bound


cdef enum Mode:
    HEAD  # reading a message head
    LENGTH  # `left` bytes of a Content-Length body to go
    CHUNK_SIZE  # a chunk-size line
    CHUNK_DATA  # `left` bytes of chunk data to go
    CHUNK_END  # the CRLF after chunk data
    TRAILERS  # trailer lines, up to an empty one
    UNTIL_CLOSE  # a body delimited by the connection's end
    OFF  # not counting this direction


cdef struct Stream:
    Mode mode
    long long left
    Py_ssize_t scanned  # how much of a stashed head was already searched for its end


cdef struct Framing:
    long long length  # Content-Length, -1 without one
    bint coded  # a Transfer-Encoding is present
    bint chunked  # ... and chunked is its last coding
    bint upgrade_field  # an Upgrade field
    bint connection_upgrade  # Connection: upgrade
    bint invalid


cdef struct Slot:
    int status
    long long count
    double sum_ms  # of whole milliseconds
    long long buckets[NBOUNDS + 1]


cdef class Http1Accounting:
    """Feed it `client(data)` and `server(data)` (or `attach` it to the relay's legs);
    `closed()` at the end. Results go to `sink.add(status, count, buckets, sum_ms)` on
    `drain()` (buckets None for status 0: no response came; latencies bucketed and summed in
    whole milliseconds, truncated, as linkerd's)."""

    cdef Stream req, resp
    cdef bytes req_stash, resp_stash  # the unfinished head or line at the end of the last read
    cdef long long started[PIPELINE]  # ring of requests awaiting their response: head's time (ns)
    cdef bint to_head[PIPELINE]  # ... and whether it was HEAD (its response has no body)
    cdef int first, waiting
    cdef int status  # of the response being read
    cdef long long answered  # ... when its first body byte came (ns), if `has_answered`
    cdef bint has_answered
    cdef Slot slots[SLOTS]
    cdef int nslots
    cdef readonly bint active
    cdef object sink, clock, legs

    def __cinit__(self, sink, clock=None):
        self.sink = sink
        self.clock = clock  # None: CLOCK_MONOTONIC (a test may pass its own)
        self.req_stash = self.resp_stash = b""
        self.active = True

    def attach(self, client, server):
        """Have the relay's legs feed this directly: `leg.tap` is the side's feed (C)."""
        self.legs = (client, server)
        client.accounting = server.accounting = self
        client.tap = self.client
        server.tap = self.server

    def client(self, bytes data not None):
        """Bytes from the client (requests)."""
        if self.req.mode != OFF:
            self._feed(&self.req, True, data)

    def server(self, bytes data not None):
        """Bytes from the server (responses)."""
        if self.resp.mode != OFF:
            self._feed(&self.resp, False, data)

    def failed(self, leg, exc):
        """The relay's hook for a tap that raised: these taps only raise what is a bug."""
        raise exc

    def closed(self):
        """The connection ended: a body that runs to the close is complete, requests still
        waiting never got a response (status 0). Then the totals go to the sink. Idempotent."""
        if self.active and self.resp.mode == UNTIL_CLOSE:
            self._complete(self.status)
        while self.waiting:
            self._complete(0)
        self._stop()
        self.drain()

    def drain(self):
        """Hand the totals kept since the last drain to the sink."""
        cdef Slot slot
        cdef int i, n = self.nslots
        cdef Slot kept[SLOTS]
        if n == 0:
            return
        kept = self.slots
        self.nslots = 0
        memset(self.slots, 0, sizeof(self.slots))
        for i in range(n):
            slot = kept[i]
            buckets = None if slot.status == 0 else [slot.buckets[j] for j in range(NBOUNDS + 1)]
            self.sink.add(slot.status, slot.count, buckets, slot.sum_ms)

    # --- framing ------------------------------------------------------------------------

    cdef int _feed(self, Stream* s, bint request, bytes data) except -1:
        cdef bytes stash = self.req_stash if request else self.resp_stash
        if PyBytes_GET_SIZE(stash):  # the read before ended inside a head or a line
            data = stash + data
            if request:
                self.req_stash = b""
            else:
                self.resp_stash = b""
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), pos = 0, used
        cdef const char* nl
        cdef Mode mode
        while pos < n:
            mode = s.mode
            if mode == HEAD:
                while pos < n and (p[pos] == c'\r' or p[pos] == c'\n'):
                    pos += 1  # empty lines before a message are allowed (RFC 9112, 2.2)
                if pos == n:
                    return 0
                used = head_length(p + pos, n - pos, s.scanned)
                s.scanned = 0
                if used < 0:
                    return self._stash(s, request, data, pos)
                if used > MAX_STASH:
                    self._stop()  # as if it had come in pieces
                    return 0
                if request:
                    self._request_head(p + pos, used)
                else:
                    self._response_head(p + pos, used)
                pos += used
            elif mode == LENGTH or mode == CHUNK_DATA:
                if not request and not self.has_answered:
                    self._answered()  # the response's first body byte: its latency ends here
                used = n - pos if s.left > n - pos else <Py_ssize_t>s.left
                s.left -= used
                pos += used
                if s.left == 0:
                    if mode == LENGTH:
                        self._message_done(s, request)
                    else:
                        s.mode = CHUNK_END
            elif mode == UNTIL_CLOSE:
                if not self.has_answered:  # (only responses run to the close)
                    self._answered()
                return 0
            elif mode == OFF:
                return 0
            else:  # CHUNK_SIZE, CHUNK_END, TRAILERS: a line at a time
                nl = <const char*>memchr(p + pos, c'\n', n - pos)
                if nl == NULL:
                    return self._stash(s, request, data, pos)
                used = nl - (p + pos) + 1
                self._line(s, request, p + pos, used)
                pos += used
        return 0

    cdef int _stash(self, Stream* s, bint request, bytes data, Py_ssize_t pos) except -1:
        cdef Py_ssize_t left = PyBytes_GET_SIZE(data) - pos
        if left > MAX_STASH:
            self._stop()
            return 0
        if s.mode == HEAD:
            s.scanned = left - 2 if left > 2 else 0  # the head's end is not in there
        rest = data[pos:]
        if request:
            self.req_stash = rest
        else:
            self.resp_stash = rest
        return 0

    cdef int _request_head(self, const char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t method = 0
        while method < n and is_tchar(p[method]):
            method += 1
        cdef const char* eol = <const char*>memchr(p, c'\n', n)
        cdef Py_ssize_t line = eol - p  # eol: there is one, the head ends with an empty line
        if line > 0 and p[line - 1] == c'\r':
            line -= 1
        if (
            method == 0
            or p[method] != c' '
            or line < method + 10
            or memcmp(p + line - 8, b"HTTP/1.", 7) != 0
        ):
            self._stop()  # not an HTTP/1 request line
            return 0
        if method == 7 and memcmp(p, b"CONNECT", 7) == 0:
            self._stop()  # a tunnel, not an exchange
            return 0
        cdef Framing f = read_fields(eol + 1, n - (eol + 1 - p))
        if f.invalid or (f.coded and not f.chunked) or self.waiting == PIPELINE:
            self._stop()
            return 0
        cdef int slot = (self.first + self.waiting) % PIPELINE
        self.started[slot] = self._now()
        self.to_head[slot] = method == 4 and memcmp(p, b"HEAD", 4) == 0
        self.waiting += 1
        if f.upgrade_field and f.connection_upgrade:
            # What the client sends next may not be HTTP: only the response is still read.
            self.req.mode = OFF
            self._retap()
        elif f.chunked:
            self.req.mode = CHUNK_SIZE
        elif f.length > 0:
            self.req.mode = LENGTH
            self.req.left = f.length
        return 0

    cdef int _response_head(self, const char* p, Py_ssize_t n) except -1:
        cdef int status, i
        if n < 13 or memcmp(p, b"HTTP/1.", 7) != 0 or not c'0' <= p[7] <= c'9' or p[8] != c' ':
            self._stop()  # the server does not speak HTTP/1
            return 0
        status = 0
        for i in range(9, 12):
            if not c'0' <= p[i] <= c'9':
                self._stop()
                return 0
            status = status * 10 + (p[i] - c'0')
        if p[12] != c' ' and p[12] != c'\r' and p[12] != c'\n':
            self._stop()  # not a three-digit status code
            return 0
        cdef const char* eol = <const char*>memchr(p, c'\n', n)
        cdef Framing f = read_fields(eol + 1, n - (eol + 1 - p))
        if f.invalid:
            self._stop()
            return 0
        self.status = status
        if status == 101:  # the connection is now another protocol: count this, then stop
            self._complete(status)
            self._stop()
        elif status < 200:
            pass  # interim (100 Continue, 103 Early Hints): the response follows
        elif status == 204 or status == 304 or (self.waiting and self.to_head[self.first]):
            self._complete(status)
        elif f.coded:
            self.resp.mode = CHUNK_SIZE if f.chunked else UNTIL_CLOSE
        elif f.length > 0:
            self.resp.mode = LENGTH
            self.resp.left = f.length
        elif f.length == 0:
            self._complete(status)
        else:
            self.resp.mode = UNTIL_CLOSE
        return 0

    cdef int _line(self, Stream* s, bint request, const char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t i = 0, start
        cdef long long size = 0
        cdef int digit
        cdef bint empty = n == 1 or (n == 2 and p[0] == c'\r')
        if s.mode == CHUNK_SIZE:
            while i < n - 1 and p[i] == c'0':
                i += 1  # leading zeros do not count against the size's length
            start = i
            while i < n:
                digit = hex_value(p[i])
                if digit < 0:
                    break
                size = size * 16 + digit
                i += 1
            if (
                i == 0
                or i - start > 15  # more than fits
                or not (p[i] == c';' or p[i] == c' ' or p[i] == c'\t' or p[i] == c'\r' or p[i] == c'\n')
            ):
                self._stop()  # not a chunk size (the line ends in LF: p[i] is inside it)
                return 0
            s.left = size
            s.mode = CHUNK_DATA if size else TRAILERS
        elif s.mode == CHUNK_END:
            if not empty:
                self._stop()
                return 0
            s.mode = CHUNK_SIZE
        elif empty:  # TRAILERS end with an empty line
            self._message_done(s, request)
        return 0

    cdef int _message_done(self, Stream* s, bint request) except -1:
        s.mode = HEAD
        if not request:
            self._complete(self.status)
        return 0

    # --- results ------------------------------------------------------------------------

    cdef int _answered(self) except -1:
        self.answered = self._now()
        self.has_answered = True
        return 0

    cdef int _complete(self, int status) except -1:
        """The oldest waiting request got its answer (status 0: none). Its latency ends at the
        response's first body byte, or now if it had none (linkerd records it at the body's first
        frame, which for a bodiless response is its end)."""
        cdef bint had_body = self.has_answered
        self.has_answered = False  # the next response starts afresh, whatever happens here
        if self.waiting == 0:
            return 0  # a response nobody asked for (a 408 before closing, say): not an exchange
        cdef long long started = self.started[self.first]
        self.first = (self.first + 1) % PIPELINE
        self.waiting -= 1
        cdef int i = 0
        while i < self.nslots and self.slots[i].status != status:
            i += 1
        if i == SLOTS:  # a fifth status code since the last drain: make room
            self.drain()
            i = 0
        if i == self.nslots:
            self.nslots += 1
            self.slots[i].status = status
        cdef Slot* slot = &self.slots[i]
        slot.count += 1
        if status == 0:
            return 0
        cdef long long elapsed = (self.answered if had_body else self._now()) - started
        # Whole milliseconds, truncated, as linkerd's `Ms` into u64 (saturating at zero).
        cdef long long ms = elapsed // 1000000 if elapsed > 0 else 0
        cdef int bucket = 0
        while bucket < NBOUNDS and BOUNDS_MS[bucket] < ms:
            bucket += 1
        slot.buckets[bucket] += 1
        slot.sum_ms += ms
        return 0

    cdef long long _now(self) except? -1:
        """Monotonic time in nanoseconds (a test's clock gives seconds)."""
        cdef timespec ts
        if self.clock is not None:
            return llround(self.clock() * 1e9)
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return ts.tv_sec * 1000000000LL + ts.tv_nsec

    cdef int _stop(self) except -1:
        self.req.mode = self.resp.mode = OFF
        self.active = False
        self.req_stash = self.resp_stash = b""
        self._retap()
        self.legs = None  # no cycle through the legs' taps
        return 0

    cdef int _retap(self) except -1:
        """Point the legs' taps at what still reads their bytes (nothing, once off)."""
        if self.legs is None:
            return 0
        client, server = self.legs
        client.tap = self.client if self.req.mode != OFF else None
        server.tap = self.server if self.resp.mode != OFF else None
        return 0


cdef Py_ssize_t head_length(const char* p, Py_ssize_t n, Py_ssize_t start) noexcept:
    """Bytes up to and including the empty line that ends a head (CRLF CRLF, or a bare LF on
    either side, as servers tolerate); -1 if it is not in `p`."""
    cdef Py_ssize_t i = start
    cdef const char* lf
    while i + 1 < n:
        lf = <const char*>memchr(p + i, c'\n', n - 1 - i)
        if lf == NULL:
            return -1
        i = lf - p
        if lf[1] == c'\n':
            return i + 2
        if lf[1] == c'\r' and i + 2 < n and lf[2] == c'\n':
            return i + 3
        i += 1
    return -1


cdef Framing read_fields(const char* p, Py_ssize_t n) noexcept:
    """The fields that frame a message, from the lines of a head after its first."""
    cdef Framing f
    f.length = -1
    f.coded = f.chunked = f.upgrade_field = f.connection_upgrade = f.invalid = False
    cdef Py_ssize_t pos = 0, end, name, value, value_end
    cdef const char* eol
    cdef const char* colon
    cdef long long length
    while pos < n:
        eol = <const char*>memchr(p + pos, c'\n', n - pos)
        end = eol - p if eol != NULL else n
        value_end = end
        if value_end > pos and p[value_end - 1] == c'\r':
            value_end -= 1
        if value_end == pos:
            break  # the empty line: end of the head
        colon = <const char*>memchr(p + pos, c':', value_end - pos)
        if colon != NULL:
            name = colon - (p + pos)
            if name == 0 or p[pos + name - 1] == c' ' or p[pos + name - 1] == c'\t':
                f.invalid = True  # RFC 9112, 5.1: no whitespace between name and colon
                break
            value = colon - p + 1
            while value < value_end and (p[value] == c' ' or p[value] == c'\t'):
                value += 1
            while value_end > value and (p[value_end - 1] == c' ' or p[value_end - 1] == c'\t'):
                value_end -= 1
            if name == 14 and strncasecmp(p + pos, b"content-length", 14) == 0:
                length = parse_length(p + value, value_end - value)
                if length < 0 or (f.length >= 0 and f.length != length):
                    f.invalid = True
                f.length = length
            elif name == 17 and strncasecmp(p + pos, b"transfer-encoding", 17) == 0:
                f.coded = True
                f.chunked = (  # chunked must be the last coding, as a whole token
                    value_end - value >= 7
                    and strncasecmp(p + value_end - 7, b"chunked", 7) == 0
                    and (value_end - value == 7 or is_separator(p[value_end - 8]))
                )
            elif name == 10 and strncasecmp(p + pos, b"connection", 10) == 0:
                f.connection_upgrade = f.connection_upgrade or contains_upgrade(p + value, value_end - value)
            elif name == 7 and strncasecmp(p + pos, b"upgrade", 7) == 0:
                f.upgrade_field = True
        pos = end + 1
    return f


cdef long long parse_length(const char* p, Py_ssize_t n) noexcept:
    """A Content-Length value; -1 if it is not one (or over 18 digits)."""
    cdef long long value = 0
    cdef Py_ssize_t i
    if n == 0 or n > 18:
        return -1
    for i in range(n):
        if not c'0' <= p[i] <= c'9':
            return -1
        value = value * 10 + (p[i] - c'0')
    return value


cdef bint contains_upgrade(const char* p, Py_ssize_t n) noexcept:
    """Whether a Connection value lists the token `upgrade`."""
    cdef Py_ssize_t i
    for i in range(n - 6):
        if (
            strncasecmp(p + i, b"upgrade", 7) == 0
            and (i == 0 or is_separator(p[i - 1]))
            and (i + 7 == n or is_separator(p[i + 7]))
        ):
            return True
    return False


cdef bint is_separator(char c) noexcept:
    return c == c',' or c == c' ' or c == c'\t'


cdef bint is_tchar(char c) noexcept:
    """A character of a method token (RFC 9110, 5.6.2)."""
    if c'A' <= c <= c'Z' or c'a' <= c <= c'z' or c'0' <= c <= c'9':
        return True
    return c != 0 and memchr(b"!#$%&'*+-.^_`|~", c, 15) != NULL


cdef int hex_value(char c) noexcept:
    if c'0' <= c <= c'9':
        return c - c'0'
    if c'a' <= c <= c'f':
        return c - c'a' + 10
    if c'A' <= c <= c'F':
        return c - c'A' + 10
    return -1
