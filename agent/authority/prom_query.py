"""A small client of Prometheus's HTTP API: the catalog's engine for everything over time.

The authority stores no time series of its own: edges, success rates, latency quantiles and
error budgets are PromQL over the series the agents export, evaluated by the Prometheus that
scrapes them (README "Service catalog"). This module only asks and parses; what to ask is in
agent/authority/edges.py and slo.py.

Where the URL comes from (`resolve_url`): `--prometheus URL`, else MESHAGENT_PROMETHEUS_URL,
else DIR/prometheus.url, which `authority serve --prometheus URL` records (`record_url`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from agent.errors import ExitCode, MeshagentError
from agent.fsutil import write_atomic
from agent.logs import get_logger

PROMETHEUS_ENV: Final = "MESHAGENT_PROMETHEUS_URL"
URL_FILE: Final = "prometheus.url"
# A bound on one answer: the catalog's queries aggregate (one series per edge or per SLO), so a
# bigger answer is a wrong URL or a runaway query, not data to hold in memory.
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024

_HINT: Final = (
    "start Prometheus or fix its address: --prometheus URL, "
    f"{PROMETHEUS_ENV}, or DIR/{URL_FILE} (written by `meshagent authority serve --prometheus URL`)"
)

log = get_logger(__name__)

Labels = dict[str, str]
Sample = tuple[Labels, float]
Series = tuple[Labels, list[tuple[float, float]]]


class PromUnavailable(MeshagentError):
    """Prometheus is not configured, did not answer, or answered something that is not its API."""

    code = "prometheus_unavailable"
    exit_code = ExitCode.UNREACHABLE


class PromQueryError(MeshagentError):
    """Prometheus answered and refused the query (a bug in the query, or a limit of the server)."""

    code = "prometheus_query_failed"


class PromUrlInvalid(MeshagentError):
    code = "prometheus_url_invalid"
    exit_code = ExitCode.USAGE


def check_url(url: str) -> str:
    """`url` without a trailing slash, if it is http(s)://HOST[:PORT][/PATH]; else PromUrlInvalid."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError as e:
        raise PromUrlInvalid(f"Prometheus URL {url!r} is malformed: {e}", _EXAMPLE) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PromUrlInvalid(f"Prometheus URL {url!r} is not http(s)://HOST:PORT", _EXAMPLE)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise PromUrlInvalid(
            f"Prometheus URL {url!r} has a query, fragment or credentials",
            "give the base URL only: " + _EXAMPLE,
        )
    return text.rstrip("/")


_EXAMPLE: Final = "e.g. http://prometheus.monitoring:9090 (a path prefix such as /prometheus is kept)"


