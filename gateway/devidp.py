"""A small OpenID Connect provider for `gateway demo` and the tests, on loopback only.

It follows OIDC Core 1.0 (authorization code flow), RFC 7636 (PKCE, S256
only), OIDC Discovery, RP-Initiated Logout 1.0 and Back-Channel Logout 1.0,
so that the gateway's relying party meets a provider that behaves like a real
one, over real HTTP. All state lives in one `DevIdP` object, in memory; the
clock is injectable; it refuses to listen anywhere but loopback.

Tests and operators steer it with plain methods, never HTTP endpoints:
`rotate_keys`, `drop_previous_keys`, `set_groups`, `set_sub`,
`revoke_refresh_tokens`, `backchannel_logout`, `mint_token`, and the mischief
hooks `id_token_hook` and `logout_token_hook` (a `TokenOverride`, see
`gateway.devidp_tokens`), `userinfo_hook` and `token_error`.

    gateway.devidp           the provider: endpoints, sessions, codes, tokens, controls
    gateway.devidp_accounts  DevUser, DevClient, load_users
    gateway.devidp_protocol  request rules and the error tree (PageError, RedirectError, OAuthError)
    gateway.devidp_tokens    signing keys, JWKS, minting (honest and malformed)
"""

from __future__ import annotations

import hmac
import secrets
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.devidp_accounts import DevClient, DevUser, TokenAuth, load_users
from gateway.devidp_protocol import (
    BASIC_CHALLENGE,
    BEARER_CHALLENGE,
    AuthRequest,
    OAuthError,
    PageError,
    Params,
    RedirectError,
    authorization_request,
    client_credentials,
    discovery_document,
    is_loopback,
    logout_client,
    oauth_error,
    oauth_param,
    page_param,
    pkce_matches,
    post_form,
    post_logout_target,
    redirect,
    require_loopback,
    text,
)
from gateway.devidp_tokens import (
    KeySet,
    SigningMode,
    TokenHook,
    TokenOverride,
    half_hash,
    mint,
    sign,
    verify_own,
)

__all__ = [
    "DevClient",
    "DevIdP",
    "DevUser",
    "LogoutDelivery",
    "SigningMode",
    "TokenAuth",
    "TokenHook",
    "TokenOverride",
    "load_users",
]

CODE_LIFETIME = 60  # seconds an authorization code can be exchanged
TOKEN_LIFETIME = 300  # seconds an ID token or access token is valid
LOGOUT_TOKEN_LIFETIME = 120
COOKIE = "devidp_session"  # distinct from the gateway's: cookies ignore ports
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"

UserinfoHook = Callable[[dict[str, Any]], dict[str, Any] | None]

# The login form posts to this origin, then the provider redirects to the
# client: no `form-action` here, since browsers apply it to that redirect too.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; "
        "frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


# -- what the provider remembers -----------------------------------------------------------------


@dataclass(slots=True)
class _BrowserSession:
    """A signed-in browser: its OIDC `sid` and the clients it signed in to."""

    username: str
    sid: str
    auth_time: int
    clients: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Grant:
    """What a code, access token or refresh token stands for; `family` is the code it came from."""

    username: str
    client_id: str
    scope: str
    sid: str
    auth_time: int
    family: str


@dataclass(frozen=True, slots=True)
class _Code:
    grant: _Grant
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class LogoutDelivery:
    """One back-channel logout call: the token sent and the receiver's status (0: unreachable)."""

    client_id: str
    logout_token: str
    status: int


# -- the provider --------------------------------------------------------------------------------


