"""`/.gateway/healthz` (the process is up) and `/.gateway/readyz` (it can serve traffic)."""

from __future__ import annotations

from aiohttp import web

from gateway.keys import LIFECYCLE, RUNTIME
from gateway.pages import json_response


async def healthz(request: web.Request, request_id: str) -> web.StreamResponse:
    return json_response({"status": "ok"}, request_id)


async def readyz(request: web.Request, request_id: str) -> web.StreamResponse:
    checks = {"accepting": "draining" if request.app[LIFECYCLE].draining else "ok"}
    ready = all(v == "ok" for v in checks.values())
    payload = {
        "status": "ready" if ready else "unavailable",
        "checks": checks,
        "routes": len(request.app[RUNTIME].settings.routes),
    }
    return json_response(payload, request_id, status=200 if ready else 503)
