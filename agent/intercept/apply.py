"""Apply, remove and inspect a Plan: the library face of interception (`meshagent run` calls this).

    backend = detect_backend(settings.backend)
    state = apply_plan(plan, backend)        # atomic, idempotent; twice = once
    ...
    stop_capture()                           # at stop: no new capture, drains keep their NAT
    remove_all()                             # every backend, no config needed

`apply_plan` also removes leftovers of ours from the *other* backends (a host that switched
from iptables to nft must not capture twice) and deletes stale conntrack entries that would
let a new connection skip capture (`conntrack`). `plan_steps` returns exactly what `apply_plan`
would run, for `--dry-run`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from agent.logs import get_logger

from . import conntrack, dns_rules, iptables, netlink, render_iptables, render_nft
from .errors import InterceptError
from .nft import NftBackend
from .plan import NFT_TABLE, Plan
from .tools import Step, run, which

log = get_logger("meshagent.intercept")

BACKEND_NAMES = ("nft", "iptables-nft", "iptables-legacy")


class Backend(Protocol):
    name: str

    def render(self, plan: Plan) -> str: ...

    def steps(self, plan: Plan | None) -> list[Step]: ...

    def run(self, steps: list[Step]) -> None: ...

    def owned(self) -> dict[str, Any]: ...


def get_backend(name: str) -> Backend | None:
    """The named backend if its tools are installed, else None."""
    if name == "nft":
        nft = which("nft")
        return NftBackend(nft) if nft else None
    if name in ("iptables-nft", "iptables-legacy"):
        tools = iptables.find_tools("nft" if name == "iptables-nft" else "legacy")
        return iptables.IptablesBackend(tools) if tools else None
    raise InterceptError(
        f"unknown intercept backend {name!r}", f"use one of auto, {', '.join(BACKEND_NAMES)}"
    )


def available_backends() -> list[Backend]:
    return [b for b in (get_backend(n) for n in BACKEND_NAMES) if b is not None]


def detect_backend(preference: str = "auto") -> Backend:
    """The configured backend, or for `auto`: iptables-legacy when this host already has legacy
    rules (its firewall lives there), else native nft, else iptables-nft, else iptables-legacy."""
    if preference != "auto":
        backend = get_backend(preference)
        if backend is None:
            raise InterceptError(
                f"intercept.backend is {preference!r} but its tools are not installed",
                'install nftables or iptables, or set intercept.backend = "auto"',
            )
        return backend
    legacy = get_backend("iptables-legacy")
    if legacy is not None and any(iptables.legacy_tables(f) for f in (4, 6)):
        assert isinstance(legacy, iptables.IptablesBackend)
        if any("\n-A " in legacy.save(f) for f in (4, 6)):
            return legacy
    for name in ("nft", "iptables-nft", "iptables-legacy"):
        backend = get_backend(name)
        if backend is not None:
            return backend
    raise InterceptError("neither nft nor iptables is installed", "install the nftables package")


@dataclass(frozen=True)
class AppliedState:
    """What `apply_plan` did: for `meshagent status`, `/status` and `intercept apply --json`."""

    backend: str
    families: tuple[int, ...]
    inbound_mode: str
    rules: int
    digest: str
    """sha256 of the rendered plan: equal digests, equal rules."""
    steps: tuple[Step, ...]
    routes: tuple[str, ...] = ()
    cleaned: tuple[str, ...] = ()
    """Other backends from which leftovers of ours were removed."""
    conntrack_cleared: tuple[str, ...] = ()
    """Stale conntrack entries of captured flows that were deleted (they would skip capture)."""
    conntrack_error: str = ""
    """Why the conntrack cleanup failed, if it did (the guard rule still refuses such flows)."""
    conntrack_partial: bool = False
    """The cleanup's time budget ran out first (the guard refuses what is left)."""
    applied_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat().replace("+00:00", "Z"))

    def with_cleared(self, cleared: conntrack.Cleared) -> AppliedState:
        """This state once `conntrack.clear_stale` has run (when the caller ran it later)."""
        return replace(
            self,
            conntrack_cleared=cleared.deleted,
            conntrack_error=cleared.error,
            conntrack_partial=cleared.partial,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "families": list(self.families),
            "inbound_mode": self.inbound_mode,
            "rules": self.rules,
            "digest": self.digest,
            "routes": list(self.routes),
            "cleaned": list(self.cleaned),
            "conntrack_cleared": list(self.conntrack_cleared),
            "conntrack_error": self.conntrack_error,
            "conntrack_partial": self.conntrack_partial,
            "applied_at": self.applied_at,
            "steps": [{"argv": list(s.argv), "what": s.what, "stdin": s.stdin} for s in self.steps],
        }


