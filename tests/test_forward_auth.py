"""Forward-auth behind Debian's nginx (SPEC §7): the example in docs/forward-auth.md, as written.

nginx runs the doc's configuration (TLS, `auth_request`, the login redirect) in front of the
echo upstream and asks the gateway at /.gateway/auth. The same gateway serves the same routes
in proxy mode on its own port, so one table of requests can go both ways and the statuses be
compared. Without /usr/sbin/nginx (Debian package nginx) the tests are skipped; with CI=true
they fail instead.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt
import orjson
import pytest
import trustme
import yaml
from yarl import URL

from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.server import Listening, listen
from gateway.settings import load_settings
from tests.conftest import IN_CI, REPO, echo_app, header_values, raw_request, start_server
from tests.test_login import HTML, Clock, follow, free_port, submit_login

NGINX = Path("/usr/sbin/nginx")
DOC = REPO / "docs" / "forward-auth.md"
SECRET = "gateway-client-secret"
COOKIE = "__Host-gateway"  # sessions.cookie_name's default, as in the doc's example
USERS = {
    "alice": DevUser("alice", "alice-pw", groups=("sre",)),
    "bob": DevUser("bob", "bob-pw", groups=("finance",)),
    "carol": DevUser("carol", "carol-pw", groups=("sre", "app-admins")),
}


def doc_example() -> str:
    """The nginx block of docs/forward-auth.md, between its markers, without the fence."""
    text = DOC.read_text()
    found = re.search(
        r"<!-- nginx-example:start -->\n```nginx\n(.*?)```\n<!-- nginx-example:end -->", text, re.S
    )
    assert found, f"{DOC} lost its nginx example markers"
    return found[1]


def nginx_conf(prefix: Path, port: int, gateway: int, upstream: int, cert: Path, key: Path) -> str:
    """The doc's example with this test's addresses, inside a main context like bench/run.py's."""
    example = doc_example()
    for old, new in {
        "listen 443 ssl": f"listen 127.0.0.1:{port} ssl",
        "server_name app.example.org;": "server_name 127.0.0.1;",
        "server 10.0.0.2:8443;": f"server 127.0.0.1:{gateway};",
        "server 10.0.0.3:3000;": f"server 127.0.0.1:{upstream};",
        "/etc/nginx/tls/app.crt": str(cert),
        "/etc/nginx/tls/app.key": str(key),
    }.items():
        assert old in example, f"the nginx example in {DOC.name} no longer has {old!r}"
        example = example.replace(old, new)
    temp = "".join(
        f"    {kind}_temp_path {prefix / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, the workers would become `nobody`, who cannot enter pytest's private tmp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\ndaemon off;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n    access_log off;\n{temp}{example}}}\n"
    )


def nginx_binary() -> Path:
    if not NGINX.exists():
        reason = f"{NGINX} is absent (Debian package nginx, which .ci/run installs)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(f"{reason}; with CI=true this fails")
    return NGINX


def start_nginx(prefix: Path, conf: str) -> subprocess.Popen[bytes]:
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(conf)
    argv = [str(nginx_binary()), "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    return subprocess.Popen([*argv, "-e", str(prefix / "error.log")])


async def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll the port until it accepts (nginx has no readiness signal), with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited with {proc.returncode}:\n{log.read_text()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)  # the poll interval, not a wait for something to happen
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"nginx did not listen on {port} within 10 s:\n{log.read_text()}")


def routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {
            "id": "app",
            "path": "/app",
            "upstream": upstream,
            "policy": {
                "allow": [
                    {"groups": ["sre"]},
                    {"groups": ["finance"], "methods": ["GET", "HEAD"]},
                    {"clients": ["reporting-job"], "methods": ["GET"]},
                ],
                "deny": [{"paths": ["/admin/**"], "groups_not": ["app-admins"]}],
            },
        },
        {
            "id": "vault",
            "path": "/vault",
            "upstream": upstream,
            "policy": {"allow": [{"groups": ["app-admins"]}]},
        },
        {
            "id": "fresh",
            "path": "/fresh",
            "upstream": upstream,
            "policy": {"max_auth_age": "1m", "allow": [{"groups": ["sre"]}]},
        },
        {"id": "open", "path": "/open", "upstream": upstream, "public": True},
        # a public route on another host: nginx must never let a client ask about it
        {"id": "other", "host": "other.test", "path": "/", "upstream": upstream, "public": True},
    ]


