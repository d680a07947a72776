"""What the gateway would decide for one request (SPEC §10 `gateway explain`). Pure.

    Question.parse(method, url, user, ...) -> Question     ValueError for bad input
    explain(settings, question, now) -> Answer             answer.allowed, answer.text()

The URL goes through the same steps as a request (gateway.routing: the Host check, the
canonical path, the route), then the route's policy is evaluated (gateway.policy). Nothing
is started and no one is contacted, so what the IdP would say is assumed: the email is the
user when it has an `@` (or `--email`), verified; the login happened just now; a second
factor only with `--mfa`; no client address unless `--ip` (so a rule with `source_ips`
cannot hold); a browser session unless `--client` (a service client's bearer token).
A policy-check plugin (§9) is not consulted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from urllib.parse import urlsplit

from gateway.errors import GatewayError
from gateway.policy import Facts, compile_policies, evaluate
from gateway.routing import RouteTable, locate
from gateway.settings import Route, Settings

_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")
_GATEWAY_PATHS = "/.gateway/"  # the gateway's own endpoints (SPEC §12), before any route


@dataclass(frozen=True, slots=True)
class Question:
    method: str
    host: str | None  # a Host header value; None: public_url's host (a path-only URL)
    target: str  # the request target: path and query, as sent
    user: str
    groups: tuple[str, ...] = ()
    mfa: bool = False
    ip: IPv4Address | IPv6Address | None = None
    client: str | None = None
    email: str | None = None

    @classmethod
    def parse(
        cls,
        method: str,
        url: str,
        user: str,
        *,
        groups: str = "",
        mfa: bool = False,
        ip: str | None = None,
        client: str | None = None,
        email: str | None = None,
    ) -> Question:
        """From command-line text; ValueError says which part is wrong."""
        if not _METHOD.fullmatch(method.upper()):
            raise ValueError(f"{method!r} is not an HTTP method")
        if not user:
            raise ValueError("--user needs a value")
        host, target = _split_url(url)
        return cls(
            method=method.upper(),
            host=host,
            target=target,
            user=user,
            groups=tuple(g.strip() for g in groups.split(",") if g.strip()),
            mfa=mfa,
            ip=_address(ip),
            client=client or None,
            email=email or None,
        )


def _split_url(url: str) -> tuple[str | None, str]:
    if url.startswith("/"):
        return None, url
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r}: give a path (/d/x) or an http(s) URL")
    return parts.netloc, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _address(text: str | None) -> IPv4Address | IPv6Address | None:
    if text is None:
        return None
    try:
        return ip_address(text.strip())
    except ValueError:
        raise ValueError(f"--ip: {text!r} is not an IP address") from None


@dataclass(frozen=True, slots=True)
class Answer:
    allowed: bool
    reason: str  # a SPEC §3 reason: a rule id or a reason code
    policy_hash: str
    route: Route | None = None
    would_deny: bool = False  # mode: report
    detail: str | None = None  # why the request reached no policy
    facts: Facts | None = None  # what was assumed, when a policy was evaluated

    def text(self) -> str:
        """What `gateway explain` prints."""
        if self.would_deny:
            lines = [f"ALLOW (report mode; enforce would DENY: {self.reason})"]
        else:
            lines = [f"{'ALLOW' if self.allowed else 'DENY'}  {self.reason}"]
        if self.detail is not None:
            lines.append(f"detail {self.detail}")
        if self.route is not None:
            where = f"host {self.route.host}" if self.route.host else "any host"
            lines.append(f"route  {self.route.id} ({where}, path {self.route.path})")
        if self.facts is not None:
            lines.append(f"caller {_caller(self.facts)}")
        lines.append(f"policy {self.policy_hash}")
        return "\n".join(lines)


def _caller(facts: Facts) -> str:
    email = f"{facts.email} (verified)" if facts.email else "-"
    return (
        f"user {facts.user}, groups {','.join(facts.groups) or '-'}, email {email}, "
        f"mfa {'yes' if facts.mfa else 'no'}, ip {facts.source_ip or '-'}, "
        f"client {facts.client or '-'}, signed in just now"
    )


def explain(settings: Settings, question: Question, now: float) -> Answer:
    """The decision for `question`; ValueError if a policy does not compile (DuplicateRule)."""
    policies = compile_policies(settings)
    server = settings.server
    table = RouteTable(settings.routes, extra_hosts={server.public_url.host, *server.allowed_hosts})
    try:
        host, target = locate(question.target, [_host_header(settings, question)], table)
    except GatewayError as error:
        return Answer(False, error.reason, policies.hash, detail=error.detail)
    if target.match.startswith(_GATEWAY_PATHS):
        detail = "the gateway's own endpoint (sign-in, callback, ...): no route or policy applies"
        return Answer(True, "gateway-endpoint", policies.hash, detail=detail)
    route = table.match(host, target.match)
    if route is None:
        return Answer(
            False, "no-route", policies.hash, detail=f"nothing serves {host}{target.match}"
        )
    if route.public:
        return Answer(True, "public", policies.hash, route)
    facts = _facts(question, target.match, now)
    decision = evaluate(facts, policies[route.id])
    return Answer(
        decision.allowed,
        decision.reason,
        decision.policy_hash,
        route,
        decision.would_deny,
        facts=facts,
    )


def _host_header(settings: Settings, question: Question) -> str:
    if question.host is not None:
        return question.host
    host = settings.server.public_url.host
    return f"[{host}]" if ":" in host else host


def _facts(question: Question, path: str, now: float) -> Facts:
    """What the IdP and the session would say, assumed as the module docstring tells."""
    email = question.email
    if email is None and "@" in question.user:
        email = question.user
    return Facts(
        user=question.user,
        email=email,
        email_verified=True,
        groups=question.groups,
        client=question.client,
        mfa=question.mfa,
        auth_time=now,
        method=question.method,
        path=path,
        source_ip=question.ip,
        now=now,
    )
