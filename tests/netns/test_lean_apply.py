"""`apply_plan` in redirect mode leaves pyroute2 out of the calling process (the daemon).

pyroute2 costs ~10 MB of RSS for as long as it is imported; `meshagent run` applies the plan
in-process and must stay under its idle RSS goal (40 MB). The netlink parts of an apply (the
stale conntrack cleanup, iptables-nft's table/chain query) run in a short-lived child instead.
Each backend applies a redirect plan in a fresh interpreter inside a namespace and reports
what it imported and what the cleanup said.
"""

from __future__ import annotations

import json
import sys

import pytest

from agent.netlab import Host

from .intercept_support import BACKENDS, PROXY_UID, require_backend

pytestmark = pytest.mark.netns

SCRIPT = f"""
import json, sys
from agent.config import InterceptSettings
from agent.intercept.apply import apply_plan, get_backend, remove_all
from agent.intercept.plan import build_plan

plan = build_plan(InterceptSettings(proxy_user={PROXY_UID}), authority=[("198.18.9.9", 8443)])
state = apply_plan(plan, get_backend(sys.argv[1]))
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "pyroute2")
remove_all()
print(json.dumps({{"pyroute2": loaded, "conntrack_error": state.conntrack_error}}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_redirect_apply_loads_no_pyroute2(two_hosts: tuple[Host, Host], backend: str) -> None:
    a, _ = two_hosts
    require_backend(a, backend)
    doc = json.loads(a.run(sys.executable, "-c", SCRIPT, backend).stdout.strip().splitlines()[-1])
    assert doc == {"pyroute2": [], "conntrack_error": ""}
