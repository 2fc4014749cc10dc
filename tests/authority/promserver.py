"""One real Prometheus for the authority's tests (edges, budgets, the catalog page, Backstage),
and host records outside any registry.

    with prometheus(tmp_dir, scrape_configs, rules=slo.rules(...)) as url:
        wait_for(url, 'min(count_over_time(response_total[1m])) >= 4', tmp_dir)
        ...

The server listens on a free loopback port, keeps its data and log under the directory given,
and is stopped (terminated, killed after 10 s) when the block ends, whatever happened in it.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from agent.authority.prom_query import PromClient, PromUnavailable
from agent.authority.storage import HostRecord
from tests.support import free_port


@contextmanager
def prometheus(
    directory: Path,
    scrape_configs: list[dict[str, Any]],
    rules: dict[str, Any] | None = None,
    interval: str = "1s",
) -> Iterator[str]:
    """A Prometheus scraping `scrape_configs` every `interval` (and evaluating `rules`, a rule
    file's document, as often); yields its URL."""
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": scrape_configs,
    }
    if rules is not None:
        (directory / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config["rule_files"] = [str(directory / "rules.yml")]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (directory / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(url: str, promql: str, directory: Path | None = None, timeout_s: float = 30.0) -> None:
    """Until `promql` (a filter, e.g. `... >= 12`) has a result; on timeout the AssertionError
    carries Prometheus's log from `directory`."""
    deadline = time.monotonic() + timeout_s
    with PromClient(url) as prom:
        while True:
            try:
                if prom.query(promql):
                    return
            except PromUnavailable:
                pass  # still starting
            if time.monotonic() > deadline:
                log = (directory / "prometheus.log").read_text() if directory is not None else ""
                raise AssertionError(f"timed out waiting for {promql!r}\n{log}")
            time.sleep(0.2)


def host_record(
    host_id: str,
    name: str,
    identity: str,
    addresses: tuple[str, ...] = ("198.18.0.1",),
    revoked_at: datetime | None = None,
) -> HostRecord:
    """A host record outside any registry (`identity`: NAMESPACE/NAME as the registry keeps it)."""
    now = datetime.now(UTC)
    return HostRecord(
        id=host_id,
        identity=identity,
        host_name=name,
        addresses=addresses,
        serial="01",
        not_after=now,
        cert_pem="",
        enrolled_at=now,
        last_renewal=None,
        revoked_at=revoked_at,
    )


class Exporter:
    """Agent-format series on loopback for Prometheus to scrape: GET /metrics/<name> answers
    `series(name, seconds since the exporter started)`, so counters grow at the rates the test set."""

    def __init__(self, series: Callable[[str, float], str]) -> None:
        started = time.time()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = series(self.path.rsplit("/", 1)[-1], time.time() - started).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
