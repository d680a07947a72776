"""Forwarding to upstreams (SPEC §4.6): headers, streaming bodies, WebSockets, timeouts.

Plain HTTP goes through `gateway.upstream.UpstreamClient`: a keep-alive pool per
upstream origin on aiohttp's client protocol, with nothing shared between users but
connections (no cookie jar: a shared jar would replay one user's upstream cookies on
another user's request), no redirects followed, no decompression. WebSockets go
through one `ClientSession` (`ws_connect`), likewise without a cookie jar. Bodies are
streamed chunk by chunk both ways, so a 1 GiB transfer never sits in memory. The
request target is built already encoded, so the upstream receives exactly the
canonical path that routing (and later policy) saw.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.addresses import Addresses
from gateway.cookies import Cookies
from gateway.errors import BadGateway, BadRequest, GatewayTimeout
from gateway.paths import Target, segment_count, strip_segments
from gateway.upstream import (
    Origin,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    UpstreamTLSError,
    UpstreamUnreachable,
)

log = logging.getLogger("gateway.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# SECURITY: identity and routing headers a client could forge (SPEC §7), removed in every
# spelling ('_' for '-', any case), plus the ones the gateway sets itself.
_FORGEABLE = frozenset(
    {
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "remote-user",
        "remote-groups",
        "remote-email",
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-prefix",
        "x-forwarded-port",
        "x-forwarded-uri",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "host",
        "expect",  # answered by the gateway itself; an upstream that never sends 100 would stall
    }
)
_FORGEABLE_PREFIXES = ("x-auth-request-", "x-gateway-")
_WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)
_CHUNK = 64 * 1024


class RouteUpstream(Protocol):
    """The parts of a configured route the proxy needs (settings.Route has them)."""

    @property
    def id(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def strip_prefix(self) -> bool: ...
    @property
    def websocket(self) -> bool: ...
    @property
    def timeout(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Upstream:
    """A route's upstream, compiled once per config load."""

    route_id: str
    base: str  # scheme://host:port[/base-path], no trailing slash
    strip: int  # leading path segments removed (strip_prefix)
    ssl: ssl.SSLContext | None  # None for http://
    server_name: str | None
    websocket: bool
    origin: Origin
    base_path: str  # the base URL's path, without a trailing slash ("" for none)

    def url(self, target: Target) -> URL:
        # SECURITY: encoded=True: no URL library may re-normalize the path the policy saw.
        return URL(self.base + self.target(target), encoded=True)

    def target(self, target: Target) -> str:
        """The request target sent upstream: base path, the (stripped) path, the query."""
        path = strip_segments(target.path, self.strip)
        query = "?" + target.query if target.query else ""
        return self.base_path + path + query


def compile_upstream(
    route: RouteUpstream, base: str, tls: ssl.SSLContext | None, server_name: str | None
) -> Upstream:
    base = base.rstrip("/")
    return Upstream(
        route_id=route.id,
        base=base,
        strip=segment_count(route.path) if route.strip_prefix else 0,
        ssl=tls,
        server_name=server_name,
        websocket=route.websocket,
        origin=Origin.of(base, tls, server_name, route.timeout, route.timeout),
        base_path=URL(base).raw_path.rstrip("/"),
    )


