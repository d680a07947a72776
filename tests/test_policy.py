from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from gateway.policy import (
    Decision,
    DuplicateRule,
    Facts,
    Identity,
    RoutePolicy,
    compile_policies,
    evaluate,
    reachable,
    rule_id,
)
from gateway.settings import Route, Rule, Settings

NOW = 1_700_000_000.0
UPSTREAM = "http://127.0.0.1:3000"


def route(policy: dict[str, Any], path: str = "/", route_id: str = "grafana") -> Route:
    return Route.model_validate(
        {"id": route_id, "path": path, "upstream": UPSTREAM, "policy": policy}
    )


def compiled(policy: dict[str, Any], path: str = "/", verified: bool = True) -> RoutePolicy:
    return RoutePolicy.compile(route(policy, path), require_email_verified=verified)


def facts(**changes: Any) -> Facts:
    base = Facts(
        user="alice@example.org",
        email="alice@example.org",
        email_verified=True,
        groups=(),
        client=None,
        mfa=True,
        auth_time=NOW,
        method="GET",
        path="/",
        source_ip=None,
        now=NOW,
    )
    if "source_ip" in changes and isinstance(changes["source_ip"], str):
        changes["source_ip"] = ipaddress.ip_address(changes["source_ip"])
    return base._replace(**changes)


def settings(routes: list[dict[str, Any]], verified: bool = True) -> Settings:
    return Settings.model_validate(
        {
            "server": {"public_url": "https://gw.example.org"},
            "identity": {
                "issuer": "https://idp.example.org",
                "client_id": "gw",
                "require_email_verified": verified,
            },
            "routes": routes,
        }
    )


def route_dict(route_id: str, policy: dict[str, Any] | None, **more: Any) -> dict[str, Any]:
    entry = {"id": route_id, "upstream": UPSTREAM, **more}
    return entry | ({"policy": policy} if policy is not None else {"public": True})


# -- each condition, alone and combined --------------------------------------------------------

KELVIN = "\u212a"  # 'K'.lower() == 'k'

