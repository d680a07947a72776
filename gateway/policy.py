"""Who may use a protected route (SPEC §3 routes[].policy, §4 stage 6). Pure.

    compile_policies(settings) -> PolicySet       once per config load: route id -> RoutePolicy
    evaluate(facts, route_policy) -> Decision     once per request: no I/O, no clock
    reachable(identity, route_policy) -> bool     could this caller get in at all (a reload's diff)

`Facts` is everything a decision may depend on, gathered by the caller (the time included).
Deny rules are tried first: any that holds denies (`denied-by:<rule id>`). Then the allow
rules, in order: the first that holds allows and names the reason; none holds: `no-allow-rule`
(default deny). An allowed caller may still need a second factor (`mfa-required`) or a fresh
login at the IdP (`auth-too-old`). A policy in `mode: report` allows what it would deny and
says so (`Decision.would_deny`, the reason kept).

A rule holds when every condition given in it holds; each list matches any of its items;
`groups_not` holds when the caller has none of them; a rule with no condition holds for
everyone. `paths` are globs (gateway.globs) relative to the route path: route `/app` and
rule `/d/**` match `/app/d/x` and `/app/d`. `users` compare exactly, except values with an
`@`, which compare ignoring ASCII case. `email_domains` compare the part after the email's
`@`, ignoring ASCII case, exactly: `example.org` does not cover `mail.example.org`. While
`identity.require_email_verified` is on, an unverified email (or email-looking user) matches
no `users` or `email_domains` item; an address with two `@` never does. `methods` compare
exactly: `GET` does not cover `HEAD`. `source_ips` need the client address (an IPv4-mapped
IPv6 address counts as its IPv4 address).

A rule's id is `<route>.allow.<id>` when the operator named it, else `<route>.allow#<6 hex>`
from a hash of its conditions with every list sorted, so reordering rules, or items within a
rule, never changes a reason in the audit log. `PolicySet.hash` identifies the whole loaded
policy: the same config gives the same hash, any policy change another.

Each route is compiled on its own into cheap checks (frozensets, one regex per rule for its
paths, IP networks), so a request's cost never depends on other routes' rules.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, NamedTuple

from gateway.globs import GlobSet
from gateway.paths import segment_count, strip_segments
from gateway.settings import Route, Rule, Settings

__all__ = [
    "CompiledRule",
    "Decision",
    "DuplicateRule",
    "Facts",
    "Identity",
    "PolicySet",
    "RoutePolicy",
    "compile_policies",
    "evaluate",
    "policy_hash",
    "reachable",
    "rule_id",
    "who_facts",
]


class Facts(NamedTuple):  # per request: built 3x faster than a frozen dataclass
    """Everything a decision may depend on; gathered by the caller, the clock included."""

    user: str  # the user_claim value (for a bearer token: its sub)
    email: str | None
    email_verified: bool  # the IdP said email_verified: true
    groups: tuple[str, ...]
    client: str | None  # a service client's azp/client_id (bearer tokens); None for sessions
    mfa: bool  # the session has a second factor
    auth_time: float | None  # the IdP's auth_time (epoch seconds)
    method: str  # upper case
    path: str  # the canonical decoded request path, whole (not yet relative to the route)
    source_ip: IPv4Address | IPv6Address | None
    now: float


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # a rule id ("grafana.allow.sre") or a reason code ("no-allow-rule", ...)
    rule: str | None  # the rule that decided (allow, or deny for denied-by:), else None
    policy_hash: str  # the whole loaded policy (PolicySet.hash)
    would_deny: bool = False  # mode: report: allowed, but enforce would deny (reason = why)


Check = Callable[[Facts, str], bool]  # (facts, path relative to the route) -> holds


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a caller is, apart from any request: what `reachable` asks about."""

    user: str
    email: str | None
    email_verified: bool
    groups: tuple[str, ...]
    client: str | None


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    checks: tuple[Check, ...]  # one per condition given; none: holds for everyone
    who: tuple[Check, ...]  # the checks on the caller's identity (a part of `checks`)
    every_request: bool  # no methods, paths or source_ips: only `who` matters

    def holds(self, facts: Facts, path: str) -> bool:
        for check in self.checks:  # noqa: SIM110 - not all(genexpr): this runs on every request
            if not check(facts, path):
                return False
        return True

    def admits(self, facts: Facts) -> bool:
        """Do the conditions on who the caller is hold (the request's aside)?"""
        return all(check(facts, "/") for check in self.who)


