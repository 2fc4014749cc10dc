"""`meshagent authority route ...`: the hosts' outbound HTTP route policy (issue #21) from
Gateway API / Linkerd HTTPRoutes, SMI TrafficSplits, ServiceProfile retry budgets and Service
objects. Validation and compilation are agent/authority/kube_routes.py; this module reads the
file, opens the registry and prints.

`route apply` has `policy apply`'s contract: the whole file is refused (exit 3, every problem
named `Kind ns/name: field.path what`, nothing stored) or every object is upserted in one
transaction; it never deletes (`route remove` does).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import click

from agent.authority.kube_policy import MAX_BYTES
from agent.authority.kube_routes import (
    KnownRefs,
    RouteObject,
    RouteRefused,
    RouteSettings,
    compile_routes,
    known_refs,
    parse_routes_file,
)
from agent.authority.service import Authority
from agent.errors import ExitCode, MeshagentError

from .output import emit_json, printable, table

_APPLY_HELP = """Route the hosts' outbound HTTP by Gateway API / Linkerd HTTPRoutes and SMI TrafficSplits.

\b
Read (one or many YAML documents, or a List; `kubectl get ... -o yaml` output works):
  HTTPRoute       gateway.networking.k8s.io/v1 (v1beta1), policy.linkerd.io/v1beta3:
                  parentRefs to a Service (group "") or to the enrolled hosts of an
                  identity (group meshagent.io, kind Host, port required); matches on
                  path, method, headers, queryParams; weighted backendRefs (Service or
                  meshagent.io Host, port required); timeouts.request/backendRequest;
                  rules[].retry (codes, attempts, backoff)
  TrafficSplit    split.smi-spec.io/v1alpha2: spec.service (a Service, else the hosts of
                  identity NS/NAME) and weighted backends
  ServiceProfile  linkerd.io/v1alpha2, spec.retryBudget only (NAME.NS.svc.cluster.local)
  Service         v1: makes the Service known (ports, port names, opaque ports) and
                  carries Linkerd's annotations: retry.linkerd.io/{http,grpc,limit,timeout},
                  timeout.linkerd.io/{request,response,idle},
                  balancer.linkerd.io/failure-accrual: consecutive (+ its parameters).
                  The same annotations on an HTTPRoute or TrafficSplit apply to it.
\b
Worked example: the monolith on VMs enrolled as shop/billing (token create --port
http=8080) gets 10 % of its calls moved to the new in-cluster Service billing-v2:
  apiVersion: split.smi-spec.io/v1alpha2
  kind: TrafficSplit
  metadata: {namespace: shop, name: billing-canary}
  spec:
    service: billing
    backends: [{service: billing, weight: 90}, {service: billing-v2, weight: 10}]
  ---
  apiVersion: v1
  kind: Service
  metadata: {namespace: shop, name: billing-v2}
  spec: {ports: [{name: http, port: 8080}]}
\b
  meshagent authority route apply --dir DIR -f canary.yaml --dry-run
  meshagent authority route apply --dir DIR -f canary.yaml
  kubectl get svc,httproutes.gateway.networking.k8s.io -n shop -o yaml \\
      | meshagent authority route apply --dir DIR -f -
prints PARENT PORT ROUTE MATCHES BACKENDS TIMEOUT RETRY SOURCE, e.g.
  Host shop/billing 8080 [default] * billing=90,Service billing-v2=10 - - TrafficSplit shop/billing-canary
