"""The OpenID Connect relying party (SPEC §5): the only module that speaks JOSE with the IdP.

    Provider.discover()                      metadata, issuer checked exactly
    Provider.probe(within)                   whether the IdP answers now (break-glass)
    Provider.authorization_url(...)          code flow with PKCE S256, state, nonce
    Provider.exchange_code(...)              -> Tokens (client_secret_basic or _post)
    Provider.validate_id_token(...)          -> claims, or TokenRejected(reason)
    Provider.userinfo(...) / refresh(...)
    Provider.validate_logout_token(...)      back-channel logout (replay check: the caller's)
    Provider.validate_bearer(...)            service clients (SPEC §4.4)

Every claim check is written out here with an injectable clock rather than
left to the JOSE library's defaults, so each one is visible and tested. JOSE
libraries raise more than their own error types on malformed input; every
path that touches a token turns any failure into `TokenRejected` with a
stable reason code, never a 500.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import jwt

LEEWAY = 30.0  # seconds of clock skew tolerated between us and the IdP
JWKS_REFETCH_INTERVAL = 60.0  # an unknown kid refetches the JWKS at most this often
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
# SECURITY: asymmetric algorithms only: 'none' and HMAC (key confusion with a public key) never.
ALLOWED_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
# SECURITY: keys are taken from the IdP's JWKS only, never from the token itself.
_EMBEDDED_KEY_HEADERS = ("jku", "jwk", "x5u", "x5c")

Clock = Callable[[], float]
Claims = dict[str, Any]


class TokenRejected(Exception):
    """A token or IdP answer we refuse; `reason` is a stable code for events and tests."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RefreshDenied(TokenRejected):
    """The IdP answered `invalid_grant` to a refresh: the session must end."""


class IdpUnavailable(Exception):
    """The IdP could not be reached or answered garbage; sessions are not ended for this."""


@dataclass(frozen=True, slots=True)
class _Key:
    jwk: jwt.PyJWK
    alg: str | None  # as the JWKS states it, if it does


@dataclass(frozen=True, slots=True)
class Metadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    end_session_endpoint: str | None


@dataclass(frozen=True, slots=True)
class Tokens:
    id_token: str | None
    access_token: str | None
    refresh_token: str | None
    expires_in: float | None


@dataclass(frozen=True, slots=True)
class Pkce:
    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        return cls.from_verifier(secrets.token_urlsafe(48))

    @classmethod
    def from_verifier(cls, verifier: str) -> Pkce:
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


@dataclass(frozen=True, slots=True)
class LogoutClaims:
    jti: str
    exp: float
    sid: str | None
    sub: str | None


