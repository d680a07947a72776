"""`GET /.gateway/callback`: finish the login (SPEC §5).

The state must be this browser's (the sealed login cookie), fresh (10 minutes) and unused;
the code is exchanged, the ID token validated (gateway.oidc), userinfo checked to be about
the same subject, and a new session created under a new id. Every refusal is an
`auth.login_failed` event with a stable reason, and no session.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from aiohttp import web

from gateway.auth import LOGIN_STATE_TTL, Auth, LoginState
from gateway.directory import disable_id
from gateway.errors import BadRequest, Forbidden, ServiceUnavailable
from gateway.events import Event, emit
from gateway.handlers.login import after_login, need_auth
from gateway.oidc import IdpUnavailable, Pkce, TokenRejected, Tokens
from gateway.pages import page
from gateway.types import GatewayState


class LoginFailed(BadRequest):
    reason = "login-failed"

    def __init__(self, cause: str) -> None:
        super().__init__("the login could not be completed; please try again")
        self.cause = cause


async def callback(
    request: web.BaseRequest, gateway: GatewayState, request_id: str
) -> web.Response:
    auth = need_auth(gateway)
    try:
        state = await _redeem_state(auth, request)
        claims, tokens = await _verified_identity(auth, request, state)
        client_ip = gateway.runtime.trusted.resolve(
            request.remote or "", request.headers.getall("X-Forwarded-For", [])
        ).client
        await _refuse_disabled(auth, claims, client_ip, request_id)
        response = await _start_session(auth, request, state, claims, tokens, request_id, client_ip)
    except LoginFailed as failure:
        _failed(request, request_id, failure.cause)
        raise
    except TokenRejected as rejected:
        _failed(request, request_id, rejected.reason)
        raise LoginFailed(rejected.reason) from None
    except IdpUnavailable:
        _failed(request, request_id, "idp-unavailable")
        raise ServiceUnavailable("the identity provider cannot be reached; try again") from None
    auth.cookies.clear(response, auth.cookies.login)
    return response


def _failed(request: web.BaseRequest, request_id: str, reason: str) -> None:
    emit(
        Event(
            "auth.login_failed",
            {"reason": reason, "request_id": request_id, "client_ip": request.remote},
        )
    )


async def _redeem_state(auth: Auth, request: web.BaseRequest) -> LoginState:
    state = auth.open_login(auth.cookies.login_state(request.headers.getall("Cookie", [])))
    if state is None:
        raise LoginFailed("missing-login-state")
    # SECURITY: the state must be the one this browser's sealed cookie carries (login CSRF).
    if not hmac.compare_digest(state.state, request.query.get("state", "")):
        raise LoginFailed("bad-state")
    if auth.clock() - state.created > LOGIN_STATE_TTL:
        raise LoginFailed("expired-state")
    # SECURITY: single use: a replayed callback URL (history, logs) creates nothing.
    if not await auth.first_use_of(state.state):
        raise LoginFailed("reused-state")
    if "error" in request.query:
        raise LoginFailed(f"op-error:{request.query['error'][:64]}")
    if not request.query.get("code"):
        raise LoginFailed("missing-code")
    return state


async def _verified_identity(
    auth: Auth, request: web.BaseRequest, state: LoginState
) -> tuple[dict[str, Any], Tokens]:
    if not await auth.discover():
        raise IdpUnavailable("discovery")
    tokens = await auth.provider.exchange_code(
        request.query["code"],
        redirect_uri=auth.redirect_uri,
        pkce=Pkce.from_verifier(state.verifier),
    )
    assert tokens.id_token is not None  # exchange_code refuses a response without one
    claims = await auth.provider.validate_id_token(
        tokens.id_token, nonce=state.nonce, max_age=state.max_age
    )
    info: dict[str, Any] = {}
    if tokens.access_token:
        info = await auth.provider.userinfo(tokens.access_token, expected_sub=claims["sub"])
    return {**info, **claims}, tokens  # the signed ID token wins over userinfo


async def _refuse_disabled(
    auth: Auth, claims: dict[str, Any], client_ip: str, request_id: str
) -> None:
    """A disabled user gets no session until enabled (read from the store: fail closed)."""
    identity = f"{claims['iss']}|{claims['sub']}"
    entry = await auth.directory.get(identity)
    if entry is None or entry.disabled is None:
        return
    fields = {"user": entry.user, "identity": identity, "client_ip": client_ip}
    emit(
        Event("auth.login_refused", {**fields, "reason": "user-disabled", "request_id": request_id})
    )
    cause = f"disabled:{identity}:{disable_id(entry)}"
    auth.monitor.refused(cause, {**fields, "attempt": "login"})
    # SECURITY: disabling is instant and lasting: the IdP's yes does not override it.
    raise Forbidden("your account is disabled here; ask your administrator", reason="user-disabled")


async def _start_session(
    auth: Auth,
    request: web.BaseRequest,
    state: LoginState,
    claims: dict[str, Any],
    tokens: Tokens,
    request_id: str,
    client_ip: str,
) -> web.Response:
    identity = auth.settings.identity
    assert identity is not None
    user = claims.get(identity.user_claim)
    if not isinstance(user, str) or not user:
        raise LoginFailed("missing-user-claim")
    groups = claims.get(identity.groups_claim, [])
    # SECURITY: a string where a list belongs ("admins") must not be read letter by letter.
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise LoginFailed("bad-groups-claim")
    amr = claims.get("amr", [])
    # A malformed amr ([["mfa"]]) is no second factor, and must not break the session later.
    amr = [a for a in amr if isinstance(a, str)] if isinstance(amr, list) else []
    old = auth.cookies.session_id(request.headers.getall("Cookie", []))
    if old is not None:  # a new login replaces the browser's previous session
        for key in auth.sessions.keys_for(old):
            await auth.sessions.end(key, "replaced-by-login")
    cookie_id, session = await auth.sessions.create(
        iss=claims["iss"],
        sub=claims["sub"],
        user=user,
        email=_opt(claims.get("email")),
        email_verified=claims.get("email_verified") is True,
        groups=groups,
        amr=amr,
        sid=_opt(claims.get("sid")),
        auth_time=claims.get("auth_time"),
        id_token=tokens.id_token,
        refresh_token=tokens.refresh_token,
        refresh_after=_refresh_after(claims),
    )
    emit(
        Event(
            "auth.login",
            {
                "user": user,
                "sub": session.sub,
                "session": session.handle,
                "client_ip": client_ip,
                "request_id": request_id,
                "amr": list(session.amr),
            },
        )
    )
    auth.monitor.login(await auth.directory.login(session, client_ip), session, client_ip)
    notice = await auth.mfa.take_notice(session.identity)
    if notice is None:
        response = await after_login(auth, cookie_id, state.rd, request_id)
    else:  # SPEC §6: "a new authenticator was enrolled", on the next login
        response = page(
            "mfa_notice.html",
            request_id,
            secure=auth.cookies.secure,
            user=session.user,
            what=notice.what,
            actor=notice.actor,
            at=datetime.fromtimestamp(notice.at, UTC).strftime("%Y-%m-%d %H:%M"),
            next=f"/.gateway/login?rd={quote(state.rd, safe='')}",
        )
    auth.cookies.set_session(response, cookie_id)
    return response


def _refresh_after(claims: dict[str, Any]) -> float | None:
    """Renew claims when three quarters of the ID token's life have passed."""
    exp, iat = claims.get("exp"), claims.get("iat")
    if isinstance(exp, int | float) and isinstance(iat, int | float) and exp > iat:
        return float(iat + (exp - iat) * 0.75)
    return None


def _opt(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
