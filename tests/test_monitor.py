"""Alerts (SPEC §3 `alerts`, §9 `on_alert`) from a running gateway: the dev IdP, an upstream,
the admin API, and the webhook plugin posting to a real receiver on 127.0.0.1.

Every alert is looked for twice: in the audit log (the records in the audit dir) and at the
receiver, whose signature check is its own HMAC code (not plugins.webhook.verify). The
gateway believes X-Forwarded-For from 127.0.0.1, so one browser can act from many addresses.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.server import listen
from gateway.settings import load_settings
from tests.conftest import echo_app, start_server
from tests.test_admin import TOKENS, tokens_file
from tests.test_login import (
    HTML,
    SECRET,
    Clock,
    Env,
    bearer,
    config,
    free_port,
    login_until_callback,
)

HOOK_SECRET = "monitor-webhook-secret-0123456789abcdef"
DEADLINE = 5.0  # seconds any awaited condition gets
JSON = {"Accept": "application/json"}
ORIGIN = "monitor"
CHAIN = frozenset({"v", "origin", "seq", "ts", "prev", "type"})  # the audit record's own fields
ALICE, BOB = "alice@example.org", "bob@example.org"


# -- the webhook receiver ----------------------------------------------------------------------


def genuine(headers: Mapping[str, str], body: bytes, key: bytes = HOOK_SECRET.encode()) -> bool:
    """A receiver's own check: HMAC-SHA256 over "<timestamp>." + body, fresh within 5 min."""
    stamp = headers.get("X-Gateway-Timestamp", "")
    scheme, _, given = headers.get("X-Gateway-Signature", "").partition("=")
    expected = hmac.new(key, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = stamp.isdigit() and abs(time.time() - int(stamp)) <= 300
    return scheme == "v1" and fresh and hmac.compare_digest(given, expected)


@dataclass
class Receiver:
    url: str = ""
    alerts: list[dict[str, Any]] = field(default_factory=list)
    forged: int = 0  # deliveries whose signature did not verify
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self.arrived:
            if genuine(request.headers, body):
                self.alerts.append(orjson.loads(body))
            else:
                self.forged += 1
            self.arrived.notify_all()
        return web.Response(status=204)

    async def wait_for_barrier(self, mark: str) -> None:
        def seen() -> bool:
            return any(a.get("barrier") == mark for a in self.alerts)

        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(seen), DEADLINE)


# -- the gateway -------------------------------------------------------------------------------


@dataclass
class MonitorEnv:
    env: Env
    receiver: Receiver
    admin: str
    path: Path  # the config file (rewritten for reloads)
    settings: dict[str, Any]
    audit: Path
    barriers: int = 0

    async def login(
        self, user: str, address: str | None = None
    ) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
        """A new browser logging in as `user`; its callback request from `address`."""
        browser = self.env.browser()
        callback = await login_until_callback(self.env, browser, "/app/x", user.split("@")[0])
        headers = {**HTML, "X-Forwarded-For": address} if address else HTML
        resp = await browser.get(callback, headers=headers, allow_redirects=False)
        await resp.read()
        return browser, resp

    async def signed_in(self, user: str, address: str | None = None) -> aiohttp.ClientSession:
        browser, resp = await self.login(user, address)
        assert resp.status == 302, await resp.text()
        return browser

    async def call(self, method: str, path: str, role: str = "operate") -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {TOKENS[role]}"}
        async with (
            aiohttp.ClientSession() as client,
            client.request(method, self.admin + path, headers=headers) as resp,
        ):
            assert resp.status == 200, await resp.text()
            answer: dict[str, Any] = await resp.json()
            return answer

    async def alerts(self, kind: str = "alert.*") -> list[dict[str, Any]]:
        """The alerts so far (of `kind`, or all): read from the audit log, and the same ones,
        validly signed and in the same order, received by the webhook."""
        gateway = self.env.gateway.gateway
        self.barriers += 1
        mark = f"barrier-{self.barriers}"
        # Queued behind every alert already given to the plugins: once it is received, they are.
        gateway.plugins.on_alert({"type": "test.barrier", "barrier": mark})
        await self.receiver.wait_for_barrier(mark)
        assert gateway.audit is not None
        await gateway.audit.writer.flush()
        audited = [r for r in records(self.audit) if wanted(r, kind)]
        received = [a for a in self.receiver.alerts if wanted(a, kind)]
        assert self.receiver.forged == 0
        assert [without(a, {"ts", "type"}) for a in received] == [
            without(r, CHAIN) for r in audited
        ], "the webhook and the audit log disagree"
        return audited


