"""`--prometheus URL`: the Prometheus the authority's catalog queries (edges, SLO budgets).

Shared by `authority serve`, `edges`, `slo status`, `catalog show` and `backstage export`, so the
resolution order is the same everywhere (agent/authority/prom_query.py `resolve_url`): this flag,
else MESHAGENT_PROMETHEUS_URL, else DIR/prometheus.url, which `authority serve --prometheus`
writes.
"""

from __future__ import annotations

import click

from agent.authority.prom_query import PROMETHEUS_ENV, URL_FILE

prometheus_option = click.option(
    "--prometheus",
    "prometheus_url",
    metavar="URL",
    envvar=PROMETHEUS_ENV,
    default=None,
    help="The Prometheus that scrapes the fleet (http://HOST:9090), queried for edges and SLO "
    f"budgets. [default: DIR/{URL_FILE}, written by `authority serve --prometheus`] "
    f"[env: {PROMETHEUS_ENV}]",
)
