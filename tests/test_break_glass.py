"""Break-glass over real HTTP: the gateway, the dev IdP (stopped to make it unreachable), the
admin API and an upstream (SPEC §3 `break_glass`, HIPAA 164.312(a)(2)(ii))."""

from __future__ import annotations

import asyncio
import html
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pyotp
import pytest
import yaml

from gateway.breakglass_accounts import (
    AccountsFileError,
    hash_password,
    load_accounts,
    parse_hash,
)
from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.server import listen
from gateway.settings import ConfigError, load_settings
from tests.conftest import assertion_key, echo_app, start_server
from tests.test_admin import TOKENS, tokens_file
from tests.test_login import HTML, SECRET, Clock, Env, _Events, config, free_port

PASSWORD = "correct horse battery staple"
TOTP = {"bg-oncall": pyotp.random_base32(), "bg-second": pyotp.random_base32()}
REASON = "EHR outage: the IdP is down and a patient needs care (INC-4242)"
ALERT_PLUGIN = """
CAUGHT = []

class Catcher:
    def __init__(self, options):
        pass

    def on_alert(self, alert):
        CAUGHT.append(alert)
"""


def write_accounts(path: Path, mode: int = 0o600) -> Path:
    hashed = hash_password(PASSWORD)
    accounts = [
        {"name": name, "password_hash": hashed, "totp_secret": secret, "groups": ["break-glass"]}
        for name, secret in TOTP.items()
    ]
    accounts[0]["email"] = "oncall@example.org"
    path.write_text(yaml.safe_dump({"accounts": accounts}, sort_keys=False))
    path.chmod(mode)
    return path


