"""The relying party against an OpenID provider the project did not write, over real HTTP.

tests/external_op/server.mjs runs panva's oidc-provider (OpenID Certified) under Node on
127.0.0.1; `npm ci` in tests/external_op installs it. A misreading of the specs shared by
gateway/oidc.py and the dev IdP passes test_oidc.py; it does not pass here.

The login is driven as a browser would: every redirect is read and followed by hand (the OP's
cookies kept in a jar), its login and consent forms are parsed and posted, and the flow ends at
the redirect to the relying party's redirect_uri, which is never contacted.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import select
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import jwt
import pytest
import pytest_asyncio
from aiohttp import web
from yarl import URL

from gateway.oidc import (
    ClientConfig,
    Pkce,
    Provider,
    RefreshDenied,
    TokenRejected,
    Tokens,
)
from tests.conftest import IN_CI, REPO, Server, start_server

OP_DIR = REPO / "tests" / "external_op"
REDIRECT = "http://127.0.0.1:9/.gateway/callback"  # never contacted: redirects are read
SIGNED_OUT = "http://127.0.0.1:9/signed-out"
# Characters RFC 6749 §2.3.1 wants form-urlencoded inside HTTP Basic before base64.
SECRET = "ext s3cret:/+%="
SCOPES = ("openid", "email", "profile", "groups", "offline_access")  # the gateway's defaults
USER = "ext-alice"
GROUPS = ["sre"]  # as server.mjs starts
STARTUP_TIMEOUT = 15.0
MAX_STEPS = 12  # redirects and forms a login may take before the test calls it a loop

# One OP process (Node takes about a second to load it) and one event loop serve the module;
# each test has its own browser, so its own session at the OP.
pytestmark = pytest.mark.asyncio(loop_scope="module")


# -- the provider process --------------------------------------------------------------------------


@dataclass
class ExternalOp:
    issuer: str
    process: subprocess.Popen[str]

    async def set_groups(self, groups: list[str]) -> None:
        """The OP's test-only route: the user's groups as later tokens and userinfo show them."""
        async with (
            aiohttp.ClientSession() as http,
            http.put(f"{self.issuer}/_test/accounts/{USER}/groups", json=groups) as resp,
        ):
            assert resp.status == 204


@dataclass
class Backchannel:
    """The relying party's back-channel logout endpoint: it keeps the logout tokens it is sent."""

    server: Server
    tokens: asyncio.Queue[str]

    @property
    def uri(self) -> str:
        return f"{self.server.url}/backchannel-logout"


def require_node() -> str:
    """The node executable; skips (fails in CI) when node or the OP's packages are missing."""
    node = shutil.which("node")
    if node is None:
        reason = "node is not installed (the external OpenID provider runs on Node)"
    elif not (OP_DIR / "node_modules" / "oidc-provider").is_dir():
        reason = "run npm ci in tests/external_op (the external OpenID provider is not installed)"
    else:
        return node
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the interop tests")
    pytest.skip(f"{reason}; with CI=true this fails")


def read_issuer(process: subprocess.Popen[str], log: Path) -> str:
    """The issuer from the OP's first stdout line, waiting at most STARTUP_TIMEOUT."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT)
    line = process.stdout.readline() if ready else ""
    if not line:
        process.kill()
        process.wait()
        raise AssertionError(f"the external OP did not start:\n{log.read_text()}")
    issuer = json.loads(line)["issuer"]
    assert isinstance(issuer, str)
    return issuer


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backchannel() -> AsyncIterator[Backchannel]:
    tokens: asyncio.Queue[str] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        form = await request.post()
        tokens.put_nowait(str(form["logout_token"]))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/backchannel-logout", receive)
    server = await start_server(app)
    yield Backchannel(server, tokens)
    await server.runner.cleanup()


@pytest.fixture(scope="module")
def op_process(
    backchannel: Backchannel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExternalOp]:
    node = require_node()
    log = tmp_path_factory.mktemp("external-op") / "stderr.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [
                node,
                str(OP_DIR / "server.mjs"),
                "--port=0",
                f"--redirect-uri={REDIRECT}",
                f"--post-logout-redirect-uri={SIGNED_OUT}",
                f"--backchannel-logout-uri={backchannel.uri}",
                f"--client-secret={SECRET}",
            ],
            cwd=OP_DIR,
            stdin=subprocess.PIPE,  # closed at the end: the OP stops with it if we die first
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        yield ExternalOp(read_issuer(process, log), process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


@pytest_asyncio.fixture(loop_scope="module")
async def external_op(op_process: ExternalOp) -> ExternalOp:
    """The module's OP, its user as every test starts from (a test may change the groups)."""
    await op_process.set_groups(GROUPS)
    return op_process


