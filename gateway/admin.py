"""The admin API (SPEC §11): its own listener, bearer tokens with roles, every call an event.

    await AdminApi.open(settings) -> AdminApi | None  reads admin.tokens_file; None: no admin:
      .start(gateway) / .stop()                        the listener on admin.listen (TLS optional,
                                                       client certificates with client_ca_file)
      .reload_tokens()                                 re-reads the file; on error the old stays
    read_tokens(path) -> tuple[AdminToken, ...]       one `name:role:sha256hex` per line

Every call, in order: request id -> bearer token (401) -> endpoint (400, 404, 405) -> role
(403) -> handler; then one `admin.<action>` event naming the token as `actor` (or
"anonymous"), the method, path, status and outcome, whatever happened. Roles are ranked
read < operate < admin. What each call does is in gateway.admincalls.

    TokensFileError       the tokens file cannot be read, or a line of it is malformed
    GatewayError          (gateway.errors) answered as JSON with the request id; here
                          mostly Unauthorized 401, Forbidden 403, Conflict 409
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

from gateway.admincalls import ENDPOINTS, Call, Endpoint, Role
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
)
from gateway.events import Event, emit
from gateway.pages import json_response
from gateway.requestid import RequestIds
from gateway.settings import Admin, AdminTls, Settings
from gateway.types import GatewayState

log = logging.getLogger("gateway.admin")

_RANK: dict[str, int] = {"read": 1, "operate": 2, "admin": 3}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PATH_SHOWN = 512  # characters of a request path kept in an event


class TokensFileError(Exception):
    """`admin.tokens_file` is unusable; the message names the file (and line) and the fix."""


# -- tokens ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str  # the actor in events
    role: Role
    digest: bytes = field(repr=False)  # SHA-256 of the token; the token itself is never stored


def parse_tokens(text: str, source: str) -> tuple[AdminToken, ...]:
    """The tokens of a file's text; TokensFileError names `source:LINE` of the first bad line."""
    tokens: list[AdminToken] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.partition("#")[0].strip()  # no name, role or hex digit holds a '#'
        if line:
            tokens.append(_parse_line(line, f"{source}:{number}"))
    _check_unique(tokens, source)
    return tuple(tokens)


def _parse_line(line: str, where: str) -> AdminToken:
    # Messages never echo the third field: a token pasted there by mistake stays out of logs.
    parts = [part.strip() for part in line.split(":")]
    if len(parts) != 3:
        raise TokensFileError(
            f"{where}: expected name:role:sha256-of-token, got {len(parts)} field(s)"
        )
    name, role, digest = parts
    if not _NAME.fullmatch(name):
        raise TokensFileError(f"{where}: bad token name: use letters, digits, '.', '_', '-', '@'")
    if role not in _RANK:
        raise TokensFileError(f"{where}: the role of {name!r} must be read, operate or admin")
    if not _SHA256_HEX.fullmatch(digest.lower()):
        raise TokensFileError(
            f"{where}: the third field of {name!r} must be the token's SHA-256 as 64 hex digits "
            "(the hash, never the token itself)"
        )
    return AdminToken(name, role, bytes.fromhex(digest))  # type: ignore[arg-type]


def _check_unique(tokens: Sequence[AdminToken], source: str) -> None:
    names = [t.name for t in tokens]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TokensFileError(f"{source}: token name {twice[0]!r} is used more than once")
    if len({t.digest for t in tokens}) != len(tokens):
        raise TokensFileError(f"{source}: two entries hold the same token hash; each needs its own")


def read_tokens(path: Path) -> tuple[AdminToken, ...]:
    """Read and parse the tokens file (blocking: call it in a thread on a running loop)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        detail = err.strerror if isinstance(err, OSError) else "it is not UTF-8 text"
        raise TokensFileError(f"{path}: cannot read the admin tokens file: {detail}") from None
    return parse_tokens(text, str(path))


def authenticate(tokens: Sequence[AdminToken], headers: Sequence[str]) -> AdminToken:
    """The token an `Authorization: Bearer` header carries; Unauthorized if none matches."""
    if not headers:
        raise Unauthorized(
            "send an admin token as 'Authorization: Bearer TOKEN'", reason="no-token"
        )
    scheme, _, presented = headers[0].strip().partition(" ")
    if len(headers) > 1 or scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("send one 'Authorization: Bearer TOKEN' header", reason="bad-token")
    digest = hashlib.sha256(presented.strip().encode("utf-8", "surrogateescape")).digest()
    found = None
    for token in tokens:
        # SECURITY: constant-time comparison with every entry and no early exit, so response
        # time reveals neither which stored hash is near the one sent nor where it matched.
        if hmac.compare_digest(token.digest, digest):
            found = token
    if found is None:
        raise Unauthorized("the admin token is not known", reason="bad-token")
    return found


# -- dispatch ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a request asks for: its endpoint and parameters, or the error that answers it."""

    endpoint: Endpoint | None = None
    params: tuple[str, ...] = ()
    error: GatewayError | None = None


def resolve(method: str, raw_path: str) -> Resolved:
    """Match the raw path (each segment percent-decoded on its own, so %2F stays in USER)."""
    try:
        segments = [unquote(s, errors="strict") for s in raw_path.split("?")[0].split("/")[1:]]
    except UnicodeDecodeError:
        return Resolved(error=BadRequest("the path is not valid UTF-8", reason="bad-path"))
    at_path = [e for e in ENDPOINTS if _params(e.path, segments) is not None]
    for endpoint in at_path:
        if method == endpoint.method or (method == "HEAD" and endpoint.method == "GET"):
            return Resolved(endpoint, _params(endpoint.path, segments) or ())
    if at_path:
        allowed = ", ".join(sorted({e.method for e in at_path}))
        return Resolved(at_path[0], error=MethodNotAllowed(f"this endpoint answers {allowed}"))
    return Resolved(error=NotFound("no such admin endpoint", reason="no-endpoint"))


