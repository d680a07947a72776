"""Authorization attacks mounted through a running gateway over real HTTP (SPEC §3, §4, §7, §12).

The world: the dev IdP, one recording echo upstream and the gateway, on loopback, with an
injectable clock shared by the gateway and the IdP. Every route's upstream URL carries a base
path `/up-<route id>`, so the echo's record says which route forwarded each request. Each
test asserts what the client sees and, for every refusal, that the upstream never received the
request. Requests whose bytes matter are sent raw (`tests.conftest.raw_request`): a client
library would normalize the paths and header names being tested.

Hosts: the public_url's host (127.0.0.1) carries most routes, each under its own prefix;
`strict.test` has one route at `/` allowing only `/public/**`; `ops.test` has a public
`/healthz` and a protected `/admin`. Requests to the two named hosts carry the session cookie
by hand (a browser would get it through the handoff).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from gateway.devidp import DevClient, DevIdP, DevUser, TokenOverride
from gateway.policy import rule_id
from gateway.server import listen
from gateway.settings import Rule, load_settings
from tests import test_login as login
from tests.conftest import echo_app, raw_request, start_server
from tests.test_login import HTML, SECRET, Clock, follow, free_port, signed_in, submit_login

JSON = {"Accept": "application/json"}
COOKIE = "gateway"
REFRESH_DUE = 230.0  # the dev IdP's ID tokens live 300 s; the gateway refreshes at 3/4 of that
USERS = {
    "alice": DevUser("alice", "alice-pw", groups=("sre",)),
    "bob": DevUser("bob", "bob-pw", groups=("finance",)),
}
ALICE = "alice@example.org"

# SPEC §7: incoming copies are removed in any case, with '_' or '-'.
SPOOFABLE = [
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Groups",
    "X-Auth-Request-Preferred-Username",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "Remote-User",
    "Remote-Groups",
    "Remote-Email",
    "X-Gateway-Anything",
    "X-Gateway-Assertion",
    "Forwarded",
    "X-Real-IP",
    "True-Client-IP",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Forwarded-Prefix",
    "X-Forwarded-Port",
    "X-Forwarded-Uri",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
]
REWRITES = ["X-Original-URL", "X-Rewrite-URL", "X-Forwarded-Uri"]


# -- the world -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    """One request the upstream received."""

    raw_path: str
    headers: tuple[tuple[str, str], ...]

    @property
    def route(self) -> str:
        """The route that forwarded it, from the upstream base path `/up-<route id>`."""
        return self.raw_path.split("/")[1].split("?")[0].removeprefix("up-")

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Env(login.Env):
    hits: list[Hit] = field(default_factory=list)
    port: int = 0

    def hits_to(self, route_id: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.route == route_id]

    def host(self, name: str) -> str:
        return f"{name}:{self.port}"


def recording_echo(hits: list[Hit]) -> web.Application:
    """tests.conftest.echo_app, recording every request it receives."""
    app = echo_app()

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        hits.append(Hit(request.raw_path, tuple(request.headers.items())))
        return await handler(request)

    app.middlewares.append(record)
    return app


def routes(up: str) -> list[dict[str, Any]]:
    def route(route_id: str, path: str, policy: dict[str, Any], **more: Any) -> dict[str, Any]:
        upstream = f"{up}/up-{route_id}"
        return {"id": route_id, "path": path, "upstream": upstream, "policy": policy, **more}

    sre = {"allow": [{"groups": ["sre"]}]}
    return [
        route("app", "/app", {"allow": [{"groups": ["sre", "finance"]}]}),
        route("strict", "/", {"allow": [{"paths": ["/public/**"]}]}, host="strict.test"),
        {"id": "health", "host": "ops.test", "path": "/healthz", "upstream": f"{up}/up-health"}
        | {"public": True},
        route("admin", "/admin", {"allow": [{"groups": ["admins"]}]}, host="ops.test"),
        route("guarded", "/guarded", {**sre, "deny": [{"paths": ["/admin/**"]}]}),
        route("mfa", "/mfa", {**sre, "require_mfa": True}),
        route("fresh", "/fresh", {**sre, "max_auth_age": "1m"}),
        route("report", "/report", {"allow": [{"groups": ["auditors"]}], "mode": "report"}),
        route("cors", "/cors", sre, cors_preflight="pass"),
        route("nocors", "/nocors", sre),
        route("svc", "/svc", {"allow": [{"clients": ["reporting-job"]}]}),
        route(
            "lacking",
            "/lacking",
            {"allow": [{"groups": ["finance-admins"], "paths": ["/secret-ledger/**"]}]},
        ),
    ]


def gateway_config(port: int, issuer: str, up: str, tmp: Path) -> dict[str, Any]:
    return {
        "server": {"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"},
        "identity": {
            "issuer": issuer,
            "client_id": "gateway",
            "client_secret": SECRET,
            "scopes": ["openid", "email", "groups"],
            "api_audiences": ["reports-api"],
        },
        "state": {
            "sessions": "memory://",
            "records": "memory://",
            "keys": [base64.b64encode(os.urandom(32)).decode()],
        },
        "sessions": {"cookie_name": COOKIE},
        "audit": {"dir": str(tmp / "audit")},
        "routes": routes(up),
    }


Tweak = Callable[[dict[str, Any]], None]
Launch = Callable[..., Awaitable[Env]]


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    """Start a world (IdP, recording upstream, gateway); `tweak` edits the gateway's config."""
    envs: list[Env] = []
    events: list[dict[str, Any]] = []
    handler = login._Events(events)
    event_log = logging.getLogger("gateway.events")
    level = event_log.level
    event_log.addHandler(handler)
    event_log.setLevel("INFO")

    async def start(tweak: Tweak | None = None) -> Env:
        clock, port = Clock(), free_port()
        client = DevClient(
            "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
        )
        idp = DevIdP(USERS, [client], clock=clock)
        issuer = await idp.start()
        hits: list[Hit] = []
        upstream = await start_server(recording_echo(hits))
        config = gateway_config(port, issuer, upstream.url, tmp_path)
        if tweak is not None:
            tweak(config)
        path = tmp_path / f"gateway-{len(envs)}.yaml"
        path.write_text(yaml.safe_dump(config))
        gateway = await listen(load_settings(path), shutdown_timeout=2, clock=clock)
        base = f"http://127.0.0.1:{port}"
        other = f"http://localhost:{port}"
        env = Env(gateway, idp, upstream, clock, base, other, events, hits=hits, port=port)
        envs.append(env)
        return env

    yield start
    for env in envs:
        for browser in env.browsers:
            await browser.close()
        await env.gateway.stop()
        await env.upstream.runner.cleanup()
        await env.idp.stop()
    event_log.removeHandler(handler)
    event_log.setLevel(level)