def wanted(alert: Mapping[str, Any], kind: str) -> bool:
    found = str(alert.get("type"))
    return found.startswith("alert.") and kind in ("alert.*", found)


def without(alert: Mapping[str, Any], names: frozenset[str] | set[str]) -> dict[str, Any]:
    return {k: v for k, v in alert.items() if k not in names}


def records(directory: Path) -> list[dict[str, Any]]:
    lines: list[bytes] = []
    for segment in sorted(directory.glob(f"{ORIGIN}.*.jsonl")):
        lines += segment.read_bytes().splitlines()
    return [orjson.loads(line) for line in lines]


def merged(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in changes.items():
        old = out.get(name)
        out[name] = (
            merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        )
    return out


def monitor_config(port: int, issuer: str, upstream: str, tmp: Path) -> dict[str, Any]:
    """test_login's gateway plus: `ledger` (finance only), `locked` (no one), `secure` (MFA)."""
    settings = config(port, issuer, upstream, tmp)
    settings["server"]["trusted_proxies"] = ["127.0.0.1/32"]
    settings["audit"]["origin"] = ORIGIN
    settings["rate_limits"] = {
        name: {"count": 1000, "window": "1m"} for name in ("login", "callback")
    }
    settings["alerts"] = {"deny_burst": {"count": 3, "window": "1m"}}
    settings["routes"][:0] = [
        {"id": "ledger", "path": "/ledger", "upstream": upstream, "policy": ledger(["finance"])},
        {"id": "locked", "path": "/locked", "upstream": upstream, "policy": ledger(["nobody"])},
        {
            "id": "secure",
            "path": "/secure",
            "upstream": upstream,
            "policy": {"require_mfa": True, "allow": [{"groups": ["sre", "finance"]}]},
        },
    ]
    return settings


def ledger(groups: list[str]) -> dict[str, Any]:
    return {"allow": [{"groups": groups}]}


@pytest.fixture
async def monitor(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MonitorEnv]:
    """The gateway; an indirect param (a dict) is laid over its config."""
    clock, port, admin_port = Clock(), free_port(), free_port()
    users = {
        "alice": DevUser("alice", "alice-pw", groups=("sre",)),
        "bob": DevUser("bob", "bob-pw", groups=("finance",)),
    }
    client = DevClient(
        "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
    )
    async with AsyncExitStack() as stack:
        idp = DevIdP(users, [client], clock=clock)
        issuer = await idp.start()
        stack.push_async_callback(idp.stop)
        upstream = await start_server(echo_app())
        stack.push_async_callback(upstream.runner.cleanup)
        receiver = Receiver()
        app = web.Application()
        app.router.add_post("/hooks/alerts", receiver.handle)
        hooks = await start_server(app)
        stack.push_async_callback(hooks.runner.cleanup)
        receiver.url = f"{hooks.url}/hooks/alerts"
        settings = monitor_config(port, issuer, upstream.url, tmp_path)
        tokens = tokens_file(tmp_path / "admin-tokens")
        settings["admin"] = {"listen": f"127.0.0.1:{admin_port}", "tokens_file": str(tokens)}
        settings["plugins"] = [{"use": "webhook", "url": receiver.url, "secret": HOOK_SECRET}]
        settings = merged(settings, getattr(request, "param", {}))
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(settings))
        gateway = await listen(load_settings(path), shutdown_timeout=2, clock=clock)
        stack.push_async_callback(gateway.stop)
        base = f"http://127.0.0.1:{port}"
        env = Env(gateway, idp, upstream, clock, base, f"http://localhost:{port}")
        stack.push_async_callback(close_browsers, env)
        admin = f"http://127.0.0.1:{admin_port}"
        yield MonitorEnv(env, receiver, admin, path, settings, tmp_path / "audit")


