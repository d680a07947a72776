"""The proxy through a running gateway, against real upstream servers on loopback."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
from aiohttp import web

from tests.conftest import (
    REPO,
    Server,
    StartGateway,
    echo_app,
    gateway_config,
    get,
    header_values,
    raw_request,
    start_server,
)

HOST = {"Host": "gw.test"}


def public(upstream: str, path: str = "/", **extra: Any) -> dict[str, Any]:
    route_id = path.strip("/").replace("/", "-") or "root"
    return {"id": route_id, "path": path, "upstream": upstream, "public": True, **extra}


async def fetch(
    server: Server, path: str, **kwargs: Any
) -> tuple[int, dict[str, Any] | bytes, aiohttp.ClientResponse]:
    headers = {**HOST, **kwargs.pop("headers", {})}
    async with aiohttp.ClientSession() as client:
        url = server.url + path
        async with client.request(
            kwargs.pop("method", "GET"), url, headers=headers, **kwargs
        ) as resp:
            body = await resp.read()
            is_json = resp.content_type == "application/json"
            return resp.status, orjson.loads(body) if is_json else body, resp


async def test_forwards_to_the_upstream_with_request_id(
    start_gateway: StartGateway, echo_upstream: Server
) -> None:
    gw = await start_gateway(gateway_config([public(echo_upstream.url)]))
    status, seen, resp = await fetch(gw, "/hello?x=1")
    assert status == 200
    assert isinstance(seen, dict)
    assert seen["raw_path"] == "/hello?x=1"
    assert header_values(seen, "X-Request-Id") == [resp.headers["X-Request-Id"]]
    status, seen, resp = await fetch(gw, "/", headers={"X-Request-Id": "client-chosen-id-1"})
    assert resp.headers["X-Request-Id"] == "client-chosen-id-1"
    status, seen, resp = await fetch(gw, "/", headers={"X-Request-Id": "bad id\twith tab"})
    assert resp.headers["X-Request-Id"] != "bad id\twith tab"


@pytest.mark.parametrize(
    ("sent", "upstream_sees"),
    [
        ("/a%3Fb", "/a%3Fb"),
        ("/a%23b", "/a%23b"),
        ("/a%20b", "/a%20b"),
        ("/%7Euser", "/~user"),
        ("/a/./b/../c//d", "/a/c/d"),
        ("/x%2cy?q=%2F..%2F", "/x%2Cy?q=%2F..%2F"),
    ],
)
async def test_upstream_sees_exactly_the_canonical_path(
    start_gateway: StartGateway, echo_upstream: Server, sent: str, upstream_sees: str
) -> None:
    gw = await start_gateway(gateway_config([public(echo_upstream.url)]))
    status, _, body = await raw_request(gw.port, get(sent))
    assert status == 200
    assert orjson.loads(body)["raw_path"] == upstream_sees


@pytest.mark.parametrize(
    "target",
    [
        "/a/%2e%2e/b",
        "/a/..%2fb",
        "/a%2fb",
        "/a%5cb",
        "/a%00b",
        "/a/%c0%ae%c0%ae/b",
        "/a/b;x=1",
        "/../x",
        "/a#b",
    ],
)
async def test_ambiguous_paths_get_400_and_never_reach_the_upstream(
    start_gateway: StartGateway, target: str
) -> None:
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.raw_path)
        return web.Response(text="reached")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    upstream = await start_server(app)
    gw = await start_gateway(gateway_config([public(upstream.url)]))
    status, headers, body = await raw_request(gw.port, get(target))
    assert status == 400
    assert orjson.loads(body)["reason"] == "bad-path"
    assert orjson.loads(body)["request_id"] == headers["x-request-id"]
    assert hits == []
    await upstream.runner.cleanup()


async def test_unknown_host_and_absolute_form_get_421(
    start_gateway: StartGateway, echo_upstream: Server
) -> None:
    gw = await start_gateway(gateway_config([public(echo_upstream.url)]))
    status, _, body = await raw_request(gw.port, get("/", host="evil.example"))
    assert status == 421
    assert orjson.loads(body)["reason"] == "bad-host"
    status, _, _ = await raw_request(gw.port, get("http://gw.test/"))
    assert status == 421
    status, _, _ = await raw_request(gw.port, get("/", host="GW.TEST.:8443"))
    assert status == 200
    two_hosts = (
        b"GET / HTTP/1.1\r\nHost: gw.test\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    status, _, _ = await raw_request(gw.port, two_hosts)
    assert status == 400


async def test_no_route_is_404_and_unknown_gateway_endpoint_is_not_proxied(
    start_gateway: StartGateway, echo_upstream: Server
) -> None:
    gw = await start_gateway(gateway_config([public(echo_upstream.url, "/app")]))
    status, body, _ = await fetch(gw, "/other")
    assert (status, body["reason"]) == (404, "no-route")  # type: ignore[index]
    gw2 = await start_gateway(gateway_config([public(echo_upstream.url)]))
    status, body, _ = await fetch(gw2, "/.gateway/nothing")
    assert (status, body["reason"]) == (404, "no-endpoint")  # type: ignore[index]


async def test_error_pages_are_html_for_browsers(
    start_gateway: StartGateway, echo_upstream: Server
) -> None:
    gw = await start_gateway(gateway_config([public(echo_upstream.url, "/app")]))
    status, body, resp = await fetch(gw, "/nope", headers={"Accept": "text/html"})
    assert status == 404
    assert isinstance(body, bytes)
    assert resp.headers["X-Request-Id"].encode() in body
    assert b"no-route" in body
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_healthz_and_readyz_on_every_served_host(
    start_gateway: StartGateway, echo_upstream: Server
) -> None:
    gw = await start_gateway(gateway_config([public(echo_upstream.url, "/", host="app.test")]))
    for host in ("gw.test", "app.test"):
        status, body, _ = await fetch(gw, "/.gateway/healthz", headers={"Host": host})
        assert (status, body) == (200, {"status": "ok"})
        status, body, _ = await fetch(gw, "/.gateway/readyz", headers={"Host": host})
        assert status == 200 and body["status"] == "ready"  # type: ignore[index]


async def test_hop_by_hop_headers_are_dropped_both_ways(start_gateway: StartGateway) -> None:
    async def handler(request: web.Request) -> web.Response:
        seen = [[k, v] for k, v in request.headers.items()]
        resp = web.Response(body=orjson.dumps(seen), content_type="application/json")
        resp.headers["Connection"] = "X-Upstream-Private"
        resp.headers["X-Upstream-Private"] = "secret"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["X-Kept"] = "yes"
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    upstream = await start_server(app)
    gw = await start_gateway(gateway_config([public(upstream.url)]))
    request = (
        b"GET /x HTTP/1.1\r\nHost: gw.test\r\n"
        b"Connection: keep-alive, X-Client-Private, X-Forwarded-For, X-Request-Id\r\n"
        b"X-Client-Private: p\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\n"
        b"Upgrade: h2c\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\n"
        b"X-Kept: yes\r\n\r\n"
    )
    status, headers, body = await raw_request(gw.port, request)
    assert status == 200
    seen = {k.lower() for k, _ in orjson.loads(body)}
    for gone in (
        "x-client-private",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
    ):
        assert gone not in seen
    assert "x-kept" in seen
    # a client naming the gateway's own headers in Connection cannot remove them
    assert {"x-forwarded-for", "x-request-id"} <= seen
    assert "x-upstream-private" not in headers and "keep-alive" not in headers
    assert headers["x-kept"] == "yes"
    await upstream.runner.cleanup()


async def test_x_forwarded_headers_from_an_untrusted_peer_are_replaced(
    start_gateway: StartGateway, echo_upstream: Server
) -> None:
    gw = await start_gateway(gateway_config([public(echo_upstream.url)]))
    spoofed = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n"
    spoofed += "X_Forwarded_For: 7.7.7.7\r\nForwarded: for=8.8.8.8\r\nX-Real-IP: 9.9.9.9\r\n"
    _, _, body = await raw_request(gw.port, get("/", extra=spoofed))
    seen = orjson.loads(body)
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    assert header_values(seen, "X-Forwarded-Host") == ["gw.test"]
    for forged in ("X_Forwarded_For", "Forwarded", "X-Real-IP"):
        assert header_values(seen, forged) == []


async def test_x_forwarded_for_from_a_trusted_proxy_is_extended(
    start_gateway: StartGateway, echo_upstream: Server
) -> None:
    config = gateway_config(
        [public(echo_upstream.url)], server={"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]}
    )
    gw = await start_gateway(config)
    extra = "X-Forwarded-For: 6.6.6.6, 203.0.113.9, 10.1.1.1\r\nX-Forwarded-Proto: https\r\n"
    _, _, body = await raw_request(gw.port, get("/", extra=extra))
    seen = orjson.loads(body)
    assert header_values(seen, "X-Forwarded-For") == ["6.6.6.6, 203.0.113.9, 10.1.1.1, 127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["https"]


async def test_upstream_refused_is_502_and_timeout_is_504(start_gateway: StartGateway) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/{tail:.*}", hang)
    slow = await start_server(app)
    closed = await start_server(web.Application())
    closed_url = closed.url
    await closed.runner.cleanup()  # nothing listens there any more
    gw = await start_gateway(
        gateway_config(
            [
                public(closed_url, "/down"),
                public(slow.url, "/slow", timeout="300ms"),
            ]
        )
    )
    status, body, _ = await fetch(gw, "/down/x")
    assert (status, body["reason"]) == (502, "upstream-unreachable")  # type: ignore[index]
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body, _ = await fetch(gw, "/slow/x")
    assert (status, body["reason"]) == (504, "upstream-timeout")  # type: ignore[index]
    assert loop.time() - started < 5
    never.set()
    await slow.runner.cleanup()


async def test_a_websocket_upstream_that_never_answers_the_handshake_is_504(
    start_gateway: StartGateway,
) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/{tail:.*}", hang)
    slow = await start_server(app)
    gw = await start_gateway(
        gateway_config([public(slow.url, "/ws", websocket=True, timeout="300ms")])
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(gw.url + "/ws/x", headers=HOST)
    assert refused.value.status == 504
    assert loop.time() - started < 5
    never.set()
    await slow.runner.cleanup()


async def test_strip_prefix(start_gateway: StartGateway, echo_upstream: Server) -> None:
    gw = await start_gateway(gateway_config([public(echo_upstream.url, "/app", strip_prefix=True)]))
    for sent, expected in (("/app/x/y?z=1", "/x/y?z=1"), ("/app", "/"), ("/app/", "/")):
        _, seen, _ = await fetch(gw, sent)
        assert seen["raw_path"] == expected  # type: ignore[index]


async def test_two_users_never_share_upstream_cookies(start_gateway: StartGateway) -> None:
    async def handler(request: web.Request) -> web.Response:
        user = request.query["user"]
        resp = web.json_response({"cookie": request.headers.get("Cookie")})
        resp.set_cookie(f"session_{user}", f"secret-of-{user}")
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    upstream = await start_server(app)
    # A hostname upstream: the case where a shared cookie jar would store and replay cookies.
    gw = await start_gateway(gateway_config([public(f"http://localhost:{upstream.port}")]))
    _, _, resp = await fetch(gw, "/?user=alice")
    assert resp.headers["Set-Cookie"].startswith("session_alice=secret-of-alice")
    _, second, _ = await fetch(gw, "/?user=bob")
    assert second == {"cookie": None}
    _, third, _ = await fetch(gw, "/?user=bob", headers={"Cookie": "mine=1"})
    assert third == {"cookie": "mine=1"}
    await upstream.runner.cleanup()


async def test_websocket_echo_through_the_gateway(start_gateway: StartGateway) -> None:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=["chat"])
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "close":
                    await ws.close(code=4001, message=b"bye")
                else:
                    await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    upstream = await start_server(app)
    gw = await start_gateway(
        gateway_config(
            [
                public(upstream.url, "/ws", websocket=True),
                public(upstream.url, "/nows"),
            ]
        )
    )
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(gw.url + "/ws", headers=HOST, protocols=["chat"]) as ws:
            assert ws.protocol == "chat"
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "echo:hello"
            await ws.send_bytes(b"\x00\x01\x02")
            assert (await ws.receive(timeout=5)).data == b"\x02\x01\x00"
            await ws.send_str("close")
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE
            assert (closing.data, closing.extra) == (4001, "bye")
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await client.ws_connect(gw.url + "/nows", headers=HOST)
        assert err.value.status == 400
    await upstream.runner.cleanup()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_https_upstream_verified_with_the_configured_ca(
    start_gateway: StartGateway, tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    cert = ca.issue_cert("upstream.internal", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    upstream = await start_server(echo_app(), ssl_context=server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    url = f"https://127.0.0.1:{upstream.port}"
    gw = await start_gateway(
        gateway_config(
            [
                public(url, "/trusted", upstream_tls={"ca_file": str(ca_file)}),
                public(
                    url,
                    "/named",
                    upstream_tls={"ca_file": str(ca_file), "server_name": "upstream.internal"},
                ),
                public(url, "/untrusted"),
            ]
        )
    )
    status, seen, _ = await fetch(gw, "/trusted/x")
    assert status == 200 and seen["raw_path"] == "/trusted/x"  # type: ignore[index]
    status, _, _ = await fetch(gw, "/named/x")
    assert status == 200
    with caplog.at_level(logging.WARNING, logger="gateway.proxy"):
        status, body, _ = await fetch(gw, "/untrusted/x")
    assert (status, body["reason"]) == (502, "upstream-tls")  # type: ignore[index]
    assert any("certificate verify failed" in r.getMessage() for r in caplog.records)
    await upstream.runner.cleanup()


async def test_example_public_only_config_is_runnable(
    tmp_path: Path, echo_upstream: Server
) -> None:
    """config/public-only.yaml as shipped, with only its two ports moved to free ones."""
    from tests.conftest import GatewayProcess

    text = (REPO / "config/public-only.yaml").read_text()
    assert "listen: 127.0.0.1:8080" in text and "127.0.0.1:3000" in text
    text = text.replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:0").replace(
        "127.0.0.1:3000", f"127.0.0.1:{echo_upstream.port}"
    )
    path = tmp_path / "public-only.yaml"
    path.write_text(text)
    proc = await asyncio.to_thread(GatewayProcess, path)
    try:
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{proc.port}/hello"
            async with client.get(url, headers={"Host": "127.0.0.1"}) as resp:
                assert resp.status == 200
                assert (await resp.json())["raw_path"] == "/hello"
    finally:
        assert await asyncio.to_thread(proc.stop) == 0


async def test_a_body_broken_off_upstream_is_never_presented_as_complete(
    start_gateway: StartGateway,
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if request.query.get("mode") == "length":
            resp.content_length = 1_000_000
        await resp.prepare(request)
        await resp.write(b"partial" * 1000)
        assert request.transport is not None
        request.transport.close()  # the upstream dies mid-body
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", broken)
    upstream = await start_server(app)
    gw = await start_gateway(gateway_config([public(upstream.url)]))
    async with aiohttp.ClientSession() as client:
        for mode in ("length", "chunked"):
            async with client.get(f"{gw.url}/x?mode={mode}", headers=HOST) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
    await upstream.runner.cleanup()