@dataclass
class Glass:
    env: Env
    admin: str
    audit: Path
    plugin: str  # the module name of the alert-catching plugin

    @property
    def clock(self) -> Clock:
        return self.env.clock

    def code(self, account: str = "bg-oncall") -> str:
        return str(pyotp.TOTP(TOTP[account]).at(self.clock.now))

    async def idp_down(self) -> None:
        await self.env.idp.stop()
        self.clock.now += 10  # past the kept answer of the last probe

    async def form(self, browser: aiohttp.ClientSession, rd: str = "/app/x") -> str:
        """GET the form; the CSRF token it carries."""
        resp = await browser.get(f"{self.env.base}/.gateway/break-glass?rd={rd}", headers=HTML)
        assert resp.status == 200, await resp.text()
        return html.unescape(re.search(r'name="csrf" value="([^"]*)"', await resp.text())[1])  # type: ignore[index]

    async def submit(
        self,
        browser: aiohttp.ClientSession,
        *,
        account: str = "bg-oncall",
        password: str = PASSWORD,
        code: str | None = None,
        reason: str = REASON,
        csrf: str | None = None,
        origin: str | None = "",
        rd: str = "/app/x",
    ) -> aiohttp.ClientResponse:
        """Fill the form (a fresh one unless `csrf` is given) and send it; not followed."""
        token = csrf if csrf is not None else await self.form(browser, rd)
        fields = {
            "csrf": token,
            "rd": rd,
            "account": account,
            "password": password,
            "code": code if code is not None else self.code(account),
            "reason": reason,
        }
        headers = dict(HTML)
        if origin is not None:
            headers["Origin"] = origin or self.env.base
        resp = await browser.post(
            f"{self.env.base}/.gateway/break-glass",
            data=fields,
            headers=headers,
            allow_redirects=False,
        )
        await resp.read()
        return resp

    async def enter(self, account: str = "bg-oncall") -> aiohttp.ClientSession:
        browser = self.env.browser()
        resp = await self.submit(browser, account=account)
        assert resp.status == 302, await resp.text()
        return browser

    async def call(self, path: str, role: str = "operate", **body: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {TOKENS[role]}"}
        async with (
            aiohttp.ClientSession() as client,
            client.post(self.admin + path, json=body, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return self.env.events_of(kind)

    def records(self) -> list[dict[str, Any]]:
        lines = [
            line for f in sorted(self.audit.glob("*.jsonl")) for line in f.read_bytes().splitlines()
        ]
        return [orjson.loads(line) for line in lines if line.strip()]

    async def records_of(self, kind: str, count: int = 1) -> list[dict[str, Any]]:
        """The audit log's records of a type, once `count` of them are on disk."""
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = [r for r in self.records() if r.get("type") == kind]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"{count} {kind} record(s) expected in the audit log, got {found}")


MakeGlass = Callable[..., Awaitable[Glass]]


@pytest.fixture
async def make_glass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeGlass]:
    """Start the gateway (break-glass on), the dev IdP, the admin API and an upstream."""
    started: list[tuple[Env, Any]] = []
    plugin = f"gw_test_bg_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{plugin}.py").write_text(ALERT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    handler, event_log = _Events([]), logging.getLogger("gateway.events")
    level = event_log.level
    event_log.addHandler(handler)
    event_log.setLevel(logging.INFO)

    async def make(sessions: str = "memory://", **rate_limits: Any) -> Glass:
        clock, port, admin_port = Clock(), free_port(), free_port()
        client = DevClient(
            "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
        )
        idp = DevIdP(
            {"alice": DevUser("alice", "alice-pw", groups=("sre",))}, [client], clock=clock
        )
        issuer = await idp.start()
        upstream = await start_server(echo_app())
        settings = config(
            port, issuer, upstream.url, tmp_path, idle_timeout="1h", max_lifetime="12h"
        )
        settings["routes"][0]["policy"] = {"allow": [{"groups": ["sre", "break-glass"]}]}
        settings["routes"].append(
            {
                "id": "phi",
                "path": "/phi",
                "upstream": upstream.url,
                "classification": "phi",
                "policy": {"require_mfa": True, "allow": [{"groups": ["break-glass"]}]},
            }
        )
        accounts = write_accounts(tmp_path / "break-glass.yaml")
        settings["break_glass"] = {"accounts_file": str(accounts), "max_duration": "10m"}
        settings["admin"] = {
            "listen": f"127.0.0.1:{admin_port}",
            "tokens_file": str(tokens_file(tmp_path / "admin-tokens")),
        }
        limits = {"count": 1000, "window": "1m"} | rate_limits
        settings["rate_limits"] = {"break_glass": limits}
        settings["plugins"] = [{"use": f"{plugin}:Catcher"}]
        settings["state"]["sessions"] = sessions
        if sessions.startswith("redis"):
            settings["assertion"] = {"signing_key_file": str(assertion_key(tmp_path))}
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(settings))
        gateway = await listen(load_settings(path), shutdown_timeout=2, clock=clock)
        base = f"http://127.0.0.1:{port}"
        env = Env(gateway, idp, upstream, clock, base, f"http://localhost:{port}", handler.into)
        started.append((env, gateway))
        return Glass(env, f"http://127.0.0.1:{admin_port}", tmp_path / "audit", plugin)

    yield make
    for env, gateway in started:
        for browser in env.browsers:
            await browser.close()
        await gateway.stop()
        await env.upstream.runner.cleanup()
        await env.idp.stop()
    event_log.removeHandler(handler)
    event_log.setLevel(level)
    sys.modules.pop(plugin, None)


@pytest.fixture
async def glass(make_glass: MakeGlass) -> Glass:
    return await make_glass()


async def test_closed_while_the_idp_answers(glass: Glass) -> None:
    browser = glass.env.browser()
    resp = await browser.get(glass.env.base + "/.gateway/break-glass")
    assert resp.status == 403
    assert (await resp.json())["reason"] == "break-glass-closed"
    posted = await browser.post(
        glass.env.base + "/.gateway/break-glass",
        data={"account": "bg-oncall", "password": PASSWORD, "code": glass.code()},
        headers={"Origin": glass.env.base},
    )
    assert posted.status == 403
    assert glass.events_of("break_glass.failed") == []


