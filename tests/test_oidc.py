"""The relying party against a real OpenID provider over HTTP: the dev IdP and its mischief hooks.

Every ID-token attack of the identity issue is mounted here at the token level; the callback
handler's tests (state, cookies, events) build on these.
"""

from __future__ import annotations

import html
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from gateway.devidp import DevClient, DevIdP, DevUser, TokenOverride
from gateway.oidc import (
    BACKCHANNEL_EVENT,
    ClientConfig,
    IdpUnavailable,
    Pkce,
    Provider,
    RefreshDenied,
    TokenRejected,
)

REDIRECT = "http://gw.test/.gateway/callback"
SECRET = "s3cret-for-tests"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    idp: DevIdP
    provider: Provider
    http: aiohttp.ClientSession
    clock: Clock


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    clock = Clock()
    users = {"alice": DevUser("alice", "alice-pw", groups=("sre",))}
    client = DevClient("gateway", SECRET, redirect_uris=(REDIRECT,))
    idp = DevIdP(users, [client], clock=clock)
    issuer = await idp.start()
    http = aiohttp.ClientSession()
    config = ClientConfig(
        issuer,
        "gateway",
        SECRET,
        "client_secret_basic",
        ("openid", "email", "groups"),
        api_audiences=("reports-api",),
    )
    provider = Provider(config, http, clock=clock)
    await provider.discover()
    yield Env(idp, provider, http, clock)
    await http.close()
    await idp.stop()


async def authorize(env: Env, nonce: str, **kwargs: Any) -> tuple[str, Pkce]:
    """Log alice in at the IdP like a browser would; the authorization code and its PKCE pair."""
    pkce = Pkce.new()
    url = env.provider.authorization_url(
        redirect_uri=REDIRECT, state="st", nonce=nonce, pkce=pkce, **kwargs
    )
    async with aiohttp.ClientSession() as browser:
        async with browser.get(url, allow_redirects=False) as resp:
            page = await resp.text()
        fields = {
            html.unescape(n): html.unescape(v)
            for n, v in re.findall(r'type="hidden" name="([^"]*)" value="([^"]*)"', page)
        }
        action = html.unescape(re.search(r'<form method="post" action="([^"]*)"', page)[1])  # type: ignore[index]
        form = {**fields, "username": "alice", "password": "alice-pw"}
        async with browser.post(
            aiohttp.client.URL(url).join(aiohttp.client.URL(action)),
            data=form,
            allow_redirects=False,
        ) as resp:
            assert resp.status == 302, await resp.text()
            location = aiohttp.client.URL(resp.headers["Location"])
    assert str(location).startswith(REDIRECT)
    assert location.query["state"] == "st"
    return location.query["code"], pkce


async def id_token(env: Env, nonce: str = "n-1", hook: TokenOverride | None = None) -> str:
    env.idp.id_token_hook = (lambda header, claims: hook) if hook else None
    code, pkce = await authorize(env, nonce)
    tokens = await env.provider.exchange_code(code, redirect_uri=REDIRECT, pkce=pkce)
    assert tokens.id_token
    return tokens.id_token


async def test_login_yields_validated_claims(env: Env) -> None:
    token = await id_token(env)
    claims = await env.provider.validate_id_token(token, nonce="n-1")
    assert claims["email"] == "alice@example.org"
    assert claims["groups"] == ["sre"]
    assert claims["aud"] == "gateway"