def upstream_tls_context(
    ca_file: str | None, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext:
    """Verified TLS to an upstream: system CAs or `ca_file`, a client certificate for mTLS."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


Guard = Callable[[], Awaitable[None]]


class Forward(NamedTuple):  # per request: built 3x faster than a frozen dataclass
    """Everything the proxy needs to know about one request, decided by earlier stages."""

    upstream: Upstream
    target: Target
    host: str  # the matched (normalized) host
    addresses: Addresses
    request_id: str
    # Returns when a long-lived stream (WebSocket) must close: its session ended or went idle.
    guard: Guard | None = None
    identity: tuple[tuple[str, str], ...] = ()  # X-Auth-Request-*, X-Gateway-Assertion (§7)


class Proxy:
    def __init__(self, scheme: str, cookies: Cookies | None = None) -> None:
        self.scheme = scheme  # of our own listener: X-Forwarded-Proto
        self._cookies = cookies  # the gateway's own cookies, kept from upstreams
        self._client: aiohttp.ClientSession | None = None  # WebSockets only
        self._upstreams = UpstreamClient()

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(
            # SECURITY: no cookie jar: one user's upstream cookies must never reach another user.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=10),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        await self._upstreams.close()
        if self._client is not None:
            await self._client.close()

    async def forward(self, request: web.BaseRequest, fwd: Forward) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if not fwd.upstream.websocket:
                raise BadRequest(
                    "WebSockets are not enabled on this route", reason="websocket-not-allowed"
                )
            return await self._websocket(request, fwd)
        return await self._http(request, fwd)

    async def _http(self, request: web.BaseRequest, fwd: Forward) -> web.StreamResponse:
        up = fwd.upstream
        try:
            upstream = await self._upstreams.request(
                up.origin,
                request.method,
                up.target(fwd.target),
                self._request_headers(request, fwd),
                request.content if request.body_exists else None,
            )
        except UpstreamError as exc:
            raise _upstream_error(exc, fwd) from None
        try:
            return await self._relay(request, upstream, fwd)
        finally:
            upstream.release()

    async def _relay(
        self, request: web.BaseRequest, upstream: UpstreamResponse, fwd: Forward
    ) -> web.StreamResponse:
        # A body of known length lets the headers ride with its first chunk: one write, not two.
        # Streams of unknown length (server-sent events, long polls) get their headers at once.
        kind = _FixedLength if upstream.content_length is not None else web.StreamResponse
        response = kind(
            status=upstream.status,
            reason=upstream.reason,
            headers=_response_headers(upstream.headers, fwd.request_id, self._cookies),
        )
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                await response.write(chunk)
            await response.write_eof()  # now, not after the handler: body_length is the record's
        except ConnectionResetError:
            pass  # the client went away; releasing the upstream response closes that side too
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning(
                "route %s: upstream broke off the response body: %r",
                fwd.upstream.route_id,
                exc,
                extra={"request_id": fwd.request_id},
            )
            # SECURITY: never end a truncated body cleanly (a final chunk would make it look whole).
            if request.transport is not None:
                request.transport.abort()
        return response

    def _request_headers(self, request: web.BaseRequest, fwd: Forward) -> CIMultiDict[str]:
        named = _connection_tokens(request.headers)
        # Host first, as clients send it: the upstream's own authority (the client's is in
        # X-Forwarded-Host).
        headers: CIMultiDict[str] = CIMultiDict(Host=fwd.upstream.origin.authority)
        for name, value in request.headers.items():
            verdict = _VERDICTS.get(name)
            if verdict is None:
                verdict = _verdict(name)
            if verdict is _DROP or (named and name.lower() in named):
                continue
            if verdict is _COOKIE and self._cookies is not None:
                value = self._cookies.without_ours(value)  # type: ignore[assignment]
                if value is None:
                    continue
            headers.add(name, value)
        # Added after filtering, which dropped every client copy of these (they are forgeable),
        # so `add` cannot duplicate one, and a client naming them in Connection cannot remove them.
        headers.add("X-Forwarded-For", fwd.addresses.forwarded_for)
        headers.add("X-Forwarded-Proto", self._proto(request, fwd))
        headers.add("X-Forwarded-Host", fwd.host)
        headers.add("X-Request-Id", fwd.request_id)
        for name, value in fwd.identity:
            headers.add(name, value)
        return headers

    def _proto(self, request: web.BaseRequest, fwd: Forward) -> str:
        if fwd.addresses.peer_trusted:
            claimed = request.headers.get("X-Forwarded-Proto", "").lower()
            if claimed in ("http", "https"):
                return claimed
        return self.scheme

    async def _websocket(self, request: web.BaseRequest, fwd: Forward) -> web.StreamResponse:
        assert self._client is not None
        up = fwd.upstream
        headers = self._request_headers(request, fwd)
        for name in _WS_HANDSHAKE:
            headers.popall(name, None)
        protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
        ]
        try:
            async with asyncio.timeout(up.origin.read_timeout):  # the route's, for the handshake
                upstream = await self._client.ws_connect(
                    up.url(fwd.target),
                    headers=headers,
                    protocols=[p for p in protocols if p],
                    autoclose=False,
                    autoping=False,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
                    ssl=up.ssl if up.ssl is not None else True,
                    server_hostname=up.server_name,
                    max_msg_size=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise BadGateway(
                f"the upstream refused the WebSocket handshake ({exc.status})",
                reason="upstream-error",
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _upstream_error(exc, fwd) from None
        client = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (),
            autoclose=False,
            autoping=False,
            compress=False,
            max_msg_size=0,
        )
        client.headers["X-Request-Id"] = fwd.request_id
        try:
            await client.prepare(request)
            await relay_websocket(client, upstream, fwd.guard)
        finally:
            await upstream.close()
        return client


class _FixedLength(web.StreamResponse):
    _send_headers_immediately = False  # aiohttp then sends them with the first body write


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def relay_websocket(
    client: web.WebSocketResponse,
    upstream: aiohttp.ClientWebSocketResponse,
    guard: Guard | None = None,
) -> None:
    """Relay frames both ways until either side closes (the close code crosses over), or until
    `guard` returns: then both sides are closed with 1008 (policy violation)."""
    finished = asyncio.Event()
    ended_by_guard = False

    async def watch() -> None:
        nonlocal ended_by_guard
        assert guard is not None
        await guard()
        ended_by_guard = True
        finished.set()

    async def pump(source: WebSocket, sink: WebSocket) -> None:
        try:
            await _pump(source, sink)
        except (ConnectionError, aiohttp.ClientError):
            pass  # one side vanished: the relay ends and closes the other
        finally:
            finished.set()

    async with asyncio.TaskGroup() as group:
        pumps = [
            group.create_task(pump(client, upstream), name="websocket client->upstream"),
            group.create_task(pump(upstream, client), name="websocket upstream->client"),
        ]
        if guard is not None:
            pumps.append(group.create_task(watch(), name="websocket session guard"))
        await finished.wait()
        for task in pumps:
            task.cancel()
    if ended_by_guard:
        await upstream.close(code=1008, message=b"session ended")
        await client.close(code=1008, message=b"session ended")
    await client.close()


async def _pump(source: WebSocket, sink: WebSocket) -> None:
    while True:  # not `async for`: it swallows the CLOSE message and its code
        message = await source.receive()
        kind = message.type
        if kind is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif kind is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif kind is WSMsgType.PING:
            await sink.ping(message.data)
        elif kind is WSMsgType.PONG:
            await sink.pong(message.data)
        elif kind is WSMsgType.CLOSE:
            await source.close()
            await sink.close(code=_close_code(message.data), message=(message.extra or "").encode())
            return
        else:
            return  # CLOSED / ERROR: the relay ends and closes both sides


def _close_code(code: object) -> int:
    """A close code that may be sent on (1005/1006 only ever describe a close, never travel)."""
    if isinstance(code, int) and (1000 <= code <= 1014 or 3000 <= code <= 4999):
        return code if code not in (1004, 1005, 1006) else 1000
    return 1000


def _response_headers(
    upstream: CIMultiDictProxy[str], request_id: str, cookies: Cookies | None
) -> CIMultiDict[str]:
    named = _connection_tokens(upstream)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        key = name.lower()
        relayable = _RELAYABLE.get(name)
        if relayable is None:
            relayable = _relayable(name)
        if not relayable or key in named:
            continue
        # SECURITY: an upstream may not set (or overwrite) the gateway's own cookies.
        if key == "set-cookie" and cookies is not None and _cookie_name(value) in cookies.names:
            continue
        headers.add(name, value)
    headers["X-Request-Id"] = request_id
    return headers


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.1: a field name
_RELAYABLE: dict[str, bool] = {}  # upstream header name -> relayed to the client


def _relayable(name: str) -> bool:
    # SECURITY: aiohttp's response parser is lenient: `Content-Length : 5` (a space before
    # the colon) is read, and relayed beside our own framing it would hand a CL.TE smuggle
    # to a lenient hop in front of us (RFC 9112 5.1: a proxy must not pass it on as is).
    relayable = name.lower() not in HOP_BY_HOP and _TOKEN.fullmatch(name) is not None
    if len(_RELAYABLE) < 4096:  # header names are few; an upstream cannot grow this unbounded
        _RELAYABLE[name] = relayable
    return relayable


def _cookie_name(set_cookie: str) -> str:
    return set_cookie.split("=", 1)[0].strip()


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    if not values or (len(values) == 1 and values[0].lower() in ("keep-alive", "close")):
        return _NOTHING  # the usual case: it names only hop-by-hop headers anyway
    return frozenset(t.strip().lower() for v in values for t in v.split(","))


_NOTHING: frozenset[str] = frozenset()


def _forgeable(key: str) -> bool:
    key = key.replace("_", "-")
    return key in _FORGEABLE or key.startswith(_FORGEABLE_PREFIXES)


# What to do with a request header, by its name as sent: decided once per spelling.
_KEEP, _DROP, _COOKIE = object(), object(), object()
_VERDICTS: dict[str, object] = {}


def _verdict(name: str) -> object:
    key = name.lower()
    if key in HOP_BY_HOP or _forgeable(key):
        verdict = _DROP
    else:
        verdict = _COOKIE if key == "cookie" else _KEEP
    if len(_VERDICTS) < 4096:  # header names are few; never let a client grow this unbounded
        _VERDICTS[name] = verdict
    return verdict


def _upstream_error(exc: BaseException, fwd: Forward) -> Exception:
    route, extra = fwd.upstream.route_id, {"request_id": fwd.request_id}
    if isinstance(exc, aiohttp.ClientSSLError | UpstreamTLSError):
        log.warning(
            "route %s: TLS to upstream %s failed: %s (an internal CA goes in upstream_tls.ca_file)",
            route,
            fwd.upstream.base,
            exc,
            extra=extra,
        )
        return BadGateway("the upstream's TLS certificate was not accepted", reason="upstream-tls")
    if isinstance(exc, TimeoutError):
        log.warning("route %s: upstream %s timed out", route, fwd.upstream.base, extra=extra)
        return GatewayTimeout("the upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError | UpstreamUnreachable):
        log.warning(
            "route %s: upstream %s unreachable: %s",
            route,
            fwd.upstream.base,
            exc.os_error,
            extra=extra,
        )
        return BadGateway("the upstream could not be reached")
    log.warning("route %s: upstream %s failed: %r", route, fwd.upstream.base, exc, extra=extra)
    return BadGateway("the upstream failed to answer", reason="upstream-error")
