"""Signing keys and JWT minting for the dev identity provider (`gateway.devidp`).

Tokens are put together by hand (JWS compact serialization, RFC 7515 §7.1)
so that one path makes both the honest tokens and the malformed ones the
relying party's attack tests need: unsigned (`alg: none`), HMAC-signed with
the public key (the key-confusion attack), signed by a key that is not in the
JWKS, or carrying a damaged signature. PyJWT refuses to produce some of these;
`cryptography` does the signing and PyJWT writes the JWKs.

A test steers minting through a hook that sees the header and claims about
to be signed and may return a `TokenOverride`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwt.algorithms import RSAAlgorithm

SigningMode = Literal["rs256", "none", "hs256-with-public-key", "other-key", "bad-signature"]


@dataclass(frozen=True, slots=True)
class TokenOverride:
    """What a hook changes in a token about to be minted.

    `header` and `claims` are merged over the defaults (after the signing
    mode has set its own `alg`/`kid`), then the `remove_*` names are deleted.
    """

    header: Mapping[str, Any] = field(default_factory=dict)
    claims: Mapping[str, Any] = field(default_factory=dict)
    remove_header: Collection[str] = ()
    remove_claims: Collection[str] = ()
    signing: SigningMode = "rs256"


# (header, claims) -> an override, or None to mint as usual. The hook may also
# edit the two dicts in place: they are the ones that will be signed.
TokenHook = Callable[[dict[str, Any], dict[str, Any]], TokenOverride | None]


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def half_hash(value: str) -> str:
    """The `at_hash` of an access token for RS256 (OIDC Core §3.1.3.6)."""
    return b64url(hashlib.sha256(value.encode("ascii")).digest()[:16])


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An RSA 2048 key and its key id, the JWK thumbprint (RFC 7638)."""

    private: rsa.RSAPrivateKey = field(repr=False)
    kid: str

    @classmethod
    def generate(cls) -> SigningKey:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        thumbprint = orjson.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]})
        return cls(private, b64url(hashlib.sha256(thumbprint).digest()))

    def public_jwk(self) -> dict[str, str]:
        jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {
            "kty": "RSA",
            "n": jwk["n"],
            "e": jwk["e"],
            "kid": self.kid,
            "alg": "RS256",
            "use": "sig",
        }

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())


class KeySet:
    """The provider's signing keys: one current, the previous ones until dropped."""

    def __init__(self) -> None:
        self.current = SigningKey.generate()
        self.previous: list[SigningKey] = []
        self._outsider: SigningKey | None = None

    def rotate(self) -> None:
        """Sign with a new key from now on; the old one stays published."""
        self.previous.insert(0, self.current)
        self.current = SigningKey.generate()

    def drop_previous(self) -> None:
        self.previous.clear()

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [key.public_jwk() for key in (self.current, *self.previous)]}

    def find(self, kid: str) -> SigningKey | None:
        return next((k for k in (self.current, *self.previous) if k.kid == kid), None)

    def outsider(self) -> SigningKey:
        """A key never published in the JWKS (made once, on first use)."""
        if self._outsider is None:
            self._outsider = SigningKey.generate()
        return self._outsider


def mint(keys: KeySet, claims: dict[str, Any], typ: str, hook: TokenHook | None) -> str:
    """A signed JWT of `claims`, as the hook (if any) wants it."""
    header: dict[str, Any] = {"alg": "RS256", "kid": keys.current.kid, "typ": typ}
    override = (hook(header, claims) if hook is not None else None) or TokenOverride()
    header.update(_mode_header(override.signing, keys))
    _apply(header, override.header, override.remove_header)
    _apply(claims, override.claims, override.remove_claims)
    return sign(keys, header, claims, override.signing)


def sign(
    keys: KeySet, header: Mapping[str, Any], claims: Mapping[str, Any], mode: SigningMode
) -> str:
    """Serialize and sign exactly this header and these claims, the way `mode` says."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
    return f"{signing_input}.{b64url(_signature(keys, signing_input.encode(), mode))}"


def verify_own(keys: KeySet, token: str, issuer: str) -> dict[str, Any]:
    """The claims of an RS256 token signed by one of the published keys, expired or not.

    Raises ValueError for anything else (for an `id_token_hint`, RP-Initiated Logout §2).
    """
    try:
        key = keys.find(str(jwt.get_unverified_header(token).get("kid")))
        if key is None:
            raise ValueError("not signed by a published key")
        claims: dict[str, Any] = jwt.decode(
            token,
            key.private.public_key(),
            algorithms=["RS256"],
            issuer=issuer,
            options={"verify_exp": False, "verify_iat": False, "verify_aud": False},
        )
    except (jwt.PyJWTError, KeyError, TypeError) as exc:
        raise ValueError(str(exc)) from exc
    return claims


def _mode_header(mode: SigningMode, keys: KeySet) -> dict[str, str]:
    if mode == "none":
        return {"alg": "none"}
    if mode == "hs256-with-public-key":
        return {"alg": "HS256"}  # kid kept: it leads a naive verifier to the RSA public key
    if mode == "other-key":
        return {"kid": keys.outsider().kid}
    return {}


def _signature(keys: KeySet, data: bytes, mode: SigningMode) -> bytes:
    if mode == "none":
        return b""
    if mode == "hs256-with-public-key":
        return hmac.new(keys.current.public_pem(), data, hashlib.sha256).digest()
    if mode == "other-key":
        return keys.outsider().sign(data)
    signature = keys.current.sign(data)
    if mode == "bad-signature":
        middle = len(signature) // 2
        return signature[:middle] + bytes([signature[middle] ^ 0xFF]) + signature[middle + 1 :]
    return signature


def _apply(target: dict[str, Any], changes: Mapping[str, Any], removals: Collection[str]) -> None:
    target.update(changes)
    for name in removals:
        target.pop(name, None)
