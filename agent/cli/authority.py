"""`meshagent authority ...`: the cluster-side commands (init, serve, tokens, hosts, revoke, kube)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import click
import yaml

from agent.authority import discovery
from agent.authority import events as event_kinds
from agent.authority.ca import AuthoritySettings, default_sans, init_authority, load_authority, load_settings
from agent.authority.health import stored_fleet_health, stored_report_doc
from agent.authority.host_meta import (
    MAX_DESCRIPTION,
    MAX_LINKS,
    MAX_SLOS,
    SPEC_SYNTAX,
    HostMeta,
    MetaInvalid,
    merge_links,
    merge_slos,
    parse_meta,
    parse_slo_spec,
)
from agent.authority.kube_export import (
    ServiceRequest,
    check_registration,
    edit_registration,
    export,
    host_workload,
    parse_label,
    parse_port,
    status_script,
    stored_health,
    workload_ports,
)
from agent.authority.kube_objects import KubeObjectError, render_yaml, validate_authority_name, without_status
from agent.authority.kube_policy import (
    MAX_BYTES,
    ClusterSettings,
    HostView,
    KubePolicyError,
    parse_policy,
    plan,
)
from agent.authority.registry import DATABASE_ENV, check_url, has_password, open_registry
from agent.authority.registry import record as record_database
from agent.authority.service import MAX_TOKEN_TTL, Authority
from agent.authority.storage import HostRecord, Registration
from agent.errors import RejectedError
from agent.identity.certinfo import utcnow
from agent.identity.names import WorkloadIdentity
from agent.identity.pki import spki_pin

from .output import Duration, emit_json, human_duration, printable, rfc3339, table
from .prometheus_option import prometheus_option

dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    envvar="MESHAGENT_AUTHORITY_DIR",
    help="The authority's directory (keys and registry). [env: MESHAGENT_AUTHORITY_DIR]",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _use_database(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--database goes to the environment: every registry this process opens (and serve's
    worker processes) resolves it first (agent/authority/registry.py)."""
    if value:
        os.environ[DATABASE_ENV] = check_url(value)


database_option = click.option(
    "--database",
    metavar="URL",
    envvar=DATABASE_ENV,
    expose_value=False,
    callback=_use_database,
    help="The registry's database: a PostgreSQL URL (postgresql://USER@HOST:5432/DB, or "
    "postgresql:///DB?host=/run/postgresql for a unix socket) shared by every replica, or "
    "'sqlite' for DIR/registry.db. [default: the URL `authority init --database` recorded in DIR, "
    f"else sqlite] [env: {DATABASE_ENV}] The password goes in PGPASSWORD or ~/.pgpass, "
    "not in the URL.",
)


def _open(directory: Path) -> Authority:
    """The authority in `directory` on the registry --database (or its default) names."""
    return Authority(load_authority(directory), open_registry(directory))


@click.group()
def authority() -> None:
    """The cluster-side enrollment authority: CA material, join tokens, the host registry."""


@authority.command("init")
@dir_option
@click.option("--trust-domain", required=True, help="The mesh's trust domain, e.g. cluster.local.")
@click.option(
    "--mesh",
    default="linkerd",
    show_default=True,
    help="Mesh name in DNS identities (<sa>.<ns>.serviceaccount.identity.<mesh>.<td>).",
)
@click.option(
    "--trust-anchor",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Adopt: the mesh's trust anchor(s), PEM (e.g. Linkerd's ca.crt).",
)
@click.option(
    "--issuer-cert",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Adopt: an issuer certificate signed by the trust anchor.",
)
@click.option(
    "--issuer-key",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Adopt: the issuer's private key (PEM, unencrypted).",
)
@click.option(
    "--san",
    "sans",
    multiple=True,
    help="Name or IP for the API's serving certificate (repeatable) [default: localhost, "
    "loopback, this host's names].",
)
@click.option(
    "--cert-lifetime",
    type=Duration(),
    default="24h",
    show_default=True,
    help="Lifetime of host certificates.",
)
@click.option(
    "--max-lifetime",
    type=Duration(),
    default="7d",
    show_default=True,
    help="No host certificate lives longer than this.",
)
@click.option(
    "--database",
    metavar="URL",
    help="Keep the registry in PostgreSQL (replicas share it): a libpq URL such as "
    "postgresql://meshagent@db.example:5432/meshagent or postgresql:///meshagent?host=/run/postgresql. "
    "Checked and migrated now, and recorded in DIR (database.url) so serve and the other "
    "commands use it; a password in the URL is not recorded (give it with PGPASSWORD or "
    "~/.pgpass). [default: DIR/registry.db, SQLite]",
)
@json_option
def init_cmd(
    directory: Path,
    trust_domain: str,
    mesh: str,
    trust_anchor: Path | None,
    issuer_cert: Path | None,
    issuer_key: Path | None,
    sans: tuple[str, ...],
    cert_lifetime: timedelta,
    max_lifetime: timedelta,
    database: str | None,
    as_json: bool,
) -> None:
    """Create an authority: a new trust anchor and issuer, or adopt the mesh's issuer.

    \b
    New mesh:     meshagent authority init --dir DIR --trust-domain cluster.local
    Existing one: meshagent authority init --dir DIR --trust-domain cluster.local \\
                    --trust-anchor ca.crt --issuer-cert issuer.crt --issuer-key issuer.key
    Adopting the issuer the mesh's proxies already trust (Linkerd's identity issuer) makes
    enrolled hosts trusted by in-cluster proxies with no change on the cluster.

    \b
    Replicas on PostgreSQL (the registry in a database every replica shares):
      meshagent authority init --dir DIR --trust-domain cluster.local \\
        --database postgresql://meshagent@db.example:5432/meshagent
    then copy DIR to each replica's machine and run `authority serve --dir DIR` on each.
    """
    adopt_parts = (trust_anchor, issuer_cert, issuer_key)
    if any(adopt_parts) and not all(adopt_parts):
        raise click.UsageError("adopting needs all three of --trust-anchor, --issuer-cert, --issuer-key")
    if database is not None and database != "sqlite":
        # Reach and migrate the database before creating anything: a wrong URL leaves no directory.
        open_registry(directory, check_url(database)).close()
    settings = AuthoritySettings(
        trust_domain=trust_domain,
        mesh=mesh,
        cert_lifetime_s=int(cert_lifetime.total_seconds()),
        max_lifetime_s=int(max_lifetime.total_seconds()),
    )
    adopt = (trust_anchor, issuer_cert, issuer_key) if all(adopt_parts) else None
    material = init_authority(directory, settings, list(sans) or default_sans(), adopt)  # type: ignore[arg-type]
    recorded = record_database(directory, database) if database is not None else None
    doc = {
        "dir": str(directory),
        "database": recorded or "sqlite",
        "trust_domain": trust_domain,
        "issuer": material.issuer_cert.subject.rfc4514_string(),
        "issuer_not_after": rfc3339(material.issuer_cert.not_valid_after_utc),
        "adopted": adopt is not None,
        "ca_pin": spki_pin(material.api_ca_cert),
        "trust_bundle_file": str(material.trust_bundle_file),
        "prometheus_token_file": str(discovery.ensure_token(directory)[0]),
    }
    if as_json:
        emit_json(doc)
        return
    click.echo(f"authority created in {directory} ({'adopted issuer' if adopt else 'new trust anchor'})")
    click.echo(f"  issuer       {doc['issuer']} (until {doc['issuer_not_after']})")
    click.echo(f"  trust bundle {doc['trust_bundle_file']}  <- give this to the mesh if the anchor is new")
    click.echo(f"  API CA pin   {doc['ca_pin']}")
    click.echo(f"  Prometheus   {doc['prometheus_token_file']}  <- bearer token for the target list")
    click.echo(f"  registry     {doc['database'] if recorded else directory / 'registry.db'}")
    if database is not None and has_password(database):
        click.echo(
            "  (the password in --database was not recorded: give it to every command and replica "
            "with PGPASSWORD or ~/.pgpass)"
        )
    click.echo(f"next: meshagent authority serve --dir {directory} --listen 0.0.0.0:8443")


