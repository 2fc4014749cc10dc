"""Traffic interception: the rule plan (pure), its renderings, and the kernel backends.

Library entry points for `meshagent run`: `build_plan`, `detect_backend`, `apply_plan`,
`remove_all`, `status`; for the proxy: `orig_dst.original_dst`.
"""

from .apply import AppliedState, RemovedState, apply_plan, detect_backend, remove_all, status
from .errors import InterceptError, PlanError
from .plan import Plan, build_plan

__all__ = [
    "AppliedState",
    "InterceptError",
    "Plan",
    "PlanError",
    "RemovedState",
    "apply_plan",
    "build_plan",
    "detect_backend",
    "remove_all",
    "status",
]