def _params(pattern: tuple[str | None, ...], segments: list[str]) -> tuple[str, ...] | None:
    if len(pattern) != len(segments):
        return None
    params = []
    for want, got in zip(pattern, segments, strict=True):
        if want is None and got:
            params.append(got)
        elif want != got:
            return None
    return tuple(params)


def authorize(token: AdminToken, endpoint: Endpoint) -> None:
    # SECURITY: a token acts only up to its role (read < operate < admin): a read token that
    # leaks cannot end sessions.
    if _RANK[token.role] < _RANK[endpoint.role]:
        raise Forbidden(
            f"this call needs the {endpoint.role} role; token {token.name!r} has {token.role}"
        )


# -- the listener ------------------------------------------------------------------------------


class AdminApi:
    def __init__(self, admin: Admin, tokens: tuple[AdminToken, ...]) -> None:
        self.addresses: tuple[str, ...] = ()
        self._admin = admin
        self._tokens = tokens  # replaced whole by reload_tokens, never edited
        self._request_ids = RequestIds()
        self._gateway: GatewayState | None = None
        self._runner: web.ServerRunner | None = None

    @classmethod
    async def open(cls, settings: Settings) -> AdminApi | None:
        """The admin API of a config (tokens read now), or None without an `admin:` section."""
        if settings.admin is None:
            return None
        tokens = await asyncio.to_thread(read_tokens, settings.admin.tokens_file)
        if not tokens:
            log.warning("admin.tokens_file holds no tokens: every admin call will be refused")
        return cls(settings.admin, tokens)

    async def reload_tokens(self) -> int:
        """Re-read the tokens file; on TokensFileError the tokens in use stay. The new count."""
        tokens = await asyncio.to_thread(read_tokens, self._admin.tokens_file)
        self._tokens = tokens
        emit(Event("admin.tokens_reloaded", {"tokens": len(tokens)}))
        return len(tokens)

    async def start(
        self,
        gateway: GatewayState,
        shutdown_timeout: float = 10.0,
        port: int | None = None,  # a worker's: the port its parent reserved (gateway.supervisor)
        reuse_port: bool = False,
    ) -> None:
        self._gateway = gateway
        runner = web.ServerRunner(
            web.Server(self.handle, access_log=None),
            handle_signals=False,
            shutdown_timeout=shutdown_timeout,
        )
        await runner.setup()
        listen = self._admin.listen
        site = web.TCPSite(
            runner,
            listen.host,
            port or listen.port,
            ssl_context=admin_tls(self._admin.tls),
            reuse_port=reuse_port,
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.addresses = _bound(site)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        request_id = self._request_ids.assign(request.headers.get("X-Request-Id"))
        resolved = resolve(request.method, request.raw_path)
        call: Call | None = None
        token: AdminToken | None = None
        try:
            # SECURITY: the token is checked first, so unknown callers learn nothing, not even
            # which paths exist.
            token = authenticate(self._tokens, request.headers.getall("Authorization", []))
            if resolved.error is not None:
                raise resolved.error
            assert resolved.endpoint is not None and self._gateway is not None
            authorize(token, resolved.endpoint)
            call = Call(request, self._gateway, request_id, token, resolved.params, admin=self)
            response = await resolved.endpoint.handler(call)
            error = None
        except GatewayError as refused:
            response, error = _error_response(refused, request_id), refused
        except Exception:
            log.exception("admin call failed", extra={"request_id": request_id})
            error = GatewayError("internal error")
            response = _error_response(error, request_id)
        _record(request, resolved, token, response, error, call, request_id)
        return response


def _error_response(error: GatewayError, request_id: str) -> web.Response:
    payload = {
        "status": error.status,
        "reason": error.reason,
        "detail": error.detail,
        "request_id": request_id,
    }
    response = json_response(payload, request_id, status=error.status)
    if error.status == 401:
        challenge = 'Bearer realm="gateway-admin"'
        if error.reason == "bad-token":
            challenge += ', error="invalid_token"'
        response.headers["WWW-Authenticate"] = challenge
    return response


def _record(
    request: web.BaseRequest,
    resolved: Resolved,
    token: AdminToken | None,
    response: web.StreamResponse,
    error: GatewayError | None,
    call: Call | None,
    request_id: str,
) -> None:
    """The call's event: admin.<action>, with the token's name as actor, whatever the outcome."""
    action = resolved.endpoint.action if resolved.endpoint is not None else "request"
    fields: dict[str, object] = {
        "actor": token.name if token is not None else "anonymous",
        "role": token.role if token is not None else None,
        "method": request.method,
        "path": request.raw_path[:_PATH_SHOWN],
        "status": response.status,
        "outcome": _outcome(response.status),
        "request_id": request_id,
        "client_ip": request.remote,
    }
    if error is not None:
        fields["reason"] = error.reason
    if call is not None:
        fields.update(call.facts)
    emit(Event(f"admin.{action}", fields))


def _outcome(status: int) -> str:
    if status in (401, 403):
        return "refused"
    return "ok" if status < 400 else "failed"


def admin_tls(tls: AdminTls | None) -> ssl.SSLContext | None:
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        # SECURITY: with a client CA configured, a connection without a certificate it issued
        # ends in the handshake, before any token is even read.
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _bound(site: web.TCPSite) -> tuple[str, ...]:
    server = site._server  # the asyncio.Server: its sockets give the real port (for port 0)
    names = [s.getsockname() for s in getattr(server, "sockets", None) or []]
    return tuple(f"[{n[0]}]:{n[1]}" if ":" in n[0] else f"{n[0]}:{n[1]}" for n in names)
