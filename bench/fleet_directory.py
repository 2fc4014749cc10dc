"""The simulated agents' directories: kept and updated by deltas as the agent does
(agent/identity/delta.py: A-IM on the long poll, apply, check the result against the ETag),
with the parts every host shares held once per version per process.

A real agent holds one document of ~2 MB at 10,000 hosts and checks a delta's result by
hashing it whole. 10,000 simulated agents cannot each hold and hash their own (20 GB, and
tens of CPU-seconds a change), and need not: the shared members (catalog, revoked, services,
discovery, trust bundle) are the same for every host at a version. So `Directories` keeps them
once per version, parsed and as canonical JSON, plus the sha256 state after the catalog (the
first key of the canonical document: as the authority's cache does); an agent keeps its own
members (host_id, policy, generated_at) and its version. A delta is applied to the shared
members once per (base, version) pair per process; each agent's check is the cached hash
state, copied, fed the rest of its document: the same digest as `delta.digest`, byte for byte.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from agent.identity import delta as wire


@dataclass
class Shared:
    """The shared members at one version: parsed, canonical JSON, and whether the revoked
    host (the simulator's victim) is still in them."""

    members: dict[str, Any]
    canon: dict[str, bytes]
    after_catalog: Any  # hashlib sha256 state after '{"catalog":<catalog>' (None: no catalog)
    names_victim: bool


@dataclass
class Held:
    """What one agent holds: its version, its ETag and its own members."""

    version: str = ""
    etag: str = ""
    own: dict[str, Any] = field(default_factory=dict)


class Directories:
    def __init__(self, victim_entry: bytes = b"") -> None:
        self.victim_entry = victim_entry
        self.shared: dict[str, Shared] = {}
        self.applied: dict[tuple[str, str], str] = {}  # (base, version) -> version, once applied
        self.rejected = 0  # deltas whose result did not match the ETag
        self.parsed = {"whole": 0, "after_catalog": 0}  # full documents, by how they were read

    def _intern(self, version: str, doc: dict[str, Any]) -> None:
        if version in self.shared:
            return
        members = {k: doc[k] for k in wire.SHARED_MEMBERS if k in doc}
        canon = {k: wire.canonical_json(v) for k, v in members.items()}
        state = None
        if "catalog" in canon:
            state = hashlib.sha256(b'{"catalog":' + canon["catalog"])
        names = bool(self.victim_entry) and self.victim_entry in canon.get("catalog", b"")
        self.shared[version] = Shared(members, canon, state, names)
        gc.freeze()  # (hundreds of thousands of objects the collector need not walk again)
        while len(self.shared) > 16:  # (versions the fleet no longer holds)
            self.shared.pop(next(iter(self.shared)))

    def full(self, held: Held, body: bytes, etag: str, version: str) -> None:
        """A 200: the whole document. When its version's catalog is interned already and the
        body starts with it (the authority sends canonical JSON), only the rest is parsed: a
        catalog is ~2 MB at 10,000 hosts, 10,000 agents' first fetches would parse 20 GB."""
        shared = self.shared.get(version)
        prefix = b'{"catalog":' + shared.canon["catalog"] if shared and "catalog" in shared.canon else b""
        if prefix and body.startswith(prefix) and body[len(prefix) : len(prefix) + 1] == b",":
            doc = json.loads(b"{" + body[len(prefix) + 1 :])
            self.parsed["after_catalog"] += 1
        else:
            doc = json.loads(body)
            self.parsed["whole"] += 1
            if wire.is_version(version):
                self._intern(version, doc)
        held.own = {k: v for k, v in doc.items() if k not in wire.SHARED_MEMBERS}
        held.version, held.etag = version, etag

    def apply(self, held: Held, body: bytes, etag: str) -> bool:
        """A 226: apply the delta to what `held` holds, check its digest against `etag`;
        False (and nothing changed) when it does not check out: then fetch in full."""
        base = self.shared.get(held.version)
        if base is None:
            return False
        try:
            delta = json.loads(body)
            new_version = delta["version"]
            if new_version not in self.shared:
                self._intern(new_version, wire.apply(base.members, _shared_only(delta), held.version))
            own = {
                **held.own,
                **{k: v for k, v in delta.get("set", {}).items() if k not in wire.SHARED_MEMBERS},
            }
        except (wire.DeltaError, ValueError, KeyError, TypeError):
            self.rejected += 1
            return False
        if self.digest(new_version, own) != etag.strip('"'):
            self.rejected += 1
            return False
        held.version, held.etag, held.own = new_version, etag, own
        return True

    def digest(self, version: str, own: dict[str, Any]) -> str:
        """`delta.digest` of the document {shared at version} + own, from the cached state."""
        shared = self.shared[version]
        members = {
            **shared.canon,
            **{k: wire.canonical_json(v) for k, v in own.items() if k != "generated_at"},
        }
        names = sorted(members)
        cached = shared.after_catalog is not None and names[:1] == ["catalog"]
        h = shared.after_catalog.copy() if cached else hashlib.sha256(b"{")
        for i, name in enumerate(names[1:] if cached else names):
            h.update((b"," if cached or i else b"") + json.dumps(name).encode() + b":" + members[name])
        h.update(b"}")
        return h.hexdigest()

    def names_victim(self, held: Held) -> bool:
        shared = self.shared.get(held.version)
        return shared is None or shared.names_victim


def _shared_only(delta: dict[str, Any]) -> dict[str, Any]:
    """The delta without the host's own members (they are applied per agent)."""
    sets = {k: v for k, v in delta.get("set", {}).items() if k in wire.SHARED_MEMBERS}
    return {**delta, "set": sets}


_SYNC_MARK = b"\x00\x00\xff\xff"  # what ends a sync-flushed deflate piece


class Gunzip:
    """A directory's gzip body decoded, reusing the decoded bytes of the last body this process
    decoded in full. The authority deflates each shared piece (the catalog: ~2 MB at 10,000
    hosts, 121 KB deflated) once per version, independently of what comes before, and ends it
    with a sync flush (service.py `_deflated`): every host's body at a version starts with the
    same compressed bytes. Only what follows the last piece boundary they share is inflated
    here; the gzip trailer's CRC-32 and size, continued from the shared part's, prove the
    result (otherwise the whole body is inflated). A shard's 5,000 first fetches at 10,000
    hosts otherwise inflated 10 GB: ~5 ms each, the simulator's own limit on the prime."""

    def __init__(self) -> None:
        self.ref = b""  # the last body inflated in full, and what it inflated to
        self.ref_decoded = b""
        self.cuts: dict[int, tuple[int, int]] = {}  # compressed offset -> (decoded length, its crc)
        self.reused = 0

    def decode(self, body: bytes) -> bytes:
        decoded = self._reuse(body) if self.ref else None
        if decoded is not None:
            self.reused += 1
            return decoded
        decoded = gzip.decompress(body)
        self.ref, self.ref_decoded, self.cuts = body, decoded, {}
        return decoded

    def _reuse(self, body: bytes) -> bytes | None:
        if len(body) < 18 or body[:10] != self.ref[:10]:
            return None
        shared = _common_prefix(self.ref, body)
        crc_want = int.from_bytes(body[-8:-4], "little")
        size_want = int.from_bytes(body[-4:], "little")
        end = shared
        for _ in range(3):  # (a marker's bytes may occur inside a piece: the CRC tells)
            mark = self.ref.rfind(_SYNC_MARK, 10, end)
            if mark < 0:
                return None
            cut, end = mark + len(_SYNC_MARK), mark
            n, crc = self._cut(cut)
            try:
                tail = zlib.decompressobj(-15).decompress(body[cut:-8])
            except zlib.error:
                continue
            if zlib.crc32(tail, crc) == crc_want and (n + len(tail)) & 0xFFFFFFFF == size_want:
                return self.ref_decoded[:n] + tail
        return None

    def _cut(self, cut: int) -> tuple[int, int]:
        if cut not in self.cuts:
            n = len(zlib.decompressobj(-15).decompress(self.ref[10:cut]))
            self.cuts[cut] = (n, zlib.crc32(self.ref_decoded[:n]))
        return self.cuts[cut]


def _common_prefix(a: bytes, b: bytes) -> int:
    """The length of the longest common prefix (binary search on slices: memcmp, not a loop)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
