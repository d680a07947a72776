"""The signed identity sent upstream in `X-Gateway-Assertion` (SPEC §7).

A compact JWT, ES256, header `{alg, kid, typ: JWT}`, with the claims

    iss     the gateway's public_url          aud     the route id
    sub     the IdP's subject                 user    the user_claim value (as X-Auth-Request-User)
    email   when the IdP gave one             groups, amr   lists
    iat, nbf (= iat), exp (= iat + assertion.ttl)           jti   128 random bits

    AssertionKeys.load(settings)     the current signing key and the previous public keys;
                                     .kid, .jwks_json (served at /.gateway/jwks.json)
    Assertions(keys, issuer, ttl, clock).issue(...) -> str

Signing (about 30 µs) is kept off the per-request path by a cache (a hit is about 2 µs): a
token is reused for the same caller, route and claims while more than half of its life is
left, so an upstream always receives one with at least ttl/2 to run. The cache key holds every
claim and, for a session, its key and claims `version`, so a token is never reused after the
claims change (a refresh, an MFA step) or for another route. It is bounded; the oldest entries
go first. So a `jti` names a token, not a request: upstreams must not treat it as one-time.
"""

from __future__ import annotations

import base64
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gateway.keyfiles import key_id, load_private_key, load_public_key, public_jwk

if TYPE_CHECKING:
    from gateway.settings import Settings

Clock = Callable[[], float]

log = logging.getLogger("gateway.assertion")

_ECDSA = ec.ECDSA(hashes.SHA256())
_P256_SIZE = 32
_JTI_BYTES = 16
MAX_CACHED = 10_000

# (session key, route id, version, sub, user, email, groups, amr)
_CacheKey = tuple[str | None, str, int, str, str, str | None, tuple[str, ...], tuple[str, ...]]


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class AssertionKeys:
    """The ES256 key that signs assertions, and the JWKS that lets upstreams verify them."""

    __slots__ = ("_key", "jwks_json", "kid")

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        previous: Sequence[ec.EllipticCurvePublicKey] = (),
    ) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("an assertion key must be on curve P-256 (ES256)")
        self._key = key
        self.kid = key_id(key.public_key())
        self.jwks_json = _jwks([key.public_key(), *previous])

    @classmethod
    def load(cls, settings: Settings) -> AssertionKeys:
        """The keys named in `assertion:`; without a signing_key_file, an ephemeral key.

        Blocking file I/O (start-up, or a reload in a thread). Raises KeyFileError.
        """
        config = settings.assertion
        previous = [load_public_key(path, "es256") for path in config.previous_key_files]
        if config.signing_key_file is None:
            log.warning(
                "assertion.signing_key_file is not set: signing with an ephemeral key made for "
                "this process; upstreams must re-fetch the JWKS after every restart"
            )
            return cls(ec.generate_private_key(ec.SECP256R1()), previous)
        return cls(load_private_key(config.signing_key_file, "es256"), previous)

    def __repr__(self) -> str:
        # SECURITY: keys reach tracebacks and debug logs; show the id, never the key.
        return f"AssertionKeys(kid={self.kid!r})"

    def sign(self, signing_input: bytes) -> bytes:
        """The JWS signature of `signing_input`: ECDSA P-256 SHA-256, raw r || s (RFC 7518 3.4)."""
        r, s = decode_dss_signature(self._key.sign(signing_input, _ECDSA))
        return r.to_bytes(_P256_SIZE, "big") + s.to_bytes(_P256_SIZE, "big")


def _jwks(public_keys: Sequence[ec.EllipticCurvePublicKey]) -> bytes:
    keys: dict[str, dict[str, str]] = {}
    for public_key in public_keys:  # the current key first; a repeated key is published once
        kid = key_id(public_key)
        keys.setdefault(kid, {**public_jwk(public_key), "kid": kid, "alg": "ES256", "use": "sig"})
    return orjson.dumps({"keys": list(keys.values())})


class Assertions:
    """Issues assertions, reusing a cached one while more than half of its life is left."""

    __slots__ = ("_cache", "_clock", "_header", "_issuer", "_max_cached", "keys", "ttl")

    def __init__(
        self,
        keys: AssertionKeys,
        issuer: str,
        ttl: float,
        clock: Clock = time.time,
        *,
        max_cached: int = MAX_CACHED,
    ) -> None:
        if ttl <= 0 or max_cached < 0:
            raise ValueError("an assertion ttl must be positive, and the cache size not negative")
        self.keys = keys  # .jwks_json for /.gateway/jwks.json
        self._issuer = issuer
        self.ttl = max(1, math.ceil(ttl))  # whole seconds: exp is a NumericDate like iat
        self._clock = clock
        self._max_cached = max_cached
        self._header = _b64url(orjson.dumps({"alg": "ES256", "kid": keys.kid, "typ": "JWT"}))
        # key -> (token, its iat, the time from which a new token is issued instead)
        self._cache: OrderedDict[_CacheKey, tuple[str, int, float]] = OrderedDict()

    @property
    def cached(self) -> int:
        """How many tokens the cache holds (at most max_cached)."""
        return len(self._cache)

    def issue(
        self,
        *,
        session_key: str | None,
        route_id: str,
        version: int,
        sub: str,
        user: str,
        email: str | None,
        groups: Sequence[str],
        amr: Sequence[str],
    ) -> str:
        """The assertion for this caller on `route_id`; `session_key` None for a bearer caller."""
        # SECURITY: every claim, the route and the session's claims version are in the key, so a
        # token is never replayed for another route (aud) or after a refresh or an MFA step.
        key = (session_key, route_id, version, sub, user, email, tuple(groups), tuple(amr))
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[1] <= now < cached[2]:  # iat <= now: a clock set back
            return cached[0]
        iat = int(now)
        token = self._sign(key, iat)
        self._remember(key, (token, iat, iat + self.ttl / 2))
        return token

    def _sign(self, key: _CacheKey, iat: int) -> str:
        _, route_id, _, sub, user, email, groups, amr = key
        claims: dict[str, object] = {"iss": self._issuer, "aud": route_id, "sub": sub, "user": user}
        if email is not None:
            claims["email"] = email
        claims |= {"groups": groups, "amr": amr, "iat": iat, "nbf": iat, "exp": iat + self.ttl}
        claims["jti"] = _b64url(secrets.token_bytes(_JTI_BYTES)).decode("ascii")
        signing_input = self._header + b"." + _b64url(orjson.dumps(claims))
        return (signing_input + b"." + _b64url(self.keys.sign(signing_input))).decode("ascii")

    def _remember(self, key: _CacheKey, entry: tuple[str, int, float]) -> None:
        cache = self._cache
        cache.pop(key, None)  # re-insert at the end: the entries stay oldest-first
        cache[key] = entry
        while len(cache) > self._max_cached:
            # SECURITY: bounded, so a flood of distinct callers cannot exhaust memory.
            cache.popitem(last=False)
