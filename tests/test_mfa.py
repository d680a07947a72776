"""MFA at the gateway over real HTTP (SPEC §6): the dev IdP, a gateway with the admin API, and
an upstream; codes computed with pyotp from the secret the enrollment page shows.

The gateway runs on an injectable clock (`env.clock`), so TOTP steps, backoff and the daily
lock are reached by moving time, never by sleeping. Every attack test mounts the attack the
way a browser, a script or another site would, and checks what that attacker sees.
"""

from __future__ import annotations

import asyncio
import html
import logging
import math
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pyotp
import pytest
import yaml
from yarl import URL

from gateway.devidp import DevClient, DevIdP, DevUser, TokenOverride
from gateway.mfa import (
    ADDRESS_LIMIT,
    ADDRESS_WINDOW,
    BACKOFF_AFTER,
    BACKOFF_MAX,
    DRIFT,
    LINK_TTL,
    LOCK_AFTER,
    RECOVERY_CODES,
    STEP,
    AddressLimited,
    WrongCode,
)
from gateway.server import listen
from gateway.settings import load_settings, summary
from tests.conftest import REDIS_URL, assertion_key, echo_app, redis_admin, start_server
from tests.test_admin import NAMES, TOKENS, gateway_cli, tokens_file
from tests.test_authorization import amr_is, fetch_jwks, seen_values, upstream_seen
from tests.test_authorization import verify as verify_assertion
from tests.test_login import SECRET, Clock, Env, _Events, config, follow, free_port, submit_login

HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}
COOKIE = "gateway"  # sessions.cookie_name in test_login.config
PAGE_RATE = 1000  # rate_limits.mfa.count: the endpoint's own bucket stays out of the way
USERS = {
    "alice": DevUser("alice", "alice-pw", groups=("sre",)),
    "bob": DevUser("bob", "bob-pw", groups=("finance",)),
}


