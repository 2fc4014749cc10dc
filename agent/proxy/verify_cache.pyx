# cython: language_level=3, boundscheck=False, wraparound=False
"""A bounded cache of certificate-chain verifications, per TLS context (issue #19).

Every full handshake verifies the peer's chain (`X509_verify_cert`): for a mesh leaf and its
issuer, two ECDSA P-256 signature checks and the chain's building, about 116 µs on the bench
machine, on each side of every connection. A host talks to the same few peers over and over,
and their chains are the same bytes each time, so the answer is the same until a certificate in
the chain expires. This cache remembers successful verifications, as Chromium's certificate
verifier does (keyed by the chain and the name checked), and answers the next handshake with the
same chain from memory.

What a verification's answer depends on, and so what the key holds (SHA-256 over all of it):
- every certificate the peer sent, in order, as DER (the leaf first): one byte different is
  another chain;
- the names checked against the leaf (`check_hostname`'s host, an IP address, an e-mail), the host flags,
  the verification flags, depth and security level, and whether this end is the server (client
  certificates and server certificates are checked for different purposes);
- the trust store: the cache belongs to one `SSL_CTX`, and meshagent builds new contexts when
  the bundle changes (tls.py), so a new bundle starts with an empty cache.
A cached answer holds while the clock is inside the verified chain's validity (the trust anchor's
included): from its latest `notBefore` to its earliest `notAfter`; outside it, the chain is
verified again (and fails). Failures are never
cached. Contexts with a fixed verification time or CRL checks bypass the cache.

What is not skipped: parsing the certificates and the CertificateVerify signature, which proves
the peer holds the leaf's key on this connection. Revocation is meshagent's own check after the
handshake (listeners.py), as before.

The cache is a fixed table (`SLOTS` = 1,024 entries of 48 bytes, ~49 KB per context,
direct-mapped by the key; a newer chain replaces an older one in its slot), guarded by a mutex:
OpenSSL calls the verification from `do_handshake`, which CPython runs without the GIL.
"""

from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset, strlen
from libc.time cimport time, time_t

import ssl

from .ticket_keys import ssl_ctx_pointer


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* m, const void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)

cdef extern from "<openssl/x509.h>" nogil:
    ctypedef struct X509:
        pass
    ctypedef struct X509_STORE_CTX:
        pass
    ctypedef struct X509_VERIFY_PARAM:
        pass
    ctypedef struct ASN1_TIME:
        pass
    ctypedef struct OPENSSL_STACK:
        pass
    int X509_verify_cert(X509_STORE_CTX* ctx)
    X509* X509_STORE_CTX_get0_cert(const X509_STORE_CTX* ctx)
    OPENSSL_STACK* X509_STORE_CTX_get0_untrusted "(OPENSSL_STACK*)X509_STORE_CTX_get0_untrusted"(
        const X509_STORE_CTX* ctx
    )
    OPENSSL_STACK* X509_STORE_CTX_get0_chain "(OPENSSL_STACK*)X509_STORE_CTX_get0_chain"(
        const X509_STORE_CTX* ctx
    )
    X509_VERIFY_PARAM* X509_STORE_CTX_get0_param(const X509_STORE_CTX* ctx)
    void* X509_STORE_CTX_get_ex_data(const X509_STORE_CTX* ctx, int idx)
    char* X509_VERIFY_PARAM_get0_host(X509_VERIFY_PARAM* param, int idx)
    char* X509_VERIFY_PARAM_get1_ip_asc(X509_VERIFY_PARAM* param)
    char* X509_VERIFY_PARAM_get0_email(X509_VERIFY_PARAM* param)
    unsigned long X509_VERIFY_PARAM_get_flags(const X509_VERIFY_PARAM* param)
    unsigned int X509_VERIFY_PARAM_get_hostflags(const X509_VERIFY_PARAM* param)
    int X509_VERIFY_PARAM_get_depth(const X509_VERIFY_PARAM* param)
    int X509_VERIFY_PARAM_get_auth_level(const X509_VERIFY_PARAM* param)
    const ASN1_TIME* X509_get0_notBefore(const X509* x)
    const ASN1_TIME* X509_get0_notAfter(const X509* x)
    int i2d_X509(const X509* x, unsigned char** out)
    unsigned long X509_V_FLAG_USE_CHECK_TIME
    unsigned long X509_V_FLAG_CRL_CHECK
    unsigned long X509_V_FLAG_CRL_CHECK_ALL

