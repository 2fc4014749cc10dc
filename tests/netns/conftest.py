from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.netlab import Host, Lab, namespaces, netns_supported


@pytest.fixture(scope="session", autouse=True)
def _no_namespace_left_behind() -> Iterator[None]:
    before = set(namespaces()) if netns_supported() is None else set()
    yield
    if netns_supported() is None:
        left = set(namespaces()) - before
        assert not left, f"network namespaces left behind: {sorted(left)}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = netns_supported()
    if reason:
        pytest.skip(reason)
    with Lab() as created:
        yield created


@pytest.fixture
def two_hosts(lab: Lab) -> tuple[Host, Host]:
    """Hosts a (198.18.1.1, 2001:db8:1::1) and b (198.18.1.2, 2001:db8:1::2) on one veth link."""
    a, b = lab.host("a"), lab.host("b")
    lab.link(a, b)
    return a, b
