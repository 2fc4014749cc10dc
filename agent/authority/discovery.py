"""Who may read the fleet's target list: Prometheus, with a bearer token from the authority's
directory.

The list names every host, its address and its SPIFFE ID, so it is not served to whoever can
reach the API port. `meshagent authority prometheus-token` creates (or rotates) the token file;
Prometheus reads the same file through `authorization: {credentials_file: ...}`. The file is
read on each request, so a rotation takes effect without restarting the authority.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from agent.errors import RejectedError
from agent.fsutil import write_atomic

TOKEN_FILE = "prometheus-token"  # noqa: S105 (a file name, not a secret)


def token_path(directory: Path) -> Path:
    return directory / TOKEN_FILE


def ensure_token(directory: Path, rotate: bool = False) -> tuple[Path, bool]:
    """The token file, created if missing (or replaced if `rotate`); True if it was written."""
    path = token_path(directory)
    if not rotate and _read(path):
        return path, False  # (an empty file is no token: it is replaced)
    write_atomic(path, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)
    return path, True


def _read(path: Path) -> str:
    """The token, or "" when the file is missing or blank (which never matches anything)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def authorize(directory: Path, authorization: str) -> None:
    """Refuse unless `authorization` (the request's header) carries the current token."""
    expected = _read(token_path(directory))
    if not expected:
        raise RejectedError(
            "Prometheus discovery is off: the authority has no discovery token",
            code="discovery_disabled",
            hint="create one with `meshagent authority prometheus-token --dir DIR` and point "
            "Prometheus' authorization.credentials_file at it",
        )
    # "Bearer TOKEN", or the token alone: Prometheus 2.42 (Debian 12's) sends the bare
    # credentials in http_sd_configs unless the config spells out `type: Bearer`.
    scheme, _, given = authorization.strip().rpartition(" ")
    if scheme.lower() not in ("bearer", "") or not hmac.compare_digest(given.encode(), expected.encode()):
        raise RejectedError(
            "this endpoint needs Authorization: Bearer <the authority's discovery token>",
            code="unauthenticated",
            hint="in Prometheus: authorization: {credentials_file: <a copy of DIR/prometheus-token>}",
        )