def gateway_config(
    public_url: str, issuer: str, upstream: str, tmp: Path, trusted: list[str]
) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:0", "public_url": public_url, "trusted_proxies": trusted},
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
        "audit": {"dir": str(tmp / "audit")},
        "routes": routes(upstream),
    }


async def start_gateway(tmp: Path, name: str, config: dict[str, Any], clock: Clock) -> Listening:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return await listen(load_settings(path), shutdown_timeout=2, clock=clock)


@dataclass
class Env:
    gateway: Listening
    idp: DevIdP
    clock: Clock
    base: str  # https://127.0.0.1:PORT: nginx, and the gateway's public_url
    direct: str  # http://127.0.0.1:PORT: the gateway itself, in proxy mode
    tls: ssl.SSLContext  # trusts nginx's certificate
    tmp: Path
    clients: list[aiohttp.ClientSession] = field(default_factory=list)

    def browser(self) -> aiohttp.ClientSession:
        """A browser: its own cookie jar; closed when the test ends."""
        jar = aiohttp.CookieJar(unsafe=True)
        return self._keep(aiohttp.ClientSession(connector=self._tcp(), cookie_jar=jar))

    def client(self, **connector: Any) -> aiohttp.ClientSession:
        """A client that keeps no cookies: every header it sends is given by the test."""
        jar = aiohttp.DummyCookieJar()
        return self._keep(aiohttp.ClientSession(connector=self._tcp(**connector), cookie_jar=jar))

    def _tcp(self, **options: Any) -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(ssl=self.tls, **options)

    def _keep(self, session: aiohttp.ClientSession) -> aiohttp.ClientSession:
        self.clients.append(session)
        return session


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    nginx_binary()
    clock = Clock()
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    client = DevClient("gateway", SECRET, redirect_uris=(f"{base}/.gateway/callback",))
    idp = DevIdP(USERS, [client], clock=clock)
    issuer = await idp.start()
    upstream = await start_server(echo_app())
    ca = trustme.CA()
    cert, key = tmp_path / "app.crt", tmp_path / "app.key"
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    tls = ssl.create_default_context()
    ca.configure_trust(tls)
    trusted = ["127.0.0.1/32"]
    config = gateway_config(base, issuer, upstream.url, tmp_path, trusted)
    gateway = await start_gateway(tmp_path, "gateway", config, clock)
    prefix = tmp_path / "nginx"
    conf = nginx_conf(prefix, port, gateway.port, upstream.port, cert, key)
    nginx = start_nginx(prefix, conf)
    env = Env(gateway, idp, clock, base, f"http://127.0.0.1:{gateway.port}", tls, tmp_path)
    try:
        await wait_listening(port, nginx, prefix / "error.log")
        yield env
    finally:
        for session in env.clients:
            await session.close()
        nginx.terminate()
        nginx.wait(timeout=10)
        await gateway.stop()
        await upstream.runner.cleanup()
        await idp.stop()


