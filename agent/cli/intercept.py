"""`meshagent intercept apply|show|remove`: thin over `agent.intercept`."""

from __future__ import annotations

import pwd
from pathlib import Path
from typing import Any

import click

from agent.config import load_config
from agent.errors import MeshagentError
from agent.identity.transport import resolve_proxy
from agent.intercept import apply as lib
from agent.intercept import netlink
from agent.intercept.authority import enrolled as enrolled_authority
from agent.intercept.errors import PlanError
from agent.intercept.plan import Plan, build_plan

from .output import emit_json, table

config_option = click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="MESHAGENT_CONFIG",
    help="Agent config file [default: /etc/meshagent/agent.toml if present].",
)
backend_option = click.option(
    "--backend",
    type=click.Choice(["auto", *lib.BACKEND_NAMES]),
    help="Override intercept.backend from the config.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Print exactly what would run (reads the kernel, changes nothing)."
)


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _plan(config: Path | None, backend: str | None) -> tuple[Plan, lib.Backend]:
    cfg = load_config(config, required=config is not None)
    proxy = resolve_proxy(cfg.authority.https_proxy, cfg.authority.no_proxy)
    plan = build_plan(
        cfg.intercept, authority=enrolled_authority(cfg.identity.state_dir, proxy), lookup_user=_uid
    )
    if isinstance(plan, PlanError):
        raise plan
    return plan, lib.detect_backend(backend or cfg.intercept.backend)


def _print_plan(plan: Plan, backend: lib.Backend) -> None:
    fams = "+".join(f"IPv{f}" for f in plan.families)
    click.echo(
        f"backend {backend.name}; {fams}; inbound {plan.inbound_mode} -> :{plan.inbound_port}; "
        f"outbound redirect -> :{plan.outbound_port}; proxy uid {plan.proxy_uid}"
        + (f", mark {plan.proxy_mark:#x}" if plan.proxy_mark else "")
    )
    click.echo("\nnever captured:")
    rows = [(e.direction, e.what, e.value, e.why) for e in plan.exclusions]
    click.echo(table(["DIRECTION", "WHAT", "VALUE", "WHY"], rows))
    for warning in plan.warnings:
        click.echo(f"warning: {warning}")


@click.group("intercept")
def intercept() -> None:
    """Kernel redirection of the app's TCP traffic through the agent's proxy.

    \b
    Rules live in meshagent's own chains (MESHAGENT_*) or nft table (meshagent), each with a
    "meshagent:" comment; SSH (22), the admin port and the authority are never captured unless
    the config insists. `apply` is atomic and idempotent; `remove` restores the ruleset exactly
    and needs no config.
    """


@intercept.command("show")
@config_option
@backend_option
@json_option
def show_cmd(config: Path | None, backend: str | None, as_json: bool) -> None:
    """Print the plan and exactly the rules `apply` installs (and what is applied now, if readable)."""
    plan, be = _plan(config, backend)
    rendered = be.render(plan)
    routes = [line for r in plan.routes for line in netlink.describe(r)]
    try:
        now: dict[str, Any] | None = lib.status()
    except MeshagentError:
        now = None
    if as_json:
        emit_json(
            {
                "backend": be.name,
                "plan": plan.to_dict(),
                "rendered": rendered,
                "routes": routes,
                "current": now,
            }
        )
        return
    _print_plan(plan, be)
    click.echo(f"\nrules ({be.name}):\n{rendered}", nl=False)
    if routes:
        click.echo("\npolicy routing (netlink):\n" + "\n".join(routes))
    if now is not None:
        if now["applied"]:
            state = "applied (" + ", ".join(now["backends"]) + ")"
        elif now.get("holding"):
            held = ", ".join(now["holding"])
            state = f"not applied: a stopping agent's hold ({held}), nothing captured"
        else:
            state = "not applied"
        click.echo(f"\nnow: {state}")


@intercept.command("apply")
@config_option
@backend_option
@dry_run_option
@json_option
def apply_cmd(config: Path | None, backend: str | None, dry_run: bool, as_json: bool) -> None:
    """Install the rules (replacing any earlier meshagent rules) in one atomic step per table."""
    plan, be = _plan(config, backend)
    if dry_run:
        steps, routes = lib.plan_steps(plan, be)
        if as_json:
            emit_json(
                {
                    "dry_run": True,
                    "backend": be.name,
                    "plan": plan.to_dict(),
                    "steps": [{"argv": list(s.argv), "what": s.what, "stdin": s.stdin} for s in steps],
                    "routes": routes,
                }
            )
        else:
            for step in steps:
                click.echo(step.describe())
            for line in routes:
                click.echo(f"# policy routing (netlink)\n# {line}")
        return
    state = lib.apply_plan(plan, be)
    if as_json:
        emit_json(state.to_dict())
        return
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    fams = "+".join(f"IPv{f}" for f in plan.families)
    click.echo(f"applied {state.rules} rules with {state.backend} ({fams}, inbound {plan.inbound_mode})")
    if state.cleaned:
        click.echo(f"removed old meshagent rules from {', '.join(state.cleaned)}")


@intercept.command("remove")
@config_option
@dry_run_option
@json_option
@click.option("--quiet", is_flag=True, help="Print nothing when there was nothing to remove.")
@click.option(
    "--after-stop",
    is_flag=True,
    help="For the unit's ExecStopPost: keep the rules when the config says proxy.on_stop = "
    '"keep-rules" (fail closed); a config that cannot be read means remove.',
)
def remove_cmd(config: Path | None, dry_run: bool, as_json: bool, quiet: bool, after_stop: bool) -> None:
    """Remove every meshagent rule, chain, table and policy route; other rules stay exactly as they are.

    Never needs the config (it may be broken or gone): ours are found by name and comment in
    every installed backend. Only --after-stop looks at it, to honour a fail-closed choice.
    """
    if after_stop and _fails_closed(config):
        if not quiet:
            click.echo("proxy.on_stop = keep-rules: rules kept (fail closed)")
        return
    if dry_run:
        steps = lib.remove_steps()
        routes = netlink.current()
        if as_json:
            emit_json(
                {
                    "dry_run": True,
                    "steps": [{"argv": list(s.argv), "what": s.what, "stdin": s.stdin} for s in steps],
                    "routes": routes,
                }
            )
        else:
            for step in steps:
                click.echo(step.describe())
            for route in routes:
                click.echo(f"# policy routing (netlink): delete {route}")
            if not steps and not routes:
                click.echo("# nothing to remove")
        return
    removed = lib.remove_all()
    if as_json:
        emit_json(removed.to_dict())
    elif removed.backends or removed.routes:
        where = ", ".join(removed.backends) or "no firewall backend"
        click.echo(f"removed meshagent rules from {where}; {removed.routes} policy route entries")
    elif not quiet:
        click.echo("nothing to remove")


def _fails_closed(config: Path | None) -> bool:
    from agent.config import load_config
    from agent.errors import MeshagentError

    try:
        return load_config(config).proxy.on_stop == "keep-rules"
    except MeshagentError:
        return False  # unreadable config: the safe side is to remove (fail open)
