"""The whole login over real HTTP: a browser, the gateway, the dev IdP and an upstream (SPEC §5).

The gateway's public_url is http://127.0.0.1:PORT and a second route lives on the host
`localhost`, so an ordinary cookie jar keeps the two hosts' cookies apart as a browser would.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
import yaml
from yarl import URL

from gateway.devidp import DevClient, DevIdP, DevUser, TokenOverride
from gateway.server import Listening, listen
from gateway.settings import load_settings
from tests.conftest import Server, echo_app, start_server
from tests.test_oidc import ATTACKS

SECRET = "gateway-client-secret"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Env:
    gateway: Listening
    idp: DevIdP
    upstream: Server
    clock: Clock
    base: str  # http://127.0.0.1:PORT, the public_url
    other: str  # http://localhost:PORT, the second route host
    events: list[dict[str, Any]] = field(default_factory=list)
    browsers: list[aiohttp.ClientSession] = field(default_factory=list)

    def browser(self) -> aiohttp.ClientSession:
        """A new browser (its own cookie jar); closed when the test ends."""
        browser = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.browsers.append(browser)
        return browser

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]


class _Events(logging.Handler):
    def __init__(self, into: list[dict[str, Any]]) -> None:
        super().__init__()
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(dict(vars(record)))


def config(port: int, idp: str, upstream: str, tmp: Path, **sessions: Any) -> dict[str, Any]:
    key = base64.b64encode(os.urandom(32)).decode()
    policy = {
        "allow": [{"groups": ["sre", "finance", "engineering"]}, {"clients": ["reporting-job"]}]
    }
    return {
        "server": {"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"},
        "identity": {
            "issuer": idp,
            "client_id": "gateway",
            "client_secret": SECRET,
            "scopes": ["openid", "email", "groups"],
            "api_audiences": ["reports-api"],
        },
        "state": {"sessions": "memory://", "records": "memory://", "keys": [key]},
        "sessions": {"cookie_name": "gateway", **sessions},
        "audit": {"dir": str(tmp / "audit")},
        "routes": [
            {
                "id": "app",
                "path": "/app",
                "upstream": upstream,
                "policy": policy,
                "websocket": True,
            },
            {
                "id": "other",
                "host": "localhost",
                "path": "/",
                "upstream": upstream,
                "policy": policy,
            },
            {
                "id": "short",
                "path": "/short",
                "upstream": upstream,
                "policy": policy,
                "idle_timeout": "1m",
            },
            {"id": "open", "path": "/open", "upstream": upstream, "public": True},
        ],
    }


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = Clock()
    port = free_port()
    users = {
        "alice": DevUser("alice", "alice-pw", groups=("sre",)),
        "bob": DevUser("bob", "bob-pw", groups=("finance",)),
    }
    client = DevClient(
        "gateway",
        SECRET,
        redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",),
        post_logout_redirect_uris=(f"http://127.0.0.1:{port}/",),
        backchannel_logout_uri=f"http://127.0.0.1:{port}/.gateway/backchannel-logout",
    )
    idp = DevIdP(users, [client], clock=clock)
    issuer = await idp.start()
    upstream = await start_server(echo_app())
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config(port, issuer, upstream.url, tmp_path)))
    events: list[dict[str, Any]] = []
    handler, event_log = _Events(events), logging.getLogger("gateway.events")
    event_log.addHandler(handler)
    level = event_log.level
    event_log.setLevel(logging.INFO)
    gateway = await listen(load_settings(path), shutdown_timeout=2, clock=clock)
    env = Env(
        gateway,
        idp,
        upstream,
        clock,
        f"http://127.0.0.1:{port}",
        f"http://localhost:{port}",
        events,
    )
    yield env
    for browser in env.browsers:
        await browser.close()
    event_log.removeHandler(handler)
    event_log.setLevel(level)
    await gateway.stop()
    await upstream.runner.cleanup()
    await idp.stop()


HTML = {"Accept": "text/html"}


async def follow(
    browser: aiohttp.ClientSession,
    url: str,
    *,
    method: str = "GET",
    data: dict[str, str] | None = None,
    stop_at: str | None = None,
    limit: int = 10,
) -> aiohttp.ClientResponse:
    """Follow redirects by hand (so each hop is visible); stop early at a URL prefix."""
    for _ in range(limit):
        resp = await browser.request(method, url, data=data, headers=HTML, allow_redirects=False)
        await resp.read()
        if resp.status not in (301, 302, 303):
            return resp
        url = str(URL(url).join(URL(resp.headers["Location"])))
        method, data = "GET", None
        if stop_at is not None and url.startswith(stop_at):
            resp.release()
            return resp
    raise AssertionError("too many redirects")


async def submit_login(
    browser: aiohttp.ClientSession, page: aiohttp.ClientResponse, username: str, password: str
) -> str:
    """Fill the IdP's login form; the URL the IdP redirects to (our callback)."""
    text = await page.text()
    fields = {
        html.unescape(n): html.unescape(v)
        for n, v in re.findall(r'type="hidden" name="([^"]*)" value="([^"]*)"', text)
    }
    action = html.unescape(re.search(r'<form method="post" action="([^"]*)"', text)[1])  # type: ignore[index]
    url = str(page.url.join(URL(action)))
    resp = await browser.post(
        url, data={**fields, "username": username, "password": password}, allow_redirects=False
    )
    assert resp.status == 302, await resp.text()
    return resp.headers["Location"]


