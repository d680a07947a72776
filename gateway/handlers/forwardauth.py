"""`GET /.gateway/auth`: forward-auth for nginx `auth_request` and Traefik ForwardAuth (SPEC §7).

The proxy in front describes the request it holds in `X-Forwarded-Method`, `-Host` and
`-Uri` and passes the client's own headers (the session cookie, an `Authorization` bearer
token). The answer is the proxy mode's decision for that request, through the same
`access.admit`:

    200  allowed; the identity headers (X-Auth-Request-*, X-Gateway-Assertion) to pass on
    401  no usable session or token: the proxy sends the browser to /.gateway/login
    403  denied, or input that is missing, repeated or malformed (nginx would turn a 400
         from auth_request into a 500, and a 500 must never stand for "no")

Only `server.trusted_proxies` may ask: anyone else could mint identity headers with it.
"""

from __future__ import annotations

from aiohttp import web

from gateway.access import Ask, challenge, passes_preflight, refusal
from gateway.errors import BadRequest, Forbidden, GatewayError, Unauthorized
from gateway.pages import error_response
from gateway.routing import locate
from gateway.types import GatewayState

_METHOD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


async def forward_auth(
    request: web.BaseRequest, gateway: GatewayState, request_id: str
) -> web.Response:
    runtime = gateway.runtime
    peer = request.remote or ""
    # SECURITY: an untrusted caller could learn decisions and collect signed identity headers.
    if not runtime.trusted.trusts(peer):
        raise Forbidden("forward-auth answers trusted proxies only", reason="not-trusted")
    method, host_header, uri = (_one(request, name) for name in _ASKED)
    if not set(method) <= _METHOD_CHARS:
        raise Forbidden("X-Forwarded-Method is not a method", reason="bad-request")
    try:
        host, target = locate(uri, [host_header], runtime.routes)
    except GatewayError as error:  # a bad path or host: refused, never a 4xx nginx would mangle
        raise Forbidden(error.detail, reason=error.reason) from None
    route = runtime.routes.match(host, target.match)
    if route is None or target.match.startswith("/.gateway/"):
        raise Forbidden("no route serves this address", reason="no-route")
    headers = {"X-Request-Id": request_id, "Cache-Control": "no-store"}
    if route.public or passes_preflight(method, request.headers, route):
        return web.Response(status=200, headers=headers)
    client = runtime.trusted.resolve(peer, request.headers.getall("X-Forwarded-For", [])).client
    ask = Ask(method, host, target.match, client, request_id, target.query)
    try:
        admission = await gateway.admit(request, route, ask, runtime)  # and its audit record
        if not admission.decision.allowed:
            raise refusal(admission, runtime.policies[route.id], ask)
    except Unauthorized as error:  # a 401, never the login redirect: nginx cannot follow one
        response = error_response(request, error, request_id, runtime.secure)
        response.headers["WWW-Authenticate"] = challenge(error)
        return response
    except BadRequest as error:  # two session cookies: a 400 would become nginx's 500
        raise Forbidden(error.detail, reason=error.reason) from None
    headers.update(admission.identity)
    return web.Response(status=200, headers=headers)


_ASKED = ("X-Forwarded-Method", "X-Forwarded-Host", "X-Forwarded-Uri")


def _one(request: web.BaseRequest, name: str) -> str:
    values = request.headers.getall(name, [])
    # SECURITY: two values (one of them the client's) would make the question ambiguous.
    if len(values) != 1 or not values[0]:
        raise Forbidden(f"{name} must be given exactly once", reason="bad-request")
    return values[0]
