"""Renewal's one entry point: `renew_identity` (what `meshagent renew` calls) and
`python -m agent.identity.renew --state-dir DIR --json` (what the daemon runs).

The daemon renews in a short-lived process: making keys and CSRs needs `cryptography`, which
the long-running daemon never loads (~13 MB of RSS for good). This module is that process's
whole program: it does not import the CLI (click and every command), only the identity package.

Output with --json: the renewed certificate `{"spiffe_id", "serial", "not_after"}` on stdout, or
`{"error": {"code", "message", "hint"}}` and the CLI's exit status for it (its own error shape), which
`run_renewal` turns back into the same MeshagentError in the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.errors import MeshagentError, os_error
from agent.logs import configure

from .store import IdentityInfo, IdentityStore, StoredIdentity
from .transport import ProxyConfig

RENEW_TIMEOUT_S = 120


def renew_identity(store: IdentityStore, proxy: ProxyConfig | None = None) -> StoredIdentity:
    """Get a new certificate for a new key, proving possession of the current one. `proxy`: how
    to reach the authority (None: the environment's, which is how the daemon passes its own)."""
    from .enroll import renew  # makes keys and CSRs: imports `cryptography`

    return renew(store, proxy)


def run_renewal(store: IdentityStore, proxy: ProxyConfig | None = None) -> IdentityInfo:
    """Renew in a child `python -m agent.identity.renew` (the daemon's way: see the module's
    docstring), through `proxy` (the daemon's, handed over in the child's environment); the
    renewed identity as the daemon loads it, or the child's MeshagentError."""
    argv = [sys.executable, "-m", "agent.identity.renew", "--json", "--state-dir", str(store.state_dir)]
    env = None if proxy is None else {**os.environ, **proxy.child_env()}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=RENEW_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise MeshagentError(
            f"the renewal did not finish within {RENEW_TIMEOUT_S} s", code="renew_timeout"
        ) from None
    if proc.returncode != 0:
        try:
            err = json.loads(proc.stdout)["error"]
            raise MeshagentError(err["message"], err.get("hint", ""), code=err["code"])
        except (ValueError, KeyError, TypeError):
            raise MeshagentError(
                f"the renewal exited {proc.returncode}: {proc.stderr.strip()[-300:]}", code="renew_failed"
            ) from None
    return store.load_info()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.identity.renew",
        description="Renew this host's certificate now (the daemon's renewal process).",
    )
    parser.add_argument("--state-dir", type=Path, required=True, help="where the identity lives")
    parser.add_argument("--json", action="store_true", help="print JSON for the daemon")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    configure(args.log_level)  # logs on stderr; the daemon keeps the last lines of a failure
    try:
        try:
            identity = renew_identity(IdentityStore(args.state_dir))
        except OSError as exc:  # the state directory: as the CLI says it
            raise os_error(exc) from None
    except MeshagentError as exc:
        if args.json:
            print(json.dumps({"error": exc.as_dict()}))
        print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return int(exc.exit_code)
    doc = {
        "spiffe_id": identity.workload.spiffe_id,
        "serial": identity.summary.serial,
        "not_after": identity.summary.not_after.isoformat(),
    }
    text = f"renewed: serial {doc['serial']}, valid until {doc['not_after']}"
    print(json.dumps(doc) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
