"""Host-side identity commands: `enroll`, `status`, `renew`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from agent.config import load_config
from agent.errors import ExitCode, MeshagentError, NotEnrolledError
from agent.identity import enroll as flows
from agent.identity.certinfo import utcnow
from agent.identity.renew import renew_identity
from agent.identity.rotation import Rotator, renewal_time
from agent.identity.store import IdentityStore, StoredIdentity
from agent.identity.transport import ProxyConfig, resolve_proxy

from .output import emit_json, human_duration, printable, progress, rfc3339


def _store(state_dir: Path | None, config: Path | None) -> IdentityStore:
    if state_dir is not None:
        return IdentityStore(state_dir)
    return IdentityStore(load_config(config, required=config is not None).identity.state_dir)


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    envvar="MESHAGENT_STATE_DIR",
    help="Where the identity lives [default: identity.state_dir from the config, /var/lib/meshagent].",
)
config_option = click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="MESHAGENT_CONFIG",
    help="Agent config file [default: /etc/meshagent/agent.toml if present].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
https_proxy_option = click.option(
    "--https-proxy",
    metavar="URL",
    help="Reach the authority through this HTTP proxy (CONNECT; TLS and the pin stay end to end), "
    'e.g. http://proxy:3128 or http://user:pass@proxy:3128; "" for direct '
    "[default: [authority] https_proxy from the config, else HTTPS_PROXY; NO_PROXY honoured].",
)


def _proxy(config: Path | None, flag: str | None) -> ProxyConfig:
    """The proxy to reach the authority through: --https-proxy, the config, the environment."""
    settings = load_config(config, required=config is not None).authority
    return resolve_proxy(settings.https_proxy, settings.no_proxy, flag)


def identity_doc(store: IdentityStore, identity: StoredIdentity) -> dict[str, Any]:
    s = identity.summary
    now = utcnow()
    record = store.renewal_record()
    try:
        authority_url: str | None = store.load_authority().url
    except MeshagentError:
        authority_url = None
    return {
        "spiffe_id": identity.workload.spiffe_id,
        "dns_name": identity.workload.dns_name,
        "identity": identity.workload.short,
        "trust_domain": identity.workload.trust_domain,
        "serial": s.serial,
        "issuer": s.issuer,
        "not_before": rfc3339(s.not_before),
        "not_after": rfc3339(s.not_after),
        "seconds_left": int((s.not_after - now).total_seconds()),
        "expired": now >= s.not_after,
        "renew_after": rfc3339(renewal_time(s.not_before, s.not_after, jitter=0.0)),
        "authority_url": authority_url,
        "cert_file": str(store.cert_file),
        "key_file": str(store.key_file),
        "bundle_file": str(store.bundle_file),
        "trust_bundle_roots": len(identity.bundle),
        "last_renewal": record.get("last_attempt"),
        "last_renewal_result": record.get("last_result"),
        "last_renewal_detail": record.get("last_detail"),
        "last_successful_renewal": record.get("last_success"),
    }


def _print_identity(doc: dict[str, Any]) -> None:
    left = "EXPIRED" if doc["expired"] else human_duration(doc["seconds_left"])
    rows = [
        ("SPIFFE ID", doc["spiffe_id"]),
        ("DNS name", doc["dns_name"]),
        ("serial", doc["serial"]),
        ("valid", f"{doc['not_before']} .. {doc['not_after']} ({left} left)"),
        ("renews after", f"{doc['renew_after']} (about 70% of lifetime)"),
        ("authority", doc["authority_url"]),
        ("trust bundle", f"{doc['trust_bundle_roots']} root(s)  {doc['bundle_file']}"),
        ("certificate", doc["cert_file"]),
        ("key", doc["key_file"]),
        (
            "last renewal",
            f"{doc['last_renewal'] or '-'} {doc['last_renewal_result'] or ''} "
            f"{doc['last_renewal_detail'] or ''}".rstrip(),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}")


def _daemon_status(config: Path | None) -> dict[str, Any] | None:
    """The running agent's /status, or None when no agent answers on this host."""
    from .stat import admin_get

    try:
        port = load_config(config, required=config is not None).intercept.admin_port
        code, body = admin_get(port, "/status", timeout=1.0)
        doc = json.loads(body)
    except (MeshagentError, ValueError):
        return None
    return doc if code == 200 and isinstance(doc, dict) else None


