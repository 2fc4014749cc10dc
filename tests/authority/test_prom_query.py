"""PromClient and where the Prometheus URL comes from, without a Prometheus: what the client
does with answers that are not Prometheus's API, and the resolution order flag > env > file.
(Queries against a real Prometheus: tests/authority/test_edges_and_budgets.py.)"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.authority import prom_query
from agent.authority.prom_query import (
    PROMETHEUS_ENV,
    URL_FILE,
    PromClient,
    PromQueryError,
    PromUnavailable,
    PromUrlInvalid,
    record_url,
    resolve_url,
)
from tests.support import free_port


@pytest.fixture
def server() -> Iterator[dict[str, tuple[int, bytes]]]:
    """A loopback HTTP server answering each path with what the test puts in the dict."""
    answers: dict[str, tuple[int, bytes]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answers.get(self.path.split("?")[0], (404, b"not found"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    answers["/port"] = (200, str(httpd.server_address[1]).encode())
    try:
        yield answers
    finally:
        httpd.shutdown()
        httpd.server_close()


def client(answers: dict[str, tuple[int, bytes]]) -> PromClient:
    return PromClient(f"http://127.0.0.1:{answers['/port'][1].decode()}/", timeout_s=5)


def test_a_dead_port_says_who_did_not_answer_and_what_to_do() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with PromClient(url, timeout_s=2) as prom, pytest.raises(PromUnavailable) as e:
        prom.query("up")
    assert e.value.message.startswith(f"Prometheus at {url} did not answer")
    assert PROMETHEUS_ENV in e.value.hint and URL_FILE in e.value.hint
    assert e.value.exit_code == 5


def test_something_that_is_not_prometheus_is_unavailable(server: dict[str, tuple[int, bytes]]) -> None:
    server["/api/v1/query"] = (200, b"<html>a login page</html>")
    with client(server) as prom, pytest.raises(PromUnavailable) as e:
        prom.query("up")
    assert "not Prometheus's API" in e.value.message and "HTTP 200" in e.value.message


def test_answers_are_parsed_as_prometheus_writes_them(server: dict[str, tuple[int, bytes]]) -> None:
    vector = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"host_id": "a"}, "value": [1.5, "0.25"]},
                {"metric": {"host_id": "b"}, "value": [1.5, "NaN"]},
            ],
        },
    }
    matrix = {
        "status": "success",
        "data": {"resultType": "matrix", "result": [{"metric": {}, "values": [[1, "1"], [2, "+Inf"]]}]},
    }
    alerts = {"status": "success", "data": {"alerts": [{"labels": {"alertname": "X"}, "state": "firing"}]}}
    server["/api/v1/query"] = (200, json.dumps(vector).encode())
    server["/api/v1/query_range"] = (200, json.dumps(matrix).encode())
    server["/api/v1/alerts"] = (200, json.dumps(alerts).encode())
    with client(server) as prom:
        (a, av), (b, bv) = prom.query("x")
        assert (a, av) == ({"host_id": "a"}, 0.25) and b == {"host_id": "b"} and bv != bv  # NaN
        assert prom.query_range("x", 0, 2, 1) == [({}, [(1.0, 1.0), (2.0, float("inf"))])]
        assert prom.alerts() == [{"labels": {"alertname": "X"}, "state": "firing"}]


def test_a_refused_query_is_a_query_error_with_prometheus_s_reason(
    server: dict[str, tuple[int, bytes]],
) -> None:
    refused = {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}
    server["/api/v1/query"] = (400, json.dumps(refused).encode())
    with client(server) as prom, pytest.raises(PromQueryError) as e:
        prom.query("up{")
    assert "bad_data: parse error at char 3" in e.value.message and "'up{'" in e.value.message


def test_an_answer_over_the_bound_is_refused_not_held(
    server: dict[str, tuple[int, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prom_query, "MAX_ANSWER_BYTES", 100_000)
    server["/api/v1/query"] = (200, b" " * 100_001)
    with client(server) as prom, pytest.raises(PromQueryError) as e:
        prom.query("up")
    assert "more than" in e.value.message


def test_the_url_comes_from_the_flag_then_the_environment_then_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PROMETHEUS_ENV, raising=False)
    assert resolve_url(tmp_path) is None
    assert resolve_url(tmp_path / "missing") is None
    record_url(tmp_path, "http://prom.example:9090/")
    assert (tmp_path / URL_FILE).read_text() == "http://prom.example:9090\n"
    assert resolve_url(tmp_path) == "http://prom.example:9090"
    monkeypatch.setenv(PROMETHEUS_ENV, "https://env.example/prometheus")
    assert resolve_url(tmp_path) == "https://env.example/prometheus"
    assert resolve_url(tmp_path, "http://flag.example:9090") == "http://flag.example:9090"


@pytest.mark.parametrize(
    "url",
    [
        "prom:9090",
        "ftp://prom",
        "http://",
        "http://u:p@prom:9090",
        "http://prom:9090/?x=1",
        "http://prom:99999",
    ],
)
def test_urls_that_name_no_prometheus_are_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(PromUrlInvalid):
        record_url(tmp_path, url)
    with pytest.raises(PromUrlInvalid):
        PromClient(url)
    assert not (tmp_path / URL_FILE).exists()


@pytest.mark.parametrize(
    "result",
    [
        [{"metric": {"host_id": "a"}}],  # no value
        [{"value": [1.5, "1"]}],  # no labels
        [{"metric": {"host_id": "a"}, "value": [1.5, "many"]}],  # not a number
        [{"metric": {"host_id": "a"}, "value": [1.5, 2]}],  # a number, not the string Prometheus writes
        [{"metric": {"host_id": 7}, "value": [1.5, "1"]}],
        ["not an object"],
    ],
)
def test_a_malformed_result_is_prometheus_unavailable_not_a_crash(
    server: dict[str, tuple[int, bytes]], result: list[object]
) -> None:
    doc = {"status": "success", "data": {"resultType": "vector", "result": result}}
    server["/api/v1/query"] = (200, json.dumps(doc).encode())
    matrix = {
        "status": "success",
        "data": {"resultType": "matrix", "result": [{"metric": {}, "values": [[1]]}]},
    }
    server["/api/v1/query_range"] = (200, json.dumps(matrix).encode())
    with client(server) as prom:
        with pytest.raises(PromUnavailable) as e:
            prom.query("up")
        assert "malformed result" in e.value.message and e.value.hint
        with pytest.raises(PromUnavailable):
            prom.query_range("up", 0, 1, 1)


def test_alerts_not_shaped_as_prometheus_writes_them_are_left_out(
    server: dict[str, tuple[int, bytes]],
) -> None:
    alerts = {"status": "success", "data": {"alerts": ["x", {"labels": "y"}, {"labels": {"alertname": "A"}}]}}
    server["/api/v1/alerts"] = (200, json.dumps(alerts).encode())
    with client(server) as prom:
        assert prom.alerts() == [{"labels": {"alertname": "A"}}]


def test_an_answer_trickling_in_is_cut_at_the_client_s_deadline() -> None:
    """Every read gets a byte within httpx's per-read timeout, so only a deadline on the whole
    answer stops it (the server would go on for 60 s)."""
    stop = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "600")
            self.end_headers()
            for _ in range(600):
                if stop.wait(0.1):
                    return
                self.wfile.write(b" ")
                self.wfile.flush()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with PromClient(f"http://127.0.0.1:{httpd.server_address[1]}", timeout_s=1) as prom:
            with pytest.raises(PromUnavailable) as e:
                prom.query("up")
            assert "no whole answer within 1 s" in e.value.message
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()
