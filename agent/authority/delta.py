"""The directory versions one replica keeps, and the deltas between them, each made once.

A long poll that wakes answers every host with the change from the version it held to the
current one; all the hosts parked on a replica hold the same old version, so the (old, new)
delta is computed once and each host's answer joins it with its own few hundred bytes.

Versions are named by their content (agent.identity.delta.version_of): a replica that never
saw a version, or has evicted it, cannot make a delta from it and the host gets the full
document. Nothing here depends on what this process saw before: the same two versions give
the same delta on every replica.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from agent.identity import delta as wire
from agent.logs import get_logger

log = get_logger("meshagent.authority.delta")

# Versions kept per replica: the shared parts' bytes (10,000 hosts: ~2 MB each). A host long
# polls again within a second of its answer, so it is rarely more than one version behind;
# a few more cover a burst of changes between two of its polls.
KEEP_VERSIONS = 8
KEEP_DELTAS = 32
# A delta larger than this share of the shared parts is not worth it: the full document goes.
MAX_DELTA_SHARE = 0.5


@dataclass
class SharedDelta:
    """The shared part of the delta from `base` to `version`: members set whole (canonical JSON),
    members removed, and the splice object's canonical JSON."""

    base: str
    version: str
    sets: dict[str, bytes]
    removed: list[str]
    splice: bytes
    # id(piece) -> its raw deflate blocks, for every host's gzip answer (filled by service.py)
    deflated: dict[int, bytes] | None = None

    @property
    def size(self) -> int:
        return len(self.splice) + sum(len(v) for v in self.sets.values())


class DeltaStore:
    """The last KEEP_VERSIONS versions' shared parts and the deltas asked for between them.
    Thread-safe (renders run in the API's registry threads); one thread computes a delta while
    the others asking for it wait for it."""

    def __init__(self, keep_versions: int = KEEP_VERSIONS, keep_deltas: int = KEEP_DELTAS) -> None:
        self.keep_versions = keep_versions
        self.keep_deltas = keep_deltas
        self._lock = threading.Lock()
        self._versions: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._deltas: OrderedDict[tuple[str, str], SharedDelta | None] = OrderedDict()
        self.computed = 0  # deltas computed (tests: once per pair, not once per host)

    def remember(self, version: str, parts: Mapping[str, bytes]) -> None:
        with self._lock:
            self._versions[version] = dict(parts)
            self._versions.move_to_end(version)
            while len(self._versions) > self.keep_versions:
                self._versions.popitem(last=False)

    def known(self, version: str) -> bool:
        with self._lock:
            return version in self._versions

    def delta(self, base: str, version: str) -> SharedDelta | None:
        """The delta from `base` to `version`, or None: `base` unknown here (or evicted), or the
        delta larger than MAX_DELTA_SHARE of the document's shared parts."""
        key = (base, version)
        with self._lock:
            if key in self._deltas:
                self._deltas.move_to_end(key)
                return self._deltas[key]
            old, new = self._versions.get(base), self._versions.get(version)
            if old is None or new is None:
                return None
            made = self._compute(base, version, old, new)
            self._deltas[key] = made
            while len(self._deltas) > self.keep_deltas:
                self._deltas.popitem(last=False)
            return made

    def _compute(
        self, base: str, version: str, old: dict[str, bytes], new: dict[str, bytes]
    ) -> SharedDelta | None:
        self.computed += 1
        items = {
            name: (wire.list_items(old[name]), wire.list_items(new[name]))
            for name in wire.LIST_MEMBERS
            if name in old and name in new and old[name] != new[name]
        }
        sets, removed, splice = wire.diff(old, new, items)
        made = SharedDelta(base, version, sets, removed, splice)
        whole = sum(len(v) for v in new.values())
        if made.size > whole * MAX_DELTA_SHARE:
            log.info("directory_delta.too_large", base=base[:12], version=version[:12], bytes=made.size)
            return None
        log.info(
            "directory_delta.computed",
            base=base[:12],
            version=version[:12],
            bytes=made.size,
            changed=",".join(sorted([*sets, *items, *removed])),
        )
        return made
