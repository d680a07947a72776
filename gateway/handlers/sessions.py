"""`/.gateway/sessions`: the caller's own sessions, to list and to end (SPEC §5).

GET answers a page, or JSON for clients that do not ask for HTML; POST (CSRF token and an
Origin of ours) ends the session whose handle is given in `end`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from gateway.errors import BadRequest, Unauthorized
from gateway.handlers.login import need_auth
from gateway.pages import json_response, page, redirect, wants_html
from gateway.types import GatewayState


async def my_sessions(
    request: web.BaseRequest, gateway: GatewayState, request_id: str
) -> web.Response:
    auth = need_auth(gateway)
    found = await auth.session_of(request.headers.getall("Cookie", []))
    if found is None:
        raise Unauthorized("sign in to see your sessions")
    current = found[1]
    if request.method == "POST":
        if not auth.same_origin(
            request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site")
        ):
            raise BadRequest(
                "this form must be sent from the gateway's own page", reason="bad-origin"
            )
        form = await request.post()
        if not auth.csrf_ok(current.key, str(form.get("csrf", ""))):
            raise BadRequest("the form expired; reload the page and try again", reason="bad-csrf")
        target = await auth.sessions.by_handle(current.iss, current.sub, str(form.get("end", "")))
        if target is not None:
            await auth.sessions.end(target.key, "ended-by-user", actor=current.user)
        return redirect("/.gateway/sessions", request_id)
    listed = [
        {
            "handle": s.handle,
            "created": _time(s.created),
            "last_active": _time(s.last_active),
            "current": s.key == current.key,
        }
        for s in await auth.sessions.of_user(current.iss, current.sub)
    ]
    if not wants_html(request):
        return json_response({"user": current.user, "sessions": listed}, request_id)
    return page(
        "sessions.html",
        request_id,
        secure=auth.cookies.secure,
        user=current.user,
        sessions=listed,
        csrf=auth.csrf_token(current.key),
    )


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
