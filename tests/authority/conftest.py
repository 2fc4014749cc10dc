from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pgcluster import PgCluster
from tests.pgcluster import pg_cluster as _pg_cluster


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL cluster per test module (tests/pgcluster.py); unix socket only."""
    with _pg_cluster() as cluster:
        yield cluster
