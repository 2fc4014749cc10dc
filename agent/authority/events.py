"""The change log the authority keeps per host: what happened, when, and who or what caused it.

Registry changes (enrolled, renewed, revoked, metadata_changed, and policy_changed for every
unrevoked host of the identity whose policy changed) are recorded in the same transaction as the
change; report-derived ones (agent_version_changed, restarted, config_changed, probe flips,
Ready flips) when a host's health report differs from its previous one (service.record_report).
The registry keeps the newest `RETAINED_PER_HOST` events of each host (older ones are deleted as
new ones arrive), so the log stays bounded however long a host lives.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

ENROLLED: Final = "enrolled"
RENEWED: Final = "renewed"
REVOKED: Final = "revoked"
METADATA_CHANGED: Final = "metadata_changed"
AGENT_VERSION_CHANGED: Final = "agent_version_changed"
RESTARTED: Final = "restarted"
PROBE_FAILING: Final = "probe_failing"
PROBE_RECOVERED: Final = "probe_recovered"
READY: Final = "ready"
NOT_READY: Final = "not_ready"
CONFIG_CHANGED: Final = "config_changed"
POLICY_CHANGED: Final = "policy_changed"

KINDS: Final = (
    ENROLLED,
    RENEWED,
    REVOKED,
    METADATA_CHANGED,
    AGENT_VERSION_CHANGED,
    RESTARTED,
    PROBE_FAILING,
    PROBE_RECOVERED,
    READY,
    NOT_READY,
    CONFIG_CHANGED,
    POLICY_CHANGED,
)

# Who caused an event: "token:<id>" (an enrollment with that join token), "cli:<user>" (an
# operator's command), "agent" (the host itself: a renewal), "report" (derived from the host's
# health report), "controller" (the Kubernetes controller).
ACTOR_AGENT: Final = "agent"
ACTOR_REPORT: Final = "report"
ACTOR_CONTROLLER: Final = "controller"

RETAINED_PER_HOST: Final = 500  # the newest this many events of each host are kept
MAX_DETAIL: Final = 500  # characters of detail stored (longer is cut)
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 10_000


@dataclass(frozen=True)
class Event:
    id: int
    host_id: str
    at: datetime
    kind: str
    detail: str
    actor: str

    def to_doc(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host_id": self.host_id,
            "at": self.at.isoformat(),
            "kind": self.kind,
            "detail": self.detail,
            "actor": self.actor,
        }


def token_actor(token_id: str) -> str:
    return f"token:{token_id}"


def cli_actor(user: str | None = None) -> str:
    """`cli:<user>`: the operator running this command (the login name, else 'unknown')."""
    if user is None:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER
            user = "unknown"
    return f"cli:{user}"


def clip(detail: str) -> str:
    return detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 1] + "…"