async def close_browsers(env: Env) -> None:
    for browser in env.browsers:
        await browser.close()


# -- alert.new_ip ------------------------------------------------------------------------------


async def test_a_login_from_a_new_network_alerts_once(monitor: MonitorEnv) -> None:
    await monitor.signed_in(ALICE, "198.51.100.7")  # the first login: nothing to compare with
    await monitor.signed_in(ALICE, "198.51.100.99")  # the same /24
    assert await monitor.alerts() == []
    await monitor.signed_in(ALICE, "203.0.113.5")
    [alert] = await monitor.alerts()
    assert alert["type"] == "alert.new_ip"
    assert alert["user"] == ALICE and alert["client_ip"] == "203.0.113.5"
    assert alert["network"] == "203.0.113.0/24"
    assert alert["known_networks"] == ["198.51.100.0/24"]
    assert isinstance(alert["session"], str) and alert["sub"]
    await monitor.signed_in(ALICE, "203.0.113.200")  # that network is known now
    await monitor.signed_in(BOB, "203.0.113.5")  # bob's first login
    assert len(await monitor.alerts()) == 1


# -- alert.privilege_change --------------------------------------------------------------------


async def test_groups_changed_at_the_idp_alert_with_the_routes_gained(
    monitor: MonitorEnv,
) -> None:
    await monitor.signed_in(ALICE)
    monitor.env.idp.set_groups("alice", ["sre", "finance"])
    browser = await monitor.signed_in(ALICE)
    [alert] = await monitor.alerts()
    assert alert["type"] == "alert.privilege_change"
    assert alert["cause"] == "groups-changed-at-idp" and alert["user"] == ALICE
    assert (alert["gained"], alert["lost"]) == (["finance"], [])
    assert alert["routes_gained"] == ["ledger"]  # app and secure were reachable before
    resp = await browser.get(monitor.env.base + "/ledger/books", headers=JSON)
    assert resp.status == 200  # the alert names what the new session really reaches

    monitor.env.idp.set_groups("alice", ["finance"])
    await monitor.signed_in(ALICE)
    alerts = await monitor.alerts()
    assert len(alerts) == 2
    assert (alerts[1]["gained"], alerts[1]["lost"], alerts[1]["routes_gained"]) == ([], ["sre"], [])


async def test_a_reload_that_widens_access_alerts(monitor: MonitorEnv) -> None:
    await monitor.signed_in(ALICE)  # sre: not in ledger
    await monitor.signed_in(BOB)  # finance: in ledger already
    settings = monitor.settings
    routes = settings["routes"]
    routes[0] = {**routes[0], "policy": ledger(["finance", "sre"])}
    monitor.path.write_text(yaml.safe_dump(settings))
    assert await monitor.env.gateway.reload(actor="test") is True
    [alert] = await monitor.alerts()
    assert alert["type"] == "alert.privilege_change" and alert["cause"] == "policy-reload"
    assert alert["routes_gained"] == [{"user": ALICE, "route": "ledger"}]
    assert alert["policy_hash"] == monitor.env.gateway.gateway.runtime.policies.hash
    routes[0] = {**routes[0], "policy": ledger(["finance"])}  # narrowing back: no alert
    monitor.path.write_text(yaml.safe_dump(settings))
    assert await monitor.env.gateway.reload(actor="test") is True
    assert len(await monitor.alerts()) == 1