class DevIdP:
    """The provider: serve `app()` yourself or `await start()` on loopback; `await stop()`."""

    def __init__(
        self,
        users: Mapping[str, DevUser],
        clients: Sequence[DevClient],
        issuer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._users = dict(users)
        self._clients = {c.client_id: c for c in clients}
        self._issuer = issuer
        self._clock = clock
        self._keys = KeySet()
        self._codes: dict[str, _Code] = {}
        self._spent_codes: set[str] = set()
        self._sessions: dict[str, _BrowserSession] = {}  # by cookie value
        self._access: dict[str, tuple[_Grant, float]] = {}
        self._refresh: dict[str, _Grant] = {}
        self._runner: web.AppRunner | None = None
        self.id_token_hook: TokenHook | None = None
        self.logout_token_hook: TokenHook | None = None
        self.userinfo_hook: UserinfoHook | None = None
        self.token_error: dict[str, Any] | None = None
        self.logout_deliveries: list[LogoutDelivery] = []

    @property
    def issuer(self) -> str:
        if self._issuer is None:
            raise RuntimeError("the issuer is known once started, or when given to DevIdP()")
        return self._issuer

    # -- running ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The provider's endpoints, under the issuer's path."""

        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._guarded(request, handler)

        prefix = self._prefix
        app = web.Application(middlewares=[guard])
        app.router.add_get(f"{prefix}/.well-known/openid-configuration", self._discovery)
        app.router.add_get(f"{prefix}/jwks", self._jwks)
        app.router.add_route("GET", f"{prefix}/authorize", self._authorize_get)
        app.router.add_route("POST", f"{prefix}/authorize", self._authorize_post)
        app.router.add_post(f"{prefix}/token", self._token)
        app.router.add_route("GET", f"{prefix}/userinfo", self._userinfo)
        app.router.add_route("POST", f"{prefix}/userinfo", self._userinfo)
        app.router.add_route("GET", f"{prefix}/end_session", self._end_session)
        app.router.add_route("POST", f"{prefix}/end_session", self._end_session)
        return app

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Listen on a loopback address (port 0: any free port), over TLS with `ssl_context`;
        returns the issuer URL."""
        require_loopback(host)
        if self._runner is not None:
            raise RuntimeError("the dev IdP is already started")
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self._issuer is None:
            bound = runner.addresses[0][1]
            scheme = "https" if ssl_context is not None else "http"
            self._issuer = f"{scheme}://{f'[{host}]' if ':' in host else host}:{bound}"
        return self._issuer

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- controls for tests and operators ----------------------------------------------------------

    def rotate_keys(self) -> None:
        """Sign with a new key from now on; the previous keys stay in the JWKS."""
        self._keys.rotate()

    def drop_previous_keys(self) -> None:
        self._keys.drop_previous()

    def set_groups(self, username: str, groups: Sequence[str]) -> None:
        """Change a user's groups; refreshed tokens and userinfo show them."""
        self._users[username] = replace(self._user(username), groups=tuple(groups))

    def set_sub(self, username: str, sub: str) -> None:
        self._users[username] = replace(self._user(username), sub=sub)

    def revoke_refresh_tokens(self, username: str) -> None:
        self._user(username)
        self._revoke(lambda grant: grant.username == username, access=False)

    async def backchannel_logout(self, username: str) -> list[LogoutDelivery]:
        """End all of the user's sessions here and tell every client with a back-channel URI.

        A client the user signed in to through a session gets a logout token
        with that `sid` (and `sub`); any other gets one with `sub` alone.
        """
        user = self._user(username)
        deliveries: list[LogoutDelivery] = []
        for cookie, session in list(self._sessions.items()):
            if session.username == username:
                deliveries += await self._end_browser_session(cookie)
        told = {d.client_id for d in deliveries}
        for client in self._clients.values():
            if client.backchannel_logout_uri and client.client_id not in told:
                deliveries.append(await self._send_logout(client, user.sub, None))
        return deliveries

    def mint_token(
        self, header: Mapping[str, Any], claims: Mapping[str, Any], signing: SigningMode = "rs256"
    ) -> str:
        """A JWT of exactly this header and these claims, signed with the current key as told."""
        return sign(self._keys, header, claims, signing)

    @property
    def current_kid(self) -> str:
        return self._keys.current.kid

    # -- discovery and keys ----------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response(discovery_document(self.issuer))

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self._keys.jwks())

    # -- authorization ---------------------------------------------------------------------------

    async def _authorize_get(self, request: web.Request) -> web.Response:
        auth = self._authorization(request.query)
        session = self._reusable_session(request, auth)
        if session is not None:
            return self._redirect_with_code(auth, session)
        if "none" in auth.prompt:
            raise RedirectError("login_required", "sign-in needed", auth.redirect_uri, auth.state)
        return self._login_page(auth)

    async def _authorize_post(self, request: web.Request) -> web.Response:
        form = await request.post()
        auth = self._authorization(form)
        username = text(form, "username")
        user = self._users.get(username)
        # SECURITY: constant-time comparison; one message for unknown user and wrong password.
        if user is None or not hmac.compare_digest(
            user.password.encode(), text(form, "password").encode()
        ):
            return self._login_page(auth, error="Wrong username or password.", username=username)
        cookie = secrets.token_urlsafe(32)
        session = _BrowserSession(username, secrets.token_urlsafe(16), int(self._clock()))
        self._sessions[cookie] = session
        response = self._redirect_with_code(auth, session)
        response.set_cookie(COOKIE, cookie, path=self._cookie_path(), httponly=True, samesite="Lax")
        return response

    def _authorization(self, params: Params) -> AuthRequest:
        """The validated request, or the error RFC 6749 §4.1.2.1 says to give."""
        client_id = page_param(params, "client_id")
        client = self._clients.get(client_id or "")
        if client is None:
            raise PageError("Unknown client_id.")
        redirect_uri = page_param(params, "redirect_uri")
        # SECURITY: exact match only, so no code is ever sent to an unregistered address.
        if redirect_uri is None or redirect_uri not in client.redirect_uris:
            raise PageError("The redirect_uri is not registered for this client.")
        return authorization_request(client, redirect_uri, params)

    def _reusable_session(self, request: web.Request, auth: AuthRequest) -> _BrowserSession | None:
        """The browser's session, unless the request asks for a fresh sign-in."""
        session = self._sessions.get(request.cookies.get(COOKIE, ""))
        if session is None or "login" in auth.prompt:
            return None
        if auth.max_age is not None and self._clock() - session.auth_time > auth.max_age:
            return None
        return session

    def _redirect_with_code(self, auth: AuthRequest, session: _BrowserSession) -> web.Response:
        code = secrets.token_urlsafe(32)
        grant = _Grant(
            session.username,
            auth.client.client_id,
            auth.scope,
            session.sid,
            session.auth_time,
            code,
        )
        self._prune_codes()
        self._codes[code] = _Code(
            grant, auth.redirect_uri, auth.code_challenge, auth.nonce, self._clock() + CODE_LIFETIME
        )
        session.clients.add(auth.client.client_id)
        return redirect(auth.redirect_uri, code=code, state=auth.state, iss=self.issuer)

    def _prune_codes(self) -> None:
        now = self._clock()
        for code in [c for c, entry in self._codes.items() if entry.expires_at < now]:
            del self._codes[code]

    def _login_page(self, auth: AuthRequest, error: str = "", username: str = "") -> web.Response:
        return self._page(
            200,
            title="Sign in",
            message=f"to continue to {auth.client.client_id}",
            error=error,
            fields=auth.form_fields,
            username=username,
        )

    # -- token -----------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        if self.token_error is not None:
            error = self.token_error
            status = 401 if error.get("error") == "invalid_client" else 400
            return web.json_response(error, status=status, headers={"Cache-Control": "no-store"})
        form = await request.post()
        client = self._authenticate(request, form)
        grant_type = oauth_param(form, "grant_type")
        if grant_type == "authorization_code":
            payload = self._exchange_code(client, form)
        elif grant_type == "refresh_token":
            payload = self._refresh_grant(client, form)
        elif grant_type is None:
            raise OAuthError("invalid_request", "grant_type is required")
        else:
            raise OAuthError("unsupported_grant_type", f"{grant_type} is not supported")
        return web.json_response(
            payload, headers={"Cache-Control": "no-store", "Pragma": "no-cache"}
        )

    def _authenticate(self, request: web.Request, form: Params) -> DevClient:
        """The client, authenticated by its registered method (RFC 6749 §2.3)."""
        client_id, secret, method = client_credentials(request, form)
        client = self._clients.get(client_id or "")
        # SECURITY: the registered method only, and a constant-time secret comparison.
        if (
            client is None
            or secret is None
            or client.token_auth != method
            or not hmac.compare_digest(client.client_secret.encode(), secret.encode())
        ):
            raise OAuthError("invalid_client", "client authentication failed", 401, BASIC_CHALLENGE)
        return client

    def _exchange_code(self, client: DevClient, form: Params) -> dict[str, Any]:
        value = oauth_param(form, "code") or ""
        code = self._codes.pop(value, None)  # SECURITY: single use, even when the exchange fails
        if code is None:
            if value in self._spent_codes:
                # RFC 6749 §4.1.2: a replayed code revokes what it was exchanged for.
                self._revoke(lambda grant: grant.family == value)
            raise OAuthError("invalid_grant", "unknown, expired or used code")
        self._spent_codes.add(value)
        verifier = oauth_param(form, "code_verifier") or ""
        if (
            code.expires_at < self._clock()
            or code.grant.client_id != client.client_id
            or oauth_param(form, "redirect_uri") != code.redirect_uri
            or not pkce_matches(verifier, code.code_challenge)
        ):
            raise OAuthError(
                "invalid_grant", "code, client, redirect_uri or code_verifier mismatch"
            )
        return self._issue_tokens(code.grant, code.nonce)

    def _refresh_grant(self, client: DevClient, form: Params) -> dict[str, Any]:
        token = oauth_param(form, "refresh_token") or ""
        grant = self._refresh.get(token)
        if (
            grant is None
            or grant.client_id != client.client_id
            or grant.username not in self._users
        ):
            raise OAuthError("invalid_grant", "unknown, used or revoked refresh token")
        scope = oauth_param(form, "scope")
        if scope is not None and not set(scope.split()) <= set(grant.scope.split()):
            raise OAuthError("invalid_scope", "more scope than first granted")
        del self._refresh[token]  # rotation: the presented token is spent
        return self._issue_tokens(replace(grant, scope=scope or grant.scope), None)

    def _issue_tokens(self, grant: _Grant, nonce: str | None) -> dict[str, Any]:
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._access[access] = (grant, self._clock() + TOKEN_LIFETIME)
        self._refresh[refresh] = grant
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME,
            "refresh_token": refresh,
            "id_token": self._id_token(grant, nonce, access),
            "scope": grant.scope,
        }

    def _id_token(self, grant: _Grant, nonce: str | None, access_token: str) -> str:
        """An ID token from the live user table; `nonce` only at the code exchange."""
        user = self._user(grant.username)
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user.sub,
            "aud": grant.client_id,
            "azp": grant.client_id,
            "exp": now + TOKEN_LIFETIME,
            "iat": now,
            "auth_time": grant.auth_time,
            "sid": grant.sid,
            "amr": list(user.amr),
            "at_hash": half_hash(access_token),
            **user.profile(),
        }
        if nonce is not None:
            claims["nonce"] = nonce
        return mint(self._keys, claims, "JWT", self.id_token_hook)

    # -- userinfo --------------------------------------------------------------------------------

    async def _userinfo(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        entry = self._access.get(token.strip()) if scheme.lower() == "bearer" else None
        if entry is None or entry[1] < self._clock() or entry[0].username not in self._users:
            raise OAuthError(
                "invalid_token", "unknown or expired access token", 401, BEARER_CHALLENGE
            )
        user = self._users[entry[0].username]
        claims = {"sub": user.sub, **user.profile()}
        if self.userinfo_hook is not None:
            claims = self.userinfo_hook(claims) or claims
        return web.json_response(claims, headers={"Cache-Control": "no-store"})

    # -- logout ----------------------------------------------------------------------------------

    async def _end_session(self, request: web.Request) -> web.Response:
        """RP-Initiated Logout: end this browser's session, tell the clients, send it back."""
        params: Params = request.query if request.method == "GET" else await request.post()
        hint = self._verified_hint(page_param(params, "id_token_hint"))
        client = logout_client(self._clients, page_param(params, "client_id"), hint)
        target = post_logout_target(
            [client] if client else self._clients.values(),
            page_param(params, "post_logout_redirect_uri"),
        )
        cookie = request.cookies.get(COOKIE, "")
        if cookie not in self._sessions and hint is not None:
            cookie = next((c for c, s in self._sessions.items() if s.sid == hint.get("sid")), "")
        if cookie in self._sessions:
            await self._end_browser_session(cookie)
        if target is None:
            response = self._page(200, title="Signed out", message="You are signed out.")
        else:
            response = redirect(target, state=page_param(params, "state"))
        response.del_cookie(COOKIE, path=self._cookie_path())
        return response

    def _verified_hint(self, hint: str | None) -> dict[str, Any] | None:
        """The claims of an ID token this provider signed (expired ones too), or a 400 page."""
        if hint is None:
            return None
        try:
            return verify_own(self._keys, hint, self.issuer)
        except ValueError as exc:
            raise PageError("The id_token_hint is not an ID token of this provider.") from exc

    async def _end_browser_session(self, cookie: str) -> list[LogoutDelivery]:
        """End a session: its tokens are revoked, its clients told by back-channel."""
        session = self._sessions.pop(cookie)
        self._revoke(lambda grant: grant.sid == session.sid)
        user = self._users.get(session.username)
        deliveries = []
        for client_id in sorted(session.clients):
            client = self._clients[client_id]
            if client.backchannel_logout_uri and user is not None:
                deliveries.append(await self._send_logout(client, user.sub, session.sid))
        return deliveries

    async def _send_logout(self, client: DevClient, sub: str, sid: str | None) -> LogoutDelivery:
        """POST a logout token (Back-Channel Logout 1.0 §2.4) to the client's back-channel URI."""
        assert client.backchannel_logout_uri is not None
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": client.client_id,
            "iat": now,
            "exp": now + LOGOUT_TOKEN_LIFETIME,
            "jti": secrets.token_urlsafe(16),
            "sub": sub,
            "events": {BACKCHANNEL_EVENT: {}},
        }
        if sid is not None:
            claims["sid"] = sid
        token = mint(self._keys, claims, "logout+jwt", self.logout_token_hook)
        status = await post_form(client.backchannel_logout_uri, {"logout_token": token})
        delivery = LogoutDelivery(client.client_id, token, status)
        self.logout_deliveries.append(delivery)
        return delivery

    # -- plumbing --------------------------------------------------------------------------------

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # SECURITY: loopback only, even when someone else serves app() on another address.
        if not is_loopback(request.remote):
            return self._page(403, title="Forbidden", message="The dev IdP serves loopback only.")
        try:
            response = await handler(request)
        except PageError as exc:
            response = self._page(400, title="Bad request", message=str(exc))
        except RedirectError as exc:
            response = redirect(
                exc.redirect_uri,
                error=exc.error,
                error_description=str(exc),
                state=exc.state,
                iss=self.issuer,
            )
        except OAuthError as exc:
            response = oauth_error(exc)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    def _page(self, status: int, **context: Any) -> web.Response:
        defaults = {"message": "", "error": "", "fields": None, "username": ""}
        action = f"{self._prefix}/authorize"
        body = _templates.get_template("devidp_login.html").render(
            **{**defaults, "action": action, **context}
        )
        return web.Response(
            status=status, text=body, content_type="text/html", headers=_PAGE_HEADERS
        )

    @property
    def _prefix(self) -> str:
        """The issuer's path, under which every endpoint lives ('' at the root)."""
        return urlsplit(self._issuer).path.rstrip("/") if self._issuer else ""

    def _cookie_path(self) -> str:
        return self._prefix or "/"

    def _user(self, username: str) -> DevUser:
        try:
            return self._users[username]
        except KeyError:
            raise KeyError(f"no dev IdP user {username!r}") from None

    def _revoke(self, matches: Callable[[_Grant], bool], access: bool = True) -> None:
        for token in [t for t, grant in self._refresh.items() if matches(grant)]:
            del self._refresh[token]
        if access:
            for token in [t for t, (grant, _) in self._access.items() if matches(grant)]:
                del self._access[token]
