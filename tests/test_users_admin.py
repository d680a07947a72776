"""Users through the admin API and the CLI (SPEC §10 `gateway users`, §11 `/users/{user}`):
show, disable, enable; and disabling and revoking across two `gateway run` processes.

The in-process gateway is test_login's (the dev IdP, an echo upstream) with the admin API; its
audit log is read from the audit dir. The two-process pair shares Redis sessions, a PostgreSQL
record store, state.keys and the assertion key, as replicas do.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
import yaml
from yarl import URL

from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.server import listen
from gateway.settings import load_settings
from tests.conftest import Server, assertion_key, echo_app, start_server
from tests.test_admin import TOKENS, gateway_cli, tokens_file
from tests.test_login import (
    HTML,
    SECRET,
    Clock,
    Env,
    bearer,
    config,
    follow,
    free_port,
    submit_login,
)
from tests.test_mfa_stores import Process

ALICE, BOB = "alice@example.org", "bob@example.org"
JSON = {"Accept": "application/json"}
ORIGIN = "users"
USERS = {
    "alice": DevUser("alice", "alice-pw", groups=("sre",)),
    "bob": DevUser("bob", "bob-pw", groups=("finance",)),
    # another identity whose user_claim value differs from alice's only in case
    "alice2": DevUser("alice2", "alice2-pw", email="Alice@Example.org", groups=("sre",)),
}
UNLIMITED = {name: {"count": 1000, "window": "1m"} for name in ("login", "callback")}


def audit_records(directory: Path, origin: str = ORIGIN) -> list[dict[str, Any]]:
    lines: list[bytes] = []
    for segment in sorted(directory.glob(f"{origin}.*.jsonl")):
        lines += segment.read_bytes().splitlines()
    return [orjson.loads(line) for line in lines]


async def sign_in(
    browser: aiohttp.ClientSession, base: str, user: str, headers: dict[str, str] = HTML
) -> aiohttp.ClientResponse:
    """Log `user` in at the gateway on `base` (its own callback); the callback's answer."""
    page = await follow(browser, base + "/app/x")
    assert page.status == 200, page.url
    callback = await submit_login(browser, page, user, f"{user}-pw")
    resp = await browser.get(callback, headers=headers, allow_redirects=False)
    await resp.read()
    return resp


async def refused(browser: aiohttp.ClientSession, base: str, user: str) -> str:
    """A login that the gateway refuses: its reason code."""
    resp = await sign_in(browser, base, user, JSON)
    assert resp.status == 403, await resp.text()
    return str((await resp.json())["reason"])


async def reaches(browser: aiohttp.ClientSession, base: str) -> int:
    resp = await browser.get(base + "/app/x", headers=JSON, allow_redirects=False)
    await resp.read()
    return resp.status


# -- one in-process gateway --------------------------------------------------------------------


@dataclass
class UsersEnv:
    env: Env
    admin: str
    config: Path
    audit: Path

    async def call(
        self,
        method: str,
        path: str,
        role: str | None = "operate",
        token: str | None = None,
        body: bytes | None = None,
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token or TOKENS[role]}"} if role or token else {}
        async with (
            aiohttp.ClientSession() as client,
            client.request(method, self.admin + path, headers=headers, data=body) as resp,
        ):
            return resp.status, await resp.json()

    async def signed_in(self, user: str = "alice") -> aiohttp.ClientSession:
        browser = self.env.browser()
        resp = await sign_in(browser, self.env.base, user)
        assert resp.status == 302, await resp.text()
        return browser

    async def audited(self, prefix: str) -> list[dict[str, Any]]:
        gateway = self.env.gateway.gateway
        assert gateway.audit is not None
        await gateway.audit.writer.flush()
        return [r for r in audit_records(self.audit) if r["type"].startswith(prefix)]