def _print_daemon(doc: dict[str, Any] | None) -> None:
    for line in daemon_lines(doc):
        click.echo(line)


def _task_order(item: tuple[str, dict[str, Any]]) -> tuple[int, int, str]:
    """Failing tasks first (most failures in a row first), then ones that failed before."""
    name, task = item
    return (-int(task.get("failing") or 0), -int(task.get("failures") or 0), name)


def _task_line(name: str, task: dict[str, Any]) -> str:
    failing, failures = int(task.get("failing") or 0), int(task.get("failures") or 0)
    text = f"{name}  {task.get('state', '?')}"
    if failing:
        text += f", FAILING {failing} in a row ({failures} in all)"
        if task.get("retry_in_s") is not None:
            text += f", retry in {task['retry_in_s']} s"
    elif failures:
        text += f", {failures} failures before, recovered"
    if task.get("last_error") and (failing or task.get("state") == "failed"):
        text += f": {printable(task['last_error'])}"
    return text


def _dns_lines(dns: dict[str, Any]) -> list[str]:
    """The cluster-names stub: names known, whether port-53 traffic reaches it, what it did."""
    if not dns.get("enabled"):
        return []
    counts = dns.get("counts") or {}
    answered = sum(counts.get(k, 0) for k in ("answer", "nodata", "nxdomain"))
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped_") or k == "tcp_refused")
    redirect = "redirecting" if dns.get("redirect_installed") else "NOT redirecting"
    line = (
        f"dns           {dns.get('names', 0)} names, {redirect} "
        f"{', '.join(printable(a) for a in dns.get('stub_addresses') or [])}; answered {answered}, "
        f"forwarded {counts.get('forwarded', 0)}, dropped {dropped}"
    )
    if dns.get("heartbeat_failures") and dns.get("last_error"):
        line += f", heartbeat FAILING: {printable(dns['last_error'])}"
    return [line]


def _health_lines(health: dict[str, Any]) -> list[str]:
    """The app's probes and the last report to the authority: why the cluster may see this host
    not Ready."""
    probes = health.get("probes") or []
    failing = [p for p in probes if not p.get("ok")]
    lines = []
    if probes:
        lines.append(
            f"probes        {len(probes)}" + (f", {len(failing)} FAILING" if failing else ", all passing")
        )
    for probe in failing:
        lines.append(
            f"  probe       {printable(probe.get('kind'))} :{probe.get('port')} failing: "
            f"{printable(probe.get('detail'))}"
        )
    if health.get("last_report_error"):
        lines.append(
            f"report        {health.get('report_failures', 0)} failed sends to the authority: "
            f"{printable(health['last_report_error'])}"
        )
    return lines


