"""The admin API (SPEC §11): its own listener, bearer tokens with roles, every call an event.

    await AdminApi.open(settings) -> AdminApi | None  reads admin.tokens_file; None: no admin:
      .start(gateway) / .stop()                        the listener on admin.listen (TLS optional,
                                                       client certificates with client_ca_file)
      .reload_tokens()                                 re-reads the file; on error the old stays
    read_tokens(path) -> tuple[AdminToken, ...]       one `name:role:sha256hex` per line

Every call, in order: request id -> bearer token (401) -> endpoint (400, 404, 405) -> role
(403) -> handler; then one `admin.<action>` event naming the token as `actor` (or
"anonymous"), the method, path, status and outcome, whatever happened. Roles are ranked
read < operate < admin. USER in a path or `?user=` is the user_claim value (any case) or
`ISS|SUB`; a value naming two identities with sessions is refused (409).

    TokensFileError       the tokens file cannot be read, or a line of it is malformed
    GatewayError          (gateway.errors) answered as JSON with the request id; here
                          mostly Unauthorized 401, Forbidden 403, Conflict 409
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote

import orjson
from aiohttp import web

from gateway.auth import Auth
from gateway.breakglass import BreakGlass, open_duration
from gateway.directory import Entry
from gateway.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
)
from gateway.events import Event, emit
from gateway.handlers import health
from gateway.metrics import exposition
from gateway.pages import json_response
from gateway.requestid import RequestIds
from gateway.reviews import Asked
from gateway.sessions import Session, Sessions
from gateway.settings import Admin, AdminTls, Settings
from gateway.types import GatewayState

log = logging.getLogger("gateway.admin")

Role = Literal["read", "operate", "admin"]
_RANK: dict[str, int] = {"read": 1, "operate": 2, "admin": 3}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HANDLE = re.compile(r"[0-9a-f]{1,64}")
_PATH_SHOWN = 512  # characters of a request path kept in an event
_REVOKED = "admin-revoked"  # the reason recorded when an admin call ends a session
_FANOUT_WAIT = 3.0  # seconds POST /reload waits for every worker to show the new policy hash


class TokensFileError(Exception):
    """`admin.tokens_file` is unusable; the message names the file (and line) and the fix."""


# -- tokens ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str  # the actor in events
    role: Role
    digest: bytes = field(repr=False)  # SHA-256 of the token; the token itself is never stored


def parse_tokens(text: str, source: str) -> tuple[AdminToken, ...]:
    """The tokens of a file's text; TokensFileError names `source:LINE` of the first bad line."""
    tokens: list[AdminToken] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.partition("#")[0].strip()  # no name, role or hex digit holds a '#'
        if line:
            tokens.append(_parse_line(line, f"{source}:{number}"))
    _check_unique(tokens, source)
    return tuple(tokens)


def _parse_line(line: str, where: str) -> AdminToken:
    # Messages never echo the third field: a token pasted there by mistake stays out of logs.
    parts = [part.strip() for part in line.split(":")]
    if len(parts) != 3:
        raise TokensFileError(
            f"{where}: expected name:role:sha256-of-token, got {len(parts)} field(s)"
        )
    name, role, digest = parts
    if not _NAME.fullmatch(name):
        raise TokensFileError(f"{where}: bad token name: use letters, digits, '.', '_', '-', '@'")
    if role not in _RANK:
        raise TokensFileError(f"{where}: the role of {name!r} must be read, operate or admin")
    if not _SHA256_HEX.fullmatch(digest.lower()):
        raise TokensFileError(
            f"{where}: the third field of {name!r} must be the token's SHA-256 as 64 hex digits "
            "(the hash, never the token itself)"
        )
    return AdminToken(name, role, bytes.fromhex(digest))  # type: ignore[arg-type]


def _check_unique(tokens: Sequence[AdminToken], source: str) -> None:
    names = [t.name for t in tokens]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TokensFileError(f"{source}: token name {twice[0]!r} is used more than once")
    if len({t.digest for t in tokens}) != len(tokens):
        raise TokensFileError(f"{source}: two entries hold the same token hash; each needs its own")


