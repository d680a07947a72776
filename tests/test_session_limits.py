"""Session limits and revocation over real HTTP, on memory, SQLite and Redis (SPEC §4, §5).

A browser (an aiohttp client with a cookie jar) signs in at the dev IdP through a running
gateway; what it sees afterwards is asserted: the upstream reached or not, a redirect to
/.gateway/login for browsers, a 401 with a reason in JSON for API clients. Time moves by the
injected clock (shared by the gateway and the IdP), except in the one real-time case.

Redis is 127.0.0.1:6379, database 11, flushed before and after each test; without it the Redis
cases are skipped, except in CI (CI=true), where they fail. The Redis restart uses a private
redis-server of its own on a free port.
"""

from __future__ import annotations

import asyncio
import copy
import re
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError
from yarl import URL

from gateway.auth import Auth
from gateway.devidp import DevClient, DevIdP, DevUser, SigningMode
from gateway.server import Listening, listen
from gateway.sessions import Session
from gateway.settings import load_settings
from tests import test_login as login
from tests.conftest import IN_CI, Server, assertion_key, start_server
from tests.test_login import HTML, SECRET, Clock, follow, free_port, signed_in

WAIT = 5.0  # ceiling of every bounded wait
JSON = {"Accept": "application/json"}
IDLE = 15 * 60.0  # sessions.idle_timeout in test_login's config (the default)
REFRESH_DUE = 230.0  # the dev IdP's ID tokens live 300 s; the gateway refreshes at 3/4 of that
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
SESSION_REASONS = {"no-session", "session-idle", "session-expired", "session-revoked"}
USERS = {
    "alice": DevUser("alice", "alice-pw", groups=("sre",)),
    "bob": DevUser("bob", "bob-pw", groups=("finance",)),
}


class RealClock(Clock):
    """The wall clock, where a test needs real time to pass."""

    def __call__(self) -> float:
        return time.time()


@dataclass
class Env(login.Env):
    config: dict[str, Any] = field(default_factory=dict)
    tmp: Path = Path()
    hits: list[str] = field(default_factory=list)  # paths the upstream served
    peers: list[Listening] = field(default_factory=list)

    @property
    def auth(self) -> Auth:
        auth = self.gateway.gateway.auth
        assert auth is not None
        return auth


# -- the world: IdP, upstream, gateway ------------------------------------------------------------


def upstream_app(hits: list[str]) -> web.Application:
    """Echoes the path it served (and records it); a WebSocket echo at /app/ws."""

    async def echo(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"path": request.path})

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/app/ws", ws_echo)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


Tweak = Callable[[dict[str, Any]], None]


async def start_env(
    store_url: str,
    tmp: Path,
    *,
    real_time: bool = False,
    tweak: Tweak | None = None,
    **sessions: Any,
) -> Env:
    """test_login's world with another session store and `sessions:` settings."""
    tmp.mkdir(parents=True, exist_ok=True)
    clock = RealClock() if real_time else Clock()
    port = free_port()
    client = DevClient(
        "gateway",
        SECRET,
        redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",),
        post_logout_redirect_uris=(f"http://127.0.0.1:{port}/",),
        backchannel_logout_uri=f"http://127.0.0.1:{port}/.gateway/backchannel-logout",
    )
    idp = DevIdP(USERS, [client], clock=clock)
    issuer = await idp.start()
    hits: list[str] = []
    upstream: Server = await start_server(upstream_app(hits))
    config = login.config(port, issuer, upstream.url, tmp, **sessions)
    config["state"]["sessions"] = store_url
    if store_url.startswith("redis"):  # shared state: every process signs with one key
        config["assertion"] = {"signing_key_file": str(assertion_key(tmp))}
    if tweak is not None:
        tweak(config)
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = await listen(load_settings(path), shutdown_timeout=2, clock=clock)
    base, other = f"http://127.0.0.1:{port}", f"http://localhost:{port}"
    return Env(gateway, idp, upstream, clock, base, other, config=config, tmp=tmp, hits=hits)


async def start_peer(env: Env) -> Listening:
    """A second gateway process on the same state: the same config but its listen port."""
    config = copy.deepcopy(env.config)
    config["server"]["listen"] = f"127.0.0.1:{free_port()}"
    config["audit"]["dir"] = str(env.tmp / "audit-peer")  # each process keeps its own log
    path = env.tmp / f"peer-{len(env.peers)}.yaml"
    path.write_text(yaml.safe_dump(config))
    peer = await listen(load_settings(path), shutdown_timeout=2, clock=env.clock)
    env.peers.append(peer)
    return peer