CONDITIONS = [
    # users: exact, or ignoring ASCII case when the value has an '@'
    ({"users": ["alice@example.org"]}, {}, True),
    ({"users": ["alice@example.org"]}, {"user": "ALICE@Example.ORG"}, True),
    ({"users": ["Alice@Example.org"]}, {"user": "alice@example.org"}, True),
    ({"users": ["alice@example.org"]}, {"user": "bob@example.org"}, False),
    ({"users": ["bob"]}, {"user": "bob"}, True),
    ({"users": ["bob"]}, {"user": "Bob"}, False),
    ({"users": ["bob", "carol"]}, {"user": "carol"}, True),
    ({"users": ["svc-1"]}, {"user": "svc-1", "email": None, "email_verified": False}, True),
    ({"users": ["alice@example.org"]}, {"user": "alice@example.org@evil.org"}, False),
    ({"users": ["a@b@example.org"]}, {"user": "a@b@example.org"}, False),
    ({"users": ["alice@example.org"]}, {"email_verified": False}, False),
    ({"users": ["kevin@example.org"]}, {"user": f"{KELVIN}evin@example.org"}, False),
    # groups: any of them; groups_not: none of them
    ({"groups": ["sre", "ops"]}, {"groups": ("ops",)}, True),
    ({"groups": ["sre", "ops"]}, {"groups": ("dev",)}, False),
    ({"groups": ["sre"]}, {"groups": ()}, False),
    ({"groups": ["sre"]}, {"groups": ("SRE",)}, False),
    ({"groups_not": ["admins"]}, {"groups": ("dev",)}, True),
    ({"groups_not": ["admins"]}, {"groups": ()}, True),
    ({"groups_not": ["admins", "x"]}, {"groups": ("dev", "admins")}, False),
    # email_domains: the domain, ignoring ASCII case, exactly (no subdomains)
    ({"email_domains": ["example.org"]}, {"email": "bob@Example.ORG"}, True),
    ({"email_domains": ["example.org", "example.com"]}, {"email": "bob@example.com"}, True),
    ({"email_domains": ["example.org"]}, {"email": "bob@mail.example.org"}, False),
    ({"email_domains": ["example.org"]}, {"email": "bob@example.org.evil.net"}, False),
    ({"email_domains": ["example.org"]}, {"email": None}, False),
    ({"email_domains": ["example.org"]}, {"email_verified": False}, False),
    ({"email_domains": ["example.org"]}, {"email": "m@evil.org@example.org"}, False),
    ({"email_domains": ["@example.org"]}, {}, True),
    # clients: exact
    ({"clients": ["ci-bot"]}, {"client": "ci-bot"}, True),
    ({"clients": ["ci-bot"]}, {"client": None}, False),
    ({"clients": ["ci-bot"]}, {"client": "CI-BOT"}, False),
    # methods: exact (GET does not cover HEAD); the config is upper-cased by settings
    ({"methods": ["GET", "HEAD"]}, {"method": "HEAD"}, True),
    ({"methods": ["get"]}, {"method": "GET"}, True),
    ({"methods": ["GET"]}, {"method": "HEAD"}, False),
    ({"methods": ["GET"]}, {"method": "POST"}, False),
    # paths: globs on the path relative to the route ('/' here)
    ({"paths": ["/d/**"]}, {"path": "/d"}, True),
    ({"paths": ["/d/**"]}, {"path": "/d/"}, True),
    ({"paths": ["/d/**"]}, {"path": "/d/x/y"}, True),
    ({"paths": ["/d/**"]}, {"path": "/dx"}, False),
    ({"paths": ["/api/dashboards/*"]}, {"path": "/api/dashboards/1"}, True),
    ({"paths": ["/api/dashboards/*"]}, {"path": "/api/dashboards/1/x"}, False),
    ({"paths": ["/a", "/b/**"]}, {"path": "/b/c"}, True),
    # source_ips: v4 and v6; an IPv4-mapped IPv6 address is its IPv4 address; none: no match
    ({"source_ips": ["10.0.0.0/8"]}, {"source_ip": "10.1.2.3"}, True),
    ({"source_ips": ["10.0.0.0/8"]}, {"source_ip": "11.0.0.1"}, False),
    ({"source_ips": ["10.0.0.0/8"]}, {"source_ip": None}, False),
    ({"source_ips": ["10.0.0.0/8"]}, {"source_ip": "::ffff:10.1.2.3"}, True),
    ({"source_ips": ["10.0.0.0/8"]}, {"source_ip": "2001:db8::1"}, False),
    ({"source_ips": ["2001:db8::/32"]}, {"source_ip": "2001:db8::1"}, True),
    ({"source_ips": ["2001:db8::/32"]}, {"source_ip": "2001:db9::1"}, False),
    ({"source_ips": ["2001:db8::/32"]}, {"source_ip": "10.1.2.3"}, False),
    ({"source_ips": ["192.168.1.7"]}, {"source_ip": "192.168.1.7"}, True),
    ({"source_ips": ["10.0.0.0/8", "2001:db8::/32"]}, {"source_ip": "2001:db8::5"}, True),
    # no condition: everyone
    ({}, {"user": "anyone", "email": None}, True),
    # combined: every condition given must hold
    ({"groups": ["sre"], "methods": ["GET"], "paths": ["/d/**"]}, {"groups": ("sre",)}, False),
    (
        {"groups": ["sre"], "methods": ["GET"], "paths": ["/d/**"]},
        {"groups": ("sre",), "path": "/d/1"},
        True,
    ),
    (
        {"groups": ["sre"], "methods": ["GET"], "paths": ["/d/**"]},
        {"groups": ("sre",), "path": "/d/1", "method": "POST"},
        False,
    ),
    (
        {"users": ["alice@example.org"], "source_ips": ["10.0.0.0/8"]},
        {"source_ip": "10.0.0.9"},
        True,
    ),
    (
        {"users": ["alice@example.org"], "source_ips": ["10.0.0.0/8"]},
        {"source_ip": "10.0.0.9", "user": "bob"},
        False,
    ),
    ({"groups": ["sre"], "groups_not": ["contractors"]}, {"groups": ("sre", "contractors")}, False),
    ({"email_domains": ["example.org"], "clients": ["ci"]}, {"client": "ci"}, True),
]


