"""`GET /.gateway/handoff?code=…`: give a route host its own host-only session cookie (SPEC §5).

The code was made at login on public_url's host, is valid 30 seconds, works once, and only
on the host it was made for. No cookie ever carries a Domain attribute.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from gateway.errors import BadRequest
from gateway.handlers.login import need_auth
from gateway.pages import redirect
from gateway.routing import normalize_host
from gateway.types import GatewayState


async def handoff(request: web.BaseRequest, gateway: GatewayState, request_id: str) -> web.Response:
    auth = need_auth(gateway)
    found = await auth.redeem_handoff(request.query.get("code", ""))
    host = normalize_host(request.headers.get("Host", ""))
    # SECURITY: single use (a replayed or leaked code is refused), and only on its own host.
    if found is None or found.host != host:
        raise BadRequest(
            "this sign-in link has expired or was already used", reason="handoff-invalid"
        )
    parts = urlsplit(found.rd)
    response = redirect(
        (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), request_id
    )
    auth.cookies.set_session(response, found.cookie_id)
    return response