def daemon_lines(doc: dict[str, Any] | None) -> list[str]:
    """The running agent's part of `meshagent status`, one line per fact (values from the
    agent and the authority are printed with control characters made visible)."""
    if doc is None:
        return ["agent         not running (no answer on the admin port)"]
    lines = []
    rules = doc.get("rules") or {}
    conns = doc.get("connections") or {}
    reasons = "; ".join(printable(r) for r in doc.get("not_ready_reasons") or [])
    lines.append(f"agent         {'ready' if doc.get('ready') else 'NOT READY: ' + reasons}")
    lines.append(
        f"rules         {rules.get('backend', '-')} {rules.get('inbound_mode', '')} "
        f"{rules.get('rules', 0)} rules"
        if rules
        else "rules         none applied"
    )
    lines.append(f"listeners     {', '.join(f'{k} {v}' for k, v in (doc.get('listeners') or {}).items())}")
    if doc.get("authority_proxy"):
        lines.append(f"proxy         authority {printable(str(doc['authority_proxy']))}")
    catalog = doc.get("catalog") or {}
    rejected = catalog.get("rejected") or []
    lines.append(
        f"catalog       {catalog.get('entries', 0)} entries from {catalog.get('source', '-')}"
        + (f"; {catalog.get('rejected_count', len(rejected))} REJECTED (left out)" if rejected else "")
    )
    for bad in rejected[:10]:
        raw = bad.get("entry")
        entry = printable(raw if isinstance(raw, str) else json.dumps(raw, sort_keys=True))
        lines.append(f"  rejected    {printable(bad.get('where'))} {entry}: {printable(bad.get('reason'))}")
    if len(rejected) > 10:
        lines.append(f"  rejected    ... {len(rejected) - 10} more (meshagent status --json)")
    lines.extend(_dns_lines(doc.get("dns") or {}))
    if doc.get("services"):
        lines.append(f"services      {doc['services']} in-cluster Services (discovered by the authority)")
    lines.extend(_health_lines(doc.get("health") or {}))
    tasks: dict[str, dict[str, Any]] = doc.get("tasks") or {}
    if tasks:
        failing = sum(1 for t in tasks.values() if t.get("failing"))
        lines.append(f"tasks         {len(tasks)}" + (f", {failing} FAILING" if failing else ", all healthy"))
        for name, task in sorted(tasks.items(), key=_task_order):
            lines.append(f"  task        {_task_line(printable(name), task)}")
    admin = doc.get("admin") or {}
    if admin:
        lines.append(
            f"admin         {admin.get('open', 0)} open (cap {admin.get('max_connections', '-')}); "
            f"accepted {admin.get('accepted', 0)}, evicted idle {admin.get('evicted_idle', 0)}, "
            f"refused over cap {admin.get('refused_over_limit', 0)}, timed out {admin.get('timed_out', 0)}"
        )
    shakes = doc.get("handshakes") or {}
    if shakes:
        lines.append(
            f"handshakes    {shakes.get('active', 0)} in progress (limit {shakes.get('limit', '-')}), "
            f"{shakes.get('waiting', 0)} waiting; queued {shakes.get('queued', 0)}, "
            f"refused {shakes.get('refused_over_limit', 0)}, "
            f"timed out waiting {shakes.get('timed_out_waiting', 0)}; "
            f"peer chains verified {shakes.get('chains_verified', 0)}, "
            f"from cache {shakes.get('chains_cached', 0)}"
        )
    lines.append(
        f"connections   {conns.get('open', 0)} open; refused {sum((conns.get('refused') or {}).values())}; "
        f"failures {sum((conns.get('failures') or {}).values())}"
    )
    memory = doc.get("memory") or {}
    if memory:
        lines.append(
            f"memory        {memory.get('rss_mb', '-')} MB resident; "
            f"given back {memory.get('trims', 0)} times"
        )
    if "http_accounting" in doc:  # off, compiled, or python (the extension was not built)
        lines.append(f"http counting {doc['http_accounting']}")
    if "relay" in doc:  # native, python, or python (native not built)
        lines.append(f"relay         {doc['relay']}")
    for error in (doc.get("last_errors") or [])[-3:]:
        lines.append(f"last error    {printable(error)}")
    return lines


