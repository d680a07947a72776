"""What each admin API call does (SPEC §11): the handlers and the table of endpoints.

    ENDPOINTS                       (method, path pattern, role, event action, handler)
    Call                            one authorized call as a handler sees it; `facts` go into
                                    the call's `admin.<action>` event

The listener (gateway.admin) authenticates the token, resolves the endpoint, checks the
role, then runs the handler. USER in a path or `?user=` is the user_claim value (any ASCII
case) or `ISS|SUB`; a value naming two identities is refused (409).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from gateway.auth import Auth
from gateway.breakglass import BreakGlass, open_duration
from gateway.directory import Entry
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.handlers import health
from gateway.metrics import exposition
from gateway.pages import json_response
from gateway.reviews import Asked
from gateway.sessions import Session, Sessions
from gateway.types import GatewayState

if TYPE_CHECKING:
    from gateway.admin import AdminApi, AdminToken

Role = Literal["read", "operate", "admin"]
_HANDLE = re.compile(r"[0-9a-f]{1,64}")
_REVOKED = "admin-revoked"  # the reason recorded when an admin call ends a session
_FANOUT_WAIT = 3.0  # seconds POST /reload waits for every worker to show the new policy hash


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
        found = await _of_user(call.gateway, sessions, user)
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
    ended = 0
    if sessions is not None:
        ended = await _end_all(call.gateway, sessions, user, call.token.name)
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
    seen = await auth.directory.named(user)  # everyone who ever signed in with that name
    known = {f.identity for f in factors} | seen
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


async def _of_user(gateway: GatewayState, sessions: Sessions, user: str) -> list[Session]:
    """The sessions of USER; Conflict when the name belongs to several identities with sessions.
    Names resolve through the directory (every identity that signed in with that name)."""
    if _is_identity(user):
        return await sessions.of_identity(user)
    named = await _auth(gateway).directory.named(user)
    found = {i: await sessions.of_identity(i) for i in named}
    live = {identity: listed for identity, listed in found.items() if listed}
    if len(live) > 1:
        # SECURITY: never guess which person an operator meant; ending the wrong one is worse.
        names = ", ".join(sorted(live))
        raise Conflict(f"{user!r} names {len(live)} identities ({names}); give one as ISS|SUB")
    return next(iter(live.values()), [])


async def _end_all(gateway: GatewayState, sessions: Sessions, user: str, actor: str) -> int:
    """End every session of USER everywhere; how many were still there to end."""
    found = await _of_user(gateway, sessions, user)
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
