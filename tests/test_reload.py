"""Live reload (gateway/reload.py): SIGHUP, `Gateway.reload`, admin `POST /reload` (SPEC §3, §11).

In process: a gateway with the dev IdP and an admin listener (as in test_login and test_admin),
whose config file each test edits and reloads. As a real `gateway run` process: reloads by
SIGHUP while clients keep sending requests, none of which may fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.policy import compile_policies
from gateway.server import listen
from gateway.settings import load_settings
from tests.conftest import REPO, Server, echo_app, gateway_config, start_server
from tests.test_admin import TOKENS, tokens_file
from tests.test_login import HTML, SECRET, Clock, Env, _Events, config, free_port, signed_in

JSON = {"Accept": "application/json"}
DEADLINE = 10.0  # seconds any awaited condition gets before the test fails


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = DEADLINE) -> None:
    """Poll `check` until it holds; fail naming `what` once the deadline passes."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- in process --------------------------------------------------------------------------------


@dataclass
class Live:
    """A running gateway, the config it was started from, and the file it reloads."""

    env: Env
    path: Path
    started: dict[str, Any]  # the config as first written; tests edit deep copies of it
    admin: str  # http://127.0.0.1:PORT of the admin listener
    tokens: Path

    def edited(self) -> dict[str, Any]:
        return copy.deepcopy(self.started)

    def write(self, settings: dict[str, Any]) -> str:
        text = yaml.safe_dump(settings, sort_keys=False)
        self.path.write_text(text)
        return text

    async def readyz(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as client,
            client.get(self.env.base + "/.gateway/readyz") as resp,
        ):
            assert resp.status == 200, await resp.text()
            body: dict[str, Any] = await resp.json()
            return body

    async def status(self, url: str, browser: aiohttp.ClientSession | None = None) -> int:
        """The status of one GET (no redirect followed), as a browser or as an API client."""
        if browser is not None:
            async with browser.get(url, headers=HTML, allow_redirects=False) as resp:
                return resp.status
        async with aiohttp.ClientSession() as client, client.get(url, headers=JSON) as resp:
            return resp.status

    async def admin_call(self, method: str, path: str, token: str) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession() as client,
            client.request(method, self.admin + path, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return self.env.events_of(kind)


def route(settings: dict[str, Any], route_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(r for r in settings["routes"] if r["id"] == route_id)
    return found


def allow_groups(*groups: str) -> dict[str, Any]:
    return {"allow": [{"groups": list(groups)}]}


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    clock, port, admin_port = Clock(), free_port(), free_port()
    users = {
        "alice": DevUser("alice", "alice-pw", groups=("sre",)),
        "bob": DevUser("bob", "bob-pw", groups=("finance",)),
    }
    client = DevClient(
        "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
    )
    idp = DevIdP(users, [client], clock=clock)
    issuer = await idp.start()
    upstream = await start_server(echo_app())
    tokens = tokens_file(tmp_path / "admin-tokens")
    settings = config(port, issuer, upstream.url, tmp_path)
    # a route alice (sre) cannot reach and bob (finance) can
    settings["routes"].append(
        {
            "id": "books",
            "path": "/books",
            "upstream": upstream.url,
            "policy": allow_groups("finance"),
        }
    )
    settings["admin"] = {"listen": f"127.0.0.1:{admin_port}", "tokens_file": str(tokens)}
    settings["rate_limits"] = {"login": {"count": 5, "window": "1h"}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    events: list[dict[str, Any]] = []
    handler, event_log = _Events(events), logging.getLogger("gateway.events")
    event_log.addHandler(handler)
    level = event_log.level
    event_log.setLevel(logging.INFO)
    gateway = await listen(load_settings(path), shutdown_timeout=2, clock=clock)
    base = f"http://127.0.0.1:{port}"
    env = Env(gateway, idp, upstream, clock, base, f"http://localhost:{port}", events)
    yield Live(env, path, settings, f"http://127.0.0.1:{admin_port}", tokens)
    for browser in env.browsers:
        await browser.close()
    event_log.removeHandler(handler)
    event_log.setLevel(level)
    await gateway.stop()
    await upstream.runner.cleanup()
    await idp.stop()


def with_extra_route_and_app_for_finance(live: Live) -> dict[str, Any]:
    """A valid edit: a new public route `extra`, and `app` allowed to finance only."""
    settings = live.edited()
    extra = {"id": "extra", "path": "/extra", "upstream": live.env.upstream.url, "public": True}
    settings["routes"].append(extra)
    route(settings, "app")["policy"] = allow_groups("finance")
    return settings


async def test_a_valid_edit_is_applied_by_reload(live: Live) -> None:
    env = live.env
    alice, bob = await signed_in(env), await signed_in(env, user="bob")
    before = (await live.readyz())["policy_hash"]
    assert await live.status(env.base + "/app/x", alice) == 200
    assert await live.status(env.base + "/extra/y") == 404
    live.write(with_extra_route_and_app_for_finance(live))

    assert await env.gateway.reload() is True

    ready = await live.readyz()
    assert ready["policy_hash"] != before and ready["policy_hash"].startswith("sha256:")
    assert ready["routes"] == len(live.started["routes"]) + 1
    async with aiohttp.ClientSession() as client, client.get(env.base + "/extra/y") as resp:
        assert resp.status == 200
        assert orjson.loads(await resp.read())["raw_path"] == "/extra/y"
    assert await live.status(env.base + "/app/x", alice) == 403  # the changed policy
    assert await live.status(env.base + "/app/x", bob) == 200
    [event] = live.events_of("policy.reloaded")
    assert event["actor"] == "signal"
    assert (event["policy_hash_before"], event["policy_hash_after"]) == (
        before,
        ready["policy_hash"],
    )
    assert (event["routes_added"], event["routes_removed"]) == (["extra"], [])
    assert event["lost"] == [{"user": "alice@example.org", "route": "app"}]
    assert live.events_of("policy.reload_failed") == []


def _at(text: str, needle: str) -> str:
    """`LINE:COL` (1-based) of the first occurrence of `needle` in `text`."""
    offset = text.index(needle)
    line = text.count("\n", 0, offset) + 1
    return f"{line}:{offset - text.rfind(chr(10), 0, offset)}"


# Each writes a broken file (with valid route and policy edits in it too) and returns the
# pattern of the error expected after `FILE:`, starting with its LINE:COL.


def yaml_error(live: Live) -> str:
    text = live.write(with_extra_route_and_app_for_finance(live))
    broken = text + "alerts: [new_ip_login\n"  # an unclosed flow sequence on the last line
    live.path.write_text(broken)
    line = broken.count("\n")
    # the parser notices at the end of the file, and names the line the sequence began on
    return rf"{line + 1}:1: invalid YAML: .*\(while parsing a flow sequence at line {line}\)"


def unknown_key(live: Live) -> str:
    settings = with_extra_route_and_app_for_finance(live)
    route(settings, "extra")["strip_prefx"] = True
    text = live.write(settings)
    return f"{_at(text, 'strip_prefx')}: routes\\[5\\]: unknown key 'strip_prefx'"


def no_policy(live: Live) -> str:
    settings = with_extra_route_and_app_for_finance(live)
    del route(settings, "extra")["public"]
    text = live.write(settings)
    return f"{_at(text, 'id: extra')}: routes\\[5\\]: route 'extra' needs a policy, or public: true"


@pytest.mark.parametrize("broken", [yaml_error, unknown_key, no_policy], ids=lambda f: f.__name__)
async def test_an_invalid_file_changes_nothing(live: Live, broken: Callable[[Live], str]) -> None:
    env = live.env
    alice = await signed_in(env)
    runtime, ready = env.gateway.gateway.runtime, await live.readyz()
    expected = broken(live)

    assert await env.gateway.reload() is False

    assert env.gateway.gateway.runtime is runtime
    assert await live.readyz() == ready
    assert await live.status(env.base + "/app/x", alice) == 200  # the old policy
    assert await live.status(env.base + "/extra/y") == 404  # no new route
    assert await live.status(env.base + "/open/x") == 200
    [failed] = live.events_of("policy.reload_failed")
    assert failed["errors"], failed
    for error in failed["errors"]:
        assert re.match(rf"{re.escape(str(live.path))}:\d+:\d+: ", error), error
    assert any(
        re.match(rf"{re.escape(str(live.path))}:{expected}", error) for error in failed["errors"]
    ), failed["errors"]
    assert live.events_of("policy.reloaded") == []


# What each file changes beside its route edits, and the sections the refusal must name.
RESTARTS: dict[str, dict[str, dict[str, Any]]] = {
    "identity": {"identity": {"client_id": "another-client"}},
    "state": {"state": {"sessions": "sqlite:///{dir}/sessions.db"}},
    "server.listen": {"server": {"listen": "127.0.0.1:{port}"}},
    "sessions.idle_timeout": {"sessions": {"idle_timeout": "5m"}},
    "identity, sessions.idle_timeout": {
        "identity": {"require_email_verified": False},
        "sessions": {"idle_timeout": "5m"},
    },
}


def changed(settings: dict[str, Any], updates: dict[str, dict[str, Any]], **values: Any) -> None:
    for section, keys in updates.items():
        for key, value in keys.items():
            settings[section][key] = value.format(**values) if isinstance(value, str) else value


@pytest.mark.parametrize("sections", sorted(RESTARTS))
async def test_a_change_that_needs_a_restart_is_refused_whole(live: Live, sections: str) -> None:
    env = live.env
    alice = await signed_in(env)
    runtime, ready = env.gateway.gateway.runtime, await live.readyz()
    settings = with_extra_route_and_app_for_finance(live)  # route changes in the same file
    changed(settings, RESTARTS[sections], dir=live.path.parent, port=free_port())
    live.write(settings)

    assert await env.gateway.reload() is False

    assert env.gateway.gateway.runtime is runtime
    assert await live.readyz() == ready
    assert await live.status(env.base + "/extra/y") == 404
    assert await live.status(env.base + "/app/x", alice) == 200
    [failed] = live.events_of("policy.reload_failed")
    [error] = failed["errors"]
    assert error == f"{live.path}: changes need a restart: {sections}"


SECRETS: dict[str, dict[str, dict[str, Any]]] = {
    # another key in place of the one in use (same count: a rotation's list is as long)
    "state": {"state": {"keys": ["A" * 43 + "="]}},
    "identity": {"identity": {"client_secret": "a-rotated-client-secret"}},
}


@pytest.mark.parametrize("section", sorted(SECRETS))
async def test_a_changed_secret_needs_a_restart_too(live: Live, section: str) -> None:
    """state.keys and identity.client_secret are secrets: the reload must still see them change.

    SPEC §3/reload.py: keys and the IdP need a restart. A reload that reports success while the
    running gateway keeps sealing with the old key (or sending the old client secret) tells the
    operator a rotation happened when it did not.
    """
    env = live.env
    runtime = env.gateway.gateway.runtime
    settings = with_extra_route_and_app_for_finance(live)
    changed(settings, SECRETS[section])
    live.write(settings)

    assert await env.gateway.reload() is False, f"a {section} secret change was reloaded"

    assert env.gateway.gateway.runtime is runtime
    [failed] = live.events_of("policy.reload_failed")
    assert failed["errors"] == [f"{live.path}: changes need a restart: {section}"]


async def test_the_event_names_who_gained_and_who_lost_a_route(live: Live) -> None:
    env = live.env
    alice, bob = await signed_in(env), await signed_in(env, user="bob")
    assert await live.status(env.base + "/books/1", alice) == 403
    widened = live.edited()
    route(widened, "books")["policy"] = allow_groups("finance", "sre")
    live.write(widened)

    assert await env.gateway.reload() is True

    [gain] = live.events_of("policy.reloaded")
    assert gain["gained"] == [{"user": "alice@example.org", "route": "books"}]
    assert (gain["lost"], gain["gained_count"], gain["lost_count"]) == ([], 1, 0)
    assert await live.status(env.base + "/books/1", alice) == 200
    narrowed = copy.deepcopy(widened)
    route(narrowed, "app")["policy"] = allow_groups("finance", "engineering")
    live.write(narrowed)

    assert await env.gateway.reload() is True

    [_, loss] = live.events_of("policy.reloaded")
    assert loss["lost"] == [{"user": "alice@example.org", "route": "app"}]
    assert (loss["gained"], loss["gained_count"], loss["lost_count"]) == ([], 0, 1)
    assert loss["policy_hash_before"] == gain["policy_hash_after"]
    assert await live.status(env.base + "/app/x", alice) == 403
    assert await live.status(env.base + "/app/x", bob) == 200


async def test_allowed_hosts_follow_a_reload(live: Live) -> None:
    url = live.env.base + "/open/x"

    async def status_as(host: str) -> int:
        async with (
            aiohttp.ClientSession() as client,
            client.get(url, headers={"Host": host, **JSON}) as resp,
        ):
            return resp.status

    assert await status_as("alias.test") == 421
    settings = live.edited()
    settings["server"]["allowed_hosts"] = ["alias.test"]
    live.write(settings)
    assert await live.env.gateway.reload() is True
    assert await status_as("alias.test") == 200


# -- admin POST /reload ------------------------------------------------------------------------


async def test_admin_reload_needs_the_operate_role(live: Live) -> None:
    env = live.env
    alice = await signed_in(env)
    before = (await live.readyz())["policy_hash"]
    live.write(with_extra_route_and_app_for_finance(live))

    status, body = await live.admin_call("POST", "/reload", TOKENS["read"])
    assert (status, body["reason"]) == (403, "insufficient-role")
    assert (await live.readyz())["policy_hash"] == before
    assert await live.status(env.base + "/extra/y") == 404
    assert live.events_of("policy.reloaded") == []

    status, body = await live.admin_call("POST", "/reload", TOKENS["operate"])
    ready = await live.readyz()
    after = ready["policy_hash"]
    assert status == 200, body
    _, detail = await live.admin_call("GET", "/readyz", TOKENS["read"])
    assert body.pop("workers") == {detail["origin"]: after}  # each worker's hash (one here)
    assert "origin" not in ready  # the public readyz names no host
    assert body == {
        "reloaded": True,
        "policy_hash": after,
        "errors": [],
        "gained": [],
        "lost": [{"user": "alice@example.org", "route": "app"}],
    }
    assert after != before
    assert await live.status(env.base + "/extra/y") == 200
    assert await live.status(env.base + "/app/x", alice) == 403
    [event] = live.events_of("policy.reloaded")
    assert (event["actor"], event["policy_hash_after"]) == ("ops", after)
    [call] = [e for e in env.events if e.get("event") == "admin.reloaded" and e["status"] == 200]
    assert (call["actor"], call["outcome"], call["policy_hash"]) == ("ops", "ok", after)


async def test_admin_reload_of_an_invalid_file_is_422_and_changes_nothing(live: Live) -> None:
    before = await live.readyz()
    expected = unknown_key(live)
    status, body = await live.admin_call("POST", "/reload", TOKENS["operate"])
    assert status == 422, body
    assert (body["reloaded"], body["policy_hash"], body["gained"], body["lost"]) == (
        False,
        before["policy_hash"],
        [],
        [],
    )
    assert any(re.match(rf"{re.escape(str(live.path))}:{expected}", e) for e in body["errors"])
    assert await live.readyz() == before
    assert await live.status(live.env.base + "/extra/y") == 404
    [failed] = live.events_of("policy.reload_failed")
    assert (failed["actor"], failed["errors"]) == ("ops", body["errors"])


def add_token(path: Path, name: str, role: str, token: str) -> None:
    digest = hashlib.sha256(token.encode()).hexdigest()
    path.write_text(path.read_text() + f"{name}:{role}:{digest}\n")


async def test_reloads_reread_the_admin_tokens_file(live: Live) -> None:
    add_token(live.tokens, "newcomer", "read", "a-token-added-later")
    assert (await live.admin_call("GET", "/sessions", "a-token-added-later"))[0] == 401
    status, _ = await live.admin_call("POST", "/reload", TOKENS["operate"])
    assert status == 200
    assert (await live.admin_call("GET", "/sessions", "a-token-added-later"))[0] == 200
    # the SIGHUP path (Listening.reload) re-reads it too
    add_token(live.tokens, "another", "operate", "a-second-token")
    assert (await live.admin_call("GET", "/sessions", "a-second-token"))[0] == 401
    assert await live.env.gateway.reload() is True
    assert (await live.admin_call("GET", "/sessions", "a-second-token"))[0] == 200


# -- rate limits -------------------------------------------------------------------------------


async def test_a_lower_login_limit_applies_after_reload(live: Live) -> None:
    url = live.env.base + "/.gateway/login?rd=/"

    async def logins(count: int) -> list[int]:
        async with aiohttp.ClientSession() as client:
            statuses = []
            for _ in range(count):
                async with client.get(url, allow_redirects=False) as resp:
                    statuses.append(resp.status)
            return statuses

    assert await logins(3) == [302] * 3  # 5 an hour: 2 left
    settings = live.edited()
    settings["rate_limits"] = {"login": {"count": 2, "window": "1h"}}
    live.write(settings)
    assert await live.env.gateway.reload() is True
    # a reload starts the buckets afresh at the new size: 2, then 429
    assert await logins(3) == [302, 302, 429]
    # a reload that leaves rate_limits as they are keeps the buckets (this one still empty)
    settings["routes"].append({**route(settings, "open"), "id": "open-2", "path": "/open-2"})
    live.write(settings)
    assert await live.env.gateway.reload() is True
    assert await logins(1) == [429]


# -- a real process, under load ----------------------------------------------------------------


@dataclass
class Process:
    """`gateway run` as a real process, its log read as it comes (so the pipe never fills)."""

    proc: asyncio.subprocess.Process
    log: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    reader: asyncio.Task[None] | None = None
    port: int = 0

    @classmethod
    async def start(cls, config_path: Path) -> Process:
        """Start it and wait for server.started; a process that never gets there is killed."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "run",
            "-c",
            str(config_path),
            cwd=REPO,
            stderr=asyncio.subprocess.PIPE,
        )
        self = cls(proc)
        loop = asyncio.get_running_loop()
        self.reader = loop.create_task(self._read(), name="gateway process log")
        try:
            started = await self.event("server.started")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await self.stop()
            raise
        self.port = int(started["listen"][0].rsplit(":", 1)[1])
        return self

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            entry = orjson.loads(line) if line.startswith(b"{") else {"msg": line.decode()}
            async with self.arrived:
                self.log.append(entry)
                self.arrived.notify_all()
        async with self.arrived:
            self.log.append({"event": "<exited>"})
            self.arrived.notify_all()

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("event") == kind]

    async def event(self, kind: str, count: int = 1) -> dict[str, Any]:
        """The `count`-th event of this kind, waiting for it (with the deadline)."""

        def seen() -> bool:
            ended = any(e.get("event") == "<exited>" for e in self.log)
            return len(self.events_of(kind)) >= count or ended

        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(seen), DEADLINE)
        found = self.events_of(kind)
        assert len(found) >= count, f"no {kind} event #{count}: {self.log}"
        return found[count - 1]

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.terminate()
        code = await asyncio.wait_for(self.proc.wait(), 40)
        if self.reader is not None:
            await self.reader
        return code


def named_app(name: str, arrived: asyncio.Event, release: asyncio.Event) -> web.Application:
    """An upstream that says who it is and what path it saw; `.../slow` waits for `release`."""

    async def answer(request: web.Request) -> web.Response:
        if request.path.endswith("/slow"):
            arrived.set()
            await release.wait()
        body = {"upstream": name, "raw_path": request.raw_path}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


HOST = {"Host": "gw.test"}
CLIENTS = 8
RELOADS = 6


@dataclass
class Load:
    """What the clients saw: every request counted, every failure kept."""

    done: int = 0
    failures: list[str] = field(default_factory=list)
    per_client: dict[int, int] = field(default_factory=dict)


async def keep_requesting(base: str, number: int, stop: asyncio.Event, load: Load) -> None:
    async with aiohttp.ClientSession(base) as client:
        sent = 0
        while not stop.is_set():
            path = f"/main/c{number}/{sent}" if sent % 2 == 0 else f"/second/c{number}/{sent}"
            allowed = {"A"} if path.startswith("/main/") else {"A", "B"}
            sent += 1
            try:
                async with client.get(path, headers=HOST) as resp:
                    body = await resp.read()
                    seen = orjson.loads(body) if resp.status == 200 else {}
                    if resp.status != 200 or seen.get("raw_path") != path:
                        load.failures.append(f"{path}: {resp.status} {body[:200]!r}")
                    elif seen["upstream"] not in allowed:
                        load.failures.append(f"{path}: from upstream {seen['upstream']}")
            except (aiohttp.ClientError, orjson.JSONDecodeError) as err:
                load.failures.append(f"{path}: {err!r}")
            load.done += 1
            load.per_client[number] = load.per_client.get(number, 0) + 1


def process_config(a: Server, b: Server, k: int) -> dict[str, Any]:
    """Reload k: `second` on A (k even) or B (k odd), and one route `added-k` (k > 0)."""
    routes = [
        {"id": "main", "path": "/main", "upstream": a.url, "public": True},
        {
            "id": "second",
            "path": "/second",
            "upstream": (a if k % 2 == 0 else b).url,
            "public": True,
        },
    ]
    if k:
        routes.append(
            {"id": f"added-{k}", "path": f"/added-{k}", "upstream": b.url, "public": True}
        )
    return gateway_config(routes)


async def test_sighup_under_load_drops_no_request(tmp_path: Path) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()
    a = await start_server(named_app("A", arrived, release))
    b = await start_server(named_app("B", asyncio.Event(), asyncio.Event()))
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(process_config(a, b, 0)))
    gateway = await Process.start(path)
    base = f"http://127.0.0.1:{gateway.port}"
    load, stop = Load(), asyncio.Event()
    try:
        async with aiohttp.ClientSession(base) as probe:

            async def get(target: str) -> tuple[int, dict[str, Any]]:
                async with probe.get(target, headers={**HOST, **JSON}) as resp:
                    return resp.status, orjson.loads(await resp.read())

            async def policy_hash_is(expected: str) -> bool:
                _, ready = await get("/.gateway/readyz")
                return bool(ready["policy_hash"] == expected)

            # an answer means the loop runs past start-up, so the SIGHUP handler is installed
            first = compile_policies(load_settings(path)).hash
            await until(partial(policy_hash_is, first), "the first readyz")
            slow = asyncio.get_running_loop().create_task(
                get("/second/slow"), name="a request in flight across the reloads"
            )
            await asyncio.wait_for(arrived.wait(), DEADLINE)
            async with asyncio.TaskGroup() as clients:
                for number in range(CLIENTS):
                    clients.create_task(keep_requesting(base, number, stop, load))
                await until(partial(_every_client_answered, load), "every client's first answer")
                for k in range(1, RELOADS + 1):
                    path.write_text(yaml.safe_dump(process_config(a, b, k)))
                    expected = compile_policies(load_settings(path)).hash
                    gateway.proc.send_signal(signal.SIGHUP)
                    await until(partial(policy_hash_is, expected), f"reload {k}")
                    event = await gateway.event("policy.reloaded", k)
                    assert event["policy_hash_after"] == expected
                    assert event["routes_added"] == [f"added-{k}"]
                    assert event["routes_removed"] == ([f"added-{k - 1}"] if k > 1 else [])
                    status, seen = await get(f"/added-{k}/x")
                    assert (status, seen["upstream"], seen["raw_path"]) == (
                        200,
                        "B",
                        f"/added-{k}/x",
                    )
                    if k > 1:
                        assert (await get(f"/added-{k - 1}/x"))[0] == 404
                    _, seen = await get("/second/now")
                    assert seen["upstream"] == ("A" if k % 2 == 0 else "B")
                    await until(partial(_more, load, load.done), f"requests after reload {k}")
                stop.set()
            release.set()
            status, seen = await asyncio.wait_for(slow, DEADLINE)
            assert (status, seen) == (200, {"upstream": "A", "raw_path": "/second/slow"})
    finally:
        stop.set()
        release.set()
        code = await gateway.stop()
        await a.runner.cleanup()
        await b.runner.cleanup()
    assert load.failures == [], load.failures[:10]
    assert len(load.per_client) == CLIENTS and load.done > CLIENTS * RELOADS
    assert code == 0
    assert gateway.events_of("policy.reload_failed") == []
    assert len(gateway.events_of("policy.reloaded")) == RELOADS
    print(f"{load.done} requests from {CLIENTS} clients across {RELOADS} reloads, none failed")


async def _every_client_answered(load: Load) -> bool:
    return len(load.per_client) == CLIENTS


async def _more(load: Load, than: int) -> bool:
    return load.done >= than + 4 * CLIENTS


async def test_the_first_protected_route_needs_a_restart(tmp_path: Path) -> None:
    """A gateway started with public routes only has no login machinery to give a new policy."""
    upstream = await start_server(echo_app())
    public = {"id": "open", "path": "/", "upstream": upstream.url, "public": True}
    settings = gateway_config([public])
    settings["identity"] = {"issuer": "http://127.0.0.1:9", "client_id": "gw", "client_secret": "s"}
    settings["state"] = {"sessions": "memory://", "records": "memory://", "keys": ["A" * 43 + "="]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    gateway = await listen(load_settings(path), shutdown_timeout=1)
    try:
        runtime = gateway.gateway.runtime
        protected = {"id": "app", "path": "/app", "upstream": upstream.url}
        protected["policy"] = {"allow": [{"groups": ["sre"]}]}
        path.write_text(yaml.safe_dump({**settings, "routes": [public, protected]}))

        assert await gateway.reload() is False

        assert gateway.gateway.runtime is runtime
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{gateway.port}/app/x"
            resp = await client.get(url, headers={"Host": "gw.test"})
            assert resp.status == 200  # still the public route: nothing was half-applied
            assert orjson.loads(await resp.read())["raw_path"] == "/app/x"
    finally:
        await gateway.stop()
        await upstream.runner.cleanup()
