"""`gateway demo` as a person runs it: a real process, then a login in a real headless Chromium.

The browser is Debian's /usr/bin/chromium driven by Playwright (its driver ships in the pip
package; no browser is ever downloaded). Without that binary the browser test is skipped,
except under CI, where `.ci/run` installs it and a missing browser is a failure.
Screenshots go to tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import html
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from yarl import URL

from gateway.demo import DEFAULT_CONFIG, demo_config
from gateway.settings import load_settings
from tests.conftest import IN_CI, REPO

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "tests" / "artifacts"
# From the machine notes: no sandbox as root, and no calls home (the network is closed).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    stderr: Path
    gateway: str = ""
    idp: str = ""
    whoami: str = ""
    state_dir: Path = Path()
    users: dict[str, str] = field(default_factory=dict)  # username -> password
    printed: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal it (unless it already exited); its exit status, its stdout closed."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            if self.reader is not None:
                self.reader.join(timeout=5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def _lines(stream: Any, into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def start_demo(tmp_path: Path, *args: str) -> Demo:
    """`python -m gateway demo ARGS` from another directory; its announcement parsed."""
    stderr = tmp_path / "demo-stderr.log"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=tmp_path,
        )
    demo = Demo(proc, stderr)
    lines: queue.Queue[str | None] = queue.Queue()
    demo.reader = threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True)
    demo.reader.start()
    deadline = time.monotonic() + 20
    while not any("Ctrl-C" in line for line in demo.printed):
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            demo.stop()
            raise AssertionError(f"no announcement in 20 s: {demo.printed}") from None
        if line is None:
            demo.stop()
            raise AssertionError(f"demo exited: {demo.printed} {stderr.read_text()}")
        demo.printed.append(line)
    _parse_announcement(demo)
    return demo


def _parse_announcement(demo: Demo) -> None:
    text = "".join(demo.printed)
    found = {
        name: re.search(rf"^  {name}:\s+(\S+)", text, re.MULTILINE)
        for name in ("gateway", "dev IdP", "whoami", "state")
    }
    assert all(found.values()), text
    demo.gateway = found["gateway"][1].rstrip("/")  # type: ignore[index]
    demo.idp = found["dev IdP"][1]  # type: ignore[index]
    demo.whoami = found["whoami"][1]  # type: ignore[index]
    demo.state_dir = Path(found["state"][1])  # type: ignore[index]
    users = text.split("demo users", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    demo.users = {row.split()[0]: row.split()[1] for row in users}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One demo for the tests that only use it (each browser signs in with a fresh profile)."""
    demo = start_demo(tmp_path_factory.mktemp("demo"), "--port", "0")
    yield demo
    assert demo.stop() == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


