"""`meshagent authority edges` and `meshagent authority slo ...`: dependencies from traffic
and SLO rules (issue #20).

Exit codes, one rule for the catalog's views when Prometheus is not configured, does not
answer, or refuses a query: a view that still shows the registry's facts (`slo status`, as
`catalog show`) exits 0, prints them with the numbers unknown ("-", null in JSON), and says why
on stderr and in the JSON's `prometheus_error` (the message, a string: the same field and form
as `catalog show --json` and GET /v1/catalog); `edges`, which has nothing else to show, exits 5
(UNREACHABLE). 2 for a bad window or host reference. `slo rules` needs no Prometheus: it reads
the registry only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from agent.authority.edges import Edge, dns_identity, edges
from agent.authority.host_meta import HostMeta
from agent.authority.prom_query import (
    PromClient,
    PromQueryError,
    PromUnavailable,
    not_configured,
    resolve_url,
)
from agent.authority.slo import ALERTS, Budget, fleet_budgets, never_firing, render_rules, rules
from agent.authority.storage import HostRecord
from agent.errors import MeshagentError
from agent.fsutil import write_atomic
from agent.identity.names import WorkloadIdentity

from .output import emit_json, error_text, human_duration, printable, table
from .prometheus_option import prometheus_option

ALERT_NAMES = frozenset(a.name for a in ALERTS)


def _client(directory: Path, explicit: str | None) -> PromClient:
    url = resolve_url(directory, explicit)
    if url is None:
        raise not_configured()
    return PromClient(url)


def _host(hosts: list[HostRecord], ref: str) -> HostRecord:
    from agent.authority.service_catalog import find_host  # one resolution of HOST for all commands

    return find_host(hosts, ref)


def _peer(identity: str, host_id: str | None, names: dict[str, str]) -> str:
    """How an edge's end reads in the table: the host's name, else the identity's NS/NAME."""
    if host_id is not None and host_id in names:
        return names[host_id]
    if not identity:
        return "(no identity)"
    try:
        return WorkloadIdentity.from_dns_name(identity).short
    except MeshagentError:
        return identity


def _percent(value: float | None, digits: int = 2) -> str | None:
    return None if value is None else f"{value * 100:.{digits}f}%"


def _edges_table(found: list[Edge], names: dict[str, str]) -> str:
    rows = [
        (
            _peer(e.src, e.src_host, names) + ("*" if e.by_identity else ""),
            _peer(e.dst, e.dst_host, names),
            f"{e.rps:.2f}" if e.requests > 0 else None,  # "-": connections only (not HTTP)
            _percent(e.success_rate),
            None if e.p99_ms is None else f"{e.p99_ms:.0f}ms",
            "yes"
            if e.src and e.dst
            else "no",  # a side without mesh identity: plain text or the app's own TLS
        )
        for e in found
    ]
    return table(["SRC", "DST", "REQ/S", "SUCCESS", "P99", "SECURED"], rows)


def _status_rows(
    hosts: list[HostRecord],
    metas: dict[str, HostMeta],
    found: dict[str, list[Budget]] | None,
    firing: set[Any],
) -> list[tuple[Any, ...]]:
    rows = []
    for host in hosts:
        meta = metas.get(host.id, HostMeta())
        known = {b.slo.name: b for b in (found or {}).get(host.id, [])}
        for slo in meta.slos:
            b = known.get(slo.name)
            alerts = sorted(name for (h, s, name) in firing if h == host.id and s == slo.name)
            rows.append(
                (
                    host.host_name,
                    slo.name,
                    slo.describe(),
                    _percent(b.sli, 3) if b else None,
                    _percent(b.remaining, 1) if b else None,
                    f"{b.burn_1h:.2f}x" if b and b.burn_1h is not None else None,
                    f"{b.burn_6h:.2f}x" if b and b.burn_6h is not None else None,
                    human_duration(b.exhaustion_s) if b and b.exhaustion_s is not None else None,
                    ", ".join(alerts) or None,
                )
            )
    return rows


