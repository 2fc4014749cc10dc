"""`meshagent authority backstage export`: a Backstage catalog-info.yaml per host (issue #20)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent.errors import MeshagentError

from .output import emit_json, printable

if TYPE_CHECKING:
    from agent.authority.service import Authority
    from agent.authority.storage import HostRecord


def _warn(text: str) -> None:
    click.echo(printable(text), err=True)


def _check_catalog_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--catalog-url lands in every Component's links: absolute http(s) only (exit 2 otherwise)."""
    from agent.authority.backstage import catalog_url_problem

    if value and (problem := catalog_url_problem(value)):
        raise click.BadParameter(problem + "; e.g. https://authority.example:8443", ctx, param)
    return value


def register(authority: click.Group, catalog: click.Group) -> None:
    """Adds this module's commands to `meshagent authority` (and its `catalog` group)."""
    from agent.cli.authority import database_option, dir_option, json_option
    from agent.cli.prometheus_option import prometheus_option

    @authority.group("backstage")
    def backstage_group() -> None:
        """Backstage: the enrolled hosts as Backstage catalog entities."""

    @backstage_group.command("export")
    @dir_option
    @database_option
    @click.option(
        "--output-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="Write DIR/<name>/catalog-info.yaml per host (each replaced atomically, only when it "
        "changed) and report what was written.",
    )
    @click.option(
        "--output",
        "output",
        metavar="-|FILE",
        help="Write all components as one multi-document YAML stream to stdout (-) or FILE. "
        "[default: - unless --output-dir]",
    )
    @prometheus_option
    @click.option(
        "--lifecycle",
        default="production",
        show_default=True,
        help="spec.lifecycle of every component (host metadata has no lifecycle of its own).",
    )
    @click.option(
        "--catalog-url",
        default="",
        metavar="URL",
        callback=_check_catalog_url,
        help="The authority's address as browsers reach it (https://HOST:PORT): each component "
        "links to its page there (/catalog/hosts/ID).",
    )
    @click.option(
        "--require-edges",
        is_flag=True,
        help="Fail (exit 5, nothing written) when Prometheus is unset or does not answer, instead "
        "of exporting without dependsOn.",
    )
    @click.option(
        "--prune",
        is_flag=True,
        help="With --output-dir: delete the files earlier exports wrote for hosts no longer "
        "exported (only files carrying meshagent.io/exported-by).",
    )
    @json_option
    def export_cmd(
        directory: Path,
        output_dir: Path | None,
        output: str | None,
        prometheus_url: str | None,
        lifecycle: str,
        catalog_url: str,
        require_edges: bool,
        prune: bool,
        as_json: bool,
    ) -> None:
        """Export every enrolled, unrevoked host as a Backstage Component (catalog-info.yaml).

        \b
        Each component: metadata.name from the host name (lower case, other characters -> '-',
        at most 63; when two collide the one enrolled first keeps it, the others get
        -<host id>), title the host name, description; spec.owner group:default/<owner team>
        (or "unknown", with a warning), spec.system system:default/<system>, spec.lifecycle
        (--lifecycle), spec.type service; links from the host's metadata; annotations
        meshagent.io/host-id, host-name, identity, spiffe-id, owner-contact, tier.
        spec.dependsOn: what the host called in the catalog's edge window (Prometheus):
        other hosts as component:default/<name>, in-cluster identities
        (SA.NS.serviceaccount.identity...) as component:NS/SA.
        \b
        Without Prometheus (unset or not answering) the components are written without
        dependsOn and stderr says why (--require-edges makes that a failure).
        \b
        With --output-dir, DIR/catalog-info.yaml is a Location listing every component's file:
        register it once in Backstage (app-config.yaml, or a URL where DIR is committed):
          catalog:
            locations:
              - type: file
                target: /path/to/DIR/catalog-info.yaml
        and hosts that join or leave follow with each export.
        """
        from agent.authority import backstage as bs
        from agent.authority import service_catalog
        from agent.authority.prom_query import PromClient, PromUnavailable, resolve_url
        from agent.cli.authority import _open

        if output_dir is not None and output is not None:
            raise click.UsageError("give --output-dir DIR or --output -|FILE, not both")
        if prune and output_dir is None:
            raise click.UsageError("--prune needs --output-dir")
        stream = output_dir is None
        target = output or "-"
        if as_json and stream and target == "-":
            raise click.UsageError(
                "--json reports what was written: use it with --output-dir or --output FILE"
            )
        if not bs.valid_name(lifecycle):
            raise click.BadParameter(
                "must be a Backstage name, e.g. production, experimental", param_hint="--lifecycle"
            )

        auth = _open(directory)
        url = resolve_url(directory, prometheus_url)
        prom = PromClient(url) if url else None
        try:
            view = service_catalog.fleet_view(auth, prom, budgets=False)
        finally:
            if prom is not None:
                prom.close()
        if view.prometheus_error is not None and require_edges:
            raise PromUnavailable(
                f"dependsOn needs Prometheus: {view.prometheus_error}",
                "start it or fix --prometheus, or export without --require-edges",
            )
        hosts = [row.host for row in view.rows]
        identities = {row.host.id: row.identity for row in view.rows}
        result = bs.export(
            hosts,
            {row.host.id: row.meta for row in view.rows},
            None if view.prometheus_error is not None else view.edges,
            lambda h: identities.get(h.id, ""),
            lambda h: _spiffe_id(auth, h),
            bs.Options(
                lifecycle=lifecycle, catalog_url=catalog_url, edges_unavailable=view.prometheus_error or ""
            ),
        )
        if result.edges_unavailable:
            _warn(f"warning: dependsOn left out: {result.edges_unavailable}")
        for c in result.components:
            for w in c.warnings:
                _warn(f"warning: {c.name} ({c.host_id}): {w}")

        report: dict[str, Any] = result.report()
        if stream:
            text = bs.render_stream(result.components)
            if target == "-":
                click.echo(text, nl=False)
                _warn(f"{len(result.components)} components ({len(result.skipped)} revoked hosts left out)")
                return
            write_stream(Path(target), text)
            report["output"] = target
        else:
            assert output_dir is not None
            files = bs.write_tree(result, output_dir, prune)
            report.update(
                output_dir=str(output_dir),
                written=files.written,
                unchanged=files.unchanged,
                stale=files.stale,
                pruned=files.pruned,
            )
        if as_json:
            emit_json(report)
            return
        _print_report(report)


def _spiffe_id(auth: Authority, host: HostRecord) -> str:
    try:
        return auth.identity(host.identity).spiffe_id
    except MeshagentError:  # a row altered by hand: the annotation says what is stored
        return host.identity


def write_stream(path: Path, text: str) -> None:
    from agent.authority.backstage import BackstageExportError
    from agent.fsutil import write_atomic

    try:
        write_atomic(path, text.encode(), mode=0o644)
    except OSError as exc:
        raise BackstageExportError(
            f"cannot write {path}: {exc.strerror}", "check the path and its permissions"
        ) from exc


def _print_report(report: dict[str, Any]) -> None:
    where = report.get("output_dir") or report.get("output")
    if "written" in report:
        for path in report["written"]:
            click.echo(printable(f"wrote {path}"))
        click.echo(
            printable(
                f"{len(report['components'])} components and their Location (catalog-info.yaml) in "
                f"{where}: {len(report['written'])} files written, {len(report['unchanged'])} unchanged"
            )
        )
        for path in report["stale"]:
            if path in report["pruned"]:
                click.echo(printable(f"pruned {path} (its host is no longer exported)"))
            else:
                click.echo(printable(f"stale {path}: its host is no longer exported (--prune deletes it)"))
    else:
        click.echo(printable(f"{len(report['components'])} components written to {where}"))
    for skipped in report["skipped"]:
        click.echo(printable(f"left out {skipped['host_id']}: {skipped['reason']}"))
    click.echo(printable(f"dependsOn: {report['depends_on']}"))
    if report["external_refs"]:
        click.echo(
            printable(
                "in-cluster dependencies (components this export does not write): "
                + ", ".join(report["external_refs"])
            )
        )