async def sign_in(env: Env, user: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    """A browser logs in through nginx (login redirect, IdP, callback); the page it lands on."""
    browser = env.browser()
    page = await follow(browser, env.base + "/app/x")
    assert page.url.port == URL(env.idp.issuer).port, page.url  # at the IdP's login form
    callback = await submit_login(browser, page, user, f"{user}-pw")
    assert callback.startswith(env.base + "/.gateway/callback?"), callback
    return browser, await follow(browser, callback)


def session_cookie(browser: aiohttp.ClientSession) -> str:
    return next(f"{c.key}={c.value}" for c in browser.cookie_jar if c.key == COOKIE)


async def seen_upstream(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.status == 200, await response.text()
    seen: dict[str, Any] = orjson.loads(await response.read())
    return seen


def identity(seen: dict[str, Any]) -> dict[str, list[str]]:
    names = ("X-Auth-Request-User", "X-Auth-Request-Email", "X-Auth-Request-Groups")
    return {name: header_values(seen, name) for name in names}


# -- signing in through nginx ------------------------------------------------------------------


async def test_a_browser_signs_in_through_nginx_and_the_app_sees_who(env: Env) -> None:
    browser = env.browser()
    first = await browser.get(env.base + "/app/x?q=1", headers=HTML, allow_redirects=False)
    assert first.status == 302
    location = urlsplit(first.headers["Location"])
    assert location.path == "/.gateway/login"
    assert parse_qs(location.query)["rd"] == [env.base + "/app/x?q=1"]

    page = await follow(browser, first.headers["Location"])
    callback = await submit_login(browser, page, "alice", "alice-pw")
    landed = await follow(browser, callback)
    seen = await seen_upstream(landed)
    assert str(landed.url) == env.base + "/app/x?q=1"  # back where the browser started
    assert seen["raw_path"] == "/app/x?q=1"
    assert identity(seen) == {
        "X-Auth-Request-User": ["alice@example.org"],
        "X-Auth-Request-Email": ["alice@example.org"],
        "X-Auth-Request-Groups": ["sre"],
    }
    assert len(header_values(seen, "X-Request-Id")) == 1
    # the session cookie stays between the browser, nginx and the gateway (the IdP's passes)
    assert not any(COOKIE in cookie for cookie in header_values(seen, "Cookie"))

    # the assertion verifies against the JWKS published through nginx, as an app would do it
    [token] = header_values(seen, "X-Gateway-Assertion")
    jwks = await browser.get(env.base + "/.gateway/jwks.json")
    keys = jwt.PyJWKSet.from_json(await jwks.text())
    claims = jwt.decode(
        token,
        keys[jwt.get_unverified_header(token)["kid"]],
        algorithms=["ES256"],
        audience="app",
        issuer=env.base,
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
    )
    assert claims["email"] == "alice@example.org" and claims["groups"] == ["sre"]

    # proxy mode tells the upstream the same about the same session
    direct = env.client()
    cookie = {"Cookie": session_cookie(browser), **HTML}
    proxied = await seen_upstream(await direct.get(env.direct + "/app/x?q=1", headers=cookie))
    assert identity(proxied) == identity(seen)
    [direct_token] = header_values(proxied, "X-Gateway-Assertion")
    direct_claims = jwt.decode(direct_token, options={"verify_signature": False})
    assert stable(direct_claims) == stable(claims)


def stable(claims: dict[str, Any]) -> dict[str, Any]:
    """An assertion's claims without those that name the token rather than the caller."""
    return {k: v for k, v in claims.items() if k not in ("jti", "iat", "nbf", "exp")}


# -- nginx decides exactly as proxy mode -------------------------------------------------------

PATHS = [
    "/app/x",
    "/app/x?q=1&r=2",
    "/app/admin/y",
    "/app/a/../admin/y",  # the raw target reaches the gateway; it resolves '..' itself
    "/app//admin/y",
    "/app/%61dmin/y",  # an encoded unreserved letter: still /app/admin/y
    "/vault/k",
    "/open/p",
]
METHODS = ["GET", "POST", "DELETE"]
# browser and script: no session; service: a bearer token of the client reporting-job
CALLERS = ["browser", "script", "service", "alice", "bob", "carol"]


def bearer(env: Env) -> str:
    now = int(env.clock.now)
    claims = {
        "iss": env.idp.issuer,
        "aud": "reports-api",
        "sub": "svc-1",
        "azp": "reporting-job",
        "iat": now,
        "exp": now + 300,
    }
    return env.idp.mint_token({"alg": "RS256", "kid": env.idp.current_kid}, claims, "rs256")


async def test_nginx_and_proxy_mode_decide_alike(env: Env) -> None:
    credentials = {
        "browser": {},
        "script": {},
        "service": {"Authorization": f"Bearer {bearer(env)}"},
    }
    for user in ("alice", "bob", "carol"):
        browser, _ = await sign_in(env, user)
        credentials[user] = {"Cookie": session_cookie(browser)}
    client = env.client(limit=16)  # nginx holds three connections for each request in flight

    async def status(base: str, caller: str, method: str, path: str) -> int:
        html = {} if caller in ("script", "service") else HTML
        headers = {**html, **credentials[caller]}
        url = URL(base + path, encoded=True)
        async with client.request(method, url, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            return resp.status

    cases = [(c, m, p) for c in CALLERS for m in METHODS for p in PATHS]
    via_nginx = await asyncio.gather(*(status(env.base, *case) for case in cases))
    via_proxy = await asyncio.gather(*(status(env.direct, *case) for case in cases))
    table = {case: (n, p) for case, n, p in zip(cases, via_nginx, via_proxy, strict=True)}
    differ = {case: both for case, both in table.items() if both[0] != both[1]}
    assert differ == {}, "(nginx, proxy mode) statuses differ"
    # and the table is not trivial: each kind of answer is in it
    assert table[("alice", "POST", "/app/x")] == (200, 200)
    assert table[("bob", "POST", "/app/x")] == (403, 403)
    assert table[("alice", "GET", "/app/a/../admin/y")] == (403, 403)
    assert table[("carol", "DELETE", "/app//admin/y")] == (200, 200)
    assert table[("bob", "GET", "/vault/k")] == (403, 403)
    assert table[("browser", "GET", "/app/x")] == (302, 302)
    assert table[("browser", "POST", "/app/x")] == (401, 401)
    assert table[("script", "GET", "/vault/k")] == (401, 401)
    assert table[("script", "DELETE", "/open/p")] == (200, 200)
    assert table[("service", "GET", "/app/x")] == (200, 200)
    assert table[("service", "POST", "/app/x")] == (403, 403)


async def test_what_no_route_serves_is_refused_and_the_question_is_not_public(env: Env) -> None:
    client = env.client()
    for path, through_nginx, directly in [
        ("/nothing", 403, 404),  # no route: forward-auth refuses (403), proxy mode says 404
        ("/.gateway/auth", 404, 403),  # nginx blocks it; asked directly, half a question: 403
        ("/.gateway-auth", 404, 404),  # nginx's internal location
    ]:
        resp = await client.get(env.base + path, headers={"X-Forwarded-Uri": "/app/x"})
        assert resp.status == through_nginx, path
        resp = await client.get(env.direct + path, headers={"X-Forwarded-Uri": "/app/x"})
        assert resp.status == directly, path


# -- headers from the client -------------------------------------------------------------------

FORGED = "forged-by-client"
SPEC7 = [
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Groups",
    "X-Auth-Request-Preferred-Username",
    "X-Auth-Request-Access-Token",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "Remote-User",
    "Remote-Groups",
    "Remote-Email",
    "X-Gateway-Assertion",
    "Forwarded",
    "X-Real-IP",
    "True-Client-IP",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Forwarded-Prefix",
    "X-Forwarded-Port",
    "X-Forwarded-Uri",
    "X-Forwarded-Method",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-For",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
]


def forged_headers() -> list[tuple[str, str]]:
    """Every SPEC §7 header as sent, lower-cased, upper-cased and with '_' for '-'."""
    spellings = [(n, n.lower(), n.upper(), n.replace("-", "_")) for n in SPEC7]
    return [(spelling, FORGED) for names in spellings for spelling in names]


async def test_forged_identity_headers_never_reach_the_app(env: Env) -> None:
    browser, _ = await sign_in(env, "alice")
    ours = session_cookie(browser)
    client = env.client()
    cookie = f"theirs=1; {ours}; {COOKIE}-login=stale; more=2"
    for path, user in [("/app/x", ["alice@example.org"]), ("/open/p", [])]:
        headers = [*forged_headers(), ("Cookie", cookie)]
        seen = await seen_upstream(await client.get(env.base + path, headers=headers))
        leaked = [(k, v) for k, v in seen["headers"] if FORGED in v or "_" in k]
        assert leaked == [], path
        assert header_values(seen, "X-Auth-Request-User") == user
        assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
        assert header_values(seen, "X-Forwarded-Proto") == ["https"]
        assert header_values(seen, "X-Forwarded-Host") == ["127.0.0.1"]
        assert header_values(seen, "Cookie") == ["theirs=1; more=2"]  # ours taken out, theirs kept


async def test_the_client_cannot_change_the_question(env: Env) -> None:
    bob, _ = await sign_in(env, "bob")
    client = env.client()
    lies = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/open/p"}
    resp = await client.post(env.base + "/app/x", headers={"Cookie": session_cookie(bob), **lies})
    assert resp.status == 403  # bob may only read /app, whatever he says he asks for
    # two copies of each: nginx replaces them all (a copy left over would make the question a 403)
    also = [*lies.items(), *lies.items(), *[("X-Forwarded-Host", "other.test")] * 2, *HTML.items()]
    resp = await client.get(env.base + "/vault/k", headers=also, allow_redirects=False)
    assert resp.status == 302  # no session: to the login, not into the vault
    assert urlsplit(resp.headers["Location"]).path == "/.gateway/login"


async def test_a_host_nginx_does_not_serve_never_reaches_the_question(env: Env) -> None:
    client = env.client()
    # the gateway would say yes: `other.test` is a public route ...
    ask = {"X-Forwarded-Method": "GET", "X-Forwarded-Host": "other.test", "X-Forwarded-Uri": "/"}
    assert (await client.get(env.direct + "/.gateway/auth", headers=ask)).status == 200
    # ... so nginx must not ask about it on this app's behalf: its default server answers 421
    resp = await client.get(env.base + "/vault/k", headers={"Host": "other.test"})
    assert resp.status == 421


# -- who may ask, and what ---------------------------------------------------------------------


def loopback_alias_usable() -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True


async def test_forward_auth_answers_trusted_proxies_only(env: Env) -> None:
    alice, _ = await sign_in(env, "alice")
    ask = {
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Host": "127.0.0.1",
        "X-Forwarded-Uri": "/app/x",
        "Cookie": session_cookie(alice),
    }
    url = env.direct + "/.gateway/auth"
    trusted = await env.client().get(url, headers=ask)
    assert trusted.status == 200  # from 127.0.0.1, the trusted proxy: the identity
    assert trusted.headers["X-Auth-Request-User"] == "alice@example.org"
    # through nginx every asker would be that trusted proxy: the doc's nginx never passes it on
    relayed = await env.client().get(env.base + "/.gateway/auth", headers=ask)
    assert relayed.status == 404
    assert "X-Auth-Request-User" not in relayed.headers
    if loopback_alias_usable():  # Linux: all of 127/8 is loopback
        untrusted = await env.client(local_addr=("127.0.0.2", 0)).get(url, headers=ask)
        assert untrusted.status == 403
        assert (await untrusted.json())["reason"] == "not-trusted"
        assert "X-Auth-Request-User" not in untrusted.headers
    # a gateway that trusts only 10/8 refuses 127.0.0.1 the same way
    config = gateway_config(env.base, env.idp.issuer, env.direct, env.tmp, ["10.0.0.0/8"])
    config["audit"]["dir"] = str(env.tmp / "audit-untrusting")  # each process its own chain
    other = await start_gateway(env.tmp, "untrusting", config, env.clock)
    try:
        resp = await env.client().get(f"http://127.0.0.1:{other.port}/.gateway/auth", headers=ask)
        assert resp.status == 403
        assert (await resp.json())["reason"] == "not-trusted"
    finally:
        await other.stop()


QUESTION = ("X-Forwarded-Method: GET", "X-Forwarded-Host: 127.0.0.1", "X-Forwarded-Uri: /app/x")
METHOD, HOST, URI = QUESTION
AMBIGUOUS = {
    "two uris": (METHOD, HOST, URI, "X-Forwarded-Uri: /open/p"),
    "two methods": (METHOD, "X-Forwarded-Method: POST", HOST, URI),
    "two hosts": (METHOD, HOST, "X-Forwarded-Host: other.test", URI),
    "no host": (METHOD, URI),
    "no method": (HOST, URI),
    "no uri": (METHOD, HOST),
    "empty uri": (METHOD, HOST, "X-Forwarded-Uri: "),
    "lower-case method": ("X-Forwarded-Method: get", HOST, URI),
    "method with a target": ("X-Forwarded-Method: GET /vault/k", HOST, URI),
    "absolute-form uri": (METHOD, HOST, "X-Forwarded-Uri: https://127.0.0.1/app/x"),
    "relative uri": (METHOD, HOST, "X-Forwarded-Uri: app/x"),
    "..%2f": (METHOD, HOST, "X-Forwarded-Uri: /app/..%2fvault/k"),
    "%2e%2e": (METHOD, HOST, "X-Forwarded-Uri: /app/%2e%2e/vault/k"),
    "%00": (METHOD, HOST, "X-Forwarded-Uri: /app/x%00.html"),
    "raw backslash": (METHOD, HOST, "X-Forwarded-Uri: /app\\..\\vault"),
    "semicolon": (METHOD, HOST, "X-Forwarded-Uri: /app/x;jsessionid=1"),
    "above the root": (METHOD, HOST, "X-Forwarded-Uri: /../app/x"),
    "double encoding": (METHOD, HOST, "X-Forwarded-Uri: /app/%252e%252e/vault"),
    "overlong utf-8": (METHOD, HOST, "X-Forwarded-Uri: /app/%c0%ae%c0%ae/vault"),
    "host not served": (METHOD, "X-Forwarded-Host: evil.test", URI),
    "malformed host": (METHOD, "X-Forwarded-Host: 127.0.0.1:x", URI),
    "a gateway path": (METHOD, HOST, "X-Forwarded-Uri: /.gateway/jwks.json"),
    "no route": (METHOD, HOST, "X-Forwarded-Uri: /nothing"),
}


def question(cookie: str, lines: tuple[str, ...]) -> bytes:
    asked = "".join(f"{line}\r\n" for line in lines)
    return (
        f"GET /.gateway/auth HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n{asked}"
        "Connection: close\r\n\r\n"
    ).encode()


async def test_ambiguous_questions_are_refused_with_403(env: Env) -> None:
    alice, _ = await sign_in(env, "alice")
    cookie = session_cookie(alice)
    port = env.gateway.port
    control, _, _ = await raw_request(port, question(cookie, QUESTION))
    assert control == 200  # the same question, asked once and well: the refusals are the input
    statuses = {
        name: (await raw_request(port, question(cookie, q)))[0] for name, q in AMBIGUOUS.items()
    }
    assert statuses == dict.fromkeys(AMBIGUOUS, 403)
    # through nginx, a path the gateway will not read is a 403 too, never nginx's 500
    client = env.client()
    for path in ("/app/..%2fvault/k", "/app/%2e%2e/vault/k", "/app/%252e%252e/vault/k"):
        resp = await client.get(URL(env.base + path, encoded=True), headers={"Cookie": cookie})
        assert resp.status == 403, path


async def test_two_session_cookies_are_a_403_not_a_500(env: Env) -> None:
    """Cookie tossing is ambiguous input: a 403, since nginx turns a 400 into a 500 (SPEC §7)."""
    alice, _ = await sign_in(env, "alice")
    tossed = f"{session_cookie(alice)}; {COOKIE}=planted"
    direct, _, body = await raw_request(env.gateway.port, question(tossed, QUESTION))
    through_nginx = (await env.client().get(env.base + "/app/x", headers={"Cookie": tossed})).status
    assert (direct, through_nginx) == (403, 403), body


# -- a route that wants a recent sign-in -------------------------------------------------------


async def test_a_stale_sign_in_is_sent_back_to_the_idp_through_nginx(env: Env) -> None:
    """max_auth_age: proxy mode logs in again with max_age; through nginx it must, too."""
    alice, _ = await sign_in(env, "alice")
    env.clock.now += 120  # the sign-in is now older than the route's max_auth_age (1m)
    direct = await env.client().get(
        env.direct + "/fresh/x",
        headers={"Cookie": session_cookie(alice), **HTML},
        allow_redirects=False,
    )
    assert direct.status == 302
    assert "max_age=60" in direct.headers["Location"]  # proxy mode: a login that forces max_age
    hops, url = [], env.base + "/fresh/x"
    for _ in range(6):
        resp = await alice.get(url, headers=HTML, allow_redirects=False)
        await resp.read()
        if resp.status not in (301, 302, 303) or url.startswith(env.idp.issuer):
            break
        url = str(URL(url).join(URL(resp.headers["Location"])))
        hops.append(url)
    at_idp = [hop for hop in hops if hop.startswith(env.idp.issuer)]
    assert at_idp and "max_age=60" in at_idp[0], f"nginx never reached the IdP: {hops}"
