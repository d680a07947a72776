"""The dev identity provider over real HTTP on 127.0.0.1, the flow followed by hand."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.configfile import ConfigError
from gateway.devidp import DevClient, DevIdP, TokenOverride, load_users
from tests.conftest import REPO, Server, start_server

CALLBACK = "http://127.0.0.1:9/callback"  # never contacted: redirects are read, not followed
SIGNED_OUT = "http://127.0.0.1:9/signed-out"
EVENT = "http://schemas.openid.net/event/backchannel-logout"


# -- fixtures ------------------------------------------------------------------------------------


@dataclass
class Clock:
    """Real time plus an offset the test moves (PyJWT checks exp against real time)."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Receiver:
    """A relying party's back-channel logout endpoint that records what it was sent."""

    server: Server
    received: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.server.url}/backchannel"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    received: list[tuple[str, dict[str, str]]] = []

    async def backchannel(request: web.Request) -> web.Response:
        form = await request.post()
        received.append((request.content_type, {k: str(v) for k, v in form.items()}))
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/backchannel", backchannel)
    server = await start_server(app)
    yield Receiver(server, received)
    await server.runner.cleanup()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def idp(receiver: Receiver, clock: Clock) -> AsyncIterator[DevIdP]:
    clients = [
        DevClient(
            "gw",
            "gw-secret",
            (CALLBACK,),
            post_logout_redirect_uris=(SIGNED_OUT,),
            backchannel_logout_uri=receiver.url,
        ),
        DevClient("poster", "poster-secret", (CALLBACK,), token_auth="client_secret_post"),
    ]
    provider = DevIdP(load_users(REPO / "config" / "devidp-users.yaml"), clients, clock=clock)
    await provider.start()
    yield provider
    await provider.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe=True: keep cookies of an IP-address host (the browser's devidp session).
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        yield session


# -- following the flow by hand ------------------------------------------------------------------


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class _Form(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.hidden: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.action = a["action"] or ""
        if tag == "input" and a.get("type") == "hidden":
            self.hidden[a["name"] or ""] = a["value"] or ""


def parse_form(html: str) -> _Form:
    form = _Form()
    form.feed(html)
    return form


@dataclass
class Flow:
    verifier: str
    challenge: str
    state: str = field(default_factory=lambda: secrets.token_urlsafe(8))
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(8))
    client_id: str = "gw"

    def query(self, **extra: str) -> dict[str, str]:
        return {
            "client_id": self.client_id,
            "redirect_uri": CALLBACK,
            "response_type": "code",
            "scope": "openid email profile groups",
            "state": self.state,
            "nonce": self.nonce,
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
            **extra,
        }


def basic(client_id: str, secret: str) -> str:
    """client_secret_basic: each half form-urlencoded, then base64 (RFC 6749 §2.3.1)."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def new_flow(client_id: str = "gw") -> Flow:
    return Flow(*pkce(), client_id=client_id)


def location_params(response: aiohttp.ClientResponse) -> dict[str, str]:
    location = response.headers["Location"]
    assert location.startswith(CALLBACK + "?") or location.startswith(SIGNED_OUT)
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def authorize(
    http: aiohttp.ClientSession, idp: DevIdP, flow: Flow, **extra: str
) -> aiohttp.ClientResponse:
    async with http.get(
        f"{idp.issuer}/authorize", params=flow.query(**extra), allow_redirects=False
    ) as response:
        await response.read()
        return response


async def sign_in(
    http: aiohttp.ClientSession,
    idp: DevIdP,
    flow: Flow,
    username: str = "alice",
    password: str = "alice-demo",
    **extra: str,
) -> aiohttp.ClientResponse:
    """GET /authorize; at the form, POST it back with its hidden fields, as a browser would."""
    async with http.get(
        f"{idp.issuer}/authorize", params=flow.query(**extra), allow_redirects=False
    ) as page:
        if page.status != 200:
            return page  # a signed-in browser goes straight back to the client
        form = parse_form(await page.text())
    data = {**form.hidden, "username": username, "password": password}
    action = f"{idp.issuer}{form.action}"
    async with http.post(action, data=data, allow_redirects=False) as response:
        await response.read()
        return response


async def code_for(http: aiohttp.ClientSession, idp: DevIdP, flow: Flow, **kw: str) -> str:
    response = await sign_in(http, idp, flow, **kw)
    assert response.status == 302
    params = location_params(response)
    assert params["state"] == flow.state
    assert params["iss"] == idp.issuer
    return params["code"]


async def token_request(
    http: aiohttp.ClientSession,
    idp: DevIdP,
    data: dict[str, str],
    auth: tuple[str, str] | None = ("gw", "gw-secret"),
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": basic(*auth)} if auth else {}
    async with http.post(f"{idp.issuer}/token", data=data, headers=headers) as response:
        return response.status, await response.json()


async def exchange(
    http: aiohttp.ClientSession, idp: DevIdP, code: str, flow: Flow, **kw: Any
) -> tuple[int, dict[str, Any]]:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": CALLBACK,
        "code_verifier": flow.verifier,
    }
    return await token_request(http, idp, data, **kw)


async def login(
    http: aiohttp.ClientSession, idp: DevIdP, username: str = "alice"
) -> tuple[Flow, dict[str, Any]]:
    flow = new_flow()
    code = await code_for(http, idp, flow, username=username, password=f"{username}-demo")
    status, tokens = await exchange(http, idp, code, flow)
    assert status == 200, tokens
    return flow, tokens


async def verify(http: aiohttp.ClientSession, idp: DevIdP, token: str, **kw: Any) -> dict[str, Any]:
    """Verify a token with the provider's JWKS, as a relying party would."""
    async with http.get(f"{idp.issuer}/jwks") as response:
        jwks = jwt.PyJWKSet.from_dict(await response.json())
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    options = {"audience": "gw", "issuer": idp.issuer, **kw}
    claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=["RS256"], **options)
    return claims


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.get_unverified_header(token), claims


