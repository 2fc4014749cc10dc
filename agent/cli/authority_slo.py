"""`meshagent authority edges` and `meshagent authority slo ...`: dependencies from traffic
and SLO rules (issue #20)."""

from __future__ import annotations

import click


def register(authority: click.Group, catalog: click.Group) -> None:
    """Adds this module's commands to `meshagent authority` (and its `catalog` group)."""
