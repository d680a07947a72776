"""The Python floor: the smallest honest aiohttp reverse proxy.

One shared ClientSession (no cookie jar, no decompression, no redirects),
method/path/query/headers forwarded minus hop-by-hop, both bodies streamed.
No policy, no audit, no routing. bench/run.py measures the gateway against it.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Mapping

from aiohttp import ClientSession, DummyCookieJar, TCPConnector, web
from yarl import URL

HOP = ("connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host")
HOP_BY_HOP = frozenset((*HOP, "proxy-authenticate", "proxy-authorization"))
SESSION = web.AppKey("session", ClientSession)


def forwardable(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP]


def make_app(upstream: str) -> web.Application:
    async def proxy(request: web.Request) -> web.StreamResponse:
        url = URL(upstream + request.raw_path, encoded=True)
        body = request.content if request.body_exists else None
        async with request.app[SESSION].request(
            request.method,
            url,
            headers=forwardable(request.headers),
            data=body,
            allow_redirects=False,
        ) as up:
            response = web.StreamResponse(
                status=up.status, reason=up.reason, headers=forwardable(up.headers)
            )
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = ClientSession(
            connector=TCPConnector(limit=0), cookie_jar=DummyCookieJar(), auto_decompress=False
        )
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8080")
    args = parser.parse_args()
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(
        make_app(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