@dataclass(frozen=True)
class RemovedState:
    backends: tuple[str, ...]
    """Backends that held rules of ours (now removed)."""
    routes: int
    steps: tuple[Step, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed_from": list(self.backends),
            "routes_removed": self.routes,
            "steps": [{"argv": list(s.argv), "what": s.what, "stdin": s.stdin} for s in self.steps],
        }


def digest(plan: Plan, backend: Backend) -> str:
    return hashlib.sha256(backend.render(plan).encode()).hexdigest()


def plan_steps(plan: Plan, backend: Backend) -> tuple[list[Step], list[str]]:
    """Exactly what `apply_plan` would run: backend steps (including removal of our leftovers in
    other backends) and the policy-routing changes in `ip` words. Reads the kernel, changes nothing."""
    steps = backend.steps(plan)
    for other in available_backends():
        if other.name != backend.name:
            steps += other.steps(None)
    routes = [line for r in plan.routes for line in netlink.describe(r)]
    return steps, routes


def apply_plan(plan: Plan, backend: Backend, clear_conntrack: bool = True) -> AppliedState:
    """Make the kernel hold exactly `plan` (in `backend`): atomic per table, idempotent.

    Rules of ours already in place (a restart with `keep-rules`) are replaced in the same
    transaction, never removed first: there is no moment without capture. Leftovers in other
    backends go only after the new rules are in, for the same reason. Then stale conntrack
    entries of captured flows are deleted (`conntrack.clear_stale`), unless `clear_conntrack` is
    False: the daemon runs that step itself once it is ready (it takes a short-lived child, seconds
    on a slow host, and the guard refuses those flows meanwhile)."""
    routes = netlink.apply_routes(plan.routes) if plan.routes else []
    if not plan.routes:
        netlink.remove_routes()
    steps = backend.steps(plan)
    backend.run(steps)
    ran = list(steps)
    cleaned: list[str] = []
    for other in available_backends():
        if other.name != backend.name:
            leftovers = other.steps(None)
            if leftovers:
                other.run(leftovers)
                ran += leftovers
                cleaned.append(other.name)
                log.warning("intercept.leftovers_removed", backend=other.name)
    cleared = conntrack.clear_stale(plan) if clear_conntrack else conntrack.Cleared()
    state = AppliedState(
        backend=backend.name,
        families=plan.families,
        inbound_mode=plan.inbound_mode,
        rules=len(plan.rules),
        digest=digest(plan, backend),
        steps=tuple(ran),
        routes=tuple(routes),
        cleaned=tuple(cleaned),
        conntrack_cleared=cleared.deleted,
        conntrack_error=cleared.error,
        conntrack_partial=cleared.partial,
    )
    log.info(
        "intercept.applied",
        backend=backend.name,
        rules=state.rules,
        mode=plan.inbound_mode,
        families=",".join(map(str, plan.families)),
        digest=state.digest[:12],
    )
    return state


def remove_steps(backends: Sequence[Backend] | None = None) -> list[Step]:
    """What `remove_all` would run (reads the kernel, changes nothing)."""
    if backends is not None:
        return [s for b in backends for s in b.steps(None)]
    return [s for b in available_backends() for s in b.steps(None)] + dns_rules.remove_steps()


def remove_all(backends: Sequence[Backend] | None = None) -> RemovedState:
    """Remove every rule, chain, table and route of ours, from every available backend.

    Needs no config: ours are found by chain prefix, comment, table name and route protocol.
    Removing when nothing is there changes nothing.
    """
    return _take_down(backends, lambda backend: backend.steps(None), "intercept.removed")