cdef extern from "<openssl/stack.h>" nogil:
    int OPENSSL_sk_num(const OPENSSL_STACK* sk)
    void* OPENSSL_sk_value(const OPENSSL_STACK* sk, int i)

cdef extern from "<openssl/asn1.h>" nogil:
    int ASN1_TIME_diff(int* pday, int* psec, const ASN1_TIME* start, const ASN1_TIME* end)

cdef extern from "<openssl/crypto.h>" nogil:
    void OPENSSL_free(void* p)

cdef extern from "<openssl/err.h>" nogil:
    int ERR_set_mark()
    int ERR_pop_to_mark()

cdef extern from "<openssl/evp.h>" nogil:
    ctypedef struct EVP_MD:
        pass
    ctypedef struct EVP_MD_CTX:
        pass
    EVP_MD* EVP_MD_fetch(void* libctx, const char* algorithm, const char* properties)
    void EVP_MD_free(EVP_MD* md)
    EVP_MD_CTX* EVP_MD_CTX_new()
    void EVP_MD_CTX_free(EVP_MD_CTX* ctx)
    int EVP_DigestInit_ex(EVP_MD_CTX* ctx, const EVP_MD* md, void* impl)
    int EVP_DigestUpdate(EVP_MD_CTX* ctx, const void* d, size_t cnt)
    int EVP_DigestFinal_ex(EVP_MD_CTX* ctx, unsigned char* md, unsigned int* s)

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass
    ctypedef int (*verify_fn)(X509_STORE_CTX* ctx, void* arg) noexcept nogil
    void SSL_CTX_set_cert_verify_callback(SSL_CTX* ctx, verify_fn cb, void* arg)
    int SSL_CTX_get_verify_mode(const SSL_CTX* ctx)
    int SSL_get_ex_data_X509_STORE_CTX_idx()
    int SSL_is_server(const SSL* s)


cdef enum:
    SLOTS = 1024  # a power of two: the slot is the key's first bytes, masked
    KEY = 32  # SHA-256
    DER_MAX = 16384  # one certificate's DER; a larger one is verified, never cached


cdef struct Entry:
    unsigned char key[KEY]
    time_t since  # the chain's latest notBefore
    time_t expires  # its earliest notAfter; 0: empty


cdef struct Table:
    pthread_mutex_t lock
    EVP_MD* sha256
    Entry entries[SLOTS]
    unsigned long long hits
    unsigned long long misses  # verified (and cached, when it succeeded)
    unsigned long long bypassed  # verified without the cache (see _keyed)


cdef unsigned long _BYPASS = X509_V_FLAG_USE_CHECK_TIME | X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL


cdef int _update_str(EVP_MD_CTX* md, const char* s) noexcept nogil:
    # A string and its terminating NUL (so "a" + "bc" never hashes as "ab" + "c"); NULL as "".
    if s == NULL:
        return EVP_DigestUpdate(md, b"\0", 1)
    return EVP_DigestUpdate(md, s, strlen(s) + 1)


