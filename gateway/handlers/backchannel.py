"""`POST /.gateway/backchannel-logout`: OIDC Back-Channel Logout 1.0 (SPEC §5).

A valid logout token ends every session it names (by `sid`, else every session of `sub`)
on every process and answers 200. Anything invalid, or a replayed `jti`, answers 400 and
ends nothing.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

from gateway.events import Event, emit
from gateway.handlers.login import need_auth
from gateway.oidc import TokenRejected
from gateway.types import GatewayState


async def backchannel_logout(
    request: web.BaseRequest, gateway: GatewayState, request_id: str
) -> web.Response:
    auth = need_auth(gateway)
    form = await request.post()
    token = form.get("logout_token")
    try:
        if not isinstance(token, str) or not await auth.discover():
            raise TokenRejected("missing-token", "no logout_token")
        claims = await auth.provider.validate_logout_token(token)
        jti_key = hashlib.sha256(f"{auth.provider.client.issuer}|{claims.jti}".encode()).hexdigest()
        ttl = max(claims.exp - auth.clock(), 60.0)
        # SECURITY: a replayed logout token is refused (and must not be usable as a probe).
        if not await auth.store.put_if_absent("jti", jti_key, b"1", ttl):
            raise TokenRejected("replayed-jti", "this logout token was already used")
    except TokenRejected as rejected:
        emit(
            Event(
                "auth.backchannel_rejected", {"reason": rejected.reason, "request_id": request_id}
            )
        )
        return _answer(400, {"error": "invalid_request", "error_description": rejected.reason})
    issuer = auth.provider.client.issuer
    if claims.sid:
        ended = await auth.sessions.end_sid(issuer, claims.sid, "backchannel-logout", actor="idp")
    else:
        assert claims.sub is not None
        ended = await auth.sessions.end_user(issuer, claims.sub, "backchannel-logout", actor="idp")
    emit(
        Event(
            "auth.backchannel_logout",
            {"sid": claims.sid, "sub": claims.sub, "ended": ended, "request_id": request_id},
        )
    )
    return _answer(200, {"ended": ended})


def _answer(status: int, payload: dict[str, object]) -> web.Response:
    return web.json_response(payload, status=status, headers={"Cache-Control": "no-store"})