# -- alert.disabled_user_attempt ---------------------------------------------------------------


async def refused_login(monitor: MonitorEnv, user: str, address: str) -> None:
    _, resp = await monitor.login(user, address)
    assert resp.status == 403, await resp.text()


async def test_a_disabled_user_trying_again_alerts_once_per_cause(monitor: MonitorEnv) -> None:
    browser = await monitor.signed_in(ALICE, "198.51.100.7")
    answer = await monitor.call("POST", "/users/alice@example.org/disable")
    assert answer["ended"] == 1
    for _ in range(2):  # the session the disable ended, used again
        resp = await browser.get(monitor.env.base + "/app/x", headers=JSON)
        assert resp.status == 401 and (await resp.json())["reason"] == "session-revoked"
    for _ in range(2):  # a new login
        await refused_login(monitor, ALICE, "198.51.100.8")
    alerts = await monitor.alerts()
    assert [a["type"] for a in alerts] == ["alert.disabled_user_attempt"] * 2
    revoked, login = sorted(alerts, key=lambda a: str(a["attempt"]))[::-1]
    assert revoked["attempt"] == "revoked-session"
    assert (revoked["user"], revoked["ended_by"], revoked["ended_because"]) == (
        ALICE,
        "ops",
        "user-disabled",
    )
    assert login["attempt"] == "login" and login["client_ip"] == "198.51.100.8"
    assert login["identity"] == f"{monitor.env.idp.issuer}|{DevUser('alice', '-').sub}"


async def test_an_admin_revoked_session_used_again_alerts_once(monitor: MonitorEnv) -> None:
    browser = await monitor.signed_in(ALICE)
    answer = await monitor.call("POST", "/users/alice@example.org/revoke")
    assert answer["revoked"] == 1
    for _ in range(3):
        resp = await browser.get(monitor.env.base + "/app/x", headers=JSON)
        assert resp.status == 401
    [alert] = await monitor.alerts()
    assert (alert["type"], alert["attempt"]) == ("alert.disabled_user_attempt", "revoked-session")
    assert (alert["user"], alert["ended_by"], alert["ended_because"]) == (
        ALICE,
        "ops",
        "admin-revoked",
    )
    await monitor.signed_in(ALICE)  # revoked, not disabled: a new login works
    assert len(await monitor.alerts()) == 1


async def test_a_second_disable_alerts_again(monitor: MonitorEnv) -> None:
    """Once per disable: after an enable, the next disable is a new cause."""
    await monitor.signed_in(ALICE)
    await monitor.call("POST", "/users/alice@example.org/disable")
    await refused_login(monitor, ALICE, "198.51.100.8")
    assert len(await monitor.alerts("alert.disabled_user_attempt")) == 1
    await monitor.call("POST", "/users/alice@example.org/enable")
    await monitor.signed_in(ALICE)
    await monitor.call("POST", "/users/alice@example.org/disable")
    await refused_login(monitor, ALICE, "198.51.100.8")
    assert len(await monitor.alerts("alert.disabled_user_attempt")) == 2


async def test_a_revoked_session_alert_names_the_client_behind_the_proxy(
    monitor: MonitorEnv,
) -> None:
    browser = await monitor.signed_in(ALICE)
    await monitor.call("POST", "/users/alice@example.org/disable")
    headers = {**JSON, "X-Forwarded-For": "203.0.113.77"}
    resp = await browser.get(monitor.env.base + "/app/x", headers=headers)
    assert resp.status == 401
    [alert] = await monitor.alerts("alert.disabled_user_attempt")
    assert alert["client_ip"] == "203.0.113.77"  # as every other record of this request