async def login_until_callback(
    env: Env, browser: aiohttp.ClientSession, path: str = "/app/x", user: str = "alice"
) -> str:
    page = await follow(browser, env.base + path)
    assert page.status == 200 and page.url.port == URL(env.idp.issuer).port, page.url
    return await submit_login(browser, page, user, f"{user}-pw")


async def signed_in(env: Env, path: str = "/app/x", user: str = "alice") -> aiohttp.ClientSession:
    browser = env.browser()
    callback = await login_until_callback(env, browser, path, user)
    final = await follow(browser, callback)
    assert final.status == 200, await final.text()
    return browser


async def test_full_login_reaches_the_upstream(env: Env) -> None:
    browser = env.browser()
    first = await browser.get(env.base + "/app/x?q=1", headers=HTML, allow_redirects=False)
    assert first.status == 302
    assert first.headers["Location"].startswith(env.base + "/.gateway/login?rd=")
    callback = await login_until_callback(env, browser, "/app/x?q=1")
    final = await follow(browser, callback)
    assert final.status == 200
    seen = orjson.loads(await final.read())
    assert seen["raw_path"] == "/app/x?q=1"
    cookies = [v for k, v in seen["headers"] if k.lower() == "cookie"]
    assert not any("gateway=" in c for c in cookies)  # our session cookie never goes upstream
    [login] = env.events_of("auth.login")
    assert login["user"] == "alice@example.org"
    # the session works for later requests without another trip to the IdP
    again = await browser.get(env.base + "/app/y", headers=HTML, allow_redirects=False)
    assert again.status == 200


async def test_api_clients_get_401_with_a_challenge(env: Env) -> None:
    async with aiohttp.ClientSession() as client:
        resp = await client.get(env.base + "/app/x", headers={"Accept": "application/json"})
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["reason"] == "no-session"
        public = await client.get(env.base + "/open/x")
        assert public.status == 200


def no_session_created(env: Env) -> None:
    assert env.events_of("session.created") == []
    assert env.events_of("auth.login") == []


def failure_reasons(env: Env) -> list[str]:
    return [e["reason"] for e in env.events_of("auth.login_failed")]


async def test_tampered_state_is_refused(env: Env) -> None:
    browser = env.browser()
    callback = await login_until_callback(env, browser)
    resp = await follow(browser, re.sub(r"state=[^&]+", "state=forged", callback))
    assert resp.status == 400
    no_session_created(env)
    assert failure_reasons(env) == ["bad-state"]