@pytest.mark.parametrize(("rule", "changes", "holds"), CONDITIONS)
def test_each_condition(rule: dict[str, Any], changes: dict[str, Any], holds: bool) -> None:
    decision = evaluate(facts(**changes), compiled({"allow": [rule]}))
    assert decision.allowed is holds
    assert decision.reason == (
        rule_id("grafana", "allow", Rule(**rule)) if holds else "no-allow-rule"
    )


@pytest.mark.parametrize(("rule", "changes", "holds"), CONDITIONS)
def test_each_condition_as_a_deny_rule(
    rule: dict[str, Any], changes: dict[str, Any], holds: bool
) -> None:
    decision = evaluate(facts(**changes), compiled({"allow": [{}], "deny": [rule]}))
    assert decision.allowed is not holds


@pytest.mark.parametrize(
    ("rule", "path", "holds"),
    [
        ("/d/**", "/app/d/x", True),
        ("/d/**", "/app/d", True),
        ("/d/**", "/app", False),
        ("/d/**", "/d/x", False),  # not relative to the route: the rule sees '/d/x' only under /app
        ("/", "/app", True),
        ("/", "/app/", True),
        ("/", "/app/x", False),
        ("/**", "/app", True),
        ("/*", "/app/x", True),
        ("/app/**", "/app/x", False),  # rules never see the route's own prefix
    ],
)
def test_paths_are_relative_to_the_route(rule: str, path: str, holds: bool) -> None:
    policy = compiled({"allow": [{"paths": [rule]}]}, path="/app")
    assert evaluate(facts(path=path), policy).allowed is holds


def test_paths_under_a_deep_route() -> None:
    policy = compiled({"allow": [{"paths": ["/x/*"]}]}, path="/a/b")
    assert evaluate(facts(path="/a/b/x/1"), policy).allowed
    assert not evaluate(facts(path="/a/b/y/1"), policy).allowed


def test_unverified_email_matches_when_the_identity_does_not_require_it() -> None:
    users = compiled({"allow": [{"users": ["alice@example.org"]}]}, verified=False)
    domains = compiled({"allow": [{"email_domains": ["example.org"]}]}, verified=False)
    unverified = facts(email_verified=False)
    assert evaluate(unverified, users).allowed
    assert evaluate(unverified, domains).allowed
    # SECURITY: two '@' never match, verified or not
    assert not evaluate(facts(user="a@x@example.org", email="a@x@example.org"), users).allowed
    assert not evaluate(facts(email="a@x@example.org"), domains).allowed


# -- the order of decisions and their reasons --------------------------------------------------


def test_named_and_hashed_reasons() -> None:
    policy = compiled({"allow": [{"id": "sre", "groups": ["sre"]}, {"groups": ["dev"]}]})
    sre = evaluate(facts(groups=("sre",)), policy)
    assert sre == Decision(True, "grafana.allow.sre", "grafana.allow.sre", policy.policy_hash)
    dev = evaluate(facts(groups=("dev",)), policy)
    assert re.fullmatch(r"grafana\.allow#[0-9a-f]{6}", dev.reason) and dev.rule == dev.reason


def test_default_deny() -> None:
    assert evaluate(facts(), compiled({})) == Decision(
        False, "no-allow-rule", None, compiled({}).policy_hash
    )
    assert evaluate(facts(), compiled({"allow": [{"groups": ["x"]}]})).reason == "no-allow-rule"


def test_deny_wins_over_allow() -> None:
    policy = compiled(
        {
            "allow": [{"id": "all"}],
            "deny": [{"paths": ["/admin/**"], "groups_not": ["grafana-admins"]}],
        }
    )
    denied = evaluate(facts(path="/admin/users"), policy)
    assert not denied.allowed and re.fullmatch(
        r"denied-by:grafana\.deny#[0-9a-f]{6}", denied.reason
    )
    assert denied.rule == denied.reason.removeprefix("denied-by:")
    assert evaluate(facts(path="/admin/users", groups=("grafana-admins",)), policy).allowed
    assert evaluate(facts(path="/d/1"), policy).reason == "grafana.allow.all"


