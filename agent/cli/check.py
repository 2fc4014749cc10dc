"""`meshagent check`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agent.config import load_config
from agent.errors import ExitCode

from .output import emit_json


@click.command("check")
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="MESHAGENT_CONFIG",
    help="Agent config file [default: /etc/meshagent/agent.toml if present].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def check_cmd(config: Path | None, as_json: bool) -> None:
    """Check this host: privileges, netfilter backend and flavour, user, state directory, identity
    and expiry, authority reachable and clocks in sync, rules present, ports, admin /ready, cluster
    discovery (a warning while the authority cannot reach the Kubernetes API), traffic policy (a
    warning when the directory carried route entries the agent rejected).

    Each line passes, warns (yellow) or fails with a hint; exits 1 if any check fails.
    """
    from agent.check import run_checks

    results = run_checks(load_config(config, required=config is not None))
    failed = [r for r in results if not r.ok]
    if as_json:
        emit_json({"ok": not failed, "checks": [r.as_dict() for r in results]})
    else:
        for r in results:
            if r.warning:  # passes, but says something to look at
                mark = click.style("‼", fg="yellow")
            else:
                mark = click.style("√", fg="green") if r.ok else click.style("×", fg="red")  # noqa: RUF001 - linkerd's
            click.echo(f"{mark} {r.name}: {r.detail}")
            if r.hint:
                click.echo(f"    hint: {r.hint}")
        click.echo(f"\n{'all checks passed' if not failed else f'{len(failed)} check(s) failed'}")
    sys.exit(int(ExitCode.FAILURE) if failed else 0)