@dataclass(frozen=True, slots=True)
class BearerIdentity:
    sub: str
    client: str  # azp or client_id: matched by policy `clients:`
    claims: Claims


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What the relying party needs of settings.Identity."""

    issuer: str
    client_id: str
    client_secret: str
    token_auth: str  # client_secret_basic | client_secret_post
    scopes: tuple[str, ...]
    api_audiences: tuple[str, ...] = ()


class Provider:
    def __init__(
        self, client: ClientConfig, http: aiohttp.ClientSession, clock: Clock = time.time
    ) -> None:
        self.client = client
        self._http = http
        self._clock = clock
        self._metadata: Metadata | None = None
        self._keys: dict[str, _Key] = {}
        self._keys_fetched_at = float("-inf")

    # -- discovery and keys ------------------------------------------------------------------

    @property
    def discovered(self) -> bool:
        return self._metadata is not None

    @property
    def metadata(self) -> Metadata:
        if self._metadata is None:
            raise IdpUnavailable("the IdP's discovery document has not been loaded")
        return self._metadata

    async def discover(self) -> Metadata:
        url = self.client.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self._get_json(url)
        # SECURITY: a document naming another issuer could hand us another IdP's keys.
        if doc.get("issuer") != self.client.issuer:
            raise IdpUnavailable(
                f"discovery names issuer {doc.get('issuer')!r}, expected {self.client.issuer!r}"
            )
        try:
            metadata = Metadata(
                issuer=doc["issuer"],
                authorization_endpoint=_endpoint(doc, "authorization_endpoint"),
                token_endpoint=_endpoint(doc, "token_endpoint"),
                jwks_uri=_endpoint(doc, "jwks_uri"),
                userinfo_endpoint=_optional_endpoint(doc, "userinfo_endpoint"),
                end_session_endpoint=_optional_endpoint(doc, "end_session_endpoint"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IdpUnavailable(f"unusable discovery document: {exc}") from None
        self._metadata = metadata
        await self._refresh_keys()
        return metadata

    async def probe(self, within: float) -> bool:
        """Whether the IdP answers now: its discovery document, naming its own issuer, and the
        JWKS that document names, each fetched afresh within `within` seconds."""
        url = self.client.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            doc = await self._get_json(url, within=within)
            if doc.get("issuer") != self.client.issuer:
                return False
            keys = (await self._get_json(_endpoint(doc, "jwks_uri"), within=within)).get("keys")
        except (IdpUnavailable, ValueError):
            return False
        return isinstance(keys, list) and bool(keys)

    async def _refresh_keys(self) -> None:
        self._keys_fetched_at = self._clock()
        doc = await self._get_json(self.metadata.jwks_uri)
        keys: dict[str, _Key] = {}
        for entry in doc.get("keys", []) if isinstance(doc.get("keys"), list) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                jwk = jwt.PyJWK(entry)
            except Exception:  # noqa: S112 - a key we cannot use is skipped, not fatal
                continue
            keys[str(entry.get("kid", ""))] = _Key(jwk, _opt_str(entry.get("alg")))
        if not keys:
            raise IdpUnavailable("the IdP's JWKS holds no usable signing key")
        self._keys = keys

    async def _key(self, kid: str) -> _Key:
        key = self._keys.get(kid)
        if key is None and self._clock() - self._keys_fetched_at >= JWKS_REFETCH_INTERVAL:
            with contextlib.suppress(IdpUnavailable):
                await self._refresh_keys()  # the IdP may have rotated its keys
            key = self._keys.get(kid)
        if key is None:
            raise TokenRejected("unknown-kid", f"no key {kid!r} in the IdP's JWKS")
        return key

    # -- the authorization code flow ---------------------------------------------------------

    def authorization_url(
        self,
        *,
        redirect_uri: str,
        state: str,
        nonce: str,
        pkce: Pkce,
        prompt: str | None = None,
        max_age: int | None = None,
    ) -> str:
        params = {
            "response_type": "code",
            "client_id": self.client.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.client.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce.challenge,
            "code_challenge_method": "S256",
        }
        if prompt:
            params["prompt"] = prompt
        if max_age is not None:
            params["max_age"] = str(max_age)
        endpoint = self.metadata.authorization_endpoint
        return endpoint + ("&" if "?" in endpoint else "?") + urlencode(params, quote_via=quote)

    async def exchange_code(self, code: str, *, redirect_uri: str, pkce: Pkce) -> Tokens:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": pkce.verifier,
        }
        tokens = await self._token_request(form)
        if not tokens.id_token:
            raise TokenRejected("op-error", "the token response has no id_token")
        return tokens

    async def refresh(self, refresh_token: str) -> Tokens:
        try:
            return await self._token_request(
                {"grant_type": "refresh_token", "refresh_token": refresh_token}
            )
        except TokenRejected as exc:
            if exc.detail == "invalid_grant":
                raise RefreshDenied("invalid-grant", "invalid_grant") from None
            raise

    async def userinfo(self, access_token: str, *, expected_sub: str) -> Claims:
        endpoint = self.metadata.userinfo_endpoint
        if endpoint is None:
            return {}
        claims = await self._get_json(endpoint, headers={"Authorization": f"Bearer {access_token}"})
        # SECURITY: OIDC Core §5.3.2: userinfo for another subject must not be mixed in.
        if claims.get("sub") != expected_sub:
            raise TokenRejected("userinfo-sub-mismatch", "userinfo names another subject")
        return claims

    async def _token_request(self, form: dict[str, str]) -> Tokens:
        headers = {"Accept": "application/json"}
        if self.client.token_auth == "client_secret_post":  # noqa: S105 - a method name
            form = {
                **form,
                "client_id": self.client.client_id,
                "client_secret": self.client.client_secret,
            }
        else:  # RFC 6749 §2.3.1: each part form-urlencoded before base64
            client_id, secret = self.client.client_id, self.client.client_secret
            pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        try:
            async with self._http.post(
                self.metadata.token_endpoint, data=form, headers=headers
            ) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise IdpUnavailable(f"token endpoint: {exc!r}") from None
        if not isinstance(body, dict):
            raise IdpUnavailable("token endpoint answered something other than a JSON object")
        if "error" in body or resp.status != 200:
            raise TokenRejected("op-error", str(body.get("error", resp.status)))
        return Tokens(
            id_token=_opt_str(body.get("id_token")),
            access_token=_opt_str(body.get("access_token")),
            refresh_token=_opt_str(body.get("refresh_token")),
            expires_in=float(body["expires_in"])
            if isinstance(body.get("expires_in"), int | float)
            else None,
        )

    # -- token validation --------------------------------------------------------------------

    async def validate_id_token(
        self, raw: str, *, nonce: str, max_age: float | None = None
    ) -> Claims:
        claims = await self._verified_claims(raw)
        self._check_issued(claims)
        self._check_audience(claims, (self.client.client_id,), id_token=True)
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise TokenRejected("missing-sub", "the ID token has no subject")
        # SECURITY: the nonce binds the token to the login this browser started (replay).
        if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(
            claims["nonce"], nonce
        ):
            raise TokenRejected("bad-nonce", "the ID token's nonce does not match the login")
        if max_age is not None:
            auth_time = claims.get("auth_time")
            if not isinstance(auth_time, int | float):
                raise TokenRejected(
                    "missing-auth-time", "max_age was asked but auth_time is absent"
                )
            if self._clock() - auth_time > max_age + LEEWAY:
                raise TokenRejected(
                    "auth-too-old", "the IdP's authentication is older than max_age"
                )
        return claims

    async def validate_refreshed_id_token(self, raw: str, *, sub: str) -> Claims:
        """An ID token from a refresh (OIDC Core §12.2): ours, valid, and about the same subject."""
        claims = await self._verified_claims(raw)
        self._check_issued(claims)
        self._check_audience(claims, (self.client.client_id,), id_token=True)
        # SECURITY: a refresh must never turn one person's session into another's.
        if claims.get("sub") != sub:
            raise TokenRejected("sub-changed", "the refreshed token names another subject")
        return claims

    async def validate_logout_token(self, raw: str) -> LogoutClaims:
        """OIDC Back-Channel Logout 1.0 §2.6; the caller refuses a replayed `jti`."""
        header = _header(raw)
        if "typ" in header and str(header["typ"]).lower() not in (
            "logout+jwt",
            "application/logout+jwt",
        ):
            raise TokenRejected("bad-typ", "a logout token's typ must be logout+jwt")
        claims = await self._verified_claims(raw, header)
        self._check_issued(claims)
        self._check_audience(claims, (self.client.client_id,), id_token=False)
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
            raise TokenRejected("bad-events", "the back-channel logout event is missing")
        # SECURITY: a nonce means an ID token was passed off as a logout token.
        if "nonce" in claims:
            raise TokenRejected("nonce-in-logout-token", "a logout token must not carry a nonce")
        sid, sub, jti = claims.get("sid"), claims.get("sub"), claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise TokenRejected("missing-jti", "a logout token needs a jti")
        if not (isinstance(sid, str) and sid) and not (isinstance(sub, str) and sub):
            raise TokenRejected("missing-sid-and-sub", "a logout token names neither sid nor sub")
        return LogoutClaims(jti, float(claims["exp"]), _opt_str(sid), _opt_str(sub))

    async def validate_bearer(self, raw: str) -> BearerIdentity:
        claims = await self._verified_claims(raw)
        self._check_issued(claims)
        self._check_audience(claims, self.client.api_audiences, id_token=False)
        client = claims.get("azp") or claims.get("client_id")
        if not isinstance(client, str) or not client or not isinstance(claims.get("sub"), str):
            raise TokenRejected("missing-client", "a bearer token must name its client and subject")
        return BearerIdentity(claims["sub"], client, claims)

    async def _verified_claims(self, raw: str, header: Mapping[str, Any] | None = None) -> Claims:
        header = _header(raw) if header is None else header
        alg = header.get("alg")
        if alg not in ALLOWED_ALGS:
            raise TokenRejected("alg-not-allowed", f"algorithm {alg!r} is not accepted")
        if any(name in header for name in _EMBEDDED_KEY_HEADERS):
            raise TokenRejected("embedded-key", "tokens naming their own key are refused")
        key = await self._key(str(header.get("kid", "")))
        # SECURITY: the key's own type (and alg, if it states one) must fit the header's alg.
        if key.jwk.key_type != _KEY_TYPES[alg[:2]] or key.alg not in (alg, None):
            raise TokenRejected(
                "alg-key-mismatch", f"key {header.get('kid')!r} is not an {alg} key"
            )
        try:
            claims = jwt.decode(
                raw,
                key.jwk.key,
                algorithms=[alg],
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad-signature", "the signature does not verify") from None
        except Exception as exc:  # JOSE code raises KeyError, ValueError, ...
            raise TokenRejected("malformed-token", type(exc).__name__) from None
        if not isinstance(claims, dict):
            raise TokenRejected("malformed-token", "claims are not a JSON object")
        return claims

    def _check_issued(self, claims: Claims) -> None:
        now = self._clock()
        if claims.get("iss") != self.client.issuer:
            raise TokenRejected("wrong-issuer", f"issuer {claims.get('iss')!r}")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not _is_time(exp):
            raise TokenRejected("missing-exp", "the token has no expiry")
        if now > exp + LEEWAY:
            raise TokenRejected("expired", "the token has expired")
        if not _is_time(iat):
            raise TokenRejected("missing-iat", "the token has no issue time")
        if iat > now + LEEWAY:
            raise TokenRejected("issued-in-future", "the token was issued in the future")
        if "nbf" in claims and (not _is_time(claims["nbf"]) or claims["nbf"] > now + LEEWAY):
            raise TokenRejected("not-yet-valid", "the token is not valid yet")

    def _check_audience(self, claims: Claims, accepted: tuple[str, ...], *, id_token: bool) -> None:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
        if not audiences or not all(isinstance(a, str) for a in audiences):
            raise TokenRejected("missing-aud", "the token has no audience")
        if not any(a in accepted for a in audiences):
            raise TokenRejected("wrong-aud", "the token is meant for another audience")
        azp = claims.get("azp")
        # SECURITY: OIDC Core §3.1.3.7: with several audiences, azp must name us.
        if id_token and (azp is not None or len(audiences) > 1) and azp != self.client.client_id:
            raise TokenRejected("wrong-azp", "the token was issued to another party")

    # -- plumbing ----------------------------------------------------------------------------

    async def _get_json(
        self, url: str, headers: Mapping[str, str] | None = None, within: float | None = None
    ) -> dict[str, Any]:
        limit = self._http.timeout if within is None else aiohttp.ClientTimeout(total=within)
        try:
            async with self._http.get(url, headers=headers, timeout=limit) as resp:
                if resp.status != 200:
                    raise IdpUnavailable(f"{url} answered {resp.status}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise IdpUnavailable(f"{url}: {exc!r}") from None
        if not isinstance(body, dict):
            raise IdpUnavailable(f"{url} did not answer a JSON object")
        return body


def _header(raw: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(raw)
    except Exception:  # any malformed input is a refusal, never a 500
        raise TokenRejected("malformed-token", "not a JWT") from None
    return header


def _optional_endpoint(doc: Mapping[str, Any], name: str) -> str | None:
    return None if doc.get(name) is None else _endpoint(doc, name)


def _endpoint(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} is missing")
    parts = urlsplit(value)
    # SECURITY: endpoints carry codes and tokens: https only, except a loopback dev IdP.
    if parts.scheme != "https" and not (parts.scheme == "http" and _loopback(parts.hostname)):
        raise ValueError(f"{name} must be https: {value}")
    return value


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_time(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