def test_first_holding_allow_rule_names_the_reason() -> None:
    policy = compiled({"allow": [{"id": "b", "groups": ["sre"]}, {"id": "a"}]})
    assert evaluate(facts(groups=("sre",)), policy).reason == "grafana.allow.b"
    assert evaluate(facts(), policy).reason == "grafana.allow.a"


def test_first_holding_deny_rule_names_the_reason() -> None:
    policy = compiled({"allow": [{}], "deny": [{"id": "one", "methods": ["POST"]}, {"id": "two"}]})
    assert evaluate(facts(method="POST"), policy).reason == "denied-by:grafana.deny.one"
    assert evaluate(facts(), policy).reason == "denied-by:grafana.deny.two"


def test_mfa_required_only_once_allowed() -> None:
    policy = compiled({"require_mfa": True, "allow": [{"groups": ["sre"]}]})
    assert evaluate(facts(mfa=False, groups=("sre",)), policy).reason == "mfa-required"
    assert evaluate(facts(mfa=False), policy).reason == "no-allow-rule"
    assert evaluate(facts(mfa=True, groups=("sre",)), policy).allowed


@pytest.mark.parametrize(
    ("auth_time", "allowed"),
    [(NOW, True), (NOW - 3600, True), (NOW - 3601, False), (None, False), (NOW + 5, True)],
)
def test_auth_too_old(auth_time: float | None, allowed: bool) -> None:
    policy = compiled({"max_auth_age": "1h", "allow": [{}]})
    decision = evaluate(facts(auth_time=auth_time), policy)
    assert decision.allowed is allowed
    assert decision.reason == ("auth-too-old" if not allowed else decision.rule)


def test_mfa_is_checked_before_auth_age() -> None:
    policy = compiled({"require_mfa": True, "max_auth_age": "1h", "allow": [{}]})
    assert evaluate(facts(mfa=False, auth_time=None), policy).reason == "mfa-required"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"path": "/admin"}, "denied-by:grafana.deny.admin"),
        ({"groups": ()}, "no-allow-rule"),
        ({"mfa": False}, "mfa-required"),
        ({"auth_time": NOW - 7200}, "auth-too-old"),
    ],
)
def test_report_mode_allows_and_keeps_the_reason(changes: dict[str, Any], reason: str) -> None:
    body = {
        "require_mfa": True,
        "max_auth_age": "1h",
        "allow": [{"id": "sre", "groups": ["sre"]}],
        "deny": [{"id": "admin", "paths": ["/admin/**"]}],
    }
    base = {"groups": ("sre",)} | changes
    enforced = evaluate(facts(**base), compiled(body))
    assert not enforced.allowed and not enforced.would_deny and enforced.reason == reason
    reported = evaluate(facts(**base), compiled(body | {"mode": "report"}))
    assert reported.allowed and reported.would_deny and reported.reason == reason
    assert reported.rule == enforced.rule


def test_report_mode_allow_is_a_plain_allow() -> None:
    policy = compiled({"mode": "report", "allow": [{"id": "all"}]})
    assert evaluate(facts(), policy) == Decision(
        True, "grafana.allow.all", "grafana.allow.all", policy.policy_hash
    )


# -- rule ids and the policy hash --------------------------------------------------------------


def test_rule_ids_do_not_depend_on_order() -> None:
    a = {"groups": ["sre", "ops"], "methods": ["GET", "HEAD"], "source_ips": ["10.0.0.0/8"]}
    b = {"users": ["alice@example.org"], "paths": ["/d/**", "/api/*"]}
    a2 = {"source_ips": ["10.0.0.0/8"], "methods": ["HEAD", "GET"], "groups": ["ops", "sre"]}
    b2 = {"paths": ["/api/*", "/d/**"], "users": ["alice@example.org"]}
    one = compiled({"allow": [a, b]})
    two = compiled({"allow": [b2, a2]})
    assert [r.id for r in one.allow] == [r.id for r in reversed(two.allow)]
    assert one.allow[0].id != one.allow[1].id
    assert rule_id("grafana", "allow", Rule(**a)) == one.allow[0].id


