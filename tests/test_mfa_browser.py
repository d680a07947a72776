"""MFA in a real headless Chromium (SPEC §6): enrollment through an admin's link, then the
notice and the code prompt at the next login, as a person goes through them.

The browser is Debian's /usr/bin/chromium driven by Playwright, launched as tests/test_demo.py
does (its flags, its skip-or-fail rule when the binary is missing, its artifacts directory for
screenshots: mfa-<n>-<page>.png). Playwright's async API here, since the dev IdP, the upstream
and the gateway run in the test's own event loop. Real clock: the test computes codes with
pyotp at time.time() and the gateway accepts one step of drift, so a step boundary is harmless.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyotp
import pytest
import yaml

from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.mfa import STEP
from gateway.server import listen
from gateway.settings import load_settings
from tests.conftest import IN_CI, echo_app, header_values, start_server
from tests.test_admin import tokens_file
from tests.test_demo import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS
from tests.test_login import SECRET, free_port
from tests.test_mfa import mfa_config
from tests.test_mfa_stores import Browsers, enroll, enroll_link, wrong_code


@dataclass
class Live:
    """The dev IdP, an echo upstream, and a gateway whose /secure route requires MFA (test_mfa's
    config: enrollment by invitation), with its admin API; all on the real clock."""

    base: str  # public_url
    admin: str  # the admin API
    issuer: str  # the dev IdP
    browsers: Browsers = field(default_factory=Browsers)  # HTTP-level ones, for set-up


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    port, admin_port, idp_port = free_port(), free_port(), free_port()
    users = {"alice": DevUser("alice", "alice-pw", groups=("sre",))}
    client = DevClient(
        "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
    )
    # Under a path, as in `gateway demo`: a browser keeps cookies per host, not per port, and
    # the IdP's session cookie then stays on the IdP's path (never sent to the gateway).
    idp = DevIdP(users, [client], issuer=f"http://127.0.0.1:{idp_port}/idp")
    issuer = await idp.start(port=idp_port)
    upstream = await start_server(echo_app())
    settings = mfa_config(port, issuer, upstream.url, tmp_path, "invite")
    tokens = tokens_file(tmp_path / "admin-tokens")
    settings["admin"] = {"listen": f"127.0.0.1:{admin_port}", "tokens_file": str(tokens)}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    gateway = await listen(load_settings(path), shutdown_timeout=2)
    env = Live(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", issuer)
    yield env
    await env.browsers.close()
    await gateway.stop()
    await upstream.runner.cleanup()
    await idp.stop()


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    """Debian's headless Chromium; each test opens fresh contexts (empty cookie jars) in it."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is absent (Debian package chromium; .ci/run installs it)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield browser
        finally:
            await browser.close()


async def new_page(chromium: Any) -> Any:
    """A page in a fresh browser context: no cookies, neither the gateway's nor the IdP's."""
    context = await chromium.new_context(viewport={"width": 1100, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    return page


async def shot(page: Any, name: str) -> None:
    await page.screenshot(path=ARTIFACTS / name, full_page=True)


async def sign_in_at_idp(page: Any, env: Live, shot_name: str | None = None) -> None:
    """On the dev IdP's login page (devidp_login.html): sign in as alice."""
    assert page.url.startswith(env.issuer + "/authorize?"), page.url
    assert await page.title() == "Sign in · dev identity provider"
    if shot_name:
        await shot(page, shot_name)
    await page.fill("#username", "alice")
    await page.fill("#password", "alice-pw")
    await page.click("button[type=submit]")


async def reached_app(page: Any, response: Any, path: str) -> None:
    """The app page: the upstream's echo (JSON) of a request for `path`, with alice's identity
    and without the gateway's session cookie (nor the IdP's)."""
    assert response is not None and response.status == 200, page.url
    seen = await response.json()
    assert seen["raw_path"] == path
    assert header_values(seen, "X-Auth-Request-User") == ["alice@example.org"]
    cookies = " ".join(header_values(seen, "Cookie"))
    assert "gateway=" not in cookies and "devidp_session=" not in cookies, cookies


async def test_an_admin_link_enrolls_a_user_in_chromium(live: Live, chromium: Any) -> None:
    app = "/secure/welcome?from=link"
    link = await enroll_link(live.admin, "alice@example.org")
    page = await new_page(chromium)
    # The admin's link, with where to go afterwards (the link alone goes to "/").
    await page.goto(f"{link}&rd={quote(app, safe='')}")
    await sign_in_at_idp(page, live, shot_name="mfa-1-idp-login.png")

    await page.wait_for_url(re.compile(r".*/\.gateway/mfa/enroll\?link="))
    assert await page.title() == "Set up your authenticator"
    shown = await page.inner_text("#secret")
    assert re.fullmatch(r"([A-Z2-7]{4} ){7}[A-Z2-7]{4}", shown), shown  # base32, groups of 4
    assert await page.locator("svg").count() == 1  # the QR code
    await shot(page, "mfa-2-enroll.png")
    await page.fill("#code", pyotp.TOTP(shown.replace(" ", "")).at(time.time()))
    async with page.expect_navigation():
        await page.get_by_role("button", name="Confirm").click()

    assert await page.title() == "Your recovery codes"
    codes = await page.locator("#recovery-codes li").all_inner_texts()
    assert len(set(codes)) == 10 and all(re.fullmatch(r"[0-9a-f]{5}-[0-9a-f]{5}", c) for c in codes)
    await shot(page, "mfa-3-recovery-codes.png")
    async with page.expect_navigation(url=live.base + app) as landing:
        await page.get_by_role("link", name="I have saved them: continue").click()

    await reached_app(page, await landing.value, app)
    await shot(page, "mfa-4-app.png")


async def test_an_enrolled_user_signs_in_with_a_code_in_chromium(live: Live, chromium: Any) -> None:
    app = "/secure/report"
    link = await enroll_link(live.admin, "alice@example.org")
    secret = (await enroll(live.browsers.new(), link, "alice")).secret  # over HTTP; its code spent
    page = await new_page(chromium)
    await page.goto(live.base + app)
    await sign_in_at_idp(page, live)

    await page.wait_for_url(re.compile(r".*/\.gateway/callback\?"))
    assert await page.inner_text("h1") == "A new authenticator was enrolled"
    await shot(page, "mfa-5-notice.png")
    await page.get_by_role("link", name="Continue").click()

    await page.wait_for_url(re.compile(r".*/\.gateway/mfa\?rd="))
    assert await page.inner_text("h1") == "Enter your authenticator code"
    await shot(page, "mfa-6-prompt.png")
    await page.fill("#code", wrong_code(secret))
    async with page.expect_navigation():
        await page.get_by_role("button", name="Continue").click()
    assert "not right" in await page.get_by_role("alert").inner_text()
    await shot(page, "mfa-7-wrong-code.png")

    # Not the enrollment's step (spent): the next one, still within the drift accepted.
    await page.fill("#code", pyotp.TOTP(secret).at(time.time() + STEP))
    async with page.expect_navigation(url=live.base + app) as landing:
        await page.get_by_role("button", name="Continue").click()
    await reached_app(page, await landing.value, app)
    await shot(page, "mfa-8-app.png")
