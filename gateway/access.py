"""Stages 5 and 6 for one protected request: who asks, may they, and what the upstream is told.

    admit(auth, policy, request, route, ask) -> Admission
        identify      caller.identify: a session cookie or a bearer token (else Unauthorized)
        evaluate      policy.evaluate(facts, route policy) -> Decision (default deny)
        activity      an allowed request outside idle_ignore_paths counts (touch)
        identity      X-Auth-Request-User/-Email/-Groups and X-Gateway-Assertion (SPEC §7)
    refusal(admission, policy, ask) -> Denied (403), Reauthenticate (auth-too-old: log in
                      again with max_age) or StepUp (mfa-required in a session: the MFA
                      page); the caller records the decision first (audit)

Proxy mode (gateway.app) and forward-auth (/.gateway/auth) both go through `admit`, so the
two can never decide differently. `Ask` is what is being asked for: in proxy mode the
request itself; in forward-auth mode the request nginx or Traefik describes.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from aiohttp import web

from gateway.auth import Auth
from gateway.caller import Caller, identify, stream_guard
from gateway.errors import Denied, GatewayError, Unauthorized
from gateway.events import Event, emit
from gateway.globs import GlobSet
from gateway.policy import Decision, Facts, RoutePolicy, evaluate
from gateway.proxy import Guard
from gateway.settings import Route

log = logging.getLogger("gateway.access")


class Ask(NamedTuple):  # per request: built 3x faster than a frozen dataclass
    """The request a decision is about."""

    method: str
    host: str
    path: str  # canonical, decoded (paths.Target.match)
    client_ip: str  # the client address trusted_proxies resolved
    request_id: str
    query: str = ""  # never matched; the audit log keeps a keyed HMAC of it


class Admission(NamedTuple):  # per request: built 3x faster than a frozen dataclass
    caller: Caller
    decision: Decision  # not allowed: see refusal(); would_deny in report mode
    mfa: bool  # the caller has a second factor
    identity: tuple[tuple[str, str], ...] = ()  # headers for the upstream (when allowed)
    guard: Guard | None = None  # closes a WebSocket when the session ends


class StepUp(Unauthorized):
    """The route needs a second factor this session has not shown: the MFA page (SPEC §6)."""

    reason = "mfa-required"

    def __init__(self) -> None:
        super().__init__("this page needs a second factor")


class Reauthenticate(Unauthorized):
    """The IdP's login is older than the route's max_auth_age: log in again (SPEC §3)."""

    reason = "auth-too-old"

    def __init__(self, max_age: float) -> None:
        super().__init__("this page needs a recent sign-in; sign in again")
        self.max_age = max_age


async def admit(
    auth: Auth,
    policy: RoutePolicy,
    idle_ignore: GlobSet,
    request: web.BaseRequest,
    route: Route,
    ask: Ask,
) -> Admission:
    caller = await identify(auth, request, route, ask.client_ip)
    known = facts(auth, caller, ask)
    decision = evaluate(known, policy)
    if not decision.allowed:
        return Admission(caller, decision, known.mfa)
    if decision.would_deny:
        _log_decision("access.would_deny", caller, decision, ask)
    session = caller.session
    guard = None
    if session is not None:
        if auth.sessions.touch_due(session) and not idle_ignore.matches(ask.path):
            await auth.sessions.touch(session)
        auth.directory.accessed(session.identity, route.id)  # in memory; flushed now and then
        guard = stream_guard(auth, session, route)
    identity = identity_headers(auth, caller, route.id)
    return Admission(caller, decision, known.mfa, identity, guard)


def challenge(error: Unauthorized) -> str:
    """WWW-Authenticate for a client that cannot follow a login redirect (RFC 6750, RFC 9470)."""
    value = 'Bearer realm="access-gateway"'
    if error.reason == "bad-token":
        value += ', error="invalid_token"'
    elif isinstance(error, Reauthenticate):
        value += f', error="insufficient_user_authentication", max_age={int(error.max_age)}'
    elif isinstance(error, StepUp):
        value += ', error="insufficient_user_authentication", acr_values="mfa"'
    return value


def passes_preflight(method: str, headers: Mapping[str, str], route: Route) -> bool:
    """A CORS preflight on a route that passes them (SPEC §4.4): no credentials, no policy."""
    if route.cors_preflight != "pass" or method != "OPTIONS":
        return False
    # SECURITY: only a true preflight: anything carrying credentials goes through the policy.
    return (
        "Access-Control-Request-Method" in headers
        and "Cookie" not in headers
        and "Authorization" not in headers
    )


def facts(auth: Auth, caller: Caller, ask: Ask) -> Facts:
    return Facts(
        user=caller.user,
        email=caller.email,
        email_verified=caller.email_verified,
        groups=caller.groups,
        client=caller.client,
        mfa=caller.stepped_up or not auth.mfa_amr.isdisjoint(caller.amr),
        auth_time=caller.auth_time,
        method=ask.method,
        path=ask.path,
        source_ip=_ip(ask.client_ip),
        now=auth.clock(),
    )


def plugin_facts(route_id: str, ask: Ask, caller: Caller, mfa: bool) -> dict[str, Any]:
    """What a policy-check plugin's `check(facts)` receives (docs/plugins.md): a new dict."""
    return {
        "route": route_id,
        "method": ask.method,
        "host": ask.host,
        "path": ask.path,
        "client_ip": ask.client_ip,
        "user": caller.user,
        "sub": caller.sub,
        "email": caller.email,
        "groups": list(caller.groups),
        "client": caller.client,
        "mfa": mfa,
    }