ATTACKS = {
    "wrong-issuer": TokenOverride(claims={"iss": "https://evil.example"}),
    "wrong-aud": TokenOverride(claims={"aud": "someone-else"}),
    "missing-aud": TokenOverride(remove_claims=("aud",)),
    "wrong-azp": TokenOverride(claims={"aud": ["gateway", "other"], "azp": "other"}),
    "expired": TokenOverride(
        claims={"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}
    ),
    "missing-sub": TokenOverride(remove_claims=("sub",)),
    "missing-iat": TokenOverride(remove_claims=("iat",)),
    "bad-signature": TokenOverride(signing="bad-signature"),
    "alg-not-allowed": TokenOverride(signing="none"),
    "alg-not-allowed/hs256": TokenOverride(signing="hs256-with-public-key"),
    "embedded-key/jku": TokenOverride(header={"jku": "https://evil.example/jwks"}),
    "embedded-key/jwk": TokenOverride(header={"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}),
    "bad-nonce": TokenOverride(claims={"nonce": "another-login"}),
    "bad-nonce/missing": TokenOverride(remove_claims=("nonce",)),
    "unknown-kid": TokenOverride(signing="other-key"),
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
async def test_each_forged_id_token_is_rejected_with_its_reason(env: Env, case: str) -> None:
    token = await id_token(env, hook=ATTACKS[case])
    env.clock.now += 120  # a JWKS refetch is allowed: the unknown kid is looked up again
    with pytest.raises(TokenRejected) as err:
        await env.provider.validate_id_token(token, nonce="n-1")
    assert err.value.reason == case.split("/")[0]


async def test_known_kid_with_another_key_fails_the_signature(env: Env) -> None:
    token = await id_token(
        env, hook=TokenOverride(signing="other-key", header={"kid": env.idp.current_kid})
    )
    with pytest.raises(TokenRejected) as err:
        await env.provider.validate_id_token(token, nonce="n-1")
    assert err.value.reason == "bad-signature"


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "eyJhbGciOiJSUzI1NiJ9.e30", "...."])
async def test_malformed_tokens_are_refusals_not_crashes(env: Env, garbage: str) -> None:
    with pytest.raises(TokenRejected):
        await env.provider.validate_id_token(garbage, nonce="n-1")


async def test_max_age_needs_a_recent_auth_time(env: Env) -> None:
    token = await id_token(env)
    await env.provider.validate_id_token(token, nonce="n-1", max_age=300)
    env.clock.now += 600
    with pytest.raises(TokenRejected) as err:
        await env.provider.validate_id_token(token, nonce="n-1", max_age=300)
    assert err.value.reason in ("auth-too-old", "expired")


async def test_key_rotation_is_followed_without_a_restart(env: Env) -> None:
    old_kid = env.idp.current_kid
    env.idp.rotate_keys()
    env.idp.drop_previous_keys()
    assert env.idp.current_kid != old_kid
    token = await id_token(env)
    env.clock.now += 61  # the refetch of an unknown kid is rate-limited to once a minute
    claims = await env.provider.validate_id_token(token, nonce="n-1")
    assert claims["sub"]


async def test_unknown_kid_refetch_is_rate_limited(env: Env) -> None:
    env.idp.rotate_keys()
    token = await id_token(env)
    env.idp.drop_previous_keys()
    # within a minute of the last fetch the new kid is not looked up: refused, not hammered
    with pytest.raises(TokenRejected) as err:
        await env.provider.validate_id_token(token, nonce="n-1")
    assert err.value.reason == "unknown-kid"


async def test_userinfo_for_another_subject_is_refused(env: Env) -> None:
    env.idp.id_token_hook = None
    code, pkce = await authorize(env, "n-1")
    tokens = await env.provider.exchange_code(code, redirect_uri=REDIRECT, pkce=pkce)
    assert tokens.id_token and tokens.access_token
    claims = await env.provider.validate_id_token(tokens.id_token, nonce="n-1")
    info = await env.provider.userinfo(tokens.access_token, expected_sub=claims["sub"])
    assert info["email"] == "alice@example.org"
    env.idp.userinfo_hook = lambda c: {**c, "sub": "mallory"}
    with pytest.raises(TokenRejected) as err:
        await env.provider.userinfo(tokens.access_token, expected_sub=claims["sub"])
    assert err.value.reason == "userinfo-sub-mismatch"


async def test_op_error_response_is_a_refusal(env: Env) -> None:
    code, pkce = await authorize(env, "n-1")
    env.idp.token_error = {"error": "access_denied"}
    with pytest.raises(TokenRejected) as err:
        await env.provider.exchange_code(code, redirect_uri=REDIRECT, pkce=pkce)
    assert err.value.reason == "op-error"


async def test_refresh_renews_groups_and_invalid_grant_is_final(env: Env) -> None:
    code, pkce = await authorize(env, "n-1")
    tokens = await env.provider.exchange_code(code, redirect_uri=REDIRECT, pkce=pkce)
    assert tokens.refresh_token
    env.idp.set_groups("alice", ["sre", "admins"])
    renewed = await env.provider.refresh(tokens.refresh_token)
    assert renewed.id_token
    claims = await env.provider._verified_claims(renewed.id_token)
    assert claims["groups"] == ["sre", "admins"]
    with pytest.raises(RefreshDenied):
        await env.provider.refresh(tokens.refresh_token)  # rotated: the old one is spent


async def test_discovery_for_another_issuer_is_refused(env: Env) -> None:
    config = ClientConfig(
        env.idp.issuer + "/other", "gateway", SECRET, "client_secret_basic", ("openid",)
    )
    with pytest.raises(IdpUnavailable):
        await Provider(config, env.http).discover()


# -- back-channel logout tokens ----------------------------------------------------------------


def logout_claims(env: Env, **changes: Any) -> dict[str, Any]:
    now = int(env.clock.now)
    claims = {
        "iss": env.idp.issuer,
        "aud": "gateway",
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "sid": "sid-1",
        "sub": "sub-1",
        "events": {BACKCHANNEL_EVENT: {}},
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def signed(env: Env, claims: dict[str, Any], signing: str = "rs256", **header: Any) -> str:
    alg = {"alg": "none"} if signing == "none" else {"alg": "RS256", "kid": env.idp.current_kid}
    return env.idp.mint_token({**alg, **header}, claims, signing)  # type: ignore[arg-type]


def logout_token(env: Env, claims: dict[str, Any], signing: str = "rs256", **header: Any) -> str:
    return signed(env, claims, signing, **{"typ": "logout+jwt", **header})


async def test_valid_logout_token(env: Env) -> None:
    claims = await env.provider.validate_logout_token(logout_token(env, logout_claims(env)))
    assert (claims.sid, claims.sub) == ("sid-1", "sub-1")


@pytest.mark.parametrize(
    ("case", "changes", "signing", "reason"),
    [
        ("no events", {"events": None}, "rs256", "bad-events"),
        ("a nonce", {"nonce": "n"}, "rs256", "nonce-in-logout-token"),
        ("wrong aud", {"aud": "other"}, "rs256", "wrong-aud"),
        ("wrong iss", {"iss": "https://evil.example"}, "rs256", "wrong-issuer"),
        ("alg none", {}, "none", "alg-not-allowed"),
        ("expired", {"exp": 1, "iat": 0}, "rs256", "expired"),
        ("no jti", {"jti": None}, "rs256", "missing-jti"),
        ("neither sid nor sub", {"sid": None, "sub": None}, "rs256", "missing-sid-and-sub"),
    ],
)
async def test_malformed_logout_tokens_are_rejected(
    env: Env, case: str, changes: dict[str, Any], signing: str, reason: str
) -> None:
    token = logout_token(env, logout_claims(env, **changes), signing)
    with pytest.raises(TokenRejected) as err:
        await env.provider.validate_logout_token(token)
    assert err.value.reason == reason, case


async def test_logout_token_with_another_typ_is_rejected(env: Env) -> None:
    token = logout_token(env, logout_claims(env), typ="JWT")
    with pytest.raises(TokenRejected) as err:
        await env.provider.validate_logout_token(token)
    assert err.value.reason == "bad-typ"


# -- bearer tokens of service clients ----------------------------------------------------------


async def test_bearer_token_for_an_api_audience(env: Env) -> None:
    now = int(env.clock.now)
    claims = {
        "iss": env.idp.issuer,
        "aud": "reports-api",
        "sub": "svc-1",
        "azp": "reporting-job",
        "iat": now,
        "exp": now + 300,
    }
    identity = await env.provider.validate_bearer(signed(env, claims))
    assert (identity.sub, identity.client) == ("svc-1", "reporting-job")
    wrong = signed(env, {**claims, "aud": "gateway"})  # an ID token's audience
    with pytest.raises(TokenRejected) as err:
        await env.provider.validate_bearer(wrong)
    assert err.value.reason == "wrong-aud"