@pytest.fixture
async def env(launch: Launch) -> Env:
    return await launch()


# -- helpers ---------------------------------------------------------------------------------------


def cookie_of(browser: aiohttp.ClientSession) -> str:
    return next(c.value for c in browser.cookie_jar if c.key == COOKIE)


async def session_cookie(env: Env, user: str = "alice") -> str:
    """Sign `user` in through a browser; the session cookie's value."""
    return cookie_of(await signed_in(env, "/app/x", user))


def request_bytes(
    target: str, host: str, headers: Sequence[tuple[str, str]] = (), method: str = "GET"
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if not any(name.lower() == "connection" for name, _ in headers):
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send(
    env: Env,
    target: str,
    *,
    host: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    method: str = "GET",
) -> tuple[int, dict[str, str], bytes]:
    """One raw request to the gateway, exactly these bytes; (status, headers, body)."""
    raw = request_bytes(target, host or env.host("127.0.0.1"), headers, method)
    return await raw_request(env.port, raw)


def reason_of(body: bytes) -> str | None:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # not the gateway's JSON (aiohttp's own 400 for a malformed request line)
    return payload.get("reason") if isinstance(payload, dict) else None


def failure_reasons(env: Env) -> list[str]:
    return [e["reason"] for e in env.events_of("auth.login_failed")]


async def fetch_jwks(env: Env) -> jwt.PyJWKSet:
    async with aiohttp.ClientSession() as client:
        resp = await client.get(env.base + "/.gateway/jwks.json")
        assert resp.status == 200
        return jwt.PyJWKSet.from_json(await resp.text())


def verify(env: Env, jwks: jwt.PyJWKSet, token: str, audience: str) -> dict[str, Any]:
    """What an upstream does with X-Gateway-Assertion. The leeway only covers the test clock
    having been moved ahead of the wall clock pyjwt reads."""
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        key=key,
        algorithms=["ES256"],
        audience=audience,
        issuer=env.base,
        leeway=max(0.0, env.clock.now - time.time()) + 5,
        options={"require": ["iss", "aud", "sub", "exp", "iat", "nbf", "jti"]},
    )
    return claims


