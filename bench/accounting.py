"""Microbenchmark: CPU per exchange of each request accounting, on recorded conversations.

    python -m bench.accounting [--requests N]

HTTP/1 (compiled and Python) on keep-alive GET/200 exchanges, and HTTP/2 on unary gRPC calls
(request HEADERS + DATA; response HEADERS, DATA, trailers, as a gRPC server sends them; the
bytes made by the `h2` library, so HPACK's dynamic table is used as real peers use it). Each
accounting is fed the same reads in a hot loop and reports into the real `HttpMetrics`: a floor
for what one proxy pays per request, not the in-place cost (see the data plane benchmark's
metrics-cost pass for that).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from agent.proxy import http1
from agent.proxy.http2 import Http2Accounting
from agent.telemetry.proxy_metrics import ProxyMetrics

Reads = list[tuple[str, bytes]]  # ("client" | "server", bytes), in order


def http1_reads(n: int) -> Reads:
    request = b"GET /api/orders HTTP/1.1\r\nHost: legacy:8080\r\nUser-Agent: wrk\r\n\r\n"
    response = (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n"
    )
    return [read for _ in range(n) for read in (("client", request), ("server", response))]


def grpc_reads(n: int) -> Reads:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    reads: Reads = []

    def pump() -> None:
        while True:
            up, down = client.data_to_send(), server.data_to_send()
            if not up and not down:
                return
            if up:
                reads.append(("client", up))
                server.receive_data(up)
            if down:
                reads.append(("server", down))
                client.receive_data(down)

    pump()
    grpc = [(b"content-type", b"application/grpc")]
    for i in range(n):
        stream = client.get_next_available_stream_id()
        head = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/shop.Orders/Get")]
        client.send_headers(stream, [*head, (b":authority", b"legacy:50051"), (b"te", b"trailers"), *grpc])
        client.send_data(stream, b"\x00\x00\x00\x00\x05hello", end_stream=True)
        pump()
        server.send_headers(stream, [(b":status", b"200"), *grpc])
        server.send_data(stream, b"\x00\x00\x00\x00\x08an order")
        server.send_headers(stream, [(b"grpc-status", b"0"), (b"grpc-message", b"")], end_stream=True)
        pump()
        if i % 1000 == 999:  # keep the flow-control windows open
            client.increment_flow_control_window(1 << 24)
            server.increment_flow_control_window(1 << 24)
            pump()
    return reads


def per_exchange_us(make: Callable[[Any], Any], reads: Reads, n: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        pm = ProxyMetrics()
        acct = make(pm.http('direction="inbound"'))
        feed = {"client": acct.client, "server": acct.server}
        start = time.perf_counter()
        for side, data in reads:
            feed[side](data)
        acct.closed()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
        assert f'request_total{{direction="inbound"}} {n}' in "\n".join(pm.render([])), "exchanges lost"
    return best


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--requests", type=int, default=20000, help="exchanges per conversation")
    args = parser.parse_args()
    n = args.requests
    h1, h2 = http1_reads(n), grpc_reads(n)
    results = {
        "http1_compiled_us": per_exchange_us(lambda sink: http1.new_accounting(sink), h1, n)
        if http1.IMPLEMENTATION == "compiled"
        else None,
        "http1_python_us": per_exchange_us(lambda sink: http1.Http1Accounting(sink.exchange), h1, n),
        "grpc_unary_us": per_exchange_us(lambda sink: Http2Accounting(sink), h2, n),
    }
    for name, value in results.items():
        print(f"{name:20} {'not built' if value is None else f'{value:.2f} us per exchange'}")
    print(json.dumps({k: None if v is None else round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
