"""The HTTP/1.1 client that forwards requests to upstreams (SPEC §4.6).

    Origin.of(base_url, ssl, server_name, connect_timeout, read_timeout)
    UpstreamClient().request(origin, method, target, headers, body) -> UpstreamResponse
        .status .reason .headers .content (a StreamReader) .content_length
        .release()              the connection back to the pool when it can serve again
    UpstreamError               no answer: UpstreamUnreachable, UpstreamTLSError,
                                UpstreamTimeout (also a TimeoutError)

Why not aiohttp's ClientSession: measured (bench/lean_proxy.py), a minimal aiohttp proxy
spends about half its CPU in ClientSession's request machinery (URL handling, the
ClientRequest and ClientResponse objects, automatic headers, the connector's keys, traces):
81 µs per request with it, 38 µs with a pool of connections speaking through aiohttp's own
client protocol. So everything that reads or writes HTTP stays aiohttp's, and only what a
reverse proxy needs around it is written here:

- aiohttp's `ResponseHandler` is each connection's protocol: the C parser (llhttp) that
  ClientSession uses, flow control both ways, the read timeout (restarted by every read, as
  ClientSession's `sock_read`), and a body cut short is an error on its stream, never an end;
- aiohttp's `StreamWriter` writes the request: its C serializer refuses CR or LF in the
  request line and every header, and frames a body of unknown length as chunked;
- here: a pool of idle connections per origin (the newest first; closed after IDLE_TIMEOUT,
  at most MAX_IDLE kept), the request body sent by a task of its own (an upstream may answer
  before it has read it all), 1xx answers skipped, and a connection taken back only when its
  response was read to the end and nothing says close. An idempotent request without a body
  that finds its reused connection already closed by the upstream (a keep-alive race) is sent
  once more on a new connection, as nginx does; nothing else is ever sent twice.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import ClientError, ServerDisconnectedError, StreamReader
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import HttpProcessingError, StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

IDLE_TIMEOUT = 15.0  # s an idle connection is kept (aiohttp's keepalive_timeout)
MAX_IDLE = 256  # idle connections kept per origin; more are closed when released
READ_BUFFER = 2**16  # bytes the body buffers before reading from the upstream pauses
_CHUNK = 2**16
_RETRIABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 9.2.2
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # no Content-Length: 0 added


class UpstreamError(Exception):
    """The upstream gave no usable answer."""


class UpstreamUnreachable(UpstreamError):
    def __init__(self, os_error: OSError) -> None:
        super().__init__(f"cannot connect: {os_error}")
        self.os_error = os_error


class UpstreamTLSError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError, TimeoutError):
    pass


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a route's requests go: one pool per origin."""

    host: str
    port: int
    tls: ssl.SSLContext | None  # None: plain http
    server_name: str | None  # TLS SNI and certificate name, when not the host
    authority: str  # the Host header: host[:port], the port only when not the default
    connect_timeout: float
    read_timeout: float

    @classmethod
    def of(
        cls,
        base_url: str,
        tls: ssl.SSLContext | None,
        server_name: str | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> Origin:
        url = URL(base_url)
        assert url.host is not None and url.port is not None  # settings checked the URL
        if url.scheme == "https" and tls is None:
            tls = _default_tls()
        return cls(
            host=url.host,
            port=url.port,
            tls=tls if url.scheme == "https" else None,
            server_name=server_name,
            authority=url.host_port_subcomponent or url.host,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )


class _Connection(ResponseHandler):
    """aiohttp's client protocol, plus the two checks a shared pool needs."""

    def clean(self) -> bool:
        """Open, and nothing arrived beyond the last response: fit to carry another request."""
        if not self.is_connected() or self.should_close:
            return False
        parser = self._parser  # the last response's parser (aiohttp's own attribute)
        if parser is None:
            return True
        try:
            # SECURITY: feed_eof() hands back a message the upstream began after the response
            # ended (even a partial head); should_close sees only whole ones.
            return parser.feed_eof() is None
        except Exception:
            return False

    def fail(self, error: Exception) -> None:
        """End the exchange with `error`, on the response's body too when it is being read."""
        payload = self._payload  # abort() forgets it: a body read until EOF would look whole
        self.set_exception(error)
        if payload is not None:
            payload.set_exception(error)
        self.abort()


_DEFAULT_TLS: list[ssl.SSLContext] = []


def _default_tls() -> ssl.SSLContext:
    """The system's CAs, hostnames checked: one context per process (it caches sessions)."""
    if not _DEFAULT_TLS:
        _DEFAULT_TLS.append(ssl.create_default_context())
    return _DEFAULT_TLS[0]


class UpstreamResponse:
    """A response whose head is read; its body streams from `content`. Call `release()`."""

    __slots__ = (
        "_conn",
        "_pool",
        "_released",
        "_sending",
        "content",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        pool: _Pool,
        conn: _Connection,
        sending: asyncio.Task[None] | None,
    ) -> None:
        self.status, self.reason, self.headers, self.content = status, reason, headers, content
        self._pool, self._conn, self._sending = pool, conn, sending
        self._released = False

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        conn, sending = self._conn, self._sending
        complete = self.content.is_eof() and (sending is None or sending.done())
        if sending is not None and not sending.done():
            sending.cancel()
        self._pool.in_use -= 1
        if complete and conn.clean():
            self._pool.put(conn)
        else:
            conn.close()  # SECURITY: a connection with anything unread could desync the next


@dataclass(slots=True)
class _Pool:
    idle: deque[tuple[float, _Connection]] = field(default_factory=deque)
    in_use: int = 0  # connections out with a request: the sweeper keeps the pool for them

    def take(self, now: float) -> _Connection | None:
        idle = self.idle
        while idle:
            released, conn = idle.pop()
            if now - released < IDLE_TIMEOUT and conn.clean():
                return conn
            conn.close()
        return None

    def put(self, conn: _Connection) -> None:
        if len(self.idle) >= MAX_IDLE:
            conn.close()
            return
        self.idle.append((time.monotonic(), conn))

    def sweep(self, now: float) -> None:
        idle = self.idle
        while idle and (now - idle[0][0] >= IDLE_TIMEOUT or not idle[0][1].is_connected()):
            idle.popleft()[1].close()

    def close(self) -> None:
        while self.idle:
            self.idle.pop()[1].close()


class UpstreamClient:
    def __init__(self) -> None:
        self._pools: dict[Origin, _Pool] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: StreamReader | None,
    ) -> UpstreamResponse:
        """Send the request (`target`: the encoded path and query); its response's head.

        `headers` is handed over: the body's framing is added to it (Content-Length: 0, or
        Transfer-Encoding: chunked), and Host when it has none; it must hold no
        Transfer-Encoding of its own."""
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool()
            self._sweep_later()
        _frame(method, headers, origin.authority, body)
        line = f"{method} {target} HTTP/1.1"
        for attempt in (0, 1):
            conn = pool.take(time.monotonic()) if attempt == 0 else None  # a retry: a new one
            reused = conn is not None
            if conn is None:
                conn = await _connect(origin)
            pool.in_use += 1
            try:
                return await self._exchange(pool, conn, origin, line, headers, body)
            except BaseException as exc:
                pool.in_use -= 1
                conn.close()  # also when cancelled (the client went away): nothing may reuse it
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout("the upstream did not answer in time") from exc
                if not isinstance(exc, ClientError | HttpProcessingError | OSError):
                    raise
                retry = body is None and method in _RETRIABLE and _closed_early(exc)
                if attempt == 0 and reused and retry:
                    continue  # the upstream closed its idle end as we sent: a new connection
                raise UpstreamError(f"the upstream failed to answer: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def _exchange(
        self,
        pool: _Pool,
        conn: _Connection,
        origin: Origin,
        line: str,
        headers: CIMultiDict[str],
        body: StreamReader | None,
    ) -> UpstreamResponse:
        conn.set_response_params(
            skip_payload=line.startswith("HEAD "),
            read_until_eof=True,
            auto_decompress=False,
            read_timeout=origin.read_timeout,
            read_bufsize=READ_BUFFER,
        )
        writer = StreamWriter(conn, asyncio.get_running_loop())
        if body is not None and "Content-Length" not in headers:
            writer.enable_chunking()
        try:
            await writer.write_headers(line, headers)
        except ValueError as exc:
            # SECURITY: aiohttp's serializer refuses CR or LF in a header: no header splitting.
            raise UpstreamError(f"a header could not be sent: {exc}") from None
        sending = None
        if body is None:
            conn.start_timeout()
            writer.set_eof()
        else:
            sending = asyncio.get_running_loop().create_task(
                _send_body(conn, writer, body, origin.read_timeout)
            )
        try:
            while True:
                message, payload = await conn.read()
                if not 100 <= message.code <= 199:
                    break  # 1xx (100 Continue, 103 Early Hints) precede the answer
                if message.code == 101:
                    # SECURITY: this client never asks for an upgrade; relaying a 101 would
                    # make the client's connection a tunnel past the gateway.
                    raise UpstreamError("the upstream switched protocols unasked")
            codings = message.headers.getall("Transfer-Encoding", ())
            if codings and ",".join(codings).replace(" ", "").lower() != "chunked":
                # A body still under a coding (`gzip, chunked`) would reach the client with
                # nothing to say so once the chunks are undone: refused, not corrupted.
                raise UpstreamError(f"a transfer-coding the gateway does not undo: {codings}")
        except BaseException:
            if sending is not None:
                sending.cancel()
            raise
        return UpstreamResponse(
            message.code, message.reason, message.headers, payload, pool, conn, sending
        )

    def _sweep_later(self) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(IDLE_TIMEOUT, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for origin, pool in list(self._pools.items()):
            pool.sweep(now)
            if not pool.idle and not pool.in_use:  # an origin a reload replaced goes with it
                del self._pools[origin]
        self._sweeper = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._sweep)