async def test_a_disabled_users_bearer_token_alerts_with_its_address(
    monitor: MonitorEnv,
) -> None:
    await monitor.signed_in(ALICE)
    await monitor.call("POST", "/users/alice@example.org/disable")
    token = bearer(monitor.env, "reports-api", sub=DevUser("alice", "-").sub)
    headers = {**JSON, "Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.88"}
    async with aiohttp.ClientSession() as client:
        resp = await client.get(monitor.env.base + "/app/report", headers=headers)
        assert resp.status == 401 and (await resp.json())["reason"] == "user-disabled"
    [alert] = await monitor.alerts("alert.disabled_user_attempt")
    assert alert["attempt"] == "request"
    assert alert["client_ip"] == "203.0.113.88"  # who holds the token is the point of the alert


# -- alert.deny_burst --------------------------------------------------------------------------


async def test_a_deny_burst_alerts_once_for_the_user_and_once_for_the_address(
    monitor: MonitorEnv,
) -> None:
    alice = await monitor.signed_in(ALICE)
    here = {**JSON, "X-Forwarded-For": "192.0.2.50"}
    for _ in range(3):  # deny_burst.count: 3 denials are not a burst yet
        assert (await alice.get(monitor.env.base + "/locked/x", headers=here)).status == 403
    assert await monitor.alerts() == []
    for _ in range(6):
        assert (await alice.get(monitor.env.base + "/locked/x", headers=here)).status == 403
    alerts = await monitor.alerts()
    assert [a["type"] for a in alerts] == ["alert.deny_burst"] * 2
    by_user = [a for a in alerts if "user" in a]
    by_address = [a for a in alerts if "client_ip" in a]
    assert [a["user"] for a in by_user] == [ALICE]
    assert [a["client_ip"] for a in by_address] == ["192.0.2.50"]
    for alert in alerts:
        assert (alert["denials"], alert["window_s"]) == (4, 60.0)
    monitor.env.clock.now += 61  # a whole quiet window: the next burst is a new one
    for _ in range(4):
        assert (await alice.get(monitor.env.base + "/locked/x", headers=here)).status == 403
    assert len(await monitor.alerts()) == 4


async def test_mfa_required_denials_are_no_burst(monitor: MonitorEnv) -> None:
    bob = await monitor.signed_in(BOB)
    there = {**JSON, "X-Forwarded-For": "192.0.2.60"}
    for _ in range(10):
        resp = await bob.get(monitor.env.base + "/secure/x", headers=there)
        assert resp.status == 401 and (await resp.json())["reason"] == "mfa-required"
    assert await monitor.alerts() == []


# -- switched off ------------------------------------------------------------------------------

OFF = {
    "alerts": {
        "new_ip_login": False,
        "privilege_change": False,
        "disabled_user_attempt": False,
        "deny_burst": {"count": 1000, "window": "1m"},
    }
}


@pytest.mark.parametrize("monitor", [OFF], indirect=True)
async def test_alerts_switched_off_do_not_fire(monitor: MonitorEnv) -> None:
    await monitor.signed_in(ALICE, "198.51.100.7")
    monitor.env.idp.set_groups("alice", ["sre", "finance"])
    browser = await monitor.signed_in(ALICE, "203.0.113.5")  # a new network, a new group
    for _ in range(5):
        await browser.get(monitor.env.base + "/locked/x", headers=JSON)
    await monitor.signed_in(BOB)
    settings = monitor.settings
    settings["routes"][1] = {**settings["routes"][1], "policy": ledger(["finance", "sre"])}
    monitor.path.write_text(yaml.safe_dump(settings))  # bob gains `locked`
    assert await monitor.env.gateway.reload(actor="test") is True
    await monitor.call("POST", "/users/alice@example.org/disable")
    await browser.get(monitor.env.base + "/app/x", headers=JSON)
    await refused_login(monitor, ALICE, "203.0.113.5")
    assert await monitor.alerts() == []
    assert monitor.receiver.alerts[-1]["type"] == "test.barrier"  # the webhook did work