async def stop_env(env: Env) -> None:
    for browser in env.browsers:
        await browser.close()
    for peer in env.peers:
        await peer.stop()
    await env.gateway.stop()
    await env.upstream.runner.cleanup()
    await env.idp.stop()


Launch = Callable[..., Awaitable[Env]]


@pytest.fixture
async def launch(store: str, tmp_path: Path) -> AsyncIterator[Launch]:
    """Start the world on the parametrized store: `await launch(max_per_user=2)`."""
    started: list[Env] = []

    async def start(**options: Any) -> Env:
        env = await start_env(store, tmp_path / f"env-{len(started)}", **options)
        started.append(env)
        return env

    yield start
    for env in started:
        await stop_env(env)


# -- what a user sees ---------------------------------------------------------------------------


async def outcome(
    env: Env, browser: aiohttp.ClientSession, path: str, *, base: str | None = None
) -> str:
    """As an API client: "ok" when the upstream served `path`, else the gateway's reason."""
    before = env.hits.count(path)
    resp = await browser.get((base or env.base) + path, headers=JSON, allow_redirects=False)
    body = await resp.read()
    reached = env.hits.count(path) > before
    if resp.status == 200:
        assert reached, f"{path}: 200 without reaching the upstream"
        return "ok"
    assert not reached, f"{path}: refused with {resp.status} but the upstream was reached"
    reason = str(orjson.loads(body)["reason"])
    if reason in SESSION_REASONS:
        assert resp.status == 401, (path, resp.status, reason)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    return reason


async def to_login(
    env: Env, browser: aiohttp.ClientSession, path: str, *, base: str | None = None
) -> bool:
    """As a browser: whether `path` sends it to the login (and not to the upstream)."""
    before = env.hits.count(path)
    resp = await browser.get((base or env.base) + path, headers=HTML, allow_redirects=False)
    await resp.read()
    assert env.hits.count(path) == before, f"{path} reached the upstream"
    return resp.status == 302 and resp.headers["Location"].startswith(
        env.base + "/.gateway/login?rd="
    )


def cookie_of(browser: aiohttp.ClientSession, url: str) -> str:
    morsel = browser.cookie_jar.filter_cookies(URL(url)).get("gateway")
    assert morsel is not None, f"no session cookie for {url}"
    return morsel.value


async def with_cookie(env: Env, cookie: str, path: str, *, base: str | None = None) -> str:
    """`outcome` for a client that presents exactly this session cookie (no jar)."""
    headers = {"Cookie": f"gateway={cookie}"}
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), headers=headers
    ) as client:
        return await outcome(env, client, path, base=base)


async def csrf_of(browser: aiohttp.ClientSession, url: str) -> str:
    page = await browser.get(url, headers=HTML, allow_redirects=False)
    assert page.status == 200, page.status
    found = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert found is not None, "the page has no CSRF token"
    return found[1]


async def post_form(
    browser: aiohttp.ClientSession, url: str, form: dict[str, str], origin: str | None
) -> aiohttp.ClientResponse:
    headers = {**HTML, **({"Origin": origin} if origin is not None else {})}
    resp = await browser.post(url, data=form, headers=headers, allow_redirects=False)
    await resp.read()
    return resp


async def sessions_of(env: Env, username: str) -> list[Session]:
    return await env.auth.sessions.of_user(env.idp.issuer, USERS[username].sub)


