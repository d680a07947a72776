"""`/.gateway/healthz` (the process is up) and `/.gateway/readyz` (it can serve traffic)."""

from __future__ import annotations

from aiohttp import web

from gateway.pages import json_response
from gateway.types import GatewayState


async def healthz(request: web.BaseRequest, gateway: GatewayState, request_id: str) -> web.Response:
    return json_response({"status": "ok"}, request_id)


async def readyz(request: web.BaseRequest, gateway: GatewayState, request_id: str) -> web.Response:
    checks = {"accepting": "draining" if gateway.draining else "ok"}
    if gateway.audit is not None:
        checks["audit_log"] = "ok" if gateway.audit.available else "failing"
    auth = gateway.auth
    if auth is not None:
        checks["session_store"] = "ok" if await auth.store.ping() else "unreachable"
        checks["record_store"] = "ok" if await auth.mfa.records.ping() else "unreachable"
        checks["revocations"] = "ok" if auth.sessions.connected else "unsubscribed"
        checks["identity_provider"] = "ok" if await auth.discover() else "unreachable"
    ready = all(v == "ok" for v in checks.values())
    payload = {
        "status": "ready" if ready else "unavailable",
        "checks": checks,
        "routes": len(gateway.runtime.settings.routes),
        "policy_hash": gateway.runtime.policies.hash,
    }
    return json_response(payload, request_id, status=200 if ready else 503)