def refusal(admission: Admission, policy: RoutePolicy, ask: Ask) -> GatewayError:
    """What a caller the policy refused gets: a 403, or a new login for auth-too-old."""
    caller, decision = admission.caller, admission.decision
    _log_decision("access.denied", caller, decision, ask)
    max_age = policy.max_auth_age
    # A browser can log in again at the IdP; a bearer token cannot, so it is simply denied.
    if decision.reason == "auth-too-old" and max_age is not None and caller.session is not None:
        return Reauthenticate(max_age)
    if decision.reason == "mfa-required" and caller.session is not None:
        return StepUp()
    detail = {
        "mfa-required": "this page needs a second factor, which this sign-in did not include",
        "auth-too-old": "this page needs a recent sign-in",
    }.get(decision.reason, "you do not have access to this page")
    # SECURITY: the reason code and the request only; never the rules (what would pass).
    asked = f"{ask.method} {ask.host}{ask.path}"
    return Denied(detail, reason=decision.reason, user=caller.user, asked=asked)


def _log_decision(name: str, caller: Caller, decision: Decision, ask: Ask) -> None:
    fields = {
        "user": caller.user,
        "sub": caller.sub,
        "session": caller.session.handle if caller.session else None,
        "client": caller.client,
        "method": ask.method,
        "host": ask.host,
        "path": ask.path,
        "client_ip": ask.client_ip,
        "reason": decision.reason,
        "policy_hash": decision.policy_hash,
        "request_id": ask.request_id,
    }
    emit(Event(name, fields), audit=False)  # the process log: the audit log has the access record


@functools.lru_cache(maxsize=4096)
@functools.lru_cache(maxsize=4096)  # parsing costs ~1 µs; clients repeat, the bound holds
def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None  # a unix-socket peer: no source_ips rule can hold


# -- identity sent upstream (SPEC §7) ----------------------------------------------------------


def identity_headers(auth: Auth, caller: Caller, route_id: str) -> tuple[tuple[str, str], ...]:
    session = caller.session
    assertion = auth.assertions.issue(
        session_key=session.key if session else None,
        route_id=route_id,
        version=session.version if session else 0,
        sub=caller.sub,
        user=caller.user,
        email=caller.email,
        groups=caller.groups,
        amr=caller.amr,
    )
    # The assertion names every claim the headers carry, so while it is reused they are too.
    headers = _HEADERS.get(assertion)
    if headers is None:
        if len(_HEADERS) >= _HEADERS_MAX:
            _HEADERS.clear()
        headers = _HEADERS[assertion] = _identity(caller, assertion)
    return headers


def _identity(caller: Caller, assertion: str) -> tuple[tuple[str, str], ...]:
    headers = [("X-Auth-Request-User", header_value(caller.user))]
    if caller.email:
        headers.append(("X-Auth-Request-Email", header_value(caller.email)))
    headers.append(("X-Auth-Request-Groups", ",".join(header_value(g) for g in caller.groups)))
    headers.append(("X-Gateway-Assertion", assertion))
    return tuple(headers)


_HEADERS: dict[str, tuple[tuple[str, str], ...]] = {}  # assertion -> the identity headers
_HEADERS_MAX = 10_000


_UNSAFE = re.compile(r"[^\x20-\x24\x26-\x2b\x2d-\x7e]")  # printable ASCII but '%' and ','


def header_value(text: str) -> str:
    """`text` for a header value: '%', ',' and anything not printable ASCII percent-encoded."""
    # SECURITY: a claim with CR/LF must not add headers; a group with ',' must not become two.
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m[0].encode()), text)