@pytest.fixture
async def users_env(tmp_path: Path) -> AsyncIterator[UsersEnv]:
    clock, port, admin_port = Clock(), free_port(), free_port()
    client = DevClient(
        "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
    )
    async with AsyncExitStack() as stack:
        idp = DevIdP(USERS, [client], clock=clock)
        issuer = await idp.start()
        stack.push_async_callback(idp.stop)
        upstream = await start_server(echo_app())
        stack.push_async_callback(upstream.runner.cleanup)
        settings = config(port, issuer, upstream.url, tmp_path)
        settings["audit"]["origin"] = ORIGIN
        settings["rate_limits"] = UNLIMITED
        tokens = tokens_file(tmp_path / "admin-tokens")
        settings["admin"] = {"listen": f"127.0.0.1:{admin_port}", "tokens_file": str(tokens)}
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(settings))
        gateway = await listen(load_settings(path), shutdown_timeout=2, clock=clock)
        stack.push_async_callback(gateway.stop)
        base = f"http://127.0.0.1:{port}"
        env = Env(gateway, idp, upstream, clock, base, f"http://localhost:{port}")
        stack.push_async_callback(close_browsers, env.browsers)
        yield UsersEnv(env, f"http://127.0.0.1:{admin_port}", path, tmp_path / "audit")


async def close_browsers(browsers: list[aiohttp.ClientSession]) -> None:
    for browser in browsers:
        await browser.close()


def alice_identity(issuer: str) -> str:
    return f"{issuer}|{USERS['alice'].sub}"


async def test_a_user_is_shown_with_groups_and_last_access(users_env: UsersEnv) -> None:
    env = users_env.env
    browser = await users_env.signed_in()
    assert await reaches(browser, env.base) == 200  # route app
    assert await reaches(browser, env.base + "/short") == 200  # route short
    status, shown = await users_env.call("GET", "/users/alice@example.org", role="read")
    assert status == 200 and shown["last_access"] == {}  # remembered, not yet written
    auth = env.gateway.gateway.auth
    assert auth is not None
    assert await auth.directory.flush() == 1  # what the flusher does every FLUSH_EVERY s
    for user in (ALICE, "ALICE@Example.ORG", alice_identity(env.idp.issuer)):
        status, shown = await users_env.call("GET", f"/users/{quote(user, safe='')}", role="read")
        assert status == 200, shown
        assert (shown["user"], shown["identity"]) == (ALICE, alice_identity(env.idp.issuer))
    assert shown["groups"] == ["sre"] and shown["logins"] == 1 and shown["disabled"] is None
    assert sorted(shown["last_access"]) == ["app", "short"]
    assert shown["last_ip"] == "127.0.0.1" and list(shown["networks"]) == ["127.0.0.0/24"]
    assert [g["groups"] for g in shown["groups_history"]] == [["sre"]]
    assert len(shown["sessions"]) == 1 and shown["mfa"]["enrolled"] is False
    status, answer = await users_env.call("GET", "/users/carol%40example.org", role="read")
    assert (status, answer["reason"]) == (404, "unknown-user")
    shows = await users_env.audited("admin.user_shown")
    assert [(e["actor"], e["outcome"]) for e in shows] == [("auditor", "ok")] * 4 + [
        ("auditor", "failed")
    ]
    assert shows[1]["subject"] == alice_identity(env.idp.issuer)


async def test_disable_needs_an_operate_token(users_env: UsersEnv) -> None:
    browser = await users_env.signed_in()
    path = "/users/alice@example.org/disable"
    status, answer = await users_env.call("POST", path, role=None)
    assert (status, answer["reason"]) == (401, "no-token")
    status, answer = await users_env.call("POST", path, token="not-a-token")
    assert (status, answer["reason"]) == (401, "bad-token")
    status, answer = await users_env.call("POST", path, role="read")
    assert (status, answer["reason"]) == (403, "insufficient-role")
    assert await reaches(browser, users_env.env.base) == 200  # nothing was disabled
    refusals = await users_env.audited("admin.")
    assert [(e["type"], e["actor"], e["outcome"], e["status"]) for e in refusals] == [
        ("admin.user_disabled", "anonymous", "refused", 401),
        ("admin.user_disabled", "anonymous", "refused", 401),
        ("admin.user_disabled", "auditor", "refused", 403),
    ]
    assert await users_env.audited("user.disabled") == []