async def test_reused_state_is_refused(env: Env) -> None:
    browser = env.browser()
    callback = await login_until_callback(env, browser)
    login_state = next(c.value for c in browser.cookie_jar if c.key == "gateway-login")
    assert (await follow(browser, callback)).status == 200
    # an attacker holding both the callback URL and the login-state cookie replays them
    replay = env.browser()
    replay.cookie_jar.update_cookies({"gateway-login": login_state}, URL(env.base))
    resp = await follow(replay, callback)
    assert resp.status == 400
    assert "reused-state" in failure_reasons(env)


async def test_foreign_state_is_refused(env: Env) -> None:
    victim, attacker = env.browser(), env.browser()
    await follow(victim, env.base + "/app/x")  # the victim has a login state of their own
    attackers_callback = await login_until_callback(env, attacker, user="bob")
    resp = await follow(victim, attackers_callback)  # login CSRF: bob's code in alice's browser
    assert resp.status == 400
    no_session_created(env)
    assert failure_reasons(env) == ["bad-state"]


async def test_expired_state_is_refused(env: Env) -> None:
    browser = env.browser()
    callback = await login_until_callback(env, browser)
    env.clock.now += 601
    resp = await follow(browser, callback)
    assert resp.status == 400
    no_session_created(env)
    assert failure_reasons(env) == ["expired-state"]


async def test_op_error_response_is_refused(env: Env) -> None:
    browser = env.browser()
    callback = await login_until_callback(env, browser)
    state = re.search(r"state=([^&]+)", callback)[1]  # type: ignore[index]
    resp = await follow(browser, f"{env.base}/.gateway/callback?error=access_denied&state={state}")
    assert resp.status == 400
    no_session_created(env)
    assert failure_reasons(env) == ["op-error:access_denied"]


@pytest.mark.parametrize("case", sorted(ATTACKS))
async def test_forged_id_tokens_create_no_session(env: Env, case: str) -> None:
    override: TokenOverride = ATTACKS[case]
    env.idp.id_token_hook = lambda header, claims: override
    env.clock.now += 120  # let an unknown kid be looked up again
    browser = env.browser()
    callback = await login_until_callback(env, browser)
    resp = await follow(browser, callback)
    assert resp.status == 400
    body = await resp.text()
    assert "Traceback" not in body
    no_session_created(env)
    assert failure_reasons(env) == [case.split("/")[0]]


async def test_userinfo_for_another_subject_creates_no_session(env: Env) -> None:
    env.idp.userinfo_hook = lambda claims: {**claims, "sub": "mallory"}
    browser = env.browser()
    resp = await follow(browser, await login_until_callback(env, browser))
    assert resp.status == 400
    no_session_created(env)
    assert failure_reasons(env) == ["userinfo-sub-mismatch"]