# -- discovery and keys --------------------------------------------------------------------------


async def test_discovery_document(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    assert idp.issuer.startswith("http://127.0.0.1:")
    async with http.get(f"{idp.issuer}/.well-known/openid-configuration") as response:
        doc = await response.json()
    assert doc["issuer"] == idp.issuer
    for name in ("authorization", "token", "userinfo", "end_session"):
        assert (
            doc[f"{name}_endpoint"] == f"{idp.issuer}/{name.replace('authorization', 'authorize')}"
        )
    assert doc["jwks_uri"] == f"{idp.issuer}/jwks"
    assert doc["response_types_supported"] == ["code"]
    assert doc["subject_types_supported"] == ["public"]
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert set(doc["token_endpoint_auth_methods_supported"]) == {
        "client_secret_basic",
        "client_secret_post",
    }
    assert doc["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert "openid" in doc["scopes_supported"]
    assert {"groups", "amr", "sid", "email"} <= set(doc["claims_supported"])
    assert doc["backchannel_logout_supported"] is True
    assert doc["backchannel_logout_session_supported"] is True


async def test_jwks_publishes_rsa_signing_keys(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{idp.issuer}/jwks") as response:
        (key,) = (await response.json())["keys"]
    assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
    assert key["kid"] == idp.current_kid
    assert "d" not in key  # public half only
    assert len(base64.urlsafe_b64decode(key["n"] + "==")) == 256  # 2048 bits


async def test_key_rotation_keeps_previous_key_until_dropped(
    idp: DevIdP, http: aiohttp.ClientSession
) -> None:
    _, before = await login(http, idp)
    old_kid = idp.current_kid
    idp.rotate_keys()
    _, after = await login(http, idp)
    assert unverified(after["id_token"])[0]["kid"] == idp.current_kid != old_kid
    await verify(http, idp, before["id_token"])  # the old key is still published
    await verify(http, idp, after["id_token"])
    idp.drop_previous_keys()
    async with http.get(f"{idp.issuer}/jwks") as response:
        kids = [k["kid"] for k in (await response.json())["keys"]]
    assert kids == [idp.current_kid]


# -- the code flow -------------------------------------------------------------------------------


async def test_code_flow_issues_an_id_token_with_every_claim(
    idp: DevIdP, http: aiohttp.ClientSession
) -> None:
    flow, tokens = await login(http, idp)
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 300
    assert tokens["access_token"] and tokens["refresh_token"]
    header, _ = unverified(tokens["id_token"])
    assert header == {"alg": "RS256", "kid": idp.current_kid, "typ": "JWT"}
    claims = await verify(http, idp, tokens["id_token"])
    alice = load_users(REPO / "config" / "devidp-users.yaml")["alice"]
    assert claims["iss"] == idp.issuer
    assert claims["sub"] == alice.sub
    assert claims["aud"] == "gw" and claims["azp"] == "gw"
    assert claims["exp"] - claims["iat"] == 300
    assert abs(claims["iat"] - time.time()) < 5
    assert claims["auth_time"] <= claims["iat"]
    assert claims["nonce"] == flow.nonce
    assert claims["sid"]
    assert claims["email"] == "alice@example.org" and claims["email_verified"] is True
    assert claims["name"] == "Alice Example"
    assert claims["groups"] == ["engineering", "sre"]
    assert claims["amr"] == ["pwd"]


async def test_demo_users(tmp_path: Path) -> None:
    users = load_users(REPO / "config" / "devidp-users.yaml")
    assert users["alice"].groups == ("engineering", "sre")
    assert users["bob"].groups == ("finance",)
    assert users["bob"].amr == ("pwd",)
    assert users["carol"].amr == ("pwd", "otp")
    assert "alice-demo" not in repr(users["alice"])  # the password is kept out of reprs


async def test_carol_signs_in_with_mfa_amr(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    _, tokens = await login(http, idp, "carol")
    assert (await verify(http, idp, tokens["id_token"]))["amr"] == ["pwd", "otp"]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("users:\n  - username: a\n    password: x\n    role: admin\n", 4, "role"),
        ("users:\n  - username: a\n    groups: [x]\n", 2, "password"),
        (
            "users:\n  - username: a\n    password: x\n  - username: a\n    password: y\n",
            4,
            "listed twice",
        ),
    ],
)
def test_load_users_reports_problems_with_their_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_users(path)
    (issue,) = caught.value.issues
    assert issue.line == line
    assert words in issue.message


async def test_wrong_code_verifier_is_refused(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    flow = new_flow()
    code = await code_for(http, idp, flow)
    flow.verifier = pkce()[0]
    status, body = await exchange(http, idp, code, flow)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_code_used_twice_is_refused_and_revokes_its_tokens(
    idp: DevIdP, http: aiohttp.ClientSession
) -> None:
    flow = new_flow()
    code = await code_for(http, idp, flow)
    status, tokens = await exchange(http, idp, code, flow)
    assert status == 200
    status, body = await exchange(http, idp, code, flow)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await refresh(http, idp, tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_expired_code_is_refused(
    idp: DevIdP, http: aiohttp.ClientSession, clock: Clock
) -> None:
    flow = new_flow()
    code = await code_for(http, idp, flow)
    clock.offset += 61
    status, body = await exchange(http, idp, code, flow)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_wrong_client_secret_is_refused(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    flow = new_flow()
    code = await code_for(http, idp, flow)
    async with http.post(
        f"{idp.issuer}/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK},
        headers={"Authorization": basic("gw", "not-the-secret")},
    ) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert (await response.json())["error"] == "invalid_client"


async def test_client_authenticates_only_by_its_registered_method(
    idp: DevIdP, http: aiohttp.ClientSession
) -> None:
    flow = new_flow("poster")
    code = await code_for(http, idp, flow)
    status, body = await exchange(http, idp, code, flow, auth=("poster", "poster-secret"))
    assert (status, body["error"]) == (401, "invalid_client")  # basic, but registered for post
    flow = new_flow("poster")
    code = await code_for(http, idp, flow)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": CALLBACK,
        "code_verifier": flow.verifier,
        "client_id": "poster",
        "client_secret": "poster-secret",
    }
    status, tokens = await token_request(http, idp, data, auth=None)
    assert status == 200
    assert unverified(tokens["id_token"])[1]["aud"] == "poster"


async def test_code_of_another_client_is_refused(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    flow = new_flow("poster")
    code = await code_for(http, idp, flow)
    status, body = await exchange(http, idp, code, flow)  # authenticated as gw
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_redirect_uri_mismatch_at_token_is_refused(
    idp: DevIdP, http: aiohttp.ClientSession
) -> None:
    flow = new_flow()
    code = await code_for(http, idp, flow)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": CALLBACK + "x",
        "code_verifier": flow.verifier,
    }
    status, body = await token_request(http, idp, data)
    assert (status, body["error"]) == (400, "invalid_grant")


@pytest.mark.parametrize(
    "change",
    [{"redirect_uri": CALLBACK + "/../evil"}, {"redirect_uri": ""}, {"client_id": "nobody"}],
)
async def test_unredirectable_errors_are_a_400_page(
    idp: DevIdP, http: aiohttp.ClientSession, change: dict[str, str]
) -> None:
    response = await authorize(http, idp, new_flow(), **change)
    assert response.status == 400
    assert "Location" not in response.headers
    assert response.content_type == "text/html"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "email profile"}, "invalid_scope"),
        ({"code_challenge": ""}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": ""}, "invalid_request"),
        ({"prompt": "none login"}, "invalid_request"),
        ({"max_age": "-1"}, "invalid_request"),
        ({"prompt": "none"}, "login_required"),
    ],
)
async def test_other_errors_go_back_to_the_client(
    idp: DevIdP, http: aiohttp.ClientSession, change: dict[str, str], error: str
) -> None:
    flow = new_flow()
    response = await authorize(http, idp, flow, **change)
    assert response.status == 302
    params = location_params(response)
    assert params["error"] == error
    assert params["state"] == flow.state
    assert params["iss"] == idp.issuer
    assert "code" not in params


async def test_repeated_parameter_is_refused(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    flow = new_flow()
    query = [*flow.query().items(), ("nonce", "second")]
    async with http.get(f"{idp.issuer}/authorize", params=query, allow_redirects=False) as r:
        assert r.status == 302
        assert location_params(r)["error"] == "invalid_request"


async def test_wrong_password_shows_the_form_again(
    idp: DevIdP, http: aiohttp.ClientSession
) -> None:
    response = await sign_in(http, idp, new_flow(), password="wrong")
    assert response.status == 200
    assert "Wrong username or password" in await response.text()
    assert "devidp_session" not in response.cookies
    response = await sign_in(http, idp, new_flow(), username="mallory", password="x")
    assert "Wrong username or password" in await response.text()


async def test_login_page_escapes_request_parameters(
    idp: DevIdP, http: aiohttp.ClientSession
) -> None:
    flow = new_flow()
    flow.state = '"><script>alert(1)</script>'
    response = await authorize(http, idp, flow)
    html = await response.text()
    assert "<script>" not in html
    assert parse_form(html).hidden["state"] == flow.state
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


# -- the browser's session: prompt and max_age ---------------------------------------------------


async def test_signed_in_browser_skips_the_form(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    await login(http, idp)
    response = await authorize(http, idp, new_flow())
    assert response.status == 302
    assert "code" in location_params(response)


async def test_prompt_login_forces_the_form(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    _, first = await login(http, idp)
    response = await authorize(http, idp, new_flow(), prompt="login")
    assert response.status == 200
    assert parse_form(await response.text()).hidden["prompt"] == "login"
    flow = new_flow()
    code = await code_for(http, idp, flow, prompt="login")
    _, second = await exchange(http, idp, code, flow)
    assert unverified(second["id_token"])[1]["sid"] != unverified(first["id_token"])[1]["sid"]


async def test_max_age_forces_the_form_once_exceeded(
    idp: DevIdP, http: aiohttp.ClientSession, clock: Clock
) -> None:
    await login(http, idp)
    assert (await authorize(http, idp, new_flow(), max_age="60")).status == 302
    clock.offset += 61
    assert (await authorize(http, idp, new_flow(), max_age="60")).status == 200
    assert (await authorize(http, idp, new_flow())).status == 302


async def test_prompt_none_with_a_session_issues_a_code(
    idp: DevIdP, http: aiohttp.ClientSession
) -> None:
    await login(http, idp)
    response = await authorize(http, idp, new_flow(), prompt="none")
    assert "code" in location_params(response)


# -- refresh and userinfo ------------------------------------------------------------------------


async def refresh(
    http: aiohttp.ClientSession, idp: DevIdP, token: str
) -> tuple[int, dict[str, Any]]:
    return await token_request(http, idp, {"grant_type": "refresh_token", "refresh_token": token})


async def test_refresh_renews_groups_and_rotates_the_token(
    idp: DevIdP, http: aiohttp.ClientSession
) -> None:
    _, tokens = await login(http, idp)
    first = await verify(http, idp, tokens["id_token"])
    idp.set_groups("alice", ["engineering", "sre", "oncall"])
    status, renewed = await refresh(http, idp, tokens["refresh_token"])
    assert status == 200
    claims = await verify(http, idp, renewed["id_token"])
    assert claims["groups"] == ["engineering", "sre", "oncall"]
    assert (claims["sub"], claims["sid"], claims["auth_time"]) == (
        first["sub"],
        first["sid"],
        first["auth_time"],
    )
    assert "nonce" not in claims
    assert renewed["refresh_token"] != tokens["refresh_token"]
    status, body = await refresh(http, idp, tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await refresh(http, idp, renewed["refresh_token"]))[0] == 200


async def test_refresh_shows_a_changed_sub(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    _, tokens = await login(http, idp)
    idp.set_sub("alice", "someone-else")
    _, renewed = await refresh(http, idp, tokens["refresh_token"])
    assert (await verify(http, idp, renewed["id_token"]))["sub"] == "someone-else"


async def test_revoked_refresh_tokens_are_refused(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    _, tokens = await login(http, idp)
    idp.revoke_refresh_tokens("alice")
    status, body = await refresh(http, idp, tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await refresh(http, idp, "never-issued")
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_token_endpoint_errors(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    status, body = await token_request(http, idp, {"grant_type": "password"})
    assert (status, body["error"]) == (400, "unsupported_grant_type")
    status, body = await token_request(http, idp, {})
    assert (status, body["error"]) == (400, "invalid_request")
    idp.token_error = {"error": "invalid_grant", "error_description": "told to"}
    status, body = await token_request(http, idp, {"grant_type": "refresh_token"})
    assert (status, body) == (400, {"error": "invalid_grant", "error_description": "told to"})


async def test_userinfo(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    _, tokens = await login(http, idp)
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    async with http.get(f"{idp.issuer}/userinfo", headers=bearer) as response:
        info = await response.json()
    assert info == {
        "sub": unverified(tokens["id_token"])[1]["sub"],
        "email": "alice@example.org",
        "email_verified": True,
        "name": "Alice Example",
        "groups": ["engineering", "sre"],
    }
    idp.userinfo_hook = lambda claims: {**claims, "sub": "another"}
    async with http.get(f"{idp.issuer}/userinfo", headers=bearer) as response:
        assert (await response.json())["sub"] == "another"
    async with http.get(f"{idp.issuer}/userinfo", headers={"Authorization": "Bearer x"}) as r:
        assert r.status == 401
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


# -- logout --------------------------------------------------------------------------------------


async def test_end_session_redirects_and_sends_a_backchannel_logout_token(
    idp: DevIdP, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    _, tokens = await login(http, idp)
    id_claims = unverified(tokens["id_token"])[1]
    params = {
        "id_token_hint": tokens["id_token"],
        "post_logout_redirect_uri": SIGNED_OUT,
        "state": "s1",
    }
    async with http.get(f"{idp.issuer}/end_session", params=params, allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == f"{SIGNED_OUT}?state=s1"
    ((content_type, form),) = receiver.received
    assert content_type == "application/x-www-form-urlencoded"
    header, _ = unverified(form["logout_token"])
    assert header["typ"] == "logout+jwt" and header["alg"] == "RS256"
    claims = await verify(http, idp, form["logout_token"])
    assert claims["events"] == {EVENT: {}}
    assert (claims["sid"], claims["sub"]) == (id_claims["sid"], id_claims["sub"])
    assert claims["exp"] - claims["iat"] == 120
    assert claims["jti"] and "nonce" not in claims
    assert idp.logout_deliveries[0].status == 200
    # The session is over here too: the form again, and its refresh token is dead.
    assert (await authorize(http, idp, new_flow())).status == 200
    assert (await refresh(http, idp, tokens["refresh_token"]))[1]["error"] == "invalid_grant"


async def test_end_session_refuses_unregistered_post_logout_redirect_uri(
    idp: DevIdP, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    _, tokens = await login(http, idp)
    for params in (
        {"post_logout_redirect_uri": "https://evil.example/"},
        {"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": CALLBACK},
        {"id_token_hint": tokens["id_token"] + "x"},
        {"id_token_hint": tokens["id_token"], "client_id": "poster"},
    ):
        async with http.get(f"{idp.issuer}/end_session", params=params) as r:
            assert r.status == 400, params
    assert receiver.received == []  # nothing was ended


async def test_end_session_without_redirect_shows_a_page(
    idp: DevIdP, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    await login(http, idp)
    async with http.get(f"{idp.issuer}/end_session", allow_redirects=False) as r:
        assert r.status == 200
        assert "signed out" in await r.text()
    assert len(receiver.received) == 1


async def test_programmatic_backchannel_logout(
    idp: DevIdP, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    _, tokens = await login(http, idp)
    deliveries = await idp.backchannel_logout("alice")
    assert [(d.client_id, d.status) for d in deliveries] == [("gw", 200)]
    claims = await verify(http, idp, receiver.received[0][1]["logout_token"])
    assert claims["sid"] == unverified(tokens["id_token"])[1]["sid"]
    # Without a session, the client still hears of the user (sub alone).
    await idp.backchannel_logout("alice")
    claims = await verify(http, idp, receiver.received[1][1]["logout_token"])
    assert "sid" not in claims and claims["sub"] == unverified(tokens["id_token"])[1]["sub"]


async def test_logout_token_hook(
    idp: DevIdP, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    idp.logout_token_hook = lambda h, c: TokenOverride(remove_claims=("events",), signing="none")
    await idp.backchannel_logout("bob")
    header, claims = unverified(receiver.received[0][1]["logout_token"])
    assert header["alg"] == "none" and "events" not in claims


# -- mischief ------------------------------------------------------------------------------------


async def mischief(
    idp: DevIdP, http: aiohttp.ClientSession, override: TokenOverride
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def hook(header: dict[str, Any], claims: dict[str, Any]) -> TokenOverride:
        seen.append(dict(claims))
        return override

    idp.id_token_hook = hook
    _, tokens = await login(http, idp)
    assert seen and seen[0]["iss"] == idp.issuer  # the hook saw the honest claims
    return tokens["id_token"], *unverified(tokens["id_token"])


async def test_mischief_none(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    token, header, _ = await mischief(idp, http, TokenOverride(signing="none"))
    assert header["alg"] == "none"
    assert token.endswith(".")
    with pytest.raises(jwt.InvalidTokenError):
        await verify(http, idp, token)


async def test_mischief_hs256_with_public_key(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    override = TokenOverride(signing="hs256-with-public-key")
    token, header, _ = await mischief(idp, http, override)
    assert header["alg"] == "HS256" and header["kid"] == idp.current_kid
    async with http.get(f"{idp.issuer}/jwks") as response:
        jwk = jwt.PyJWK((await response.json())["keys"][0])
    pem = jwk.key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "==") == expected


async def test_mischief_other_key(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    token, header, _ = await mischief(idp, http, TokenOverride(signing="other-key"))
    assert header["alg"] == "RS256" and header["kid"] != idp.current_kid
    with pytest.raises(KeyError):
        await verify(http, idp, token)  # its kid is not in the JWKS
    same_kid = TokenOverride(signing="other-key", header={"kid": idp.current_kid})
    token, header, _ = await mischief(idp, http, same_kid)
    with pytest.raises(jwt.InvalidSignatureError):
        await verify(http, idp, token)


async def test_mischief_bad_signature(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    token, header, claims = await mischief(idp, http, TokenOverride(signing="bad-signature"))
    assert header["kid"] == idp.current_kid and claims["aud"] == "gw"
    with pytest.raises(jwt.InvalidSignatureError):
        await verify(http, idp, token)


async def test_mischief_headers(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    jwk = {"kty": "RSA", "n": "AQAB", "e": "AQAB"}
    override = TokenOverride(
        header={"jku": "http://127.0.0.1:9/jwks", "jwk": jwk, "typ": "at+jwt"},
        remove_header=("kid",),
    )
    _, header, _ = await mischief(idp, http, override)
    assert header == {"alg": "RS256", "typ": "at+jwt", "jku": "http://127.0.0.1:9/jwks", "jwk": jwk}


@pytest.mark.parametrize(
    ("override", "check"),
    [
        (
            TokenOverride(claims={"iss": "http://evil.test"}),
            lambda c: c["iss"] == "http://evil.test",
        ),
        (TokenOverride(claims={"aud": ["gw", "other"]}), lambda c: c["aud"] == ["gw", "other"]),
        (TokenOverride(remove_claims=("aud",)), lambda c: "aud" not in c),
        (TokenOverride(claims={"azp": "other"}), lambda c: c["azp"] == "other"),
        (TokenOverride(claims={"exp": 1000}), lambda c: c["exp"] == 1000),
        (TokenOverride(remove_claims=("sub", "iat")), lambda c: "sub" not in c and "iat" not in c),
        (TokenOverride(claims={"nonce": "forged"}), lambda c: c["nonce"] == "forged"),
        (TokenOverride(remove_claims=("nonce",)), lambda c: "nonce" not in c),
    ],
)
async def test_mischief_claims(
    idp: DevIdP, http: aiohttp.ClientSession, override: TokenOverride, check: Any
) -> None:
    token, header, claims = await mischief(idp, http, override)
    assert check(claims)
    assert header["alg"] == "RS256"
    await verify(  # still properly signed: only the claims lie
        http, idp, token, options={"verify_aud": False, "verify_exp": False, "verify_iss": False}
    )


async def test_mint_token_signs_exactly_what_it_is_given(
    idp: DevIdP, http: aiohttp.ClientSession
) -> None:
    header = {"alg": "RS256", "kid": idp.current_kid, "typ": "logout+jwt"}
    token = idp.mint_token(header, {"iss": idp.issuer, "aud": "gw", "nonce": "n"})
    claims = await verify(http, idp, token, options={"require": []})
    assert claims["nonce"] == "n"


# -- loopback only -------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.org"])
async def test_binding_beyond_loopback_is_refused(host: str) -> None:
    idp = DevIdP({}, [])
    with pytest.raises(ValueError, match="loopback"):
        await idp.start(host=host)
    with pytest.raises(RuntimeError):
        idp.issuer  # noqa: B018 (nothing was started)


async def test_issuer_with_a_path(http: aiohttp.ClientSession) -> None:
    idp = DevIdP({}, [], issuer="http://127.0.0.1:0/realms/dev")
    server = await start_server(idp.app())
    try:
        url = f"{server.url}/realms/dev/.well-known/openid-configuration"
        async with http.get(url) as response:
            doc = await response.json()
        assert doc["issuer"] == "http://127.0.0.1:0/realms/dev"
        assert doc["token_endpoint"] == "http://127.0.0.1:0/realms/dev/token"
    finally:
        await server.runner.cleanup()


async def test_odd_id_token_hint_is_a_400_page(idp: DevIdP, http: aiohttp.ClientSession) -> None:
    header = {"alg": "RS256", "kid": idp.current_kid}
    for claims in ({"iss": idp.issuer, "aud": 5}, {"iss": idp.issuer, "aud": [None]}):
        params = {"id_token_hint": idp.mint_token(header, claims), "client_id": "gw"}
        async with http.get(f"{idp.issuer}/end_session", params=params) as r:
            assert r.status == 400
    for hint in ("garbage", "a.b.c", idp.mint_token({"alg": "none"}, {}, signing="none")):
        async with http.get(f"{idp.issuer}/end_session", params={"id_token_hint": hint}) as r:
            assert r.status == 400