async def upstream_seen(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    seen: dict[str, Any] = orjson.loads(await resp.read())
    return seen


def seen_values(seen: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


# -- 1. paths: the policy sees what the upstream would see -----------------------------------------

# (raw target, expected status, expected reason); all on strict.test, whose route is `/` with
# one allow rule `paths: [/public/**]`, requested with a valid session.
STRICT_ATTACKS = [
    ("/public/../admin", 403, "no-allow-rule"),
    ("/public/%2e%2e/admin", 400, "bad-path"),
    ("/public/%2E%2E/admin", 400, "bad-path"),
    ("/public/.%2e/admin", 400, "bad-path"),
    ("/public/..%2fadmin", 400, "bad-path"),
    ("/public%2f..%2fadmin", 400, "bad-path"),
    ("/public/%2e/../../admin", 400, "bad-path"),
    ("/public/%252e%252e/admin", 400, "bad-path"),
    ("/public/%c0%ae%c0%ae/admin", 400, "bad-path"),
    ("/public/..%5cadmin", 400, "bad-path"),
    ("/public/..;/admin", 400, "bad-path"),
    ("/public/%00/../../admin", 400, "bad-path"),
    ("/public/../../admin", 400, "bad-path"),
    ("/%70ublic/../admin", 403, "no-allow-rule"),
    ("//admin", 403, "no-allow-rule"),
    ("//public/../admin", 403, "no-allow-rule"),
    ("/ADMIN", 403, "no-allow-rule"),
    ("/PUBLIC/x", 403, "no-allow-rule"),
    ("/publicity", 403, "no-allow-rule"),
    ("/admin;x=/public", 400, "bad-path"),
    ("/admin?x=/public/", 403, "no-allow-rule"),
    ("/admin?/public/x", 403, "no-allow-rule"),
]


async def test_path_tricks_never_reach_a_route_that_allows_only_public(env: Env) -> None:
    cookie = await session_cookie(env)
    headers = [("Cookie", f"{COOKIE}={cookie}"), *JSON.items()]
    got = {}
    for target, _, _ in STRICT_ATTACKS:
        status, _, body = await send(env, target, host=env.host("strict.test"), headers=headers)
        got[target] = (status, reason_of(body))
    assert got == {target: (status, reason) for target, status, reason in STRICT_ATTACKS}
    assert env.hits_to("strict") == []
    # the control: the allowed path does reach the upstream, exactly as canonicalized
    status, _, body = await send(
        env, "/public/a/../x", host=env.host("strict.test"), headers=headers
    )
    assert status == 200, body
    assert [hit.raw_path for hit in env.hits_to("strict")] == ["/up-strict/public/x"]


async def test_a_raw_fragment_in_the_request_target_is_refused(env: Env) -> None:
    cookie = await session_cookie(env)
    headers = [("Cookie", f"{COOKIE}={cookie}")]
    status, _, _ = await send(env, "/admin#/public", host=env.host("strict.test"), headers=headers)
    assert status == 400
    status, _, _ = await send(env, "/public/x#/../admin", host=env.host("strict.test"))
    assert status == 400
    assert env.hits_to("strict") == []


@pytest.mark.parametrize("name", REWRITES)
async def test_rewrite_headers_neither_open_a_path_nor_reach_the_upstream(
    env: Env, name: str
) -> None:
    cookie = await session_cookie(env)
    strict = env.host("strict.test")
    spoof = [("Cookie", f"{COOKIE}={cookie}"), (name, "/public/x"), *JSON.items()]
    status, _, body = await send(env, "/admin", host=strict, headers=spoof)
    assert (status, reason_of(body)) == (403, "no-allow-rule")
    assert env.hits_to("strict") == []
    spoof = [("Cookie", f"{COOKIE}={cookie}"), (name, "/admin"), *JSON.items()]
    status, _, _ = await send(env, "/public/x", host=strict, headers=spoof)
    assert status == 200
    [hit] = env.hits_to("strict")
    assert hit.raw_path == "/up-strict/public/x"
    assert hit.values(name) == []


async def test_a_public_route_is_no_way_into_a_protected_sibling(env: Env) -> None:
    ops = env.host("ops.test")
    status, _, _ = await send(env, "/healthz", host=ops)
    assert status == 200  # the control: public, no login
    tricks = {
        "/healthz/..;/admin": 400,
        "/healthz/;/../admin": 400,
        "/healthz/%2e%2e/admin": 400,
        "/healthz/..%2fadmin": 400,
        "/healthz%2f..%2fadmin": 400,
        "/healthz/../admin": 401,  # it is /admin: that route's policy decides, not /healthz's
        "/healthz/./../admin/x": 401,
    }
    got = {}
    for target in tricks:
        status, _, _ = await send(env, target, host=ops, headers=[*JSON.items()])
        got[target] = status
    assert got == tricks
    cookie = [("Cookie", f"{COOKIE}={await session_cookie(env)}"), *JSON.items()]
    status, _, body = await send(env, "/healthz/../admin", host=ops, headers=cookie)
    assert (status, reason_of(body)) == (403, "no-allow-rule")  # alice is not in admins
    assert env.hits_to("admin") == []
    assert [hit.raw_path for hit in env.hits_to("health")] == ["/up-health/healthz"]


async def test_a_deny_rule_for_a_subtree_denies_its_root(env: Env) -> None:
    browser = await signed_in(env)
    expected = "denied-by:" + rule_id("guarded", "deny", Rule(paths=("/admin/**",)))
    for path in ("/guarded/admin", "/guarded/admin/", "/guarded/admin/users", "/guarded//admin"):
        resp = await browser.get(env.base + path, headers=JSON, allow_redirects=False)
        assert resp.status == 403, path
        assert (await resp.json())["reason"] == expected, path
    status, _, body = await send(
        env, "/guarded/x/../admin", headers=[("Cookie", f"{COOKIE}={cookie_of(browser)}")]
    )
    assert (status, reason_of(body)) == (403, expected)
    assert env.hits_to("guarded") == []
    [denied, *_] = env.events_of("access.denied")
    assert denied["reason"] == expected and denied["user"] == ALICE
    # the controls: beside the subtree the broad allow holds (segment boundaries, not prefixes)
    for path in ("/guarded/x", "/guarded/administrator"):
        resp = await browser.get(env.base + path, headers=JSON, allow_redirects=False)
        assert resp.status == 200, path
    assert [hit.raw_path for hit in env.hits_to("guarded")] == [
        "/up-guarded/guarded/x",
        "/up-guarded/guarded/administrator",
    ]


# -- 2. spoofed identity headers -------------------------------------------------------------------


def spellings(name: str) -> list[str]:
    """The name as written, upper, lower, with '_' for every '-', and with one '_'."""
    variants = [name, name.upper(), name.lower(), name.replace("-", "_"), name.replace("-", "_", 1)]
    variants.append(name.upper().replace("-", "_"))
    return list(dict.fromkeys(variants))


async def test_spoofed_identity_headers_never_reach_the_upstream(env: Env) -> None:
    cookie = await session_cookie(env)
    jwks = await fetch_jwks(env)
    forged: list[tuple[str, str]] = []
    for n, name in enumerate(SPOOFABLE):
        for spelling in spellings(name):
            forged += [(spelling, f"spoofed-{n}"), (spelling, f"spoofed-{n}-again")]
    ours = "x-auth-request-user, x-auth-request-email, x-auth-request-groups, x-gateway-assertion"
    extra = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Host", "spoofed.example"),
        ("X-Forwarded-Proto", "spoofed"),
        ("Connection", f"close, {ours}, x-forwarded-for, x-request-id"),
    ]
    ours_set = {"x-auth-request-user", "x-auth-request-email", "x-auth-request-groups"}
    forgeable = {n.lower() for n in SPOOFABLE} - ours_set - {"x-gateway-assertion"}
    # in slices: aiohttp's server takes at most 128 header lines per request
    for i in range(0, len(forged), 60):
        before = len(env.hits)
        headers = [("Cookie", f"{COOKIE}={cookie}"), *forged[i : i + 60], *extra]
        status, _, body = await send(env, f"/app/spoof-{i}", headers=headers)
        assert status == 200, body
        [hit] = env.hits[before:]
        leaked = [(k, v) for k, v in hit.headers if "spoof" in v or "6.6.6.6" in v]
        assert leaked == []
        assert [k for k, _ in hit.headers if "_" in k] == []
        assert hit.values("X-Auth-Request-User") == [ALICE]
        assert hit.values("X-Auth-Request-Email") == [ALICE]
        assert hit.values("X-Auth-Request-Groups") == ["sre"]
        assert hit.values("X-Forwarded-For") == ["127.0.0.1"]
        assert hit.values("X-Forwarded-Host") == ["127.0.0.1"]
        assert hit.values("X-Forwarded-Proto") == ["http"]
        [assertion] = hit.values("X-Gateway-Assertion")
        assert verify(env, jwks, assertion, "app")["user"] == ALICE
        assert [k for k, _ in hit.headers if k.lower() in forgeable] == []


async def test_claims_cannot_add_or_split_identity_headers(env: Env) -> None:
    injected = "x\r\nX-Auth-Request-User: root@example.org"
    env.idp.set_groups("alice", ["sre", "ops,admins", "100%", injected])
    forged_user = "mallory@example.org\r\nX-Auth-Request-User: root@example.org"
    env.idp.id_token_hook = lambda header, claims: TokenOverride(claims={"email": forged_user})
    browser = await signed_in(env)
    [hit] = env.hits_to("app")
    assert hit.values("X-Auth-Request-User") == [
        "mallory@example.org%0D%0AX-Auth-Request-User: root@example.org"
    ]
    assert hit.values("X-Auth-Request-Groups") == [
        "sre,ops%2Cadmins,100%25,x%0D%0AX-Auth-Request-User: root@example.org"
    ]
    [assertion] = hit.values("X-Gateway-Assertion")
    claims = verify(env, await fetch_jwks(env), assertion, "app")
    assert claims["groups"] == ["sre", "ops,admins", "100%", injected]
    assert claims["user"] == forged_user
    assert cookie_of(browser)


async def test_public_routes_and_preflights_strip_spoofed_identity_too(env: Env) -> None:
    forged = [(name, "spoofed") for name in ("X-Auth-Request-User", "X_Auth_Request_Groups")]
    forged += [("Remote-User", "spoofed"), ("X-Gateway-Assertion", "spoofed")]
    status, _, _ = await send(env, "/healthz", host=env.host("ops.test"), headers=forged)
    assert status == 200
    preflight = [("Access-Control-Request-Method", "POST"), ("Origin", "http://app.example")]
    status, _, _ = await send(env, "/cors/x", headers=[*forged, *preflight], method="OPTIONS")
    assert status == 200
    [health], [cors] = env.hits_to("health"), env.hits_to("cors")
    for hit in (health, cors):
        assert [(k, v) for k, v in hit.headers if "spoofed" in v] == []
        assert [k for k, _ in hit.headers if k.lower().startswith("x-auth-request")] == []


# -- 3. the gateway's cookies stay with the gateway ------------------------------------------------


async def test_the_session_cookie_never_reaches_the_upstream(env: Env) -> None:
    browser = await signed_in(env)
    cookie = cookie_of(browser)
    variants = [
        [("Cookie", f"theme=dark; {COOKIE}={cookie}; lang=en")],
        [("Cookie", f"{COOKIE}={cookie};theme=dark")],
        [("Cookie", f'{COOKIE}="{cookie}"; theme=dark')],
        [("Cookie", "theme=dark"), ("Cookie", f"{COOKIE}={cookie}")],
        [("Cookie", f"{COOKIE}-login=stale; {COOKIE}={cookie}; theme=dark")],
    ]
    for headers in variants:
        before = len(env.hits)
        status, _, body = await send(env, "/app/cookies", headers=headers)
        assert status == 200, (headers, body)
        [hit] = env.hits[before:]
        sent = hit.values("Cookie")
        assert not any(cookie in value for value in sent), headers
        assert not any(f"{COOKIE}-login" in value for value in sent), headers
        assert any("theme=dark" in value for value in sent), headers
    # a public route is an upstream too
    ours = [("Cookie", f"{COOKIE}-login=stale; {COOKIE}={cookie}; theme=dark")]
    status, _, _ = await send(env, "/healthz", host=env.host("ops.test"), headers=ours)
    assert status == 200
    [health] = env.hits_to("health")
    assert health.values("Cookie") == ["theme=dark"]
    # nothing but ours: no Cookie header at all
    before = len(env.hits)
    status, _, _ = await send(env, "/app/only-ours", headers=[("Cookie", f"{COOKIE}={cookie}")])
    assert status == 200
    [hit] = env.hits[before:]
    assert hit.values("Cookie") == []


async def test_an_upstream_cannot_set_the_gateways_cookies(env: Env) -> None:
    browser = await signed_in(env)
    cookie = cookie_of(browser)
    resp = await browser.get(
        env.base + f"/app/x?set-cookie={COOKIE},{COOKIE}-login,theirs", headers=HTML
    )
    assert resp.status == 200
    names = [c.split("=", 1)[0] for c in resp.headers.getall("Set-Cookie", [])]
    assert names == ["theirs"]
    assert cookie_of(browser) == cookie
    again = await browser.get(env.base + "/app/y", headers=JSON, allow_redirects=False)
    assert again.status == 200


# -- 4. the signed assertion, as an upstream verifies it -------------------------------------------


async def test_the_assertion_verifies_for_its_route_only_and_follows_refreshed_groups(
    env: Env,
) -> None:
    browser = await signed_in(env)
    jwks = await fetch_jwks(env)
    resp = await browser.get(env.base + "/app/x", headers=JSON)
    seen = await upstream_seen(resp)
    [token] = seen_values(seen, "X-Gateway-Assertion")
    claims = verify(env, jwks, token, "app")
    assert claims["iss"] == env.base and claims["aud"] == "app"
    assert (claims["user"], claims["email"], claims["groups"]) == (ALICE, ALICE, ["sre"])
    assert claims["sub"] == USERS["alice"].sub
    with pytest.raises(jwt.InvalidAudienceError):
        verify(env, jwks, token, "guarded")  # replayed to route B's upstream
    other = await upstream_seen(await browser.get(env.base + "/guarded/x", headers=JSON))
    [token_b] = seen_values(other, "X-Gateway-Assertion")
    assert verify(env, jwks, token_b, "guarded")["aud"] == "guarded"
    with pytest.raises(jwt.InvalidAudienceError):
        verify(env, jwks, token_b, "app")
    # a forged or altered assertion does not verify
    head, body, signature = token.split(".")
    tampered = orjson.loads(base64.urlsafe_b64decode(body + "=="))
    tampered["groups"] = ["admins"]
    forged_body = base64.urlsafe_b64encode(orjson.dumps(tampered)).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        verify(env, jwks, f"{head}.{forged_body}.{signature}", "app")

    env.idp.set_groups("alice", ["sre", "oncall"])
    early = await upstream_seen(await browser.get(env.base + "/app/early", headers=JSON))
    assert seen_values(early, "X-Auth-Request-Groups") == ["sre"]  # no refresh due yet
    env.clock.now += REFRESH_DUE
    late = await upstream_seen(await browser.get(env.base + "/app/late", headers=JSON))
    assert seen_values(late, "X-Auth-Request-Groups") == ["sre,oncall"]
    [renewed] = seen_values(late, "X-Gateway-Assertion")
    fresh = verify(env, jwks, renewed, "app")
    assert fresh["groups"] == ["sre", "oncall"]
    assert fresh["iat"] == int(env.clock.now) and fresh["jti"] != claims["jti"]


# -- 5. the 403 page -------------------------------------------------------------------------------


async def test_the_403_page_names_the_request_and_user_never_the_rules(env: Env) -> None:
    browser = await signed_in(env)
    resp = await browser.get(env.base + "/lacking/x", headers=HTML, allow_redirects=False)
    assert resp.status == 403
    assert resp.content_type == "text/html"
    page = await resp.text()
    request_id = resp.headers["X-Request-Id"]
    assert "no-allow-rule" in page
    assert request_id in page
    assert ALICE in page
    assert "/lacking/x" in page
    assert 'href="/.gateway/logout"' in page
    for secret in ("finance-admins", "secret-ledger", "lacking.allow", "sha256:"):
        assert secret not in page
    assert "Traceback" not in page
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]

    resp = await browser.get(env.base + "/lacking/x", headers=JSON, allow_redirects=False)
    assert resp.status == 403
    payload = await resp.json()
    assert payload["status"] == 403
    assert payload["reason"] == "no-allow-rule"
    assert payload["request_id"] == resp.headers["X-Request-Id"]
    assert payload["user"] == ALICE
    text = orjson.dumps(payload).decode()
    assert "finance-admins" not in text and "secret-ledger" not in text

    resp = await browser.get(env.base + "/guarded/admin", headers=HTML, allow_redirects=False)
    assert resp.status == 403
    page = await resp.text()
    assert "denied-by:guarded.deny#" in page
    assert "/admin/**" not in page and re.search(r"\bsre\b", page) is None
    assert env.hits_to("lacking") == [] and env.hits_to("guarded") == []