def _closed_early(exc: BaseException) -> bool:
    """The connection ended before any answer: the upstream had closed it while idle."""
    if isinstance(exc, ServerDisconnectedError):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)


def _frame(
    method: str, headers: CIMultiDict[str], authority: str, body: StreamReader | None
) -> None:
    if "Host" not in headers:
        headers["Host"] = authority
    if body is not None and "Content-Length" not in headers:
        headers["Transfer-Encoding"] = "chunked"
    elif body is None and method not in _BODYLESS and "Content-Length" not in headers:
        headers["Content-Length"] = "0"


async def _connect(origin: Origin) -> _Connection:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(origin.connect_timeout):
            _, conn = await loop.create_connection(
                lambda: _Connection(loop),
                origin.host,
                origin.port,
                ssl=origin.tls,
                server_hostname=(origin.server_name or origin.host) if origin.tls else None,
            )
    except TimeoutError as exc:
        raise UpstreamTimeout("the upstream did not accept a connection in time") from exc
    except ssl.SSLError as exc:  # SSLCertVerificationError included
        raise UpstreamTLSError(str(exc)) from exc
    except OSError as exc:
        raise UpstreamUnreachable(exc) from exc
    return conn


async def _send_body(
    conn: _Connection, writer: StreamWriter, body: StreamReader, stall: float
) -> None:
    """Stream the client's body upstream; a failure (the client went away, or the upstream
    takes nothing for `stall` seconds) ends the exchange, the response's body included."""
    try:
        async for chunk in body.iter_chunked(_CHUNK):
            async with asyncio.timeout(stall):  # waits only while the upstream is not reading
                await writer.write(chunk)
        async with asyncio.timeout(stall):
            await writer.write_eof()
        conn.start_timeout()
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        conn.fail(UpstreamTimeout("the upstream stopped reading the request body"))
    except Exception as exc:
        # SECURITY: a body cut short must never look complete upstream: the connection dies.
        conn.fail(UpstreamError(f"the request body broke off: {exc!r}"))
