"""The directory's delta encoding: what changed between two versions of a host's directory.

Both ends use this module: the authority makes deltas (`diff`), the agent (and the fleet
simulator) applies them (`apply`) and checks the result against the new ETag (`digest`).
Standard library only: the daemon imports it.

The protocol (RFC 3229's negotiation, a resourceVersion-like base):

- Every directory answer (200, 226, 304) names the version of the parts every host shares
  (catalog, revoked, trust bundle, services, discovery, routes) in `Meshagent-Directory-Version`: the
  hex sha256 of their canonical JSON. It is derived from content only, so every replica names
  the same registry state the same.
- A client holding a document asks for a delta with `A-IM: meshagent-delta`, the document's
  ETag in `If-None-Match` (RFC 3229 requires it with A-IM) and its version in
  `Meshagent-Delta-Base`. The authority answers `226 IM Used`, `IM: meshagent-delta`,
  `Delta-Base: <that ETag>`, the new `ETag`, Content-Type DELTA_MEDIA_TYPE, when it still holds
  the base version's parts; otherwise (an evicted or unknown base, a client that did not ask,
  a delta larger than half the document) the full document as a 200, as before.
- The delta (canonical JSON): {"base": V0, "version": V1, "set": {member: value},
  "remove": [member], "splice": {member: [[at, count, [items]], ...]}}. `set` replaces members
  whole and always carries the host's own ones (host_id, policy, generated_at: small, so never
  diffed); `splice` edits the list members (catalog, revoked, services; not routes) in order, each
  `[at, count, items]` replacing list[at:at+count] by items in the list as the previous
  splices left it.
- The client rebuilds the document, takes `digest` of it and compares with the new ETag: any
  mismatch (or a malformed delta) and it fetches the full document.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

# RFC 3229 instance manipulation name (A-IM / IM headers).
DELTA_IM = "meshagent-delta"
DELTA_MEDIA_TYPE = "application/vnd.meshagent.directory-delta+json"
VERSION_HEADER = "meshagent-directory-version"  # every answer: the shared parts' version
BASE_HEADER = "meshagent-delta-base"  # the request: the version of the document held
# Members every host shares and that a delta may carry; the rest (host_id, policy,
# generated_at) is the host's own and always sent whole.
SHARED_MEMBERS = ("catalog", "discovery", "revoked", "routes", "services", "trust_bundle")
# The list members a delta splices. `routes` (#21) is a list but is never spliced: its change
# is a whole-member `set`, which agents from before #21 apply (their `apply` refuses a splice
# of a member not in their LIST_MEMBERS, and would fetch the whole document on every change).
LIST_MEMBERS = frozenset({"catalog", "revoked", "services"})
HOST_MEMBERS = ("generated_at", "host_id", "policy")
_VERSION_CHARS = frozenset("0123456789abcdef")


class DeltaError(ValueError):
    """A delta that does not apply to the document held (the client fetches in full)."""


def canonical_json(value: Any) -> bytes:
    """The one serialization ETags are computed over: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def digest(doc: Mapping[str, Any]) -> str:
    """The directory's ETag value (unquoted): sha256 of its canonical JSON without generated_at."""
    return hashlib.sha256(canonical_json({k: v for k, v in doc.items() if k != "generated_at"})).hexdigest()


def version_of(shared: Mapping[str, bytes]) -> str:
    """The version of the shared parts, from their canonical JSON (member -> bytes; members
    absent from the document are absent here): the same bytes give the same version anywhere."""
    h = hashlib.sha256()
    for name in sorted(shared):
        h.update(name.encode() + b"\0" + hashlib.sha256(shared[name]).digest())
    return h.hexdigest()


def is_version(text: str) -> bool:
    return len(text) == 64 and set(text) <= _VERSION_CHARS