# -- 6. MFA ----------------------------------------------------------------------------------------


def amr_is(amr: object) -> Callable[[dict[str, Any], dict[str, Any]], TokenOverride]:
    return lambda header, claims: TokenOverride(claims={"amr": amr})


async def test_a_login_without_a_second_factor_is_refused_on_an_mfa_route(env: Env) -> None:
    browser = await signed_in(env)  # the dev IdP's default amr: [pwd]
    resp = await browser.get(env.base + "/mfa/x", headers=JSON, allow_redirects=False)
    assert resp.status == 401  # RFC 9470: a stronger authentication is needed
    assert (await resp.json())["reason"] == "mfa-required"
    assert 'acr_values="mfa"' in resp.headers["WWW-Authenticate"]
    page = await browser.get(env.base + "/mfa/x?a=1", headers=HTML, allow_redirects=False)
    assert page.status == 302  # a browser is sent to the MFA page, and back afterwards
    assert page.headers["Location"] == (
        env.base + "/.gateway/mfa?rd=" + quote(env.base + "/mfa/x?a=1", safe="")
    )
    assert (await browser.get(env.base + "/app/x", headers=JSON)).status == 200  # no MFA needed
    assert env.hits_to("mfa") == []


@pytest.mark.parametrize("amr", [["pwd", "mfa"], ["otp"], ["pwd", "hwk"]])
async def test_a_login_with_a_second_factor_passes_an_mfa_route(env: Env, amr: list[str]) -> None:
    env.idp.id_token_hook = amr_is(amr)
    browser = await signed_in(env)
    resp = await browser.get(env.base + "/mfa/x", headers=JSON, allow_redirects=False)
    assert resp.status == 200
    [token] = seen_values(await upstream_seen(resp), "X-Gateway-Assertion")
    assert verify(env, await fetch_jwks(env), token, "mfa")["amr"] == amr