class DuplicateRule(ValueError):
    """Two rules of one list with the same id: the same conditions and no `id`, or the same
    `id`, or (rarely) two contents whose hashes share their first 6 hex digits."""

    def __init__(self, route_id: str, kind: str, first: int, second: int, same_id: str) -> None:
        both = f"route {route_id!r}: policy.{kind}[{first}] and policy.{kind}[{second}]"
        what = (
            "are the same rule" if same_id == "" else f"share the id {same_id}; give one its own id"
        )
        super().__init__(f"{both} {what}")
        self.route_id, self.kind, self.positions = route_id, kind, (first, second)


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """One protected route's policy, compiled."""

    route_id: str
    depth: int  # segments of the route path, cut off the request path before rules see it
    allow: tuple[CompiledRule, ...]
    deny: tuple[CompiledRule, ...]
    require_mfa: bool
    max_auth_age: float | None
    report: bool  # mode: report
    policy_hash: str  # the whole loaded policy
    content_hash: str  # this route's policy alone: which routes a reload changed
    granted: tuple[Decision, ...] = ()  # the Decision of each allow rule, made once

    @classmethod
    def compile(
        cls, route: Route, *, require_email_verified: bool = True, digest: str | None = None
    ) -> RoutePolicy:
        """`digest`: the whole policy's hash (default: this route's own); DuplicateRule if one
        list holds the same rule twice."""
        policy = route.policy
        if policy is None:
            raise ValueError(f"route {route.id!r} has no policy")
        own = policy_hash((route,), require_email_verified)
        digest = own if digest is None else digest
        allow = _compile_rules(route.id, "allow", policy.allow, require_email_verified)
        return cls(
            route_id=route.id,
            depth=segment_count(route.path),
            allow=allow,
            deny=_compile_rules(route.id, "deny", policy.deny, require_email_verified),
            require_mfa=policy.require_mfa,
            max_auth_age=policy.max_auth_age,
            report=policy.mode == "report",
            policy_hash=digest,
            content_hash=own,
            granted=tuple(Decision(True, rule.id, rule.id, digest) for rule in allow),
        )


class PolicySet(Mapping[str, RoutePolicy]):
    """Route id -> RoutePolicy for every protected route, and the hash of the whole policy."""

    __slots__ = ("_routes", "hash")

    def __init__(self, routes: Mapping[str, RoutePolicy], policy_hash: str) -> None:
        self._routes = dict(routes)
        self.hash = policy_hash

    def __getitem__(self, route_id: str) -> RoutePolicy:
        return self._routes[route_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)


def compile_policies(settings: Settings) -> PolicySet:
    """Compile every protected route's policy; DuplicateRule (a ValueError) as in compile."""
    verified = settings.identity.require_email_verified if settings.identity else True
    digest = policy_hash(settings.routes, verified)
    routes = {
        route.id: RoutePolicy.compile(route, require_email_verified=verified, digest=digest)
        for route in settings.protected_routes
    }
    return PolicySet(routes, digest)


# -- evaluate ----------------------------------------------------------------------------------


def evaluate(facts: Facts, policy: RoutePolicy) -> Decision:
    """The decision for one request on `policy`'s route (facts.path lies under the route)."""
    path = strip_segments(facts.path, policy.depth)
    for rule in policy.deny:
        if rule.holds(facts, path):
            return _deny(policy, f"denied-by:{rule.id}", rule.id)
    for i, rule in enumerate(policy.allow):
        if rule.holds(facts, path):
            return _demands(facts, policy, i)
    return _deny(policy, "no-allow-rule")


