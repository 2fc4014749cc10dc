"""`meshagent demo`: the whole story on one machine, then everything removed."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from typing import Any, NoReturn

import click

from .output import table


def _interrupt(*_: object) -> NoReturn:
    raise KeyboardInterrupt


def _human(step: dict[str, Any]) -> None:
    mark = click.style("✓", fg="green") if step.get("ok") else click.style("✗", fg="red")
    name = step["step"]
    if name == "world":
        click.echo(f"{mark} world: three hosts in network namespaces")
        for host, what in step["hosts"].items():
            click.echo(f"    {host:8} {what}")
    elif name == "authority":
        click.echo(f"{mark} authority serving at {step['url']} (trust domain {step['trust_domain']})")
    elif name == "apps":
        click.echo(f"{mark} legacy apps: web runs {step['web']}, cache runs {step['cache']}")
    elif name == "enroll":
        click.echo(
            f"{mark} enrolled {step['host']:8} as {step['spiffe_id']}  (in {step['enroll_seconds']}s, "
            f"certificate valid until {step['not_after']})"
        )
    elif name == "agents":
        click.echo(f"{mark} agents ready on {', '.join(step['ready'])} (interception applied)")
    elif name == "first_mtls":
        t = step["token_to_mtls_seconds"]
        click.echo(f"{mark} token to serving mTLS: web {t['web']}s, cache {t['cache']}s")
    elif name == "traffic":
        http = step["http"]
        click.echo(
            f"{mark} traffic: {http['ok']} HTTP 200s and {http['server_errors']} server errors client->web; "
            f"redis-benchmark client->cache"
        )
    elif name == "wire":
        click.echo(
            f"{mark} on the wire (capture on the web link): {step['tls13_handshakes']} TLS 1.3 handshakes, "
            f"{step['tls_application_records']} encrypted records, payload in clear: "
            f"{'YES' if step['payload_in_clear'] else 'no'}"
        )
    elif name == "stat":
        click.echo(f"{mark} meshagent stat on web:")
        rows = step["rows"]
        click.echo(
            "    "
            + table(
                ["DIRECTION", "PEER IDENTITY", "SUCCESS", "RPS", "P50", "P99", "TCP"],
                [
                    (
                        r["direction"],
                        r["peer_identity"],
                        "-" if r["success_rate"] is None else f"{r['success_rate'] * 100:.1f}%",
                        f"{r['rps']:.1f}",
                        "-" if r["latency_p50_ms"] is None else f"{r['latency_p50_ms']:.0f}ms",
                        "-" if r["latency_p99_ms"] is None else f"{r['latency_p99_ms']:.0f}ms",
                        r["tcp_open_connections"],
                    )
                    for r in rows
                ],
            ).replace("\n", "\n    ")
        )
    elif name == "refused":
        click.echo(f"{mark} refused: {step['from']} -> {step['to']}: {step['reason']}")
    elif name == "ready":
        click.echo(f"\nthe mesh is up ({step['elapsed_seconds']}s). Try, in another terminal:")
        for command in step["try"]:
            click.echo(f"    {command}")
        click.echo(
            "Ctrl-C removes everything."
            if step.get("duration") is None
            else f"removing everything in {step['duration']:.0f}s (or at Ctrl-C)."
        )
    elif name == "kept":
        click.echo(f"{mark} kept {', '.join(step['namespaces'])}; remove with: {step['remove_with']}")
    elif name == "removed":
        click.echo(f"{mark} removed every namespace, process and rule the demo made")


@click.group("demo", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with every step, for scripts.")
@click.option(
    "--duration",
    type=click.FloatRange(0, 86400),
    help="Seconds to keep the world up after the proofs, then remove it [default: until Ctrl-C].",
)
@click.option(
    "--keep", is_flag=True, help="Leave the world up for exploring (remove it with `meshagent demo down`)."
)
@click.pass_context
def demo(ctx: click.Context, as_json: bool, duration: float | None, keep: bool) -> None:
    """Build a small mesh in network namespaces and prove each plane, as it goes.

    A "cluster" host runs the authority and a meshed client; two legacy hosts run nginx and
    redis. Both legacy hosts are enrolled and their agents started with interception; the
    client's plain calls cross the wire as mutual TLS 1.3 (shown from a packet capture), golden
    metrics come out of `meshagent stat`, and an unauthorized call is refused. Needs root and
    the tools `scripts/bootstrap` installs. Nothing is left behind, also on Ctrl-C or failure.
    """
    if ctx.invoked_subcommand is not None:
        return
    from agent.demo.world import run_demo

    signal.signal(signal.SIGTERM, _interrupt)
    steps: list[dict[str, Any]] = []

    def report(step: dict[str, Any]) -> None:
        steps.append(step)
        if not as_json:
            _human(step)

    def wait_forever() -> None:
        while True:
            time.sleep(3600)

    error: dict[str, str] | None = None
    try:
        run_demo(report, duration, keep, wait_forever)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        from agent.errors import MeshagentError

        error = (
            exc.as_dict()
            if isinstance(exc, MeshagentError)
            else {"code": "demo_failed", "message": repr(exc), "hint": ""}
        )
    ok = error is None and all(s.get("ok") for s in steps)
    if as_json:
        click.echo(json.dumps({"ok": ok, "steps": steps, "error": error}, indent=2, default=str))
    elif error is not None:
        click.echo(
            f"error: {error['message']}" + (f"\n  hint: {error['hint']}" if error.get("hint") else ""),
            err=True,
        )
    sys.exit(0 if ok else 1)


@demo.command("down")
def demo_down() -> None:
    """Remove a world left up by `meshagent demo --keep`."""
    from agent.demo.world import PREFIX, kept_workdirs
    from agent.netlab import remove_by_prefix

    removed = remove_by_prefix(PREFIX)
    for workdir in kept_workdirs():
        shutil.rmtree(workdir, ignore_errors=True)
    click.echo(f"removed {len(removed)} namespaces" + (f": {', '.join(removed)}" if removed else ""))