@pytest.mark.parametrize("amr", ["mfa", ["MFA"], [["mfa"]], [{"mfa": 1}], ["pwd", 7]])
async def test_a_malformed_amr_is_no_second_factor_and_breaks_nothing(
    env: Env, amr: object
) -> None:
    env.idp.id_token_hook = amr_is(amr)
    browser = env.browser()
    final = await follow(browser, await login.login_until_callback(env, browser))
    if final.status == 400:  # refusing the login outright is fine too
        assert failure_reasons(env) != []
        return
    assert final.status == 200
    resp = await browser.get(env.base + "/app/x", headers=JSON, allow_redirects=False)
    assert resp.status == 200, await resp.text()
    resp = await browser.get(env.base + "/mfa/x", headers=JSON, allow_redirects=False)
    assert resp.status == 401, await resp.text()
    assert (await resp.json())["reason"] == "mfa-required"
    assert env.hits_to("mfa") == []


# -- 7. max_auth_age -------------------------------------------------------------------------------


async def test_an_old_sign_in_must_be_renewed_at_the_idp(env: Env) -> None:
    browser = await signed_in(env)
    assert (await browser.get(env.base + "/fresh/x", headers=JSON)).status == 200
    env.clock.now += 120  # the IdP's auth_time is now 2 minutes old; the route allows 1
    cookie = cookie_of(browser)

    async with aiohttp.ClientSession() as api:
        resp = await api.get(
            env.base + "/fresh/x", headers={**JSON, "Cookie": f"{COOKIE}={cookie}"}
        )
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
        assert 'error="insufficient_user_authentication"' in challenge
        assert "max_age=60" in challenge
        assert (await resp.json())["reason"] == "auth-too-old"

    first = await browser.get(env.base + "/fresh/x", headers=HTML, allow_redirects=False)
    assert first.status == 302
    rd = quote(env.base + "/fresh/x", safe="")
    assert first.headers["Location"] == f"{env.base}/.gateway/login?rd={rd}&max_age=60"
    to_idp = await browser.get(first.headers["Location"], headers=HTML, allow_redirects=False)
    assert to_idp.status == 302
    authorize = URL(to_idp.headers["Location"])
    assert authorize.query["max_age"] == "60"
    assert "login" in authorize.query["prompt"].split()
    page = await browser.get(authorize, headers=HTML)
    assert page.status == 200  # the IdP asks for the password again

    # an IdP that ignores prompt=login and returns the old auth_time: the callback refuses
    created = len(env.events_of("session.created"))
    old = int(env.clock.now) - 120
    env.idp.id_token_hook = lambda header, claims: TokenOverride(claims={"auth_time": old})
    callback = await submit_login(browser, page, "alice", "alice-pw")
    refused = await follow(browser, callback)
    assert refused.status == 400
    assert failure_reasons(env) == ["auth-too-old"]
    assert len(env.events_of("session.created")) == created
    again = await browser.get(env.base + "/fresh/x", headers=JSON, allow_redirects=False)
    assert again.status == 401  # still the old session, still too old
    assert [hit.raw_path for hit in env.hits_to("fresh")] == ["/up-fresh/fresh/x"]  # before

    # an honest IdP: a fresh auth_time, and the route is open again
    env.idp.id_token_hook = None
    page = await follow(browser, env.base + "/fresh/y")
    assert page.url.port == URL(env.idp.issuer).port
    final = await follow(browser, await submit_login(browser, page, "alice", "alice-pw"))
    assert final.status == 200
    assert (await upstream_seen(final))["raw_path"] == "/up-fresh/fresh/y"
    assert len(env.events_of("session.created")) == created + 1


