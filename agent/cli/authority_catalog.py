"""`meshagent authority catalog show`: the host card in the terminal (issue #20)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .output import emit_json, printable, table


def _short_time(value: str | None) -> str:
    return "-" if not value else value[:19].replace("T", " ")


def _last_change(doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "-"
    return f"{_short_time(doc['at'])} {doc['kind']}"


def _print_fleet(doc: dict[str, Any]) -> None:
    from agent.authority.service_catalog import percent

    click.echo(
        table(
            ["HOST", "ID", "OWNER", "TIER", "STATE", "SLO", "BUDGET LEFT", "LAST CHANGE"],
            [
                (
                    r["host"]["host_name"],
                    r["host"]["id"],
                    r["owner_team"] or "-",
                    r["tier"] or "-",
                    r["state"],
                    r["slo_status"],
                    percent(r["budget_remaining"]),
                    _last_change(r["last_change"]),
                )
                for r in doc["hosts"]
            ],
        )
    )
    if doc["prometheus_error"]:
        click.echo(printable(f"edges and budgets unavailable: {doc['prometheus_error']}"))
    else:
        click.echo(f"{len(doc['edges'])} edges between {len(doc['nodes'])} identities")


def _edges(title: str, edges: list[dict[str, Any]], peer: str) -> None:
    from agent.authority.service_catalog import connections_text, percent, rate_text

    click.echo(f"\n{title}:")
    if not edges:
        click.echo("  none seen")
        return
    rows = [
        (
            e[peer] or "(no identity)",
            e[f"{peer}_host"] or "-",
            rate_text(e),
            connections_text(e),
            percent(e["success_rate"], 2),
            "-" if e["p99_ms"] is None else f"{e['p99_ms']:g}ms",
        )
        for e in edges
    ]
    lines = table(["PEER", "HOST", "RATE", "CONNS", "SUCCESS", "P99"], rows).splitlines()
    click.echo("\n".join("  " + line for line in lines))


def _print_card(doc: dict[str, Any]) -> None:
    from agent.authority.service_catalog import duration_text, percent, slo_text

    host, meta = doc["host"], doc["meta"]
    say = [
        ("host", f"{host['host_name']} ({host['id']})"),
        ("identity", host["identity"] or host["workload"]),
        ("owner", meta.get("owner_team") or "-"),
        ("contact", meta.get("owner_contact") or "-"),
        ("description", meta.get("description") or "-"),
        ("system", meta.get("system") or "-"),
        ("tier", meta.get("tier") or "-"),
        ("state", doc["state_text"] or doc["state"]),
    ]
    for link in meta.get("links") or []:
        title, url = (link["title"], link["url"]) if isinstance(link, dict) else link
        say.append((f"link {title}", url))
    width = max(len(k) for k, _ in say)
    for key, value in say:
        click.echo(printable(f"{key.ljust(width)}  {value}"))
    click.echo(f"\nSLOs ({doc['slo_status']}):")
    slos = meta.get("slos") or []
    if not slos:
        click.echo("  none set (meshagent authority host set HOST --slo availability=99.9)")
    elif not doc["budgets"]:
        for s in slos:
            click.echo(printable(f"  {slo_text(s)}: budget unknown"))
    else:
        rows = [
            (
                slo_text(b["slo"]),
                percent(b["sli"], 3),
                percent(b["remaining"]),
                "-" if b["burn_1h"] is None else f"{b['burn_1h']:.2f}x",
                "-" if b["burn_6h"] is None else f"{b['burn_6h']:.2f}x",
                duration_text(b["exhaustion_s"]),
                b["status"],
            )
            for b in doc["budgets"]
        ]
        lines = table(["SLO", "SLI", "BUDGET LEFT", "BURN 1H", "BURN 6H", "EXHAUSTED IN", "STATUS"], rows)
        click.echo("\n".join("  " + line for line in lines.splitlines()))
    if doc["prometheus_error"]:
        click.echo()
        click.echo(printable(f"edges and budgets unavailable: {doc['prometheus_error']}"))
    else:
        _edges("called by (in)", doc["edges_in"], "src")
        _edges("calls (out)", doc["edges_out"], "dst")
    click.echo("\nrecent changes:")
    if not doc["changes"]:
        click.echo("  none recorded")
    for c in doc["changes"]:
        click.echo(printable(f"  {_short_time(c['at'])}  {c['kind']:<21} {c['actor']:<18} {c['detail']}"))


def register(authority: click.Group, catalog: click.Group) -> None:
    """Adds this module's commands to `meshagent authority` (and its `catalog` group)."""
    from agent.cli.authority import _open, database_option, dir_option, json_option
    from agent.cli.prometheus_option import prometheus_option

    @catalog.command("show")
    @click.argument("host", required=False)
    @dir_option
    @database_option
    @prometheus_option
    @json_option
    def catalog_show_cmd(
        host: str | None, directory: Path, prometheus_url: str | None, as_json: bool
    ) -> None:
        """The fleet (owner, tier, state, SLO status, budget left, last change), or with HOST (id
        or unique name) its card: owner, contact, links, state, SLOs with budget and burn, the
        edges in and out, recent changes.

        \b
        Edges and budgets come from Prometheus (--prometheus, else MESHAGENT_PROMETHEUS_URL,
        else the URL `authority serve --prometheus` recorded); without one, or when it does not
        answer, the rest is still shown and the output says why edges and budgets are missing.
        """
        from agent.authority import service_catalog
        from agent.authority.prom_query import PromClient, resolve_url

        auth = _open(directory)
        url = resolve_url(directory, prometheus_url)
        prom = PromClient(url) if url else None
        try:
            if host is None:
                doc = service_catalog.fleet_doc(service_catalog.fleet_view(auth, prom))
            else:
                doc = service_catalog.card_doc(service_catalog.host_card(auth, prom, host))
        finally:
            if prom is not None:
                prom.close()
        if as_json:
            emit_json(doc)
        elif host is None:
            _print_fleet(doc)
        else:
            _print_card(doc)
        if doc["prometheus_error"]:  # (the exit status stays 0: the registry's facts are shown)
            click.echo(printable(f"edges and budgets unavailable: {doc['prometheus_error']}"), err=True)
