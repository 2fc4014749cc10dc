"""The one exception tree of meshagent.

Every failure a user can act on is a `MeshagentError` with a stable `code` (for scripts and the
authority's JSON errors), a `message` that says what failed on which input, and a `hint` that
says what to do next. The CLI maps them to exit codes in one place; nothing else prints them.
"""

from __future__ import annotations

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