async def test_a_sign_in_without_auth_time_is_refused_when_max_age_was_asked(env: Env) -> None:
    browser = await signed_in(env)
    env.clock.now += 120
    page = await follow(browser, env.base + "/fresh/x")
    assert page.url.port == URL(env.idp.issuer).port
    env.idp.id_token_hook = lambda header, claims: TokenOverride(remove_claims=["auth_time"])
    refused = await follow(browser, await submit_login(browser, page, "alice", "alice-pw"))
    assert refused.status == 400
    assert failure_reasons(env) == ["missing-auth-time"]
    assert len(env.events_of("session.created")) == 1  # the first sign-in only
    assert env.hits_to("fresh") == []


# -- 8. report mode --------------------------------------------------------------------------------


async def test_report_mode_allows_and_logs_what_it_would_deny(env: Env) -> None:
    browser = await signed_in(env)
    resp = await browser.get(env.base + "/report/x", headers=JSON, allow_redirects=False)
    assert resp.status == 200
    assert [hit.raw_path for hit in env.hits_to("report")] == ["/up-report/report/x"]
    [event] = env.events_of("access.would_deny")
    assert event["reason"] == "no-allow-rule"
    assert (event["user"], event["path"]) == (ALICE, "/report/x")
    assert env.events_of("access.denied") == []
    async with aiohttp.ClientSession() as anonymous:  # report mode never skips the sign-in
        resp = await anonymous.get(env.base + "/report/x", headers=JSON)
        assert resp.status == 401
    assert len(env.hits_to("report")) == 1