def register(authority: click.Group, catalog: click.Group) -> None:
    """Adds this module's commands to `meshagent authority` (and its `catalog` group)."""
    from .authority import _open, database_option, dir_option, json_option

    @authority.command("edges")
    @dir_option
    @database_option
    @prometheus_option
    @json_option
    @click.argument("host_ref", metavar="[HOST]", required=False)
    @click.option(
        "--window",
        default="5m",
        show_default=True,
        help="Over how long: a Prometheus duration from 10s to 7d (30s, 5m, 1h, 1d).",
    )
    def edges_cmd(
        directory: Path, prometheus_url: str | None, as_json: bool, host_ref: str | None, window: str
    ) -> None:
        """Who calls whom, from the traffic Prometheus scraped (`linkerd viz edges` for hosts):
        every caller/callee pair with responses in the window, or those of HOST (id or name).

        A call between two hosts is counted once, from the callee's inbound metrics; a call to
        anything else (an in-cluster identity, a destination without identity) from the
        caller's outbound metrics. SRC "(no identity)": plain-text callers, not mTLS; a SRC
        marked "*" (HOST's calls when other hosts share its identity): by identity only."""
        auth = _open(directory)
        hosts = auth.registry.list_hosts()
        target = _host(hosts, host_ref) if host_ref else None
        with _client(directory, prometheus_url) as prom:
            found = edges(
                prom,
                hosts,
                dns_identity(auth.material.settings.trust_domain, auth.material.settings.mesh),
                window,
                host_id=target.id if target else None,
            )
        if as_json:
            emit_json(
                {
                    "window": window,
                    "host_id": target.id if target else None,
                    "edges": [e.to_doc() for e in found],
                }
            )
            return
        if not found:
            click.echo(f"no traffic in the last {window}")
            return
        click.echo(_edges_table(found, {h.id: h.host_name for h in hosts}))
        if any(e.by_identity for e in found):
            click.echo("* by identity: other hosts share it, so some of these calls may be theirs")

    @authority.group("slo")
    def slo_group() -> None:
        """SLOs on Prometheus: the rule file that alerts, and the error budgets now."""

    @slo_group.command("rules")
    @dir_option
    @database_option
    @click.option(
        "--output",
        "-o",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Write the rule file here (atomically: Prometheus never reads half a file) "
        "instead of printing it.",
    )
    def rules_cmd(directory: Path, output: Path | None) -> None:
        """Prometheus rules for every SLO of the enrolled, unrevoked hosts: recording rules
        (meshagent_slo:error_ratio:rate5m ... rate3d, and over the SLO's window, which budgets
        read instead of the raw series once loaded) and the burn-rate alerts
        MeshagentSLOFastBurn (1h/5m at 14.4x, page), MeshagentSLOMediumBurn (6h/30m at 6x, page),
        MeshagentSLOSlowBurn (1d/2h at 3x, ticket), MeshagentSLOVerySlowBurn (3d/6h at 1x,
        ticket). Load the file with `rule_files:` and reload Prometheus; write it again after
        changing SLOs (`authority host set --slo`). An SLO whose objective is too low for
        an alert ever to fire (e.g. the fast burn at 93 % or less) is warned about on stderr
        and in comments at the file's top."""
        auth = _open(directory)
        hosts = [h for h in auth.registry.list_hosts() if not h.revoked]
        metas = auth.registry.host_meta([h.id for h in hosts])
        pairs = [(h, metas.get(h.id, HostMeta())) for h in hosts]
        text = render_rules(pairs)
        for warning in never_firing(pairs):  # also written as comments at the file's top
            click.echo(printable(f"warning: {warning}"), err=True)
        if output is None:
            click.echo(text, nl=False)
            return
        write_atomic(output, text.encode(), mode=0o644)
        slos = sum(len(m.slos) for _, m in pairs)
        groups = len(rules(pairs)["groups"])
        click.echo(
            printable(
                f"wrote {output}: {slos} SLO(s) on {groups} host(s); "
                f"check it with `promtool check rules {output}`"
            ),
            err=True,
        )

    @slo_group.command("status")
    @dir_option
    @database_option
    @prometheus_option
    @json_option
    @click.argument("host_ref", metavar="[HOST]", required=False)
    def status_cmd(directory: Path, prometheus_url: str | None, as_json: bool, host_ref: str | None) -> None:
        """Each SLO's error budget now: the SLI over its window, the budget left, the burn rate
        over 1 h and 6 h (1x spends the budget exactly over the window), the time left at the
        1 h burn, and the burn-rate alerts Prometheus has firing. Without Prometheus (unset,
        not answering, refusing) the SLOs are listed with no numbers, the reason goes to stderr,
        and the command exits 0 (as `catalog show`: the registry's facts are shown)."""
        from agent.authority.service_catalog import budget_doc  # the catalog's form of a budget

        auth = _open(directory)
        every = auth.registry.list_hosts()
        hosts = [_host(every, host_ref)] if host_ref else [h for h in every if not h.revoked]
        metas = auth.registry.host_meta([h.id for h in hosts])
        hosts = [h for h in hosts if metas.get(h.id, HostMeta()).slos]
        found: dict[str, list[Budget]] | None = None
        firing: set[tuple[str, str, str]] = set()
        problem: PromUnavailable | PromQueryError | None = None
        try:
            with _client(directory, prometheus_url) as prom:
                found = fleet_budgets(prom, {h.id: metas[h.id] for h in hosts})
                for alert in prom.alerts():
                    labels = alert.get("labels", {})
                    if alert.get("state") == "firing" and labels.get("alertname") in ALERT_NAMES:
                        firing.add((labels.get("host_id", ""), labels.get("slo", ""), labels["alertname"]))
        except (PromUnavailable, PromQueryError) as e:
            problem = e
            found = None  # all or nothing: a half-read fleet would look like missing traffic
        if as_json:
            emit_json(
                {
                    "prometheus_error": problem.message if problem else None,
                    "hosts": [
                        {
                            "host_id": h.id,
                            "host": h.host_name,
                            "owner_team": metas[h.id].owner_team,
                            "budgets": [
                                budget_doc(b)
                                for b in (
                                    found[h.id]
                                    if found is not None
                                    else [
                                        Budget(h.id, s, None, None, None, None, None)
                                        for s in metas[h.id].slos
                                    ]
                                )
                            ],
                            "firing": sorted(a for (hid, s, a) in firing if hid == h.id),
                        }
                        for h in hosts
                    ],
                }
            )
        elif hosts:
            headers = [
                "HOST",
                "SLO",
                "OBJECTIVE",
                "SLI",
                "BUDGET LEFT",
                "BURN 1H",
                "BURN 6H",
                "EXHAUSTED IN",
                "FIRING",
            ]
            click.echo(table(headers, _status_rows(hosts, metas, found, firing)))
        else:
            click.echo("no SLOs set (meshagent authority host set HOST --slo availability=99.9)")
        if problem is not None:
            click.echo(error_text(problem), err=True)
