"""The gateway: its state, and the pipeline every request goes through, in order.

    1 request id     X-Request-Id in (if well-formed), on every response
    2 host + path    a served Host (421), the canonical path from the raw target (400)
    3 own endpoints  /.gateway/* answered here, before routing, on every served host
    4 route          host + longest path prefix -> Route, or 404
    5 caller         session cookie or bearer token (caller.identify); none: login or 401
                     (a CORS preflight skips 5-6 on routes with cors_preflight: pass)
    6 authorize      policy.evaluate(facts, route) -> Decision, default deny (access.admit);
                     denied: 403; auth-too-old: login again with max_age
    7 audit          the decision record (audit.recorder); on disk before forwarding for
                     sync methods and phi routes; refusals of unidentified clients folded
                     into per-minute summaries beyond a rate
    8 forward        proxy.forward: streaming, WebSockets, X-Forwarded-*, identity (§7)
    9 done           access.done: status, bytes, duration; counted (gateway.metrics)
    errors anywhere: GatewayError -> a page or JSON with status, reason and request id

`Gateway.handle` is served by aiohttp's low-level `web.Server`: no URL
dispatcher, no middleware chain, no per-request Application machinery. The
pipeline below is the only router, and bench/ measured the difference
(about 5% of the CPU per proxied request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import web

from gateway import events
from gateway.access import (
    Admission,
    Ask,
    Reauthenticate,
    StepUp,
    admit,
    challenge,
    passes_preflight,
    plugin_facts,
    refusal,
)
from gateway.audit.files import FileLayer
from gateway.audit.recorder import ANONYMOUS, Recorder, Who, open_recorder
from gateway.audit.writer import AuditUnavailable
from gateway.auth import Auth
from gateway.errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)
from gateway.handlers import (
    backchannel,
    break_glass,
    callback,
    forwardauth,
    handoff,
    health,
    jwks,
    login,
    logout,
    mfa,
    sessions,
)
from gateway.metrics import Metrics
from gateway.pages import error_response, redirect, wants_html
from gateway.paths import Target
from gateway.plugins import Plugins, load_plugins
from gateway.policy import Decision, Identity
from gateway.proxy import Forward, Proxy
from gateway.ratelimit import RateLimiter
from gateway.reload import Prepared, announce, prepare
from gateway.replicas import Replicas
from gateway.requestid import RequestIds
from gateway.routing import locate
from gateway.runtime import Runtime
from gateway.sessions import Clock
from gateway.settings import RateLimits, Route, Settings
from gateway.types import Endpoint

log = logging.getLogger("gateway.app")

GET, GET_POST, POST = (
    frozenset({"GET", "HEAD"}),
    frozenset({"GET", "HEAD", "POST"}),
    frozenset({"POST"}),
)
ENDPOINTS: dict[str, tuple[frozenset[str], Endpoint]] = {
    "/.gateway/healthz": (GET, health.healthz),
    "/.gateway/readyz": (GET, health.readyz),
    "/.gateway/login": (GET, login.login),
    "/.gateway/callback": (GET, callback.callback),
    "/.gateway/handoff": (GET, handoff.handoff),
    "/.gateway/logout": (GET_POST, logout.logout),
    "/.gateway/backchannel-logout": (POST, backchannel.backchannel_logout),
    "/.gateway/sessions": (GET_POST, sessions.my_sessions),
    "/.gateway/mfa": (GET_POST, mfa.mfa),
    "/.gateway/mfa/enroll": (GET_POST, mfa.enroll),
    "/.gateway/jwks.json": (GET, jwks.jwks),
    "/.gateway/auth": (GET, forwardauth.forward_auth),
    "/.gateway/break-glass": (GET_POST, break_glass.break_glass),
}
# Endpoints an attacker would hammer (SPEC §12): rate_limits names their buckets.
LIMITED = {
    "/.gateway/login": "login",
    "/.gateway/callback": "callback",
    "/.gateway/backchannel-logout": "backchannel_logout",
    "/.gateway/mfa": "mfa",
    "/.gateway/mfa/enroll": "mfa",
    "/.gateway/break-glass": "break_glass",
}


class Gateway:
    def __init__(
        self,
        settings: Settings,
        clock: Clock = time.time,
        audit_files: FileLayer | None = None,
        worker: int = 0,  # of server.workers: names the audit chain (origin_for)
    ) -> None:
        self.runtime = Runtime.build(settings)  # replaced whole by a reload, never edited
        self.draining = False  # set when shutdown begins: readyz turns 503
        self.auth: Auth | None = None  # login, sessions, the IdP: only with protected routes
        self.audit: Recorder | None = None  # the audit log (opened by start)
        self.plugins = Plugins()  # loaded by start (SPEC §9)
        self.metrics = Metrics()  # this process's share of GET /metrics
        self.replicas: Replicas | None = None  # the processes sharing the store (server.listen)
        self._worker = worker
        self._ticker: asyncio.Task[None] | None = None
        self._settings = settings
        self._clock = clock  # injectable: tests move time instead of waiting for it
        self._audit_files = audit_files  # injectable: tests fail writes and watch fsyncs
        self._proxy = Proxy(scheme="https" if settings.server.tls else "http")
        self._request_ids = RequestIds()
        self._limiters = _limiters(settings.rate_limits)
        self._reloading = asyncio.Lock()

    async def start(self) -> None:
        self.plugins = await asyncio.to_thread(load_plugins, self._settings.plugins)
        await self.plugins.start()  # before the log: sinks anchor it from its first line
        try:
            self.audit = await open_recorder(
                self._settings, self._clock, self._audit_files, self.plugins, self._worker
            )
        except BaseException:
            await self.plugins.close()
            raise
        events.add_sink(self.audit.event)  # every security event is a record too
        events.add_sink(self._alerts)  # alert.* events to the plugins' on_alert hook
        events.add_sink(self.metrics.event)  # logins, MFA failures, alerts counted
        self.metrics.start(self.audit, self.plugins)
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="audit:tick")
        try:
            self.auth = await Auth.open(self._settings, clock=self._clock)
            if self.auth is not None:
                self.auth.monitor.policies = self.runtime.policies
                self._proxy = Proxy(self._proxy.scheme, self.auth.cookies)
            await self._proxy.start()
        except BaseException:
            await self.close()  # a bad key file must not leave the audit writer running
            raise

    def _alerts(self, event: events.Event) -> None:
        if event.type.startswith("alert."):
            self.plugins.on_alert({**event.fields, "type": event.type, "ts": event.ts})

    async def _tick(self) -> None:
        while True:  # a quiet minute after a flood still gets its access.summary
            await asyncio.sleep(_TICK)
            if self.audit is not None:
                self.audit.tick()

    async def reload(self, actor: str = "signal") -> Prepared:
        """Re-read the config file; apply it if valid (routes, policies: see gateway.reload)."""
        async with self._reloading:  # two reloads at once would diff against a stale table
            before = self.runtime
            identities = await self._identities()
            prepared = await prepare(before, identities)
            if prepared.runtime is not None:
                self.apply(prepared.runtime)
            announce(before, prepared, actor)
            if self.auth is not None and prepared.runtime is not None:
                gained = [(c.user, c.route) for c in prepared.gained]
                self.auth.monitor.reload(gained, prepared.runtime.policies.hash)
            return prepared

    def apply(self, runtime: Runtime) -> None:
        """Swap in a new Runtime: one assignment, so each request sees one config or the other."""
        if runtime.settings.rate_limits != self.runtime.settings.rate_limits:
            self._limiters = _limiters(runtime.settings.rate_limits)
        if self.auth is not None:
            self.auth.settings = runtime.settings  # login's rd checks follow the route hosts
            self.auth.monitor.alerts = runtime.settings.alerts
            self.auth.monitor.policies = runtime.policies
        self.runtime = runtime

    async def _identities(self) -> list[Identity]:
        """The identities with live sessions: whose access a reload changes."""
        if self.auth is None:
            return []
        latest = {s.identity: s for s in await self.auth.sessions.listing()}
        return [
            Identity(s.user, s.email, s.email_verified, s.groups, None) for s in latest.values()
        ]

    async def close(self) -> None:
        self.draining = True
        await self._proxy.close()
        if self.auth is not None:
            await self.auth.close()
        if self._ticker is not None:
            self._ticker.cancel()
        events.remove_sink(self._alerts)
        events.remove_sink(self.metrics.event)
        await self.metrics.close()
        if self.audit is not None:  # last: closing the rest may still emit events
            events.remove_sink(self.audit.event)
            self.audit.flush()
            await self.audit.writer.close()
        await self.plugins.close()  # after the writer: its last lines reach the sinks

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        request_id = self._request_ids.assign(request.headers.get("X-Request-Id"))
        runtime = self.runtime  # read once: a reload never mixes two configs in one request
        started = time.monotonic()
        host: str | None = None
        target: Target | None = None
        client_ip = request.remote or ""
        logged = False  # the access record is written: access.done follows, whatever happens
        anonymous = True
        reason = "-"
        route_id, decision = "none", "none"  # the request's labels in gateway_requests_total
        try:
            host, target = locate(
                request.raw_path, request.headers.getall("Host", []), runtime.routes
            )
            if target.match.startswith("/.gateway/"):
                route_id = "gateway"
                response = await self._own_endpoint(request, target.match, request_id, runtime)
                self.metrics.served(route_id, decision, response.status, reason, started)
                return response
            route = runtime.routes.match(host, target.match)
            if route is None:
                raise NotFound("no route serves this address")
            route_id = route.id
            addresses = runtime.trusted.resolve(
                request.remote or "", request.headers.getall("X-Forwarded-For", [])
            )
            client_ip = addresses.client
            ask = Ask(request.method, host, target.match, client_ip, request_id, target.query)
            upstream = runtime.upstreams[route.id]
            if route.public or passes_preflight(request.method, request.headers, route):
                written = self._record(
                    request, route, ask, "allow", "public", ANONYMOUS, None, runtime
                )
                logged, decision = True, "allow"
                await _on_disk(written)  # a public POST waits for its record too, or fails open
                forward = Forward(upstream, target, host, addresses, request_id)
            else:
                a, written = await self._decide(request, route, ask, runtime)
                logged, anonymous = True, False
                decision = _label(a.decision)
                if not a.decision.allowed:
                    raise refusal(a, runtime.policies[route.id], ask)
                if written is not None or not self._audit_ok():  # the rare cases
                    await self._durable(written, runtime)
                forward = Forward(
                    upstream, target, host, addresses, request_id, a.guard, a.identity
                )
            response = await self._proxy.forward(request, forward)
        except Unauthorized as error:
            reason = error.reason
            response = self._sign_in(request, error, host, target, request_id, runtime)
        except GatewayError as error:
            reason = error.reason
            response = error_response(request, error, request_id, runtime.secure)
        except Exception:
            log.exception("request failed", extra={"request_id": request_id})
            failure = GatewayError("internal error")
            reason = failure.reason
            response = error_response(request, failure, request_id, runtime.secure)
        self._outcome(
            request, response, request_id, started, (logged, anonymous), reason, client_ip
        )
        self.metrics.served(route_id, decision, response.status, reason, started)
        return response

    async def admit(
        self, request: web.BaseRequest, route: Route, ask: Ask, runtime: Runtime
    ) -> Admission:
        """Stages 5-7 for forward-auth: identify, decide, record, and for an allowed request
        its record on disk when it must be. A refused admission is returned for the caller to
        raise `refusal()`."""
        a, written = await self._decide(request, route, ask, runtime)
        if a.decision.allowed:
            await self._durable(written, runtime)
        return a

    async def _decide(
        self, request: web.BaseRequest, route: Route, ask: Ask, runtime: Runtime
    ) -> tuple[Admission, asyncio.Future[None] | None]:
        """Stages 5-7: identify, decide (policy, then policy-check plugins), record."""
        auth = self.auth
        assert auth is not None  # settings refuse protected routes without an identity provider
        policy = runtime.policies[route.id]
        a = await admit(auth, policy, runtime.idle_ignore, request, route, ask)
        decision = "would-deny" if a.decision.would_deny else "allow"
        if not a.decision.allowed:
            decision = "deny"
        caller = a.caller
        who = Who(
            caller.user,
            caller.sub,
            caller.groups,
            caller.client,
            caller.session.handle if caller.session else None,
            a.mfa,
        )
        if a.decision.allowed and self.plugins.checks:
            a = await self._plugin_check(a, route, ask)
            decision = "deny" if not a.decision.allowed else decision
        written = self._record(
            request, route, ask, decision, a.decision.reason, who, a.decision.policy_hash, runtime
        )
        if decision == "deny" and a.decision.reason not in _NOT_MISUSE:
            auth.monitor.denied(caller.user, ask.client_ip)  # alert.deny_burst
        return a, written

    async def _plugin_check(self, a: Admission, route: Route, ask: Ask) -> Admission:
        """SPEC §9: a policy-check plugin can only deny (and denies when it fails)."""
        deny = await self.plugins.check(plugin_facts(route.id, ask, a.caller, a.mfa))
        if deny is None:
            return a
        refused = Decision(False, deny.reason, None, a.decision.policy_hash)
        return Admission(a.caller, refused, a.mfa)

    def _record(
        self,
        request: web.BaseRequest,
        route: Route,
        ask: Ask,
        decision: str,
        reason: str,
        who: Who,
        policy_hash: str | None,
        runtime: Runtime,
    ) -> asyncio.Future[None] | None:
        assert self.audit is not None
        upstream = runtime.upstreams.get(route.id)
        return self.audit.access(
            request_id=ask.request_id,
            route=route,
            method=ask.method,
            host=ask.host,
            path=ask.path,
            query=ask.query,
            decision=decision,
            reason=reason,
            who=who,
            client_ip=ask.client_ip,
            user_agent=request.headers.get("User-Agent"),
            upstream=upstream.base if upstream is not None else None,
            policy_hash=policy_hash,
        )

    def _audit_ok(self) -> bool:
        return self.audit is not None and self.audit.available

    async def _durable(self, written: asyncio.Future[None] | None, runtime: Runtime) -> None:
        """Stage 7's promise: no protected request goes on without its record (on_failure)."""
        assert self.audit is not None
        deny = runtime.settings.audit.on_failure == "deny"
        try:
            if written is not None:
                await written  # sync methods, phi routes: on disk before forwarding
            elif deny and not self.audit.available:
                raise AuditUnavailable("the audit log cannot be written")
        except AuditUnavailable:
            if deny:
                # SECURITY: fail closed: nothing reaches a protected upstream unrecorded.
                raise ServiceUnavailable(
                    "the audit log cannot be written; try again shortly",
                    reason="audit-unavailable",
                ) from None

    def _outcome(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        request_id: str,
        started: float,
        state: tuple[bool, bool],
        reason: str,
        client_ip: str,
    ) -> None:
        """Stage 9: the access record's outcome, or an unidentified refusal as noise."""
        audit = self.audit
        logged, anonymous = state
        if audit is None:
            return
        if logged:
            bytes_in = request.content.total_bytes if request.body_exists else 0
            sent = response.body_length  # streamed (relay ends with write_eof), or a page
            if not sent and isinstance(response, web.Response) and response.body is not None:
                sent = len(response.body)  # type: ignore[arg-type]
            duration = time.monotonic() - started
            audit.done(request_id, response.status, bytes_in, sent, duration, anonymous=anonymous)
        elif reason != "-":  # refused before anyone was identified (a login redirect too)
            fields = {
                "request_id": request_id,
                "method": request.method,
                "host": request.host,
                "path": request.raw_path.partition("?")[0][:_MAX_LOGGED_PATH],
                "user_agent": request.headers.get("User-Agent"),
            }
            audit.noise(response.status, reason, client_ip, fields)

    def _sign_in(
        self,
        request: web.BaseRequest,
        error: Unauthorized,
        host: str | None,
        target: Target | None,
        request_id: str,
        runtime: Runtime,
    ) -> web.Response:
        """No usable identity: browsers go to the login, other clients get a 401."""
        browser = request.method in ("GET", "HEAD") and wants_html(request)
        if browser and self.auth is not None and host is not None and target is not None:
            public = runtime.settings.server.public_url
            port = "" if public.port in (80, 443) else f":{public.port}"
            query = f"?{target.query}" if target.query else ""
            rd = f"{public.scheme}://{host}{port}{target.path}{query}"
            if isinstance(error, StepUp):
                return redirect(self.auth.mfa_url(rd), request_id)
            max_age = error.max_age if isinstance(error, Reauthenticate) else None
            return redirect(self.auth.login_url(rd, max_age), request_id)
        response = error_response(request, error, request_id, runtime.secure)
        response.headers["WWW-Authenticate"] = challenge(error)
        return response

    async def _own_endpoint(
        self, request: web.BaseRequest, path: str, request_id: str, runtime: Runtime
    ) -> web.StreamResponse:
        # SECURITY: /.gateway/* is never proxied, so no upstream can shadow the gateway's endpoints.
        found = ENDPOINTS.get(path)
        if found is None:
            raise NotFound("no such gateway endpoint", reason="no-endpoint")
        methods, endpoint = found
        if request.method not in methods:
            raise MethodNotAllowed(f"this endpoint answers {', '.join(sorted(methods))}")
        limiter = self._limiters.get(path)
        if limiter is not None:
            client = runtime.trusted.resolve(
                request.remote or "", request.headers.getall("X-Forwarded-For", [])
            ).client
            wait = limiter.acquire(client)
            if wait:
                # SECURITY: login floods, state-cookie churn and logout-token guessing, per address.
                raise TooManyRequests("too many requests; try again shortly", retry_after=wait)
        return await endpoint(request, self, request_id)


async def _on_disk(written: asyncio.Future[None] | None) -> None:
    """A public route's durable record: waited for; a log that cannot be written does not
    stop public routes (docs/audit-log.md), the record is written when the disk recovers."""
    if written is not None:
        with contextlib.suppress(AuditUnavailable):
            await written


_TICK = 5.0  # seconds between audit ticks (access.summary at a minute's end)
# Denials that are a step to take, not a sign of misuse: they do not count toward a burst.
_NOT_MISUSE = frozenset({"mfa-required", "auth-too-old"})
_MAX_LOGGED_PATH = 1024  # an unidentified client's path is kept to this length


def _label(decision: Decision) -> str:
    if not decision.allowed:
        return "deny"
    return "would-deny" if decision.would_deny else "allow"


def _limiters(limits: RateLimits) -> dict[str, RateLimiter]:
    buckets = {
        name: RateLimiter(getattr(limits, name).count, getattr(limits, name).window)
        for name in set(LIMITED.values())
    }
    return {path: buckets[name] for path, name in LIMITED.items()}  # one budget per name