def header(seen: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


# -- the config it fills in ----------------------------------------------------------------------


def test_the_shipped_config_gets_the_running_addresses_and_fresh_secrets(tmp_path: Path) -> None:
    shipped = yaml.safe_load(DEFAULT_CONFIG.read_text())
    shipped["routes"].append(
        {"id": "other", "path": "/o", "upstream": "http://127.0.0.1:3000", "public": True}
    )
    filled = demo_config(
        shipped,
        gateway_url="http://127.0.0.1:1001",
        issuer="http://127.0.0.1:1002/idp",
        whoami_url="http://127.0.0.1:1003",
        client_secret="s3cret",
        state_dir=tmp_path,
    )
    assert filled["server"] == {"listen": "127.0.0.1:1001", "public_url": "http://127.0.0.1:1001"}
    assert filled["identity"]["issuer"] == "http://127.0.0.1:1002/idp"
    assert filled["identity"]["client_secret"] == "s3cret"
    assert filled["state"]["sessions"] == f"sqlite:///{tmp_path}/state.db"
    assert filled["state"]["keys"] != shipped["state"]["keys"]
    assert filled["sessions"]["cookie_name"] == "gateway"
    upstreams = {route["id"]: route["upstream"] for route in filled["routes"]}
    assert upstreams == {
        "public": "http://127.0.0.1:1003",
        "finance": "http://127.0.0.1:1003",
        "ops": "http://127.0.0.1:1003",
        "whoami": "http://127.0.0.1:1003",
        "other": "http://127.0.0.1:3000",  # not the whoami: left as written
    }
    assert shipped["server"]["listen"] == "127.0.0.1:8080"  # the shipped data is not changed
    path = tmp_path / "filled.yaml"
    path.write_text(yaml.safe_dump(filled))
    load_settings(path)  # and it is a valid config


# -- the process ---------------------------------------------------------------------------------


def test_it_announces_loopback_addresses_and_the_demo_users(demo: Demo) -> None:
    for url in (demo.gateway, demo.idp, demo.whoami):
        assert URL(url).host == "127.0.0.1", url
    assert len({URL(u).port for u in (demo.gateway, demo.idp, demo.whoami)}) == 3
    assert demo.users == {"alice": "alice-demo", "bob": "bob-demo", "carol": "carol-demo"}
    assert demo.state_dir.is_dir()


async def test_protected_page_redirects_to_the_login_and_public_page_answers(
    demo: Demo, client: aiohttp.ClientSession
) -> None:
    first = await client.get(demo.gateway + "/", headers=HTML, allow_redirects=False)
    assert first.status == 302
    assert first.headers["Location"].startswith(demo.gateway + "/.gateway/login?rd=")
    login = await client.get(first.headers["Location"], allow_redirects=False)
    assert login.status == 302
    assert login.headers["Location"].startswith(demo.idp + "/authorize?")

    public = await client.get(demo.gateway + "/public?x=1", headers=JSON)
    assert public.status == 200
    seen = orjson.loads(await public.read())
    assert seen["request_line"] == "GET /public?x=1 HTTP/1.1"
    assert header(seen, "X-Request-Id") == [public.headers["X-Request-Id"]]
    assert header(seen, "X-Forwarded-For") == ["127.0.0.1"]
    page = await client.get(demo.gateway + "/public", headers=HTML)
    assert "GET /public HTTP/1.1" in await page.text()


async def test_login_reaches_whoami_and_its_websocket(
    demo: Demo, client: aiohttp.ClientSession
) -> None:
    """The same login as the browser's, by hand: the IdP's form filled and posted."""
    page = await client.get(demo.gateway + "/deep/path?q=1", headers=HTML)
    assert page.url.origin() == URL(demo.idp).origin(), page.url
    text = await page.text()
    fields = {
        html.unescape(n): html.unescape(v)
        for n, v in re.findall(r'type="hidden" name="([^"]*)" value="([^"]*)"', text)
    }
    action = re.search(r'<form method="post" action="([^"]*)"', text)
    assert action is not None
    form = {**fields, "username": "bob", "password": demo.users["bob"]}
    landed = await client.post(page.url.join(URL(html.unescape(action[1]))), data=form)
    assert landed.status == 200, await landed.text()
    assert str(landed.url) == demo.gateway + "/deep/path?q=1"
    assert "GET /deep/path?q=1 HTTP/1.1" in await landed.text()

    seen = orjson.loads(await (await client.get(demo.gateway + "/", headers=JSON)).read())
    assert header(seen, "X-Request-Id")
    cookies = " ".join(header(seen, "Cookie"))
    assert "gateway=" not in cookies  # the gateway's session cookie never goes upstream
    assert "devidp_session=" not in cookies  # nor the IdP's (it lives under the issuer's path)

    async with client.ws_connect(demo.gateway.replace("http", "ws", 1) + "/ws") as ws:
        handshake = orjson.loads(await ws.receive_bytes(timeout=5))
        assert handshake["request_line"] == "GET /ws HTTP/1.1"
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "hello"


async def test_whoami_escapes_what_it_shows(demo: Demo, client: aiohttp.ClientSession) -> None:
    nasty = '<script>alert("x")</script>'
    resp = await client.get(demo.whoami + "/%3Cb%3E", headers={**HTML, "X-Nasty": nasty})
    text = await resp.text()
    assert nasty not in text and html.escape(nasty) in text
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_everything_cleanly(tmp_path: Path, sig: int) -> None:
    demo = start_demo(tmp_path, "--port", "0")
    assert demo.stop(sig) == 0
    assert not demo.state_dir.exists()
    for url in (demo.gateway, demo.idp, demo.whoami):
        with socket.socket() as sock:  # nothing listens there any more
            assert sock.connect_ex(("127.0.0.1", URL(url).port or 0)) != 0
    assert "Traceback" not in demo.stderr.read_text()


@pytest.mark.parametrize("taken", ["--port", "--idp-port", "--whoami-port"])
def test_a_taken_port_is_one_clear_line_and_exit_1(tmp_path: Path, taken: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"--port": str(free_port()), "--idp-port": "0", "--whoami-port": "0"}
        ports[taken] = str(port)
        args = [item for pair in ports.items() for item in pair]
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )
    assert done.returncode == 1, done
    errors = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert errors == [errors[0]] and f"127.0.0.1:{port}" in errors[0], done.stderr
    assert "address already in use" in errors[0] and taken in errors[0]
    assert done.stdout == ""  # nothing announced