def test_rule_ids_name_route_and_list() -> None:
    rule = Rule(groups=("sre",))
    allow, deny = rule_id("grafana", "allow", rule), rule_id("grafana", "deny", rule)
    assert allow.startswith("grafana.allow#") and deny.startswith("grafana.deny#")
    assert allow[-6:] == deny[-6:]
    assert rule_id("wiki", "allow", rule) == "wiki" + allow.removeprefix("grafana")
    assert rule_id("grafana", "allow", Rule(id="sre", groups=("x",))) == "grafana.allow.sre"


def test_the_same_rule_twice_in_one_list_is_refused() -> None:
    with pytest.raises(DuplicateRule) as raised:
        compiled({"allow": [{"groups": ["a", "b"]}, {"id": "x"}, {"groups": ["b", "a"]}]})
    assert raised.value.kind == "allow" and raised.value.positions == (0, 2)
    assert "policy.allow[0] and policy.allow[2]" in str(raised.value)
    with pytest.raises(ValueError, match=r"policy\.deny\[0\] and policy\.deny\[1\] are the"):
        compiled({"allow": [{}], "deny": [{}, {}]})
    with pytest.raises(ValueError, match=r"share the id grafana\.allow\.a"):
        compiled({"allow": [{"id": "a"}, {"id": "a", "groups": ["x"]}]})
    compiled({"allow": [{"groups": ["a"]}], "deny": [{"groups": ["a"]}]})  # two lists: fine
    compiled({"allow": [{"id": "a"}, {"id": "b"}, {}]})  # named apart: fine, as in settings


def test_compile_policies_covers_protected_routes_only() -> None:
    policies = compile_policies(
        settings(
            [
                route_dict("grafana", {"allow": [{"groups": ["sre"]}]}),
                route_dict("health", None, path="/healthz"),
            ]
        )
    )
    assert list(policies) == ["grafana"] and len(policies) == 1
    assert "health" not in policies
    assert policies["grafana"].policy_hash == policies.hash
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", policies.hash)
    decision = evaluate(facts(groups=("sre",)), policies["grafana"])
    assert decision.allowed and decision.policy_hash == policies.hash


def test_compile_policies_passes_require_email_verified() -> None:
    routes = [route_dict("app", {"allow": [{"users": ["alice@example.org"]}]})]
    unverified = facts(email_verified=False)
    assert not evaluate(unverified, compile_policies(settings(routes))["app"]).allowed
    assert evaluate(unverified, compile_policies(settings(routes, verified=False))["app"]).allowed


def _hash(routes: list[dict[str, Any]], verified: bool = True) -> str:
    return compile_policies(settings(routes, verified)).hash


GRAFANA = route_dict(
    "grafana",
    {
        "require_mfa": True,
        "allow": [{"id": "sre", "groups": ["sre", "ops"]}, {"users": ["a@x.org"]}],
    },
    host="grafana.example.org",
)
HEALTH = route_dict("health", None, path="/healthz")


def test_policy_hash_is_stable() -> None:
    assert _hash([GRAFANA, HEALTH]) == _hash([GRAFANA, HEALTH])
    assert _hash([GRAFANA, HEALTH]) == _hash([HEALTH, GRAFANA])  # route order
    reordered = json.loads(json.dumps(GRAFANA))
    reordered["policy"]["allow"][0]["groups"] = ["ops", "sre"]  # items within a rule
    assert _hash([GRAFANA, HEALTH]) == _hash([reordered, HEALTH])
    other_upstream = GRAFANA | {"upstream": "http://127.0.0.1:4000", "timeout": "5s"}
    assert _hash([GRAFANA, HEALTH]) == _hash([other_upstream, HEALTH])  # not policy


def _changed(**policy: Any) -> dict[str, Any]:
    return GRAFANA | {"policy": GRAFANA["policy"] | policy}