async def test_disable_ends_sessions_and_refuses_logins_until_enabled(
    users_env: UsersEnv,
) -> None:
    env = users_env.env
    alices = [await users_env.signed_in(), await users_env.signed_in()]
    bob = await users_env.signed_in("bob")
    body = orjson.dumps({"reason": "left the team"})
    status, answer = await users_env.call("POST", "/users/ALICE@example.org/disable", body=body)
    assert status == 200, answer
    identity = alice_identity(env.idp.issuer)
    assert answer == {"user": ALICE, "identity": identity, "disabled": True, "ended": 2}
    for browser in alices:
        assert await reaches(browser, env.base) == 401
    assert await reaches(bob, env.base) == 200
    assert await refused(env.browser(), env.base, "alice") == "user-disabled"
    _, shown = await users_env.call("GET", "/users/alice@example.org", role="read")
    assert shown["sessions"] == [] and shown["disabled"]["actor"] == "ops"
    assert shown["disabled"]["reason"] == "left the team" and shown["disabled"]["at"]

    status, answer = await users_env.call("POST", "/users/alice@example.org/enable")
    assert (status, answer) == (200, {"user": ALICE, "identity": identity, "disabled": False})
    assert await reaches(await users_env.signed_in(), env.base) == 200

    done = [(e["type"], e["actor"], e["outcome"]) for e in await users_env.audited("admin.user_")]
    assert done == [
        ("admin.user_disabled", "ops", "ok"),
        ("admin.user_shown", "auditor", "ok"),
        ("admin.user_enabled", "ops", "ok"),
    ]
    [disabled] = await users_env.audited("user.disabled")
    assert (disabled["actor"], disabled["reason"], disabled["identity"]) == (
        "ops",
        "left the team",
        identity,
    )
    [enabled] = await users_env.audited("user.enabled")
    assert enabled["actor"] == "ops"
    [refusal] = await users_env.audited("auth.login_refused")
    assert refusal["reason"] == "user-disabled"


async def test_a_disable_body_must_be_a_json_object(users_env: UsersEnv) -> None:
    browser = await users_env.signed_in()
    for body in (b"left the team", b'["reason"]'):
        status, answer = await users_env.call("POST", "/users/alice@example.org/disable", body=body)
        assert (status, answer["reason"]) == (400, "bad-body")
    assert await reaches(browser, users_env.env.base) == 200


async def test_an_unknown_or_ambiguous_user_is_not_disabled(users_env: UsersEnv) -> None:
    status, answer = await users_env.call("POST", "/users/carol%40example.org/disable")
    assert (status, answer["reason"]) == (404, "unknown-user")
    alice, alice2 = await users_env.signed_in(), await users_env.signed_in("alice2")
    status, answer = await users_env.call("POST", "/users/alice%40example.org/disable")
    assert (status, answer["reason"]) == (409, "ambiguous-user")
    assert "ISS|SUB" in answer["detail"]
    for browser in (alice, alice2):
        assert await reaches(browser, users_env.env.base) == 200
    assert await users_env.audited("user.disabled") == []


async def test_an_enrollment_link_for_a_name_two_identities_use_is_refused(
    users_env: UsersEnv,
) -> None:
    await users_env.signed_in(), await users_env.signed_in("alice2")
    link = "/users/alice%40example.org/enroll-link"
    status, answer = await users_env.call("POST", link, role="admin")
    assert (status, answer["reason"]) == (409, "ambiguous-user")
    assert "link" not in answer  # no link for whichever of the two opens it first


