"""`GET /.gateway/login?rd=URL[&max_age=S]`: start the OIDC authorization code flow (SPEC §5).

A browser that already has a valid session is not sent to the IdP again: it goes straight
to `rd`, through the handoff when `rd` is on another route host. `max_age` (a route's
`max_auth_age`, sent by the pipeline on `auth-too-old`) forces a fresh login at the IdP
(`prompt=login`, `max_age`), and the callback checks the returned `auth_time` again, since
an IdP may ignore the prompt. `step_up=mfa` (what forward-auth's nginx example adds when
the gateway answered 401 for `mfa-required`) sends a signed-in browser to the MFA page
instead of straight back, which would loop.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from aiohttp import web

from gateway.auth import Auth, Handoff, LoginState
from gateway.errors import NotFound, ServiceUnavailable
from gateway.oidc import Pkce
from gateway.pages import redirect
from gateway.redirects import safe_redirect
from gateway.sessions import SessionInvalid
from gateway.types import GatewayState


def need_auth(gateway: GatewayState) -> Auth:
    if gateway.auth is None:
        raise NotFound("login is not configured on this gateway", reason="no-endpoint")
    return gateway.auth


def redirect_target(auth: Auth, rd: str | None) -> str:
    """SPEC §5: `rd` if it stays on public_url's host or an exact route host, else '/'."""
    public = auth.settings.server.public_url
    hosts = {public.host, *(r.host for r in auth.settings.routes if r.host and "*" not in r.host)}
    return safe_redirect(rd, scheme=public.scheme, port=public.port, hosts=hosts)


async def after_login(auth: Auth, cookie_id: str, rd: str, request_id: str) -> web.Response:
    """Where a logged-in browser goes: `rd` here, or the handoff to its route host."""
    host = urlsplit(rd).hostname if not rd.startswith("/") else None
    if host is None or host == auth.settings.server.public_url.host:
        return redirect(rd, request_id)
    code = await auth.new_handoff(Handoff(cookie_id, host, rd))
    public = auth.settings.server.public_url
    port = "" if public.port in (80, 443) else f":{public.port}"
    return redirect(f"{public.scheme}://{host}{port}/.gateway/handoff?code={code}", request_id)


async def login(request: web.BaseRequest, gateway: GatewayState, request_id: str) -> web.Response:
    auth = need_auth(gateway)
    rd = redirect_target(auth, request.query.get("rd"))
    max_age = _max_age(request.query.get("max_age"))
    forced = request.query.get("prompt") == "login" or max_age is not None
    cookie_id = auth.cookies.session_id(request.headers.getall("Cookie", []))
    if cookie_id is not None and not forced:
        try:
            await auth.sessions.check(await auth.sessions.load(cookie_id))
            if request.query.get("step_up") == "mfa":  # forward-auth's 401 for mfa-required
                return redirect(auth.mfa_url(rd), request_id)
            return await after_login(auth, cookie_id, rd, request_id)
        except SessionInvalid:
            pass  # a stale cookie: log in again
    if not await auth.discover():
        raise ServiceUnavailable("the identity provider cannot be reached; try again shortly")
    state = LoginState(
        secrets.token_urlsafe(32),
        secrets.token_urlsafe(32),
        Pkce.new().verifier,
        rd,
        auth.clock(),
        max_age=max_age,
    )
    pkce = Pkce.from_verifier(state.verifier)
    location = auth.provider.authorization_url(
        redirect_uri=auth.redirect_uri,
        state=state.state,
        nonce=state.nonce,
        pkce=pkce,
        prompt=_prompt(auth, forced_login=forced),
        max_age=int(max_age) if max_age is not None else None,
    )
    response = redirect(location, request_id)
    auth.cookies.set_login(response, auth.seal_login(state))
    return response


def _max_age(value: str | None) -> float | None:
    """A whole number of seconds, or None (anything else is ignored: it only ever asks for more)."""
    if value is None or not value.isdigit() or len(value) > 9:
        return None
    return float(value)


def _prompt(auth: Auth, *, forced_login: bool) -> str | None:
    """OIDC Core §11: asking for offline_access (refresh tokens) needs prompt=consent."""
    prompts = ["login"] if forced_login else []
    if "offline_access" in auth.provider.client.scopes:
        prompts.append("consent")
    return " ".join(prompts) or None