@pytest_asyncio.fixture(loop_scope="module")
async def provider(external_op: ExternalOp) -> AsyncIterator[Provider]:
    config = ClientConfig(external_op.issuer, "gateway", SECRET, "client_secret_basic", SCOPES)
    async with aiohttp.ClientSession() as http:
        rp = Provider(config, http)
        await rp.discover()
        yield rp


@pytest_asyncio.fixture(loop_scope="module")
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe=True: a jar that keeps cookies of an IP-address host (the OP is on 127.0.0.1)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


# -- a browser, by hand ----------------------------------------------------------------------------


class FirstForm(HTMLParser):
    """The first <form> of a page: its action and the values of its named inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form" and self.action is None:
            self.action = attributes.get("action", "")
            self._inside = True
        elif tag == "input" and self._inside and "name" in attributes:
            self.fields[attributes["name"]] = attributes.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False


async def browse(
    browser: aiohttp.ClientSession,
    url: URL,
    *,
    typed: Mapping[str, str] = {},
    clicked: Mapping[str, str] = {},
) -> URL:
    """Follow the OP's redirects and submit its forms until it sends the browser elsewhere.

    `typed` fills the form inputs of those names (the login form's user and password);
    `clicked` is the name and value of the submit button pressed on every form.
    """
    op_origin = url.origin()
    method, data = "GET", None
    for _ in range(MAX_STEPS):
        async with browser.request(method, url, data=data, allow_redirects=False) as resp:
            if resp.status in (301, 302, 303, 307, 308):
                url = url.join(URL(resp.headers["Location"]))
                if url.origin() != op_origin:
                    return url
                method, data = "GET", None
                continue
            page = await resp.text()
            assert resp.status == 200, f"{method} {url}: {resp.status}\n{page}"
        form = FirstForm()
        form.feed(page)
        assert form.action is not None, f"neither a redirect nor a form at {url}:\n{page}"
        typed_here = {name: value for name, value in typed.items() if name in form.fields}
        url = url.join(URL(form.action))
        method, data = "POST", {**form.fields, **typed_here, **clicked}
    raise AssertionError(f"no way out of the OP after {MAX_STEPS} steps, last at {url}")


@dataclass
class Login:
    tokens: Tokens
    id_token: str
    nonce: str


async def authorize(
    provider: Provider, browser: aiohttp.ClientSession, nonce: str, max_age: int | None = None
) -> tuple[URL, str, Pkce]:
    """Log the user in at the OP; the redirect back to us, the state sent and the PKCE pair."""
    pkce, state = Pkce.new(), secrets.token_urlsafe(16)
    # prompt=consent: OIDC Core §11; without it this OP drops offline_access: no refresh token.
    start = provider.authorization_url(
        redirect_uri=REDIRECT,
        state=state,
        nonce=nonce,
        pkce=pkce,
        prompt="consent",
        max_age=max_age,
    )
    back = await browse(browser, URL(start), typed={"login": USER, "password": "not-checked"})
    assert str(back.with_query(None)) == REDIRECT
    return back, state, pkce


async def login(
    provider: Provider, browser: aiohttp.ClientSession, nonce: str | None = None
) -> Login:
    """A login through to the code exchange (the ID token is not validated here)."""
    nonce = nonce or secrets.token_urlsafe(16)
    back, state, pkce = await authorize(provider, browser, nonce)
    assert back.query["state"] == state
    tokens = await provider.exchange_code(back.query["code"], redirect_uri=REDIRECT, pkce=pkce)
    assert tokens.id_token is not None
    return Login(tokens, tokens.id_token, nonce)


# -- the tests -------------------------------------------------------------------------------------


async def test_discovery_names_the_endpoints(provider: Provider, external_op: ExternalOp) -> None:
    metadata = provider.metadata
    assert metadata.issuer == external_op.issuer
    for endpoint in (
        metadata.authorization_endpoint,
        metadata.token_endpoint,
        metadata.jwks_uri,
        metadata.userinfo_endpoint,
        metadata.end_session_endpoint,
    ):
        assert endpoint is not None and endpoint.startswith(external_op.issuer + "/")


async def test_full_login_yields_the_users_identity(
    provider: Provider, browser: aiohttp.ClientSession, external_op: ExternalOp
) -> None:
    nonce = secrets.token_urlsafe(16)
    back, state, pkce = await authorize(provider, browser, nonce, max_age=300)
    assert back.query["state"] == state
    # RFC 9207: this OP names itself in the authorization response (a mix-up defence).
    assert back.query["iss"] == external_op.issuer
    tokens = await provider.exchange_code(back.query["code"], redirect_uri=REDIRECT, pkce=pkce)
    assert tokens.id_token and tokens.access_token and tokens.refresh_token

    # max_age was asked: the ID token must carry auth_time, and it is checked.
    claims = await provider.validate_id_token(tokens.id_token, nonce=nonce, max_age=300)
    assert claims["sub"] == USER
    assert claims["aud"] == "gateway"
    assert isinstance(claims.get("sid"), str)  # back-channel logout names sessions by it

    info = await provider.userinfo(tokens.access_token, expected_sub=claims["sub"])
    assert info["sub"] == USER
    assert info["email"] == "alice@external.example"
    assert info["email_verified"] is True
    assert info["groups"] == GROUPS
    # OIDC Core §5.4: with an access token issued, the claims of the email, profile and groups
    # scopes come from userinfo, not from the ID token. The login must merge userinfo in.
    assert "email" not in claims and "groups" not in claims


async def test_refresh_returns_new_tokens_and_a_spent_one_is_denied(
    provider: Provider, browser: aiohttp.ClientSession, external_op: ExternalOp
) -> None:
    first = await login(provider, browser)
    assert first.tokens.refresh_token
    await external_op.set_groups(["sre", "admins"])

    renewed = await provider.refresh(first.tokens.refresh_token)
    assert renewed.id_token and renewed.access_token and renewed.refresh_token
    assert renewed.refresh_token != first.tokens.refresh_token  # this OP rotates them
    # OIDC Core §12.2: same iss, sub and aud. (This OP repeats the login's nonce in a refreshed
    # ID token, the dev IdP leaves it out: the refresh check must not depend on either.)
    original = await provider.validate_id_token(first.id_token, nonce=first.nonce)
    claims = await provider.validate_refreshed_id_token(renewed.id_token, sub=original["sub"])
    assert (claims["iss"], claims["aud"]) == (original["iss"], original["aud"])
    info = await provider.userinfo(renewed.access_token, expected_sub=claims["sub"])
    assert info["groups"] == ["sre", "admins"]

    with pytest.raises(RefreshDenied) as err:
        await provider.refresh(first.tokens.refresh_token)
    assert err.value.reason == "invalid-grant"
    # Reuse of a rotated token revokes the whole grant at this OP: the new token is dead too.
    # (Two replicas refreshing one session at once would end it: refresh must be single-flight.)
    with pytest.raises(RefreshDenied):
        await provider.refresh(renewed.refresh_token)


async def test_a_wrong_nonce_is_refused(provider: Provider, browser: aiohttp.ClientSession) -> None:
    done = await login(provider, browser, nonce="the-login-this-browser-started")
    with pytest.raises(TokenRejected) as err:
        await provider.validate_id_token(done.id_token, nonce="another-login")
    assert err.value.reason == "bad-nonce"


async def test_a_wrong_pkce_verifier_is_an_op_error(
    provider: Provider, browser: aiohttp.ClientSession
) -> None:
    back, _, _ = await authorize(provider, browser, nonce="n-1")
    with pytest.raises(TokenRejected) as err:
        await provider.exchange_code(back.query["code"], redirect_uri=REDIRECT, pkce=Pkce.new())
    assert (err.value.reason, err.value.detail) == ("op-error", "invalid_grant")


async def test_back_channel_logout_token_is_accepted(
    provider: Provider, browser: aiohttp.ClientSession, backchannel: Backchannel
) -> None:
    done = await login(provider, browser)
    claims = await provider.validate_id_token(done.id_token, nonce=done.nonce)

    # RP-initiated logout (SPEC §5): the browser goes to end_session with id_token_hint.
    assert provider.metadata.end_session_endpoint
    end_session = URL(provider.metadata.end_session_endpoint).update_query(
        id_token_hint=done.id_token, post_logout_redirect_uri=SIGNED_OUT, state="bye"
    )
    back = await browse(browser, end_session, clicked={"logout": "yes"})
    assert str(back.with_query(None)) == SIGNED_OUT
    assert back.query["state"] == "bye"

    raw = await asyncio.wait_for(backchannel.tokens.get(), timeout=5)
    assert jwt.get_unverified_header(raw)["typ"] == "logout+jwt"
    logout = await provider.validate_logout_token(raw)
    assert (logout.sub, logout.sid) == (USER, claims["sid"])