@authority.command("serve")
@dir_option
@database_option
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="HOST:PORT for the HTTPS API.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes sharing the port (they share the registry).",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(0.1, 3600),
    help="Seconds a client has for the TLS handshake and for each request's head. [default: 10]",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(0.1, 3600),
    help="Seconds a request's body may take once its head is in; then 408. [default: 10]",
)
@click.option(
    "--idle-timeout",
    type=click.IntRange(1, 3600),
    help="Seconds an idle keep-alive connection is kept between requests (above the agents' "
    "report interval). [default: 75]",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, 1_000_000),
    help="Open connections per worker; past it the one waiting longest for a request is "
    "closed. [default: 16384, or the file limit (LimitNOFILE) less 64 if lower]",
)
@click.option(
    "--kubernetes",
    is_flag=True,
    help="Also run the controller: keep every host's ExternalWorkload (or WorkloadEntry) and "
    "Services in the cluster, discover the cluster's Services for the hosts, read its policy "
    "objects. Needs the `kubernetes` extra (pip install 'meshagent[kubernetes]').",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="KUBECONFIG",
    help="With --kubernetes: the kubeconfig to use [default: $KUBECONFIG, else the pod's service account].",
)
@click.option(
    "--flavor",
    type=click.Choice(["linkerd", "istio"]),
    default="linkerd",
    show_default=True,
    help="With --kubernetes: ExternalWorkloads (linkerd) or WorkloadEntries (istio).",
)
@click.option(
    "--service",
    "services",
    multiple=True,
    metavar="NAME=KEY=VALUE[,KEY=VALUE]",
    help="With --kubernetes: also keep a ClusterIP Service NAME selecting hosts with these labels "
    "(repeatable), as `kube export --service` writes it.",
)
@click.option(
    "--authority-name",
    default="default",
    show_default=True,
    help="With --kubernetes: the meshagent.io/authority label of every object, and the Lease's "
    "name (meshagent-authority-NAME); the same for every replica of one authority.",
)
@click.option(
    "--lease-namespace",
    default="",
    help="With --kubernetes: where the replicas' Lease lives [default: the kubeconfig context's "
    "namespace; in a pod, its own].",
)
@click.option(
    "--policy-from-cluster",
    is_flag=True,
    help="With --kubernetes: the hosts' inbound policy comes from the cluster's Linkerd Server / "
    "AuthorizationPolicy / MeshTLSAuthentication / NetworkAuthentication and SMI TrafficTarget "
    "objects, as `policy apply -f` maps them; the cluster wins: hand-set policies of enrolled "
    "identities are replaced.",
)
@click.option(
    "--policy-default",
    type=click.Choice(["all-unauthenticated", "all-authenticated", "deny", "audit"]),
    help="With --policy-from-cluster: the default for a port no Server covers (Linkerd's "
    "proxy.defaultInboundPolicy) [default: the agents' own].",
)
@click.option(
    "--routes-from-cluster",
    is_flag=True,
    help="With --kubernetes: the hosts' outbound HTTP traffic policy also comes from the cluster's "
    "HTTPRoutes (gateway.networking.k8s.io v1, policy.linkerd.io v1beta3), SMI TrafficSplits, "
    "ServiceProfiles (retry budget) and Services, as `route apply -f` reads them; `route apply` "
    "objects stay; a set that cannot be honoured keeps the stored objects (logged, and in "
    "/v1/kubernetes/status).",
)
@prometheus_option
def serve_cmd(
    directory: Path,
    listen: str,
    workers: int,
    header_timeout: float | None,
    body_timeout: float | None,
    idle_timeout: int | None,
    max_connections: int | None,
    kubernetes: bool,
    kubeconfig: Path | None,
    flavor: str,
    services: tuple[str, ...],
    authority_name: str,
    lease_namespace: str,
    policy_from_cluster: bool,
    policy_default: str | None,
    routes_from_cluster: bool,
    prometheus_url: str | None,
) -> None:
    """Serve the HTTPS API hosts enroll and renew with (runs until SIGTERM).

    \b
    With --prometheus URL, the service catalog (page, `catalog show`, `edges`, `slo status`)
    queries that Prometheus; the URL is recorded in DIR/prometheus.url for the other commands.

    \b
    With --kubernetes, the same process also runs the controller (one process: no --workers):
      meshagent authority serve --dir DIR --kubernetes --service billing=app=billing
    Several replicas may run it against one cluster: one Lease lets one of them write at a
    time, every replica discovers the cluster's Services for the hosts it serves.
    GET /v1/kubernetes/status (with the Prometheus discovery token) shows the controller's
    state: Lease holder, API reachable, actions taken, discovered Services.

    \b
    Replicas: run serve on several machines with the same DIR and one PostgreSQL database
    (recorded by `init --database`, or --database / MESHAGENT_AUTHORITY_DATABASE here), behind
    one address (a TCP load balancer or DNS). A join token is used once across them all; while
    the database is away the API answers 503 (Retry-After) and recovers by itself.
    """
    from agent.authority.server import limits_with, parse_listen, serve
    from agent.logs import configure

    try:
        parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    configure("info")
    limits = limits_with(
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
    )
    controller = None
    if kubernetes:
        from agent.authority.kube_controller import ControllerSettings

        controller = ControllerSettings(
            kubeconfig=kubeconfig,
            flavor="istio" if flavor == "istio" else "linkerd",
            authority_name=authority_name,
            lease_namespace=lease_namespace,
            services=tuple(ServiceRequest.parse(text) for text in services),
            policy=policy_from_cluster,
            policy_default=policy_default,
            routes=routes_from_cluster,
        )
    elif services or policy_from_cluster or routes_from_cluster:
        raise click.UsageError(
            "--service, --policy-from-cluster and --routes-from-cluster apply to the controller: "
            "add --kubernetes"
        )
    if policy_default and not policy_from_cluster:
        raise click.UsageError("--policy-default goes with --policy-from-cluster")
    if prometheus_url:
        from agent.authority.prom_query import record_url

        record_url(directory, prometheus_url)  # (checked there: a clear error before serving)
    serve(directory, listen, workers, limits, kubernetes=controller)


