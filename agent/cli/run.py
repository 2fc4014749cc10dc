"""`meshagent run`: the daemon in the foreground (what systemd starts)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agent.config import load_config
from agent.logs import configure


@click.command("run")
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="MESHAGENT_CONFIG",
    default=Path("/etc/meshagent/agent.toml"),
    show_default=True,
    help="Agent config file.",
)
def run_cmd(config: Path) -> None:
    """Run the agent in the foreground until SIGTERM.

    Loads the identity from the state directory (enroll first), starts the inbound and outbound
    proxy listeners, applies the interception rules, keeps the certificate, catalog and policy
    fresh, and tells systemd when it is ready (Type=notify). On SIGTERM or Ctrl-C it removes its
    rules (unless proxy.on_stop = "keep-rules"), drains open connections and exits 0.

    Exit codes: 0 stopped cleanly, 3 config invalid, 4 not enrolled, 9 state unusable, 1 other
    failure (e.g. a port in use); systemd restarts it in every case but 0.
    """
    from agent.daemon import run_daemon

    settings = load_config(config, required=config != Path("/etc/meshagent/agent.toml"))
    configure(settings.log.level, settings.log.format)
    sys.exit(run_daemon(settings))
