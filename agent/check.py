"""`meshagent check`: pre-flight and post-install checks, in the spirit of `linkerd check`.

Each check is independent and returns pass/fail with a detail and, on failure, a hint. The
whole run fails if any check fails. Nothing here changes the host.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.errors import MeshagentError
from agent.identity.certinfo import utcnow
from agent.identity.store import IdentityStore


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    warning: bool = False  # passes (exit 0) but needs a look: printed with its hint

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _check(name: str, fn: Callable[[], tuple[bool, str, str]]) -> CheckResult:
    try:
        ok, detail, hint = fn()
    except MeshagentError as exc:
        return CheckResult(name, False, exc.message, exc.hint)
    except Exception as exc:  # a check must report, never crash the run
        return CheckResult(name, False, f"{exc.__class__.__name__}: {exc}", "")
    return CheckResult(name, ok, detail, "" if ok else hint)


def _when(at: float, now: float) -> str:
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({max(0, int(now - at))}s ago)"


def discovery_result(doc: Mapping[str, Any] | None, now: float) -> CheckResult:
    """The cluster discovery line from the agent's cached directory (`doc`; None: none cached):
    a warning, not a failure, while the authority cannot reach the Kubernetes API, since the
    hosts are then served the last known Services."""
    name = "cluster discovery"
    if doc is None:
        return CheckResult(name, True, "no directory cached yet (the agent has not fetched one)")
    state = doc.get("discovery")
    if not isinstance(state, Mapping):
        return CheckResult(name, True, "not used (the authority discovers no Kubernetes Services)")
    services = doc.get("services")
    count = len(services) if isinstance(services, list) else 0
    generated = doc.get("generated_at")
    as_of = f"; directory of {_when(generated, now)}" if isinstance(generated, int | float) else ""
    if state.get("state") == "ok":
        return CheckResult(name, True, f"the authority reaches the Kubernetes API; {count} Service(s){as_of}")
    if state.get("state") != "unreachable":
        return CheckResult(name, True, f"discovery state {state.get('state')!r} (unknown to this agent)")
    since = state.get("since")
    when = f" since {_when(since, now)}" if isinstance(since, int | float) else ""
    updated = state.get("updated_at")
    served = (
        f"the last known {count} Service(s) (of {_when(updated, now)}) are served"
        if isinstance(updated, int | float)
        else "no Services were discovered before, none are served"
    )
    return CheckResult(
        name,
        True,
        f"the authority cannot reach the Kubernetes API{when}; {served}{as_of}",
        "Services created or scaled meanwhile are not known here: on the authority, see its log "
        "(event kube.unreachable) and GET /v1/kubernetes/status, and its path to the API server",
        warning=True,
    )


def discovery_check(state_dir: Path, now: float) -> CheckResult:
    """`discovery_result` for the directory the agent cached in `state_dir`."""
    from agent.daemon import HOST_CONFIG_CACHE

    path = state_dir / HOST_CONFIG_CACHE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return discovery_result(None, now)
    except (OSError, ValueError) as exc:
        return CheckResult(
            "cluster discovery", False, f"cannot read {path}: {exc}",
            "the agent rewrites it at its next directory refresh; or remove it and restart the agent",
        )  # fmt: skip
    return discovery_result(doc if isinstance(doc, dict) else None, now)


def routes_result(status: Mapping[str, Any] | None) -> CheckResult:
    """The traffic-policy line from the running agent's /status (None: no agent answering): a
    warning when the directory carried route entries the agent left out (their destinations
    then go on as plain TCP, or without that route)."""
    name = "traffic policy"
    if status is None:
        return CheckResult(name, True, "the agent is not answering (see admin /ready)")
    routes = status.get("routes")
    if not isinstance(routes, Mapping):
        return CheckResult(name, True, "not reported (an agent older than traffic policy)")
    parents = routes.get("parents", 0)
    count = routes.get("rejected_count", 0)
    if not count:
        return CheckResult(name, True, f"{parents} destination(s) with routes, no entry rejected")
    first = (routes.get("rejected") or [{}])[0]
    where, reason = first.get("where", "?"), first.get("reason", "?")
    return CheckResult(
        name,
        True,
        f"{count} route entr{'y' if count == 1 else 'ies'} of the directory rejected, e.g. {where}: {reason}",
        "the authority served routes this agent cannot use (see `meshagent status --json` routes.rejected); "
        "check the policies with `meshagent authority route show` and the agent's version",
        warning=True,
    )


def admin_status(port: int) -> dict[str, Any] | None:
    """The running agent's /status (None: not answering)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/status")
        response = conn.getresponse()
        body = response.read()
    except OSError:
        return None
    finally:
        conn.close()
    if response.status != 200:
        return None
    doc = json.loads(body)
    return doc if isinstance(doc, dict) else None


