"""`GET /.gateway/jwks.json`: the public keys upstreams verify `X-Gateway-Assertion` with (§7).

The current key and the previous ones (`assertion.previous_key_files`), so a key rotation
never fails a verifier that still holds an assertion signed with the old key.
"""

from __future__ import annotations

from aiohttp import web

from gateway.handlers.login import need_auth
from gateway.types import GatewayState

_MAX_AGE = 300  # verifiers may cache the set for 5 minutes; a rotation keeps the old key longer


async def jwks(request: web.BaseRequest, gateway: GatewayState, request_id: str) -> web.Response:
    keys = need_auth(gateway).assertions.keys
    headers = {"X-Request-Id": request_id, "Cache-Control": f"public, max-age={_MAX_AGE}"}
    return web.Response(
        body=keys.jwks_json, content_type="application/jwk-set+json", headers=headers
    )