def _take_down(
    backends: Sequence[Backend] | None, steps_of: Callable[[Backend], list[Step]], event: str
) -> RemovedState:
    """Run `steps_of(backend)` on every backend, then remove the DNS redirect (when every backend
    is asked for) and our policy routes; log `event`."""
    touched: list[str] = []
    ran: list[Step] = []
    for backend in backends if backends is not None else available_backends():
        steps = steps_of(backend)
        if steps:
            backend.run(steps)
            ran += steps
            touched.append(backend.name)
    # The DNS redirect (table inet meshagent_dns), when every backend is asked for.
    dns = dns_rules.remove_steps() if backends is None else []
    for step in dns:
        run(step)
    if dns:
        ran += dns
        touched.append(f"nft ({dns_rules.FAMILY} {dns_rules.TABLE})")
    routes = netlink.remove_routes()
    log.info(event, backends=",".join(touched) or "-", routes=routes)
    return RemovedState(tuple(touched), routes, tuple(ran))


NFT_HOLD_COMMENT = "meshagent draining: nothing captured; keeps redirected connections translated"


def hold_text(present: Sequence[str]) -> str:
    """`nft -f` input that replaces our table (in each family of `present`) with one that
    captures nothing but keeps the kernel translating connections already redirected.

    Deleting our table can unregister the namespace's conntrack and NAT hooks (ours are often
    the only nat chains and ct expressions there): packets of a redirected connection then go
    untranslated (the app's port answers with a reset, the proxy's replies leave from its own
    port) and conntrack stops following those flows, so their entries stay ESTABLISHED with no
    socket behind them. A later connection that reuses such a 4-tuple is not redirected and the
    guard refuses it. One empty nat base chain and one ct expression keep both hook sets."""
    if not present:
        return ""
    tables = "".join(
        f"table {family} {NFT_TABLE} {{\n"
        f'\tcomment "{NFT_HOLD_COMMENT}"\n'
        "\tchain prerouting_nat {\n"
        "\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
        '\t\tct state established counter comment "meshagent: keeps conntrack on while draining"\n'
        "\t}\n"
        "\tchain output_nat {\n"
        "\t\ttype nat hook output priority -100; policy accept;\n"
        "\t}\n"
        "}\n"
        for family in present
    )
    return render_nft.prelude(tuple(present)) + tables


def stop_capture(backends: Sequence[Backend] | None = None) -> RemovedState:
    """At stop, before the proxy drains: capture nothing new, keep what was redirected working.

    nft: our table is replaced by the holding one (`hold_text`) in one transaction; iptables:
    our rules are replaced by one holding conntrack rule in one `--noflush` restore per family
    (`render_iptables.hold`). The DNS redirect and policy routes are removed as `remove_all`
    does: tproxy's drains need no route, since TPROXY only took connections to this host's own
    addresses. Call `remove_all` once the drain is over: it deletes what holds too.

    A hold that fails (another tool changed a rule between our save and restore, say) would leave
    that backend's full capture pointing at a proxy about to exit: everything is removed at once
    instead, as `remove-rules` promises (the draining connections lose their NAT)."""
    try:
        return _take_down(backends, _hold_steps, "intercept.capture_stopped")
    except InterceptError as exc:
        log.error(
            "intercept.hold_failed",
            error=exc.message,
            hint="removing every rule now: connections still draining may be reset",
        )
        return remove_all(backends)


def _hold_steps(backend: Backend) -> list[Step]:
    if isinstance(backend, iptables.IptablesBackend):
        return backend.hold_steps()
    if not isinstance(backend, NftBackend):
        return backend.steps(None)
    text = hold_text(backend.present())
    if not text:
        return []
    return [Step((backend.nft, "-f", "-"), text, f"hold nftables table {NFT_TABLE} for the drain (nft)")]


def status() -> dict[str, Any]:
    """What of ours the kernel holds now, per backend, plus our policy routes and the DNS
    redirect (`dns`: None when absent; not counted in `applied`, which is about TCP capture).
    `holding`: backends where only a stopping agent's hold is left (draining, or a drain cut
    short): it captures nothing, so it does not count as `applied`."""
    doc: dict[str, Any] = {}
    for backend in available_backends():
        owned = backend.owned()
        if owned:
            doc[backend.name] = owned
    holding = sorted(name for name, owned in doc.items() if is_hold(owned))
    return {
        "backends": doc,
        "routes": netlink.current(),
        "applied": len(holding) < len(doc),
        "holding": holding,
        "dns": dns_rules.owned(),
    }


def is_hold(owned: Any) -> bool:
    """Whether one backend's `owned()` is a stopping agent's hold: the nft holding table, or the
    iptables holding rule (a hold replaces every capture rule, so its comment means no capture)."""
    text = repr(owned)
    return NFT_HOLD_COMMENT in text or render_iptables.HOLD_COMMENT in text
