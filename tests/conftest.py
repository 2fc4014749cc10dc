from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import AuthorityProcess, running_authority


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[AuthorityProcess]:
    """A real `meshagent authority serve` process on loopback, 24 h certificates."""
    with running_authority(tmp_path / "authority") as auth:
        yield auth
