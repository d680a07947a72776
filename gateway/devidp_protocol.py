"""The rules of the dev identity provider's requests and error answers (`gateway.devidp`).

What a request parameter, an authorization request, client credentials and a
PKCE verifier must look like (RFC 6749, RFC 7636, OIDC Core), and how each
refusal is answered. Errors never leave the provider; each becomes a response:

    DevIdPError
    ├── PageError       400 page: the request cannot go back to the client (bad client_id,
    │                   redirect_uri, id_token_hint or post_logout_redirect_uri)
    ├── RedirectError   302 to the redirect_uri with error= (RFC 6749 §4.1.2.1)
    └── OAuthError      JSON {"error": ...} of /token and /userinfo, with its status
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlencode

import aiohttp
from aiohttp import web
from multidict import MultiMapping

from gateway.devidp_accounts import DevClient

Params = MultiMapping[object]  # a query string or a posted form

BASIC_CHALLENGE = 'Basic realm="devidp"'
BEARER_CHALLENGE = 'Bearer error="invalid_token"'
PROMPTS = frozenset({"none", "login", "consent", "select_account"})
_PKCE_VALUE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")  # RFC 7636 §4.1, §4.2
_AUTH_PARAMS = (
    *("response_type", "scope", "state", "nonce"),
    *("code_challenge", "code_challenge_method", "prompt", "max_age"),
)


class DevIdPError(Exception):
    """A request the provider refuses; its middleware turns it into a response."""


class PageError(DevIdPError):
    """The request cannot be sent back to the client: a 400 page."""


class RedirectError(DevIdPError):
    """An authorization error sent back to the client's redirect_uri."""

    def __init__(self, error: str, description: str, redirect_uri: str, state: str | None) -> None:
        super().__init__(description)
        self.error, self.redirect_uri, self.state = error, redirect_uri, state


class OAuthError(DevIdPError):
    """An error answer of the token or userinfo endpoint (RFC 6749 §5.2, RFC 6750 §3)."""

    def __init__(
        self, error: str, description: str = "", status: int = 400, challenge: str | None = None
    ) -> None:
        super().__init__(description)
        self.error, self.status, self.challenge = error, status, challenge


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """A validated authorization request."""

    client: DevClient
    redirect_uri: str
    scope: str
    state: str | None
    nonce: str | None
    code_challenge: str
    prompt: frozenset[str]
    max_age: int | None
    form_fields: dict[str, str]  # the request's parameters, carried through the login form


# -- parameters ----------------------------------------------------------------------------------


def param(params: Params, name: str) -> str | None:
    """One parameter; absent or empty is None, a repeated one is refused (RFC 6749 §3.1)."""
    values = params.getall(name, [])
    if len(values) > 1:
        raise ValueError(f"invalid_request: {name} is repeated")
    if not values or values[0] == "":
        return None
    if not isinstance(values[0], str):
        raise ValueError(f"invalid_request: {name} is not text")
    return values[0]


def page_param(params: Params, name: str) -> str | None:
    """A parameter whose problems are a 400 page."""
    try:
        return param(params, name)
    except ValueError as exc:
        raise PageError(str(exc).partition(": ")[2]) from None


def oauth_param(params: Params, name: str) -> str | None:
    """A parameter whose problems are an OAuth `invalid_request`."""
    try:
        return param(params, name)
    except ValueError as exc:
        raise OAuthError("invalid_request", str(exc).partition(": ")[2]) from None


def text(form: Params, name: str) -> str:
    """A form field as text, '' when absent or not text."""
    value = form.get(name)
    return value if isinstance(value, str) else ""


# -- authorization requests ----------------------------------------------------------------------


def authorization_request(client: DevClient, redirect_uri: str, params: Params) -> AuthRequest:
    """The request for a known client and registered redirect_uri, or a RedirectError."""
    first_state = params.get("state")
    state = first_state if isinstance(first_state, str) and first_state else None
    try:
        values = {name: param(params, name) for name in _AUTH_PARAMS}
        return _checked(client, redirect_uri, values)
    except ValueError as exc:
        error, _, description = str(exc).partition(": ")
        raise RedirectError(error, description, redirect_uri, state) from None


def _checked(client: DevClient, redirect_uri: str, values: dict[str, str | None]) -> AuthRequest:
    """Check the parameters; a ValueError says 'error_code: description'."""
    if values["response_type"] != "code":
        raise ValueError("unsupported_response_type: only response_type=code is supported")
    if "openid" not in (values["scope"] or "").split():
        raise ValueError("invalid_scope: the scope must contain openid")
    challenge = values["code_challenge"]
    # SECURITY: PKCE is required (RFC 9700 §2.1.1), and only S256: `plain` leaks the verifier.
    if challenge is None or not _PKCE_VALUE.fullmatch(challenge):
        raise ValueError("invalid_request: a PKCE code_challenge is required")
    if values["code_challenge_method"] != "S256":
        raise ValueError("invalid_request: code_challenge_method must be S256")
    prompt = frozenset((values["prompt"] or "").split())
    if ("none" in prompt and len(prompt) > 1) or not prompt <= PROMPTS:
        raise ValueError("invalid_request: unsupported prompt")
    max_age = values["max_age"]
    if max_age is not None and not (max_age.isascii() and max_age.isdigit()):
        raise ValueError("invalid_request: max_age must be a number of seconds")
    fields = {"client_id": client.client_id, "redirect_uri": redirect_uri}
    fields |= {name: value for name, value in values.items() if value is not None}
    return AuthRequest(
        client=client,
        redirect_uri=redirect_uri,
        scope=values["scope"] or "",
        state=values["state"],
        nonce=values["nonce"],
        code_challenge=challenge,
        prompt=prompt,
        max_age=int(max_age) if max_age is not None else None,
        form_fields=fields,
    )


