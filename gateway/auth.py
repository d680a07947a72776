"""Everything login needs, built once per process: the IdP, the sessions, the stores, the keys.

`Auth.open(settings)` wires it; the handlers under /.gateway/ and the caller stage use it.
It also owns the login state: a sealed, short-lived cookie binding `state`, `nonce` and the
PKCE verifier to the browser that started the login (SPEC §5), and the handoff codes that
give a route on another host its own cookie.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import orjson

from gateway.assertion import AssertionKeys, Assertions
from gateway.breakglass import BreakGlass
from gateway.cookies import Cookies
from gateway.directory import Directory
from gateway.errors import Unauthorized
from gateway.events import Event, emit
from gateway.keyring import Keyring
from gateway.mfa import Mfa
from gateway.monitor import Monitor
from gateway.oidc import ClientConfig, IdpUnavailable, Provider, TokenRejected
from gateway.reviews import Reviews
from gateway.sessions import Clock, Limits, Session, SessionInvalid, Sessions
from gateway.settings import Settings
from gateway.store import SessionStore, open_session_store
from gateway.store.records import open_record_store

log = logging.getLogger("gateway.auth")

LOGIN_STATE_TTL = 600.0  # seconds a login may take at the IdP
HANDOFF_TTL = 30.0
_DISCOVERY_RETRY = 10.0  # seconds between discovery attempts while the IdP is down


def _strings(value: object) -> tuple[str, ...] | None:
    """A claim that must be a list of strings, or None when it is anything else."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _renew_at(now: float, exp: object, expires_in: float | None) -> float | None:
    """When to refresh next: at three quarters of the new token's life."""
    if isinstance(exp, int | float) and exp > now:
        return now + (exp - now) * 0.75
    return now + expires_in * 0.75 if expires_in else None