# -- 9. CORS preflights ----------------------------------------------------------------------------


async def test_cors_preflights_pass_only_where_configured_and_only_without_credentials(
    env: Env,
) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Origin": "http://app.example"}
    async with aiohttp.ClientSession() as client:
        resp = await client.options(env.base + "/cors/x", headers=preflight)
        assert resp.status == 200
        assert [hit.raw_path for hit in env.hits_to("cors")] == ["/up-cors/cors/x"]
        resp = await client.options(env.base + "/nocors/x", headers=preflight)
        assert resp.status == 401
        resp = await client.options(env.base + "/cors/x", headers={"Origin": "http://a.example"})
        assert resp.status == 401  # an OPTIONS that is no preflight
        with_cookie = {**preflight, "Cookie": f"{COOKIE}=not-a-session"}
        resp = await client.options(env.base + "/cors/x", headers=with_cookie)
        assert resp.status == 401
        with_token = {**preflight, "Authorization": "Bearer not-a-token"}
        resp = await client.options(env.base + "/cors/x", headers=with_token)
        assert resp.status == 401
        assert (await resp.json())["reason"] == "bad-token"
    assert env.hits_to("nocors") == [] and len(env.hits_to("cors")) == 1

    # a "preflight" carrying a real session is decided by the policy: bob is not in sre
    bob = await session_cookie(env, "bob")
    headers = [*preflight.items(), ("Cookie", f"{COOKIE}={bob}"), *JSON.items()]
    status, _, body = await send(env, "/cors/x", headers=headers, method="OPTIONS")
    assert (status, reason_of(body)) == (403, "no-allow-rule")
    headers = [*preflight.items(), ("cookie", f"theme=dark; {COOKIE}={bob}")]
    status, _, _ = await send(env, "/cors/x", headers=headers, method="OPTIONS")
    assert status == 403
    assert len(env.hits_to("cors")) == 1