@pytest.mark.parametrize(
    "changed",
    [
        _changed(require_mfa=False),
        _changed(max_auth_age="1h"),
        _changed(mode="report"),
        _changed(allow=[{"id": "sre", "groups": ["sre"]}, {"users": ["a@x.org"]}]),
        _changed(allow=[{"id": "ops", "groups": ["sre", "ops"]}, {"users": ["a@x.org"]}]),
        _changed(allow=[{"users": ["a@x.org"]}, {"id": "sre", "groups": ["sre", "ops"]}]),
        _changed(deny=[{"paths": ["/admin/**"]}]),
        GRAFANA | {"host": "g.example.org"},
        GRAFANA | {"path": "/g"},
        GRAFANA | {"id": "grafana2"},
    ],
)
def test_policy_hash_changes_with_the_policy(changed: dict[str, Any]) -> None:
    assert _hash([GRAFANA, HEALTH]) != _hash([changed, HEALTH])


def test_policy_hash_covers_public_routes_and_email_verification() -> None:
    base = _hash([GRAFANA, HEALTH])
    assert base != _hash([GRAFANA])
    assert base != _hash([GRAFANA, HEALTH | {"path": "/live"}])
    assert base != _hash([GRAFANA, HEALTH], verified=False)


def test_content_hash_is_the_route_own() -> None:
    before = compile_policies(settings([GRAFANA, HEALTH]))
    other = route_dict("wiki", {"allow": [{}]}, path="/wiki")
    after = compile_policies(settings([GRAFANA, HEALTH, other]))
    assert before.hash != after.hash
    assert before["grafana"].content_hash == after["grafana"].content_hash
    changed = compile_policies(settings([_changed(require_mfa=False), HEALTH]))
    assert changed["grafana"].content_hash != before["grafana"].content_hash
    alone = RoutePolicy.compile(route(GRAFANA["policy"], route_id="grafana"))
    assert alone.policy_hash == alone.content_hash


# -- reachable: could this identity get in at all ----------------------------------------------


def who(user: str = "bob@example.org", *groups: str, verified: bool = True) -> Identity:
    return Identity(user, user if "@" in user else None, verified, groups, None)


@pytest.mark.parametrize(
    ("policy", "identity", "expected"),
    [
        ({"allow": [{"groups": ["sre"]}]}, who("bob@example.org", "sre"), True),
        ({"allow": [{"groups": ["sre"]}]}, who("bob@example.org", "dev"), False),
        ({"allow": [{"paths": ["/d/**"], "methods": ["GET"]}]}, who(), True),  # some request
        ({"allow": [{"users": ["bob@example.org"]}]}, who(verified=False), False),
        ({"allow": [{"email_domains": ["example.org"]}]}, who(), True),
        ({"allow": [{"clients": ["ci"]}]}, who(), False),
        ({"allow": [{}], "deny": [{"groups_not": ["staff"]}]}, who(), False),
        (
            {"allow": [{}], "deny": [{"groups_not": ["staff"]}]},
            who("bob@example.org", "staff"),
            True,
        ),
        ({"allow": [{}], "deny": [{"paths": ["/admin/**"]}]}, who(), True),  # the rest is open
        (
            {"allow": [{}], "deny": [{"users": ["bob@example.org"], "methods": ["POST"]}]},
            who(),
            True,
        ),
        ({}, who(), False),
        ({"mode": "report"}, who(), True),
        ({"require_mfa": True, "max_auth_age": "1m", "allow": [{}]}, who(), True),
    ],
)
def test_reachable(policy: dict[str, Any], identity: Identity, expected: bool) -> None:
    assert reachable(identity, compiled(policy)) is expected


# -- the property: evaluate agrees with a brute-force oracle -----------------------------------


def _ascii_lower(value: str) -> str:
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in value)


def _segment_matches(pattern: str, segment: str) -> bool:
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return pattern == segment
    head, tail = pieces[0], pieces[-1]
    if len(segment) < len(head) + len(tail) or not (
        segment.startswith(head) and segment.endswith(tail)
    ):
        return False
    position, end = len(head), len(segment) - len(tail)
    for piece in pieces[1:-1]:
        found = segment.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


