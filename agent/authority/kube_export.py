"""`meshagent authority kube export`: the registry's hosts as Kubernetes objects (issue #17).

The export way, no controller: read the host records, make each enrolled, unrevoked host a
Linkerd ExternalWorkload or an Istio WorkloadEntry (agent/authority/kube_objects.py), add the
Services the operator asks for, and hand back objects for `kubectl apply -f -` and, because
both CRDs have a status subresource that ignores `status` on apply, the `kubectl patch
--subresource=status` commands that set the Ready (Healthy) condition.

Health: with the registry's stored agent reports (`reports=`), a host is Ready while its agent
reports in time, ready, with every probe passing (agent/authority/health.py); without them,
while it is enrolled, unrevoked and its certificate unexpired (reason CertificateValid).

Also here: parsing and validating what the operator declares at token time (labels, named ports,
the inbound proxy port), stored raw in the registry (storage.Registration).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent.identity.names import InvalidName, WorkloadIdentity

from . import health
from .health import (
    UNCHECKED,
    HostReport,
    Unchecked,
    load_report,
)
from .kube_objects import (
    HOST_ID_LABEL,
    LINKERD_DEFAULT_INBOUND_PORT,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PROTOCOLS,
    Flavor,
    Health,
    HostWorkload,
    KubeObject,
    KubeObjectError,
    WorkloadPort,
    host_object,
    service,
    status_patch,
    validate_app_ports,
    validate_labels,
    validate_namespace,
    validate_service_name,
)
from .storage import HostRecord, Registration

# kubectl's fully qualified resource names: a short kind could be another group's.
RESOURCES = {
    "ExternalWorkload": "externalworkloads.workload.linkerd.io",
    "WorkloadEntry": "workloadentries.networking.istio.io",
}


class KubeExportError(KubeObjectError):
    code = "kube_export_failed"


# --- what the operator declares ----------------------------------------------------------------


def parse_label(text: str) -> tuple[str, str]:
    """`KEY=VALUE` (the value may be empty), as `--label app=billing`."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise KubeObjectError(
            f"label {text[:100]!r} is not KEY=VALUE", "for example: --label app=billing --label tier=web"
        )
    validate_labels({key: value})
    return key, value


def parse_port(text: str) -> WorkloadPort:
    """`NAME=PORT[/PROTOCOL]`, as `--port http=8080` or `--port redis=6379/TCP`."""
    name, eq, rest = text.partition("=")
    number, slash, protocol = rest.partition("/")
    hint = "for example: --port http=8080 --port dns=53/UDP (NAME=PORT[/TCP|UDP])"
    if not eq or not name or not number.isascii() or not number.isdigit() or len(number) > 5:
        raise KubeObjectError(f"port {text[:100]!r} is not NAME=PORT[/PROTOCOL]", hint)
    if slash and protocol.upper() not in PROTOCOLS:
        raise KubeObjectError(f"port {text[:100]!r}: protocol {protocol[:20]!r} is not TCP or UDP", hint)
    return WorkloadPort(name, int(number), protocol.upper() if slash else "TCP")


def check_registration(
    labels: Mapping[str, str], ports: Sequence[WorkloadPort], proxy_port: int | None
) -> Registration:
    """The declaration, refused as a whole if any part would make an invalid object: labels
    as the API server takes them (meshagent's own keys refused), port names and numbers unique,
    none of them the proxy's."""
    checked = validate_labels(labels)
    inbound = LINKERD_DEFAULT_INBOUND_PORT if proxy_port is None else proxy_port
    if isinstance(inbound, bool) or not 0 < inbound <= 65535:
        raise KubeObjectError(f"proxy port {inbound!r} is not a port number", "use 1-65535, e.g. 4143")
    validate_app_ports(ports, inbound, "list only the app's own ports (--proxy-port sets the proxy's)")
    return Registration(
        labels=tuple(checked.items()),
        ports=tuple((p.name, p.port, p.protocol) for p in ports),
        proxy_port=proxy_port,
    )


def edit_registration(
    current: Registration,
    *,
    set_labels: Mapping[str, str] | None = None,
    remove_labels: Sequence[str] = (),
    set_ports: Sequence[WorkloadPort] = (),
    remove_ports: Sequence[str] = (),
    proxy_port: int | None = None,
) -> Registration:
    """`current` with labels/ports set or removed (a port is replaced by name), checked whole.
    Removing what is not there is refused: a misspelt key should not look like success."""
    labels = dict(current.labels)
    for key in remove_labels:
        if key not in labels:
            raise KubeObjectError(f"the host has no label {key!r}", f"its labels: {_keys(labels)}")
        del labels[key]
    labels.update(set_labels or {})
    ports = {name: WorkloadPort(name, port, proto) for name, port, proto in current.ports}
    for name in remove_ports:
        if name not in ports:
            raise KubeObjectError(f"the host has no port named {name!r}", f"its ports: {_keys(ports)}")
        del ports[name]
    for p in set_ports:
        ports[p.name] = p
    inbound = current.proxy_port if proxy_port is None else proxy_port
    return check_registration(labels, list(ports.values()), inbound)


