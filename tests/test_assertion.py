"""The identity assertion sent upstream, checked the way an upstream would check it (pyjwt)."""

from __future__ import annotations

import base64
import json
import logging
import textwrap
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.assertion import AssertionKeys, Assertions
from gateway.keyfiles import KeyFileError, generate, key_id
from gateway.settings import ConfigError, Settings, load_settings

ISSUER = "https://gw.example.org"
KEY = base64.b64encode(b"k" * 32).decode()

CONFIG = f"""\
server:
  public_url: {ISSUER}
identity:
  issuer: https://idp.example.org
  client_id: gw
  client_secret: s3cret-value
state:
  keys: [{KEY}]
routes:
  - id: app
    upstream: http://127.0.0.1:3000
    policy:
      allow: [{{groups: [staff]}}]
"""


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_settings(path, env={})


def who(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "session_key": "s1",
        "route_id": "grafana",
        "version": 1,
        "sub": "248289761001",
        "user": "alice@example.org",
        "email": "alice@example.org",
        "groups": ["sre", "staff"],
        "amr": ["pwd", "otp"],
    }
    return claims | changes


def assertions(clock: Clock, ttl: float = 60, **kwargs: Any) -> Assertions:
    keys = AssertionKeys(ec.generate_private_key(ec.SECP256R1()))
    return Assertions(keys, ISSUER, ttl, clock, **kwargs)


def verify(keys: AssertionKeys, token: str, route_id: str) -> dict[str, Any]:
    """What an upstream does: the JWKS from /.gateway/jwks.json, then a strict decode."""
    jwks = jwt.PyJWKSet.from_json(keys.jwks_json.decode())
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=route_id,
        issuer=ISSUER,
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
    )