async def test_the_idp_down_opens_it_and_a_use_reaches_protected_routes(glass: Glass) -> None:
    await glass.idp_down()
    browser = glass.env.browser()
    form = await browser.get(glass.env.base + "/.gateway/break-glass?rd=/app/x", headers=HTML)
    assert form.status == 200
    csp = form.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src" not in csp
    assert form.headers["Cache-Control"] == "no-store"
    assert "cannot be reached" in await form.text()
    resp = await glass.submit(browser)
    assert resp.status == 302 and resp.headers["Location"] == "/app/x"
    app = await browser.get(glass.env.base + "/app/x", headers=HTML, allow_redirects=False)
    assert app.status == 200
    seen = dict(orjson.loads(await app.read())["headers"])
    assert seen["X-Auth-Request-User"] == "bg-oncall"
    assert seen["X-Auth-Request-Groups"] == "break-glass"
    phi = await browser.get(glass.env.base + "/phi/chart", headers=HTML, allow_redirects=False)
    assert phi.status == 200  # require_mfa: the account's TOTP code counts
    [used] = glass.events_of("break_glass.used")
    assert used["account"] == "bg-oncall" and used["reason"] == REASON
    assert used["opened_by"] == "idp-unreachable"


async def test_every_use_is_in_the_audit_log_and_alerts(glass: Glass) -> None:
    await glass.idp_down()
    browser = await glass.enter()
    resp = await browser.get(glass.env.base + "/phi/x", headers=HTML, allow_redirects=False)
    assert resp.status == 200
    glass.clock.now += 30  # the next time step: a new code
    await glass.enter("bg-second")
    used = await glass.records_of("break_glass.used", 2)
    assert [u["account"] for u in used] == ["bg-oncall", "bg-second"]
    first = used[0]
    assert first["reason"] == REASON and first["client_ip"] == "127.0.0.1"
    assert first["session"] and first["expires"].endswith("+00:00")
    alerts = await glass.records_of("alert.break_glass", 2)
    assert [a["session"] for a in alerts] == [u["session"] for u in used]
    access = [r for r in await glass.records_of("access") if r["route"] == "phi"]
    assert access[0]["user"] == "bg-oncall" and access[0]["session"] == first["session"]
    caught = sys.modules[glass.plugin].CAUGHT
    deadline = time.monotonic() + 5
    while len(caught) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert [a["type"] for a in caught] == ["alert.break_glass"] * 2
    assert caught[0]["reason"] == REASON


async def test_the_session_ends_at_max_duration(glass: Glass) -> None:
    await glass.idp_down()
    browser = await glass.enter()
    api = {"Accept": "application/json"}
    glass.clock.now += 9 * 60
    assert (await browser.get(glass.env.base + "/app/x", headers=api)).status == 200
    glass.clock.now += 61  # 10m01s: past break_glass.max_duration, far within max_lifetime 12h
    resp = await browser.get(glass.env.base + "/app/x", headers=api)
    assert resp.status == 401
    assert (await resp.json())["reason"] == "session-expired"
    ended = glass.events_of("session.ended")
    assert [e["reason"] for e in ended] == ["session-expired"]


async def test_a_code_works_once(glass: Glass) -> None:
    await glass.idp_down()
    code = glass.code()
    await glass.enter()
    again = await glass.submit(glass.env.browser(), code=code)
    assert again.status == 401
    assert "break-glass-failed" in await again.text()
    assert [e["reason"] for e in glass.events_of("break_glass.failed")] == ["replayed-code"]
    assert len(glass.events_of("break_glass.used")) == 1


@pytest.mark.parametrize("reason", ["", "   ", "too short", "x" * 1001])
async def test_a_written_reason_is_required(glass: Glass, reason: str) -> None:
    await glass.idp_down()
    browser = glass.env.browser()
    resp = await glass.submit(browser, reason=reason)
    assert resp.status == 400
    assert "break-glass-reason" in await resp.text()
    assert glass.events_of("break_glass.used") == []
    assert [e["reason"] for e in glass.events_of("break_glass.failed")] == ["no-reason"]
    assert (await glass.submit(browser)).status == 302  # not counted toward the lock


