"""Traffic interception: the rule plan (pure), its renderings, and the kernel backends.

Entry points, each in its own module so importers pay only for what they use (the proxy needs
`orig_dst` alone, with no pyroute2 or subprocess behind it):

- `plan.build_plan(settings) -> Plan | PlanError` (pure);
- `apply.detect_backend`, `apply.apply_plan(plan, backend) -> AppliedState`,
  `apply.remove_all() -> RemovedState`, `apply.status()` (what `meshagent run` calls);
- `orig_dst.original_dst(sock) -> OriginalDst` (the proxy).
"""