cdef int _keyed(Table* t, X509_STORE_CTX* sctx, unsigned char* key) noexcept nogil:
    """The cache key of this verification into `key`; 0 when it must not be cached."""
    cdef X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(sctx)
    cdef OPENSSL_STACK* sent = X509_STORE_CTX_get0_untrusted(sctx)
    cdef X509* leaf = X509_STORE_CTX_get0_cert(sctx)
    cdef SSL* ssl = <SSL*>X509_STORE_CTX_get_ex_data(sctx, SSL_get_ex_data_X509_STORE_CTX_idx())
    cdef unsigned long flags
    cdef unsigned long facts[5]
    cdef unsigned char der[DER_MAX]
    cdef unsigned char* out
    cdef X509* x
    cdef char* ip
    cdef char* host
    cdef int i, n, ok, length
    cdef unsigned int size = 0
    cdef EVP_MD_CTX* md
    if param == NULL or leaf == NULL or ssl == NULL:
        return 0
    flags = X509_VERIFY_PARAM_get_flags(param)
    if flags & _BYPASS:
        return 0
    md = EVP_MD_CTX_new()
    if md == NULL:
        return 0
    ok = EVP_DigestInit_ex(md, t.sha256, NULL)
    facts[0] = flags
    facts[1] = X509_VERIFY_PARAM_get_hostflags(param)
    facts[2] = <unsigned long>X509_VERIFY_PARAM_get_depth(param)
    facts[3] = <unsigned long>SSL_is_server(ssl)
    facts[4] = <unsigned long>X509_VERIFY_PARAM_get_auth_level(param)
    ok = ok and EVP_DigestUpdate(md, facts, sizeof(facts))
    i = 0
    while ok:  # every name the leaf may match (CPython sets one), then the end of the list
        host = X509_VERIFY_PARAM_get0_host(param, i)
        ok = _update_str(md, host)
        if host == NULL:
            break
        i += 1
    ok = ok and _update_str(md, X509_VERIFY_PARAM_get0_email(param))
    if ok:
        # No IP to check is the usual case, and OpenSSL queues an error for it: the next
        # caller of the queue (CPython's read) would take it for its own, so it goes.
        ERR_set_mark()
        ip = X509_VERIFY_PARAM_get1_ip_asc(param)
        ERR_pop_to_mark()
        ok = _update_str(md, ip)
        OPENSSL_free(ip)
    # The leaf, then every other certificate the peer sent (OpenSSL's list starts with the
    # leaf itself: hashed once).
    n = OPENSSL_sk_num(sent) if sent != NULL else 0
    i = -1
    while ok and i < n:
        x = leaf if i < 0 else <X509*>OPENSSL_sk_value(sent, i)
        i += 1
        if i > 0 and x == leaf:
            continue
        length = i2d_X509(x, NULL)
        if length <= 0 or length > DER_MAX:
            ok = 0
            break
        out = der
        ok = i2d_X509(x, &out) == length and EVP_DigestUpdate(md, der, length)
    ok = ok and EVP_DigestFinal_ex(md, key, &size) and size == KEY
    EVP_MD_CTX_free(md)
    return ok


cdef int _window(X509_STORE_CTX* sctx, time_t now, time_t* since, time_t* until) noexcept nogil:
    """When the chain just verified (its anchor included) is valid: from its latest notBefore
    to its earliest notAfter. 0: unknown (then nothing is cached)."""
    cdef OPENSSL_STACK* chain = X509_STORE_CTX_get0_chain(sctx)
    cdef X509* x
    cdef int i, days, secs
    cdef time_t t
    since[0] = until[0] = 0
    if chain == NULL or OPENSSL_sk_num(chain) == 0:
        return 0
    for i in range(OPENSSL_sk_num(chain)):
        x = <X509*>OPENSSL_sk_value(chain, i)
        if not ASN1_TIME_diff(&days, &secs, NULL, X509_get0_notBefore(x)):
            return 0
        t = now + <time_t>days * 86400 + secs
        if i == 0 or t > since[0]:
            since[0] = t
        if not ASN1_TIME_diff(&days, &secs, NULL, X509_get0_notAfter(x)):
            return 0
        t = now + <time_t>days * 86400 + secs
        if i == 0 or t < until[0]:
            until[0] = t
    return 1