def resolve_url(directory: Path, explicit: str | None = None) -> str | None:
    """The Prometheus to query: `explicit`, else $MESHAGENT_PROMETHEUS_URL, else DIR/prometheus.url;
    None when none is set (the caller says so and shows what the registry knows)."""
    if explicit:
        return check_url(explicit)
    env = os.environ.get(PROMETHEUS_ENV, "").strip()
    if env:
        return check_url(env)
    try:
        saved = (directory / URL_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return check_url(saved) if saved else None


def record_url(directory: Path, url: str) -> None:
    """Record `url` as the directory's Prometheus (atomically: a reader sees old or new)."""
    write_atomic(directory / URL_FILE, (check_url(url) + "\n").encode(), mode=0o644)


def not_configured() -> PromUnavailable:
    """The error for "no Prometheus is set", with where one can be set."""
    return PromUnavailable("no Prometheus is configured for this authority", _HINT)


def _number(text: Any) -> float:
    # Prometheus encodes sample values as strings: "1.5", "NaN", "+Inf".
    if not isinstance(text, str):
        raise TypeError(f"a sample value is {type(text).__name__}, not a string")
    return float(text)


def _labels(metric: Any) -> Labels:
    if not isinstance(metric, dict) or not all(isinstance(v, str) for v in metric.values()):
        raise TypeError("a series' labels are not a map of strings")
    return dict(metric)


class PromClient:
    """Instant and range queries, and the firing alerts, of one Prometheus (synchronous, one
    connection pool; safe to share between threads as httpx.Client is)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = check_url(url)
        # httpx's timeout bounds each read, not the answer: a server (or proxy) trickling a byte
        # at a time would hold the caller (a page render slot) forever; this bounds the whole
        self.timeout_s = timeout_s
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PromClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _get(self, path: str, params: dict[str, str]) -> Any:
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._http.stream("GET", path, params=params) as response:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout(f"no whole answer within {self.timeout_s:g} s")
                    if len(body) > MAX_ANSWER_BYTES:
                        raise PromQueryError(
                            f"Prometheus at {self.url} answered more than {MAX_ANSWER_BYTES} bytes to {path}",
                            "narrow the query (a host, a shorter window)",
                        )
                status = response.status_code
        except httpx.HTTPError as e:
            log.warning("prometheus.unavailable", url=self.url, path=path, error=str(e) or type(e).__name__)
            raise PromUnavailable(
                f"Prometheus at {self.url} did not answer: {str(e) or type(e).__name__}", _HINT
            ) from None
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or doc.get("status") not in ("success", "error"):
            raise PromUnavailable(
                f"Prometheus at {self.url} answered HTTP {status} to {path}, not Prometheus's API",
                "check the URL: it is the base address of the Prometheus server (e.g. http://HOST:9090)",
            )
        if doc["status"] == "error":
            raise PromQueryError(
                f"Prometheus at {self.url} refused {params.get('query', path)!r}: "
                f"{doc.get('errorType', '')}: {doc.get('error', '')}",
                "this is a meshagent bug if the query is one of its own; report it with the message",
            )
        return doc.get("data")

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        """An instant query: (labels, value) per series; a scalar result is one sample with no
        labels. Values may be NaN (0/0: no traffic) or ±Inf, as Prometheus computes them."""
        params = {"query": promql}
        if at is not None:
            params["time"] = repr(at)
        data = self._get("/api/v1/query", params)
        kind = data.get("resultType") if isinstance(data, dict) else None
        result = data.get("result") if isinstance(data, dict) else None
        with self._parsing("/api/v1/query"):
            if kind == "vector" and isinstance(result, list):
                return [(_labels(item["metric"]), _number(item["value"][1])) for item in result]
            if kind == "scalar" and isinstance(result, list):
                return [({}, _number(result[1]))]
        raise PromQueryError(f"Prometheus answered a {kind} to an instant query: {promql!r}")

    @contextmanager
    def _parsing(self, path: str) -> Iterator[None]:
        """A well-formed answer with malformed items (a missing field, a value that is not a
        number) is a server we cannot read: PromUnavailable, as for any answer not its API (the
        views then show the registry's facts), never a KeyError escaping to a 500."""
        try:
            yield
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise PromUnavailable(
                f"Prometheus at {self.url} answered a malformed result to {path}: {type(e).__name__}: {e}",
                "check the URL names Prometheus itself (not a proxy rewriting its answers)",
            ) from None

    def query_range(self, promql: str, start: float, end: float, step_s: float) -> list[Series]:
        """A range query: (labels, [(time, value), ...]) per series."""
        if not (step_s > 0 and math.isfinite(step_s)) or end < start:
            raise PromQueryError(f"bad range: start={start} end={end} step={step_s}")
        params = {"query": promql, "start": repr(start), "end": repr(end), "step": repr(step_s)}
        data = self._get("/api/v1/query_range", params)
        if not isinstance(data, dict) or data.get("resultType") != "matrix":
            raise PromQueryError(f"Prometheus did not answer a matrix to a range query: {promql!r}")
        with self._parsing("/api/v1/query_range"):
            return [
                (_labels(item["metric"]), [(float(t), _number(v)) for t, v in item["values"]])
                for item in data["result"]
            ]

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Prometheus has pending or firing (/api/v1/alerts): labels, annotations,
        state, activeAt, value."""
        data = self._get("/api/v1/alerts", {})
        alerts = data.get("alerts") if isinstance(data, dict) else None
        if not isinstance(alerts, list):
            return []
        # the callers read labels.get(...): only alerts shaped as Prometheus writes them
        return [a for a in alerts if isinstance(a, dict) and isinstance(a.get("labels", {}), dict)]