def _demands(facts: Facts, policy: RoutePolicy, allowing: int) -> Decision:
    """Allowed by a rule: what the route itself demands of the login."""
    if policy.require_mfa and not facts.mfa:
        return _deny(policy, "mfa-required")
    if policy.max_auth_age is not None and _auth_age(facts) > policy.max_auth_age:
        return _deny(policy, "auth-too-old")
    return policy.granted[allowing]


def reachable(identity: Identity, policy: RoutePolicy) -> bool:
    """Could `identity` be allowed some request on this route (MFA and sign-in age aside)?

    An over-approximation: a deny rule limited to some methods, paths or addresses is taken
    to leave the rest open. A policy in report mode lets everyone through.
    """
    if policy.report:
        return True
    facts = who_facts(identity)
    if any(rule.every_request and rule.admits(facts) for rule in policy.deny):
        return False
    return any(rule.admits(facts) for rule in policy.allow)


def who_facts(identity: Identity) -> Facts:
    """Facts for the checks on who the caller is (`CompiledRule.admits` reads no others)."""
    return Facts(
        user=identity.user,
        email=identity.email,
        email_verified=identity.email_verified,
        groups=identity.groups,
        client=identity.client,
        mfa=True,
        auth_time=None,
        method="",
        path="/",
        source_ip=None,
        now=0.0,
    )


def _deny(policy: RoutePolicy, reason: str, rule: str | None = None) -> Decision:
    return Decision(policy.report, reason, rule, policy.policy_hash, would_deny=policy.report)


def _auth_age(facts: Facts) -> float:
    return float("inf") if facts.auth_time is None else facts.now - facts.auth_time


# -- compiling rules ---------------------------------------------------------------------------


def _compile_rules(
    route_id: str, kind: str, rules: Iterable[Rule], require_verified: bool
) -> tuple[CompiledRule, ...]:
    seen: dict[str, tuple[int, Rule]] = {}  # rule id -> position, rule
    compiled = []
    for i, rule in enumerate(rules):
        this_id = rule_id(route_id, kind, rule)
        if this_id in seen:  # reasons must name one rule (settings reports this first)
            first, other = seen[this_id]
            same = rule.id is None and _conditions(rule) == _conditions(other)
            raise DuplicateRule(route_id, kind, first, i, "" if same else this_id)
        seen[this_id] = i, rule
        who, what = tuple(_who(rule, require_verified)), tuple(_what(rule))
        compiled.append(CompiledRule(this_id, who + what, who, not what))
    return tuple(compiled)


def _who(rule: Rule, require_verified: bool) -> Iterator[Check]:
    """One check per condition on the caller, cheapest first (the order never changes results)."""
    if rule.clients:
        clients = frozenset(rule.clients)
        yield lambda facts, _: facts.client in clients
    if rule.groups:
        groups = frozenset(rule.groups)
        yield lambda facts, _: not groups.isdisjoint(facts.groups)
    if rule.groups_not:
        groups_not = frozenset(rule.groups_not)
        yield lambda facts, _: groups_not.isdisjoint(facts.groups)
    if rule.users:
        yield _users_check(rule.users, require_verified)
    if rule.email_domains:
        yield _domains_check(rule.email_domains, require_verified)


def _what(rule: Rule) -> Iterator[Check]:
    """One check per condition on the request."""
    if rule.methods:
        methods = frozenset(rule.methods)
        yield lambda facts, _: facts.method in methods
    if rule.paths:
        globs = GlobSet(rule.paths)
        yield lambda _, path: globs.matches(path)
    if rule.source_ips:
        yield _source_ip_check(rule.source_ips)


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _fold(value: str) -> str:
    # SECURITY: ASCII only: str.lower() maps 'K' (Kelvin sign) to 'k', so a look-alike address
    # someone else could verify at the IdP would match the real one.
    return value.translate(_ASCII_LOWER)