@authority.command("prometheus-token")
@dir_option
@click.option("--rotate", is_flag=True, help="Replace the token (the old one stops working at once).")
@json_option
def prometheus_token_cmd(directory: Path, rotate: bool, as_json: bool) -> None:
    """The bearer token Prometheus reads the fleet's target list with (/v1/prometheus/targets).

    \b
    Creates it if missing (`authority init` makes one), and prints where it is. In Prometheus:
      http_sd_configs:
        - url: https://AUTHORITY:8443/v1/prometheus/targets
          authorization: {credentials_file: /etc/prometheus/meshagent-token}  # a copy of it
          tls_config: {ca_file: /etc/prometheus/meshagent-api-ca.crt}
    """
    load_settings(directory)  # an authority directory, or a clear error
    path, written = discovery.ensure_token(directory, rotate)
    doc = {"prometheus_token_file": str(path), "created": written, "rotated": rotate}
    if as_json:
        emit_json(doc)
    elif rotate:
        click.echo(f"rotated {path}: copy it to Prometheus again (the old token is refused from now)")
    else:
        click.echo(f"{'created' if written else 'exists'}: {path}")


# --- the service catalog's metadata (#20): flags shared by `token create` and `host set` -----

_F = TypeVar("_F", bound=Callable[..., Any])
MAX_META_FILE = 64 * 1024  # bytes of --from-file read (the stored document is at most 16 KiB)

_META_OPTIONS = (
    click.option("--owner-team", metavar="TEAM", help="The team that owns the host, e.g. payments."),
    click.option(
        "--owner-contact",
        metavar="CONTACT",
        help="How to reach the owner: an address, a chat channel, a pager rota (free text).",
    ),
    click.option(
        "--description", metavar="TEXT", help=f"What the host does (at most {MAX_DESCRIPTION:,} characters)."
    ),
    click.option("--system", metavar="NAME", help="The larger system it is part of, e.g. billing."),
    click.option("--tier", metavar="TIER", help="Its tier, free text: 1, critical, ..."),
    click.option(
        "--link",
        "links",
        multiple=True,
        metavar="TITLE=URL",
        help=f"A link (repeatable, at most {MAX_LINKS}): runbook=https://..., repo=https://...; the "
        "same title replaces it, an empty URL (runbook=) removes it. http(s) URLs only.",
    ),
    click.option(
        "--slo",
        "slos",
        multiple=True,
        metavar="SPEC",
        help=f"An SLO (repeatable, at most {MAX_SLOS}; the same name replaces it): {SPEC_SYNTAX}. "
        "A latency threshold is a bucket bound of the agents' histogram (100ms, 200ms, 300ms, 500ms, "
        "1s, ...); the window defaults to 28d.",
    ),
    click.option(
        "--from-file",
        type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
        help="A YAML or JSON document of the fields (owner_team, owner_contact, description, system, "
        "tier, links: {title: url}, slos: [spec or mapping]); the fields it has replace the host's, "
        "the flags then apply on top. '-' reads standard input.",
    ),
)


def _meta_options(f: _F) -> _F:
    for option in reversed(_META_OPTIONS):
        f = option(f)
    return f


