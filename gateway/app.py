"""The application: state wiring, and the pipeline every request goes through, in order.

1 request id     X-Request-Id in (if well-formed), on every response
2 host + path    a served Host (421), the canonical path from the raw target (400)
3 own endpoints  /.gateway/* answered here, before routing, on every served host
4 route          host + longest path prefix -> Route, or 404
5 caller         (identity issue) session cookie or bearer token
6 authorize      (policy issue) evaluate(facts, route) -> Decision
7 audit          (audit issue) the decision record
8 forward        proxy.forward: streaming, WebSockets, X-Forwarded-*
errors anywhere: GatewayError -> a page or JSON with status, reason and request id
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from gateway.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.handlers import health
from gateway.keys import LIFECYCLE, PROXY, REQUEST_IDS, RUNTIME, Lifecycle
from gateway.pages import error_response
from gateway.proxy import Forward, Proxy
from gateway.requestid import RequestIds
from gateway.routing import locate
from gateway.runtime import Runtime
from gateway.settings import Settings

log = logging.getLogger("gateway.app")

Endpoint = Callable[[web.Request, str], Awaitable[web.StreamResponse]]

ENDPOINTS: dict[str, Endpoint] = {
    "/.gateway/healthz": health.healthz,
    "/.gateway/readyz": health.readyz,
}


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=0)
    app[RUNTIME] = Runtime.build(settings)
    app[PROXY] = Proxy(scheme="https" if settings.server.tls else "http")
    app[REQUEST_IDS] = RequestIds()
    app[LIFECYCLE] = Lifecycle()
    app.cleanup_ctx.append(_proxy_session)
    app.on_shutdown.append(_drain)
    app.router.add_route("*", "/{tail:.*}", _pipeline(app))
    return app


def _pipeline(app: web.Application) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    proxy, request_ids = app[PROXY], app[REQUEST_IDS]

    async def handle(request: web.Request) -> web.StreamResponse:
        request_id = request_ids.assign(request.headers.get("X-Request-Id"))
        runtime = app[RUNTIME]  # read once: a reload never mixes two configs in one request
        try:
            host, target = locate(
                request.raw_path, request.headers.getall("Host", []), runtime.routes
            )
            if target.match.startswith("/.gateway/"):
                return await _own_endpoint(request, target.match, request_id)
            route = runtime.routes.match(host, target.match)
            if route is None:
                raise NotFound("no route serves this address")
            addresses = runtime.trusted.resolve(
                request.remote or "", request.headers.getall("X-Forwarded-For", [])
            )
            forward = Forward(runtime.upstreams[route.id], target, host, addresses, request_id)
            return await proxy.forward(request, forward)
        except GatewayError as error:
            return error_response(request, error, request_id, runtime.secure)
        except Exception:
            log.exception("request failed", extra={"request_id": request_id})
            return error_response(
                request, GatewayError("internal error"), request_id, runtime.secure
            )

    return handle


async def _own_endpoint(request: web.Request, path: str, request_id: str) -> web.StreamResponse:
    # SECURITY: /.gateway/* is never proxied, so no upstream can shadow the gateway's endpoints.
    endpoint = ENDPOINTS.get(path)
    if endpoint is None:
        raise NotFound("no such gateway endpoint", reason="no-endpoint")
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed("this endpoint answers GET and HEAD")
    return await endpoint(request, request_id)


async def _proxy_session(app: web.Application) -> AsyncIterator[None]:
    proxy: Proxy = app[PROXY]
    await proxy.start()
    yield
    await proxy.close()


async def _drain(app: web.Application) -> None:
    app[LIFECYCLE].draining = True