async def test_failures_are_counted_and_lock_the_account(glass: Glass) -> None:
    await glass.idp_down()
    browser = glass.env.browser()
    wrong = [{"password": "guess"}, {"code": "000000"}, {"account": "bg-oncall", "code": "12"}]
    for i in range(5):
        resp = await glass.submit(browser, **wrong[i % len(wrong)])
        assert resp.status == 401, i
    locked = await glass.submit(browser)  # right this time, but too late today
    assert locked.status == 403
    assert "break-glass-locked" in await locked.text()
    failed = glass.events_of("break_glass.failed")
    assert [e["reason"] for e in failed] == ["bad-credentials"] * 5 + ["locked"]
    assert [e["failures"] for e in failed] == [1, 2, 3, 4, 5, 5]
    assert len(glass.events_of("break_glass.locked")) == 1
    assert (await glass.submit(browser, account="bg-second")).status == 302  # others still work
    glass.clock.now += 86400 + 30  # a day later the lock is over
    assert (await glass.submit(browser)).status == 302


async def test_unknown_accounts_are_refused_like_wrong_passwords(glass: Glass) -> None:
    await glass.idp_down()
    resp = await glass.submit(glass.env.browser(), account="nobody", code=glass.code())
    assert resp.status == 401
    assert [e["account"] for e in glass.events_of("break_glass.failed")] == ["nobody"]


async def test_an_operator_opens_and_closes_it(glass: Glass) -> None:
    browser = glass.env.browser()
    assert (await browser.get(glass.env.base + "/.gateway/break-glass")).status == 403
    assert (await glass.call("/break-glass/open", role="read", duration="30m"))[0] == 403
    status, body = await glass.call("/break-glass/open", duration="forever")
    assert status == 400 and body["reason"] == "bad-duration"
    status, body = await glass.call("/break-glass/open", duration="30m", reason="IdP migration")
    assert status == 200 and body["open"] is True
    form = await browser.get(glass.env.base + "/.gateway/break-glass", headers=HTML)
    assert form.status == 200 and "Opened by <strong>ops</strong>" in await form.text()
    assert (await glass.submit(browser)).status == 302
    [used] = glass.events_of("break_glass.used")
    assert used["opened_by"] == "operator" and used["operator"] == "ops"
    status, body = await glass.call("/break-glass/close")
    assert status == 200 and body["was_open"] is True
    assert (await browser.get(glass.env.base + "/.gateway/break-glass")).status == 403
    [opened] = glass.events_of("break_glass.opened")
    assert opened["actor"] == "ops" and opened["reason"] == "IdP migration"
    [closed] = glass.events_of("break_glass.closed")
    assert closed["actor"] == "ops"
    await glass.records_of("break_glass.closed")


async def test_an_operators_opening_ends_by_itself(glass: Glass) -> None:
    assert (await glass.call("/break-glass/open", duration="1m"))[0] == 200
    browser = glass.env.browser()
    assert (await browser.get(glass.env.base + "/.gateway/break-glass")).status == 200
    glass.clock.now += 61
    assert (await browser.get(glass.env.base + "/.gateway/break-glass")).status == 403


@pytest.mark.parametrize(
    "attack",
    ["no-origin", "foreign-origin", "no-cookie", "other-token", "expired-form"],
)
async def test_forged_posts_are_refused(glass: Glass, attack: str) -> None:
    await glass.idp_down()
    browser = glass.env.browser()
    if attack == "no-origin":
        resp = await glass.submit(browser, origin=None)
    elif attack == "foreign-origin":
        resp = await glass.submit(browser, origin="https://evil.example")
    elif attack == "no-cookie":  # the attacker's own form token, posted from a victim's browser
        token = await glass.form(glass.env.browser())
        resp = await glass.submit(browser, csrf=token)
    elif attack == "other-token":
        await glass.form(browser)
        resp = await glass.submit(browser, csrf="forged-token")
    else:
        token = await glass.form(browser)
        glass.clock.now += 601
        resp = await glass.submit(browser, csrf=token)
    assert resp.status == 400
    expected = "bad-origin" if "origin" in attack else "bad-csrf"
    assert expected in await resp.text()
    assert glass.events_of("break_glass.used") == []
    assert glass.events_of("session.created") == []


async def test_the_guards_hold_on_every_session_store(make_glass: MakeGlass, store: str) -> None:
    """The opening, the failure counter and the replay guard live in the session store."""
    glass = await make_glass(store)
    assert (await glass.call("/break-glass/open", duration="5m"))[0] == 200
    code = glass.code()
    browser = await glass.enter()
    assert (await glass.submit(glass.env.browser(), code=code)).status == 401  # replayed
    for _ in range(4):
        assert (await glass.submit(browser, password="guess")).status == 401
    assert (await glass.submit(browser)).status == 403  # locked after 5 failures
    assert (await glass.call("/break-glass/close"))[1]["was_open"] is True
    assert (await browser.get(glass.env.base + "/.gateway/break-glass")).status == 403