def _read_meta_file(path: Path) -> dict[str, Any]:
    where = "--from-file"
    try:
        raw = click.open_file(str(path), "rb").read(MAX_META_FILE + 1)
    except OSError as exc:
        raise MetaInvalid(where, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_META_FILE:
        raise MetaInvalid(where, f"{path} is larger than {MAX_META_FILE // 1024} KiB")
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise MetaInvalid(where, f"{path} is not YAML or JSON: {str(exc).splitlines()[0]}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise MetaInvalid(where, f"{path} must hold a mapping of fields (owner_team: ..., slos: [...])")
    return doc


def _link(text: str) -> tuple[str, str]:
    title, eq, url = text.partition("=")
    if not eq or not title.strip():
        raise MetaInvalid(
            "--link", f"{text!r} is not TITLE=URL", "e.g. --link runbook=https://wiki.example/x"
        )
    title, url = title.strip(), url.strip()
    if url:
        try:
            parse_meta({"links": [{"title": title, "url": url}]})
        except MetaInvalid as exc:
            raise MetaInvalid(f"--link {title}", exc.message.split(": ", 1)[1], exc.hint) from None
    return title, url


def _meta_edit(
    owner_team: str | None = None,
    owner_contact: str | None = None,
    description: str | None = None,
    system: str | None = None,
    tier: str | None = None,
    links: Sequence[str] = (),
    slos: Sequence[str] = (),
    from_file: Path | None = None,
    clear_slos: bool = False,
) -> Callable[[HostMeta], HostMeta]:
    """The edit the flags describe, checked now (before any database is opened): the fields of
    --from-file replace the current ones, then the text flags, --clear-slos, --link and --slo."""
    file_doc = _read_meta_file(from_file) if from_file is not None else {}
    parse_meta(file_doc)  # a bad file is refused naming its field, whatever it is applied to
    flags = {
        "owner_team": owner_team,
        "owner_contact": owner_contact,
        "description": description,
        "system": system,
        "tier": tier,
    }
    link_changes = [_link(text) for text in links]
    slo_changes = [parse_slo_spec(text, "--slo") for text in slos]

    def edit(current: HostMeta) -> HostMeta:
        doc = {**current.to_doc(), **file_doc, **{k: v for k, v in flags.items() if v is not None}}
        meta = parse_meta(doc)
        if clear_slos:
            meta = replace(meta, slos=())
        meta = replace(
            meta, links=merge_links(meta.links, link_changes), slos=merge_slos(meta.slos, slo_changes)
        )
        return parse_meta(meta.to_doc())  # the bounds again, on the result

    return edit


def _meta_text(meta: HostMeta) -> str:
    owner = meta.owner_team or "no owner"
    if meta.owner_contact:
        owner += f" ({meta.owner_contact})"
    parts = [
        f"owner {owner}",
        f"system {meta.system or '-'}",
        f"tier {meta.tier or '-'}",
        "links " + (", ".join(t for t, _ in meta.links) or "none"),
        "SLOs " + (", ".join(s.spec() for s in meta.slos) or "none"),
    ]
    return "; ".join(parts)


@authority.group("token")
def token_group() -> None:
    """Join tokens: one-time, expiring, bound to one identity."""


@token_group.command("create")
@dir_option
@database_option
@click.option("--identity", required=True, help="NAMESPACE/NAME the host will be, e.g. shop/billing.")
@click.option(
    "--url",
    required=True,
    envvar="MESHAGENT_AUTHORITY_URL",
    help="https://HOST:PORT at which hosts reach this authority. [env: MESHAGENT_AUTHORITY_URL]",
)
@click.option(
    "--ttl",
    type=Duration(maximum=MAX_TOKEN_TTL),
    default="1h",
    show_default=True,
    help="How long the token stays valid (1s to 30d).",
)
@click.option(
    "--count",
    type=click.IntRange(1, 100000),
    default=1,
    show_default=True,
    help="How many tokens to print (one per line), for a fleet of the same identity.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="A Kubernetes label for the host's ExternalWorkload/WorkloadEntry (repeatable), e.g. "
    "app=billing: what a Service selects it by. Keys app.kubernetes.io/managed-by and "
    "meshagent.io/* are meshagent's own.",
)
@click.option(
    "--port",
    "ports",
    multiple=True,
    metavar="NAME=PORT[/PROTO]",
    help="A port the host's app serves, named for Services (repeatable), e.g. http=8080 or "
    "dns=53/UDP [default protocol: TCP].",
)
@click.option(
    "--proxy-port",
    type=click.IntRange(1, 65535),
    help="The host's inbound proxy port, exported as the port named linkerd-proxy. [default: 4143]",
)
@_meta_options
@json_option
def token_create_cmd(
    directory: Path,
    identity: str,
    url: str,
    ttl: timedelta,
    count: int,
    labels: tuple[str, ...],
    ports: tuple[str, ...],
    proxy_port: int | None,
    as_json: bool,
    **meta_flags: Any,
) -> None:
    """Print join token(s). Only their hash is stored; each works once, before it expires.

    \b
    Labels and ports given here go with the host into the cluster (kube export):
      meshagent authority token create --dir DIR --identity shop/billing --url URL \\
        --label app=billing --label tier=web --port http=8080
    Change them later with `meshagent authority host label|port HOST ...`.

    \b
    What the host carries in the service catalog (owner, SLOs, ...: the flags of `host set`)
    goes with it too, copied to the host when it enrolls:
      meshagent authority token create --dir DIR --identity shop/billing --url URL \\
        --owner-team payments --owner-contact '#payments-oncall' --tier 1 \\
        --link runbook=https://wiki.example/billing --slo availability=99.9 --slo latency=99:300ms
    Change it later with `meshagent authority host set HOST ...`.
    """
    registration = _registration(labels, ports, proxy_port)
    meta = _meta_edit(**meta_flags)(HostMeta())
    auth = _open(directory)
    tokens = auth.create_tokens(identity, url, ttl, count, registration, meta)
    if as_json:
        workload = auth.identity(identity)
        emit_json(
            {
                "identity": workload.short,
                "spiffe_id": workload.spiffe_id,
                "expires_at": rfc3339(utcnow() + ttl),
                **_registration_doc(registration),
                "meta": meta.to_doc(),
                "tokens": [{"id": t.token_id, "token": t.encode()} for t in tokens],
            }
        )
        return
    for t in tokens:
        click.echo(t.encode())


@token_group.command("list")
@dir_option
@database_option
@json_option
def token_list_cmd(directory: Path, as_json: bool) -> None:
    """List tokens (by id; the secrets are not stored): identity, expiry, use."""
    load_authority(directory)
    now = utcnow()
    records = open_registry(directory).list_tokens()
    docs = [
        {
            "id": r.hash[:12],
            "identity": r.identity,
            "created_at": rfc3339(r.created_at),
            "expires_at": rfc3339(r.expires_at),
            "used_at": rfc3339(r.used_at),
            "host_id": r.host_id,
            "state": "used" if r.used_at else ("expired" if r.expires_at <= now else "unused"),
            **_registration_doc(r.registration),
            "meta": r.meta.to_doc(),
        }
        for r in records
    ]
    if as_json:
        emit_json(docs)
        return
    click.echo(
        table(
            ["ID", "IDENTITY", "STATE", "EXPIRES", "HOST"],
            [(d["id"], d["identity"], d["state"], d["expires_at"], d["host_id"]) for d in docs],
        )
    )


def _labels(texts: Sequence[str]) -> dict[str, str]:
    pairs = [parse_label(text) for text in texts]
    if len({k for k, _ in pairs}) != len(pairs):
        raise KubeObjectError("a label key is given twice", "give each label key once")
    return dict(pairs)


def _registration(labels: Sequence[str], ports: Sequence[str], proxy_port: int | None) -> Registration:
    return check_registration(_labels(labels), [parse_port(text) for text in ports], proxy_port)


def _registration_doc(reg: Registration) -> dict[str, object]:
    return {
        "labels": dict(reg.labels),
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in reg.ports],
        "proxy_port": reg.proxy_port,
    }


def _host_doc(
    h: HostRecord, td: str, reports: Mapping[str, tuple[float, str]] | None = None
) -> dict[str, object]:
    """The host as --json shows it. With `reports` (the registry's), Ready is the agent's
    reported health; without, the certificate's alone (revoke's and host edits' answers)."""
    ns, _, name = h.identity.partition("/")
    health = stored_health(h, utcnow(), reports)
    return {
        "id": h.id,
        "identity": h.identity,
        "spiffe_id": f"spiffe://{td}/ns/{ns}/sa/{name}",
        "host_name": h.host_name,
        "addresses": list(h.addresses),
        "serial": h.serial,
        "not_after": rfc3339(h.not_after),
        "enrolled_at": rfc3339(h.enrolled_at),
        "last_renewal": rfc3339(h.last_renewal),
        "revoked": h.revoked,
        "revoked_at": rfc3339(h.revoked_at),
        **_registration_doc(h.registration),
        "ready": {
            "status": health.ready,
            "reason": health.reason,
            "message": health.message,
            "since": rfc3339(health.since),
        },
        **(
            {}
            if reports is None
            else {
                "report": stored_report_doc(h, reports),
                "health": stored_fleet_health(h, utcnow(), reports).to_doc(),
            }
        ),
    }


@authority.command("hosts")
@dir_option
@database_option
@json_option
def hosts_cmd(directory: Path, as_json: bool) -> None:
    """List enrolled hosts: identity, name, addresses, certificate, renewal, revocation, the
    labels and ports `kube export` writes, and whether the host counts as Ready (and why).

    \b
    Ready: the agent reported within 3 refresh intervals, is ready, has refreshed its
    directory, and every probe it runs passes ([[health.probes]] in its config). Each host
    that is not Ready gets a line below the table saying why and since when.
    HEALTH: healthy; not ready: REASON; silent since T (no report for 3 intervals, or never);
    expiring soon (T) (late in its certificate's life, or the agent's renewal failing); revoked.
    """
    td = load_authority(directory).settings.trust_domain
    registry = open_registry(directory)
    hosts = registry.list_hosts()
    reports = registry.reports()
    metas = registry.host_meta()
    docs = [{**_host_doc(h, td, reports), "meta": metas.get(h.id, HostMeta()).to_doc()} for h in hosts]
    if as_json:
        emit_json(docs)
        return
    now = utcnow()
    healths = {h.id: stored_health(h, now, reports) for h in hosts}
    fleet = {h.id: stored_fleet_health(h, now, reports) for h in hosts}
    click.echo(
        table(
            [
                "ID",
                "IDENTITY",
                "HOST",
                "ADDRESSES",
                "SERIAL",
                "EXPIRES IN",
                "LAST RENEWAL",
                "REVOKED",
                "LABELS",
                "PORTS",
                "READY",
                "HEALTH",
            ],
            [
                (
                    h.id,
                    h.identity,
                    h.host_name,
                    ",".join(h.addresses) or "-",
                    h.serial[:12],
                    human_duration((h.not_after - now).total_seconds()),
                    rfc3339(h.last_renewal),
                    "yes" if h.revoked else "no",
                    ",".join(f"{k}={v}" for k, v in h.registration.labels) or "-",
                    ",".join(f"{n}={p}/{proto}" for n, p, proto in h.registration.ports) or "-",
                    f"{'yes' if health.ready else 'no'} ({health.reason})",
                    fleet[h.id].text,
                )
                for h in hosts
                for health in [healths[h.id]]
            ],
        )
    )
    for h in hosts:
        health = healths[h.id]
        if not health.ready and not h.revoked:
            click.echo(
                printable(
                    f"{h.id} ({h.host_name}) not ready since {rfc3339(health.since)}: "
                    f"{health.reason}: {health.message}"
                )
            )


@authority.command("revoke")
@click.argument("host")
@dir_option
@database_option
@json_option
def revoke_cmd(host: str, directory: Path, as_json: bool) -> None:
    """Revoke HOST (its id, or its name if unique): it can no longer renew.

    Takes effect at once on a running authority; no restart.
    """
    td = load_authority(directory).settings.trust_domain
    record = open_registry(directory).revoke(host, utcnow(), actor=event_kinds.cli_actor())
    if as_json:
        emit_json(_host_doc(record, td))
    else:
        click.echo(
            f"revoked {record.id} ({printable(record.host_name)}, {printable(record.identity)}); "
            f"its current certificate expires {rfc3339(record.not_after)}"
        )


@authority.group("host")
def host_group() -> None:
    """Edit one enrolled host: its Kubernetes labels and ports (what `kube export` writes), and
    what it carries in the service catalog (`host set`: owner, description, links, SLOs)."""


def _print_host(record: HostRecord, td: str, as_json: bool) -> None:
    if as_json:
        emit_json(_host_doc(record, td))
        return
    reg = record.registration
    labels = ", ".join(f"{k}={v}" for k, v in reg.labels) or "none"
    ports = ", ".join(f"{n}={p}/{proto}" for n, p, proto in reg.ports) or "none"
    proxy = reg.proxy_port or "4143 (default)"
    click.echo(
        printable(f"{record.id} ({record.host_name}): labels {labels}; ports {ports}; proxy port {proxy}")
    )


@host_group.command("label")
@click.argument("host")
@click.argument("labels", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--remove", "remove", multiple=True, metavar="KEY", help="Remove this label (repeatable).")
@dir_option
@database_option
@json_option
def host_label_cmd(
    host: str, labels: tuple[str, ...], remove: tuple[str, ...], directory: Path, as_json: bool
) -> None:
    """Set (KEY=VALUE) or remove (--remove KEY) labels of HOST (its id, or its name if unique).

    \b
    meshagent authority host label legacy-db-1 app=billing tier=db --remove canary
    Export again (meshagent authority kube export) and apply for the cluster to see it.
    """
    td = load_authority(directory).settings.trust_domain
    pairs = _labels(labels)
    if not pairs and not remove:
        raise click.UsageError("give KEY=VALUE labels to set or --remove KEY")
    record = open_registry(directory).update_registration(
        host, lambda h: edit_registration(h.registration, set_labels=pairs, remove_labels=remove)
    )
    _print_host(record, td, as_json)


@host_group.command("port")
@click.argument("host")
@click.argument("ports", nargs=-1, metavar="[NAME=PORT[/PROTO]]...")
@click.option(
    "--remove", "remove", multiple=True, metavar="NAME", help="Remove the port so named (repeatable)."
)
@click.option(
    "--proxy-port",
    type=click.IntRange(1, 65535),
    help="The host's inbound proxy port (exported as linkerd-proxy). [default: 4143]",
)
@dir_option
@database_option
@json_option
def host_port_cmd(
    host: str,
    ports: tuple[str, ...],
    remove: tuple[str, ...],
    proxy_port: int | None,
    directory: Path,
    as_json: bool,
) -> None:
    """Set (NAME=PORT[/PROTO], replacing one of the same name) or remove (--remove NAME) the
    named ports of HOST's app.

    \b
    meshagent authority host port legacy-db-1 postgres=5432 metrics=9187 --remove http
    """
    td = load_authority(directory).settings.trust_domain
    parsed = [parse_port(text) for text in ports]
    if not parsed and not remove and proxy_port is None:
        raise click.UsageError("give NAME=PORT ports to set, --remove NAME or --proxy-port PORT")
    record = open_registry(directory).update_registration(
        host,
        lambda h: edit_registration(
            h.registration, set_ports=parsed, remove_ports=remove, proxy_port=proxy_port
        ),
    )
    _print_host(record, td, as_json)


@host_group.command("set")
@click.argument("host")
@_meta_options
@click.option("--clear-slos", is_flag=True, help="Remove every SLO first (then --slo adds).")
@dir_option
@database_option
@json_option
def host_set_cmd(host: str, directory: Path, as_json: bool, **meta_flags: Any) -> None:
    """Set what HOST (its id, or its name if unique) carries in the service catalog: owner,
    description, system, tier, links and SLOs. Fields not given keep their value.

    \b
      meshagent authority host set legacy-db-1 --owner-team payments \\
        --owner-contact '#payments-oncall' --system billing --tier 1 \\
        --link runbook=https://wiki.example/ledger --link repo=https://git.example/ledger
      meshagent authority host set legacy-db-1 --slo availability=99.9 \\
        --slo latency=99:300ms,port=5432 --slo availability=99,direction=outbound,name=calls-out
      meshagent authority host set legacy-db-1 --clear-slos --link runbook=   # none; no runbook
      meshagent authority host set legacy-db-1 --from-file ledger.yaml

    \b
    An SLO SPEC: availability=PERCENT (of requests not failing) or latency=PERCENT:THRESHOLD
    (of requests answered under THRESHOLD), then optionally ,window=28d (1-90 days)
    ,direction=inbound|outbound (requests the host serves, or makes) ,port=N (one port; all by
    default) ,name=NAME (a-z, 0-9, -; default: the kind; unique per host).

    \b
    Limits: text fields 200 characters, description 2,000, 10 links (http/https), 10 SLOs, the
    whole document 16 KiB. Text is stored as given (HTML too) and shown as text.
    Each change is logged (meshagent authority changes HOST). Hosts are not told: nothing in
    their directory changes.
    """
    td = load_authority(directory).settings.trust_domain
    given = {k: v for k, v in meta_flags.items() if v not in (None, (), False)}
    if not given:
        raise click.UsageError("give at least one field to set, e.g. --owner-team TEAM (see --help)")
    edit = _meta_edit(**meta_flags)
    before: list[HostMeta] = []

    def edit_noting(current: HostMeta) -> HostMeta:
        before.append(current)  # what was stored, read in set_host_meta's transaction
        return edit(current)

    registry = open_registry(directory)
    record = registry.set_host_meta(host, edit_noting, event_kinds.cli_actor(), utcnow())
    meta = registry.host_meta([record.id])[record.id]
    changed = meta != before[-1]
    if as_json:
        # "changed": whether the stored metadata differs now (Ansible's changed_when reads it)
        emit_json({**_host_doc(record, td), "meta": meta.to_doc(), "changed": changed})
        return
    click.echo(
        printable(
            f"{record.id} ({record.host_name}): {_meta_text(meta)}" + ("" if changed else " (unchanged)")
        )
    )


@authority.command("changes")
@click.argument("host", required=False)
@click.option(
    "--limit",
    type=click.IntRange(1, event_kinds.MAX_LIMIT),
    default=event_kinds.DEFAULT_LIMIT,
    show_default=True,
    help="How many events to show (the newest).",
)
@dir_option
@database_option
@json_option
def changes_cmd(host: str | None, limit: int, directory: Path, as_json: bool) -> None:
    """What changed recently, newest first: of HOST (its id, or its name if unique), or of
    every host. Each event says when, what, and who or what caused it.

    \b
      meshagent authority changes                 # the whole fleet
      meshagent authority changes legacy-db-1 --limit 20
      meshagent authority changes legacy-db-1 --json

    \b
    Kinds: enrolled (actor token:ID, the join token's id), renewed (agent), revoked (cli:USER),
    metadata_changed (cli:USER: which fields), policy_changed (cli:USER or controller: for
    each host of the identity), and, from the agents' reports (actor report):
    agent_version_changed, restarted, config_changed (old -> new digest), ready, not_ready,
    probe_failing, probe_recovered.
    The newest 500 events of each host are kept.
    """
    load_authority(directory)
    registry = open_registry(directory)
    hosts = registry.list_hosts()
    names = {h.id: h.host_name for h in hosts}
    host_id = None
    if host is not None:
        matches = [h.id for h in hosts if h.id == host] or [
            h.id for h in hosts if h.host_name == host and not h.revoked
        ]
        if len(matches) != 1:
            raise RejectedError(
                f"no enrolled host with id or name {host!r}"
                if not matches
                else f"{len(matches)} hosts are named {host!r} ({', '.join(matches)})",
                "list hosts with: meshagent authority hosts" if not matches else "name it by host id",
                code="host_unknown" if not matches else "host_ambiguous",
            )
        host_id = matches[0]
    found = registry.events(host_id, limit)
    if as_json:
        emit_json([{**e.to_doc(), "at": rfc3339(e.at), "host_name": names.get(e.host_id)} for e in found])
        return
    if not found:
        click.echo("no changes recorded" + (f" for {host}" if host else ""))
        return
    click.echo(
        table(
            ["TIME", "HOST", "KIND", "DETAIL", "ACTOR"],
            [
                (rfc3339(e.at), names.get(e.host_id, e.host_id), e.kind, e.detail or "-", e.actor)
                for e in found
            ],
        )
    )


@authority.group("kube")
def kube_group() -> None:
    """Kubernetes: the enrolled hosts as cluster objects (ExternalWorkload / WorkloadEntry)."""


@kube_group.command("export")
@dir_option
@database_option
@click.option(
    "--flavor",
    type=click.Choice(["linkerd", "istio"]),
    default="linkerd",
    show_default=True,
    help="linkerd: ExternalWorkload (workload.linkerd.io/v1beta1); "
    "istio: WorkloadEntry (networking.istio.io/v1).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="HOST",
    help="Only this host, by id or name (repeatable) [default: every enrolled, unrevoked host].",
)
@click.option("--namespace", help="Only hosts whose identity is in this namespace (where their objects go).")
@click.option(
    "--service",
    "services",
    multiple=True,
    metavar="NAME=KEY=VALUE[,KEY=VALUE]",
    help="Also a ClusterIP Service NAME selecting hosts with these labels (repeatable), in each "
    "namespace holding such hosts; its ports are theirs, by name.",
)
@click.option(
    "--status",
    "status",
    is_flag=True,
    help="Instead of the objects, print the `kubectl patch --subresource=status` commands that set "
    "their Ready (istio: Healthy) condition, as a shell script.",
)
@click.option(
    "--authority-name",
    default="default",
    show_default=True,
    help="The meshagent.io/authority label on every object: give each authority writing into one "
    "cluster its own.",
)
def kube_export_cmd(
    directory: Path,
    flavor: str,
    hosts: tuple[str, ...],
    namespace: str | None,
    services: tuple[str, ...],
    status: bool,
    authority_name: str,
) -> None:
    """Print the hosts as Kubernetes objects (YAML) for `kubectl apply -f -` or GitOps.

    \b
    Worked example (Linkerd; the host enrolled with a token made with labels and ports):
      meshagent authority token create --dir DIR --identity shop/billing --url URL \\
          --label app=billing --port http=8080
      meshagent enroll TOKEN --address 192.0.2.10          # on the host
      meshagent authority kube export --dir DIR --service billing=app=billing \\
          | kubectl apply -f -
      meshagent authority kube export --dir DIR --status | sh
      kubectl get externalworkloads -n shop
    \b
    The objects are applied without status: both CRDs have a status subresource, which
    `kubectl apply` cannot write, so --status prints one `kubectl patch --subresource=status`
    per host (kubectl >= 1.24) setting Ready from the host's health as `authority hosts` shows
    it: True (AgentReady) while its agent reports within 3 refresh intervals, ready, with every
    probe passing; else False with the reason (NeverReported, AgentStale, AgentNotReady,
    ProbeFailed, CertificateExpired). The script is a snapshot: run it again (or run the
    controller, serve --kubernetes) to follow changes. Until it runs, Linkerd treats the
    workload as not ready and sends it no traffic.
    \b
    Revoked hosts are not exported. Delete what a revoked host left in the cluster with
      kubectl delete externalworkloads -A \\
          -l app.kubernetes.io/managed-by=meshagent,meshagent.io/host-id=HOST_ID
    or prune: every object carries app.kubernetes.io/managed-by=meshagent and
    meshagent.io/authority=NAME, so a full export (no --host, no --namespace) applied with
      kubectl apply --prune -l app.kubernetes.io/managed-by=meshagent,meshagent.io/authority=default \\
          --prune-allowlist=workload.linkerd.io/v1beta1/ExternalWorkload -f -
    (or a GitOps tool's prune) removes the objects of hosts no longer exported.
    Nothing here talks to a cluster: the objects are checked against the CRDs' schemas only.
    """
    settings = load_authority(directory).settings
    requests = [ServiceRequest.parse(text) for text in services]
    registry = open_registry(directory)
    result = export(
        registry.list_hosts(),
        trust_domain=settings.trust_domain,
        mesh=settings.mesh,
        now=utcnow(),
        flavor="istio" if flavor == "istio" else "linkerd",
        authority=validate_authority_name(authority_name),
        refs=hosts,
        namespace=namespace,
        services=requests,
        reports=registry.reports(),
    )
    for skipped in result.skipped:
        click.echo(printable(f"warning: {skipped.host} not exported: {skipped.reason}"), err=True)
        if skipped.hint:
            click.echo(printable(f"  hint: {skipped.hint}"), err=True)
    if status:
        click.echo(status_script(result.objects), nl=False)
    else:
        click.echo(render_yaml(without_status(obj) for obj in result.objects), nl=False)


@authority.group("catalog")
def catalog_group() -> None:
    """Meshed destinations: enrolled hosts are in it by themselves; add in-cluster services here."""


@catalog_group.command("add")
@dir_option
@database_option
@click.option("--cidr", required=True, help="Address or network of the destination, e.g. 10.96.0.0/12.")
@click.option(
    "--port",
    "ports",
    type=click.IntRange(1, 65535),
    multiple=True,
    help="Destination port (repeatable) [default: every port].",
)
@click.option(
    "--identity",
    required=True,
    help="What the destination proves: NAMESPACE/NAME (shop/orders), its SPIFFE ID or its mesh DNS name "
    "(orders.shop.serviceaccount.identity.linkerd.cluster.local).",
)
@click.option(
    "--opaque-port",
    type=int,
    metavar="PORT",
    help="The endpoints are in-cluster pods whose linkerd2-proxy expects Linkerd's transport header "
    "on PORT (4143 when the cluster runs outboundTransportMode=transport-header or the port is "
    "opaque): hosts dial PORT with ALPN transport.l5d.io/v1 and name the original port in the header "
    "[default: plain mTLS to the original port].",
)
@json_option
def catalog_add_cmd(
    directory: Path,
    cidr: str,
    ports: tuple[int, ...],
    identity: str,
    opaque_port: int | None,
    as_json: bool,
) -> None:
    """Declare that connections to CIDR[:PORT] must reach a server proving IDENTITY over mTLS."""
    entry = _open(directory).add_static_entry(cidr, ports, identity, opaque_port)
    if as_json:
        emit_json(entry.__dict__)
    else:
        via = "" if entry.opaque_port is None else f" via transport header on port {entry.opaque_port}"
        click.echo(
            printable(
                f"added {entry.id}: {entry.cidr} ports {list(entry.ports) or 'all'} -> {entry.identity}{via}"
            )
        )


@catalog_group.command("list")
@dir_option
@database_option
@json_option
def catalog_list_cmd(directory: Path, as_json: bool) -> None:
    """The catalog hosts receive: enrolled hosts' addresses and static entries."""
    entries = _open(directory).catalog()
    if as_json:
        emit_json(entries)
        return
    click.echo(
        table(
            ["SOURCE", "CIDR", "PORTS", "IDENTITY", "OPAQUE PORT"],
            [
                (
                    e["source"],
                    e["cidr"],
                    ",".join(map(str, e["ports"])) or "all",
                    e["identity"],
                    e.get("opaque_port"),
                )
                for e in entries
            ],
        )
    )


@catalog_group.command("remove")
@click.argument("entry_id")
@dir_option
@database_option
def catalog_remove_cmd(entry_id: str, directory: Path) -> None:
    """Remove a static entry (by the id `catalog list` shows as static:<id>)."""
    open_registry(directory).remove_static_entry(entry_id.removeprefix("static:"))
    click.echo(printable(f"removed {entry_id}"))


@authority.group("policy")
def policy_group() -> None:
    """Inbound authorization for enrolled hosts, by their identity and port."""


@policy_group.command("set")
@dir_option
@database_option
@click.option("--identity", required=True, help="Hosts enrolled as NAMESPACE/NAME get this policy.")
@click.option(
    "--port", type=click.IntRange(1, 65535), help="The port it applies to [default: all other ports]."
)
@click.option(
    "--default",
    "default_policy",
    required=True,
    type=click.Choice(["all-unauthenticated", "all-authenticated", "deny", "audit"]),
    help="Who may connect when the allow-list is empty (audit: everyone, flagging in the logs "
    "and metrics whom deny would refuse).",
)
@click.option(
    "--allow",
    multiple=True,
    help="A client SPIFFE ID or glob (spiffe://TD/ns/shop/*), or the same in DNS form "
    "(*.shop.serviceaccount.identity.linkerd.TD), repeatable: only these may connect.",
)
@json_option
def policy_set_cmd(
    directory: Path,
    identity: str,
    port: int | None,
    default_policy: str,
    allow: tuple[str, ...],
    as_json: bool,
) -> None:
    """Set who may connect to hosts enrolled as IDENTITY (on PORT, or by default).

    Hosts pick it up at their next refresh (30 s by default); no restart anywhere.
    """
    record = _open(directory).set_policy(identity, port or 0, default_policy, allow, event_kinds.cli_actor())
    if as_json:
        emit_json(record.__dict__)
    else:
        click.echo(
            printable(
                f"{record.identity} port {record.port or 'default'}: {record.default_policy}"
                + (f", allow {', '.join(record.allow)}" if record.allow else "")
            )
        )


@policy_group.command("apply")
@dir_option
@database_option
@click.option(
    "-f",
    "--filename",
    "source",
    type=click.File("rb"),
    required=True,
    help="The objects, YAML (one or many documents, or a List); - reads standard input.",
)
@click.option(
    "--default",
    "default_policy",
    type=click.Choice(["all-unauthenticated", "all-authenticated", "deny", "audit"]),
    help="The cluster's default policy, for ports no Server selects (Linkerd's "
    "proxy.defaultInboundPolicy) [default: each host keeps its own].",
)
@click.option("--dry-run", is_flag=True, help="Print what would be stored; store nothing.")
@click.option(
    "--authority-name",
    default="default",
    show_default=True,
    help="The meshagent.io/authority label a Server may select on (as `kube export` writes it).",
)
@json_option
def policy_apply_cmd(
    directory: Path,
    source: BinaryIO,
    default_policy: str | None,
    dry_run: bool,
    authority_name: str,
    as_json: bool,
) -> None:
    """Set the enrolled hosts' policy from Linkerd or SMI policy objects, as the cluster would.

    \b
    Read: Linkerd's Server (policy.linkerd.io/v1beta2+, externalWorkloadSelector),
    AuthorizationPolicy, MeshTLSAuthentication; SMI's TrafficTarget and TCPRoute. A Server
    selects hosts by the labels and named ports of their ExternalWorkload (`kube export`:
    token create --label/--port, host label/port), in the namespace of their identity.
    \b
    Worked example: hosts enrolled as shop/billing with --label app=billing --port http=8080,
    and policy.yaml holding
      apiVersion: policy.linkerd.io/v1beta3
      kind: Server
      metadata: {namespace: shop, name: billing-http}
      spec:
        externalWorkloadSelector: {matchLabels: {app: billing}}
        port: http
      ---
      apiVersion: policy.linkerd.io/v1alpha1
      kind: MeshTLSAuthentication
      metadata: {namespace: shop, name: billing-clients}
      spec:
        identities: ["web.shop.serviceaccount.identity.linkerd.cluster.local"]
      ---
      apiVersion: policy.linkerd.io/v1alpha1
      kind: AuthorizationPolicy
      metadata: {namespace: shop, name: billing-http}
      spec:
        targetRef: {group: policy.linkerd.io, kind: Server, name: billing-http}
        requiredAuthenticationRefs:
          - {group: policy.linkerd.io, kind: MeshTLSAuthentication, name: billing-clients}
    \b
      meshagent authority policy apply --dir DIR -f policy.yaml --dry-run
      meshagent authority policy apply --dir DIR -f policy.yaml --default all-authenticated
      kubectl get servers,authorizationpolicies,meshtlsauthentications -n shop -o yaml \\
          | meshagent authority policy apply --dir DIR -f -
    stores shop/billing port 8080: deny, allow spiffe://cluster.local/ns/shop/sa/web, and
    port default: all-authenticated. Hosts pick it up at their next refresh (30 s by default).
    \b
    The whole file is refused, nothing stored, if any object is invalid or cannot be honoured
    exactly (NetworkAuthentication, cluster-* policies, HTTPRoute targets); every problem is
    listed. All records are stored in one transaction. Apply only adds and replaces records:
    policies the file no longer yields stay until `policy remove`.
    """
    try:
        _apply_policy(directory, source, default_policy, dry_run, authority_name, as_json)
    except KubePolicyError as exc:
        if as_json:
            raise  # the normal handler's JSON error, problems in its message
        # One problem a line: the normal handler prints a message as one line.
        for line in exc.message.splitlines():
            click.echo(printable(f"error: {line}" if not line.startswith(" ") else line), err=True)
        click.echo(printable(f"  hint: {exc.hint}"), err=True)
        raise SystemExit(int(exc.exit_code)) from None


def _apply_policy(
    directory: Path,
    source: BinaryIO,
    default_policy: str | None,
    dry_run: bool,
    authority_name: str,
    as_json: bool,
) -> None:
    data = source.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise KubePolicyError(
            [f"{source.name}: larger than {MAX_BYTES} bytes (a policy file, not a cluster dump)"]
        )
    auth = _open(directory)
    s = auth.material.settings
    policy = parse_policy(data, ClusterSettings(s.trust_domain, s.mesh, default_policy))
    name = validate_authority_name(authority_name)
    now = utcnow()
    views: list[HostView] = []
    for h in auth.registry.list_hosts():
        if h.revoked:
            continue
        ident = WorkloadIdentity.parse_short(h.identity, s.trust_domain, s.mesh)
        try:
            views.append(HostView.from_workload(host_workload(h, ident, now), name))
        except KubeObjectError:
            # No address (or unreadable labels): no ExternalWorkload, but its labels and ports
            # still say what the cluster's Servers would select.
            views.append(HostView(ident, dict(h.registration.labels), workload_ports(h.registration)))
    planned = plan(policy, views)
    if not dry_run:
        auth.set_policies([p.record for p in planned], event_kinds.cli_actor())
    docs = [
        {
            "identity": p.record.identity,
            "port": p.record.port,
            "default_policy": p.record.default_policy,
            "allow": list(p.record.allow),
            "source": p.source,
        }
        for p in planned
    ]
    if as_json:
        emit_json(docs)
        return
    click.echo(
        table(
            ["IDENTITY", "PORT", "DEFAULT", "ALLOW", "SOURCE"],
            [
                (r.identity, r.port or "default", r.default_policy, ", ".join(r.allow) or "-", p.source)
                for p in planned
                for r in [p.record]
            ],
        )
    )
    counts = ", ".join(f"{n} {kind}" for kind, n in policy.counts.items())
    verb = "would store" if dry_run else "stored"
    click.echo(
        printable(f"{verb} {len(planned)} record(s) for {len(views)} host(s) from {counts}"),
        err=True,
    )


@policy_group.command("list")
@dir_option
@database_option
@json_option
def policy_list_cmd(directory: Path, as_json: bool) -> None:
    """Every policy, by identity and port."""
    load_authority(directory)
    records = open_registry(directory).policies()
    if as_json:
        emit_json([r.__dict__ for r in records])
        return
    click.echo(
        table(
            ["IDENTITY", "PORT", "DEFAULT", "ALLOW"],
            [(r.identity, r.port or "default", r.default_policy, ", ".join(r.allow) or "-") for r in records],
        )
    )


@policy_group.command("remove")
@dir_option
@database_option
@click.option("--identity", required=True)
@click.option("--port", type=click.IntRange(1, 65535))
def policy_remove_cmd(directory: Path, identity: str, port: int | None) -> None:
    """Remove the policy for IDENTITY on PORT (or its default)."""
    auth = _open(directory)
    auth.registry.remove_policy(auth.identity(identity).short, port or 0, event_kinds.cli_actor())
    click.echo(printable(f"removed {identity} port {port or 'default'}"))


# The service catalog's commands (issue #20) live in modules of their own, which use the options
# above: imported last for that reason.
from . import authority_backstage, authority_catalog, authority_route, authority_slo  # noqa: E402

for _module in (authority_slo, authority_catalog, authority_backstage, authority_route):
    _module.register(authority, catalog_group)
