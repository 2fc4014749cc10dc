"""The metrics plane for real: Prometheus discovers the hosts through the authority, scrapes
them, and Linkerd's queries return what the test's traffic implies; `meshagent stat` agrees."""

from __future__ import annotations

import json
import shutil
import sys
import time

import pytest

from agent.telemetry.proxy_metrics import LATENCY_BOUNDS_MS
from tests.mesh import apps
from tests.mesh.conftest import AUTH_PORT, Mesh, fresh_metrics, wait_for
from tests.support import MESHAGENT

pytestmark = pytest.mark.netns

OK_REQUESTS, FAILED_REQUESTS = 150, 50
PACED_RPS, PACED_S = 20, 24  # the steady traffic that requests/s and latency are read against
# client_id / server_id carry the mesh DNS name, as linkerd-proxy's do.
WEB = "web.shop.serviceaccount.identity.linkerd.cluster.local"
LEGACY = "legacy.shop.serviceaccount.identity.linkerd.cluster.local"


def prometheus(mesh: Mesh) -> str:
    """Prometheus in the cluster host, discovering targets from the authority every second."""
    d = mesh.tmp / "prometheus"
    d.mkdir()
    (d / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: meshagent
    http_sd_configs:
      - url: https://198.18.1.1:{AUTH_PORT}/v1/prometheus/targets
        refresh_interval: 1s
        authorization: {{credentials_file: {mesh.authority_dir / "prometheus-token"}}}
        tls_config: {{ca_file: {mesh.authority_dir / "api-ca.crt"}}}
    relabel_configs:  # the README's optional line: Linkerd's Health dashboard selects this job
      - {{target_label: job, replacement: linkerd-proxy}}
""")
    mesh.cl.popen(
        "prometheus",
        f"--config.file={d / 'prometheus.yml'}",
        f"--storage.tsdb.path={d / 'data'}",
        "--web.listen-address=198.18.1.1:9090",
        "--log.level=warn",
    )
    url = "http://198.18.1.1:9090"
    wait_for(
        lambda: mesh.cl.run("curl", "-sf", f"{url}/-/ready", check=False).returncode == 0,
        "prometheus up",
        timeout=30,
    )
    return url


def query(mesh: Mesh, url: str, promql: str) -> list[dict[str, object]]:
    out = mesh.cl.run("curl", "-sf", f"{url}/api/v1/query", "--data-urlencode", f"query={promql}").stdout
    doc = json.loads(out)
    assert doc["status"] == "success", doc
    result = doc["data"]["result"]
    assert isinstance(result, list)
    return result


def bucket_bound(ms: float) -> float:
    """The upper bound of the latency bucket that holds `ms` (what a bucketed quantile can say)."""
    return float(next((b for b in LATENCY_BOUNDS_MS if ms <= b), LATENCY_BOUNDS_MS[-1]))


PACED_CLIENT = f"""
import json, time, urllib.request
lat, n, start = [], 0, time.perf_counter()
while time.perf_counter() - start < {PACED_S}:
    time.sleep(max(0.0, start + n / {PACED_RPS} - time.perf_counter()))
    t = time.perf_counter()
    urllib.request.urlopen("http://198.18.3.2:8080/", timeout=5).read()
    lat.append((time.perf_counter() - t) * 1000)
    n += 1
print(json.dumps({{"rps": n / (time.perf_counter() - start), "latencies": sorted(lat)}}))
"""


def scalar(mesh: Mesh, url: str, promql: str) -> float:
    result = query(mesh, url, promql)
    assert len(result) == 1, f"{promql}: {result}"
    return float(result[0]["value"][1])  # type: ignore[index]


def settles(mesh: Mesh, url: str, promql: str, expected: float) -> None:
    """Until the instant query's one value is `expected`. A scrape can fail (its 1 s timeout is
    the agent's 1 s pull from its workers): Prometheus then marks the target's series stale and
    an instant query finds none until the next scrape."""
    seen: list[list[dict[str, object]]] = []

    def check() -> bool:
        seen[:] = [query(mesh, url, promql)]
        result = seen[0]
        return len(result) == 1 and float(result[0]["value"][1]) == expected  # type: ignore[index]

    try:
        wait_for(check, promql, timeout=20)
    except AssertionError:
        raise AssertionError(f"{promql} never gave {expected}: {seen}") from None


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus (scripts/bootstrap)")
def test_prometheus_discovers_scrapes_and_linkerd_queries_match_the_traffic(mesh: Mesh) -> None:
    apps.nginx(mesh.b, mesh.tmp, 8080)
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.1.2", "198.18.3.1"])
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.2.2", "198.18.3.2"])
    b.start()
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)
    url = prometheus(mesh)
    # One request first, so every series exists before the measured traffic (rate() and
    # increase() only count from a series' first sample).
    mesh.a.run("curl", "-sf", "http://198.18.3.2:8080/")
    mesh.a.run("curl", "-s", "http://198.18.3.2:8080/fail")
    try:
        wait_for(
            lambda: len(query(mesh, url, 'up{job="linkerd-proxy"} == 1')) == 2,
            "both hosts scraped",
            timeout=30,
        )
        first = 'sum(response_total{direction="inbound"}) >= 2'
        wait_for(lambda: len(query(mesh, url, first)) == 1, "first request scraped", timeout=30)
        time.sleep(2)
    except AssertionError:
        targets = mesh.cl.run("curl", "-s", f"{url}/api/v1/targets", check=False).stdout
        raise AssertionError(f"prometheus targets: {targets}") from None

    # The traffic: 150 successes and 50 server errors from web to legacy, timed by the client.
    script = (
        "import time, urllib.request, urllib.error, json\n"
        "lat = []\n"
        f"for i in range({OK_REQUESTS + FAILED_REQUESTS}):\n"
        f"    path = '/fail' if i % 4 == 3 else '/'\n"
        "    t = time.perf_counter()\n"
        "    try:\n"
        "        urllib.request.urlopen('http://198.18.3.2:8080' + path, timeout=5).read()\n"
        "    except urllib.error.HTTPError as e:\n"
        "        assert e.code == 500\n"
        "    lat.append((time.perf_counter() - t) * 1000)\n"
        "print(json.dumps(sorted(lat)))\n"
    )
    latencies = json.loads(mesh.a.run("python3", "-c", script, timeout=120).stdout)
    time.sleep(3)  # idle scrapes after the traffic: less of increase()'s extrapolation below

    inbound = 'direction="inbound"'
    settles(mesh, url, f'sum(response_total{{{inbound},classification="success"}})', OK_REQUESTS + 1)
    settles(mesh, url, f'sum(response_total{{{inbound},classification="failure"}})', FAILED_REQUESTS + 1)
    settles(mesh, url, f'sum(request_total{{{inbound},tls="true",client_id="{WEB}"}})', 202)
    settles(mesh, url, f'sum(response_total{{direction="outbound",server_id="{LEGACY}"}})', 202)
    # Discovery labels a host as a pod of a deployment named after its service account.
    target = query(mesh, url, 'up{namespace="shop",deployment="legacy"}')
    assert [t["metric"]["pod"] for t in target] == [mesh.b.name], target  # type: ignore[index]
    # linkerd's Server / authorization labels, per request for HTTP; outbound, the destination's.
    server = 'srv_group="",srv_kind="default",srv_name="all-unauthenticated",srv_port="8080"'
    authz = 'authz_group="",authz_kind="default",authz_name="all-unauthenticated"'
    route = 'route_group="",route_kind="default",route_name="default"'
    settles(mesh, url, f"sum(request_total{{{inbound},{server}}})", 202)
    http_authz = f'inbound_http_authz_allow_total{{{server},{route},{authz},client_id="{WEB}"}}'
    settles(mesh, url, f"sum({http_authz})", 202)
    assert query(mesh, url, f'inbound_tcp_authz_allow_total{{client_id="{WEB}"}}') == []  # HTTP: per request
    outbound_dst = 'direction="outbound",dst_namespace="shop",dst_serviceaccount="legacy"'
    settles(mesh, url, f"sum(request_total{{{outbound_dst}}})", 202)
    # Linkerd's dashboard queries.
    success_rate = scalar(
        mesh,
        url,
        f'sum(rate(response_total{{classification="success",{inbound},namespace="shop"}}[1m])) '
        f'/ sum(rate(response_total{{{inbound},namespace="shop"}}[1m]))',
    )
    assert success_rate == pytest.approx(0.75, abs=0.02)
    requests_in_window = scalar(mesh, url, f"sum(increase(request_total{{{inbound}}}[1m]))")
    # increase() extrapolates to the window's edges by up to 1.1 scrape intervals (1 s) each side
    # of a sample span of a few seconds: up to ~+30 % here (230 seen once). Exact counts: above.
    assert 200 * 0.85 <= requests_in_window <= 200 * 1.35
    p99 = scalar(
        mesh, url, f"histogram_quantile(0.99, sum(rate(response_latency_ms_bucket{{{inbound}}}[1m])) by (le))"
    )
    # The proxy's p99 lies within the bucket holding the client's own p99 (client >= proxy, bucketed).
    client_p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert 0 < p99 <= max(5.0, client_p99 * 2)
    settles(mesh, url, "count(identity_cert_expiration_timestamp_seconds > time())", 2)

    # promtool parses the exposition (exit 1 would be a format error). Its only lint remarks
    # are the two `_ms` names, which are linkerd-proxy's own and kept for compatibility (exit 3).
    exposition = mesh.cl.run("curl", "-sf", "http://198.18.2.2:4191/metrics").stdout
    check = mesh.cl.run("promtool", "check", "metrics", input=exposition, check=False)
    remarks = sorted(line for line in (check.stdout + check.stderr).splitlines() if line.strip())
    assert check.returncode in (0, 3), remarks
    assert remarks == [
        "response_latency_ms metric names should not contain abbreviated units",
        "tcp_connection_duration_ms metric names should not contain abbreviated units",
    ]

    # meshagent stat on the legacy host agrees with what the client did.
    doc = json.loads(mesh.b.run(*MESHAGENT, "stat", "--json", "--config", str(b.config)).stdout)
    row = next(r for r in doc["rows"] if r["direction"] == "inbound" and r["peer_identity"] == WEB)
    assert row["requests"] == 202, doc
    assert row["success_rate"] == pytest.approx(151 / 202), doc
    assert row["latency_p50_ms"] is not None and row["latency_p50_ms"] <= max(5.0, latencies[100] * 2)
    table = mesh.b.run(*MESHAGENT, "stat", "--config", str(b.config)).stdout
    assert f"{151 / 202 * 100:.2f}%" in table and WEB in table

    # Steady traffic paced by the client: while it runs, Linkerd's requests/s and p99 queries
    # and `meshagent stat` (a 10 s window) read what the client measured. Each request's time
    # in the proxies is part of the client's, so bucketed p99s stay within the client's bucket.
    load = mesh.a.popen("python3", "-c", PACED_CLIENT)
    time.sleep(PACED_S - 6)  # past stat's 10 s window plus a 5 s snapshot interval of traffic
    prom_rps = scalar(mesh, url, f"sum(rate(request_total{{{inbound}}}[10s]))")
    prom_p99 = scalar(
        mesh,
        url,
        f"histogram_quantile(0.99, sum(rate(response_latency_ms_bucket{{{inbound}}}[10s])) by (le))",
    )
    stat = json.loads(
        mesh.b.run(*MESHAGENT, "stat", "--json", "--window", "10", "--config", str(b.config)).stdout
    )
    out, err = load.communicate(timeout=60)
    assert load.returncode == 0, err
    client = json.loads(out)
    row = next(r for r in stat["rows"] if r["direction"] == "inbound" and r["peer_identity"] == WEB)
    client_p99 = bucket_bound(client["latencies"][int(len(client["latencies"]) * 0.99) - 1])
    print(
        f"\npaced: client {client['rps']:.2f} req/s (p99 bucket {client_p99} ms), prometheus {prom_rps:.2f}"
    )
    print(f"req/s (p99 {prom_p99:.2f} ms), stat {row['rps']:.2f} req/s (p99 {row['latency_p99_ms']:.2f} ms)")
    assert prom_rps == pytest.approx(client["rps"], rel=0.15), (prom_rps, client["rps"])
    assert row["rps"] == pytest.approx(client["rps"], rel=0.15), (row, client["rps"])
    assert row["success_rate"] == 1.0, row
    assert 0 < prom_p99 <= client_p99 and 0 < row["latency_p99_ms"] <= client_p99, (prom_p99, row)
    assert 0 < row["latency_p50_ms"] <= bucket_bound(client["latencies"][len(client["latencies"]) // 2])

    # Those counts are the compiled accounting's (status says which one the daemon runs).
    status = json.loads(mesh.b.run(*MESHAGENT, "status", "--json", "--config", str(b.config)).stdout)
    assert status["daemon"]["http_accounting"] == "compiled", status["daemon"]


H2_CLIENT = """
import httpx
with httpx.Client(http1=False, http2=True) as client:  # h2c, prior knowledge, one connection
    print(*(client.get("http://198.18.3.2:8081/" + path).status_code for path in ("", "", "fail", "")))
"""

GRPC_CLIENT = """
import json, grpc
channel = grpc.insecure_channel("198.18.3.2:50051")
say = channel.unary_unary("/demo.Echo/Say")
codes = {}
for request in [b"x"] * 20 + [b"fail"] * 5 + [b"missing"] * 3:
    try:
        assert say(request, timeout=10) == b"hi " + request
        code = 0
    except grpc.RpcError as e:
        code = e.code().value[0]
    codes[code] = codes.get(code, 0) + 1
print(json.dumps(codes))
"""


def test_http2_and_grpc_requests_are_counted_as_linkerd_counts_them(mesh: Mesh) -> None:
    apps.nginx(mesh.b, mesh.tmp / "h2c", 8081, http2=True)  # cleartext HTTP/2
    apps.grpc_echo(mesh.b, 50051)
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.1.2", "198.18.3.1"])
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.2.2", "198.18.3.2"])
    b.start()
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)

    # Plain HTTP/2: four requests on one connection, through both proxies.
    statuses = mesh.a.run(sys.executable, "-c", H2_CLIENT).stdout.split()
    assert statuses == ["200", "200", "500", "200"]
    # gRPC: codes as the client saw them (OK, UNAVAILABLE, NOT_FOUND), over one channel.
    seen = json.loads(mesh.a.run(sys.executable, "-c", GRPC_CLIENT, timeout=60).stdout)
    assert seen == {"0": 20, "14": 5, "5": 3}

    def exposition(host_ip: str) -> list[str]:  # (exact counts: not a late worker's previous dump)
        return fresh_metrics(mesh.cl, f"http://{host_ip}:4191/metrics").splitlines()

    def total(lines: list[str], family: str, *parts: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith(family + "{") and all(p in line for p in parts)
        )

    for host_ip, direction, peer in (
        ("198.18.2.2", 'direction="inbound"', f'client_id="{WEB}"'),
        ("198.18.1.2", 'direction="outbound"', f'server_id="{LEGACY}"'),
    ):
        lines = exposition(host_ip)
        h2 = 'target_port="8081"'
        grpc = 'target_port="50051"'
        assert total(lines, "request_total", direction, peer, h2) == 4, lines
        assert total(lines, "response_total", direction, h2, 'status_code="200"', 'grpc_status=""') == 3
        assert (
            total(lines, "response_total", direction, h2, 'status_code="500"', 'classification="failure"')
            == 1
        )
        assert total(lines, "request_total", direction, peer, grpc) == 28
        ok, unavailable, not_found = (
            total(lines, "response_total", direction, grpc, f'grpc_status="{c}"', f'classification="{klass}"')
            for c, klass in ((0, "success"), (14, "failure"), (5, "success"))
        )
        assert (ok, unavailable, not_found) == (20, 5, 3), (host_ip, lines)
        assert total(lines, "response_latency_ms_count", direction, grpc, 'status_code="200"') == 28

    # A connection that ends before it says anything is an opaque one: authorized once, as a
    # connection (the HTTP/2 connections above were counted per request instead).
    silent = "import socket; socket.create_connection(('198.18.3.2', 8081)).close()"
    mesh.a.run(sys.executable, "-c", silent)
    tcp_authz = ("inbound_tcp_authz_allow_total", 'target_port="8081"', f'client_id="{WEB}"')
    wait_for(lambda: total(exposition("198.18.2.2"), *tcp_authz) == 1, "the silent connection counted", b)

    # A connection to a port where the app is not listening: authorized, then refused by the
    # host; it still counts once (the client sees the connection end).
    mesh.a.run("curl", "-s", "--max-time", "5", "http://198.18.3.2:8099/", check=False)
    down = ("inbound_tcp_authz_allow_total", 'target_port="8099"', f'client_id="{WEB}"')
    wait_for(lambda: total(exposition("198.18.2.2"), *down) == 1, "the refused connection counted", b)