def read_tokens(path: Path) -> tuple[AdminToken, ...]:
    """Read and parse the tokens file (blocking: call it in a thread on a running loop)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        detail = err.strerror if isinstance(err, OSError) else "it is not UTF-8 text"
        raise TokensFileError(f"{path}: cannot read the admin tokens file: {detail}") from None
    return parse_tokens(text, str(path))


def authenticate(tokens: Sequence[AdminToken], headers: Sequence[str]) -> AdminToken:
    """The token an `Authorization: Bearer` header carries; Unauthorized if none matches."""
    if not headers:
        raise Unauthorized(
            "send an admin token as 'Authorization: Bearer TOKEN'", reason="no-token"
        )
    scheme, _, presented = headers[0].strip().partition(" ")
    if len(headers) > 1 or scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("send one 'Authorization: Bearer TOKEN' header", reason="bad-token")
    digest = hashlib.sha256(presented.strip().encode("utf-8", "surrogateescape")).digest()
    found = None
    for token in tokens:
        # SECURITY: constant-time comparison with every entry and no early exit, so response
        # time reveals neither which stored hash is near the one sent nor where it matched.
        if hmac.compare_digest(token.digest, digest):
            found = token
    if found is None:
        raise Unauthorized("the admin token is not known", reason="bad-token")
    return found


# -- endpoints ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Call:
    """One authorized call, as a handler sees it; `facts` go into the call's event."""

    request: web.BaseRequest
    gateway: GatewayState
    request_id: str
    token: AdminToken
    params: tuple[str, ...]
    facts: dict[str, object] = field(default_factory=dict)
    admin: AdminApi | None = None  # the listener itself (its tokens file is re-read on reload)