def _keys(items: Mapping[str, object]) -> str:
    return ", ".join(sorted(items)) or "none"


def workload_ports(reg: Registration) -> tuple[WorkloadPort, ...]:
    return tuple(WorkloadPort(n, p, proto) for n, p, proto in reg.ports)


# --- health and the host's workload -------------------------------------------------------------


def host_health(
    host: HostRecord,
    now: datetime,
    report: HostReport | Unchecked | None = UNCHECKED,
    received_at: datetime | None = None,
) -> Health:
    """The host's Ready condition (agent/authority/health.py). Without `report`, the
    certificate alone (enrolled, unrevoked, unexpired), as before agents reported."""
    return health.host_health(host, now, report, received_at)


def stored_health(host: HostRecord, now: datetime, reports: Mapping[str, tuple[float, str]] | None) -> Health:
    """host_health from the registry's `reports()` (None: do not consult reports)."""
    if reports is None:
        return host_health(host, now)
    stored = reports.get(host.id)
    if stored is None:
        return host_health(host, now, None, None)
    at, text = stored
    return host_health(host, now, load_report(text), datetime.fromtimestamp(at, UTC))


def host_workload(
    host: HostRecord,
    identity: WorkloadIdentity,
    now: datetime,
    reports: Mapping[str, tuple[float, str]] | None = None,
) -> HostWorkload:
    """The kube_objects record for one stored host; KubeObjectError says what is wrong with it.
    `reports` (the registry's) make its health the agent's; None: the certificate's alone."""
    reg = host.registration
    if reg.unreadable:
        raise KubeExportError(
            f"host {host.id}: its stored labels or ports are unreadable",
            f"set them again: meshagent authority host label {host.id} ... / host port {host.id} ...",
        )
    if not host.addresses:
        raise KubeExportError(
            f"host {host.host_name!r} ({host.id}) has no address: no cluster proxy could reach it",
            "enroll it again with --address (addresses are taken at enrollment)",
        )
    return HostWorkload(
        host_id=host.id,
        host_name=host.host_name,
        identity=identity,
        addresses=host.addresses,
        ports=workload_ports(reg),
        health=stored_health(host, now, reports),
        labels=reg.labels,
        inbound_proxy_port=LINKERD_DEFAULT_INBOUND_PORT if reg.proxy_port is None else reg.proxy_port,
    )


# --- the export ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceRequest:
    """`--service NAME=KEY=VALUE[,KEY=VALUE...]`: a Service named NAME selecting those labels."""

    name: str
    selector: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> ServiceRequest:
        hint = "for example: --service billing=app=billing or --service web=app=shop,tier=web"
        name, eq, rest = text.partition("=")
        if not eq or not name or not rest:
            raise KubeObjectError(f"service {text[:100]!r} is not NAME=KEY=VALUE[,KEY=VALUE...]", hint)
        validate_service_name(name)
        pairs = [parse_label(part) for part in rest.split(",")]
        if len({k for k, _ in pairs}) != len(pairs):
            raise KubeObjectError(f"service {name!r} selects one label key twice", hint)
        return cls(name, tuple(sorted(pairs)))


@dataclass(frozen=True)
class Skipped:
    host: str
    reason: str
    hint: str


@dataclass
class Export:
    """The objects (host objects first, then Services) and the hosts left out, with why."""

    objects: list[KubeObject] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def select_hosts(hosts: Sequence[HostRecord], refs: Sequence[str]) -> list[HostRecord]:
    """The hosts named by id or name (unrevoked first), in registry order; all unrevoked hosts
    when `refs` is empty. A name matching nothing, several hosts, or only a revoked host is
    refused: an export that silently lacks a host would make a GitOps prune delete it."""
    if not refs:
        return [h for h in hosts if not h.revoked]
    chosen: dict[str, HostRecord] = {}
    for ref in refs:
        matches = [h for h in hosts if h.id == ref] or [h for h in hosts if h.host_name == ref]
        live = [h for h in matches if not h.revoked]
        if not matches:
            raise KubeExportError(
                f"no enrolled host with id or name {ref!r}",
                "list hosts with: meshagent authority hosts",
                code="host_unknown",
            )
        if not live:
            raise KubeExportError(
                f"host {ref!r} ({matches[0].id}) is revoked: revoked hosts are not exported",
                "delete its object if it is still in the cluster: kubectl delete externalworkloads "
                f"(Istio: workloadentries) -A -l {MANAGED_BY_LABEL}={MANAGED_BY},"
                f"{HOST_ID_LABEL}={matches[0].id}",
                code="host_revoked",
            )
        if len(live) > 1:
            raise KubeExportError(
                f"{len(live)} hosts are named {ref!r} ({', '.join(h.id for h in live)})",
                "name the host by its id",
                code="host_ambiguous",
            )
        chosen[live[0].id] = live[0]
    return [h for h in hosts if h.id in chosen]


