"""Interception failures: a plan that cannot be built, a backend that failed or is missing."""

from __future__ import annotations

from agent.errors import ExitCode, MeshagentError


class PlanError(MeshagentError):
    """The `[intercept]` settings do not make a safe plan (returned as a value by `build_plan`)."""

    code = "intercept_plan_invalid"
    exit_code = ExitCode.CONFIG


class InterceptError(MeshagentError):
    """Applying, reading or removing rules failed; the message quotes the tool's own words."""

    code = "intercept_failed"
