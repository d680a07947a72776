"""`/.gateway/mfa` and `/.gateway/mfa/enroll`: the second factor's pages (SPEC §6, §12).

    GET  /.gateway/mfa?rd=URL                 the code prompt (enrolled), else enrollment when
                                              `mfa.enrollment: open`, else "ask for a link"
    POST /.gateway/mfa                        a TOTP or recovery code: a new session id with
                                              `mfa_at`, then on to `rd`
    GET  /.gateway/mfa/enroll?link=T&rd=URL   a new secret: QR code and text (a link of this
                                              user's, or any signed-in user without a factor
                                              under `open`)
    POST /.gateway/mfa/enroll                 a code proving the app holds the secret: the
                                              factor is enrolled, the recovery codes shown once

Every page needs a session (else the login, coming back here); every form carries the
session's CSRF token and its POST must come from our own origin. Nothing here needs
JavaScript. Secrets and recovery codes appear only in `no-store` responses.
"""

from __future__ import annotations

import math
from urllib.parse import quote

import segno
from aiohttp import web
from markupsafe import Markup

from gateway.auth import Auth
from gateway.errors import BadRequest, Forbidden
from gateway.events import Event, emit
from gateway.handlers.login import after_login, need_auth, redirect_target
from gateway.mfa import Link, MfaRefused, NotEnrolled, Pending, otpauth_uri
from gateway.pages import page, redirect
from gateway.sessions import Session
from gateway.types import GatewayState

_ROTATED = "mfa-step"  # the reason the pre-MFA session id ends


async def mfa(request: web.BaseRequest, gateway: GatewayState, request_id: str) -> web.Response:
    auth = need_auth(gateway)
    rd = redirect_target(auth, request.query.get("rd"))
    signed_in = await _signed_in(auth, request, rd, "/.gateway/mfa", request_id)
    if isinstance(signed_in, web.Response):
        return signed_in
    cookie_id, session = signed_in
    if _has_factor_shown(auth, session):
        return await after_login(auth, cookie_id, rd, request_id)
    if request.method == "POST":
        form = await _form(auth, request, session)
        rd = redirect_target(auth, str(form.get("rd", "")))
        return await _verify(
            auth, gateway, request, request_id, session, rd, str(form.get("code", ""))
        )
    factor = await auth.mfa.factor(session.identity)
    if factor is None:
        if auth.settings.mfa.enrollment == "open":
            return redirect(f"/.gateway/mfa/enroll?rd={quote(rd, safe='')}", request_id)
        raise NotEnrolled()
    return _prompt(auth, request_id, session, rd)


async def enroll(request: web.BaseRequest, gateway: GatewayState, request_id: str) -> web.Response:
    auth = need_auth(gateway)
    rd = redirect_target(auth, request.query.get("rd"))
    here = "/.gateway/mfa/enroll"
    if "link" in request.query:
        here += f"?link={quote(request.query['link'], safe='')}"
    signed_in = await _signed_in(auth, request, rd, here, request_id)
    if isinstance(signed_in, web.Response):
        return signed_in
    _, session = signed_in
    if request.method == "POST":
        form = await _form(auth, request, session)
        rd = redirect_target(auth, str(form.get("rd", "")))
        return await _confirm(auth, request_id, session, rd, str(form.get("code", "")))
    link = await _usable_link(auth, session, request.query.get("link"))
    if link is None:
        if auth.settings.mfa.enrollment != "open":
            raise NotEnrolled()
        if await auth.mfa.factor(session.identity) is not None:
            # Under `open`, a factor is replaced only through a link or an admin's reset.
            return redirect(f"/.gateway/mfa?rd={quote(rd, safe='')}", request_id)
    pending = await auth.mfa.begin(session, link)
    return _enrollment(auth, request_id, session, rd, pending)


# -- steps -------------------------------------------------------------------------------------


async def _signed_in(
    auth: Auth, request: web.BaseRequest, rd: str, here: str, request_id: str
) -> tuple[str, Session] | web.Response:
    """The browser's session, or the login that comes back to `here`."""
    found = await auth.session_of(request.headers.getall("Cookie", []))
    if found is not None:
        return found
    back = f"{here}{'&' if '?' in here else '?'}rd={quote(rd, safe='')}"
    return redirect(auth.login_url(back), request_id)


def _has_factor_shown(auth: Auth, session: Session) -> bool:
    """The session already has a second factor: the gateway's step, or the IdP's amr."""
    return session.mfa_at is not None or not auth.mfa_amr.isdisjoint(session.amr)


