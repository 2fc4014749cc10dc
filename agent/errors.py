"""The one exception tree of meshagent.

Every failure a user can act on is a `MeshagentError` with a stable `code` (for scripts and the
authority's JSON errors), a `message` that says what failed on which input, and a `hint` that
says what to do next. The CLI maps them to exit codes in one place; nothing else prints them.
"""

from __future__ import annotations

import errno
from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes: part of the CLI's interface, documented in the README."""

    OK = 0
    FAILURE = 1  # an operation failed for a reason not listed below
    USAGE = 2  # bad command line (click's own code)
    CONFIG = 3  # config file missing keys, wrong types, unreadable
    NOT_ENROLLED = 4  # no identity in the state directory
    UNREACHABLE = 5  # the authority could not be reached
    REJECTED = 6  # the authority refused (token used/expired, revoked host, bad CSR, ...)
    TRUST = 7  # the authority could not be verified (pin mismatch, bad chain)
    CLOCK = 8  # this host's clock disagrees with the authority's
    STATE = 9  # the state directory is unusable (permissions, corrupt files)


class MeshagentError(Exception):
    """A failure the user can act on: what failed, and what to do next."""

    code: str = "error"
    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, hint: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class ConfigError(MeshagentError):
    code = "config_invalid"
    exit_code = ExitCode.CONFIG


class NotEnrolledError(MeshagentError):
    code = "not_enrolled"
    exit_code = ExitCode.NOT_ENROLLED


class UnreachableError(MeshagentError):
    code = "authority_unreachable"
    exit_code = ExitCode.UNREACHABLE


class RejectedError(MeshagentError):
    """The authority answered with a refusal; `code` is the authority's own stable code."""

    exit_code = ExitCode.REJECTED


class TrustError(MeshagentError):
    code = "authority_untrusted"
    exit_code = ExitCode.TRUST


class ClockSkewError(MeshagentError):
    code = "clock_skew"
    exit_code = ExitCode.CLOCK


class StateError(MeshagentError):
    code = "state_invalid"
    exit_code = ExitCode.STATE


class ListenError(MeshagentError):
    """A port the agent must listen on is taken or not allowed (exit 1, as documented)."""

    code = "listen_failed"


def listen_error(what: str, setting: str, host: str | None, port: int, exc: OSError) -> ListenError:
    """Why `what` could not listen on `host:port`, naming the setting and who to check."""
    where = f"{host or '*'}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ListenError(
            f"cannot listen on {where} for the {what}: the port is already in use",
            f"see who holds it: ss -ltnp 'sport = :{port}' (another meshagent?); stop it, "
            f"or set {setting} to a free port",
            code="port_in_use",
        )
    return ListenError(
        f"cannot listen on {where} for the {what}: {exc.strerror or exc}",
        f"check {setting} and the address it listens on",
    )


# Disks that are full or read-only, and permissions: the state is unusable (exit 9).
_STATE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def os_error(exc: OSError) -> MeshagentError:
    """An OSError that reached the CLI, as a message and exit code instead of a traceback."""
    target = f" {exc.filename}" if exc.filename else ""
    if exc.errno in _STATE_ERRNOS:
        return StateError(
            f"cannot use{target}: {exc.strerror}",
            "free space on that file system, make it writable, or run as a user that may write it",
            code="state_unwritable",
        )
    return MeshagentError(f"{exc.strerror or exc}{target and ':' + target}", code="os_error")