# -- 10. rate limits -------------------------------------------------------------------------------


def tight_login_limit(trusted: list[str]) -> Tweak:
    def tweak(config: dict[str, Any]) -> None:
        config["rate_limits"] = {"login": {"count": 3, "window": "1m"}}
        config["server"]["trusted_proxies"] = trusted

    return tweak


async def test_login_is_rate_limited_per_client_address(launch: Launch) -> None:
    env = await launch(tight_login_limit(["127.0.0.1/32"]))
    login_url = "/.gateway/login?rd=/app/x"
    client_a = [("X-Forwarded-For", "203.0.113.7"), *JSON.items()]
    for _ in range(3):
        status, headers, _ = await send(env, login_url, headers=client_a)
        assert status == 302 and headers["location"].startswith(env.idp.issuer)
    status, headers, body = await send(env, login_url, headers=client_a)
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= 60
    payload = orjson.loads(body)
    assert payload["reason"] == "rate-limited"
    assert payload["request_id"] == headers["x-request-id"]
    html_headers = [("X-Forwarded-For", "203.0.113.7"), ("Accept", "text/html")]
    status, headers, body = await send(env, login_url, headers=html_headers)
    assert status == 429 and "retry-after" in headers
    assert headers["x-request-id"].encode() in body and b"<html" in body
    # another client behind the same trusted proxy has a budget of its own
    client_b = [("X-Forwarded-For", "203.0.113.8"), *JSON.items()]
    for _ in range(3):
        status, _, _ = await send(env, login_url, headers=client_b)
        assert status == 302
    # and so does the proxy itself; a client cannot pose as another by adding hops on the left
    status, _, _ = await send(env, login_url, headers=[*JSON.items()])
    assert status == 302
    spoofing = [("X-Forwarded-For", "198.51.100.1, 203.0.113.7"), *JSON.items()]
    status, _, _ = await send(env, login_url, headers=spoofing)
    assert status == 429
    assert env.hits == []


async def test_an_untrusted_peer_cannot_escape_the_limit_with_x_forwarded_for(
    launch: Launch,
) -> None:
    env = await launch(tight_login_limit(["192.0.2.0/24"]))  # not the test's own address
    statuses = []
    for n in range(5):
        headers = [("X-Forwarded-For", f"203.0.113.{n}"), *JSON.items()]
        status, _, _ = await send(env, "/.gateway/login?rd=/app/x", headers=headers)
        statuses.append(status)
    assert statuses == [302, 302, 302, 429, 429]


# -- 11. default deny, service clients -------------------------------------------------------------


async def test_a_route_allowing_only_another_group_denies_by_default(env: Env) -> None:
    cookie = await session_cookie(env)
    for path in ("/lacking/x", "/lacking/secret-ledger/q1", "/lacking"):
        status, _, body = await send(
            env, path, headers=[("Cookie", f"{COOKIE}={cookie}"), *JSON.items()]
        )
        assert (status, reason_of(body)) == (403, "no-allow-rule"), path
    assert env.hits_to("lacking") == []
    assert {e["reason"] for e in env.events_of("access.denied")} == {"no-allow-rule"}


async def test_service_clients_are_allowed_by_clients_rules_only(env: Env) -> None:
    async with aiohttp.ClientSession() as client:

        async def call(path: str, token: str) -> aiohttp.ClientResponse:
            headers = {**JSON, "Authorization": f"Bearer {token}"}
            resp = await client.get(env.base + path, headers=headers, allow_redirects=False)
            await resp.read()
            return resp

        good = login.bearer(env, "reports-api", groups=["sre"])
        resp = await call("/svc/report", good)
        assert resp.status == 200
        seen = await upstream_seen(resp)
        assert seen["raw_path"] == "/up-svc/svc/report"
        [assertion] = seen_values(seen, "X-Gateway-Assertion")
        assert verify(env, await fetch_jwks(env), assertion, "svc")["sub"] == "svc-1"

        other = login.bearer(env, "reports-api", azp="other-job", groups=["sre"])
        resp = await call("/svc/report", other)
        assert resp.status == 403
        assert (await resp.json())["reason"] == "no-allow-rule"
        # a service client in no group of /app's rule, and a client id that is no group
        resp = await call("/app/x", login.bearer(env, "reports-api"))
        assert resp.status == 403
        resp = await call("/app/x", login.bearer(env, "reports-api", azp="sre"))
        assert resp.status == 403

        for groups in ("sre", "admins", {"sre": True}, ["sre", 1]):
            token = login.bearer(env, "reports-api", groups=groups)
            resp = await call("/svc/report", token)
            assert resp.status == 401, groups
            assert (await resp.json())["reason"] == "bad-token"
            assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert len(env.hits_to("svc")) == 1 and env.hits_to("app") == []