Handler = Callable[[Call], Awaitable[web.Response]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: tuple[str | None, ...]  # segments; None takes any non-empty one as a parameter
    role: Role
    action: str  # the event is admin.<action>
    handler: Handler


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a request asks for: its endpoint and parameters, or the error that answers it."""

    endpoint: Endpoint | None = None
    params: tuple[str, ...] = ()
    error: GatewayError | None = None


def resolve(method: str, raw_path: str) -> Resolved:
    """Match the raw path (each segment percent-decoded on its own, so %2F stays in USER)."""
    try:
        segments = [unquote(s, errors="strict") for s in raw_path.split("?")[0].split("/")[1:]]
    except UnicodeDecodeError:
        return Resolved(error=BadRequest("the path is not valid UTF-8", reason="bad-path"))
    at_path = [e for e in ENDPOINTS if _params(e.path, segments) is not None]
    for endpoint in at_path:
        if method == endpoint.method or (method == "HEAD" and endpoint.method == "GET"):
            return Resolved(endpoint, _params(endpoint.path, segments) or ())
    if at_path:
        allowed = ", ".join(sorted({e.method for e in at_path}))
        return Resolved(at_path[0], error=MethodNotAllowed(f"this endpoint answers {allowed}"))
    return Resolved(error=NotFound("no such admin endpoint", reason="no-endpoint"))


def _params(pattern: tuple[str | None, ...], segments: list[str]) -> tuple[str, ...] | None:
    if len(pattern) != len(segments):
        return None
    params = []
    for want, got in zip(pattern, segments, strict=True):
        if want is None and got:
            params.append(got)
        elif want != got:
            return None
    return tuple(params)


def authorize(token: AdminToken, endpoint: Endpoint) -> None:
    # SECURITY: a token acts only up to its role (read < operate < admin): a read token that
    # leaks cannot end sessions.
    if _RANK[token.role] < _RANK[endpoint.role]:
        raise Forbidden(
            f"this call needs the {endpoint.role} role; token {token.name!r} has {token.role}"
        )


async def healthz(call: Call) -> web.Response:
    return await health.healthz(call.request, call.gateway, call.request_id)


async def readyz(call: Call) -> web.Response:
    return await health.readiness(call.gateway, call.request_id, detail=True)


async def list_sessions(call: Call) -> web.Response:
    sessions = _sessions(call.gateway)
    user = _query_user(call.request.raw_path)
    if sessions is None:
        found: list[Session] = []
    elif user is None:
        found = await sessions.listing()
    else:
        found = await _of_user(sessions, user)
        call.facts["subject"] = user
    shown = [_public(s) for s in found if _current(call.gateway, s)]
    call.facts["count"] = len(shown)
    return json_response({"sessions": shown}, call.request_id)


async def end_session(call: Call) -> web.Response:
    handle = call.params[0]
    sessions = _sessions(call.gateway)
    call.facts["subject"] = handle[:64]
    session = await sessions.find(handle) if sessions and _HANDLE.fullmatch(handle) else None
    if sessions is None or session is None:
        raise NotFound("no session has this handle", reason="unknown-session")
    await sessions.end(session.key, _REVOKED, actor=call.token.name)
    call.facts["user"] = session.user
    return json_response({"handle": session.handle, "user": session.user}, call.request_id)


async def revoke_user(call: Call) -> web.Response:
    user = call.params[0]
    sessions = _sessions(call.gateway)
    call.facts["subject"] = user
    ended = await _end_all(sessions, user, call.token.name) if sessions is not None else 0
    call.facts["count"] = ended
    return json_response({"user": user, "revoked": ended}, call.request_id)


async def reload(call: Call) -> web.Response:
    prepared = await call.gateway.reload(actor=call.token.name)
    if call.admin is not None:
        await call.admin.reload_tokens()  # TokensFileError: a 500 here, the old tokens stay
    runtime = call.gateway.runtime
    call.facts["policy_hash"] = runtime.policies.hash
    payload: dict[str, object] = {
        "reloaded": prepared.ok,
        "policy_hash": runtime.policies.hash,
        "errors": list(prepared.errors),
        "gained": [{"user": c.user, "route": c.route} for c in prepared.gained],
        "lost": [{"user": c.user, "route": c.route} for c in prepared.lost],
    }
    replicas = call.gateway.replicas
    if replicas is not None:  # every other worker (and replica) reloads its own file too
        await replicas.reloaded()
        if prepared.ok:
            await replicas.announce(call.token.name)
        payload["workers"] = await replicas.converged(runtime.policies.hash, _FANOUT_WAIT)
    return json_response(payload, call.request_id, status=200 if prepared.ok else 422)


async def metrics(call: Call) -> web.Response:
    """Prometheus text format, every worker's values added up (gateway.metrics)."""
    body, content_type = await exposition(call.gateway.metrics, _sessions(call.gateway))
    headers = {"Content-Type": content_type, "X-Request-Id": call.request_id}
    return web.Response(body=body, headers={**headers, "Cache-Control": "no-store"})


async def enroll_link(call: Call) -> web.Response:
    """A single-use MFA enrollment link for USER, valid 24 h (SPEC §6 `invite`)."""
    auth = _auth(call.gateway)
    user = call.params[0]
    call.facts["subject"] = user
    await _one_identity(auth, user)
    token, expires = await auth.mfa.issue_link(user, call.token.name)
    # The token goes to the admin who asked, never into the log or the call's event.
    link = f"{auth.public_url}/.gateway/mfa/enroll?link={token}"
    payload = {"user": user, "link": link, "expires": _time(expires)}
    return json_response(payload, call.request_id)


async def reset_mfa(call: Call) -> web.Response:
    """Remove USER's second factor (and its lock); they enroll again through a new link."""
    auth = _auth(call.gateway)
    user = call.params[0]
    call.facts["subject"] = user
    identity = await _one_identity(auth, user)
    if identity is None:
        raise NotFound(f"{user!r} has no second factor", reason="unknown-user")
    removed = await auth.mfa.reset(identity[0], identity[1], call.token.name)
    call.facts["removed"] = removed
    return json_response(
        {"user": identity[1], "identity": identity[0], "removed": removed}, call.request_id
    )


async def show_user(call: Call) -> web.Response:
    """What the gateway knows of USER: the directory entry, MFA state, live sessions."""
    auth = _auth(call.gateway)
    entry = await auth.directory.resolve(call.params[0])
    call.facts["subject"] = entry.identity
    factor = await auth.mfa.factor(entry.identity)
    live = [s for s in await auth.sessions.of_identity(entry.identity) if _current(call.gateway, s)]
    payload = {
        "identity": entry.identity,
        "user": entry.user,
        "email": entry.email,
        "groups": list(entry.groups),
        "first_login": _time(entry.first_login),
        "last_login": _time(entry.last_login),
        "logins": entry.logins,
        "last_ip": entry.last_ip,
        "networks": {net: _time(at) for net, at in entry.networks.items()},
        "last_access": {route: _time(at) for route, at in sorted(entry.last_access.items())},
        "groups_history": [{"at": _time(at), "groups": list(g)} for at, g in entry.groups_history],
        "disabled": _disabled(entry.disabled),
        "mfa": {
            "enrolled": factor is not None,
            "locked": factor is not None and factor.locked is not None,
            "recovery_codes_left": len(factor.recovery) if factor is not None else 0,
        },
        "sessions": [_public(s) for s in live],
    }
    return json_response(payload, call.request_id)


async def disable_user(call: Call) -> web.Response:
    """Disable USER: every session ends on every process now; logins refused until enabled."""
    auth = _auth(call.gateway)
    entry = await auth.directory.resolve(call.params[0])
    reason = (await _body(call)).get("reason", "")
    call.facts |= {"subject": entry.identity, "user": entry.user}
    ended = await _disable(call, auth, entry, str(reason))
    payload = {"user": entry.user, "identity": entry.identity, "disabled": True, "ended": ended}
    return json_response(payload, call.request_id)


async def _disable(call: Call, auth: Auth, entry: Entry, reason: str) -> int:
    """Disable the entry's identity and end its sessions everywhere; how many ended."""
    await auth.directory.disable(entry.identity, call.token.name, reason[:500])
    iss, _, sub = entry.identity.partition("|")
    ended = await auth.sessions.end_user(iss, sub, "user-disabled", call.token.name)
    call.facts["count"] = ended
    return ended


async def attest_review(call: Call) -> web.Response:
    """An access review's decision on USER (CSF 01.e): kept, or revoked (USER disabled)."""
    auth = _auth(call.gateway)
    asked = Asked.parse(await _body(call))
    entry = await auth.directory.resolve(asked.user)
    call.facts |= {"subject": entry.identity, "user": entry.user, "decision": asked.decision}
    policies = call.gateway.runtime.policies
    attestation = await auth.reviews.attest(entry, call.token.name, asked, policies)
    payload = {**attestation.public(), "at": _time(attestation.at), "disabled": False}
    if asked.decision == "revoke":
        reason = f"access review by {call.token.name}" + (f": {asked.note}" if asked.note else "")
        payload |= {"disabled": True, "ended": await _disable(call, auth, entry, reason)}
    return json_response(payload, call.request_id)


async def enable_user(call: Call) -> web.Response:
    auth = _auth(call.gateway)
    entry = await auth.directory.resolve(call.params[0])
    call.facts |= {"subject": entry.identity, "user": entry.user}
    await auth.directory.enable(entry.identity, call.token.name)
    payload = {"user": entry.user, "identity": entry.identity, "disabled": False}
    return json_response(payload, call.request_id)


async def open_break_glass(call: Call) -> web.Response:
    """Open break-glass for `{"duration": "30m", "reason": "..."}` even while the IdP answers."""
    glass = _break_glass(call.gateway)
    body = await _body(call)
    duration = open_duration(body.get("duration"))
    until = await glass.open(call.token.name, duration, str(body.get("reason", ""))[:500])
    call.facts |= {"duration": duration, "until": _time(until)}
    return json_response({"open": True, "until": _time(until)}, call.request_id)


async def close_break_glass(call: Call) -> web.Response:
    """End an operator's opening (an unreachable IdP still opens break-glass)."""
    was_open = await _break_glass(call.gateway).close(call.token.name)
    call.facts["was_open"] = was_open
    return json_response({"open": False, "was_open": was_open}, call.request_id)


def _break_glass(gateway: GatewayState) -> BreakGlass:
    glass = _auth(gateway).break_glass
    if glass is None:
        raise NotFound(
            "break-glass is not configured (break_glass.accounts_file)", reason="no-endpoint"
        )
    return glass


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", ("healthz",), "read", "healthz", healthz),
    Endpoint("GET", ("readyz",), "read", "readyz", readyz),
    Endpoint("GET", ("metrics",), "read", "metrics_scraped", metrics),
    Endpoint("GET", ("sessions",), "read", "sessions_listed", list_sessions),
    Endpoint("DELETE", ("sessions", None), "operate", "session_ended", end_session),
    Endpoint("POST", ("users", None, "revoke"), "operate", "user_revoked", revoke_user),
    Endpoint("POST", ("reload",), "operate", "reloaded", reload),
    Endpoint("GET", ("users", None), "read", "user_shown", show_user),
    Endpoint("POST", ("users", None, "disable"), "operate", "user_disabled", disable_user),
    Endpoint("POST", ("users", None, "enable"), "operate", "user_enabled", enable_user),
    Endpoint("POST", ("users", None, "enroll-link"), "admin", "enroll_link_issued", enroll_link),
    Endpoint("POST", ("users", None, "reset-mfa"), "admin", "mfa_reset", reset_mfa),
    Endpoint("POST", ("break-glass", "open"), "operate", "break_glass_opened", open_break_glass),
    Endpoint("POST", ("break-glass", "close"), "operate", "break_glass_closed", close_break_glass),
    Endpoint("POST", ("reviews",), "operate", "review_attested", attest_review),
)