def _glob_matches(glob: str, path: str) -> bool:
    """Segment by segment: '**' is any number of segments; a trailing '/' is optional."""
    pattern = glob.strip("/").split("/") if glob.strip("/") else []
    segments = path[1:].split("/")  # '/' -> [''], '/a/' -> ['a', '']

    def match(g: int, p: int) -> bool:
        if g == len(pattern):
            return p == len(segments) or (p == len(segments) - 1 and segments[p] == "")
        if pattern[g] == "**":
            return any(match(g + 1, k) for k in range(p, len(segments) + 1))
        return (
            p < len(segments) and _segment_matches(pattern[g], segments[p]) and match(g + 1, p + 1)
        )

    return match(0, 0)


def _in_network(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, network: str) -> bool:
    net = ipaddress.ip_network(network)
    if ip.version != net.version:
        return False
    shift = net.max_prefixlen - net.prefixlen
    return int(ip) >> shift == int(net.network_address) >> shift


def _oracle_holds(rule: dict[str, list[str]], f: Facts, path: str, need_verified: bool) -> bool:
    def email_ok(value: str) -> bool:
        return value.count("@") == 1 and (f.email_verified or not need_verified)

    def user_ok(item: str) -> bool:
        if "@" in f.user:
            return email_ok(f.user) and _ascii_lower(item) == _ascii_lower(f.user)
        return item == f.user

    def domain_ok(item: str) -> bool:
        if f.email is None or not email_ok(f.email):
            return False
        return _ascii_lower(f.email.split("@")[1]) == _ascii_lower(item)

    tests = {
        "users": user_ok,
        "groups": lambda item: item in f.groups,
        "email_domains": domain_ok,
        "clients": lambda item: item == f.client,
        "methods": lambda item: item == f.method,
        "paths": lambda item: _glob_matches(item, path),
        "source_ips": lambda item: f.source_ip is not None and _in_network(f.source_ip, item),
    }
    for name, items in rule.items():
        if name == "groups_not":
            if set(items) & set(f.groups):
                return False
        elif not any(tests[name](item) for item in items):
            return False
    return True


def _oracle(
    policy: dict[str, Any], prefix: str, f: Facts, need_verified: bool
) -> tuple[bool, str, int | None]:
    """(allowed in enforce mode, reason kind, index of the deciding rule)."""
    relative = f.path if prefix == "/" else (f.path[len(prefix) :] or "/")
    for i, rule in enumerate(policy["deny"]):
        if _oracle_holds(rule, f, relative, need_verified):
            return False, "deny", i
    allowing = [
        i for i, r in enumerate(policy["allow"]) if _oracle_holds(r, f, relative, need_verified)
    ]
    if not allowing:
        return False, "no-allow-rule", None
    if policy["require_mfa"] and not f.mfa:
        return False, "mfa-required", None
    too_old = f.auth_time is None or f.now - f.auth_time > 60
    if policy["max_auth_age"] is not None and too_old:
        return False, "auth-too-old", None
    return True, "allow", allowing[0]


def _canonical_rule(rule: dict[str, list[str]]) -> str:
    return json.dumps({k: sorted(set(v)) for k, v in rule.items()}, sort_keys=True)


GROUPS = ["sre", "dev", "admins"]
USERS = ["alice@example.org", "ALICE@Example.org", "bob", "Bob", "a@b@example.org", "svc"]
EMAILS = ["alice@example.org", "bob@Example.ORG", "x@mail.example.org", "a@b@example.org"]
NETWORKS = ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "2001:db8::/32", "0.0.0.0/0"]
IPS = ["10.1.2.3", "10.2.0.1", "192.168.1.1", "2001:db8::1", "2001:db9::1"]
GLOB_SEGMENTS = ["a", "b", "*", "a*", "*b", "**", "x"]
PATH_SEGMENTS = ["a", "b", "ab", "x", "ba"]


def _some(items: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(items), min_size=1, max_size=3)