def _read_token(token: str | None, token_file: Path | None) -> str:
    if token_file is not None:
        try:
            text = sys.stdin.read() if str(token_file) == "-" else token_file.read_text()
        except FileNotFoundError:
            raise click.BadParameter(f"{token_file}: no such file", param_hint="--token-file") from None
        except IsADirectoryError:
            raise click.BadParameter(
                f"{token_file} is a directory, not a token file", param_hint="--token-file"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise click.BadParameter(f"{token_file}: {reason}", param_hint="--token-file") from None
        return text.strip()
    if token:
        return token
    env = os.environ.get("MESHAGENT_TOKEN", "")
    if env:
        return env
    raise click.UsageError(
        "give the join token as an argument, with --token-file FILE (- for stdin), or in MESHAGENT_TOKEN"
    )


@click.command("enroll")
@click.argument("token", required=False)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, allow_dash=True),
    help="Read the token from a file (or - for stdin) so it stays out of `ps`.",
)
@state_dir_option
@config_option
@click.option("--host-name", help="Name to register this host under [default: the system host name].")
@click.option(
    "--address",
    "addresses",
    multiple=True,
    help="An address peers reach this host at (repeatable) [default: discovered].",
)
@click.option("--force", is_flag=True, help="Replace an existing identity.")
@https_proxy_option
@json_option
def enroll_cmd(
    token: str | None,
    token_file: Path | None,
    state_dir: Path | None,
    config: Path | None,
    host_name: str | None,
    addresses: tuple[str, ...],
    force: bool,
    https_proxy: str | None,
    as_json: bool,
) -> None:
    """Join the mesh with a one-time TOKEN from `meshagent authority token create`.

    Makes an ECDSA P-256 key on this host (it never leaves), verifies the authority through the
    pin inside the token, and stores key, certificate chain and trust bundle in the state
    directory. If the answer is lost, running the same command again with the same token
    finishes the enrollment (the key in flight is kept for that).
    """
    text = _read_token(token, token_file)
    store = _store(state_dir, config)
    proxy = _proxy(config, https_proxy)
    if store.exists() and not force:
        try:
            current = store.load()
            if utcnow() < current.summary.not_after:
                raise MeshagentError(
                    f"this host is already enrolled as {current.workload.spiffe_id}",
                    "pass --force to replace that identity, or `meshagent status` to see it",
                    code="already_enrolled",
                )
        except NotEnrolledError:
            pass
    started = utcnow()
    identity = flows.enroll(
        text,
        store,
        host_name,
        list(addresses) or None,
        progress=(lambda _m: None) if as_json else progress,
        proxy=proxy,
    )
    doc = identity_doc(store, identity)
    doc["enroll_seconds"] = round((utcnow() - started).total_seconds(), 3)
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"enrolled as {doc['spiffe_id']} in {doc['enroll_seconds']}s")
        _print_identity(doc)


@click.command("status")
@state_dir_option
@config_option
@json_option
def status_cmd(state_dir: Path | None, config: Path | None, as_json: bool) -> None:
    """Show this host's identity: names, validity, files, last renewal.

    Exits 0 with a valid identity, 1 if it has expired, 4 if the host is not enrolled.
    """
    store = _store(state_dir, config)
    doc = identity_doc(store, store.load())
    doc["daemon"] = _daemon_status(config)
    if as_json:
        emit_json(doc)
    else:
        _print_identity(doc)
        _print_daemon(doc["daemon"])
    if doc["expired"]:
        sys.exit(int(ExitCode.FAILURE))


@click.command("renew")
@state_dir_option
@config_option
@click.option(
    "--loop",
    is_flag=True,
    help="Keep renewing at ~70% of each lifetime until SIGTERM/Ctrl-C (what `run` does).",
)
@https_proxy_option
@json_option
def renew_cmd(
    state_dir: Path | None, config: Path | None, loop: bool, https_proxy: str | None, as_json: bool
) -> None:
    """Renew this host's certificate now, proving possession of the current key.

    A new key is made for every renewal; the join token is never needed again. With --loop,
    failures are retried with backoff while the current certificate keeps serving.
    """
    store = _store(state_dir, config)
    proxy = _proxy(config, https_proxy)
    if not loop:
        identity = renew_identity(store, proxy)
        doc = identity_doc(store, identity)
        if as_json:
            emit_json(doc)
        else:
            click.echo(f"renewed: serial {doc['serial']}, valid until {doc['not_after']}")
        return
    asyncio.run(_renew_loop(store, proxy))


async def _renew_loop(store: IdentityStore, proxy: ProxyConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def announce(identity: StoredIdentity) -> None:
        click.echo(
            f"renewed: serial {identity.summary.serial}, valid until {rfc3339(identity.summary.not_after)}",
            err=True,
        )

    await Rotator(store, on_renewed=announce, renew_fn=lambda s: renew_identity(s, proxy)).run(stop)