def _sessions(gateway: GatewayState) -> Sessions | None:
    """The gateway's sessions; None when every route is public (so there are none)."""
    return gateway.auth.sessions if gateway.auth is not None else None


def _auth(gateway: GatewayState) -> Auth:
    if gateway.auth is None:
        raise NotFound("this gateway has no protected routes, so no users", reason="no-endpoint")
    return gateway.auth


async def _one_identity(auth: Auth, user: str) -> tuple[str, str] | None:
    """(iss|sub, user) of the one enrolled identity USER names; None if none is enrolled;
    Conflict if several identities are known by that name."""
    if _is_identity(user):
        factor = await auth.mfa.factor(user)
        return (user, factor.user) if factor is not None else None
    factors = await auth.mfa.factors_named(user)
    known = {f.identity for f in factors} | await auth.sessions.identities_named(user)
    if len(known) > 1:
        # SECURITY: never guess which person an operator meant.
        names = ", ".join(sorted(known))
        raise Conflict(f"{user!r} names {len(known)} identities ({names}); give one as ISS|SUB")
    return (factors[0].identity, factors[0].user) if factors else None


def _disabled(flag: dict[str, object] | None) -> dict[str, object] | None:
    if flag is None:
        return None
    at = flag.get("at")
    return {**flag, "at": _time(at) if isinstance(at, int | float) else None}


