"""`/.gateway/logout`: GET shows a sign-out button, POST signs out (SPEC §5).

The POST needs the session's CSRF token and an Origin of ours. It ends the session on every
process, clears the cookie and sends the browser to the IdP's end_session_endpoint with
`id_token_hint`, so the IdP session ends too.
"""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit

from aiohttp import web

from gateway.errors import BadRequest
from gateway.handlers.login import need_auth
from gateway.pages import page, redirect
from gateway.types import GatewayState


async def logout(request: web.BaseRequest, gateway: GatewayState, request_id: str) -> web.Response:
    auth = need_auth(gateway)
    found = await auth.session_of(request.headers.getall("Cookie", []))
    if request.method == "GET":
        session = found[1] if found else None
        return page(
            "logout.html",
            request_id,
            secure=auth.cookies.secure,
            form_targets=_idp_origin(gateway),  # the POST continues at the IdP's end_session
            user=session.user if session else None,
            csrf=auth.csrf_token(session.key) if session else "",
        )
    # SECURITY: a cross-site form cannot sign the user out (or in as someone else).
    if not auth.same_origin(request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site")):
        raise BadRequest("this form must be sent from the gateway's own page", reason="bad-origin")
    form = await request.post()
    location = "/"
    if found is not None:
        session = found[1]
        if not auth.csrf_ok(session.key, str(form.get("csrf", ""))):
            raise BadRequest("the form expired; reload the page and try again", reason="bad-csrf")
        await auth.sessions.end(session.key, "logout", actor=session.user)
        location = _end_session_url(gateway, session.id_token) or "/"
    response = redirect(location, request_id)
    auth.cookies.clear(response, auth.cookies.session)
    return response


def _idp_origin(gateway: GatewayState) -> tuple[str, ...]:
    auth = gateway.auth
    if auth is None or not auth.provider.discovered:
        return ()
    endpoint = auth.provider.metadata.end_session_endpoint
    if endpoint is None:
        return ()
    parts = urlsplit(endpoint)
    return (f"{parts.scheme}://{parts.netloc}",)


def _end_session_url(gateway: GatewayState, id_token: str | None) -> str | None:
    auth = gateway.auth
    assert auth is not None
    if not auth.provider.discovered or auth.provider.metadata.end_session_endpoint is None:
        return None
    params = {
        "client_id": auth.provider.client.client_id,
        "post_logout_redirect_uri": auth.public_url + "/",
    }
    if id_token:
        params["id_token_hint"] = id_token
    endpoint = auth.provider.metadata.end_session_endpoint
    return endpoint + ("&" if "?" in endpoint else "?") + urlencode(params)
