"""`/.gateway/break-glass`: emergency sign-in while the IdP is down (SPEC §3 `break_glass`).

    GET  /.gateway/break-glass?rd=URL   the form: account, password, the account's current
                                        TOTP code and a written reason
    POST /.gateway/break-glass          a new session for the account (its groups, amr
                                        pwd+otp, no refresh token, ending after
                                        `break_glass.max_duration` at most), then on to `rd`

Both answer 403 `break-glass-closed` unless the IdP is unreachable or an operator opened
break-glass (gateway.breakglass). There is no session yet to bind a CSRF token to, so the
form's token is a double submit bound by a key: a random token in the page, and the same
token sealed (with the time) in a 10-minute cookie `<cookie_name>-break-glass`; the POST
must bring both, and come from our own Origin. Every use is a `break_glass.used` event and
an `alert.break_glass` (to the plugins' on_alert); every refusal past the form checks is a
`break_glass.failed` event.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.auth import Auth
from gateway.breakglass import (
    ISS,
    MAX_REASON,
    MIN_REASON,
    Attempt,
    BreakGlass,
    BreakGlassRefused,
    Closed,
    Opening,
    utc,
)
from gateway.breakglass_accounts import Account
from gateway.errors import BadRequest, Forbidden, NotFound
from gateway.events import Event, emit
from gateway.handlers.login import after_login, need_auth, redirect_target
from gateway.pages import page
from gateway.sessions import Session
from gateway.types import GatewayState

_AMR = ("pwd", "otp")  # a password and a TOTP code: routes requiring MFA accept the session


@dataclass(frozen=True, slots=True)
class Used:
    """One granted use, as the events tell it."""

    account: Account
    reason: str  # the written reason
    opening: Opening
    client_ip: str
    request_id: str


async def break_glass(
    request: web.BaseRequest, gateway: GatewayState, request_id: str
) -> web.Response:
    auth = need_auth(gateway)
    glass = auth.break_glass
    if glass is None:
        raise NotFound("break-glass is not configured on this gateway", reason="no-endpoint")
    opening = await glass.opening()
    if opening is None:
        raise Closed()
    rd = redirect_target(auth, request.query.get("rd"))
    if request.method != "POST":
        return _form(auth, glass, request_id, rd, opening)
    form = await _posted(auth, glass, request)
    rd = redirect_target(auth, form.get("rd"))
    client_ip = gateway.runtime.trusted.resolve(
        request.remote or "", request.headers.getall("X-Forwarded-For", [])
    ).client
    attempt = Attempt(
        form.get("account", ""),
        form.get("password", ""),
        form.get("code", ""),
        form.get("reason", ""),
    )
    try:
        account = await glass.enter(attempt, client_ip, request_id)
    except BreakGlassRefused as refused:
        if refused.status in (403, 503):  # locked, or no accounts: nothing to try again here
            raise
        return _form(auth, glass, request_id, rd, opening, refused, attempt)
    used = Used(account, attempt.reason.strip(), opening, client_ip, request_id)
    return await _signed_in(auth, glass, request, used, rd)


async def _posted(auth: Auth, glass: BreakGlass, request: web.BaseRequest) -> dict[str, str]:
    # SECURITY: another site's page cannot post here (signing a browser into an account).
    if not auth.same_origin(request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site")):
        raise BadRequest("this form must be sent from the gateway's own page", reason="bad-origin")
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    cookie = auth.cookies.one(request.headers.getall("Cookie", []), auth.cookies.break_glass)
    # SECURITY: the token in the form must be the one sealed in this browser's cookie.
    if not glass.form_ok(cookie, form.get("csrf", "")):
        raise BadRequest("the form expired; reload the page and try again", reason="bad-csrf")
    return form


async def _signed_in(
    auth: Auth, glass: BreakGlass, request: web.BaseRequest, used: Used, rd: str
) -> web.Response:
    account = used.account
    await _refuse_disabled(auth, used)
    old = auth.cookies.session_id(request.headers.getall("Cookie", []))
    if old is not None:  # like a login, this replaces the browser's previous session
        for key in auth.sessions.keys_for(old):
            await auth.sessions.end(key, "replaced-by-login")
    now = auth.clock()
    cookie_id, session = await auth.sessions.create(
        iss=ISS,
        sub=account.name,
        user=account.name,
        email=account.email,
        email_verified=account.email is not None,  # written into the file by an operator
        groups=account.groups,
        amr=_AMR,
        sid=None,
        auth_time=now,
        id_token=None,
        refresh_token=None,
        refresh_after=None,
        mfa_at=now,
        max_lifetime=glass.max_duration,
    )
    _announce(auth, used, session)
    await auth.directory.login(session, used.client_ip)
    response = await after_login(auth, cookie_id, rd, used.request_id)
    auth.cookies.set_session(response, cookie_id)
    auth.cookies.clear(response, auth.cookies.break_glass)
    return response


async def _refuse_disabled(auth: Auth, used: Used) -> None:
    """An account an admin disabled here (`POST /users/NAME/disable`) gets no session."""
    if not await auth.directory.disabled_now(f"{ISS}|{used.account.name}"):
        return
    name = used.account.name
    fields = {
        "actor": name,
        "account": name,
        "client_ip": used.client_ip,
        "reason": "user-disabled",
    }
    emit(Event("break_glass.failed", {**fields, "request_id": used.request_id}))
    raise Forbidden("this break-glass account is disabled here", reason="user-disabled")


def _announce(auth: Auth, used: Used, session: Session) -> None:
    """`break_glass.used` for the log, and the same as `alert.break_glass` for the plugins."""
    fields: dict[str, object] = {
        "actor": used.account.name,
        "account": used.account.name,
        "reason": used.reason,
        "client_ip": used.client_ip,
        "session": session.handle,
        "expires": utc(session.expires(auth.sessions.limits)),
        "groups": list(used.account.groups),
        "opened_by": used.opening.cause,  # idp-unreachable | operator
        "operator": used.opening.actor,
        "request_id": used.request_id,
    }
    emit(Event("break_glass.used", fields))
    emit(Event("alert.break_glass", fields))


def _form(
    auth: Auth,
    glass: BreakGlass,
    request_id: str,
    rd: str,
    opening: Opening,
    error: BreakGlassRefused | None = None,
    attempt: Attempt | None = None,
) -> web.Response:
    sealed, token = glass.new_form()
    response = page(
        "break_glass.html",
        request_id,
        status=error.status if error is not None else 200,
        secure=auth.cookies.secure,
        csrf=token,
        rd=rd,
        cause=opening.cause,
        operator=opening.actor,
        until=utc(opening.until) if opening.until is not None else None,
        minutes=int(glass.max_duration // 60),
        min_reason=MIN_REASON,
        max_reason=MAX_REASON,
        account=attempt.name if attempt is not None else "",
        written=attempt.reason if attempt is not None else "",
        error=error.detail if error is not None else None,
        reason=error.reason if error is not None else None,
    )
    auth.cookies.set_break_glass(response, sealed)
    return response
