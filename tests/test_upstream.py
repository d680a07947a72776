"""The upstream HTTP/1.1 client (gateway/upstream.py), directly and through a running gateway.

Every upstream here is a real server on loopback: aiohttp applications, or raw
`asyncio.start_server` servers that write exactly the bytes a test crafts (the malformed and
hostile answers). A raw upstream counts the TCP connections it accepted and keeps every byte
each one received, which is how pooling, retries and "nothing reached the upstream" are seen.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp import StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict, CIMultiDictProxy

import gateway.upstream
from gateway.upstream import (
    Origin,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tests.conftest import (
    Server,
    StartGateway,
    gateway_config,
    get,
    header_values,
    raw_request,
    start_server,
)

T = TypeVar("T")
HOST = {"Host": "gw.test"}
WAIT = 3.0  # s: the most any awaited event may take before the test fails instead of hanging


# -- a raw upstream: crafted bytes on a real socket ----------------------------------------------


@dataclass
class Seen:
    """One request as the upstream received it."""

    connection: int  # the accepted connection it came on: 1 is the first
    method: str
    target: str
    headers: CIMultiDict[str]
    body: bytes = b""


class Conn:
    """One accepted connection; every byte read from it is kept in `received`."""

    def __init__(
        self, upstream: RawUpstream, number: int, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        self.upstream, self.number, self.reader, self.writer = upstream, number, r, w
        self.received = bytearray()
        # Resolved once a read on this connection met its end: the client closed or reset it.
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    async def until(self, separator: bytes) -> bytes:
        try:
            data = await self.reader.readuntil(separator)
        except asyncio.IncompleteReadError as exc:
            self.received += exc.partial
            self._end()
            raise
        except ConnectionResetError:
            self._end()
            raise
        self.received += data
        return data

    async def exactly(self, size: int) -> bytes:
        try:
            data = await self.reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            self.received += exc.partial
            self._end()
            raise
        except ConnectionResetError:
            self._end()
            raise
        self.received += data
        return data

    async def until_closed(self) -> None:
        """Read (and keep) everything until the client ends the connection."""
        try:
            while data := await self.reader.read(2**16):
                self.received += data
        except ConnectionResetError:
            pass
        self._end()

    async def request(self, with_body: bool = True) -> Seen | None:
        """The next request (recorded as soon as its head is read); None: the client closed."""
        try:
            head = await self.until(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return None
        except ConnectionResetError:
            return None
        line, *fields = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = line.split(" ")
        headers: CIMultiDict[str] = CIMultiDict()
        for text in fields:
            name, _, value = text.partition(":")
            headers.add(name, value.strip())
        seen = Seen(self.number, method, target, headers)
        self.upstream.requests.append(seen)
        if with_body:
            seen.body = await self.body(headers)
        return seen

    async def body(self, headers: CIMultiDict[str]) -> bytes:
        if "Content-Length" in headers:
            return await self.exactly(int(headers["Content-Length"]))
        if headers.get("Transfer-Encoding") == "chunked":
            return await self.chunked()
        return b""

    async def chunked(self, on_chunk: Callable[[bytes], None] | None = None) -> bytes:
        body = b""
        while True:
            size = int((await self.until(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.until(b"\r\n")  # the end of an empty trailer section
                return body
            chunk = await self.exactly(size)
            if await self.exactly(2) != b"\r\n":
                raise AssertionError("a chunk not followed by CRLF")
            body += chunk
            if on_chunk is not None:
                on_chunk(chunk)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)  # one write: what a test puts together arrives together
        await self.writer.drain()


Handler = Callable[[Conn], Awaitable[None]]


class RawUpstream:
    """An upstream whose every connection runs `handler`; the connection closes when it returns."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.connections: list[Conn] = []
        self.requests: list[Seen] = []
        self.stopping = asyncio.Event()  # what "never answers" waits for: the test's end
        self.failures: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Conn(self, len(self.connections) + 1, reader, writer)
        self.connections.append(conn)
        try:
            await self._handler(conn)
        except (asyncio.IncompleteReadError, ConnectionError):
            conn._end()
        except Exception as exc:  # a handler's own mistake: reported when the upstream closes
            self.failures.append(exc)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        self.stopping.set()
        assert self._server is not None
        self._server.close()
        for conn in self.connections:
            conn.writer.close()  # a handler still reading sees the end of its stream
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=WAIT)
        await self._server.wait_closed()
        if self.failures:
            raise self.failures[0]


StartRaw = Callable[[Handler], Awaitable[RawUpstream]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[StartRaw]:
    started: list[RawUpstream] = []

    async def start(handler: Handler) -> RawUpstream:
        upstream = await RawUpstream(handler).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


def serving(answer: Callable[[Seen], bytes]) -> Handler:
    """A well-behaved keep-alive upstream: each request read whole, then answered in one write."""

    async def handle(conn: Conn) -> None:
        while (seen := await conn.request()) is not None:
            await conn.send(answer(seen))

    return handle


def ok(body: bytes | str, *fields: str, status: str = "200 OK") -> bytes:
    data = body.encode() if isinstance(body, str) else body
    extra = "".join(f"{f}\r\n" for f in fields)
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(data)}\r\n{extra}\r\n"
    return head.encode() + data


# -- the client under test, request bodies, the gateway ------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstreams = UpstreamClient()
    yield upstreams
    await upstreams.close()


def origin(url: str, read_timeout: float = WAIT, connect_timeout: float = WAIT) -> Origin:
    return Origin.of(url, None, None, connect_timeout, read_timeout)


class _HandFed(BaseProtocol):
    """The protocol side of a request body this test feeds by hand, as aiohttp's server feeds
    `request.content` from its socket: always connected, no socket to pause."""

    @property
    def connected(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


def fed(*chunks: bytes, eof: bool = True) -> StreamReader:
    """A request body (what `request.content` is to the proxy); more may be fed later."""
    loop = asyncio.get_running_loop()
    body = StreamReader(_HandFed(loop), 2**16, loop=loop)
    for chunk in chunks:
        body.feed_data(chunk)
    if eof:
        body.feed_eof()
    return body


async def exchange(
    client: UpstreamClient,
    to: Origin,
    method: str = "GET",
    target: str = "/",
    headers: dict[str, str] | None = None,
    body: StreamReader | None = None,
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    response = await client.request(to, method, target, CIMultiDict(headers or {}), body)
    try:
        return response.status, response.headers, await response.content.read()
    finally:
        response.release()


async def within(awaitable: Awaitable[T], seconds: float = WAIT) -> T:
    async with asyncio.timeout(seconds):
        return await awaitable


def route(upstream: str, path: str = "/", **extra: Any) -> dict[str, Any]:
    route_id = path.strip("/").replace("/", "-") or "root"
    return {"id": route_id, "path": path, "upstream": upstream, "public": True, **extra}


async def fetch(server: Server, path: str, method: str = "GET", **kwargs: Any) -> tuple[int, bytes]:
    """One request by a user of its own: a client connection of its own."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.url + path, headers=HOST, **kwargs) as response,
    ):
        return response.status, await response.read()


def reason(body: bytes) -> str:
    return str(orjson.loads(body)["reason"])


def digest_app(peers: list[int]) -> web.Application:
    """An aiohttp upstream answering with what it received, its body as length and sha256."""

    async def digest(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        sha, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(2**16):
            sha.update(chunk)
            length += len(chunk)
        seen = {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "length": length,
            "sha256": sha.hexdigest(),
        }
        return web.json_response(seen)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", digest)
    return app


@pytest.fixture
async def digest_upstream() -> AsyncIterator[tuple[Server, list[int]]]:
    peers: list[int] = []
    server = await start_server(digest_app(peers))
    yield server, peers
    await server.runner.cleanup()


# -- 1. keep-alive --------------------------------------------------------------------------------


async def test_twenty_sequential_gets_share_one_connection(
    client: UpstreamClient, digest_upstream: tuple[Server, list[int]]
) -> None:
    server, peers = digest_upstream
    to = origin(server.url)
    for i in range(20):
        status, _, body = await exchange(client, to, target=f"/n/{i}")
        assert status == 200
        assert orjson.loads(body)["raw_path"] == f"/n/{i}"
    assert len(peers) == 20
    assert len(set(peers)) == 1  # one client port: one TCP connection for all twenty


async def test_users_of_the_gateway_share_one_upstream_connection(
    start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(serving(lambda seen: ok(f"page {seen.target}")))
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    for i in range(10):  # ten users, each on a client connection of its own
        status, _, body = await raw_request(gw.port, get(f"/u/{i}"))
        assert (status, body) == (200, f"page /u/{i}".encode())
    assert len(upstream.connections) == 1


# -- 2. request bodies ----------------------------------------------------------------------------


async def test_a_content_length_body_arrives_byte_exact(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(serving(lambda seen: ok("stored")))
    payload = bytes(range(256)) * 64 + b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
    status, _, body = await exchange(
        client,
        origin(upstream.url),
        "POST",
        "/store",
        {"Content-Length": str(len(payload))},
        fed(payload[:1000], payload[1000:]),
    )
    assert (status, body) == (200, b"stored")
    [seen] = upstream.requests
    assert seen.headers.getall("Content-Length") == [str(len(payload))]
    assert "Transfer-Encoding" not in seen.headers
    assert seen.body == payload


async def test_a_body_of_unknown_length_is_sent_chunked(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(serving(lambda seen: ok("stored")))
    pieces = [b"first ", b"0\r\n\r\n", b"x" * 100_000, b" last"]
    status, _, _ = await exchange(client, origin(upstream.url), "PUT", "/s", body=fed(*pieces))
    assert status == 200
    [seen] = upstream.requests
    assert seen.headers.getall("Transfer-Encoding") == ["chunked"]
    assert "Content-Length" not in seen.headers
    assert seen.body == b"".join(pieces)


async def test_a_chunked_upload_through_the_gateway_arrives_whole(
    start_gateway: StartGateway, digest_upstream: tuple[Server, list[int]]
) -> None:
    server, _ = digest_upstream
    gw = await start_gateway(gateway_config([route(server.url)]))
    pieces = [os.urandom(997) for _ in range(100)]

    async def upload() -> AsyncIterator[bytes]:  # no length known: aiohttp sends it chunked
        for piece in pieces:
            yield piece

    status, body = await fetch(gw, "/up", "POST", data=upload())
    assert status == 200
    seen = orjson.loads(body)
    assert header_values(seen, "Transfer-Encoding") == ["chunked"]
    assert header_values(seen, "Content-Length") == []
    assert seen["length"] == 99_700
    assert seen["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


async def test_a_five_mib_upload_keeps_its_sha256(
    start_gateway: StartGateway, digest_upstream: tuple[Server, list[int]]
) -> None:
    server, _ = digest_upstream
    gw = await start_gateway(gateway_config([route(server.url)]))
    payload = os.urandom(5 * 2**20)
    status, body = await fetch(gw, "/big", "POST", data=io.BytesIO(payload))
    assert status == 200
    seen = orjson.loads(body)
    assert header_values(seen, "Content-Length") == [str(5 * 2**20)]
    assert (seen["length"], seen["sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest())


async def test_framing_of_requests_without_a_body(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(serving(lambda seen: ok("")))
    to = origin(upstream.url)
    for method in ("GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH"):
        status, _, _ = await exchange(client, to, method, f"/{method}")
        assert status == 200
    framing = {
        s.method: (
            s.headers.getall("Content-Length", []),
            s.headers.getall("Transfer-Encoding", []),
        )
        for s in upstream.requests
    }
    assert framing == {
        "GET": ([], []),
        "HEAD": ([], []),
        "OPTIONS": ([], []),
        "POST": (["0"], []),
        "PUT": (["0"], []),
        "DELETE": (["0"], []),
        "PATCH": (["0"], []),
    }
    assert len(upstream.connections) == 1


async def test_a_bodyless_post_through_the_gateway_has_content_length_zero(
    start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(serving(lambda seen: ok("done")))
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    request = b"POST /act HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
    status, _, body = await raw_request(gw.port, request)
    assert (status, body) == (200, b"done")
    status, _, _ = await raw_request(gw.port, get("/page"))
    assert status == 200
    post, page = upstream.requests
    assert (post.headers.getall("Content-Length"), post.body) == (["0"], b"")
    assert "Transfer-Encoding" not in post.headers
    assert "Content-Length" not in page.headers and "Transfer-Encoding" not in page.headers


# -- 3. Host and the request target --------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "authority"),
    [
        ("http://app.internal", "app.internal"),
        ("http://app.internal:80/base", "app.internal"),
        ("http://app.internal:8080", "app.internal:8080"),
        ("http://app.internal:443", "app.internal:443"),
        ("https://app.internal:443", "app.internal"),
        ("https://app.internal:8443", "app.internal:8443"),
        ("http://[::1]:8080", "[::1]:8080"),
    ],
)
def test_the_host_header_omits_only_a_default_port(base: str, authority: str) -> None:
    assert Origin.of(base, None, None, 1.0, 1.0).authority == authority


async def test_the_upstream_gets_its_own_authority_as_host(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(serving(lambda seen: ok("")))
    await exchange(client, origin(upstream.url))
    await exchange(client, origin(f"http://localhost:{upstream.port}"))
    by_ip, by_name = upstream.requests
    assert by_ip.headers.getall("Host") == [f"127.0.0.1:{upstream.port}"]
    assert by_name.headers.getall("Host") == [f"localhost:{upstream.port}"]


async def test_base_path_prefix_and_encoded_query_through_the_gateway(
    start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(serving(lambda seen: ok("")))
    gw = await start_gateway(
        gateway_config(
            [
                route(f"{upstream.url}/base/", "/app"),
                route(f"{upstream.url}/base", "/strip", strip_prefix=True),
            ]
        )
    )
    query = "?q=a%2Fb&r=%C3%A9&s=1+2&t=%26x%3Dy"
    for path in ("/app/a%20b" + query, "/strip/x/y" + query):
        status, _, _ = await raw_request(gw.port, get(path))
        assert status == 200
    app, strip = upstream.requests
    assert app.target == "/base/app/a%20b" + query
    assert strip.target == "/base/x/y" + query
    assert app.headers.getall("Host") == [f"127.0.0.1:{upstream.port}"]
    assert app.headers.getall("X-Forwarded-Host") == ["gw.test"]


# -- 4. responses ---------------------------------------------------------------------------------


async def test_a_chunked_response_is_read_whole_and_its_connection_reused(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    async def handle(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await conn.send(b"5;ext=1\r\nhello\r\n")
            await conn.send(b"6\r\n world\r\n")
            await conn.send(b"0\r\nX-Trailer: t\r\n\r\n")

    upstream = await raw_upstream(handle)
    to = origin(upstream.url)
    for _ in range(3):
        status, _, body = await exchange(client, to)
        assert (status, body) == (200, b"hello world")
    assert len(upstream.connections) == 1


async def test_a_response_read_until_eof_is_whole_and_its_connection_not_reused(
    client: UpstreamClient, start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    page = os.urandom(300_000)

    async def handle(conn: Conn) -> None:
        seen = await conn.request()
        if seen is not None:  # neither a length nor chunked: the body ends where the stream does
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            await conn.send(page)

    upstream = await raw_upstream(handle)
    to = origin(upstream.url)
    for i in range(2):
        status, headers, body = await exchange(client, to, target=f"/{i}")
        assert status == 200 and "Content-Length" not in headers
        assert body == page
    assert len(upstream.connections) == 2  # the first could not serve again: a new one
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    status, body = await fetch(gw, "/via-gateway")
    assert (status, body) == (200, page)


async def test_204_and_304_leave_the_connection_usable(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    answers = {
        "/204": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        # A 304 may state the length of the representation it stands for: no body follows.
        "/304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 50\r\n\r\n',
    }
    upstream = await raw_upstream(
        serving(lambda seen: answers.get(seen.target, ok(f"the body of {seen.target}")))
    )
    to = origin(upstream.url)
    got = [await exchange(client, to, target=t) for t in ("/204", "/a", "/304", "/b")]
    assert [(status, body) for status, _, body in got] == [
        (204, b""),
        (200, b"the body of /a"),
        (304, b""),
        (200, b"the body of /b"),
    ]
    assert len(upstream.connections) == 1


async def test_head_with_a_length_but_no_body_does_not_desync_the_pool(
    client: UpstreamClient, start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    def answer(seen: Seen) -> bytes:
        if seen.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"  # the length a GET would get
        return ok(f"GET body of {seen.target}")

    upstream = await raw_upstream(serving(answer))
    to = origin(upstream.url)
    status, headers, body = await exchange(client, to, "HEAD", "/doc")
    assert (status, headers["Content-Length"], body) == (200, "1000", b"")
    status, _, body = await exchange(client, to, "GET", "/doc")
    assert (status, body) == (200, b"GET body of /doc")
    assert len(upstream.connections) == 1
    # A user's keep-alive connection through the gateway stays in step as well.
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    async with aiohttp.ClientSession() as session:
        async with session.head(gw.url + "/doc", headers=HOST) as response:
            assert (response.status, response.headers["Content-Length"]) == (200, "1000")
            assert await response.read() == b""
        async with session.get(gw.url + "/doc", headers=HOST) as response:
            assert (response.status, await response.read()) == (200, b"GET body of /doc")
    assert len(upstream.connections) == 2  # the gateway's own one, reused for the GET


async def test_connection_close_or_http_1_0_is_honoured(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    answers = {
        "/close": ok("last", "Connection: close"),
        "/old": b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold",
    }
    upstream = await raw_upstream(serving(lambda seen: answers.get(seen.target, ok("next"))))
    to = origin(upstream.url)
    for target, body in (("/close", b"last"), ("/next", b"next"), ("/old", b"old")):
        assert (await exchange(client, to, target=target))[2] == body
    for conn in upstream.connections:  # the upstream left both open: the client closed them
        await within(conn.ended)
    assert (await exchange(client, to, target="/next"))[2] == b"next"
    assert [s.connection for s in upstream.requests] == [1, 2, 2, 3]


async def test_a_response_released_half_read_closes_its_connection(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(serving(lambda seen: ok(b"A" * 2**20 + seen.target.encode())))
    to = origin(upstream.url)
    response = await client.request(to, "GET", "/alice", CIMultiDict(), None)
    assert await response.content.readexactly(10) == b"A" * 10
    response.release()  # the caller went away (a client disconnected mid-download)
    await within(upstream.connections[0].ended)
    status, _, body = await exchange(client, to, target="/bob")
    # SECURITY: the rest of alice's body must never be read as the answer to bob's request.
    assert (status, body) == (200, b"A" * 2**20 + b"/bob")
    assert [s.connection for s in upstream.requests] == [1, 2]


# -- 5. interim (1xx) answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.js>\r\n\r\n",
    ],
    ids=["103", "100", "100+103"],
)
async def test_interim_answers_are_skipped_for_the_final_one(
    client: UpstreamClient, start_gateway: StartGateway, raw_upstream: StartRaw, interim: bytes
) -> None:
    async def handle(conn: Conn) -> None:
        while (seen := await conn.request()) is not None:
            await conn.send(interim)
            await conn.send(ok(f"final for {seen.target}", "X-Final: yes"))

    upstream = await raw_upstream(handle)
    to = origin(upstream.url)
    for target in ("/one", "/two"):
        status, headers, body = await exchange(client, to, target=target)
        assert (status, headers.get("X-Final"), body) == (
            200,
            "yes",
            f"final for {target}".encode(),
        )
    assert len(upstream.connections) == 1
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    status, headers, body = await raw_request(gw.port, get("/three"))
    assert (status, headers.get("x-final"), body) == (200, "yes", b"final for /three")


# -- 6. attacks -----------------------------------------------------------------------------------

ALICE = ok("alice's private page")
SMUGGLED = ok("SMUGGLED page", "Set-Cookie: session=attacker")


def smuggling(extra: bytes) -> Handler:
    """The first answer carries `extra` bytes in the same write; every later one is honest."""

    async def handle(conn: Conn) -> None:
        while (seen := await conn.request()) is not None:
            if len(conn.upstream.requests) == 1:
                await conn.send(ALICE + extra)
            else:
                await conn.send(ok(f"fresh page for {seen.target}"))

    return handle


@pytest.mark.parametrize(
    ("extra", "first"),
    [
        (SMUGGLED, ALICE),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nSMUGGLED", ALICE),
        (b"SMUGGLED-not-a-response", None),
        # a stray unfinished head: only the parser knows a response was begun
        (b"HTTP/1.1 200 OK\r\nSet-Cookie: session=attacker\r\n", ALICE),
    ],
    ids=["second-response", "second-head", "garbage", "stray-partial-head"],
)
async def test_bytes_after_a_response_never_reach_the_next_request(
    client: UpstreamClient, raw_upstream: StartRaw, extra: bytes, first: bytes | None
) -> None:
    upstream = await raw_upstream(smuggling(extra))
    to = origin(upstream.url)
    if first is None:  # nothing after the body parses: the answer is not trusted at all
        with pytest.raises(UpstreamError):
            await exchange(client, to, target="/alice")
    else:
        assert (await exchange(client, to, target="/alice"))[2] == b"alice's private page"
    status, headers, body = await exchange(client, to, target="/bob")
    # SECURITY: response smuggling: the upstream sent more than one answer for alice's request.
    # Bob's request must get its own fresh answer, never the extra one queued on that connection.
    assert (status, body) == (200, b"fresh page for /bob")
    assert "Set-Cookie" not in headers
    # SECURITY: ...because the tainted connection was closed, never pooled for another request.
    assert [s.connection for s in upstream.requests] == [1, 2]
    await within(upstream.connections[0].ended)


async def test_a_smuggled_response_never_reaches_another_user_of_the_gateway(
    start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(smuggling(SMUGGLED))
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    status, body = await fetch(gw, "/alice")
    assert (status, body) == (200, b"alice's private page")
    async with (
        aiohttp.ClientSession() as bob,
        bob.get(gw.url + "/bob", headers=HOST) as response,
    ):
        # SECURITY: bob (another user, another client connection) gets his own page, never
        # the page and cookie the upstream smuggled after alice's answer.
        assert (response.status, await response.read()) == (200, b"fresh page for /bob")
        assert "Set-Cookie" not in response.headers
    assert len(upstream.connections) == 2


MALFORMED = {
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "te-and-cl": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "bad-status-line": b"HTTP/1.1 2OO OK\r\nContent-Length: 5\r\n\r\nhello",
    "not-http": b"SMTP 220 ready\r\n\r\n",
    "negative-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
    "nul-in-header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
    # undoing the chunks would leave a gzip body with nothing saying so
    "coded-transfer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
}


def malformed_first(answer: bytes) -> Handler:
    """The first connection answers with `answer` (and watches for its end); later ones are fine."""

    async def handle(conn: Conn) -> None:
        if conn.number == 1:
            await conn.request()
            await conn.send(answer)
            await conn.until_closed()
            return
        await serving(lambda seen: ok(f"fine {seen.target}"))(conn)

    return handle


@pytest.mark.parametrize("kind", MALFORMED)
async def test_a_malformed_response_is_an_upstream_error_and_its_connection_dropped(
    client: UpstreamClient, raw_upstream: StartRaw, kind: str
) -> None:
    upstream = await raw_upstream(malformed_first(MALFORMED[kind]))
    to = origin(upstream.url)
    with pytest.raises(UpstreamError) as caught:
        await exchange(client, to, target="/first")
    assert type(caught.value) is UpstreamError  # not a timeout: refused as soon as it was read
    await within(upstream.connections[0].ended)
    assert (await exchange(client, to, target="/next"))[2] == b"fine /next"


@pytest.mark.parametrize("kind", MALFORMED)
async def test_a_malformed_response_is_a_502_through_the_gateway(
    start_gateway: StartGateway,
    raw_upstream: StartRaw,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    upstream = await raw_upstream(malformed_first(MALFORMED[kind]))
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    with caplog.at_level(logging.WARNING):
        status, _, body = await raw_request(gw.port, get("/first"))
    # SECURITY: an ambiguous answer (CL.TE, two lengths, a broken status line) is never relayed:
    # relaying it would let the upstream desynchronise the user's connection or another hop.
    assert (status, reason(body)) == (502, "upstream-error")
    assert b"hello" not in body
    # A refused answer is an expected event: a warning, never a 500 or a traceback in the log.
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    assert any(r.name == "gateway.proxy" and "failed" in r.getMessage() for r in caplog.records)
    # SECURITY: the connection that carried it is dropped, never used again.
    await within(upstream.connections[0].ended)
    status, _, body = await raw_request(gw.port, get("/next"))
    assert (status, body) == (200, b"fine /next")
    assert [s.connection for s in upstream.requests] == [1, 2]


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        ({"X-A": "a\r\nX-Injected: 1"}, "/"),
        ({"X-A": "a\nX-Injected: 1"}, "/"),
        ({"X-A": "a\rX-Injected: 1"}, "/"),
        ({"X-A\r\nX-Injected": "1"}, "/"),
        ({}, "/ HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /other"),
    ],
    ids=["crlf-value", "lf-value", "cr-value", "crlf-name", "crlf-target"],
)
async def test_cr_or_lf_in_the_request_head_is_refused_before_anything_is_sent(
    client: UpstreamClient, raw_upstream: StartRaw, headers: dict[str, str], target: str
) -> None:
    upstream = await raw_upstream(serving(lambda seen: ok("clean")))
    to = origin(upstream.url)
    with pytest.raises(UpstreamError):
        # SECURITY: header splitting: CR or LF would let a caller inject headers or a request.
        await exchange(client, to, "GET", target, headers)
    # A clean request after it works, on a connection of its own.
    assert (await exchange(client, to, target="/after"))[2] == b"clean"
    assert [s.target for s in upstream.requests] == ["/after"]
    for conn in upstream.connections[:-1]:
        await within(conn.ended)
        # SECURITY: not one byte of the refused request reached the upstream.
        assert conn.received == b""
    assert b"X-Injected" not in upstream.connections[-1].received


def upload_reader() -> tuple[asyncio.Future[bytes], asyncio.Future[str], Handler]:
    """An upstream whose first connection reads an upload to its end, if it has one: (the
    first 10 bytes or chunk, how the read ended: "complete" or the error's name, handler)."""
    loop = asyncio.get_running_loop()
    got_start: asyncio.Future[bytes] = loop.create_future()
    outcome: asyncio.Future[str] = loop.create_future()

    async def handle(conn: Conn) -> None:
        if conn.number > 1:
            await serving(lambda seen: ok("next"))(conn)
            return
        seen = await conn.request(with_body=False)
        assert seen is not None
        try:
            if "Content-Length" in seen.headers:
                got_start.set_result(await conn.exactly(10))
                await conn.exactly(int(seen.headers["Content-Length"]) - 10)
            else:
                await conn.chunked(on_chunk=got_start.set_result)
            outcome.set_result("complete")
            await conn.send(ok("stored"))
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            outcome.set_result(type(exc).__name__)

    return got_start, outcome, handle


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_request_body_cut_short_never_looks_complete_upstream(
    client: UpstreamClient, raw_upstream: StartRaw, framing: str
) -> None:
    got_start, outcome, handle = upload_reader()
    upstream = await raw_upstream(handle)
    to = origin(upstream.url)
    headers = {"Content-Length": "1000"} if framing == "content-length" else {}
    body = fed(b"0123456789", eof=False)
    sending = asyncio.get_running_loop().create_task(
        exchange(client, to, "POST", "/upload", headers, body), name="an upload breaking off"
    )
    assert await within(got_start) == b"0123456789"
    body.set_exception(ConnectionResetError("the client went away"))
    with pytest.raises(UpstreamError):
        await within(sending)
    # SECURITY: a truncated body must never be completed (a final chunk, or a pooled connection
    # whose next request fills the missing bytes): the upstream's read of it fails.
    assert await within(outcome) in ("IncompleteReadError", "ConnectionResetError")
    assert (await exchange(client, to, target="/next"))[2] == b"next"
    assert [s.connection for s in upstream.requests] == [1, 2]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_client_upload_cut_short_through_the_gateway(
    start_gateway: StartGateway, raw_upstream: StartRaw, framing: str
) -> None:
    got_start, outcome, handle = upload_reader()
    upstream = await raw_upstream(handle)
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    head = b"POST /upload HTTP/1.1\r\nHost: gw.test\r\n"
    if framing == "content-length":
        start = head + b"Content-Length: 1000\r\n\r\n0123456789"
    else:
        start = head + b"Transfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(start)
    await writer.drain()
    await within(got_start)
    writer.transport.abort()  # the user's connection breaks off mid-upload
    # SECURITY: the upstream never sees the upload as complete...
    assert await within(outcome) in ("IncompleteReadError", "ConnectionResetError")
    # ...and the connection that carried the partial body is never given to another request.
    status, _, body = await raw_request(gw.port, get("/next"))
    assert (status, body) == (200, b"next")
    assert len(upstream.connections) == 2


# -- 7. a keep-alive connection the upstream closed ----------------------------------------------


def closes_after_one(*, read_the_next: bool) -> Handler:
    """Answers one request per connection and then closes, without saying `Connection: close`.

    read_the_next: first read the next request (the race: it was on its way as the upstream
    closed its idle end), so the client certainly meets a closed connection after sending."""

    async def handle(conn: Conn) -> None:
        seen = await conn.request()
        if seen is None:
            return
        answer = ok(f"answer {conn.number}")
        if seen.method == "HEAD":  # the head a GET would get, and no body
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        await conn.send(answer)
        if read_the_next:
            await conn.request()

    return handle


@pytest.mark.parametrize("read_the_next", [False, True], ids=["closed-idle", "closed-on-send"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
async def test_a_bodyless_idempotent_request_is_retried_on_a_new_connection(
    client: UpstreamClient, raw_upstream: StartRaw, method: str, read_the_next: bool
) -> None:
    upstream = await raw_upstream(closes_after_one(read_the_next=read_the_next))
    to = origin(upstream.url)
    assert (await exchange(client, to, target="/first"))[0] == 200
    status, _, body = await exchange(client, to, method, "/second")
    assert status == 200 and body == (b"" if method == "HEAD" else b"answer 2")
    assert len(upstream.connections) == 2
    if read_the_next:  # the upstream saw it on the dead connection, then once more on a new one
        assert [(s.connection, s.target) for s in upstream.requests[1:]] == [
            (1, "/second"),
            (2, "/second"),
        ]


@pytest.mark.parametrize(
    ("method", "body"),
    [("POST", b"pay once"), ("PUT", b"put once"), ("PATCH", b"patch once"), ("POST", None)],
    ids=["post", "put-with-body", "patch", "post-without-body"],
)
async def test_a_request_with_a_body_or_not_idempotent_is_never_sent_twice(
    client: UpstreamClient, raw_upstream: StartRaw, method: str, body: bytes | None
) -> None:
    upstream = await raw_upstream(closes_after_one(read_the_next=True))
    to = origin(upstream.url)
    assert (await exchange(client, to, target="/first"))[0] == 200
    headers = {} if body is None else {"Content-Length": str(len(body))}
    with pytest.raises(UpstreamError) as caught:
        await exchange(client, to, method, "/once", headers, None if body is None else fed(body))
    assert not isinstance(caught.value, UpstreamTimeout)
    # The upstream may have acted on it: it saw it once, and it is never sent again.
    assert [(s.method, s.body) for s in upstream.requests[1:]] == [(method, body or b"")]
    assert len(upstream.connections) == 1


async def test_a_connection_closed_by_the_upstream_through_the_gateway(
    start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(closes_after_one(read_the_next=True))
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    status, _, body = await raw_request(gw.port, get("/a"))
    assert (status, body) == (200, b"answer 1")
    status, _, body = await raw_request(gw.port, get("/b"))  # retried on a second connection
    assert (status, body) == (200, b"answer 2")
    order = (
        b"POST /pay HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 4\r\nConnection: close\r\n\r\n10EU"
    )
    status, _, body = await raw_request(gw.port, order)
    assert (status, reason(body)) == (502, "upstream-error")
    assert [(s.method, s.target) for s in upstream.requests].count(("POST", "/pay")) == 1
    assert len(upstream.connections) == 2


# -- 8. timeouts and unreachable upstreams -------------------------------------------------------


def never_answers() -> Handler:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.until_closed()  # reads on, so that the client closing it is seen

    return handle


async def test_an_upstream_that_never_answers_times_out(
    client: UpstreamClient, start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(never_answers())
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout) as caught:
        await within(exchange(client, origin(upstream.url, read_timeout=0.3)))
    elapsed = loop.time() - started
    assert isinstance(caught.value, TimeoutError)
    assert 0.25 <= elapsed < 1.5
    await within(upstream.connections[0].ended)  # given up on: closed, not pooled
    gw = await start_gateway(gateway_config([route(upstream.url, timeout="300ms")]))
    started = loop.time()
    status, _, body = await raw_request(gw.port, get("/slow"))
    assert (status, reason(body)) == (504, "upstream-timeout")
    assert 0.25 <= loop.time() - started < 1.5


async def test_a_response_body_that_stalls_times_out(
    client: UpstreamClient, start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await conn.until_closed()

    upstream = await raw_upstream(handle)
    response = await client.request(
        origin(upstream.url, read_timeout=0.3), "GET", "/", CIMultiDict(), None
    )
    assert response.status == 200
    with pytest.raises(TimeoutError):
        await within(response.content.read())
    response.release()
    await within(upstream.connections[0].ended)
    gw = await start_gateway(gateway_config([route(upstream.url, timeout="300ms")]))
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + "/", headers=HOST) as resp,
    ):
        assert resp.status == 200
        # The user's copy is cut off, never ended as if it were whole.
        with pytest.raises(aiohttp.ClientPayloadError):
            await within(resp.read())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_upstream(client: UpstreamClient, start_gateway: StartGateway) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(UpstreamUnreachable) as caught:
        await within(exchange(client, origin(url)))
    assert caught.value.os_error.errno == errno.ECONNREFUSED
    gw = await start_gateway(gateway_config([route(url)]))
    status, _, body = await raw_request(gw.port, get("/x"))
    assert (status, reason(body)) == (502, "upstream-unreachable")


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A port that never completes a connection: its accept queue is full and never drained."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield f"http://127.0.0.1:{port}"
    for sock in [*fillers, listener]:
        sock.close()


async def test_an_upstream_that_does_not_accept_times_out(
    client: UpstreamClient, start_gateway: StartGateway, blackhole: str
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout):
        await within(exchange(client, Origin.of(blackhole, None, None, 0.3, WAIT)))
    assert 0.25 <= loop.time() - started < 1.5
    gw = await start_gateway(gateway_config([route(blackhole, timeout="300ms")]))
    status, _, body = await raw_request(gw.port, get("/x"))
    assert (status, reason(body)) == (504, "upstream-timeout")


# -- 9. an answer before the request body is all sent --------------------------------------------


def answers_early() -> Handler:
    """Reads 64 KiB of an upload, refuses it with a 413, then reads on until the client closes."""

    async def handle(conn: Conn) -> None:
        if conn.number > 1:
            await serving(lambda seen: ok("next"))(conn)
            return
        await conn.request(with_body=False)
        await conn.exactly(2**16)
        await conn.send(ok("too large", status="413 Payload Too Large"))
        await conn.until_closed()

    return handle


async def test_an_early_413_is_returned_and_its_connection_closed(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(answers_early())
    to = origin(upstream.url)
    upload = fed(b"u" * 2**17, eof=False)  # 128 KiB of a 10 MiB upload, the rest still to come
    headers = CIMultiDict({"Content-Length": str(10 * 2**20)})
    response = await within(client.request(to, "POST", "/upload", headers, upload))
    assert response.status == 413
    assert await within(response.content.read()) == b"too large"
    response.release()
    # Its request was not sent whole: the connection cannot serve again and is closed.
    await within(upstream.connections[0].ended)
    assert (await exchange(client, to, target="/next"))[2] == b"next"
    assert len(upstream.connections) == 2


async def test_an_early_413_reaches_the_uploading_user_through_the_gateway(
    start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(answers_early())
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        head = b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 10485760\r\n\r\n"
        writer.write(head + b"u" * 2**17)  # and the user is still uploading the rest
        await writer.drain()
        answer = await within(reader.readuntil(b"\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 413 ")
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", answer, re.IGNORECASE)
        assert length is not None
        assert await within(reader.readexactly(int(length[1]))) == b"too large"
        await within(upstream.connections[0].ended)  # the gateway closed the upstream side
    finally:
        writer.close()


# -- 10. idle connections expire ------------------------------------------------------------------


async def test_a_pooled_connection_past_idle_timeout_is_not_used(
    client: UpstreamClient, raw_upstream: StartRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = await raw_upstream(serving(lambda seen: ok(f"on {seen.connection}")))
    to = origin(upstream.url)
    assert (await exchange(client, to))[2] == b"on 1"
    assert (await exchange(client, to))[2] == b"on 1"
    monkeypatch.setattr(gateway.upstream, "IDLE_TIMEOUT", 0.05)
    await asyncio.sleep(0.1)  # the condition under test is age: the pooled connection gets older
    assert (await exchange(client, to))[2] == b"on 2"
    await within(upstream.connections[0].ended)  # the expired one was closed, not just skipped
    assert len(upstream.connections) == 2


async def test_the_sweeper_closes_idle_connections(
    client: UpstreamClient, raw_upstream: StartRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.upstream, "IDLE_TIMEOUT", 0.1)
    upstream = await raw_upstream(serving(lambda seen: ok(f"on {seen.connection}")))
    to = origin(upstream.url)
    assert (await exchange(client, to))[2] == b"on 1"
    await within(upstream.connections[0].ended)  # with no request at all: the sweeper closed it
    assert (await exchange(client, to))[2] == b"on 2"


# -- found by these tests and fixed: each states what must happen -----------------------------


async def test_an_upstream_that_never_reads_the_body_still_times_out(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    async def handle(conn: Conn) -> None:
        await conn.upstream.stopping.wait()  # accepts, then neither reads nor answers

    upstream = await raw_upstream(handle)
    size = 16 * 2**20  # more than the socket buffers hold: the write waits on the upstream
    to = origin(upstream.url, read_timeout=0.3)
    with pytest.raises(UpstreamTimeout):
        await within(
            exchange(client, to, "POST", "/", {"Content-Length": str(size)}, fed(b"x" * size)),
            seconds=1.5,
        )


async def test_a_response_body_ends_when_the_request_body_breaks_off(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    async def handle(conn: Conn) -> None:
        await conn.request(with_body=False)
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await conn.until_closed()

    upstream = await raw_upstream(handle)
    upload = fed(b"a" * 10, eof=False)
    response = await within(
        client.request(origin(upstream.url, read_timeout=0.3), "POST", "/", CIMultiDict(), upload)
    )
    try:
        assert await within(response.content.readexactly(10)) == b"0123456789"
        reading = asyncio.get_running_loop().create_task(
            response.content.read(), name="the rest of the response body"
        )
        upload.set_exception(ConnectionResetError("the client went away"))
        # Expected: the truncated body ends in an error (at the latest after read_timeout), as
        # any body cut short does; a caller relaying it must not wait forever.
        with pytest.raises((aiohttp.ClientError, UpstreamError)):
            await within(reading, seconds=1.0)
    finally:
        response.release()


async def test_a_retry_is_sent_on_a_new_connection(
    client: UpstreamClient, raw_upstream: StartRaw
) -> None:
    both = asyncio.Event()

    async def handle(conn: Conn) -> None:
        if conn.number > 2:
            await serving(lambda seen: ok(f"answer {conn.number}"))(conn)
            return
        await conn.request()
        if conn.number == 2:
            both.set()
        await both.wait()  # two requests in flight at once: two connections in the pool after
        await conn.send(ok(f"answer {conn.number}"))
        await conn.request()  # the upstream closes its idle end as the next request arrives

    upstream = await raw_upstream(handle)
    to = origin(upstream.url)
    first = await asyncio.gather(exchange(client, to), exchange(client, to))
    assert sorted(body for _, _, body in first) == [b"answer 1", b"answer 2"]
    status, _, body = await exchange(client, to, target="/again")
    assert (status, body) == (200, b"answer 3")


async def test_a_connection_in_use_during_a_sweep_is_still_pooled_and_closed(
    client: UpstreamClient, raw_upstream: StartRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.upstream, "IDLE_TIMEOUT", 0.1)  # a sweep every 0.1 s
    go = asyncio.Event()

    async def handle(conn: Conn) -> None:
        while await conn.request() is not None:  # a long poll: its head at once, its end later
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await go.wait()
            await conn.send(b"4\r\nlast\r\n0\r\n\r\n")

    upstream = await raw_upstream(handle)
    to = origin(upstream.url)
    response = await within(client.request(to, "GET", "/long-poll", CIMultiDict(), None))
    try:
        assert await within(response.content.readexactly(5)) == b"first"
        # Sweeps (every 0.1 s) run while it streams: time passing is the condition under test.
        await asyncio.sleep(0.35)
        go.set()
        assert await within(response.content.read()) == b"last"
        response.release()  # a whole response, nothing says close: back to the pool
        await client.close()  # shutting down must close every pooled connection
        await within(upstream.connections[0].ended, seconds=1.0)
    finally:
        response._pool.close()  # the orphaned pool: closed here so that no transport is left open


async def test_a_header_name_with_trailing_whitespace_is_never_relayed(
    start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(
        serving(lambda seen: b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello")
    )
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(get("/"))
        head = await within(reader.readuntil(b"\r\n\r\n"))
    finally:
        writer.close()
    # SECURITY: a hop that reads "Content-Length : 5" as Content-Length sees a CL.TE message
    # next to the gateway's chunked framing: a response smuggling primitive. RFC 9112 5.1: a
    # proxy MUST remove such whitespace (or refuse the response) before forwarding.
    assert re.search(rb"\r\n[!-9;-~]+[ \t]+:", head) is None


async def test_an_unsolicited_101_is_not_relayed(
    start_gateway: StartGateway, raw_upstream: StartRaw
) -> None:
    upstream = await raw_upstream(
        serving(
            lambda seen: (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
            )
        )
    )
    gw = await start_gateway(gateway_config([route(upstream.url)]))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(get("/", extra="Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"))
        head = await within(reader.readuntil(b"\r\n\r\n"))
    finally:
        writer.close()
    # SECURITY: the gateway drops the client's Upgrade (docs/request-handling.md: that "closes
    # the request-smuggling route"); a 101 relayed anyway tells a proxy in front of the gateway
    # that the connection is now a tunnel, past that proxy's own rules.
    assert not head.startswith(b"HTTP/1.1 101")
