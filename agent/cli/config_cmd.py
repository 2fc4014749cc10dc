"""`meshagent config show`: the effective settings and where each came from."""

from __future__ import annotations

import json
from pathlib import Path

import click

from agent.config import describe, load_config

from .output import emit_json, table


@click.group("config")
def config_group() -> None:
    """The agent's configuration: /etc/meshagent/agent.toml plus MESHAGENT_<SECTION>_<KEY> overrides."""


@config_group.command("show")
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="MESHAGENT_CONFIG",
    help="Agent config file [default: /etc/meshagent/agent.toml if present].",
)
@click.option("--changed", is_flag=True, help="Only settings that are not at their default.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def show_cmd(config: Path | None, changed: bool, as_json: bool) -> None:
    """Every setting with its effective value and its source: default, the file, or an environment
    variable (each key `section.key` can be overridden by `MESHAGENT_SECTION_KEY`, whose value is
    read as TOML: `MESHAGENT_PROXY_IDLE_TIMEOUT_S=600`, `MESHAGENT_INTERCEPT_SSH_PORTS='[22, 2222]'`)."""
    settings = load_config(config, required=config is not None)
    rows = [r for r in describe(settings) if not changed or r["source"] != "default"]
    if as_json:
        emit_json({"file": str(settings.source) if settings.source else None, "settings": rows})
        return
    click.echo(f"# file: {settings.source or 'none (defaults)'}")
    click.echo(
        table(["KEY", "VALUE", "SOURCE"], [(r["key"], json.dumps(r["value"]), r["source"]) for r in rows])
    )