# -- discovery and logout ------------------------------------------------------------------------


def discovery_document(issuer: str) -> dict[str, Any]:
    """The provider's metadata (OIDC Discovery 1.0 §3, Back-Channel Logout §2.1)."""
    base = issuer.rstrip("/")
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{base}/authorize",
        "token_endpoint": f"{base}/token",
        "userinfo_endpoint": f"{base}/userinfo",
        "jwks_uri": f"{base}/jwks",
        "end_session_endpoint": f"{base}/end_session",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "scopes_supported": ["openid", "email", "profile", "groups", "offline_access"],
        "claims_supported": [
            *("iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "sid", "azp", "amr"),
            *("at_hash", "email", "email_verified", "name", "groups"),
        ],
        "prompt_values_supported": sorted(PROMPTS),
        "authorization_response_iss_parameter_supported": True,
        "backchannel_logout_supported": True,
        "backchannel_logout_session_supported": True,
    }


def logout_client(
    clients: Mapping[str, DevClient], client_id: str | None, hint: Mapping[str, Any] | None
) -> DevClient | None:
    """The client asking for logout, from `client_id` and/or the id_token_hint's audience."""
    audience = hint.get("aud") if hint else None
    listed = audience if isinstance(audience, list) else [audience]
    hinted = [a for a in listed if isinstance(a, str)]
    if client_id is None and len(hinted) == 1:
        client_id = hinted[0]
    if client_id is None:
        return None
    client = clients.get(client_id)
    if client is None or (hint is not None and client_id not in hinted):
        raise PageError("The client_id is unknown or does not match the id_token_hint.")
    return client


def post_logout_target(clients: Iterable[DevClient], uri: str | None) -> str | None:
    """`uri` when one of these clients registered it exactly (None stays None), else a 400 page."""
    # SECURITY: registered addresses only: end_session is no open redirector.
    if uri is not None and not any(uri in c.post_logout_redirect_uris for c in clients):
        raise PageError("The post_logout_redirect_uri is not registered.")
    return uri


# -- the token endpoint --------------------------------------------------------------------------


def client_credentials(request: web.Request, form: Params) -> tuple[str | None, str | None, str]:
    """(client_id, secret, method) as presented; more than one method is refused."""
    posted_secret = oauth_param(form, "client_secret")
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return oauth_param(form, "client_id"), posted_secret, "client_secret_post"
    if posted_secret is not None:
        raise OAuthError("invalid_request", "more than one client authentication method")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "malformed credentials", 401, BASIC_CHALLENGE) from None
    client_id, _, secret = decoded.partition(":")
    # RFC 6749 §2.3.1: both halves are form-urlencoded before base64.
    return unquote_plus(client_id), unquote_plus(secret), "client_secret_basic"


def pkce_matches(verifier: str, challenge: str) -> bool:
    """RFC 7636 §4.6 for S256."""
    if not _PKCE_VALUE.fullmatch(verifier):
        return False
    computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return hmac.compare_digest(computed.rstrip(b"=").decode(), challenge)


# -- answers -------------------------------------------------------------------------------------


def redirect(uri: str, **params: str | None) -> web.Response:
    """A 302 to `uri` with the given parameters added to its query."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    location = f"{uri}{'&' if '?' in uri else '?'}{query}" if query else uri
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def oauth_error(exc: OAuthError) -> web.Response:
    """The JSON error answer (RFC 6749 §5.2), with its challenge on a 401."""
    payload = {"error": exc.error}
    if str(exc):
        payload["error_description"] = str(exc)
    headers = {"Cache-Control": "no-store"}
    if exc.challenge is not None:
        headers["WWW-Authenticate"] = exc.challenge
    return web.json_response(payload, status=exc.status, headers=headers)


async def post_form(url: str, form: dict[str, str]) -> int:
    """POST a form; the receiver's status, or 0 when it could not be reached."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.post(url, data=form) as response,
        ):
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


# -- loopback ------------------------------------------------------------------------------------


def require_loopback(host: str) -> None:
    """Refuse any listening address but loopback: this provider has demo passwords."""
    if host != "localhost" and not is_loopback(host):
        raise ValueError(f"the dev IdP listens on loopback only, not on {host!r}")


def is_loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback
