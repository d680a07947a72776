"""Experiment: the minimal proxy with a leaner upstream client (issue 8, "measure alternatives").

bench/minimal_proxy.py with two changes: aiohttp's low-level `web.Server` (no Application,
no router), and instead of `ClientSession` a keep-alive pool of asyncio protocols whose
responses are parsed by aiohttp's own C parser (`aiohttp.http.HttpResponseParser`, llhttp:
the parser ClientSession uses, so nothing hand-written reads HTTP). It forwards GET and HEAD
without a body only (a request with one gets 501): enough to measure what ClientSession's
own work costs per request against bench/minimal_proxy.py, not a product.

Measured (bench/run.py, 2 cores, same-core pairs): `server-min` 0.90x `aiohttp-min`, and
`lean-min` 0.40x: of about 90 µs per request, ClientSession's machinery was about 43 µs.
That is what led to gateway/upstream.py, which keeps this design and adds everything a
product needs (bodies, TLS, timeouts, 1xx, retries, the pool's safety checks).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import deque
from pathlib import Path

from aiohttp import web
from aiohttp.http import HttpResponseParser

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minimal_proxy import forwardable  # the floor's header filter, the same here


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.parser = HttpResponseParser(self, loop, 2**16, auto_decompress=False)
        self.waiter: asyncio.Future[tuple[object, object]] | None = None
        self.closed = False

    # what aiohttp's parser expects of its protocol
    def set_exception(self, exc: BaseException, cause: BaseException | None = None) -> None:
        self.connection_lost(exc)

    def pause_reading(self) -> None:  # flow control of the body's StreamReader
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("upstream closed"))

    def data_received(self, data: bytes) -> None:
        messages, _, _ = self.parser.feed_data(data)
        for message in messages:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(message)


class Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: deque[Upstream] = deque()

    async def get(self) -> Upstream:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        return conn


def make_handler(pool: Pool, authority: str):  # type: ignore[no-untyped-def]
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.body_exists or request.method not in ("GET", "HEAD"):
            return web.Response(status=501)
        head = [f"{request.method} {request.raw_path} HTTP/1.1\r\nHost: {authority}\r\n"]
        for name, value in forwardable(request.headers):
            if "\r" in value or "\n" in value:
                return web.Response(status=400)
            head.append(f"{name}: {value}\r\n")
        head.append("\r\n")
        conn = await pool.get()
        conn.waiter = asyncio.get_running_loop().create_future()
        assert conn.transport is not None
        conn.transport.write("".join(head).encode("latin-1"))
        message, payload = await conn.waiter  # type: ignore[misc]
        response = web.StreamResponse(
            status=message.code,  # type: ignore[attr-defined]
            reason=message.reason,  # type: ignore[attr-defined]
            headers=forwardable(message.headers),  # type: ignore[attr-defined]
        )
        await response.prepare(request)
        async for chunk in payload.iter_any():  # type: ignore[attr-defined]
            await response.write(chunk)
        await response.write_eof()
        if not message.should_close and not conn.closed:  # type: ignore[attr-defined]
            conn.waiter = None
            pool.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return response

    return handle


def session_handler(upstream: str):  # type: ignore[no-untyped-def]
    """The same server with minimal_proxy.py's ClientSession: splits server from client."""
    from aiohttp import ClientSession, DummyCookieJar, TCPConnector
    from yarl import URL

    client: list[ClientSession] = []

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if not client:
            client.append(
                ClientSession(
                    connector=TCPConnector(limit=0),
                    cookie_jar=DummyCookieJar(),
                    auto_decompress=False,
                )
            )
        url = URL(upstream + request.raw_path, encoded=True)
        async with client[0].request(
            request.method, url, headers=forwardable(request.headers), allow_redirects=False
        ) as up:
            response = web.StreamResponse(
                status=up.status, reason=up.reason, headers=forwardable(up.headers)
            )
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    return handle


async def serve(port: int, upstream: str, client: str) -> None:
    host, _, upstream_port = upstream.removeprefix("http://").rstrip("/").partition(":")
    pool = Pool(host, int(upstream_port or 80))
    handler = (
        make_handler(pool, f"{host}:{upstream_port}")
        if client == "lean"
        else session_handler(upstream.rstrip("/"))
    )
    runner = web.ServerRunner(web.Server(handler, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8080")
    parser.add_argument("--client", choices=("lean", "aiohttp"), default="lean")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.upstream, args.client))


if __name__ == "__main__":
    main()