def run_checks(config: AgentConfig) -> list[CheckResult]:
    store = IdentityStore(config.identity.state_dir)
    icfg = config.intercept

    def backend() -> tuple[bool, str, str]:
        from agent.intercept.apply import detect_backend

        chosen = detect_backend(icfg.backend)
        chosen.owned()  # reads the live ruleset: proves the tool and kernel support work
        return True, f"{chosen.name} (configured: {icfg.backend})", ""

    def user() -> tuple[bool, str, str]:
        if isinstance(icfg.proxy_user, int):
            return True, f"proxy uid {icfg.proxy_user}", ""
        try:
            entry = pwd.getpwnam(icfg.proxy_user)
        except KeyError:
            return False, f"user {icfg.proxy_user!r} does not exist", "run: meshagent install"
        return True, f"{entry.pw_name} (uid {entry.pw_uid}, shell {entry.pw_shell})", ""

    def state_dir() -> tuple[bool, str, str]:
        if not store.state_dir.exists():
            return False, f"{store.state_dir} does not exist", "run: meshagent install (then enroll)"
        st = store.state_dir.stat()
        mode = stat.S_IMODE(st.st_mode)
        owner = pwd.getpwuid(st.st_uid).pw_name
        ok = mode == 0o700
        return ok, f"{store.state_dir} mode {mode:o} owner {owner}", f"chmod 700 {store.state_dir}"

    def identity() -> tuple[bool, str, str]:
        ident = store.load()
        s = ident.summary
        left = (s.not_after - utcnow()).total_seconds()
        lifetime = (s.not_after - s.not_before).total_seconds()
        ok = left > 0.1 * lifetime
        return (
            ok,
            f"{ident.workload.spiffe_id}, {int(left)}s left of {int(lifetime)}s",
            (
                "the certificate is about to expire: is the agent running and the authority reachable? "
                "(meshagent renew)"
            ),
        )

    def authority() -> tuple[bool, str, str]:
        from agent.identity.client import AuthorityClient
        from agent.identity.transport import resolve_proxy

        # The way the agent reaches it: the config key first, then the environment.
        proxy = resolve_proxy(config.authority.https_proxy, config.authority.no_proxy)
        ref = store.load_authority()
        with AuthorityClient(ref, proxy) as client:
            skew = client.check_clock()
        route = proxy.describe() if proxy.for_url(ref.url) else "direct"
        return True, f"{ref.url} answers ({route}); clock skew {skew:+.1f}s", ""

    def rules() -> tuple[bool, str, str]:
        from agent.intercept.apply import status

        doc = status()
        if not icfg.enabled:
            return True, "interception disabled in the config", ""
        applied = doc["applied"]
        if not applied and doc.get("holding"):
            held = ", ".join(doc["holding"])
            return (
                False,
                f"capture stopped: only a stopping agent's hold is left in {held} "
                "(draining, or a drain cut short)",
                "wait for the agent to finish stopping, or run `meshagent intercept remove`; "
                "then start it: systemctl start meshagent",
            )
        where = ", ".join(doc["backends"]) or "nowhere"
        return applied, f"rules present in {where}", "start the agent: systemctl start meshagent"

    def admin() -> tuple[bool, str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", icfg.admin_port, timeout=2)
        try:
            conn.request("GET", "/ready")
            response = conn.getresponse()
            body = response.read().decode().strip()
        except OSError as exc:
            return False, f"admin port {icfg.admin_port}: {exc}", "start the agent: systemctl start meshagent"
        finally:
            conn.close()
        return response.status == 200, f"/ready: {body}", "see `meshagent status` for what is missing"

    def ports() -> tuple[bool, str, str]:
        busy = []
        for port in (icfg.inbound_port, icfg.outbound_port, icfg.admin_port):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    busy.append(port)
        # Either all three are ours (the agent runs) or none is taken.
        ok = len(busy) in (0, 3)
        return (
            ok,
            f"listening: {busy or 'none'}",
            (f"another program holds port(s) {busy}: free them or change intercept.*_port"),
        )

    def root() -> tuple[bool, str, str]:
        return (
            os.geteuid() == 0,
            "running as root" if os.geteuid() == 0 else "not root",
            "run as root: the checks read the firewall and the agent's files",
        )

    return [
        _check("privileges", root),
        _check("kernel: netfilter backend", backend),
        _check("user", user),
        _check("state directory", state_dir),
        _check("identity", identity),
        _check("authority reachable, clock in sync", authority),
        _check("interception rules", rules),
        _check("ports 4143/4140/4191", ports),
        _check("admin /ready", admin),
        discovery_check(store.state_dir, time.time()),
        _check_result("traffic policy", lambda: routes_result(admin_status(icfg.admin_port))),
    ]


def _check_result(name: str, fn: Callable[[], CheckResult]) -> CheckResult:
    """A check that builds its own result (warnings included); a crash is reported, not raised."""
    try:
        return fn()
    except Exception as exc:
        return CheckResult(name, False, f"{exc.__class__.__name__}: {exc}", "")
