"""The routed HTTP/1 path on loopback: app connection → Proxy (outbound listener, routed
destination) → RoutedDetect → H1Router → dispatch → small HTTP/1 servers. Framing (HEAD, 204,
chunked, close-delimited, pipelined, keep-alive reuse), synthesized errors, timeouts, retries."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.proxy.routes import BudgetSpec, RetryPolicy, RouteTable, Timeouts
from tests.proxy.test_h1_router_world import Client, World, policy, run
from tests.support import metric_sum

RETRY_5XX = RetryPolicy(
    limit=2, http=((500, 599),), grpc=frozenset(), backoff_min_s=0.001, backoff_max_s=0.002
)


def test_framing_head_204_chunked_close_delimited_and_keep_alive_reuse(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a")
        await world.proxy(RouteTable([policy(a.backend())]))
        client = await Client.open(world.port)
        who = await client.request("GET", "/who")
        assert (who.status, who.body, who.headers["x-server"]) == (200, b"a", "a")
        head = await client.request("HEAD", "/who")  # the head alone, though content-length: 1
        assert head.status == 200 and head.headers["content-length"] == "1" and head.body == b""
        nobody = await client.request("GET", "/nobody")
        assert nobody.status == 204
        chunked = await client.request("GET", "/chunked")
        assert chunked.body == b"hello world" and chunked.headers["transfer-encoding"] == "chunked"
        again = await client.request("GET", "/who")  # the same app connection, still in sync
        assert again.body == b"a"
        # Every request of the keep-alive app connection went over one pooled upstream.
        assert a.connections == 1
        close = await client.request("GET", "/close")  # close-delimited: the app's connection ends
        assert close.body == b"until the end" and close.headers.get("connection") == "close"
        assert await client.closed()
        client.close()
        # A new app connection reuses the pooled upstream (the /close one was not returned).
        second = await Client.open(world.port)
        assert (await second.request("GET", "/who")).body == b"a"
        assert a.connections == 2
        second.close()

    run(tmp_path, body)


def test_pipelined_requests_answer_in_order(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a")
        await world.proxy(RouteTable([policy(a.backend())]))
        client = await Client.open(world.port)
        client.send(
            b"GET /who HTTP/1.1\r\nhost: w\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nhost: w\r\ncontent-length: 5\r\n\r\nhello"
            b"GET /status/201 HTTP/1.1\r\nhost: w\r\n\r\n"
        )
        first, second, third = (await client.response(), await client.response(), await client.response())
        assert (first.body, second.body, third.status) == (b"a", b"hello", 201)
        assert a.methods == [b"GET", b"POST", b"GET"]
        client.close()

    run(tmp_path, body)


def test_bodies_stream_both_ways(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a")
        await world.proxy(RouteTable([policy(a.backend())]))
        client = await Client.open(world.port)
        big = await client.request("GET", "/big/3000000")
        assert big.body == bytes(i % 251 for i in range(3_000_000))
        sent = bytes(range(256)) * 4096  # 1 MiB up, echoed back
        echoed = await client.request("POST", "/echo", sent)
        assert echoed.body == sent
        chunked = b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
        client.send(b"PUT /echo HTTP/1.1\r\nhost: w\r\ntransfer-encoding: chunked\r\n\r\n" + chunked)
        assert (await client.response()).body == b"helloabc"
        client.close()

    run(tmp_path, body)


def test_no_endpoint_is_503_no_route_404_with_the_proxy_error_headers(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a")
        gone = a.backend()
        await world.proxy(RouteTable([policy(gone.__class__(gone.ref, 1, None, ()))]))
        client = await Client.open(world.port)
        resp = await client.request("GET", "/who")
        assert resp.status == 503 and resp.body == b""
        assert resp.headers["content-length"] == "0"
        assert resp.headers["l5d-proxy-error"] == resp.headers["meshagent-proxy-error"]
        assert "fail-fast" in resp.headers["l5d-proxy-error"]
        # The connection stays usable after a synthesized answer.
        assert (await client.request("GET", "/who")).status == 503
        client.close()
        assert a.requests["/who"] == 0

    run(tmp_path, body)


def test_hanging_upstream_times_out_with_504(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a")
        await world.proxy(RouteTable([policy(a.backend(), timeouts=Timeouts(request_s=0.3))]))
        client = await Client.open(world.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        resp = await client.request("GET", "/hang")
        took = loop.time() - started
        assert resp.status == 504 and "timed out" in resp.headers["l5d-proxy-error"]
        assert took >= 0.27  # not early; the 504 "timed out" (not a hang) proves the timer fired
        assert (await client.request("GET", "/who")).body == b"a"  # and the connection goes on
        client.close()

    run(tmp_path, body)


def test_get_is_retried_on_503_a_post_is_not(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a", fail_first=1)
        proxy = await world.proxy(RouteTable([policy(a.backend(), retry=RETRY_5XX)]))
        client = await Client.open(world.port)
        got = await client.request("GET", "/who")
        assert got.status == 200 and got.body == b"a"
        assert a.requests["/who"] == 2  # the 503, then the retry
        a.fail_first = 1
        posted = await client.request("POST", "/echo", b"x")
        assert posted.status == 503  # never retried: the app sees the failure
        assert a.requests["/echo"] == 1
        client.close()
        assert proxy.metrics is not None
        text = "\n".join(proxy.metrics.render(proxy.live_legs()))
        assert metric_sum(text, "outbound_http_route_retry_requests_total") == 1
        # The per-request families count routed requests too (target_addr the parent's).
        assert (
            metric_sum(text, "request_total", 'direction="outbound"', 'target_addr="198.18.0.10:8080"') == 2
        )

    run(tmp_path, body)


def test_oversized_head_is_431_and_content_length_with_chunked_is_400(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a")
        await world.proxy(RouteTable([policy(a.backend())]))
        client = await Client.open(world.port)
        client.send(b"GET /who HTTP/1.1\r\nhost: w\r\nx-big: " + b"x" * 70000 + b"\r\n\r\n")
        resp = await client.response()
        assert resp.status == 431 and resp.headers["connection"] == "close"
        assert await client.closed()
        client.close()
        client = await Client.open(world.port)
        client.send(
            b"POST /echo HTTP/1.1\r\nhost: w\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        resp = await client.response()
        assert resp.status == 400 and resp.headers["connection"] == "close"
        client.close()
        assert a.requests["/echo"] == 0 and a.requests["/who"] == 0

    run(tmp_path, body)


def test_a_new_table_reaches_a_kept_alive_connection_at_its_next_request(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a, b = await world.server("a"), await world.server("b")
        proxy = await world.proxy(RouteTable([policy(a.backend(1), b.backend(0))]))
        router = proxy.router
        client = await Client.open(world.port)
        assert [(await client.request("GET", "/who")).body for _ in range(3)] == [b"a"] * 3
        proxy.apply_routes(RouteTable([policy(a.backend(0), b.backend(1))]))
        assert proxy.router is router  # one context: its state kept
        assert [(await client.request("GET", "/who")).body for _ in range(3)] == [b"b"] * 3
        assert router is not None and router.connections == 1
        client.close()

    run(tmp_path, body)


def test_a_removed_policy_answers_a_kept_alive_connection_once_more_then_closes_it(tmp_path: Path) -> None:
    """The route object removed: the request in hand is answered as before, with `connection:
    close`, so the app's next connection to the destination takes the L4 path."""

    async def body(world: World) -> None:
        a = await world.server("a")
        proxy = await world.proxy(RouteTable([policy(a.backend())]))
        client = await Client.open(world.port)
        first = await client.request("GET", "/who")
        assert first.body == b"a" and "connection" not in first.headers
        proxy.apply_routes(RouteTable())
        last = await client.request("GET", "/who")
        assert (last.status, last.body, last.headers.get("connection")) == (200, b"a", "close")
        assert await client.closed()
        assert a.requests["/who"] == 2
        client.close()

    run(tmp_path, body)