async def _body(call: Call) -> dict[str, object]:
    """An optional JSON object body (`{"reason": "..."}`); BadRequest for anything else."""
    raw = await call.request.read()
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body must be a JSON object", reason="bad-body") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", reason="bad-body")
    return body


def _query_user(raw_path: str) -> str | None:
    query = raw_path.partition("?")[2]
    try:
        values = parse_qs(query, errors="strict").get("user")
    except UnicodeDecodeError:
        raise BadRequest("the query is not valid UTF-8", reason="bad-query") from None
    if values is not None and len(values) > 1:
        raise BadRequest("give ?user= once", reason="bad-query")
    return values[0] if values else None


def _is_identity(user: str) -> bool:
    """`ISS|SUB`: an http(s) issuer before the first '|' (an issuer URL never holds one)."""
    issuer, bar, sub = user.partition("|")
    return bool(bar and sub) and issuer.startswith(("https://", "http://"))


async def _of_user(sessions: Sessions, user: str) -> list[Session]:
    """The sessions of USER; Conflict when the name belongs to several identities with sessions."""
    if _is_identity(user):
        return await sessions.of_identity(user)
    found = {i: await sessions.of_identity(i) for i in await sessions.identities_named(user)}
    live = {identity: listed for identity, listed in found.items() if listed}
    if len(live) > 1:
        # SECURITY: never guess which person an operator meant; ending the wrong one is worse.
        names = ", ".join(sorted(live))
        raise Conflict(f"{user!r} names {len(live)} identities ({names}); give one as ISS|SUB")
    return next(iter(live.values()), [])


async def _end_all(sessions: Sessions, user: str, actor: str) -> int:
    """End every session of USER everywhere; how many were still there to end."""
    found = await _of_user(sessions, user)
    return sum([await sessions.end(s.key, _REVOKED, actor=actor) for s in found])


def _current(gateway: GatewayState, session: Session) -> bool:
    """Within its global limits (a session past them is ended at its next request)."""
    assert gateway.auth is not None
    now, limits = gateway.auth.clock(), gateway.auth.sessions.limits
    return now < session.expires(limits) and now < session.last_active + limits.idle_timeout


def _public(session: Session) -> dict[str, object]:
    """What a listing shows: never the session id, its store key or a token."""
    return {
        "handle": session.handle,
        "user": session.user,
        "iss": session.iss,
        "sub": session.sub,
        "created": _time(session.created),
        "last_active": _time(session.last_active),
    }


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the listener ------------------------------------------------------------------------------


