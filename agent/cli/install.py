"""`meshagent install` / `meshagent uninstall`."""

from __future__ import annotations

import click

from .output import emit_json


@click.command("install")
@click.option("--authority", is_flag=True, help="Also install the authority's unit and user (cluster side).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def install_cmd(authority: bool, as_json: bool) -> None:
    """Put the systemd unit, the meshagent user, its directories and a default config in place.

    Idempotent: a second run changes nothing. Then: meshagent enroll <TOKEN>, and
    systemctl enable --now meshagent.
    """
    from agent.install import install

    changes = install(authority)
    if as_json:
        emit_json({"changed": bool(changes), "changes": changes})
        return
    for change in changes:
        click.echo(change)
    click.echo(
        "already installed, nothing changed"
        if not changes
        else "next: meshagent enroll <TOKEN> && systemctl enable --now meshagent"
    )


@click.command("uninstall")
@click.option("--keep-state", is_flag=True, help="Keep /var/lib/meshagent (the identity) for a reinstall.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def uninstall_cmd(keep_state: bool, as_json: bool) -> None:
    """Stop and disable the unit, remove the rules, keys, state, config, units and user.

    Works with a broken config. Afterwards the host is as it was before `meshagent install`
    (revoke the host on the authority too: meshagent authority revoke HOST). Without the
    install record (/var/lib/meshagent-install.json) it removes only what it can prove it
    made (our rules, files with our header, the untouched default config, a state directory
    of only the agent's files), never a user, and says what it left and how to remove it.
    """
    from agent.install import uninstall

    done, left = uninstall(keep_state)
    if as_json:
        emit_json(
            {
                "changed": bool(done),
                "removed": done,
                "left": [{"what": x.what, "why": x.why, "how": x.how} for x in left],
            }
        )
        return
    for step in done:
        click.echo(step)
    for x in left:
        click.echo(str(x))
    if not done and not left:
        click.echo("nothing to remove")