# -- a real browser ------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A page in Debian's headless Chromium with a fresh, empty profile."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is absent (Debian package chromium; .ci/run installs it)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 900},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(10_000)
            yield page
        finally:
            context.close()


def sign_in(page: Any, demo: Demo, user: str, shot: str | None = None) -> None:
    """Open the gateway, meet the IdP's login page, sign in, land back on the gateway."""
    page.goto(demo.gateway + "/")
    assert page.url.startswith(demo.idp + "/authorize?"), page.url
    assert page.title() == "Sign in · dev identity provider"
    if shot:
        page.screenshot(path=ARTIFACTS / shot)
    page.fill("#username", user)
    page.fill("#password", demo.users[user])
    page.click("button[type=submit]")
    page.wait_for_url(demo.gateway + "/")


def test_login_in_a_real_headless_chromium(demo: Demo, browser: Any) -> None:
    page = browser
    sign_in(page, demo, "alice", shot="demo-1-idp-login.png")
    body = page.inner_text("body")
    assert "whoami" in page.title()
    assert "GET / HTTP/1.1" in body
    assert re.search(r"X-Request-I[dD]\s+[0-9a-f]+-[0-9a-f]+", body), body
    assert "X-Forwarded-For\t127.0.0.1" in body
    assert "devidp_session" not in body and "gateway=" not in body  # no session cookie upstream
    assert re.search(r"X-Auth-Request-User\s+alice@example.org", body, re.I), body
    assert re.search(r"X-Gateway-Assertion\s+eyJ", body, re.I), body
    page.screenshot(path=ARTIFACTS / "demo-2-whoami.png", full_page=True)

    page.click("a[href='/.gateway/sessions']")
    page.wait_for_url(demo.gateway + "/.gateway/sessions")
    assert "Signed in as alice@example.org" in page.inner_text("body")
    page.screenshot(path=ARTIFACTS / "demo-3-sessions.png", full_page=True)


def test_a_route_of_another_team_shows_the_403_page(demo: Demo, browser: Any) -> None:
    page = browser
    sign_in(page, demo, "alice")
    response = page.goto(demo.gateway + "/finance/reports")
    assert response is not None and response.status == 403
    body = page.inner_text("body")
    assert "no-allow-rule" in body and "alice@example.org" in body
    assert "finance" not in body.replace("/finance/reports", "")  # the rule's group: never shown
    page.screenshot(path=ARTIFACTS / "demo-4-denied.png", full_page=True)


def test_logout_in_a_real_headless_chromium(demo: Demo, browser: Any) -> None:
    page = browser
    sign_in(page, demo, "carol")
    page.goto(demo.gateway + "/.gateway/logout")
    with page.expect_navigation(timeout=3_000):
        page.click("button[type=submit]")  # ends the session here and at the IdP
    assert page.url.startswith(demo.idp + "/authorize?"), page.inner_text("body")  # password next
    assert page.title() == "Sign in · dev identity provider"


def test_ending_a_session_from_the_sessions_page(demo: Demo, browser: Any) -> None:
    page = browser
    sign_in(page, demo, "bob")
    page.goto(demo.gateway + "/.gateway/sessions")
    handle = page.inner_text("td.mono").split()[0]
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert "Your sessions" in page.title(), page.inner_text("body")
    assert handle not in page.inner_text("body")  # ended; the IdP signed bob in again