async def _form(auth: Auth, request: web.BaseRequest, session: Session) -> dict[str, str]:
    # SECURITY: another site's page cannot post codes in this user's name (CSRF).
    if not auth.same_origin(request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site")):
        raise BadRequest("this form must be sent from the gateway's own page", reason="bad-origin")
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    if not auth.csrf_ok(session.key, form.get("csrf", "")):
        raise BadRequest("the form expired; reload the page and try again", reason="bad-csrf")
    return form


async def _usable_link(auth: Auth, session: Session, token: str | None) -> Link | None:
    if token is None:
        return None
    link = await auth.mfa.link(token)
    if link is None:
        raise Forbidden(
            "this enrollment link cannot be used: it was used already, has expired, "
            "or was never issued; ask for a new one",
            reason="mfa-link-invalid",
        )
    # SECURITY: a link is the user's own: opened in someone else's session it enrolls nothing.
    if not link.binds(session):
        who = {"user": session.user, "sub": session.sub, "session": session.handle}
        emit(Event("mfa.enroll_link_refused", {**who, "link_for": link.subject}))
        raise Forbidden(
            "this enrollment link was issued for another user", reason="mfa-link-other-user"
        )
    return link


async def _verify(
    auth: Auth,
    gateway: GatewayState,
    request: web.BaseRequest,
    request_id: str,
    session: Session,
    rd: str,
    code: str,
) -> web.Response:
    client = gateway.runtime.trusted.resolve(
        request.remote or "", request.headers.getall("X-Forwarded-For", [])
    ).client
    try:
        await auth.mfa.verify(session, code, client)
    except NotEnrolled:
        raise
    except MfaRefused as refused:
        if refused.status == 403:  # locked: nothing more to try here
            raise
        response = _prompt(auth, request_id, session, rd, refused)
        retry_after = getattr(refused, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(math.ceil(retry_after))
        return response
    return await _stepped_up(auth, request_id, session, rd)


async def _stepped_up(auth: Auth, request_id: str, session: Session, rd: str) -> web.Response:
    cookie_id, _ = await auth.sessions.rotate(session, _ROTATED, mfa_at=auth.clock())
    response = await after_login(auth, cookie_id, rd, request_id)
    auth.cookies.set_session(response, cookie_id)
    return response


async def _confirm(
    auth: Auth, request_id: str, session: Session, rd: str, code: str
) -> web.Response:
    try:
        codes = await auth.mfa.confirm(session, code)
    except NotEnrolled:
        raise
    except MfaRefused as refused:
        pending = await auth.mfa.pending(session)
        if pending is None:
            raise NotEnrolled() from None
        return _enrollment(auth, request_id, session, rd, pending, refused)
    cookie_id, _ = await auth.sessions.rotate(session, _ROTATED, mfa_at=auth.clock())
    response = page(
        "mfa_codes.html",
        request_id,
        secure=auth.cookies.secure,
        user=session.user,
        codes=codes,
        next=f"/.gateway/login?rd={quote(rd, safe='')}",
    )
    auth.cookies.set_session(response, cookie_id)
    return response


# -- pages -------------------------------------------------------------------------------------


def _prompt(
    auth: Auth, request_id: str, session: Session, rd: str, error: MfaRefused | None = None
) -> web.Response:
    return page(
        "mfa_prompt.html",
        request_id,
        status=error.status if error is not None else 200,
        secure=auth.cookies.secure,
        user=session.user,
        csrf=auth.csrf_token(session.key),
        rd=rd,
        error=error.detail if error is not None else None,
        reason=error.reason if error is not None else None,
    )


def _enrollment(
    auth: Auth,
    request_id: str,
    session: Session,
    rd: str,
    pending: Pending,
    error: MfaRefused | None = None,
) -> web.Response:
    uri = otpauth_uri(pending.secret, session.user, auth.mfa.issuer)
    qr = segno.make(uri, error="m")
    svg = qr.svg_inline(scale=5, title="QR code for your authenticator app")
    secret = " ".join(pending.secret[i : i + 4] for i in range(0, len(pending.secret), 4))
    return page(
        "mfa_enroll.html",
        request_id,
        status=error.status if error is not None else 200,
        secure=auth.cookies.secure,
        user=session.user,
        issuer=auth.mfa.issuer,
        qr=Markup(svg),  # noqa: S704 (segno's own SVG of our URI: no user markup in it)
        secret=secret,
        csrf=auth.csrf_token(session.key),
        rd=rd,
        error=error.detail if error is not None else None,
        reason=error.reason if error is not None else None,
    )