def desired_workloads(
    hosts: Sequence[HostRecord],
    *,
    trust_domain: str,
    mesh: str,
    now: datetime,
    refs: Sequence[str] = (),
    namespace: str | None = None,
    reports: Mapping[str, tuple[float, str]] | None = None,
) -> tuple[list[HostWorkload], list[Skipped]]:
    """The chosen hosts as kube_objects records (for export, or a controller's desired state).
    A host named in `refs` that cannot be exported is an error; without `refs`, such a host is
    skipped and reported (the rest still export)."""
    if namespace is not None:
        validate_namespace(namespace)
    workloads: list[HostWorkload] = []
    skipped: list[Skipped] = []
    for host in select_hosts(hosts, refs):
        try:
            identity = WorkloadIdentity.parse_short(host.identity, trust_domain, mesh)
            workload = host_workload(host, identity, now, reports)
        except (KubeObjectError, InvalidName) as exc:
            if refs:
                raise KubeExportError(exc.message, exc.hint, code=exc.code) from None
            skipped.append(Skipped(host.id, exc.message, exc.hint))
            continue
        if namespace is not None and identity.namespace != namespace:
            if refs:
                raise KubeExportError(
                    f"host {host.host_name!r} ({host.id}) is in namespace {identity.namespace!r}, "
                    f"not {namespace!r}",
                    "its objects live in its identity's namespace; drop --namespace or --host",
                )
            continue
        workloads.append(workload)
    return workloads, skipped


def export(
    hosts: Sequence[HostRecord],
    *,
    trust_domain: str,
    mesh: str,
    now: datetime,
    flavor: Flavor = "linkerd",
    authority: str = "default",
    refs: Sequence[str] = (),
    namespace: str | None = None,
    services: Sequence[ServiceRequest] = (),
    reports: Mapping[str, tuple[float, str]] | None = None,
) -> Export:
    """The objects for the chosen hosts (see desired_workloads), then the Services asked for;
    no host at all is an error (an empty export applied with prune would delete everything)."""
    workloads, skipped = desired_workloads(
        hosts, trust_domain=trust_domain, mesh=mesh, now=now, refs=refs, namespace=namespace, reports=reports
    )
    if not workloads:
        where = f" in namespace {namespace!r}" if namespace else ""
        raise KubeExportError(
            f"no host to export{where}: no enrolled, unrevoked host with an address",
            "enroll one (meshagent authority token create ... then meshagent enroll on the host), "
            "and list them with: meshagent authority hosts",
            code="no_hosts",
        )
    out = Export(skipped=skipped)
    out.objects.extend(host_object(w, flavor, authority) for w in workloads)
    for request in services:
        out.objects.extend(_services(request, workloads, authority))
    return out


def _services(request: ServiceRequest, workloads: Sequence[HostWorkload], authority: str) -> list[KubeObject]:
    """One Service per namespace holding selected hosts (a Service selects in its own
    namespace only), its ports the union of theirs by name."""
    selector = dict(request.selector)
    by_namespace: dict[str, dict[str, WorkloadPort]] = {}
    for w in workloads:
        if not selector.items() <= w.label_map.items():
            continue
        ports = by_namespace.setdefault(w.identity.namespace, {})
        for p in w.ports:
            if ports.setdefault(p.name, p) != p:
                raise KubeExportError(
                    f"service {request.name!r}: port {p.name!r} is {ports[p.name].port}/"
                    f"{ports[p.name].protocol} on one host and {p.port}/{p.protocol} on another",
                    "give the selected hosts the same port under one name (meshagent authority host port)",
                )
    wanted = ",".join(f"{k}={v}" for k, v in request.selector)
    if not by_namespace:
        raise KubeExportError(
            f"service {request.name!r} selects no exported host ({wanted})",
            "label the hosts (meshagent authority host label HOST KEY=VALUE) or fix the selector",
        )
    objects = []
    for ns, ports in sorted(by_namespace.items()):
        if not ports:
            raise KubeExportError(
                f"service {request.name!r}: the hosts it selects in {ns!r} declare no ports",
                "declare them: meshagent authority host port HOST http=8080",
            )
        objects.append(service(request.name, ns, selector, list(ports.values()), authority))
    return objects


def status_script(objects: Sequence[KubeObject]) -> str:
    """One `kubectl patch --subresource=status` per host object (kubectl >= 1.24), as a shell
    script: `kubectl apply` cannot write status, the status subresource ignores it there."""
    lines = [
        "# The Ready/Healthy conditions, through the status subresource (kubectl >= 1.24).",
        "# Run after `kubectl apply`: ... kube export --status | sh",
        "set -e",
    ]
    for obj in objects:
        resource = RESOURCES.get(obj["kind"])
        if resource is None:
            continue  # a Service has no status of ours
        patch = status_patch(obj)
        body = json.dumps({"status": patch["status"]}, separators=(",", ":"), sort_keys=True)
        meta = patch["metadata"]
        lines.append(
            f"kubectl patch {resource} {shlex.quote(meta['name'])} -n {shlex.quote(meta['namespace'])}"
            f" --subresource=status --type=merge -p {shlex.quote(body)}"
        )
    return "\n".join(lines) + "\n"
