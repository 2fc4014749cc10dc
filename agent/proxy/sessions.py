"""Outbound TLS sessions kept for resumption: a bounded LRU, per process (per worker).

An entry is stored only once the server proved the expected identity and is not revoked
(listeners.py sets the capture after those checks), so a resumed connection starts from a
verified peer. The key is what the connection was made for: (address, port, expected SPIFFE ID,
transport-header port); the value the session (a private copy, offered without CPython's
costly one: session_offer.py), the client context it belongs to (OpenSSL
refuses a session from another context), and when it stops being offered: the server
certificate's notAfter or the ticket's lifetime, whichever comes first.

The cache is emptied when the revoked set changes and when our own credentials change
(`Proxy.credentials_changed`): no session outlives the decision it was made under.
"""

from __future__ import annotations

import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from .session_offer import KeptSession

MAX_SESSIONS: Final = 1024  # ~7 KB each (measured: 1,024 add 6.9 MB of RSS), so ~7 MB per worker at most

SessionKey = tuple[str, int, str, int | None]  # (ip, port, expected SPIFFE ID, header port)


@dataclass(frozen=True, slots=True)
class _Entry:
    session: KeptSession
    context: ssl.SSLContext
    not_after: float  # time.time()


class SessionCache:
    """At most `limit` sessions, least recently used dropped first."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self.limit = limit
        self._entries: OrderedDict[SessionKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: SessionKey, context: ssl.SSLContext, now: float | None = None) -> KeptSession | None:
        """The session to offer for `key` with `context`, or None (none, expired, or made
        with another context: dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.context is not context or entry.not_after <= (time.time() if now is None else now):
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.session

    def put(
        self,
        key: SessionKey,
        session: KeptSession,
        context: ssl.SSLContext,
        cert_not_after: float,
        now: float | None = None,
    ) -> None:
        """Keep `session` (it carries a ticket; `context` made it) until the server certificate
        or the ticket expires."""
        start = time.time() if now is None else now
        hint = session.ticket_lifetime_hint or session.timeout
        not_after = min(cert_not_after, start + hint)
        if not_after <= start:
            return
        self._entries[key] = _Entry(session, context, not_after)
        self._entries.move_to_end(key)
        if len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def drop(self, key: SessionKey) -> None:
        self._entries.pop(key, None)

    def clear(self) -> int:
        """Forget every session; returns how many there were."""
        count = len(self._entries)
        self._entries.clear()
        return count
