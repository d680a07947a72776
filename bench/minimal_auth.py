"""The peers' floor for forward-auth: the smallest aiohttp auth endpoint for nginx auth_request.

`GET /auth` answers 200 with fixed identity headers (the names the gateway's
`/.gateway/auth` answers with, minus the assertion); anything else 404. No session, no
policy, no audit: what "nginx + auth_request to a minimal Python service" costs, beside which
bench/run.py shows the gateway's forward-auth mode.

    .venv/bin/python bench/minimal_auth.py --port P
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

from aiohttp import web

IDENTITY = {
    "X-Auth-Request-User": "bench@example.org",
    "X-Auth-Request-Email": "bench@example.org",
    "X-Auth-Request-Groups": "bench",
}


def make_app() -> web.Application:
    counter = itertools.count()

    async def auth(request: web.Request) -> web.Response:
        return web.Response(headers={**IDENTITY, "X-Request-Id": f"req-{next(counter)}"})

    app = web.Application()
    app.router.add_get("/auth", auth)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(
        make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop
    )


if __name__ == "__main__":
    main()