def _idp_tls(ca_file: Path | None) -> ssl.SSLContext:
    """The system's CAs, plus `identity.ca_file` (an internal CA) when set; always verified."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


@dataclass(frozen=True, slots=True)
class LoginState:
    state: str
    nonce: str
    verifier: str
    rd: str
    created: float
    max_age: float | None = None


@dataclass(frozen=True, slots=True)
class Handoff:
    cookie_id: str
    host: str
    rd: str


class Auth:
    def __init__(
        self,
        settings: Settings,
        provider: Provider,
        sessions: Sessions,
        store: SessionStore,
        keyring: Keyring,
        http: aiohttp.ClientSession,
        clock: Clock,
        assertions: Assertions,
        mfa: Mfa,
        directory: Directory,
    ) -> None:
        self.settings = settings  # replaced by a reload (only routes and policies may change)
        self.assertions = assertions  # X-Gateway-Assertion and /.gateway/jwks.json
        self.provider = provider
        self.sessions = sessions
        self.mfa = mfa  # TOTP at the gateway, its enrollments in the record store (SPEC §6)
        self.directory = directory  # every identity seen: logins, networks, groups, disabled
        self.reviews = Reviews(mfa.records, keyring, clock)  # access reviews (CSF 01.e)
        self.monitor = Monitor(settings.alerts, clock)  # alert.* events
        self.store = store
        self.keyring = keyring
        self.clock = clock
        public = settings.server.public_url
        self.public_url = str(public).rstrip("/")
        self.cookies = Cookies(
            settings.sessions.cookie_name,
            secure=public.scheme == "https",
            max_age=settings.sessions.max_lifetime,
        )
        self.redirect_uri = self.public_url + "/.gateway/callback"
        identity = settings.identity
        assert identity is not None
        self.groups_claim = identity.groups_claim
        self.mfa_amr = frozenset(identity.mfa_amr)  # amr values that count as a second factor
        self._http = http
        self._login_sealer = keyring.sealer("login-state")
        self._handoff_sealer = keyring.sealer("handoff")
        self._discovered_at = float("-inf")
        self._discovery_lock = asyncio.Lock()
        self.break_glass: BreakGlass | None = None  # emergency access (break_glass:), if set

    @classmethod
    async def open(cls, settings: Settings, clock: Clock = time.time) -> Auth | None:
        """The login machinery, or None for a config whose routes are all public."""
        identity = settings.identity
        if identity is None or not settings.protected_routes:
            return None
        keys = AssertionKeys.load(settings)  # KeyFileError before anything is opened
        await BreakGlass.check(settings)  # AccountsFileError, likewise
        assertions = Assertions(
            keys, str(settings.server.public_url).rstrip("/"), settings.assertion.ttl, clock
        )
        store = await open_session_store(settings.state.sessions, clock=clock)
        try:
            records = await open_record_store(settings.state.records)
        except BaseException:
            await store.close()
            raise
        keyring = Keyring(settings.state.key_bytes)
        mfa = Mfa(records, store, keyring, issuer=settings.mfa.totp_issuer, clock=clock)
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=_idp_tls(identity.ca_file)),
            timeout=aiohttp.ClientTimeout(total=15),
        )
        secret = identity.client_secret.get_secret_value() if identity.client_secret else ""
        client = ClientConfig(
            identity.issuer,
            identity.client_id,
            secret,
            identity.token_auth,
            identity.scopes,
            identity.api_audiences,
        )
        provider = Provider(client, http, clock=clock)
        limits = Limits(
            settings.sessions.idle_timeout,
            settings.sessions.max_lifetime,
            settings.sessions.max_per_user,
        )
        sessions = Sessions(store, keyring, limits, clock=clock)
        await sessions.start()
        directory = Directory(records, store, keyring, clock)
        await directory.start()
        auth = cls(
            settings, provider, sessions, store, keyring, http, clock, assertions, mfa, directory
        )
        auth.break_glass = BreakGlass.configured(settings, store, keyring, provider, clock)
        await auth.discover()  # an IdP that is down now is retried on demand
        return auth

    async def close(self) -> None:
        await self.sessions.close()
        await self.directory.close()  # its last-access times, before the stores close
        await self.store.close()
        await self.mfa.records.close()
        await self._http.close()

    async def discover(self) -> bool:
        """Load the IdP's metadata and keys once; False while the IdP cannot be reached."""
        if self.provider.discovered:
            return True
        async with self._discovery_lock:
            if self.provider.discovered:
                return True
            if self.clock() - self._discovered_at < _DISCOVERY_RETRY:
                return False  # tried moments ago: do not hammer an IdP that is down
            self._discovered_at = self.clock()
            try:
                await self.provider.discover()
            except IdpUnavailable as exc:
                log.warning("the IdP cannot be reached: %s", exc)
                return False
            return True

    async def session_of(self, cookie_headers: list[str]) -> tuple[str, Session] | None:
        """The browser's valid session (and its cookie id), or None."""
        cookie_id = self.cookies.session_id(cookie_headers)
        if cookie_id is None:
            return None
        try:
            return cookie_id, await self.sessions.check(await self.sessions.load(cookie_id))
        except SessionInvalid:
            return None

    async def refresh_if_due(self, session: Session) -> Session:
        """Renew the session's claims with its refresh token when due, one process at a time.

        The session ends when the IdP refuses the refresh token (`invalid_grant`) or answers
        for another subject; an IdP that cannot be reached ends nothing (retried later).
        """
        due = session.refresh_after is not None and self.clock() >= session.refresh_after
        if not due or session.refresh_token is None:
            return session
        lock = await self.store.acquire(f"refresh:{session.key}", 30.0)
        if lock is None:
            return session  # another process or request is refreshing it right now
        try:
            # Under the lock, the stored session is the truth: a request that loaded this copy
            # before another one refreshed it must not spend the rotated refresh token again.
            try:
                current = await self.sessions.reload(session.key)
            except SessionInvalid as invalid:
                raise Unauthorized(
                    "your session has ended; sign in again", reason=invalid.reason
                ) from None
            due = current.refresh_after is not None and self.clock() >= current.refresh_after
            if not due or current.refresh_token is None:
                return current
            return await self._refresh(current)
        finally:
            await self.store.release(f"refresh:{session.key}", lock)

    async def _refresh(self, session: Session) -> Session:
        assert session.refresh_token is not None
        try:
            tokens = await self.provider.refresh(session.refresh_token)
            claims: dict[str, object] = {}
            if tokens.id_token:
                claims = await self.provider.validate_refreshed_id_token(
                    tokens.id_token, sub=session.sub
                )
            if tokens.access_token:  # many IdPs put groups and email in userinfo only (§5.4)
                info = await self.provider.userinfo(tokens.access_token, expected_sub=session.sub)
                claims = {**info, **claims}
        except IdpUnavailable:
            return await self.sessions.update(session, refresh_after=self.clock() + 60.0)
        except TokenRejected as rejected:
            await self.sessions.end(session.key, f"refresh-{rejected.reason}", actor="idp")
            raise Unauthorized(
                "your session has ended; sign in again", reason="session-revoked"
            ) from None
        identity = self.settings.identity
        assert identity is not None
        groups, email = claims.get(identity.groups_claim), claims.get("email")
        updated = await self.sessions.update(
            session,
            groups=_strings(groups) if _strings(groups) is not None else session.groups,
            email=email if isinstance(email, str) else session.email,
            email_verified=(
                claims["email_verified"] is True
                if "email_verified" in claims
                else session.email_verified and email in (None, session.email)
            ),
            id_token=tokens.id_token or session.id_token,
            refresh_token=tokens.refresh_token or session.refresh_token,
            refresh_after=_renew_at(self.clock(), claims.get("exp"), tokens.expires_in),
        )
        if updated.groups != session.groups:
            emit(
                Event(
                    "session.claims_changed",
                    {
                        "session": session.handle,
                        "user": session.user,
                        "groups_before": list(session.groups),
                        "groups_after": list(updated.groups),
                    },
                )
            )
        return updated

    def csrf_token(self, session_key: str) -> str:
        """The form token bound to one session (SPEC §12)."""
        return self.keyring.hmac("csrf", session_key.encode()).hex()[:32]

    def csrf_ok(self, session_key: str, token: str) -> bool:
        expected = [mac.hex()[:32] for mac in self.keyring.hmac_all("csrf", session_key.encode())]
        return any(hmac.compare_digest(e, token) for e in expected)

    def same_origin(self, origin: str | None, fetch_site: str | None = None) -> bool:
        """Whether a POST comes from our own pages (SPEC §12): its Origin is public_url's or a
        route host's (same scheme and port). Our pages send `Referrer-Policy: no-referrer`, for
        which Chromium sends `Origin: null`; that is accepted only with the browser's own
        `Sec-Fetch-Site: same-origin`, a header no other site's page can set."""
        if origin == "null":
            return fetch_site == "same-origin"
        if not origin:
            return False
        public = self.settings.server.public_url
        port = "" if public.port in (80, 443) else f":{public.port}"
        hosts = {
            public.host,
            *(r.host for r in self.settings.routes if r.host and "*" not in r.host),
        }
        return origin in {f"{public.scheme}://{host}{port}" for host in hosts}

    def mfa_url(self, rd: str) -> str:
        """The MFA page on public_url's host, where the login's cookie lives (SPEC §6)."""
        return f"{self.public_url}/.gateway/mfa?rd={quote(rd, safe='')}"

    def login_url(self, rd: str, max_age: float | None = None) -> str:
        url = f"{self.public_url}/.gateway/login?rd={quote(rd, safe='')}"
        return url if max_age is None else f"{url}&max_age={int(max_age)}"

    # -- login state -------------------------------------------------------------------------

    def seal_login(self, state: LoginState) -> str:
        blob = self._login_sealer.seal("login", self.cookies.login, orjson.dumps(asdict(state)))
        return base64.urlsafe_b64encode(blob).decode("ascii")

    def open_login(self, cookie: str | None) -> LoginState | None:
        if not cookie:
            return None
        try:
            blob = base64.urlsafe_b64decode(cookie.encode("ascii"))
        except ValueError:
            return None
        plain = self._login_sealer.open("login", self.cookies.login, blob)
        if plain is None:
            return None
        try:
            return LoginState(**orjson.loads(plain))
        except (TypeError, ValueError):
            return None

    async def first_use_of(self, state: str) -> bool:
        """True the first time a login state is redeemed, False ever after (SPEC §5 single use)."""
        key = hashlib.sha256(state.encode()).hexdigest()
        return await self.store.put_if_absent("login-used", key, b"1", LOGIN_STATE_TTL)

    # -- handoff to route hosts --------------------------------------------------------------

    async def new_handoff(self, handoff: Handoff) -> str:
        code = secrets.token_urlsafe(32)
        key = hashlib.sha256(code.encode()).hexdigest()
        blob = self._handoff_sealer.seal("handoff", key, orjson.dumps(asdict(handoff)))
        await self.store.put("handoff", key, blob, HANDOFF_TTL)
        return code

    async def redeem_handoff(self, code: str) -> Handoff | None:
        """The handoff for a code, exactly once; None if unknown, expired or already used."""
        key = hashlib.sha256(code.encode()).hexdigest()
        plain = self._handoff_sealer.open("handoff", key, await self.store.take("handoff", key))
        return Handoff(**orjson.loads(plain)) if plain is not None else None
