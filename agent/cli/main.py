"""`meshagent`: the entry point. Errors become a message, a hint and an exit code here, once."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import click

from agent import __version__
from agent.errors import ExitCode, MeshagentError, os_error
from agent.logs import configure

from .output import error_text

# name -> "module:attribute". Commands are imported when used, so `meshagent run` (the
# long-running daemon) never loads what only the other commands need (cryptography, sqlite).
COMMANDS = {
    "enroll": "agent.cli.identity:enroll_cmd",
    "status": "agent.cli.identity:status_cmd",
    "renew": "agent.cli.identity:renew_cmd",
    "run": "agent.cli.run:run_cmd",
    "stat": "agent.cli.stat:stat_cmd",
    "check": "agent.cli.check:check_cmd",
    "config": "agent.cli.config_cmd:config_group",
    "intercept": "agent.cli.intercept:intercept",
    "install": "agent.cli.install:install_cmd",
    "uninstall": "agent.cli.install:uninstall_cmd",
    "authority": "agent.cli.authority:authority",
    "demo": "agent.cli.demo:demo",
}


class MeshagentGroup(click.Group):
    """Maps `MeshagentError` to its message, hint and exit code; --json callers get JSON.
    Loads each command's module only when that command runs (or when help lists it)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeshagentError as exc:
            self._fail(ctx, exc)
        except OSError as exc:  # a full or read-only disk, a file that went away: no traceback
            self._fail(ctx, os_error(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)

    @staticmethod
    def _fail(ctx: click.Context, exc: MeshagentError) -> None:
        if "--json" in sys.argv:
            click.echo(json.dumps({"error": exc.as_dict()}, indent=2))
        click.echo(error_text(exc), err=True)
        ctx.exit(int(exc.exit_code))


@click.group(cls=MeshagentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshagent")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    envvar="MESHAGENT_LOG_LEVEL",
    show_default=True,
    help="Log verbosity on stderr.",
)
@click.option(
    "--log-format",
    type=click.Choice(["logfmt", "json"]),
    default="logfmt",
    envvar="MESHAGENT_LOG_FORMAT",
    show_default=True,
    help="Log line format.",
)
def cli(log_level: str, log_format: str) -> None:
    """meshagent brings this host into a Kubernetes service mesh: a workload identity,
    mutual TLS on every connection, and golden metrics, without changing the app.

    \b
    Join a host (cluster side first):
      meshagent authority init --dir ./ca --trust-domain cluster.local
      meshagent authority serve --dir ./ca --listen 0.0.0.0:8443 &
      meshagent authority token create --dir ./ca --identity shop/billing --url https://AUTHORITY:8443
    then on the host:
      meshagent enroll <TOKEN>
      meshagent status

    Exit codes: 0 ok, 1 failure, 2 usage, 3 config, 4 not enrolled, 5 authority or Prometheus unreachable,
    6 refused by the authority, 7 authority not trusted, 8 clock skew, 9 state directory unusable.
    """
    configure(log_level, log_format)


def main() -> None:
    try:
        cli.main(standalone_mode=True)
    except SystemExit as exc:
        sys.exit(exc.code if exc.code is not None else int(ExitCode.OK))