@dataclass
class MfaEnv:
    env: Env
    admin: str  # the admin listener's base URL
    config: Path  # the gateway's config file (for the CLI)

    @property
    def base(self) -> str:
        return self.env.base

    @property
    def clock(self) -> Clock:
        return self.env.clock

    async def call(self, method: str, path: str, role: str | None = "admin") -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
        async with (
            aiohttp.ClientSession() as client,
            client.request(method, self.admin + path, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    async def enroll_link(self, user: str) -> str:
        status, answer = await self.call("POST", f"/users/{quote(user, safe='')}/enroll-link")
        assert status == 200, answer
        return str(answer["link"])

    async def reset(self, user: str) -> tuple[int, Any]:
        return await self.call("POST", f"/users/{quote(user, safe='')}/reset-mfa")

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return self.env.events_of(kind)

    def next_step(self, steps: int = 1) -> None:
        """Move to a later TOTP step: the code last accepted is spent, a new one is shown."""
        self.clock.now += steps * STEP


def mfa_config(port: int, idp: str, upstream: str, tmp: Path, enrollment: str) -> dict[str, Any]:
    settings = config(port, idp, upstream, tmp)
    settings["mfa"] = {"totp_issuer": "Test Corp", "enrollment": enrollment}
    settings["rate_limits"] = {"mfa": {"count": PAGE_RATE, "window": "1m"}}
    settings["routes"].append(
        {
            "id": "secure",
            "path": "/secure",
            "upstream": upstream,
            "policy": {"require_mfa": True, "allow": [{"groups": ["sre", "finance"]}]},
        }
    )
    settings["routes"].insert(  # before the host's catch-all "/" route
        0,
        {
            "id": "vault",
            "host": "localhost",
            "path": "/vault",
            "upstream": upstream,
            "policy": {"require_mfa": True, "allow": [{"groups": ["sre", "finance"]}]},
        },
    )
    return settings


def merged(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it, section by section."""
    out = dict(base)
    for name, value in changes.items():
        old = out.get(name)
        out[name] = (
            merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        )
    return out


@asynccontextmanager
async def running(tmp_path: Path, changes: Mapping[str, Any]) -> AsyncIterator[MfaEnv]:
    """A gateway whose /secure route requires MFA (`invite` unless `changes` say otherwise),
    the dev IdP and an upstream; all stopped afterwards, even when one fails to start."""
    clock, port, admin_port = Clock(), free_port(), free_port()
    client = DevClient(
        "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
    )
    async with AsyncExitStack() as stack:
        idp = DevIdP(dict(USERS), [client], clock=clock)
        issuer = await idp.start()
        stack.push_async_callback(idp.stop)
        upstream = await start_server(echo_app())
        stack.push_async_callback(upstream.runner.cleanup)
        settings = mfa_config(port, issuer, upstream.url, tmp_path, "invite")
        tokens = tokens_file(tmp_path / "admin-tokens")
        settings["admin"] = {"listen": f"127.0.0.1:{admin_port}", "tokens_file": str(tokens)}
        settings = merged(settings, changes)
        if str(settings["state"]["sessions"]).startswith("redis"):
            # shared by processes: a fixed assertion key; this suite's database, kept clean
            settings["assertion"] = {"signing_key_file": str(assertion_key(tmp_path))}
            await flush_redis()
            stack.push_async_callback(flush_redis)
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(settings))
        events: list[dict[str, Any]] = []
        stack.enter_context(capture_events(events))
        gateway = await listen(load_settings(path), shutdown_timeout=2, clock=clock)
        stack.push_async_callback(gateway.stop)
        base = f"http://127.0.0.1:{port}"
        env = Env(gateway, idp, upstream, clock, base, f"http://localhost:{port}", events)
        stack.push_async_callback(close_browsers, env)
        yield MfaEnv(env, f"http://127.0.0.1:{admin_port}", path)


async def flush_redis() -> None:
    admin = await redis_admin()
    await admin.flushdb()
    await admin.aclose()


async def close_browsers(env: Env) -> None:
    for browser in env.browsers:
        await browser.close()


@contextmanager
def capture_events(into: list[dict[str, Any]]) -> Iterator[None]:
    handler, event_log = _Events(into), logging.getLogger("gateway.events")
    event_log.addHandler(handler)
    level = event_log.level
    event_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        event_log.removeHandler(handler)
        event_log.setLevel(level)


@pytest.fixture
async def mfa_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MfaEnv]:
    """`mfa.enrollment: invite`; an indirect param (a dict) changes the config."""
    async with running(tmp_path, getattr(request, "param", {})) as env:
        yield env


@pytest.fixture
async def open_env(tmp_path: Path) -> AsyncIterator[MfaEnv]:
    """`mfa.enrollment: open`: any signed-in user without a factor may enroll."""
    async with running(tmp_path, {"mfa": {"enrollment": "open"}}) as env:
        yield env


def configured(changes: dict[str, Any], name: str) -> Any:
    return pytest.param(changes, id=name)


BEHIND_PROXY = {"server": {"trusted_proxies": ["127.0.0.1/32"]}}  # X-Forwarded-For believed
LONG_SESSIONS = {"sessions": {"idle_timeout": "12h"}}  # the lock takes two hours to reach
REDIS = {"state": {"sessions": REDIS_URL}}  # counters, steps and locks in Redis
ON_REDIS = configured(REDIS, "redis")


# -- helpers: a browser going through the pages ------------------------------------------------


async def visit(
    m: MfaEnv, url: str, user: str = "alice", *, past_notice: bool = False
) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    """Open `url` in a new browser, sign in at the dev IdP, follow on; (browser, final page).

    `past_notice`: a notice after the login (an enrollment, a reset) is read and continued."""
    browser = m.env.browser()
    page = await follow(browser, url)
    assert page.url.port == URL(m.env.idp.issuer).port, page.url
    callback = await submit_login(browser, page, user, f"{user}-pw")
    final = await follow(browser, callback)
    if past_notice and is_notice(await final.text()):
        final = await onward(browser, final)
    return browser, final


async def log_in(m: MfaEnv, url: str, user: str = "alice") -> aiohttp.ClientResponse:
    """Open `url` in a new browser, sign in at the dev IdP, follow on; the final response."""
    return (await visit(m, url, user))[1]


def form_fields(text: str) -> dict[str, str]:
    return {
        html.unescape(n): html.unescape(v)
        for n, v in re.findall(r'type="hidden" name="([^"]*)" value="([^"]*)"', text)
    }


def shown_secret(text: str) -> str:
    found = re.search(r'<p class="secret" id="secret">([A-Z2-7 ]+)</p>', text)
    assert found is not None, text
    return found[1].replace(" ", "")


def recovery_codes(text: str) -> list[str]:
    return re.findall(r"<li>([0-9a-f]{5}-[0-9a-f]{5})</li>", text)


def origin_of(url: URL) -> str:
    return f"{url.scheme}://{url.host}:{url.port}"


async def submit(
    browser: aiohttp.ClientSession,
    page: aiohttp.ClientResponse,
    action: str,
    code: str,
    *,
    headers: Mapping[str, str] | None = None,
    fields: Mapping[str, str] | None = None,
) -> aiohttp.ClientResponse:
    """Post a code with the page's hidden fields, from our own origin; not followed.

    `headers` are added (one given as "" is left out: `{"Origin": ""}` sends none);
    `fields` replace the page's own (a forged CSRF token).
    """
    form = {**form_fields(await page.text()), **(fields or {}), "code": code}
    sent = {**HTML, "Origin": origin_of(page.url), **(headers or {})}
    resp = await browser.post(
        str(page.url.join(URL(action))),
        data=form,
        headers={k: v for k, v in sent.items() if v},
        allow_redirects=False,
    )
    await resp.read()
    return resp


def next_link(text: str) -> str:
    found = re.search(r'<a href="([^"]+)">(?:Continue|I have saved them: continue)</a>', text)
    assert found is not None, text
    return html.unescape(found[1])


def code_at(secret: str, now: float) -> str:
    return pyotp.TOTP(secret).at(now)


def wrong_code(secret: str, now: float) -> str:
    """A 6-digit code that no step within the drift window shows."""
    near = {code_at(secret, now + d * STEP) for d in range(-DRIFT - 1, DRIFT + 2)}
    return next(c for c in ("000000", "111111", "222222", "333333", "444444") if c not in near)


def reason_shown(text: str) -> str:
    """The stable reason code on one of the gateway's error pages."""
    found = re.search(r"<dt>Reason</dt><dd>([^<]*)</dd>", text)
    assert found is not None, text
    return found[1]


def refusal_shown(text: str) -> str:
    """The error a form page shows again (wrong code, backoff, address limit)."""
    found = re.search(r'<p class="error" role="alert" id="mfa-error">([^<]*?)\s*<span', text)
    assert found is not None, text
    return html.unescape(found[1])


def form_reason(text: str) -> str:
    """The stable reason code beside that error (mfa-failed, mfa-backoff, mfa-address)."""
    found = re.search(r"\(reason: <code>([a-z-]+)</code>\)", text)
    assert found is not None, text
    return found[1]


def is_notice(text: str) -> bool:
    return "<title>Your second factor changed</title>" in text


def is_prompt(text: str) -> bool:
    return "Enter your authenticator code" in text


def is_enrollment(text: str) -> bool:
    return "<title>Set up your authenticator</title>" in text


async def onward(browser: aiohttp.ClientSession, page: aiohttp.ClientResponse) -> Any:
    """Follow a page's Continue link."""
    return await follow(browser, str(page.url.join(URL(next_link(await page.text())))))


async def enroll(m: MfaEnv, user: str = "alice") -> tuple[aiohttp.ClientSession, str, list[str]]:
    """Enroll `user` through an admin's link; (their browser, the secret, the recovery codes).

    The confirming code's step is spent: move to the next step before a prompt."""
    link = await m.enroll_link(f"{user}@example.org")
    browser, page = await visit(m, link, user)
    assert page.status == 200, await page.text()
    secret = shown_secret(await page.text())
    done = await submit(browser, page, "/.gateway/mfa/enroll", code_at(secret, m.clock()))
    assert done.status == 200, await done.text()
    codes = recovery_codes(await done.text())
    assert len(codes) == RECOVERY_CODES
    return browser, secret, codes


async def prompt(
    m: MfaEnv, user: str = "alice", path: str = "/secure/x"
) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    """A new login of an enrolled `user` opening `path`: (browser, the code prompt)."""
    browser, page = await visit(m, m.base + path, user, past_notice=True)
    assert page.status == 200 and page.url.path == "/.gateway/mfa", page.url
    assert is_prompt(await page.text()), await page.text()
    return browser, page


async def verify(
    m: MfaEnv,
    browser: aiohttp.ClientSession,
    page: aiohttp.ClientResponse,
    code: str,
    address: str | None = None,
) -> aiohttp.ClientResponse:
    """Post a code at the prompt, from `address` (X-Forwarded-For) when given."""
    headers = {"X-Forwarded-For": address} if address else {}
    return await submit(browser, page, "/.gateway/mfa", code, headers=headers)


async def reaches_app(
    m: MfaEnv, browser: aiohttp.ClientSession, done: aiohttp.ClientResponse
) -> bool:
    """Whether a verification's redirect lands on the protected app."""
    assert done.status == 302, await done.text()
    app = await follow(browser, str(URL(m.base).join(URL(done.headers["Location"]))))
    return app.status == 200 and app.url.path == "/secure/x"


def cookie_of(m: MfaEnv, browser: aiohttp.ClientSession) -> str:
    return browser.cookie_jar.filter_cookies(URL(m.base))[COOKIE].value


async def get_with_cookie(
    m: MfaEnv, path: str, cookie: str, accept: Mapping[str, str]
) -> aiohttp.ClientResponse:
    """A request carrying exactly this session cookie value (a copied, stolen or kept one)."""
    async with aiohttp.ClientSession() as client:
        resp = await client.get(
            m.base + path,
            headers={**accept, "Cookie": f"{COOKIE}={cookie}"},
            allow_redirects=False,
        )
        await resp.read()
        return resp


def failures(m: MfaEnv) -> list[dict[str, Any]]:
    """The counted failures (`mfa.failed` at the prompt; a wrong enrollment code counts not)."""
    return [e for e in m.events_of("mfa.failed") if e.get("reason") != "enrollment-code"]


def retry_after(resp: aiohttp.ClientResponse) -> int:
    return int(resp.headers["Retry-After"])


# -- the flows ---------------------------------------------------------------------------------


async def test_an_invited_user_enrolls_and_reaches_the_app(mfa_env: MfaEnv) -> None:
    browser, _secret, _codes = await enroll(mfa_env)
    resp = await follow(browser, mfa_env.base + "/secure/x")
    assert resp.status == 200, await resp.text()
    assert mfa_env.events_of("mfa.enrolled") and mfa_env.events_of("mfa.enroll_link_issued")


async def test_an_enrolled_user_is_asked_for_a_code_after_login(mfa_env: MfaEnv) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.env.clock.now += 60  # the next step: the enrollment's code is spent
    notice = await log_in(mfa_env, mfa_env.base + "/secure/x")
    assert "A new authenticator was enrolled" in await notice.text()  # once, at the next login
    browser = mfa_env.env.browsers[-1]
    prompt = await follow(browser, str(notice.url.join(URL(next_link(await notice.text())))))
    assert prompt.status == 200 and prompt.url.path == "/.gateway/mfa", prompt.url
    done = await submit(browser, prompt, "/.gateway/mfa", code_at(secret, mfa_env.env.clock()))
    assert done.status == 302, await done.text()
    app = await follow(browser, str(prompt.url.join(URL(done.headers["Location"]))))
    assert app.status == 200 and app.url.path == "/secure/x"


async def test_a_route_needing_mfa_sends_browsers_to_the_prompt_and_tells_clients_why(
    mfa_env: MfaEnv,
) -> None:
    await enroll(mfa_env)
    mfa_env.next_step()
    browser, _page = await prompt(mfa_env)
    page = await browser.get(mfa_env.base + "/secure/x?q=1", headers=HTML, allow_redirects=False)
    assert page.status == 302
    rd = quote(mfa_env.base + "/secure/x?q=1", safe="")
    assert page.headers["Location"] == f"{mfa_env.base}/.gateway/mfa?rd={rd}"
    api = await browser.get(mfa_env.base + "/secure/x", headers=JSON, allow_redirects=False)
    assert api.status == 401 and (await api.json())["reason"] == "mfa-required"
    challenge = api.headers["WWW-Authenticate"]
    assert 'error="insufficient_user_authentication"' in challenge
    assert 'acr_values="mfa"' in challenge
    # without a session, the MFA page sends the browser to the login, which comes back to it
    async with aiohttp.ClientSession() as stranger:
        resp = await stranger.get(
            f"{mfa_env.base}/.gateway/mfa?rd={rd}", headers=HTML, allow_redirects=False
        )
        assert resp.status == 302
        login = URL(resp.headers["Location"])
        assert login.path == "/.gateway/login"
        assert login.query["rd"] == f"/.gateway/mfa?rd={rd}"


# -- enrollment: invite, links -----------------------------------------------------------------


async def test_without_a_link_an_invited_user_cannot_enroll(mfa_env: MfaEnv) -> None:
    browser, page = await visit(mfa_env, mfa_env.base + "/secure/x")
    assert page.status == 403 and page.url.path == "/.gateway/mfa"
    assert reason_shown(await page.text()) == "mfa-not-enrolled"
    enroll_page = await follow(browser, mfa_env.base + "/.gateway/mfa/enroll?rd=/secure/x")
    assert enroll_page.status == 403
    assert reason_shown(await enroll_page.text()) == "mfa-not-enrolled"
    # a made-up code, with a valid CSRF token of this very session (from the sessions page)
    sessions_page = await follow(browser, mfa_env.base + "/.gateway/sessions")
    forged = await submit(browser, sessions_page, "/.gateway/mfa/enroll", "123456")
    assert forged.status == 403 and reason_shown(await forged.text()) == "mfa-not-enrolled"
    forged = await submit(browser, sessions_page, "/.gateway/mfa", "123456")
    assert forged.status == 403 and reason_shown(await forged.text()) == "mfa-not-enrolled"
    assert mfa_env.events_of("mfa.enrolled") == []
    # the protected route stays out of reach, for the browser and for a script
    again = await follow(browser, mfa_env.base + "/secure/x")
    assert again.status == 403 and reason_shown(await again.text()) == "mfa-not-enrolled"
    api = await browser.get(mfa_env.base + "/secure/x", headers=JSON, allow_redirects=False)
    assert api.status == 401 and (await api.json())["reason"] == "mfa-required"


async def test_a_link_opened_by_another_user_is_refused_and_stays_usable(
    mfa_env: MfaEnv,
) -> None:
    link = await mfa_env.enroll_link("alice@example.org")
    _, page = await visit(mfa_env, link, "bob")
    assert page.status == 403
    text = await page.text()
    assert reason_shown(text) == "mfa-link-other-user"
    assert 'id="secret"' not in text
    [refused] = mfa_env.events_of("mfa.enroll_link_refused")
    assert refused["user"] == "bob@example.org"
    assert refused["link_for"] == "alice@example.org"
    assert mfa_env.events_of("mfa.enrolled") == []
    browser, page = await visit(mfa_env, link, "alice")
    assert page.status == 200 and is_enrollment(await page.text())
    secret = shown_secret(await page.text())
    done = await submit(browser, page, "/.gateway/mfa/enroll", code_at(secret, mfa_env.clock()))
    assert done.status == 200 and len(recovery_codes(await done.text())) == RECOVERY_CODES
    [enrolled] = mfa_env.events_of("mfa.enrolled")
    assert enrolled["user"] == "alice@example.org" and enrolled["via"] == "link"


async def test_a_link_names_its_user_in_any_ascii_case_or_by_issuer_and_subject(
    mfa_env: MfaEnv,
) -> None:
    shouted = await mfa_env.enroll_link("ALICE@Example.ORG")
    _, page = await visit(mfa_env, shouted, "alice")
    text = await page.text()
    assert page.status == 200 and is_enrollment(text)
    assert re.search(r'id="secret">[A-Z2-7]{4}( [A-Z2-7]{4})+</p>', text)  # grouped by four
    assert '<svg width="' in text and "Test Corp" in text  # the QR code, inline
    exact = await mfa_env.enroll_link(f"{mfa_env.env.idp.issuer}|{USERS['bob'].sub}")
    _, page = await visit(mfa_env, exact, "alice")
    assert page.status == 403 and reason_shown(await page.text()) == "mfa-link-other-user"
    _, page = await visit(mfa_env, exact, "bob")
    assert page.status == 200 and is_enrollment(await page.text())


async def test_a_link_is_single_use(mfa_env: MfaEnv) -> None:
    link = await mfa_env.enroll_link("alice@example.org")
    first, first_page = await visit(mfa_env, link)  # two browsers of alice open the same link
    second, second_page = await visit(mfa_env, link)
    first_secret = shown_secret(await first_page.text())
    second_secret = shown_secret(await second_page.text())
    assert first_secret != second_secret
    now = mfa_env.clock()
    done = await submit(first, first_page, "/.gateway/mfa/enroll", code_at(first_secret, now))
    assert done.status == 200
    late = await submit(second, second_page, "/.gateway/mfa/enroll", code_at(second_secret, now))
    assert late.status == 403 and reason_shown(await late.text()) == "mfa-not-enrolled"
    assert recovery_codes(await late.text()) == []
    assert len(mfa_env.events_of("mfa.enrolled")) == 1
    _, again = await visit(mfa_env, link, past_notice=True)
    assert again.status == 403 and reason_shown(await again.text()) == "mfa-link-invalid"
    # the factor is the first browser's: the second secret's codes open nothing
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    refused = await verify(mfa_env, browser, page, code_at(second_secret, mfa_env.clock()))
    assert refused.status == 401
    done = await verify(mfa_env, browser, page, code_at(first_secret, mfa_env.clock()))
    assert await reaches_app(mfa_env, browser, done)


async def test_a_link_expires_after_a_day(mfa_env: MfaEnv) -> None:
    link = await mfa_env.enroll_link("alice@example.org")
    later = await mfa_env.enroll_link("alice@example.org")
    mfa_env.clock.now += LINK_TTL - 60
    _, page = await visit(mfa_env, link)
    assert page.status == 200 and is_enrollment(await page.text())
    mfa_env.clock.now += 61
    _, page = await visit(mfa_env, later)
    assert page.status == 403 and reason_shown(await page.text()) == "mfa-link-invalid"
    _, page = await visit(mfa_env, mfa_env.base + "/.gateway/mfa/enroll?link=made-up-token")
    assert page.status == 403 and reason_shown(await page.text()) == "mfa-link-invalid"


# -- enrollment: open --------------------------------------------------------------------------


async def test_open_enrollment_needs_no_link_and_never_replaces_a_factor(
    open_env: MfaEnv,
) -> None:
    browser, page = await visit(open_env, open_env.base + "/secure/x")
    assert page.status == 200 and page.url.path == "/.gateway/mfa/enroll"
    assert page.url.query["rd"] == open_env.base + "/secure/x"
    secret = shown_secret(await page.text())
    done = await submit(browser, page, "/.gateway/mfa/enroll", code_at(secret, open_env.clock()))
    assert done.status == 200 and len(recovery_codes(await done.text())) == RECOVERY_CODES
    app = await onward(browser, done)
    assert app.status == 200 and app.url.path == "/secure/x"
    [enrolled] = open_env.events_of("mfa.enrolled")
    assert enrolled["via"] == "open"
    # enrolled: the next login asks for a code, and the enrollment page sends to the prompt
    open_env.next_step()
    browser, page = await prompt(open_env)
    resp = await browser.get(
        open_env.base + "/.gateway/mfa/enroll?rd=/secure/x", headers=HTML, allow_redirects=False
    )
    assert resp.status == 302 and URL(resp.headers["Location"]).path == "/.gateway/mfa"
    forged = await submit(browser, page, "/.gateway/mfa/enroll", "123456")
    assert forged.status == 403 and reason_shown(await forged.text()) == "mfa-not-enrolled"
    done = await verify(open_env, browser, page, code_at(secret, open_env.clock()))
    assert await reaches_app(open_env, browser, done)


async def test_open_enrollment_confirmed_late_does_not_replace_the_factor(
    open_env: MfaEnv,
) -> None:
    # Someone holding alice's password opens the enrollment page before she enrolls...
    intruder, intruder_page = await visit(open_env, open_env.base + "/secure/x")
    assert is_enrollment(await intruder_page.text())
    browser, page = await visit(open_env, open_env.base + "/secure/x")
    secret = shown_secret(await page.text())
    done = await submit(browser, page, "/.gateway/mfa/enroll", code_at(secret, open_env.clock()))
    assert done.status == 200
    # ... and confirms it after she did: "a factor is replaced only through a link or a reset"
    theirs = shown_secret(await intruder_page.text())
    late = await submit(
        intruder, intruder_page, "/.gateway/mfa/enroll", code_at(theirs, open_env.clock())
    )
    open_env.next_step()
    browser, page = await prompt(open_env)
    done = await verify(open_env, browser, page, code_at(secret, open_env.clock()))
    assert done.status == 302, "alice's own authenticator was replaced by the late enrollment"
    assert await reaches_app(open_env, browser, done)
    assert late.status in (302, 403), late.status  # refused, or sent on to the prompt
    assert recovery_codes(await late.text()) == []
    assert len(open_env.events_of("mfa.enrolled")) == 1


async def test_open_enrollment_is_warned_about(open_env: MfaEnv, tmp_path: Path) -> None:
    settings = load_settings(open_env.config)
    assert any(w.startswith("mfa.enrollment: open") for w in settings.warnings)
    assert "mfa.enrollment: open" in summary(settings)  # what check-config and run print
    invite = yaml.safe_load(open_env.config.read_text())
    invite["mfa"]["enrollment"] = "invite"
    (tmp_path / "invite.yaml").write_text(yaml.safe_dump(invite))
    assert not any("mfa.enrollment" in w for w in load_settings(tmp_path / "invite.yaml").warnings)


# -- verification: replay, drift ---------------------------------------------------------------


async def test_the_same_code_twice_is_refused_as_a_replay(mfa_env: MfaEnv) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    first, first_page = await prompt(mfa_env)  # two logins of alice, in one time step
    second, second_page = await prompt(mfa_env)
    code = code_at(secret, mfa_env.clock())
    assert await reaches_app(mfa_env, first, await verify(mfa_env, first, first_page, code))
    replayed = await verify(mfa_env, second, second_page, code)
    assert replayed.status == 401
    assert refusal_shown(await replayed.text()) == WrongCode().detail
    assert form_reason(await replayed.text()) == "mfa-failed"
    [replay] = mfa_env.events_of("mfa.replay")
    assert replay["user"] == "alice@example.org"
    assert [e["reason"] for e in failures(mfa_env)] == ["replay"]
    api = await second.get(mfa_env.base + "/secure/x", headers=JSON, allow_redirects=False)
    assert api.status == 401 and (await api.json())["reason"] == "mfa-required"


async def test_a_code_two_steps_old_is_refused_and_one_step_old_accepted(
    mfa_env: MfaEnv,
) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step(3)
    now = mfa_env.clock()
    browser, page = await prompt(mfa_env)
    stale = await verify(mfa_env, browser, page, code_at(secret, now - (DRIFT + 1) * STEP))
    assert stale.status == 401
    early = await verify(mfa_env, browser, page, code_at(secret, now + (DRIFT + 1) * STEP))
    assert early.status == 401
    late = await verify(mfa_env, browser, page, code_at(secret, now - DRIFT * STEP))
    assert await reaches_app(mfa_env, browser, late)
    # a phone whose clock runs one step ahead works too
    browser, page = await prompt(mfa_env)
    ahead = await verify(mfa_env, browser, page, code_at(secret, now + DRIFT * STEP))
    assert await reaches_app(mfa_env, browser, ahead)


async def test_the_enrollment_code_is_refused_at_the_next_prompt(mfa_env: MfaEnv) -> None:
    _, secret, _ = await enroll(mfa_env)
    browser, page = await prompt(mfa_env)  # the same time step
    replayed = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
    assert replayed.status == 401
    assert len(mfa_env.events_of("mfa.replay")) == 1
    mfa_env.next_step()
    done = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
    assert await reaches_app(mfa_env, browser, done)


# -- verification: backoff, lock, recovery codes -----------------------------------------------


async def test_wrong_codes_back_off_doubling_from_one_second(mfa_env: MfaEnv) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    for _ in range(BACKOFF_AFTER):
        wrong = await verify(mfa_env, browser, page, wrong_code(secret, mfa_env.clock()))
        assert wrong.status == 401, wrong.status
    waits = [1.0, 2.0, 4.0]  # after the 3rd, 4th and 5th failure
    for n, wait in enumerate(waits):
        failed_at = mfa_env.clock()
        for elapsed in (0.0, wait - 0.1):  # within the wait, even the right code is not checked
            mfa_env.clock.now = failed_at + elapsed
            held = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
            assert held.status == 429, (wait, elapsed, held.status)
            left = math.ceil(wait - elapsed)
            assert left <= retry_after(held) <= left + 1, (wait, elapsed, retry_after(held))
            assert "wait" in refusal_shown(await held.text())
            assert form_reason(await held.text()) == "mfa-backoff"
        mfa_env.clock.now = failed_at + wait + 0.01
        if n < len(waits) - 1:
            wrong = await verify(mfa_env, browser, page, wrong_code(secret, mfa_env.clock()))
            assert wrong.status == 401
    assert len(failures(mfa_env)) == BACKOFF_AFTER + 2  # the held attempts were not counted
    done = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
    assert await reaches_app(mfa_env, browser, done)


@pytest.mark.parametrize("mfa_env", [configured({}, "memory"), ON_REDIS], indirect=True)
async def test_parallel_guesses_cannot_outrun_the_backoff(mfa_env: MfaEnv) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    near = {code_at(secret, mfa_env.clock() + d * STEP) for d in range(-DRIFT, DRIFT + 1)}
    guesses = [g for g in (f"{n:06d}" for n in range(100, 120)) if g not in near]
    answers = await asyncio.gather(*(verify(mfa_env, browser, page, g) for g in guesses))
    statuses = sorted(a.status for a in answers)
    assert set(statuses) <= {401, 429}, statuses
    assert statuses.count(401) <= BACKOFF_AFTER, statuses
    assert len(failures(mfa_env)) <= BACKOFF_AFTER


@pytest.mark.parametrize("mfa_env", [configured({}, "memory"), ON_REDIS], indirect=True)
@pytest.mark.parametrize("kind", ["totp", "recovery"])
async def test_one_code_sent_twice_at_once_is_accepted_once(mfa_env: MfaEnv, kind: str) -> None:
    _, secret, codes = await enroll(mfa_env)
    mfa_env.next_step()
    tabs = [await prompt(mfa_env) for _ in range(4)]
    code = code_at(secret, mfa_env.clock()) if kind == "totp" else codes[0]
    answers = await asyncio.gather(*(verify(mfa_env, b, page, code) for b, page in tabs))
    statuses = sorted(a.status for a in answers)
    assert statuses.count(302) == 1, statuses
    assert set(statuses) <= {302, 401, 429}, statuses


@pytest.mark.parametrize(
    "mfa_env",
    [
        configured(LONG_SESSIONS, "invite"),
        configured(merged(LONG_SESSIONS, {"mfa": {"enrollment": "open"}}), "open"),
        configured(merged(LONG_SESSIONS, REDIS), "invite-redis"),
    ],
    indirect=True,
)
async def test_twenty_failures_in_a_day_lock_the_factor_until_an_admin_resets_it(
    mfa_env: MfaEnv,
) -> None:
    is_open = load_settings(mfa_env.config).mfa.enrollment == "open"
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    for count in range(1, LOCK_AFTER + 1):
        wrong = await verify(mfa_env, browser, page, wrong_code(secret, mfa_env.clock()))
        if count < LOCK_AFTER:
            assert wrong.status == 401, (count, wrong.status)
            if count >= BACKOFF_AFTER:
                mfa_env.clock.now += min(2.0 ** (count - BACKOFF_AFTER), BACKOFF_MAX) + 0.01
    assert wrong.status == 403 and reason_shown(await wrong.text()) == "mfa-locked"
    [locked] = mfa_env.events_of("mfa.locked")
    assert locked["user"] == "alice@example.org"
    assert failures(mfa_env)[-1]["failures"] == LOCK_AFTER
    right = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
    assert right.status == 403 and reason_shown(await right.text()) == "mfa-locked"
    # a new login, hours later, does not lift it
    mfa_env.clock.now += 3 * 3600
    browser, page = await prompt(mfa_env)
    right = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
    assert right.status == 403 and reason_shown(await right.text()) == "mfa-locked"
    recovery = await verify(mfa_env, browser, page, "00000-00000")
    assert recovery.status == 403
    # re-enrolling is no way out, not even where anyone may enroll
    again = await browser.get(
        mfa_env.base + "/.gateway/mfa/enroll?rd=/secure/x", headers=HTML, allow_redirects=False
    )
    assert again.status == (302 if is_open else 403)
    assert not is_enrollment(await again.text())
    # an admin's reset does: the factor is gone, and a new enrollment (invite: a new link)
    status, answer = await mfa_env.reset("alice@example.org")
    assert (status, answer["removed"]) == (200, True), answer
    _, page = await visit(mfa_env, mfa_env.base + "/secure/x")
    assert is_notice(await page.text())
    _, page = await visit(mfa_env, mfa_env.base + "/secure/x")
    if is_open:
        assert page.status == 200 and is_enrollment(await page.text())
    else:
        assert page.status == 403 and reason_shown(await page.text()) == "mfa-not-enrolled"
    _, new_secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    done = await verify(mfa_env, browser, page, code_at(new_secret, mfa_env.clock()))
    assert await reaches_app(mfa_env, browser, done)


async def test_a_recovery_code_works_once(mfa_env: MfaEnv) -> None:
    _, _, codes = await enroll(mfa_env)
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    assert await reaches_app(mfa_env, browser, await verify(mfa_env, browser, page, codes[0]))
    [used] = mfa_env.events_of("mfa.recovery_used")
    assert used["remaining"] == RECOVERY_CODES - 1 and used["user"] == "alice@example.org"
    browser, page = await prompt(mfa_env)
    again = await verify(mfa_env, browser, page, codes[0])
    assert again.status == 401
    assert failures(mfa_env)[-1]["reason"] == "wrong-recovery-code"
    # wrong recovery codes count toward the backoff like wrong TOTP codes
    for made_up in ("00000-00000", "fffff-fffff")[: BACKOFF_AFTER - 1]:
        assert (await verify(mfa_env, browser, page, made_up)).status == 401
    assert [e["failures"] for e in failures(mfa_env)] == list(range(1, BACKOFF_AFTER + 1))
    held = await verify(mfa_env, browser, page, codes[1])
    assert held.status == 429
    mfa_env.clock.now += 1.01
    typed = codes[1].upper().replace("-", " ")  # as read aloud from paper
    assert await reaches_app(mfa_env, browser, await verify(mfa_env, browser, page, typed))
    remaining = [e["remaining"] for e in mfa_env.events_of("mfa.recovery_used")]
    assert remaining == [RECOVERY_CODES - 1, RECOVERY_CODES - 2]


NOT_ASCII_DIGITS = [  # str.isdigit() says yes to each
    pytest.param("\u0661\u0662\u0663\u0664\u0665\u0666", id="arabic-indic"),  # an Arabic keyboard
    pytest.param("\uff11\uff12\uff13\uff14\uff15\uff16", id="fullwidth"),  # a Japanese IME
    pytest.param("\u00b9\u00b2\u00b3\u2074\u2075\u2076", id="superscript"),
]


@pytest.mark.parametrize("typed", NOT_ASCII_DIGITS)
async def test_digits_that_are_not_ascii_are_a_wrong_code_at_the_prompt(
    mfa_env: MfaEnv, typed: str
) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    refused = await verify(mfa_env, browser, page, typed)
    assert refused.status == 401 and is_prompt(await refused.text()), refused.status
    assert len(failures(mfa_env)) == 1  # counted, like any wrong guess
    done = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
    assert await reaches_app(mfa_env, browser, done)


@pytest.mark.parametrize("typed", NOT_ASCII_DIGITS)
async def test_digits_that_are_not_ascii_are_a_wrong_code_at_enrollment(
    mfa_env: MfaEnv, typed: str
) -> None:
    link = await mfa_env.enroll_link("alice@example.org")
    browser, enrollment = await visit(mfa_env, link)
    secret = shown_secret(await enrollment.text())
    wrong = await submit(browser, enrollment, "/.gateway/mfa/enroll", typed)
    assert wrong.status == 401 and is_enrollment(await wrong.text()), wrong.status
    done = await submit(browser, wrong, "/.gateway/mfa/enroll", code_at(secret, mfa_env.clock()))
    assert done.status == 200


# -- the session after the step ----------------------------------------------------------------


async def test_the_session_id_from_before_the_step_is_revoked(mfa_env: MfaEnv) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    before = cookie_of(mfa_env, browser)
    done = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
    assert done.status == 302
    after = cookie_of(mfa_env, browser)
    set_cookie = done.headers["Set-Cookie"]
    assert after != before and f"{COOKIE}={after}" in set_cookie
    for flag in ("HttpOnly", "SameSite=Lax", "Path=/"):
        assert flag in set_cookie, set_cookie
    assert "Domain" not in set_cookie
    app = await follow(browser, str(URL(mfa_env.base).join(URL(done.headers["Location"]))))
    assert app.status == 200 and app.url.path == "/secure/x"
    # the upstream is told how the user proved it (RFC 8176 amr)
    [assertion] = seen_values(await upstream_seen(app), "X-Gateway-Assertion")
    claims = verify_assertion(mfa_env.env, await fetch_jwks(mfa_env.env), assertion, "secure")
    assert "otp" in claims["amr"] and claims["email"] == "alice@example.org"
    rotated = mfa_env.events_of("session.rotated")[-1]
    assert rotated["reason"] == "mfa-step"
    ended = [e for e in mfa_env.events_of("session.ended") if e["session"] == rotated["previous"]]
    assert [e["reason"] for e in ended] == ["mfa-step"]
    for path in ("/secure/x", "/app/x"):
        api = await get_with_cookie(mfa_env, path, before, JSON)
        assert api.status == 401 and (await api.json())["reason"] == "session-revoked"
        page_resp = await get_with_cookie(mfa_env, path, before, HTML)
        assert page_resp.status == 302
        assert URL(page_resp.headers["Location"]).path == "/.gateway/login"
    fine = await get_with_cookie(mfa_env, "/secure/x", after, JSON)
    assert fine.status == 200


async def test_the_session_id_from_before_enrollment_is_revoked(mfa_env: MfaEnv) -> None:
    link = await mfa_env.enroll_link("alice@example.org")
    browser, page = await visit(mfa_env, link)
    before = cookie_of(mfa_env, browser)
    secret = shown_secret(await page.text())
    done = await submit(browser, page, "/.gateway/mfa/enroll", code_at(secret, mfa_env.clock()))
    assert done.status == 200 and cookie_of(mfa_env, browser) != before
    api = await get_with_cookie(mfa_env, "/secure/x", before, JSON)
    assert api.status == 401 and (await api.json())["reason"] == "session-revoked"
    fine = await get_with_cookie(mfa_env, "/secure/x", cookie_of(mfa_env, browser), JSON)
    assert fine.status == 200


@pytest.mark.parametrize("amr", [["otp"], ["pwd", "mfa"]])
async def test_an_idp_second_factor_is_not_asked_again(mfa_env: MfaEnv, amr: list[str]) -> None:
    mfa_env.env.idp.id_token_hook = amr_is(amr)
    browser, page = await visit(mfa_env, mfa_env.base + "/secure/x")
    assert page.status == 200 and page.url.path == "/secure/x"
    rd = mfa_env.base + "/secure/x"
    resp = await browser.get(
        f"{mfa_env.base}/.gateway/mfa?rd={quote(rd, safe='')}", headers=HTML, allow_redirects=False
    )
    assert resp.status == 302 and resp.headers["Location"] == rd
    assert mfa_env.events_of("mfa.verified") == [] and mfa_env.events_of("mfa.failed") == []
    for elsewhere in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        resp = await browser.get(
            f"{mfa_env.base}/.gateway/mfa?rd={quote(elsewhere, safe='')}",
            headers=HTML,
            allow_redirects=False,
        )
        assert resp.status == 302 and resp.headers["Location"] == "/", elsewhere


async def test_the_form_rd_cannot_send_the_browser_elsewhere(mfa_env: MfaEnv) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    code = code_at(secret, mfa_env.clock())
    done = await submit(browser, page, "/.gateway/mfa", code, fields={"rd": "//evil.example/"})
    assert done.status == 302 and done.headers["Location"] == "/"


async def test_hostile_names_and_addresses_are_shown_as_text(open_env: MfaEnv) -> None:
    hostile = '"><script>alert(1)</script>@example.org'
    open_env.env.idp.id_token_hook = lambda header, claims: TokenOverride(claims={"email": hostile})
    rd = '/secure/x?q="><script>alert(2)</script>'
    _, page = await visit(open_env, f"{open_env.base}/.gateway/mfa/enroll?rd={quote(rd, safe='')}")
    text = await page.text()
    assert page.status == 200 and is_enrollment(text)
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@example.org" in text  # the name, as text
    assert form_fields(text)["rd"].startswith("/secure/x?q=")  # the rd, kept as a value


@pytest.mark.parametrize("mfa_env", [configured(BEHIND_PROXY, "proxy")], indirect=True)
async def test_forward_auth_step_up_goes_to_the_mfa_page(mfa_env: MfaEnv) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    rd = mfa_env.base + "/secure/x"
    step_up = f"{mfa_env.base}/.gateway/login?rd={quote(rd, safe='')}&step_up=mfa"
    browser, _ = await visit(mfa_env, mfa_env.base + "/app/x", past_notice=True)
    asked = {
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Host": URL(mfa_env.base).host or "",
        "X-Forwarded-Uri": "/secure/x",
        **JSON,
    }
    nginx = await browser.get(mfa_env.base + "/.gateway/auth", headers=asked)
    assert nginx.status == 401 and (await nginx.json())["reason"] == "mfa-required"
    assert 'acr_values="mfa"' in nginx.headers["WWW-Authenticate"]
    resp = await browser.get(step_up, headers=HTML, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == f"{mfa_env.base}/.gateway/mfa?rd={quote(rd, safe='')}"
    page = await follow(browser, resp.headers["Location"])
    done = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
    assert done.status == 302 and done.headers["Location"] == rd
    assert (await browser.get(mfa_env.base + "/.gateway/auth", headers=asked)).status == 200
    # without a session, the same URL is an ordinary login at the IdP
    async with aiohttp.ClientSession() as stranger:
        resp = await stranger.get(step_up, headers=HTML, allow_redirects=False)
        assert resp.status == 302
        assert URL(resp.headers["Location"]).port == URL(mfa_env.env.idp.issuer).port


# -- attacks on the forms ----------------------------------------------------------------------

FOREIGN = [
    pytest.param({"Origin": ""}, id="no-origin"),
    pytest.param({"Origin": "https://evil.example"}, id="foreign-origin"),
    pytest.param({"Origin": "http://127.0.0.1:1"}, id="another-port"),
    pytest.param({"Origin": "https://127.0.0.1:{port}"}, id="another-scheme"),
    pytest.param({"Origin": "http://127.0.0.1.evil.example:{port}"}, id="suffixed-host"),
    pytest.param({"Origin": "null"}, id="null-origin-cross-site"),
    pytest.param({"Origin": "null", "Sec-Fetch-Site": "cross-site"}, id="null-origin-sec-fetch"),
]


@pytest.mark.parametrize("headers", FOREIGN)
async def test_the_prompt_refuses_posts_from_other_origins(
    mfa_env: MfaEnv, headers: dict[str, str]
) -> None:
    headers = {k: v.format(port=URL(mfa_env.base).port) for k, v in headers.items()}
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    for code in [wrong_code(secret, mfa_env.clock())] * (BACKOFF_AFTER + 1) + [
        code_at(secret, mfa_env.clock())
    ]:
        forged = await submit(browser, page, "/.gateway/mfa", code, headers=headers)
        assert forged.status == 400 and reason_shown(await forged.text()) == "bad-origin"
        assert "Set-Cookie" not in forged.headers
    assert failures(mfa_env) == [] and mfa_env.events_of("mfa.verified") == []
    # the browser's own form still works at once: nothing was counted
    same = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}  # what Chromium sends here
    done = await submit(
        browser, page, "/.gateway/mfa", code_at(secret, mfa_env.clock()), headers=same
    )
    assert await reaches_app(mfa_env, browser, done)


async def test_the_prompt_refuses_a_wrong_or_foreign_csrf_token(mfa_env: MfaEnv) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    _, other_page = await prompt(mfa_env)  # another session (of the same user, even)
    browser, page = await prompt(mfa_env)
    foreign = form_fields(await other_page.text())["csrf"]
    assert foreign != form_fields(await page.text())["csrf"]
    for token in ["", "0" * 32, foreign, foreign.upper()]:
        for code in (wrong_code(secret, mfa_env.clock()), code_at(secret, mfa_env.clock())):
            forged = await submit(browser, page, "/.gateway/mfa", code, fields={"csrf": token})
            assert forged.status == 400 and reason_shown(await forged.text()) == "bad-csrf"
    assert failures(mfa_env) == [] and mfa_env.events_of("mfa.verified") == []
    done = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
    assert await reaches_app(mfa_env, browser, done)


async def test_the_enrollment_form_refuses_other_origins_and_csrf_tokens(
    mfa_env: MfaEnv,
) -> None:
    link = await mfa_env.enroll_link("alice@example.org")
    _, other_page = await visit(mfa_env, mfa_env.base + "/app/x")
    browser, page = await visit(mfa_env, link)
    secret = shown_secret(await page.text())
    code = code_at(secret, mfa_env.clock())
    foreign = form_fields(await other_page.text()).get("csrf") or "0" * 32
    for headers, fields, reason in [
        ({"Origin": ""}, {}, "bad-origin"),
        ({"Origin": "https://evil.example"}, {}, "bad-origin"),
        ({}, {"csrf": "0" * 32}, "bad-csrf"),
        ({}, {"csrf": foreign}, "bad-csrf"),
    ]:
        forged = await submit(
            browser, page, "/.gateway/mfa/enroll", code, headers=headers, fields=fields
        )
        assert forged.status == 400 and reason_shown(await forged.text()) == reason
        assert recovery_codes(await forged.text()) == []
    assert mfa_env.events_of("mfa.enrolled") == []
    done = await submit(browser, page, "/.gateway/mfa/enroll", code)
    assert done.status == 200 and len(recovery_codes(await done.text())) == RECOVERY_CODES


async def test_a_wrong_enrollment_code_shows_the_page_again(mfa_env: MfaEnv) -> None:
    link = await mfa_env.enroll_link("alice@example.org")
    browser, page = await visit(mfa_env, link)
    secret = shown_secret(await page.text())
    wrong = await submit(browser, page, "/.gateway/mfa/enroll", wrong_code(secret, mfa_env.clock()))
    assert wrong.status == 401 and is_enrollment(await wrong.text())
    assert shown_secret(await wrong.text()) == secret  # the same secret: the app already has it
    assert refusal_shown(await wrong.text()) == WrongCode().detail
    assert mfa_env.events_of("mfa.enrolled") == []
    done = await submit(browser, wrong, "/.gateway/mfa/enroll", code_at(secret, mfa_env.clock()))
    assert done.status == 200
    # the codes are shown once: sending the form again (back, reload) shows none
    again = await submit(browser, wrong, "/.gateway/mfa/enroll", code_at(secret, mfa_env.clock()))
    assert again.status in (400, 403) and recovery_codes(await again.text()) == []


# -- per-address limits ------------------------------------------------------------------------


async def spray(m: MfaEnv, secrets: dict[str, str], addresses: list[str], count: int) -> None:
    """`count` wrong codes from `addresses` (in turn), spread over users and time steps so no
    user reaches the backoff's wait or the lock: each user's failures are cleared by a right
    code (from another address, when X-Forwarded-For is believed) before they would."""
    sent = 0
    while sent < count:
        for user, secret in secrets.items():
            browser, page = await prompt(m, user)
            for _ in range(min(BACKOFF_AFTER - 1, count - sent)):
                address = addresses[sent % len(addresses)]
                wrong = await verify(m, browser, page, wrong_code(secret, m.clock()), address)
                assert wrong.status == 401, (sent, wrong.status)
                sent += 1
            if sent >= count:
                return
            right = await verify(m, browser, page, code_at(secret, m.clock()), "192.0.2.250")
            assert right.status == 302, await right.text()
        m.next_step()


ADDRESSES = [
    pytest.param(["198.51.100.7"], "198.51.100.7", "198.51.100.8", id="ipv4"),
    pytest.param(
        ["2001:db8:1:2::a", "2001:db8:1:2::b"],
        "2001:db8:1:2:ffff::1",  # a third address of the same /64
        "2001:db8:1:3::a",  # the neighbouring /64
        id="ipv6-per-64",
    ),
    pytest.param(["198.51.100.7"], "::ffff:198.51.100.7", "198.51.100.8", id="ipv4-mapped"),
]


@pytest.mark.parametrize(
    "mfa_env",
    [configured(BEHIND_PROXY, "memory"), configured(merged(BEHIND_PROXY, REDIS), "redis")],
    indirect=True,
)
@pytest.mark.parametrize(("sprayers", "blocked", "free"), ADDRESSES)
async def test_an_address_spraying_codes_is_stopped_without_locking_out_others(
    mfa_env: MfaEnv, sprayers: list[str], blocked: str, free: str
) -> None:
    secrets = {user: (await enroll(mfa_env, user))[1] for user in USERS}
    mfa_env.next_step()
    await spray(mfa_env, secrets, sprayers, ADDRESS_LIMIT)
    assert len(failures(mfa_env)) == ADDRESS_LIMIT
    assert mfa_env.events_of("mfa.locked") == []
    mfa_env.next_step()
    browser, page = await prompt(mfa_env, "alice")
    right = code_at(secrets["alice"], mfa_env.clock())
    held = await verify(mfa_env, browser, page, right, blocked)
    assert held.status == 429 and retry_after(held) > 0
    assert refusal_shown(await held.text()) == AddressLimited(0).detail
    assert form_reason(await held.text()) == "mfa-address"
    assert mfa_env.events_of("mfa.address_limited")  # the security team sees the spraying
    assert len(failures(mfa_env)) == ADDRESS_LIMIT  # refused unchecked, and not counted
    assert await reaches_app(mfa_env, browser, await verify(mfa_env, browser, page, right, free))


@pytest.mark.parametrize("mfa_env", [configured(BEHIND_PROXY, "proxy")], indirect=True)
async def test_an_address_may_try_again_an_hour_later(mfa_env: MfaEnv) -> None:
    # (memory store only: Redis expires its counters on its own clock, not the test's)
    secrets = {user: (await enroll(mfa_env, user))[1] for user in USERS}
    mfa_env.next_step()
    await spray(mfa_env, secrets, ["198.51.100.7"], ADDRESS_LIMIT)
    mfa_env.clock.now += ADDRESS_WINDOW
    browser, page = await prompt(mfa_env, "bob")
    right = code_at(secrets["bob"], mfa_env.clock())
    done = await verify(mfa_env, browser, page, right, "198.51.100.7")
    assert await reaches_app(mfa_env, browser, done)


async def test_x_forwarded_for_does_not_dodge_the_address_limit_without_a_trusted_proxy(
    mfa_env: MfaEnv,
) -> None:
    secrets = {user: (await enroll(mfa_env, user))[1] for user in USERS}
    mfa_env.next_step()
    rotating = [f"203.0.113.{n}" for n in range(1, ADDRESS_LIMIT + 1)]  # a new one each time
    await spray(mfa_env, secrets, rotating, ADDRESS_LIMIT)
    mfa_env.next_step()
    browser, page = await prompt(mfa_env, "alice")
    right = code_at(secrets["alice"], mfa_env.clock())
    held = await verify(mfa_env, browser, page, right, "192.0.2.77")
    assert held.status == 429 and refusal_shown(await held.text()) == AddressLimited(0).detail


@pytest.mark.parametrize(
    "mfa_env",
    [configured(merged(BEHIND_PROXY, {"rate_limits": {"mfa": {"count": 5}}}), "rate-5")],
    indirect=True,
)
async def test_the_mfa_pages_are_rate_limited_per_address(mfa_env: MfaEnv) -> None:
    browser, _ = await visit(mfa_env, mfa_env.base + "/app/x")
    for path in ["/.gateway/mfa?rd=/app/x"] * 3 + ["/.gateway/mfa/enroll?rd=/app/x"] * 2:
        resp = await browser.get(
            mfa_env.base + path, headers={**JSON, "X-Forwarded-For": "198.51.100.9"}
        )
        assert resp.status != 429, path
    for path in ("/.gateway/mfa?rd=/app/x", "/.gateway/mfa/enroll?rd=/app/x"):
        resp = await browser.get(
            mfa_env.base + path, headers={**JSON, "X-Forwarded-For": "198.51.100.9"}
        )
        assert resp.status == 429 and (await resp.json())["reason"] == "rate-limited"
        assert retry_after(resp) >= 1
    other = await browser.get(
        mfa_env.base + "/.gateway/mfa?rd=/app/x",
        headers={**JSON, "X-Forwarded-For": "198.51.100.10"},
        allow_redirects=False,
    )
    assert other.status != 429


# -- reset, notices, the admin API and the CLI -------------------------------------------------


async def test_a_reset_is_shown_at_the_next_login_and_asks_for_a_new_enrollment(
    mfa_env: MfaEnv,
) -> None:
    await enroll(mfa_env)
    status, answer = await mfa_env.reset("alice@example.org")
    assert status == 200 and answer["removed"] is True and answer["user"] == "alice@example.org"
    [reset] = mfa_env.events_of("mfa.reset")
    assert reset["actor"] == NAMES["admin"] == "root" and reset["user"] == "alice@example.org"
    [call] = mfa_env.events_of("admin.mfa_reset")
    assert call["actor"] == "root"
    browser, notice = await visit(mfa_env, mfa_env.base + "/secure/x")
    text = await notice.text()
    assert notice.status == 200 and "Your authenticator was removed" in text
    assert "A new authenticator was enrolled" not in text and "(root)" in text
    page = await onward(browser, notice)
    assert page.status == 403 and reason_shown(await page.text()) == "mfa-not-enrolled"
    _, again = await visit(mfa_env, mfa_env.base + "/secure/x")  # the notice shows once
    assert again.status == 403 and not is_notice(await again.text())
    status, answer = await mfa_env.reset("alice@example.org")  # nothing left to remove
    assert status == 404, answer


async def test_the_enrollment_notice_shows_once(mfa_env: MfaEnv) -> None:
    await enroll(mfa_env)
    mfa_env.next_step()
    _, first = await visit(mfa_env, mfa_env.base + "/secure/x")
    assert "A new authenticator was enrolled" in await first.text()
    _, second = await visit(mfa_env, mfa_env.base + "/secure/x")
    assert is_prompt(await second.text()) and not is_notice(await second.text())


async def test_the_admin_mfa_calls_need_the_admin_role(mfa_env: MfaEnv) -> None:
    await enroll(mfa_env)
    before = len(mfa_env.events_of("mfa.enroll_link_issued"))
    for action in ("enroll-link", "reset-mfa"):
        path = f"/users/alice%40example.org/{action}"
        for role, expected in [("read", 403), ("operate", 403), (None, 401)]:
            status, answer = await mfa_env.call("POST", path, role)
            assert status == expected, (action, role, answer)
    assert len(mfa_env.events_of("mfa.enroll_link_issued")) == before
    assert mfa_env.events_of("mfa.reset") == []
    status, answer = await mfa_env.reset("nobody@example.org")
    assert status == 404, answer
    status, answer = await mfa_env.reset(f"{mfa_env.env.idp.issuer}|{USERS['alice'].sub}")
    assert status == 200 and answer["removed"] is True, answer
    status, answer = await mfa_env.call("POST", "/users/bob%40example.org/enroll-link")
    assert status == 200 and answer["user"] == "bob@example.org"
    token = URL(answer["link"]).query["link"]
    assert answer["link"] == f"{mfa_env.base}/.gateway/mfa/enroll?link={token}"
    expires = datetime.strptime(answer["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(expires.timestamp() - (mfa_env.clock() + LINK_TTL)) < 2
    # the token goes to the admin who asked, never into an event (or the audit log)
    assert token not in repr(mfa_env.env.events)
    issued = [e for e in mfa_env.env.events if e.get("event") == "admin.enroll_link_issued"]
    assert issued[-1]["actor"] == "root"


async def test_the_cli_issues_links_and_resets_factors(mfa_env: MfaEnv) -> None:
    cfg, admin = str(mfa_env.config), TOKENS["admin"]
    code, out, err = await gateway_cli(
        "users", "enroll-link", "-c", cfg, "alice@example.org", token=admin
    )
    assert code == 0, err
    link = out.split()[0]
    assert link.startswith(f"{mfa_env.base}/.gateway/mfa/enroll?link=")
    browser, page = await visit(mfa_env, link)
    secret = shown_secret(await page.text())
    done = await submit(browser, page, "/.gateway/mfa/enroll", code_at(secret, mfa_env.clock()))
    assert done.status == 200
    code, out, err = await gateway_cli(
        "users", "reset-mfa", "-c", cfg, "alice@example.org", token=admin
    )
    assert (code, out.strip()) == (0, "removed the second factor of alice@example.org"), err
    assert mfa_env.events_of("mfa.reset")[-1]["actor"] == "root"


async def test_cli_mistakes_are_one_line_on_stderr(mfa_env: MfaEnv) -> None:
    cfg = str(mfa_env.config)
    runs = await asyncio.gather(
        gateway_cli("users", "reset-mfa", "-c", cfg, "nobody@example.org", token=TOKENS["admin"]),
        gateway_cli("users", "enroll-link", "-c", cfg, "alice@example.org", token=None),
        gateway_cli("users", "enroll-link", "-c", cfg, "alice@example.org"),  # operate
        gateway_cli("users", "reset-mfa", "-c", cfg, " ", token=TOKENS["admin"]),
    )
    for code, out, err in runs:
        assert code != 0 and out == "", (code, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "403" in runs[2][2]
    assert mfa_env.events_of("mfa.enroll_link_issued") == []


async def test_the_step_hands_the_new_session_to_a_route_host(mfa_env: MfaEnv) -> None:
    _, secret, _ = await enroll(mfa_env)
    mfa_env.next_step()
    vault = mfa_env.env.other + "/vault/x"
    browser, page = await visit(mfa_env, vault, past_notice=True)
    assert page.status == 200 and page.url.path == "/.gateway/mfa", page.url
    assert page.url.query["rd"] == vault
    handed = browser.cookie_jar.filter_cookies(URL(mfa_env.env.other))[COOKIE].value
    done = await verify(mfa_env, browser, page, code_at(secret, mfa_env.clock()))
    assert done.status == 302
    app = await follow(browser, done.headers["Location"])
    assert app.status == 200 and str(app.url) == vault
    now_there = browser.cookie_jar.filter_cookies(URL(mfa_env.env.other))[COOKIE].value
    assert now_there not in (handed, "")
    async with aiohttp.ClientSession() as stolen:  # the route host's pre-step cookie is dead
        resp = await stolen.get(vault, headers={**JSON, "Cookie": f"{COOKIE}={handed}"})
        assert resp.status == 401 and (await resp.json())["reason"] == "session-revoked"


def values_of(record: Any) -> Iterator[str]:
    if isinstance(record, dict):
        for value in record.values():
            yield from values_of(value)
    elif isinstance(record, list):
        for value in record:
            yield from values_of(value)
    else:
        yield str(record)


async def audit_records(m: MfaEnv, kind: str) -> tuple[bytes, list[dict[str, Any]]]:
    """The audit log's bytes and records, once a record of `kind` is on disk."""
    directory = Path(yaml.safe_load(m.config.read_text())["audit"]["dir"])
    for _ in range(200):
        raw = b"".join(f.read_bytes() for f in sorted(directory.glob("*.jsonl")))
        records = [orjson.loads(line) for line in raw.splitlines()]
        if any(r.get("type") == kind for r in records):
            return raw, records
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {kind} record in the audit log")


async def test_no_code_secret_or_link_reaches_the_logs(mfa_env: MfaEnv) -> None:
    link = await mfa_env.enroll_link("alice@example.org")
    browser, page = await visit(mfa_env, link)
    secret = shown_secret(await page.text())
    first = code_at(secret, mfa_env.clock())
    done = await submit(browser, page, "/.gateway/mfa/enroll", first)
    codes = recovery_codes(await done.text())
    mfa_env.next_step()
    browser, page = await prompt(mfa_env)
    wrong = wrong_code(secret, mfa_env.clock())
    assert (await verify(mfa_env, browser, page, wrong)).status == 401
    assert (await verify(mfa_env, browser, page, "0a0a0-0a0a0")).status == 401
    right = code_at(secret, mfa_env.clock())
    assert await reaches_app(mfa_env, browser, await verify(mfa_env, browser, page, right))
    browser, page = await prompt(mfa_env)
    assert await reaches_app(mfa_env, browser, await verify(mfa_env, browser, page, codes[0]))
    token = URL(link).query["link"]
    long_secrets = [secret, token, cookie_of(mfa_env, browser), *codes, "0a0a0-0a0a0"]
    short_codes = {first, wrong, right}
    raw, records = await audit_records(mfa_env, "mfa.recovery_used")
    process_log = [e for e in mfa_env.env.events if str(e.get("event", "")).startswith("mfa.")]
    assert {"mfa.enrolled", "mfa.failed", "mfa.verified"} <= {r["type"] for r in records}
    for found in long_secrets:
        assert found.encode() not in raw and found not in repr(mfa_env.env.events), found
    for record in [*records, *process_log]:
        assert short_codes.isdisjoint(values_of(record)), record


# -- SPEC §12 headers --------------------------------------------------------------------------


def assert_page_headers(resp: aiohttp.ClientResponse) -> None:
    csp = resp.headers["Content-Security-Policy"]
    for part in ("frame-ancestors 'none'", "base-uri 'none'", "object-src 'none'"):
        assert part in csp, (resp.url, csp)
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert "no-store" in resp.headers["Cache-Control"], resp.url
    assert "Strict-Transport-Security" not in resp.headers  # plain http here


async def test_the_mfa_pages_carry_the_security_headers(mfa_env: MfaEnv) -> None:
    link = await mfa_env.enroll_link("alice@example.org")
    browser, enrollment = await visit(mfa_env, link)
    assert is_enrollment(await enrollment.text())
    secret = shown_secret(await enrollment.text())
    wrong = await submit(
        browser, enrollment, "/.gateway/mfa/enroll", wrong_code(secret, mfa_env.clock())
    )
    codes = await submit(browser, wrong, "/.gateway/mfa/enroll", code_at(secret, mfa_env.clock()))
    assert len(recovery_codes(await codes.text())) == RECOVERY_CODES
    mfa_env.next_step()
    browser, notice = await visit(mfa_env, mfa_env.base + "/secure/x")
    page = await onward(browser, notice)
    failed = await verify(mfa_env, browser, page, wrong_code(secret, mfa_env.clock()))
    _, refused = await visit(mfa_env, link)  # a used link: an error page
    for resp in (enrollment, wrong, codes, notice, page, failed, refused):
        assert_page_headers(resp)
    assert secret not in (await page.text())