def _usable_email(value: str, verified: bool, require_verified: bool) -> bool:
    """May this address (an email, or an email-looking user) match a users/email_domains item?"""
    if value.count("@") != 1:
        # SECURITY: 'mallory@evil.org@example.org' is one domain to us, another to a mail system.
        return False
    # SECURITY: an unverified address is whatever the account holder typed in at the IdP.
    return verified or not require_verified


def _users_check(users: Iterable[str], require_verified: bool) -> Check:
    exact = frozenset(user for user in users if "@" not in user)
    emails = frozenset(_fold(user) for user in users if "@" in user)

    def check(facts: Facts, _: str) -> bool:
        user = facts.user
        if "@" not in user:
            return user in exact
        usable = _usable_email(user, facts.email_verified, require_verified)
        return usable and _fold(user) in emails

    return check


def _domains_check(domains: Iterable[str], require_verified: bool) -> Check:
    wanted = frozenset(_fold(domain) for domain in domains)

    def check(facts: Facts, _: str) -> bool:
        email = facts.email
        if email is None or not _usable_email(email, facts.email_verified, require_verified):
            return False
        return _fold(email.rpartition("@")[2]) in wanted

    return check


def _source_ip_check(networks: Iterable[IPv4Network | IPv6Network]) -> Check:
    v4 = tuple(net for net in networks if isinstance(net, IPv4Network))
    v6 = tuple(net for net in networks if isinstance(net, IPv6Network))

    def check(facts: Facts, _: str) -> bool:
        ip = facts.source_ip
        if isinstance(ip, IPv4Address):
            return any(ip in net for net in v4)
        if ip is None:
            return False
        mapped = ip.ipv4_mapped
        # SECURITY: on a dual-stack socket 10.0.0.1 arrives as ::ffff:10.0.0.1; a deny rule
        # for 10.0.0.0/8 must still hold.
        return any(ip in net for net in v6) or (
            mapped is not None and any(mapped in net for net in v4)
        )

    return check


# -- ids and the policy hash -------------------------------------------------------------------


def rule_id(route_id: str, kind: str, rule: Rule) -> str:
    """`grafana.allow.sre` when named, else `grafana.allow#3f2a1c` from its conditions."""
    if rule.id is not None:
        return f"{route_id}.{kind}.{rule.id}"
    digest = hashlib.sha256(_canonical(_conditions(rule)).encode()).hexdigest()
    return f"{route_id}.{kind}#{digest[:6]}"


def _conditions(rule: Rule) -> dict[str, list[str]]:
    """The conditions given, each list sorted and without repeats: the rule's content."""
    dumped: dict[str, list[str]] = rule.model_dump(mode="json", exclude={"id"})
    return {name: sorted(set(items)) for name, items in dumped.items() if items}


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def policy_hash(routes: Iterable[Route], require_email_verified: bool) -> str:
    """`sha256:<hex>` over every route's id, host, path, public flag and policy."""
    document = {
        "require_email_verified": require_email_verified,
        "routes": [_route_document(route) for route in sorted(routes, key=lambda r: r.id)],
    }
    return "sha256:" + hashlib.sha256(_canonical(document).encode()).hexdigest()


def _route_document(route: Route) -> dict[str, Any]:
    policy = route.policy
    document: dict[str, Any] = {
        "id": route.id,
        "host": route.host,
        "path": route.path,
        "public": route.public,
        "policy": None,
    }
    if policy is not None:
        document["policy"] = {
            "require_mfa": policy.require_mfa,
            "max_auth_age": policy.max_auth_age,
            "mode": policy.mode,
            "allow": [{"id": rule.id, **_conditions(rule)} for rule in policy.allow],
            "deny": [{"id": rule.id, **_conditions(rule)} for rule in policy.deny],
        }
    return document