async def test_a_disabled_users_bearer_token_is_refused(users_env: UsersEnv) -> None:
    env = users_env.env
    await users_env.signed_in()
    token = bearer(env, "reports-api", sub=USERS["alice"].sub)
    headers = {**JSON, "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as client:
        assert (await client.get(env.base + "/app/report", headers=headers)).status == 200
        await users_env.call("POST", "/users/alice@example.org/disable")
        resp = await client.get(env.base + "/app/report", headers=headers)
        assert resp.status == 401 and (await resp.json())["reason"] == "user-disabled"
        await users_env.call("POST", "/users/alice@example.org/enable")
        assert (await client.get(env.base + "/app/report", headers=headers)).status == 200


async def test_cli_disables_and_enables_through_the_running_gateway(
    users_env: UsersEnv,
) -> None:
    env, config_file = users_env.env, str(users_env.config)
    browser = await users_env.signed_in()
    identity = alice_identity(env.idp.issuer)
    code, out, err = await gateway_cli("users", "disable", "-c", config_file, ALICE)
    assert (code, out.strip()) == (0, f"disabled {ALICE} ({identity}); ended 1 session(s)"), err
    assert await reaches(browser, env.base) == 401
    assert await refused(env.browser(), env.base, "alice") == "user-disabled"
    code, out, err = await gateway_cli("users", "enable", "-c", config_file, identity)
    assert (code, out.strip()) == (0, f"enabled {ALICE} ({identity})"), err
    assert await reaches(await users_env.signed_in(), env.base) == 200
    code, _, err = await gateway_cli(
        "users", "disable", "-c", config_file, ALICE, token=TOKENS["read"]
    )
    assert code == 1 and err.startswith("gateway: ") and "(403)" in err, err
    assert len(err.strip().splitlines()) == 1
    actors = [(e["type"], e["actor"]) for e in await users_env.audited("admin.user_")]
    assert actors == [
        ("admin.user_disabled", "ops"),
        ("admin.user_enabled", "ops"),
        ("admin.user_disabled", "auditor"),
    ]


# -- two processes -----------------------------------------------------------------------------

REFUSAL_LIMIT = 5.0  # seconds; it should take milliseconds


@dataclass
class Pair:
    """Two `gateway run` processes, each its own public_url (and callback) and admin API."""

    idp: DevIdP
    upstream: Server
    clock: Clock = field(default_factory=Clock)  # for bearer(): tokens minted now
    procs: list[Process] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    admins: list[str] = field(default_factory=list)
    browsers: list[aiohttp.ClientSession] = field(default_factory=list)

    def base(self, n: int) -> str:
        return f"http://127.0.0.1:{self.ports[n]}"

    def browser(self) -> aiohttp.ClientSession:
        browser = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.browsers.append(browser)
        return browser

    async def call(self, n: int, method: str, path: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {TOKENS['operate']}"}
        async with (
            aiohttp.ClientSession() as client,
            client.request(method, self.admins[n] + path, headers=headers) as resp,
        ):
            assert resp.status == 200, await resp.text()
            answer: dict[str, Any] = await resp.json()
            return answer

    async def signed_in_on_both(self) -> aiohttp.ClientSession:
        browser = self.browser()
        resp = await sign_in(browser, self.base(0), "alice")
        assert resp.status == 302, await resp.text()
        cookie = next(c for c in browser.cookie_jar if c.key == "gateway")
        assert cookie["domain"] in ("", "127.0.0.1")  # host-only: every port of 127.0.0.1
        for n in (0, 1):
            assert await reaches(browser, self.base(n)) == 200, n
        return browser

    async def bearer_on_b(self, token: str, want: str) -> str:
        """Process B's answer to a bearer token ("ok" or the reason), polled until it is
        `want` (an announcement on its way) or REFUSAL_LIMIT passes: the last answer."""
        headers = {**JSON, "Authorization": f"Bearer {token}"}
        started = time.monotonic()
        async with aiohttp.ClientSession() as client:
            while True:
                async with client.get(self.base(1) + "/app/report", headers=headers) as resp:
                    body = await resp.json()
                    answer = "ok" if resp.status == 200 else str(body["reason"])
                if answer == want or time.monotonic() - started > REFUSAL_LIMIT:
                    return answer

    async def refused_on_b_after(self, method: str, path: str, browser: Any) -> float:
        """Seconds from sending the call to process A until process B refuses the cookie."""
        started = time.monotonic()
        await self.call(0, method, path)
        while (status := await reaches(browser, self.base(1))) == 200:
            assert time.monotonic() - started < REFUSAL_LIMIT, "B still admits the session"
        assert status == 401
        return time.monotonic() - started


def pair_config(
    pair: Pair, n: int, tmp: Path, issuer: str, state: dict[str, Any]
) -> dict[str, Any]:
    settings = config(pair.ports[n], issuer, pair.upstream.url, tmp)
    keys = assertion_key(tmp).parent
    settings["state"] = state
    settings["assertion"] = {"signing_key_file": str(keys / "assertion-es256.pem")}
    settings["audit"] = {"dir": str(tmp / f"audit-{n}"), "origin": f"gw{n}"}
    settings["rate_limits"] = UNLIMITED
    admin = pair.admins[n].removeprefix("http://")
    settings["admin"] = {"listen": admin, "tokens_file": str(tmp / "admin-tokens")}
    return settings


@pytest.fixture
async def pair(tmp_path: Path, redis_db: str, pg_records: str) -> AsyncIterator[Pair]:
    ports = [free_port() for _ in range(2)]
    callbacks = tuple(f"http://127.0.0.1:{p}/.gateway/callback" for p in ports)
    idp = DevIdP(USERS, [DevClient("gateway", SECRET, redirect_uris=callbacks)])
    issuer = await idp.start()
    upstream = await start_server(echo_app())
    pair = Pair(idp, upstream, ports=ports)
    pair.admins = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    tokens_file(tmp_path / "admin-tokens")
    key = base64.b64encode(os.urandom(32)).decode()
    state = {"sessions": redis_db, "records": pg_records, "keys": [key]}
    paths = []
    for n in (0, 1):
        path = tmp_path / f"gateway-{n}.yaml"
        path.write_text(yaml.safe_dump(pair_config(pair, n, tmp_path, issuer, state)))
        paths.append(path)
    # On threads: Process blocks reading the log until server.started; the IdP runs here.
    started = await asyncio.gather(
        *(asyncio.to_thread(Process, path) for path in paths), return_exceptions=True
    )
    pair.procs = [p for p in started if isinstance(p, Process)]
    try:
        for failed in started:
            if isinstance(failed, BaseException):
                raise failed
        yield pair
    finally:
        for proc in pair.procs:
            await asyncio.to_thread(proc.stop)
        await close_browsers(pair.browsers)
        await upstream.runner.cleanup()
        await idp.stop()


async def test_a_revoke_on_one_process_is_refused_on_the_other(pair: Pair) -> None:
    browser = await pair.signed_in_on_both()
    took = await pair.refused_on_b_after("POST", "/users/alice@example.org/revoke", browser)
    print(f"revoke on A -> refused on B: {took * 1000:.1f} ms")  # shown with -rP
    assert took < REFUSAL_LIMIT
    assert await reaches(browser, pair.base(0)) == 401
    again = await pair.signed_in_on_both()  # a revoke ends sessions; it disables nothing
    assert await reaches(again, pair.base(1)) == 200


async def test_a_disable_on_one_process_is_refused_on_the_other(pair: Pair) -> None:
    browser = await pair.signed_in_on_both()
    took = await pair.refused_on_b_after("POST", "/users/alice@example.org/disable", browser)
    print(f"disable on A -> refused on B: {took * 1000:.1f} ms")  # shown with -rP
    assert took < REFUSAL_LIMIT
    assert await refused(pair.browser(), pair.base(1), "alice") == "user-disabled"
    # B's own copy of the disabled set (bearer tokens: no store read) has it too
    token = bearer(pair, "reports-api", sub=USERS["alice"].sub)  # type: ignore[arg-type]
    assert await pair.bearer_on_b(token, "user-disabled") == "user-disabled"
    await pair.call(0, "POST", "/users/alice@example.org/enable")
    assert await pair.bearer_on_b(token, "ok") == "ok"
    browser = pair.browser()
    resp = await sign_in(browser, pair.base(1), "alice")
    assert resp.status == 302 and URL(resp.headers["Location"]).path == "/app/x"
    assert await reaches(browser, pair.base(1)) == 200


async def test_a_session_that_raced_the_disable_is_refused_and_ended(users_env: UsersEnv) -> None:
    """A login whose callback read the flag just before the disable landed still gets a
    session; its first request must be refused (the in-process disabled set)."""
    env = users_env.env
    await users_env.signed_in()
    status, _ = await users_env.call("POST", "/users/alice@example.org/disable")
    assert status == 200
    auth = env.gateway.gateway.auth
    assert auth is not None
    [identity] = await auth.directory.named(ALICE)
    iss, _, sub = identity.partition("|")
    cookie_id, _ = await auth.sessions.create(  # what the racing callback created
        iss=iss,
        sub=sub,
        user=ALICE,
        email=ALICE,
        groups=["sre"],
        amr=["pwd"],
        sid=None,
        auth_time=None,
        id_token=None,
        refresh_token=None,
        refresh_after=None,
    )
    async with aiohttp.ClientSession(headers={"Cookie": f"gateway={cookie_id}"}) as client:
        resp = await client.get(env.base + "/app/x", headers=JSON, allow_redirects=False)
        assert (resp.status, (await resp.json())["reason"]) == (401, "user-disabled")
    assert await auth.sessions.of_identity(identity) == []  # ended, not just refused
    assert await users_env.audited("alert.disabled_user_attempt")
