"""`/.gateway/healthz` (the process is up) and `/.gateway/readyz` (it can serve traffic).

The admin API's readyz also names the process that answered (`origin`, its audit chain)
and every live process sharing its session store with its policy hash (`workers`,
gateway.replicas): a worker left on an old policy after a reload shows there. The public
one does not: origins carry host names, which are nobody else's business.
"""

from __future__ import annotations

from aiohttp import web

from gateway.pages import json_response
from gateway.replicas import Replicas
from gateway.store import StoreUnavailable
from gateway.types import GatewayState


async def healthz(request: web.BaseRequest, gateway: GatewayState, request_id: str) -> web.Response:
    return json_response({"status": "ok"}, request_id)


async def readyz(request: web.BaseRequest, gateway: GatewayState, request_id: str) -> web.Response:
    return await readiness(gateway, request_id, detail=False)


async def readiness(gateway: GatewayState, request_id: str, *, detail: bool) -> web.Response:
    """The checks; with `detail` (the admin API) the origins and policy hashes of workers."""
    checks = {"accepting": "draining" if gateway.draining else "ok"}
    if gateway.audit is not None:
        checks["audit_log"] = "ok" if gateway.audit.available else "failing"
    auth = gateway.auth
    if auth is not None:
        checks["session_store"] = "ok" if await auth.store.ping() else "unreachable"
        checks["record_store"] = "ok" if await auth.mfa.records.ping() else "unreachable"
        checks["revocations"] = "ok" if auth.sessions.connected else "unsubscribed"
        checks["identity_provider"] = "ok" if await auth.discover() else "unreachable"
    replicas = gateway.replicas
    if replicas is not None:  # a worker that misses a reload would serve an old policy
        checks["reload_channel"] = "ok" if replicas.connected else "unsubscribed"
    ready = all(v == "ok" for v in checks.values())
    payload: dict[str, object] = {
        "status": "ready" if ready else "unavailable",
        "checks": checks,
        "routes": len(gateway.runtime.settings.routes),
        "policy_hash": gateway.runtime.policies.hash,
    }
    if replicas is not None and detail:
        # SECURITY: origins name hosts: shown to admin tokens only, not on the public port.
        payload["origin"] = replicas.origin
        payload["workers"] = await _workers(replicas)
    return json_response(payload, request_id, status=200 if ready else 503)


async def _workers(replicas: Replicas) -> dict[str, str] | None:
    try:
        return await replicas.hashes()
    except StoreUnavailable:
        return None  # the store's own check says why