class AdminApi:
    def __init__(self, admin: Admin, tokens: tuple[AdminToken, ...]) -> None:
        self.addresses: tuple[str, ...] = ()
        self._admin = admin
        self._tokens = tokens  # replaced whole by reload_tokens, never edited
        self._request_ids = RequestIds()
        self._gateway: GatewayState | None = None
        self._runner: web.ServerRunner | None = None

    @classmethod
    async def open(cls, settings: Settings) -> AdminApi | None:
        """The admin API of a config (tokens read now), or None without an `admin:` section."""
        if settings.admin is None:
            return None
        tokens = await asyncio.to_thread(read_tokens, settings.admin.tokens_file)
        if not tokens:
            log.warning("admin.tokens_file holds no tokens: every admin call will be refused")
        return cls(settings.admin, tokens)

    async def reload_tokens(self) -> int:
        """Re-read the tokens file; on TokensFileError the tokens in use stay. The new count."""
        tokens = await asyncio.to_thread(read_tokens, self._admin.tokens_file)
        self._tokens = tokens
        emit(Event("admin.tokens_reloaded", {"tokens": len(tokens)}))
        return len(tokens)

    async def start(
        self,
        gateway: GatewayState,
        shutdown_timeout: float = 10.0,
        port: int | None = None,  # a worker's: the port its parent reserved (gateway.supervisor)
        reuse_port: bool = False,
    ) -> None:
        self._gateway = gateway
        runner = web.ServerRunner(
            web.Server(self.handle, access_log=None),
            handle_signals=False,
            shutdown_timeout=shutdown_timeout,
        )
        await runner.setup()
        listen = self._admin.listen
        site = web.TCPSite(
            runner,
            listen.host,
            port or listen.port,
            ssl_context=admin_tls(self._admin.tls),
            reuse_port=reuse_port,
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.addresses = _bound(site)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        request_id = self._request_ids.assign(request.headers.get("X-Request-Id"))
        resolved = resolve(request.method, request.raw_path)
        call: Call | None = None
        token: AdminToken | None = None
        try:
            # SECURITY: the token is checked first, so unknown callers learn nothing, not even
            # which paths exist.
            token = authenticate(self._tokens, request.headers.getall("Authorization", []))
            if resolved.error is not None:
                raise resolved.error
            assert resolved.endpoint is not None and self._gateway is not None
            authorize(token, resolved.endpoint)
            call = Call(request, self._gateway, request_id, token, resolved.params, admin=self)
            response = await resolved.endpoint.handler(call)
            error = None
        except GatewayError as refused:
            response, error = _error_response(refused, request_id), refused
        except Exception:
            log.exception("admin call failed", extra={"request_id": request_id})
            error = GatewayError("internal error")
            response = _error_response(error, request_id)
        _record(request, resolved, token, response, error, call, request_id)
        return response


def _error_response(error: GatewayError, request_id: str) -> web.Response:
    payload = {
        "status": error.status,
        "reason": error.reason,
        "detail": error.detail,
        "request_id": request_id,
    }
    response = json_response(payload, request_id, status=error.status)
    if error.status == 401:
        challenge = 'Bearer realm="gateway-admin"'
        if error.reason == "bad-token":
            challenge += ', error="invalid_token"'
        response.headers["WWW-Authenticate"] = challenge
    return response


def _record(
    request: web.BaseRequest,
    resolved: Resolved,
    token: AdminToken | None,
    response: web.StreamResponse,
    error: GatewayError | None,
    call: Call | None,
    request_id: str,
) -> None:
    """The call's event: admin.<action>, with the token's name as actor, whatever the outcome."""
    action = resolved.endpoint.action if resolved.endpoint is not None else "request"
    fields: dict[str, object] = {
        "actor": token.name if token is not None else "anonymous",
        "role": token.role if token is not None else None,
        "method": request.method,
        "path": request.raw_path[:_PATH_SHOWN],
        "status": response.status,
        "outcome": _outcome(response.status),
        "request_id": request_id,
        "client_ip": request.remote,
    }
    if error is not None:
        fields["reason"] = error.reason
    if call is not None:
        fields.update(call.facts)
    emit(Event(f"admin.{action}", fields))


def _outcome(status: int) -> str:
    if status in (401, 403):
        return "refused"
    return "ok" if status < 400 else "failed"


def admin_tls(tls: AdminTls | None) -> ssl.SSLContext | None:
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        # SECURITY: with a client CA configured, a connection without a certificate it issued
        # ends in the handshake, before any token is even read.
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _bound(site: web.TCPSite) -> tuple[str, ...]:
    server = site._server  # the asyncio.Server: its sockets give the real port (for port 0)
    names = [s.getsockname() for s in getattr(server, "sockets", None) or []]
    return tuple(f"[{n[0]}]:{n[1]}" if ":" in n[0] else f"{n[0]}:{n[1]}" for n in names)