def unverified(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


# -- what an upstream sees ---------------------------------------------------------------------


def test_an_upstream_verifies_the_assertion_and_reads_the_identity() -> None:
    clock = Clock()
    issuer = assertions(clock)
    token = issuer.issue(**who())
    claims = verify(issuer.keys, token, "grafana")
    assert claims["iss"] == ISSUER and claims["aud"] == "grafana"
    assert claims["sub"] == "248289761001"
    assert claims["user"] == claims["email"] == "alice@example.org"
    assert claims["groups"] == ["sre", "staff"] and claims["amr"] == ["pwd", "otp"]
    assert claims["iat"] == claims["nbf"] == int(clock.now)
    assert claims["exp"] == claims["iat"] + 60
    assert len(base64.urlsafe_b64decode(claims["jti"] + "==")) == 16


def test_header_names_the_key_published_in_the_jwks() -> None:
    issuer = assertions(Clock())
    header = jwt.get_unverified_header(issuer.issue(**who()))
    assert header == {"alg": "ES256", "kid": issuer.keys.kid, "typ": "JWT"}
    published = json.loads(issuer.keys.jwks_json)["keys"]
    assert [k["kid"] for k in published] == [header["kid"]]
    assert published[0] | {"x": "", "y": ""} == {
        "kty": "EC",
        "crv": "P-256",
        "x": "",
        "y": "",
        "kid": header["kid"],
        "alg": "ES256",
        "use": "sig",
    }


def test_a_token_for_one_route_is_refused_by_another() -> None:
    issuer = assertions(Clock())
    token = issuer.issue(**who(route_id="route-a"))
    with pytest.raises(jwt.InvalidAudienceError):
        verify(issuer.keys, token, "route-b")


def test_a_tampered_payload_is_refused() -> None:
    issuer = assertions(Clock())
    header, payload, signature = issuer.issue(**who()).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["groups"] = ["sre", "staff", "admins"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        verify(issuer.keys, f"{header}.{forged}.{signature}", "grafana")


def test_a_token_signed_by_another_key_is_refused() -> None:
    clock = Clock()
    ours, theirs = assertions(clock), assertions(clock)
    token = theirs.issue(**who())
    with pytest.raises(KeyError):  # its kid is not in our JWKS
        verify(ours.keys, token, "grafana")
    header = jwt.get_unverified_header(token)
    jwks = jwt.PyJWKSet.from_json(ours.keys.jwks_json.decode())
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, jwks[ours.keys.kid], algorithms=["ES256"], audience="grafana")
    assert header["kid"] != ours.keys.kid


def test_email_is_left_out_when_the_idp_gave_none() -> None:
    issuer = assertions(Clock())
    claims = verify(issuer.keys, issuer.issue(**who(email=None)), "grafana")
    assert "email" not in claims


def test_ttl_is_whole_seconds() -> None:
    clock = Clock()
    claims = unverified(assertions(clock, ttl=90.5).issue(**who()))
    assert claims["exp"] - claims["iat"] == 91
    with pytest.raises(ValueError):
        assertions(clock, ttl=0)


# -- keys --------------------------------------------------------------------------------------


def test_keys_load_the_signing_key_and_publish_previous_keys(tmp_path: Path) -> None:
    old = generate(tmp_path / "old")
    new = generate(tmp_path / "new")
    config = CONFIG + textwrap.dedent(f"""\
        assertion:
          signing_key_file: {new[0].path}
          previous_key_files: [{old[1].path}, {old[0].path}, {new[1].path}]
        """)
    keys = AssertionKeys.load(load(tmp_path, config))
    assert keys.kid == new[0].key_id
    published = [k["kid"] for k in json.loads(keys.jwks_json)["keys"]]
    assert published == [new[0].key_id, old[0].key_id]  # current first; each key once
    clock = Clock()
    token = Assertions(keys, ISSUER, 60, clock).issue(**who())
    assert verify(keys, token, "grafana")["sub"] == "248289761001"
    assert "-----" not in repr(keys) and keys.kid in repr(keys)


def test_a_token_from_the_previous_key_still_verifies_during_rotation(tmp_path: Path) -> None:
    old, new = generate(tmp_path / "old"), generate(tmp_path / "new")
    before = AssertionKeys.load(
        load(tmp_path, CONFIG + f"assertion:\n  signing_key_file: {old[0].path}\n")
    )
    rotation = (
        f"assertion:\n  signing_key_file: {new[0].path}\n  previous_key_files: [{old[1].path}]\n"
    )
    after = AssertionKeys.load(load(tmp_path, CONFIG + rotation))
    token = Assertions(before, ISSUER, 60, Clock()).issue(**who())
    assert verify(after, token, "grafana")["aud"] == "grafana"


def test_without_a_key_file_an_ephemeral_key_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.assertion"):
        keys = AssertionKeys.load(load(tmp_path, CONFIG))
    assert [r.name for r in caplog.records] == ["gateway.assertion"]
    assert "ephemeral" in caplog.records[0].getMessage()
    assert AssertionKeys.load(load(tmp_path, CONFIG)).kid != keys.kid


def test_a_bad_key_file_is_a_key_file_error(tmp_path: Path) -> None:
    written = generate(tmp_path / "keys")
    ed25519 = written[2].path
    with pytest.raises(KeyFileError, match="not an ES256 key"):
        AssertionKeys.load(load(tmp_path, CONFIG + f"assertion:\n  signing_key_file: {ed25519}\n"))
    written[0].path.chmod(0o640)
    with pytest.raises(KeyFileError, match="readable by group or others"):
        AssertionKeys.load(
            load(tmp_path, CONFIG + f"assertion:\n  signing_key_file: {written[0].path}\n")
        )


def test_kid_is_the_thumbprint_of_the_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    assert AssertionKeys(key).kid == key_id(key.public_key())
    with pytest.raises(ValueError, match="P-256"):
        AssertionKeys(ec.generate_private_key(ec.SECP384R1()))


# -- the cache ---------------------------------------------------------------------------------


def test_a_token_is_reused_while_more_than_half_its_life_is_left() -> None:
    clock = Clock()
    issuer = assertions(clock, ttl=60)
    first = issuer.issue(**who())
    iat = unverified(first)["iat"]
    clock.now = iat + 29.9
    assert issuer.issue(**who()) == first
    clock.now = iat + 30
    second = issuer.issue(**who())
    assert second != first
    assert unverified(second)["iat"] == iat + 30
    clock.now = iat + 59.9
    assert issuer.issue(**who()) == second


def test_a_new_version_never_gets_the_old_token() -> None:
    clock = Clock()
    issuer = assertions(clock)
    first = issuer.issue(**who(version=1))
    stepped_up = issuer.issue(**who(version=2, amr=["pwd", "otp", "mfa"]))
    assert stepped_up != first
    assert unverified(stepped_up)["amr"] == ["pwd", "otp", "mfa"]
    assert issuer.issue(**who(version=2, amr=["pwd", "otp", "mfa"])) == stepped_up


def test_no_reuse_across_routes_sessions_or_claims() -> None:
    issuer = assertions(Clock())
    first = issuer.issue(**who())
    others = [
        who(route_id="other"),
        who(session_key="s2"),
        who(groups=["sre"]),
        who(email="a@other.example"),
        who(session_key=None),
    ]
    tokens = {first, *(issuer.issue(**claims) for claims in others)}
    assert len(tokens) == 1 + len(others)


def test_bearer_callers_are_cached_by_their_claims() -> None:
    issuer = assertions(Clock())
    bearer = who(session_key=None, version=0, sub="svc-backup", user="svc-backup", email=None)
    token = issuer.issue(**bearer)
    assert issuer.issue(**bearer) == token
    assert issuer.issue(**(bearer | {"groups": ["sre"]})) != token


def test_a_clock_set_back_gets_a_new_token() -> None:
    clock = Clock()
    issuer = assertions(clock)
    first = issuer.issue(**who())
    clock.now -= 10
    assert issuer.issue(**who()) != first


def test_fresh_tokens_have_unique_jtis() -> None:
    issuer = assertions(Clock())
    jtis = {unverified(issuer.issue(**who(session_key=f"s{i}")))["jti"] for i in range(200)}
    assert len(jtis) == 200


def test_the_cache_is_bounded_and_drops_the_oldest() -> None:
    issuer = assertions(Clock(), max_cached=3)
    first = [issuer.issue(**who(session_key=f"s{i}")) for i in range(5)]
    assert issuer.cached == 3
    assert issuer.issue(**who(session_key="s4")) == first[4]  # still cached
    assert issuer.issue(**who(session_key="s0")) != first[0]  # dropped, so signed anew
    assert issuer.cached == 3
    uncached = assertions(Clock(), max_cached=0)
    assert uncached.issue(**who()) != uncached.issue(**who())


# -- the config check --------------------------------------------------------------------------


def test_replicas_without_a_shared_assertion_key_are_a_config_error(tmp_path: Path) -> None:
    redis = CONFIG.replace("state:\n", "state:\n  sessions: redis://127.0.0.1:6379/0\n")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, redis)
    found = [i for i in caught.value.issues if i.message.startswith("assertion.signing_key_file")]
    assert len(found) == 1
    assert "gateway keys generate" in found[0].message
    assert found[0].line == 8  # no assertion: section, so at state.sessions
    with_section = redis + "assertion:\n  ttl: 30s\n"
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, with_section)
    assert [(i.line, i.message.split(":")[0]) for i in caught.value.issues] == [
        (15, "assertion.signing_key_file")
    ]
    keys = generate(tmp_path / "keys")
    shared = redis + f"assertion:\n  signing_key_file: {keys[0].path}\n"
    assert load(tmp_path, shared).assertion.signing_key_file == keys[0].path


def test_public_only_replicas_need_no_assertion_key(tmp_path: Path) -> None:
    public = textwrap.dedent("""\
        server:
          public_url: https://gw.example.org
        state:
          sessions: redis://127.0.0.1:6379/0
        routes:
          - id: health
            upstream: http://127.0.0.1:3000
            public: true
        """)
    assert load(tmp_path, public).assertion.signing_key_file is None