def list_items(encoded: bytes) -> list[bytes]:
    """The canonical JSON of each item of a canonical JSON list, sliced from it (not re-encoded)."""
    text = encoded.decode()
    if not text.startswith("[") or not text.endswith("]"):
        raise ValueError("not a JSON list")
    decoder, items, at = json.JSONDecoder(), [], 1
    while at < len(text) - 1:
        _, end = decoder.raw_decode(text, at)
        items.append(text[at:end].encode())
        at = end + 1  # (the comma: canonical JSON has no spaces)
    return items


def splice_ops(old: Sequence[bytes], new: Sequence[bytes]) -> list[tuple[int, int, list[bytes]]]:
    """Edits that turn the list `old` into `new` (items as canonical JSON), each (at, count,
    items) against the list as the previous edits left it. The common head and tail are cut
    first: a change is usually one host, somewhere in thousands."""
    head = 0
    while head < len(old) and head < len(new) and old[head] == new[head]:
        head += 1
    tail = 0
    while tail < len(old) - head and tail < len(new) - head and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    old_mid, new_mid = old[head : len(old) - tail], new[head : len(new) - tail]
    ops: list[tuple[int, int, list[bytes]]] = []
    matcher = difflib.SequenceMatcher(None, old_mid, new_mid, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            # Edits before this one made list[:head + j1] equal to new[:head + j1].
            ops.append((head + j1, i2 - i1, list(new_mid[j1:j2])))
    return ops


def encode_splices(ops: Sequence[tuple[int, int, Sequence[bytes]]]) -> bytes:
    return b"[" + b",".join(b"[%d,%d,[%s]]" % (at, n, b",".join(items)) for at, n, items in ops) + b"]"


def apply(held: Mapping[str, Any], delta: Any, base: str) -> dict[str, Any]:
    """The document `delta` makes of `held` (whose shared parts are at version `base`).
    `held` is not changed, and items it has are shared with the result. DeltaError when the
    delta is malformed or not made for `base`."""
    if not isinstance(delta, dict) or delta.get("base") != base or not isinstance(delta.get("version"), str):
        raise DeltaError("the delta is not made for the document held")
    sets, removes, splices = delta.get("set", {}), delta.get("remove", []), delta.get("splice", {})
    if not (isinstance(sets, dict) and isinstance(removes, list) and isinstance(splices, dict)):
        raise DeltaError("the delta's set, remove or splice is malformed")
    doc = dict(held)
    for name in removes:
        if not isinstance(name, str):
            raise DeltaError("the delta removes a member that is not a name")
        doc.pop(name, None)
    for name, ops in splices.items():
        current = doc.get(name)
        if name not in LIST_MEMBERS or not isinstance(current, list) or not isinstance(ops, list):
            raise DeltaError(f"the delta splices {name!r}, which is not a list held")
        edited = list(current)
        for op in ops:
            if not (isinstance(op, list) and len(op) == 3 and isinstance(op[2], list)):
                raise DeltaError(f"a splice of {name!r} is malformed")
            at, count, items = op
            valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (at, count))
            if not valid or at + count > len(edited):
                raise DeltaError(f"a splice of {name!r} is out of the list's range")
            edited[at : at + count] = items
        doc[name] = edited
    doc.update(sets)
    return doc


def diff(
    old: Mapping[str, bytes], new: Mapping[str, bytes], items: Mapping[str, tuple[list[bytes], list[bytes]]]
) -> tuple[dict[str, bytes], list[str], bytes]:
    """The shared part of a delta from the shared members `old` to `new` (member -> canonical
    JSON): (members to set, members to remove, the splice object's canonical JSON). `items`:
    for list members present in both, their items (old, new) as list_items gives them."""
    sets: dict[str, bytes] = {}
    splices: dict[str, bytes] = {}
    for name, encoded in new.items():
        if old.get(name) == encoded:
            continue
        if name in items:
            splices[name] = encode_splices(splice_ops(*items[name]))
        else:
            sets[name] = encoded
    removed = sorted(name for name in old if name not in new)
    splice = b"{" + b",".join(canonical_json(k) + b":" + splices[k] for k in sorted(splices)) + b"}"
    return sets, removed, splice