cdef int _verify(X509_STORE_CTX* sctx, void* arg) noexcept nogil:
    """OpenSSL's certificate verification for contexts with the cache (SSL_CTX's
    cert_verify_callback): a remembered chain, or X509_verify_cert and remember a success."""
    cdef Table* t = <Table*>arg
    cdef unsigned char key[KEY]
    cdef Entry* slot
    cdef time_t now, since, until
    cdef unsigned int index
    cdef int hit, ok
    if not _keyed(t, sctx, key):
        pthread_mutex_lock(&t.lock)
        t.bypassed += 1
        pthread_mutex_unlock(&t.lock)
        return X509_verify_cert(sctx)
    now = time(NULL)
    memcpy(&index, key, sizeof(index))  # the key's first bytes pick the slot
    slot = &t.entries[index & (SLOTS - 1)]
    pthread_mutex_lock(&t.lock)
    # (A clock set back before a notBefore misses, and OpenSSL refuses the chain as it would.)
    hit = slot.since <= now < slot.expires and memcmp(slot.key, key, KEY) == 0
    if hit:
        t.hits += 1
    else:
        t.misses += 1
    pthread_mutex_unlock(&t.lock)
    if hit:
        return 1  # the store context's error stays X509_V_OK, as after a verification
    ok = X509_verify_cert(sctx)
    if ok == 1:
        if _window(sctx, now, &since, &until) and since <= now < until:
            pthread_mutex_lock(&t.lock)
            memcpy(slot.key, key, KEY)
            slot.since = since
            slot.expires = until
            pthread_mutex_unlock(&t.lock)
    return ok


cdef class VerifyCache:
    """One context's cache; alive as long as the context (`install` keeps it on the context)."""

    cdef Table* table

    def __cinit__(self) -> None:
        self.table = <Table*>malloc(sizeof(Table))
        if self.table == NULL:
            raise MemoryError()
        memset(self.table, 0, sizeof(Table))
        pthread_mutex_init(&self.table.lock, NULL)
        self.table.sha256 = EVP_MD_fetch(NULL, b"SHA256", NULL)
        if self.table.sha256 == NULL:
            raise RuntimeError("OpenSSL has no SHA256")

    def __dealloc__(self) -> None:
        if self.table != NULL:
            EVP_MD_free(self.table.sha256)
            pthread_mutex_destroy(&self.table.lock)
            free(self.table)
            self.table = NULL

    def stats(self) -> dict[str, int]:
        """hits, misses (verified in full), bypassed (not cacheable), entries (slots in use)."""
        cdef int i, used = 0
        cdef time_t now = time(NULL)
        cdef unsigned long long hits, misses, bypassed
        pthread_mutex_lock(&self.table.lock)  # (copied out: no Python object made under it)
        for i in range(SLOTS):
            if self.table.entries[i].expires > now:
                used += 1
        hits, misses, bypassed = self.table.hits, self.table.misses, self.table.bypassed
        pthread_mutex_unlock(&self.table.lock)
        return {"hits": hits, "misses": misses, "bypassed": bypassed, "entries": used, "slots": SLOTS}


ATTRIBUTE = "_meshagent_verify_cache"


def install(ctx: ssl.SSLContext) -> VerifyCache | None:
    """Give `ctx` a verification cache; None when this Python's `_ssl` layout is not the one
    checked (the context then verifies every chain, as before). Install before the context's
    first handshake; once per context."""
    cdef SSL_CTX* raw
    cdef VerifyCache cache
    if not isinstance(ctx, ssl.SSLContext):
        return None
    existing = getattr(ctx, ATTRIBUTE, None)
    if existing is not None:
        return existing
    ptr, _ = ssl_ctx_pointer(ctx)  # the layout check ticket_keys.py makes (options, read and written)
    if ptr is None:
        return None
    raw = <SSL_CTX*><uintptr_t>ptr
    if SSL_CTX_get_verify_mode(raw) != _openssl_verify_mode(ctx.verify_mode):  # and one more look
        return None
    cache = VerifyCache()
    setattr(ctx, ATTRIBUTE, cache)  # the context keeps the table its callback points into
    SSL_CTX_set_cert_verify_callback(raw, _verify, cache.table)
    return cache


def cache_of(ctx: ssl.SSLContext) -> VerifyCache | None:
    """The cache `install` gave `ctx`, if any."""
    return getattr(ctx, ATTRIBUTE, None)


def _openssl_verify_mode(mode: ssl.VerifyMode) -> int:
    # SSL_VERIFY_NONE 0, PEER 1, FAIL_IF_NO_PEER_CERT 2 (CPython: OPTIONAL = PEER, REQUIRED =
    # PEER | FAIL_IF_NO_PEER_CERT).
    if mode == ssl.CERT_NONE:
        return 0
    return 1 if mode == ssl.CERT_OPTIONAL else 3