Hosts pick it up at their next refresh (30 s by default).
\b
Refused, the whole file, nothing stored, every problem named (exit 3): unknown kinds or
versions, unknown fields, a reference to a Service not in the file (nor stored) and to an
identity no enrolled host has, weights all 0, bad or negative durations, filters,
hostnames, Gateway parents, parents in another namespace, routes on opaque or skip-detect
ports, a TrafficSplit and another policy on one parent port. Apply only adds and replaces
objects: `route remove` deletes one.
"""


class RouteNotFound(MeshagentError):
    code = "route_not_found"
    exit_code = ExitCode.FAILURE


def _settings(cluster_domain: str) -> RouteSettings:
    return RouteSettings(cluster_domain=cluster_domain)


def _known(auth: Authority, objects: Sequence[RouteObject]) -> KnownRefs:
    """What references resolve to here: the registry's enrolled hosts (rendered as the
    catalog renders them) and the stored Service objects. The CLI has no discovery."""
    hosts = auth.registry.list_hosts()
    return known_refs(auth.catalog(hosts), hosts, (), objects)


def _ms(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:g}s" if value % 1000 == 0 or value >= 1000 else f"{value}ms"


def _matches(rule: dict[str, Any]) -> str:
    parts = []
    for m in rule["matches"]:
        path = m["path"]
        text = {"Exact": "={}", "PathPrefix": "{}*", "RegularExpression": "~{}"}[path["type"]].format(
            path["value"]
        )
        if m["method"]:
            text = f"{m['method']} {text}"
        extra = len(m["headers"]) + len(m["query"])
        if extra:
            text += f" +{extra}"
        parts.append(text)
    return "; ".join(parts) or "*"


def _backends(rule: dict[str, Any]) -> str:
    out = []
    for b in rule["backends"]:
        ref = b["ref"]
        name = ref["name"] if ref["kind"] == "Host" else f"Service {ref['name']}"
        out.append(f"{name}={b['weight']}")
    return ",".join(out)


def _retry(retry: dict[str, Any] | None) -> str:
    if retry is None:
        return "-"
    codes = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in retry["http"])
    grpc = ",".join(str(c) for c in retry["grpc"])
    return f"{retry['limit']}x {codes}" + (f" grpc {grpc}" if grpc else "")


def _rows(items: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    rows = []
    for item in items:
        parent = item["parent"]
        where = f"{parent['kind']} {parent['namespace']}/{parent['name']}"
        for route in item["routes"]:
            if route["kind"] == "default":
                name = "[default]"
                source = ", ".join(s for s in item["sources"] if not s.startswith("ServiceProfile "))
            else:
                name = f"{route['namespace']}/{route['name']}"
                source = f"{route['kind']} {route['namespace']}/{route['name']}"
            for rule in route["rules"]:
                rows.append(
                    (
                        where,
                        parent["port"],
                        name,
                        _matches(rule),
                        _backends(rule),
                        _ms(rule["timeouts"]["request_ms"]),
                        _retry(rule["retry"]),
                        source,
                    )
                )
    return rows


_HEADERS = ["PARENT", "PORT", "ROUTE", "MATCHES", "BACKENDS", "TIMEOUT", "RETRY", "SOURCE"]


def _apply(
    directory: Path, source: BinaryIO, dry_run: bool, as_json: bool, cluster_domain: str, auth: Authority
) -> None:
    data = source.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise RouteRefused(
            [f"{source.name}: larger than {MAX_BYTES} bytes (a route file, not a cluster dump)"]
        )
    stored = auth.registry.route_objects()
    known = _known(auth, stored)
    notes: list[str] = []
    settings = _settings(cluster_domain)
    objects = parse_routes_file(data, known, settings, time.time(), stored, notes)
    keys = {o.key for o in objects}
    # What hosts would be served: the stored objects with these replacing their namesakes
    # (created_at kept, as put_route_objects keeps it, for the precedence shown).
    was = {o.key: o for o in stored}
    merged = [o for o in stored if o.key not in keys]
    for obj in objects:
        old = was.get(obj.key)
        if old is not None and "creationTimestamp" not in obj.body["metadata"]:
            obj = RouteObject(
                obj.kind, obj.namespace, obj.name, obj.api_version, obj.body, obj.source, old.created_at
            )
        merged.append(obj)
    skipped: list[str] = []
    items = compile_routes(merged, known, lambda o, r: skipped.append(f"{o.label}: {r}"), settings)
    labels = {o.label for o in objects}
    mine = [i for i in items if labels & set(i["sources"])]
    if not dry_run:
        auth.registry.put_route_objects(objects)
    if as_json:
        emit_json(
            {
                "dry_run": dry_run,
                "objects": sorted(labels),
                "routes": mine,
                "notes": notes,
                "skipped": skipped,
            }
        )
        return
    if mine:
        click.echo(table(_HEADERS, _rows(mine)))
    for line in notes:
        click.echo(printable(f"note: {line}"), err=True)
    for line in skipped:
        click.echo(printable(f"warning: stored object not served: {line}"), err=True)
    counts: dict[str, int] = {}
    for o in objects:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    what = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing"
    verb = "would store" if dry_run else "stored"
    click.echo(printable(f"{verb} {what}; {len(mine)} parent port(s) routed by them"), err=True)


def _parent_filter(value: str) -> tuple[str | None, str, str, int | None]:
    """PARENT: [KIND/]NAMESPACE/NAME[:PORT] (KIND: Service or Host)."""
    text, _, port_text = value.partition(":")
    parts = text.split("/")
    kind = None
    if len(parts) == 3:
        kind = {"service": "Service", "host": "Host"}.get(parts[0].lower())
        if kind is None:
            raise click.BadParameter(f"{parts[0]!r} is not Service or Host", param_hint="PARENT")
        parts = parts[1:]
    if len(parts) != 2 or not all(parts):
        raise click.BadParameter("give [Service/|Host/]NAMESPACE/NAME[:PORT], e.g. Host/shop/billing:8080")
    port = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise click.BadParameter(f"{port_text!r} is not a port 1-65535", param_hint="PARENT")
        port = int(port_text)
    return kind, parts[0], parts[1], port


def register(authority: click.Group, catalog: click.Group) -> None:
    """Adds `meshagent authority route ...`."""
    del catalog
    from .authority import _open, database_option, dir_option, json_option

    @authority.group("route")
    def route_group() -> None:
        """Outbound HTTP route policy (timeouts, retries, failure accrual, traffic split) the
        hosts apply to their calls to a Service or to other hosts: from Gateway API / Linkerd
        HTTPRoutes, SMI TrafficSplits, ServiceProfile retry budgets and Service annotations.

        \b
          meshagent authority route apply --dir DIR -f routes.yaml --dry-run
          meshagent authority route apply --dir DIR -f routes.yaml
          meshagent authority route list --dir DIR
          meshagent authority route show --dir DIR Host/shop/billing:8080
          meshagent authority route remove --dir DIR TrafficSplit shop/billing-canary
        """

    cluster_domain_option = click.option(
        "--cluster-domain",
        default="cluster.local",
        show_default=True,
        help="The cluster's DNS domain (ServiceProfile names are SERVICE.NS.svc.DOMAIN).",
    )

    @route_group.command("apply", help=_APPLY_HELP)
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
    @click.option("--dry-run", is_flag=True, help="Print what would be stored and served; store nothing.")
    @cluster_domain_option
    @json_option
    def route_apply_cmd(
        directory: Path, source: BinaryIO, dry_run: bool, cluster_domain: str, as_json: bool
    ) -> None:
        try:
            _apply(directory, source, dry_run, as_json, cluster_domain, _open(directory))
        except RouteRefused as exc:
            if as_json:
                raise  # the normal handler's JSON error, problems in its message
            for line in exc.message.splitlines():  # one problem a line
                click.echo(printable(f"error: {line}" if not line.startswith(" ") else line), err=True)
            click.echo(printable(f"  hint: {exc.hint}"), err=True)
            raise SystemExit(int(exc.exit_code)) from None

    @route_group.command("list")
    @dir_option
    @database_option
    @json_option
    def route_list_cmd(directory: Path, as_json: bool) -> None:
        """Every stored route object (KIND NAMESPACE/NAME), as applied.

        \b
          meshagent authority route list --dir DIR
          meshagent authority route list --dir DIR --json   # the stored objects, bodies included
        """
        objects = _open(directory).registry.route_objects()
        if as_json:
            emit_json(
                [
                    {
                        "kind": o.kind,
                        "namespace": o.namespace,
                        "name": o.name,
                        "api_version": o.api_version,
                        "source": o.source,
                        "created_at": o.created_at,
                        "body": o.body,
                    }
                    for o in objects
                ]
            )
            return
        click.echo(
            table(
                ["KIND", "NAME", "API VERSION", "SOURCE", "CREATED"],
                [
                    (
                        o.kind,
                        f"{o.namespace}/{o.name}",
                        o.api_version,
                        o.source,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(o.created_at)),
                    )
                    for o in objects
                ],
            )
        )

    @route_group.command("remove")
    @dir_option
    @database_option
    @click.argument("kind", type=click.Choice(["HTTPRoute", "TrafficSplit", "ServiceProfile", "Service"]))
    @click.argument("ref", metavar="NAMESPACE/NAME")
    def route_remove_cmd(directory: Path, kind: str, ref: str) -> None:
        """Remove one stored object; the hosts stop applying it at their next refresh.

        \b
          meshagent authority route remove --dir DIR TrafficSplit shop/billing-canary
          meshagent authority route remove --dir DIR ServiceProfile shop/billing.shop.svc.cluster.local
        """
        namespace, _, name = ref.partition("/")
        if not namespace or not name:
            raise click.BadParameter(
                "give NAMESPACE/NAME, e.g. shop/billing-canary", param_hint="NAMESPACE/NAME"
            )
        if not _open(directory).registry.remove_route_object(kind, namespace, name):
            raise RouteNotFound(
                f"no stored {kind} {namespace}/{name}", "see `meshagent authority route list --dir DIR`"
            )
        click.echo(printable(f"removed {kind} {namespace}/{name}"))

    @route_group.command("show")
    @dir_option
    @database_option
    @cluster_domain_option
    @json_option
    @click.argument("parent", metavar="PARENT")
    def route_show_cmd(directory: Path, parent: str, cluster_domain: str, as_json: bool) -> None:
        """What the hosts are served for PARENT: [Service/|Host/]NAMESPACE/NAME[:PORT].

        \b
          meshagent authority route show --dir DIR Host/shop/billing:8080   # a table, then the wire item
          meshagent authority route show --dir DIR shop/orders --json       # the wire items, every port
        Service backends show "(resolved by discovery)": the hosts take their endpoints from
        the Services `serve --kubernetes` discovers; without discovery they never resolve.
        """
        kind, namespace, name, port = _parent_filter(parent)
        auth = _open(directory)
        objects = auth.registry.route_objects()
        skipped: list[str] = []
        items = compile_routes(
            objects,
            _known(auth, objects),
            lambda o, r: skipped.append(f"{o.label}: {r}"),
            _settings(cluster_domain),
        )
        found = [
            i
            for i in items
            if (kind is None or i["parent"]["kind"] == kind)
            and (i["parent"]["namespace"], i["parent"]["name"]) == (namespace, name)
            and (port is None or i["parent"]["port"] == port)
        ]
        for line in skipped:
            click.echo(printable(f"warning: stored object not served: {line}"), err=True)
        if not found:
            raise RouteNotFound(
                f"no route policy is served for {parent}",
                "see `meshagent authority route list --dir DIR` (and the warnings above, if any)",
            )
        if as_json:
            emit_json(found)
            return
        click.echo(table(_HEADERS, _rows(found)))
        for item in found:
            services = sorted(
                {
                    f"Service {b['ref']['namespace']}/{b['ref']['name']}"
                    for r in item["routes"]
                    for rule in r["rules"]
                    for b in rule["backends"]
                    if b["ref"]["kind"] == "Service"
                }
            )
            for s in services:
                click.echo(printable(f"{s}: (resolved by discovery)"))
        click.echo(json.dumps(found, indent=2, sort_keys=True))