GLOBS = st.lists(st.sampled_from(GLOB_SEGMENTS), max_size=3).map(lambda s: "/" + "/".join(s))
CONDITION_VALUES = {
    "users": _some(USERS),
    "groups": _some(GROUPS),
    "groups_not": _some(GROUPS),
    "email_domains": _some(["example.org", "mail.example.org"]),
    "clients": _some(["ci", "CI", "deploy"]),
    "methods": _some(["GET", "POST", "HEAD"]),
    "paths": st.lists(GLOBS, min_size=1, max_size=2),
    "source_ips": _some(NETWORKS),
}


@st.composite
def _rules(draw: st.DrawFn) -> dict[str, list[str]]:
    """Up to two conditions: rules with more would rarely hold, and say little more."""
    names = draw(st.lists(st.sampled_from(sorted(CONDITION_VALUES)), max_size=2, unique=True))
    return {name: draw(CONDITION_VALUES[name]) for name in names}


RULES = _rules()
POLICIES = st.fixed_dictionaries(
    {
        "require_mfa": st.booleans(),
        "max_auth_age": st.sampled_from([None, "60s"]),
        "mode": st.sampled_from(["enforce", "report"]),
        "allow": st.lists(RULES, max_size=3, unique_by=_canonical_rule),
        "deny": st.lists(RULES, max_size=2, unique_by=_canonical_rule),
    }
)


@st.composite
def _request_paths(draw: st.DrawFn, prefix: str) -> str:
    segments = draw(st.lists(st.sampled_from(PATH_SEGMENTS), max_size=3))
    relative = "/" + "/".join(segments) + ("/" if segments and draw(st.booleans()) else "")
    if prefix == "/":
        return relative
    return prefix + (relative if segments else draw(st.sampled_from(["", "/"])))


@st.composite
def _cases(draw: st.DrawFn) -> tuple[dict[str, Any], str, Facts, bool]:
    prefix = draw(st.sampled_from(["/", "/app"]))
    f = Facts(
        user=draw(st.sampled_from(USERS)),
        email=draw(st.none() | st.sampled_from(EMAILS)),
        email_verified=draw(st.booleans()),
        groups=tuple(draw(st.lists(st.sampled_from(GROUPS), max_size=2))),
        client=draw(st.none() | st.sampled_from(["ci", "deploy"])),
        mfa=draw(st.booleans()),
        auth_time=draw(st.sampled_from([None, NOW, NOW - 30, NOW - 61])),
        method=draw(st.sampled_from(["GET", "POST", "HEAD"])),
        path=draw(_request_paths(prefix)),
        source_ip=draw(st.none() | st.sampled_from(IPS).map(ipaddress.ip_address)),
        now=NOW,
    )
    return draw(POLICIES), prefix, f, draw(st.booleans())


@hypothesis.settings(max_examples=1000, deadline=None)
@hypothesis.given(_cases())
def test_evaluate_agrees_with_a_brute_force_oracle(
    case: tuple[dict[str, Any], str, Facts, bool],
) -> None:
    policy, prefix, f, need_verified = case
    compiled_policy = compiled(policy, prefix, verified=need_verified)
    decision = evaluate(f, compiled_policy)
    allowed, kind, index = _oracle(policy, prefix, f, need_verified)
    report = policy["mode"] == "report"
    # never allowed (in enforce mode) unless an allow rule holds and no deny rule does
    assert not (decision.allowed and not decision.would_deny) or kind == "allow"
    assert decision.allowed is (allowed or report)
    assert decision.would_deny is (report and not allowed)
    if kind == "allow":
        assert index is not None
        assert decision.reason == decision.rule == compiled_policy.allow[index].id
    elif kind == "deny":
        assert index is not None
        assert decision.reason == f"denied-by:{compiled_policy.deny[index].id}"
    else:
        assert decision.reason == kind and decision.rule is None
    # reachable over-approximates: whoever is let in on some request is reachable
    identity = Identity(f.user, f.email, f.email_verified, f.groups, f.client)
    assert not decision.allowed or reachable(identity, compiled_policy)