async def listing(env: Env, browser: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """The browser's own sessions, as /.gateway/sessions lists them in JSON."""
    resp = await browser.get(env.base + "/.gateway/sessions", headers=JSON)
    assert resp.status == 200
    found: list[dict[str, Any]] = (await resp.json())["sessions"]
    return found


async def session_of(env: Env, browser: aiohttp.ClientSession, username: str = "alice") -> Session:
    """The session this browser holds (found by its handle in /.gateway/sessions)."""
    [handle] = [s["handle"] for s in await listing(env, browser) if s["current"]]
    [session] = [s for s in await sessions_of(env, username) if s.handle == handle]
    return session


# -- 1. idle timeout ----------------------------------------------------------------------------


async def test_idle_timeout_with_activity_and_after(launch: Launch) -> None:
    env = await launch()
    api, browser = await signed_in(env), await signed_in(env)
    env.clock.now += IDLE - 1
    assert await outcome(env, api, "/app/1") == "ok"
    assert await outcome(env, browser, "/app/1b") == "ok"
    env.clock.now += IDLE - 1  # idle only since the previous request: that was activity
    assert await outcome(env, api, "/app/2") == "ok"
    assert await outcome(env, browser, "/app/2b") == "ok"
    env.clock.now += IDLE
    assert await outcome(env, api, "/app/3") == "session-idle"
    assert await outcome(env, api, "/app/4") == "session-revoked"  # it was ended, not just refused
    assert await to_login(env, browser, "/app/5")
    assert await outcome(env, browser, "/app/6") == "session-revoked"


async def test_idle_timeout_in_real_time(launch: Launch) -> None:
    def no_longer_route_limits(config: dict[str, Any]) -> None:
        for route in config["routes"]:
            route.pop("idle_timeout", None)  # a route may only be shorter than 2 s

    env = await launch(real_time=True, tweak=no_longer_route_limits, idle_timeout="2s")
    alice = await signed_in(env)  # t ≈ 0
    assert await outcome(env, alice, "/app/t0") == "ok"
    await asyncio.sleep(1.0)
    assert await outcome(env, alice, "/app/t1") == "ok"
    await asyncio.sleep(2.1)  # just over idle_timeout since the last request
    assert await outcome(env, alice, "/app/t3") == "session-idle"
    assert await to_login(env, alice, "/app/t3b")


# -- 2. absolute lifetime -----------------------------------------------------------------------


async def test_max_lifetime_ends_an_active_session(launch: Launch) -> None:
    env = await launch(max_lifetime="1h")
    api, browser = await signed_in(env), await signed_in(env)
    for step in range(5):  # a request every 10 minutes: never idle
        env.clock.now += 600
        assert await outcome(env, api, f"/app/{step}") == "ok"
        assert await outcome(env, browser, f"/app/{step}b") == "ok"
    env.clock.now += 600  # one hour since the login
    assert await to_login(env, browser, "/app/lateb")
    # the reason, read back from the store (each refresh dropped the cached copy), not a guess
    assert await outcome(env, api, "/app/late") == "session-expired"


# -- 3. a shorter limit on one route ------------------------------------------------------------


async def test_a_route_idle_timeout_refuses_only_on_its_route(launch: Launch) -> None:
    env = await launch()
    alice, browser = await signed_in(env), await signed_in(env)
    assert await outcome(env, alice, "/short/a") == "ok"
    env.clock.now += 61  # past the short route's 1m, well within the global 15m
    assert await outcome(env, alice, "/short/b") == "session-idle"
    assert await to_login(env, browser, "/short/b2")
    assert await outcome(env, alice, "/app/c") == "ok"  # the session lives on elsewhere
    assert await outcome(env, alice, "/short/d") == "ok"  # and that request was activity
    assert await outcome(env, browser, "/app/e") == "ok"  # a refusal on a route ends nothing


# -- 4. idle_ignore_paths -----------------------------------------------------------------------


async def test_ignored_paths_are_served_but_are_not_activity(launch: Launch) -> None:
    env = await launch(idle_ignore_paths=["/app/heartbeat"])
    polling, working = await signed_in(env), await signed_in(env)
    env.clock.now += 600
    assert await outcome(env, working, "/app/work") == "ok"
    assert await outcome(env, polling, "/app/heartbeat") == "ok"  # served
    env.clock.now += 600  # 20 minutes since the login, 10 since the heartbeat
    assert await outcome(env, working, "/app/work") == "ok"
    assert await outcome(env, polling, "/app/heartbeat") == "session-idle"  # it was no activity
    assert await to_login(env, polling, "/app/heartbeat")


# -- 5. max_per_user ----------------------------------------------------------------------------


async def test_a_third_login_ends_the_oldest_session(launch: Launch) -> None:
    env = await launch(max_per_user=2)
    first = await signed_in(env)
    bob = await signed_in(env, user="bob")
    env.clock.now += 1  # distinct creation times: "oldest" is well defined
    second = await signed_in(env)
    env.clock.now += 1
    third = await signed_in(env)
    assert await outcome(env, first, "/app/1") == "session-revoked"
    assert await to_login(env, first, "/app/1b")
    assert await outcome(env, second, "/app/2") == "ok"
    assert await outcome(env, third, "/app/3") == "ok"
    assert await outcome(env, bob, "/app/bob") == "ok"
    assert len(await sessions_of(env, "alice")) == 2


# -- 6. logout ----------------------------------------------------------------------------------


async def test_logout_needs_origin_and_csrf(launch: Launch) -> None:
    env = await launch()
    alice = await signed_in(env)
    csrf = await csrf_of(alice, env.base + "/.gateway/logout")
    url = env.base + "/.gateway/logout"
    refused = [
        ({"csrf": csrf}, None, "bad-origin"),
        ({"csrf": csrf}, "http://evil.example", "bad-origin"),
        ({"csrf": csrf}, "null", "bad-origin"),
        ({"csrf": "0" * 32}, env.base, "bad-csrf"),
        ({}, env.base, "bad-csrf"),
    ]
    for form, origin, reason in refused:
        resp = await post_form(alice, url, form, origin)
        assert resp.status == 400, (origin, form, resp.status)
        json = await alice.post(url, data=form, headers={**JSON, "Origin": origin or ""})
        assert (json.status, (await json.json())["reason"]) == (400, reason), (origin, form)
        assert await outcome(env, alice, "/app/still") == "ok"
    assert cookie_of(alice, env.base)


async def test_logout_ends_the_session_on_every_host(launch: Launch) -> None:
    env = await launch()
    alice = await signed_in(env)
    landed = await follow(alice, env.other + "/page")  # handoff: a cookie for `localhost`
    assert landed.status == 200
    assert await outcome(env, alice, "/page2", base=env.other) == "ok"
    cookie = cookie_of(alice, env.base)
    [session] = await sessions_of(env, "alice")
    page = await alice.get(env.base + "/.gateway/logout", headers=HTML)
    assert page.status == 200 and "alice@example.org" in await page.text()
    csrf = await csrf_of(alice, env.base + "/.gateway/logout")

    resp = await post_form(alice, env.base + "/.gateway/logout", {"csrf": csrf}, env.base)
    assert resp.status == 302
    location = URL(resp.headers["Location"])
    assert str(location.with_query(None)) == env.idp.issuer + "/end_session"
    assert location.query["id_token_hint"] == session.id_token
    assert location.query["post_logout_redirect_uri"] == env.base + "/"
    assert await to_login(env, alice, "/app/after")  # the cookie was cleared
    assert await with_cookie(env, cookie, "/app/after") == "session-revoked"  # and is dead
    assert await outcome(env, alice, "/page3", base=env.other) == "session-revoked"
    assert await to_login(env, alice, "/page4", base=env.other)
    assert await sessions_of(env, "alice") == []
    back = await follow(alice, str(location))  # the IdP ends its session and sends us home
    assert str(back.url) == env.base + "/"


# -- 7. back-channel logout ---------------------------------------------------------------------


def logout_token(env: Env, session: Session, signing: SigningMode = "rs256", **changes: Any) -> str:
    now = int(env.clock())
    claims: dict[str, Any] = {
        "iss": env.idp.issuer,
        "aud": "gateway",
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "sid": session.sid,
        "sub": session.sub,
        "events": {BACKCHANNEL_EVENT: {}},
        **changes,
    }
    header = {"alg": "none"} if signing == "none" else {"alg": "RS256", "kid": env.idp.current_kid}
    claims = {k: v for k, v in claims.items() if v is not None}
    return env.idp.mint_token({**header, "typ": "logout+jwt"}, claims, signing)


async def post_logout_token(env: Env, token: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as idp:
        resp = await idp.post(
            env.base + "/.gateway/backchannel-logout", data={"logout_token": token}
        )
        return resp.status, await resp.json()


async def test_backchannel_logout_ends_only_that_users_sessions(launch: Launch) -> None:
    env = await launch()
    alice1, alice2 = await signed_in(env), await signed_in(env)
    bob = await signed_in(env, user="bob")
    deliveries = await env.idp.backchannel_logout("alice")
    assert [d.status for d in deliveries] == [200, 200]  # one per IdP session of alice's
    assert await outcome(env, alice1, "/app/1") == "session-revoked"
    assert await to_login(env, alice2, "/app/2")
    assert await outcome(env, bob, "/app/bob") == "ok"
    assert await sessions_of(env, "alice") == []

    # the same logout token again is a replay, even now that it would end nothing
    status, body = await post_logout_token(env, deliveries[0].logout_token)
    assert (status, body["error_description"]) == (400, "replayed-jti")
    assert await outcome(env, bob, "/app/bob2") == "ok"


MALFORMED: list[tuple[str, SigningMode, dict[str, Any], str]] = [
    ("no events", "rs256", {"events": None}, "bad-events"),
    ("a nonce", "rs256", {"nonce": "n-1"}, "nonce-in-logout-token"),
    ("wrong aud", "rs256", {"aud": "another-client"}, "wrong-aud"),
    ("wrong iss", "rs256", {"iss": "http://127.0.0.1:1/evil"}, "wrong-issuer"),
    ("alg none", "none", {}, "alg-not-allowed"),
    ("expired", "rs256", {"exp": "PAST", "iat": "LONG-AGO"}, "expired"),
]


async def test_malformed_logout_tokens_end_nothing(launch: Launch) -> None:
    env = await launch()
    alice = await signed_in(env)
    [session] = await sessions_of(env, "alice")
    now = int(env.clock())
    for case, signing, changes, reason in MALFORMED:
        times = {"PAST": now - 600, "LONG-AGO": now - 720}
        claims = {k: times.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
        status, body = await post_logout_token(env, logout_token(env, session, signing, **claims))
        assert (status, body.get("error_description")) == (400, reason), case
        assert await outcome(env, alice, f"/app/{case.replace(' ', '-')}") == "ok", case
    # the control: the same token, well formed, is accepted and ends the session
    status, body = await post_logout_token(env, logout_token(env, session))
    assert (status, body) == (200, {"ended": 1})
    assert await outcome(env, alice, "/app/after") == "session-revoked"


# -- 8. refresh ---------------------------------------------------------------------------------


async def test_refresh_renews_the_groups(launch: Launch) -> None:
    env = await launch()
    alice = await signed_in(env)
    env.idp.set_groups("alice", ["engineering"])
    assert await outcome(env, alice, "/app/early") == "ok"
    assert [s.groups for s in await sessions_of(env, "alice")] == [("sre",)]  # not due yet
    env.clock.now += REFRESH_DUE
    assert await outcome(env, alice, "/app/due") == "ok"
    [session] = await sessions_of(env, "alice")
    assert session.groups == ("engineering",)
    assert session.refresh_after is not None and session.refresh_after > env.clock.now


async def test_a_changed_sub_at_refresh_ends_the_session(launch: Launch) -> None:
    env = await launch()
    api, browser = await signed_in(env), await signed_in(env)
    env.idp.set_sub("alice", "someone-else")
    env.clock.now += REFRESH_DUE
    assert await to_login(env, browser, "/app/due")
    assert await outcome(env, api, "/app/due2") == "session-revoked"
    assert await sessions_of(env, "alice") == []


async def test_a_revoked_refresh_token_ends_the_session(launch: Launch) -> None:
    env = await launch()
    alice = await signed_in(env)
    env.idp.revoke_refresh_tokens("alice")
    env.clock.now += REFRESH_DUE
    assert await outcome(env, alice, "/app/due") == "session-revoked"
    assert await to_login(env, alice, "/app/again")
    assert await sessions_of(env, "alice") == []


async def test_an_unreachable_idp_at_refresh_ends_nothing(launch: Launch) -> None:
    env = await launch()
    alice = await signed_in(env)
    env.idp.set_groups("alice", ["engineering"])
    port = URL(env.idp.issuer).port
    await env.idp.stop()
    env.clock.now += REFRESH_DUE
    assert await outcome(env, alice, "/app/idp-down") == "ok"
    assert [s.groups for s in await sessions_of(env, "alice")] == [("sre",)]
    env.clock.now += 10
    assert await outcome(env, alice, "/app/idp-still-down") == "ok"
    await env.idp.start(port=port or 0)  # back, at the same address: the refresh is retried
    env.clock.now += 61
    assert await outcome(env, alice, "/app/idp-back") == "ok"
    assert [s.groups for s in await sessions_of(env, "alice")] == [("engineering",)]


# -- 9. /.gateway/sessions ----------------------------------------------------------------------


async def test_own_sessions_are_listed_and_can_be_ended(launch: Launch) -> None:
    env = await launch()
    first, second = await signed_in(env), await signed_in(env)
    bob = await signed_in(env, user="bob")
    mine, theirs = await listing(env, first), await listing(env, second)
    assert len(mine) == len(theirs) == 2
    [current] = [s["handle"] for s in mine if s["current"]]
    [other] = [s["handle"] for s in theirs if s["current"]]
    assert current != other and {s["handle"] for s in mine} == {current, other}
    [bobs] = [s["handle"] for s in await listing(env, bob)]

    url = env.base + "/.gateway/sessions"
    csrf = await csrf_of(first, url)
    assert (await post_form(first, url, {"csrf": csrf, "end": other}, None)).status == 400
    assert (await post_form(first, url, {"csrf": "x" * 32, "end": other}, env.base)).status == 400
    assert await outcome(env, second, "/app/still") == "ok"

    # someone else's session, by its handle: nothing happens to it
    resp = await post_form(first, url, {"csrf": csrf, "end": bobs}, env.base)
    assert resp.status == 302
    assert await outcome(env, bob, "/app/bob") == "ok"

    resp = await post_form(first, url, {"csrf": csrf, "end": other}, env.base)
    assert (resp.status, resp.headers["Location"]) == (302, "/.gateway/sessions")
    assert await outcome(env, second, "/app/ended") == "session-revoked"
    assert await outcome(env, first, "/app/mine") == "ok"
    assert [s["handle"] for s in await listing(env, first)] == [current]
    anonymous = await env.browser().get(url, headers=JSON)
    assert anonymous.status == 401


# -- 10. WebSockets -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["logout", "ended"])
async def test_a_websocket_is_closed_when_its_session_is_revoked(launch: Launch, how: str) -> None:
    env = await launch()
    alice = await signed_in(env)
    async with alice.ws_connect(env.base + "/app/ws") as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=WAIT)).data == "echo:hello"
        start = time.monotonic()
        if how == "logout":
            csrf = await csrf_of(alice, env.base + "/.gateway/logout")
            url = env.base + "/.gateway/logout"
            assert (await post_form(alice, url, {"csrf": csrf}, env.base)).status == 302
        else:
            assert await env.auth.sessions.end((await session_of(env, alice)).key, "test")
        closing = await ws.receive(timeout=WAIT)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closing
        assert ws.close_code == 1008
        assert time.monotonic() - start < WAIT


# -- 11. two gateway processes on one Redis -----------------------------------------------------


async def until_refused(env: Env, cookie: str, base: str, path: str) -> tuple[float, str]:
    """Poll (bounded) until `cookie` is refused on `base`; seconds taken and the reason."""
    start = time.monotonic()
    async with asyncio.timeout(WAIT):
        while (reason := await with_cookie(env, cookie, path, base=base)) == "ok":
            await asyncio.sleep(0.002)
    return time.monotonic() - start, reason


async def test_a_revocation_on_one_gateway_is_seen_by_the_other(
    redis_db: str, tmp_path: Path
) -> None:
    env = await start_env(redis_db, tmp_path)
    try:
        peer = await start_peer(env)
        second = f"http://127.0.0.1:{peer.port}"
        latencies = []
        for round_ in range(3):
            alice = await signed_in(env)  # through gateway 1
            # the cookie is host-only for 127.0.0.1: the jar sends it to both ports
            assert await outcome(env, alice, f"/app/{round_}", base=second) == "ok"
            cookie = cookie_of(alice, env.base)
            start = time.monotonic()
            if round_ == 0:  # logout on gateway 1
                csrf = await csrf_of(alice, env.base + "/.gateway/logout")
                url = env.base + "/.gateway/logout"
                assert (await post_form(alice, url, {"csrf": csrf}, env.base)).status == 302
            else:  # the IdP signs alice out: back-channel logout to gateway 1
                await env.idp.backchannel_logout("alice")
            _, reason = await until_refused(env, cookie, second, f"/app/{round_}-after")
            latencies.append(time.monotonic() - start)
            assert reason == "session-revoked"
        print(
            "revocation latency gateway 1 -> gateway 2 (s):",
            " ".join(f"{s:.4f}" for s in latencies),
            f"median {statistics.median(latencies):.4f}",
        )
        assert max(latencies) < 1.0
    finally:
        await stop_env(env)


# -- 12. a Redis restart ------------------------------------------------------------------------


class PersistentRedis:
    """A private redis-server that keeps its data on disk (append-only file) across restarts."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.dir = tmp_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL)
        probe = Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            async with asyncio.timeout(WAIT):
                while not await _answers(probe):
                    await asyncio.sleep(0.02)
        finally:
            await probe.aclose()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


async def _answers(client: Redis) -> bool:
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PersistentRedis]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is required in CI")
        pytest.skip("redis-server is not installed; with CI=true this fails")
    server = PersistentRedis(tmp_path / "redis")
    server.dir.mkdir()
    await server.start()
    yield server
    server.kill()


async def readiness(env: Env) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as client:
        resp = await client.get(env.base + "/.gateway/readyz")
        return resp.status, (await resp.json())["checks"]


async def test_a_redis_restart_fails_closed_and_recovers(
    private_redis: PersistentRedis, tmp_path: Path
) -> None:
    env = await start_env(private_redis.url, tmp_path / "env")
    try:
        alive, revoked = await signed_in(env), await signed_in(env)
        for browser in (alive, revoked):  # both in the gateway's cache
            assert await outcome(env, browser, "/app/cached") == "ok"
        await env.auth.sessions.end((await session_of(env, revoked)).key, "test")
        assert await outcome(env, revoked, "/app/r0") == "session-revoked"
        assert await outcome(env, alive, "/app/a0") == "ok"
        assert await readiness(env) == (
            200,
            {
                "accepting": "ok",
                "audit_log": "ok",
                "session_store": "ok",
                "record_store": "ok",
                "revocations": "ok",
                "identity_provider": "ok",
                "reload_channel": "ok",
            },
        )

        private_redis.kill()
        killed, before = time.monotonic(), []
        async with asyncio.timeout(WAIT):  # until the gateway has noticed (its socket's EOF)
            while True:
                before.append(await outcome(env, alive, "/app/down"))
                if (await readiness(env))[1]["revocations"] == "unsubscribed":
                    break
        # A request racing the kill may still be served from the cache before the subscriber
        # sees its socket close (nothing can be published through a dead Redis meanwhile).
        assert set(before) <= {"ok", "store-unavailable"} and len(before) <= 2, before
        noticed = time.monotonic() - killed
        print(f"Redis loss noticed after {noticed:.4f}s; requests served meanwhile: {before}")
        status, checks = await readiness(env)
        assert (status, checks["session_store"], checks["revocations"]) == (
            503,
            "unreachable",
            "unsubscribed",
        )
        for _ in range(5):  # from then on no session is trusted, neither cached nor ended
            assert await outcome(env, alive, "/app/down") == "store-unavailable"
            assert await outcome(env, revoked, "/app/rdown") == "store-unavailable"
            assert await to_login(env, alive, "/app/down-browser") is False

        await private_redis.start()  # same port, same data
        async with asyncio.timeout(3 * WAIT):
            while (await readiness(env))[0] != 200:
                assert await outcome(env, revoked, "/app/r1") != "ok"
                await asyncio.sleep(0.05)
        assert await outcome(env, alive, "/app/a2") == "ok"  # recovered by itself
        assert await outcome(env, revoked, "/app/r2") == "session-revoked"  # stays ended
    finally:
        await stop_env(env)


async def test_a_stale_copy_at_refresh_time_does_not_refresh_again(launch: Launch) -> None:
    """A request that loaded the session before another request refreshed it must not refresh
    again with the rotated (now spent) refresh token: that would end the session. Found by
    the benchmark, where requests in flight during a refresh ended it."""
    env = await launch()
    alice = await signed_in(env)
    env.clock.now += REFRESH_DUE
    [stale] = await sessions_of(env, "alice")
    assert await outcome(env, alice, "/app/refreshes") == "ok"  # this request refreshed
    auth = env.gateway.gateway.auth
    assert auth is not None
    current = await auth.refresh_if_due(stale)  # the request that was in flight meanwhile
    assert current.refresh_token != stale.refresh_token
    assert await outcome(env, alice, "/app/after") == "ok"


def no_api_audiences(config: dict[str, Any]) -> None:
    config["identity"].pop("api_audiences", None)


async def test_without_api_audiences_no_bearer_token_is_accepted(launch: Launch) -> None:
    env = await launch(tweak=no_api_audiences)
    token = login.bearer(env, "reports-api")  # well signed, for an audience no config names
    async with aiohttp.ClientSession() as client:
        resp = await client.get(env.base + "/app/x", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401
        assert (await resp.json())["reason"] == "bad-token"
    assert "/app/x" not in env.hits  # never reached the upstream