@pytest.mark.parametrize(
    "rd",
    [
        "//evil.com",
        "/\\evil.com",
        "/%09/evil.com",
        "https://evil.com",
        "https://localhost.evil.com",
        "https://localhost@evil.com",
        "http://evil.com@127.0.0.1",
        "javascript:alert(1)",
    ],
)
async def test_open_redirects_end_on_root(env: Env, rd: str) -> None:
    browser = env.browser()
    from urllib.parse import quote, unquote

    value = unquote(rd) if rd.startswith("/%") else rd
    page = await follow(browser, f"{env.base}/.gateway/login?rd={quote(value, safe='')}")
    callback = await submit_login(browser, page, "alice", "alice-pw")
    resp = await browser.get(callback, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/"


async def test_a_second_host_is_reached_through_the_handoff(env: Env) -> None:
    browser = await signed_in(env)
    first = await browser.get(env.other + "/page", headers=HTML, allow_redirects=False)
    assert first.status == 302  # no cookie on this host yet: to the login, on public_url's host
    handoff = await browser.get(first.headers["Location"], allow_redirects=False)
    location = handoff.headers["Location"]
    assert location.startswith(env.other + "/.gateway/handoff?code=")  # no second IdP trip
    landed = await follow(browser, location)
    assert landed.status == 200
    assert orjson.loads(await landed.read())["raw_path"] == "/page"
    replay = env.browser()
    resp = await replay.get(location, headers=HTML, allow_redirects=False)
    assert resp.status == 400  # a handoff code works once


async def test_two_session_cookies_are_refused(env: Env) -> None:
    async with aiohttp.ClientSession() as client:
        resp = await client.get(env.base + "/app/x", headers={"Cookie": "gateway=a; gateway=b"})
        assert resp.status == 400
        assert (await resp.json())["reason"] == "bad-cookie"


async def test_the_upstream_cannot_set_the_gateways_cookies(env: Env) -> None:
    browser = await signed_in(env)
    resp = await browser.get(
        env.base + "/app/x?set-cookie=gateway,gateway-login,theirs", headers=HTML
    )
    assert resp.status == 200
    names = [c.split("=", 1)[0] for c in resp.headers.getall("Set-Cookie", [])]
    assert names == ["theirs"]
    again = await browser.get(env.base + "/app/y", headers=HTML, allow_redirects=False)
    assert again.status == 200  # the session cookie was not overwritten


def bearer(env: Env, audience: str, signing: str = "rs256", **claims: Any) -> str:
    now = int(env.clock.now)
    body = {
        "iss": env.idp.issuer,
        "aud": audience,
        "sub": "svc-1",
        "azp": "reporting-job",
        "iat": now,
        "exp": now + 300,
        **claims,
    }
    header = {"alg": "none"} if signing == "none" else {"alg": "RS256", "kid": env.idp.current_kid}
    return env.idp.mint_token(header, body, signing)  # type: ignore[arg-type]


async def test_service_clients_use_bearer_tokens(env: Env) -> None:
    async with aiohttp.ClientSession() as client:
        good = {"Authorization": f"Bearer {bearer(env, 'reports-api')}"}
        resp = await client.get(env.base + "/app/report", headers=good)
        assert resp.status == 200
        assert orjson.loads(await resp.read())["raw_path"] == "/app/report"
        for token in (
            bearer(env, "gateway"),
            bearer(env, "reports-api", "none"),
            bearer(env, "reports-api", exp=int(env.clock.now) - 3600),
            "garbage",
        ):
            resp = await client.get(
                env.base + "/app/report", headers={"Authorization": f"Bearer {token}"}
            )
            assert resp.status == 401
            assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
            assert (await resp.json())["reason"] == "bad-token"


# -- an IdP behind an internal CA ------------------------------------------------------------------


@pytest.mark.parametrize("trusted", [True, False])
async def test_an_idp_behind_an_internal_ca_is_reached_only_with_identity_ca_file(
    tmp_path: Path, trusted: bool
) -> None:
    ca = trustme.CA()
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(served)
    client = DevClient("gateway", SECRET, redirect_uris=("http://127.0.0.1/.gateway/callback",))
    idp = DevIdP({"alice": DevUser("alice", "alice-pw")}, [client])
    issuer = await idp.start(ssl_context=served)
    assert issuer.startswith("https://")
    port = free_port()
    settings = config(port, issuer, "http://127.0.0.1:9", tmp_path)
    if trusted:
        ca.cert_pem.write_to_path(str(tmp_path / "internal-ca.pem"))
        settings["identity"]["ca_file"] = str(tmp_path / "internal-ca.pem")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    gateway = await listen(load_settings(path), shutdown_timeout=2)
    try:
        async with aiohttp.ClientSession() as client:
            resp = await client.get(f"http://127.0.0.1:{port}/.gateway/readyz")
            checks = (await resp.json())["checks"]
        # SECURITY: verified either way: without the CA, the IdP's certificate is not trusted.
        assert checks["identity_provider"] == ("ok" if trusted else "unreachable")
    finally:
        await gateway.stop()
        await idp.stop()