def test_head_and_304_with_chunked_heads_keep_the_app_connection_in_sync(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a")
        await world.proxy(RouteTable([policy(a.backend())]))
        client = await Client.open(world.port)
        head = await client.request("HEAD", "/chunked")
        assert head.status == 200 and head.headers["transfer-encoding"] == "chunked"
        assert (await client.request("GET", "/not-modified")).status == 304
        # No stray chunk terminator after the bodyless answers: the next response parses.
        assert (await client.request("GET", "/who")).body == b"a"
        client.close()

    run(tmp_path, body)


def test_the_retry_buffer_is_released_whatever_ends_a_request(tmp_path: Path) -> None:
    from agent.proxy.h1_router import worker_state
    from agent.proxy.routes import MATCH_ALL, Match, ParentPolicy, PathMatch, Rule
    from tests.proxy.test_h1_router_world import PARENT, PARENT_IP, ROUTE

    async def body(world: World) -> None:
        a = await world.server("a")
        rule = Rule(ROUTE, (a.backend(),), Timeouts(), RETRY_5XX)
        only_echo = Match(PathMatch("PathPrefix", "/echo"), None, (), ())
        assert MATCH_ALL is not only_echo
        pol = ParentPolicy(PARENT, BudgetSpec(), ("t",), (rule,), ((only_echo, rule),), (PARENT_IP,))
        proxy = await world.proxy(RouteTable([pol]))
        worker = worker_state(proxy)
        client = await Client.open(world.port)
        assert (await client.request("PUT", "/echo", b"12345")).body == b"12345"
        assert worker.retry_held == 0
        missing = await client.request("GET", "/nomatch")  # bodyless: the connection goes on
        assert missing.status == 404 and "connection" not in missing.headers
        assert (await client.request("PUT", "/nomatch", b"12345")).status == 404  # with a body: closed
        assert await client.closed()
        client.close()
        # Pipelined requests still waiting when the app goes away.
        client = await Client.open(world.port)
        client.send(
            b"GET /echo/hang HTTP/1.1\r\nhost: w\r\n\r\n"
            b"PUT /echo HTTP/1.1\r\nhost: w\r\ncontent-length: 3\r\n\r\nabc"
        )
        for _ in range(200):
            if a.requests["/echo/hang"] and worker.retry_held == 3:
                break
            await asyncio.sleep(0.01)
        assert worker.retry_held == 3  # the waiting PUT's body, kept for a retry
        client.close()
        for _ in range(200):
            if worker.retry_held == 0:
                break
            await asyncio.sleep(0.01)
        assert worker.retry_held == 0

    run(tmp_path, body)


def test_an_upstream_that_closes_after_n_requests_costs_no_request(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a", max_requests=3)  # nginx's keepalive_requests: then close
        await world.proxy(RouteTable([policy(a.backend())]))
        clients = [await Client.open(world.port) for _ in range(4)]
        for _ in range(5):
            answers = await asyncio.gather(*(c.request("GET", "/who") for c in clients))
            assert [r.status for r in answers] == [200] * 4
        assert a.requests["/who"] == 20 and a.connections >= 7
        for c in clients:
            c.close()

    run(tmp_path, body)


def test_a_stalled_response_body_is_cut_by_the_idle_timeout(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a")
        await world.proxy(RouteTable([policy(a.backend(), timeouts=Timeouts(idle_s=0.3))]))
        client = await Client.open(world.port)
        client.send(b"GET /stall HTTP/1.1\r\nhost: w\r\n\r\n")
        loop = asyncio.get_running_loop()
        started = loop.time()
        head = await client.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and await client.reader.readexactly(3) == b"abc"
        assert await client.closed()  # cut: the app sees a short body, never a silent hang
        assert loop.time() - started >= 0.27  # not early (/stall holds forever: the cut is ours)
        family = "outbound_http_route_request_statuses_total"
        assert metric_sum(_route_errors(world), family, 'error="IDLE_TIMEOUT"') == 1
        client.close()

    run(tmp_path, body)


def test_an_answer_before_the_request_body_ended_says_connection_close(tmp_path: Path) -> None:
    from agent.proxy.routes import Backend, EndpointRef, Ref

    async def body(world: World) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")  # as nginx's `return 500;`: the body unread
            writer.write(b"HTTP/1.1 500 Oops\r\ncontent-length: 5\r\nconnection: close\r\n\r\nerror")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ref = Ref("", "Service", "shop", "x", 8080)
        await world.proxy(
            RouteTable([policy(Backend(ref, 1, None, (EndpointRef("127.0.0.1", port, None, None),)))])
        )
        client = await Client.open(world.port)
        client.send(b"POST /post HTTP/1.1\r\nhost: w\r\ncontent-length: 16\r\n\r\n")  # the body later
        resp = await client.response()
        assert resp.status == 500 and resp.body == b"error"
        # The proxy will not read the rest of this request: the app is told not to reuse it.
        assert resp.headers["connection"] == "close"
        client.send(b"0123456789abcdef")
        assert await client.closed()
        client.close()
        server.close()

    run(tmp_path, body)


def _route_errors(world: World) -> str:
    proxy = world.a
    assert proxy is not None and proxy.metrics is not None
    return "\n".join(proxy.metrics.render(proxy.live_legs()))


def test_an_upload_that_keeps_moving_is_not_idle_before_the_head(tmp_path: Path) -> None:
    """Idle is "no byte either way": a body arriving 0.1 s apart for 1.5 s, under a 1 s idle,
    is answered (the server answers once it has the body whole)."""

    async def body(world: World) -> None:
        a = await world.server("a")
        await world.proxy(RouteTable([policy(a.backend(), timeouts=Timeouts(idle_s=1.0))]))
        client = await Client.open(world.port)
        client.send(b"PUT /echo HTTP/1.1\r\nhost: web\r\ncontent-length: 15\r\n\r\n")
        for _ in range(15):
            await asyncio.sleep(0.1)
            client.send(b"x")
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"x" * 15)
        assert "IDLE_TIMEOUT" not in _route_errors(world)
        client.close()

    run(tmp_path, body)


def test_an_upstream_that_never_answers_is_504_at_the_idle_timeout(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a")
        await world.proxy(RouteTable([policy(a.backend(), timeouts=Timeouts(idle_s=0.3))]))
        client = await Client.open(world.port)
        resp = await client.request("GET", "/hang")
        assert resp.status == 504 and resp.headers["l5d-proxy-error"].startswith("idle timeout")
        assert resp.headers["meshagent-proxy-error"] == resp.headers["l5d-proxy-error"]
        text = _route_errors(world)
        family = "outbound_http_route_request_statuses_total"
        assert metric_sum(text, family, 'error="IDLE_TIMEOUT"') == 1
        assert (await client.request("GET", "/who")).body == b"a"  # the connection goes on
        client.close()

    run(tmp_path, body)


def test_the_response_timeout_is_504_before_the_head_and_a_cut_after_it(tmp_path: Path) -> None:
    async def body(world: World) -> None:
        a = await world.server("a")
        await world.proxy(RouteTable([policy(a.backend(), timeouts=Timeouts(response_s=0.3))]))
        client = await Client.open(world.port)
        resp = await client.request("GET", "/hang")  # no head: the proxy answers
        assert resp.status == 504 and resp.headers["l5d-proxy-error"].startswith("response timed out")
        family = "outbound_http_route_request_statuses_total"
        assert metric_sum(_route_errors(world), family, 'error="RESPONSE_STREAM_TIMEOUT"') == 1
        client.send(b"GET /stall HTTP/1.1\r\nhost: w\r\n\r\n")  # a head, 3 bytes of 100, then nothing
        head = await client.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and await client.reader.readexactly(3) == b"abc"
        assert await client.closed()  # cut: a short body, never a silent hang
        assert metric_sum(_route_errors(world), family, 'error="RESPONSE_STREAM_TIMEOUT"') == 2
        client.close()

    run(tmp_path, body)