async def test_the_page_and_form_are_rate_limited(make_glass: MakeGlass) -> None:
    glass = await make_glass(count=3, window="1m")
    await glass.idp_down()
    browser = glass.env.browser()
    statuses = [
        (await browser.get(glass.env.base + "/.gateway/break-glass")).status for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]


# -- the accounts file -------------------------------------------------------------------------


def gateway_file(tmp_path: Path, accounts: Path) -> Path:
    settings = config(free_port(), "http://127.0.0.1:1", "http://127.0.0.1:2", tmp_path)
    settings["break_glass"] = {"accounts_file": str(accounts)}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_an_accounts_file_others_can_read_is_refused(tmp_path: Path) -> None:
    accounts = write_accounts(tmp_path / "break-glass.yaml", mode=0o640)
    with pytest.raises(ConfigError) as refused:
        load_settings(gateway_file(tmp_path, accounts))
    assert "readable by others (mode 0640); chmod 600 it" in str(refused.value)


async def test_the_gateway_refuses_to_start_with_such_a_file(tmp_path: Path) -> None:
    accounts = write_accounts(tmp_path / "break-glass.yaml")
    settings = load_settings(gateway_file(tmp_path, accounts))
    accounts.chmod(0o644)  # changed between the check and the start
    with pytest.raises(AccountsFileError, match="readable by others"):
        await listen(settings, shutdown_timeout=1)


async def test_a_missing_accounts_file_warns_and_stops_the_start(tmp_path: Path) -> None:
    settings = load_settings(gateway_file(tmp_path, tmp_path / "absent.yaml"))
    assert any("absent.yaml does not exist" in w for w in settings.warnings)
    with pytest.raises(AccountsFileError, match=r"absent\.yaml: cannot read"):
        await listen(settings, shutdown_timeout=1)


def test_accounts_file_errors_name_file_line_and_column(tmp_path: Path) -> None:
    accounts = tmp_path / "break-glass.yaml"
    accounts.write_text(
        "accounts:\n"
        "  - name: bg-1\n"
        "    password_hash: md5$abc\n"
        "    totp_secret: not-base32!\n"
        "    groups: [break-glass]\n"
    )
    accounts.chmod(0o600)
    with pytest.raises(ConfigError) as refused:
        load_settings(gateway_file(tmp_path, accounts))
    message = str(refused.value)
    assert (
        f"break_glass.accounts_file: {accounts}:3:20: accounts[0].password_hash: expected"
        in message
    )
    assert f"{accounts}:4:18: accounts[0].totp_secret: must be base32" in message


def test_password_hashes_scrypt_and_pbkdf2() -> None:
    hashed = parse_hash(hash_password("s3cret"))
    assert hashed.matches("s3cret") and not hashed.matches("s3cret ")
    assert "s3cret" not in repr(hashed) and "salt" not in repr(hashed)
    import base64
    import hashlib

    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", b"s3cret", salt, 600_000)
    b64 = [base64.b64encode(x).decode() for x in (salt, digest)]
    pbkdf2 = parse_hash(f"pbkdf2-sha256$i=600000${b64[0]}${b64[1]}")
    assert pbkdf2.matches("s3cret") and not pbkdf2.matches("S3cret")
    for weak in (
        "pbkdf2-sha256$i=1000$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
        "scrypt$ln=10,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
    ):
        with pytest.raises(ValueError):
            parse_hash(weak)


def test_accounts_are_found_in_any_case(tmp_path: Path) -> None:
    accounts = load_accounts(write_accounts(tmp_path / "break-glass.yaml"))
    found = accounts.password_ok("BG-ONCALL", PASSWORD)
    assert found is not None and found.name == "bg-oncall" and found.email == "oncall@example.org"
    assert accounts.password_ok("bg-oncall", "wrong") is None
    assert accounts.password_ok("nobody", PASSWORD) is None
