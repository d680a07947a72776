"""`redis://`, `rediss://`, `redis+sentinel://`, `redis+cluster://`: the session store shared
by many gateway processes and replicas.

Expiry is Redis's own (TTLs in milliseconds), so the processes need no common clock; the
atomic operations are single commands (GETDEL, SET NX PX) or short Lua scripts. Keys:

    gw:v:{kind}:{key}   values and counters        gw:i:{kind}:{key}   index sets (ZSETs)
    gw:l:{name}         locks                      gw:c:{channel}      pub/sub channels

An index set is a sorted set scored by each member's expiry (Redis server time, ms), so
members expire one by one, like on the other stores.

`redis.asyncio.from_url` knows neither Sentinel nor Cluster, so those URLs are parsed here:

    redis+sentinel://[user:password@]host:port,host:port/service_name[/db][?sentinel_password=…]
    redis+cluster://[user:password@]host:port,host:port[?ssl=true]

A subscription holds its own connection with retries off, so a dropped link surfaces at
once: `connected` turns False, the loop reconnects with backoff, resubscribes, runs
`on_connect` and only then turns `connected` True again. A silent link (no answer to a PING
for a few seconds) counts as dropped. Every Redis failure is raised as `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.store.base import (
    OnConnect,
    StoreUnavailable,
    Subscription,
    check_kind,
    check_ttl,
)
from gateway.store.pubsub import QueueSubscription

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

_ERRORS = (RedisError, RedisClusterException, OSError)
_TIMEOUTS: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_timeout": 2.0}
_PING_EVERY = 1.0  # seconds of silence before a subscription PINGs
_DEAD_AFTER = 3.0  # seconds of silence after which a subscription's link counts as dropped
_BACKOFF = (0.05, 2.0)  # first and longest wait between resubscribe attempts
_VALUE, _INDEX, _LOCK, _CHANNEL = "gw:v:", "gw:i:", "gw:l:", "gw:c:"  # key prefixes

# INCR; the expiry is set by the first increment (or if a counter somehow has none).
_INCR = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
# SET PX if greater than the live value (or none). A live value that is not an integer in ASCII
# digits (as INCR and this script write them) is kept: refused, failing closed. Lua numbers are
# doubles, exact to 2^53; beyond, rounding may make two values equal, and the greater is then
# refused (rounding keeps order, so a smaller value never passes).
_ADVANCE = """
local live = redis.call('GET', KEYS[1])
if live then
    local integer = live == '0' or string.match(live, '^%-?[1-9][0-9]*$')
    if not integer or tonumber(live) >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# ZADD member with score = its expiry; drop expired members; the set outlives its longest.
_INDEX_ADD = (
    _NOW_MS
    + """
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now))
redis.call('ZADD', KEYS[1], string.format('%d', now + ttl), ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
"""
)
_INDEX_MEMBERS = (
    _NOW_MS + "return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%d', now), '+inf')"
)
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# -- URLs --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a Redis store URL says to connect to (passwords kept out of repr)."""

    mode: Literal["single", "sentinel", "cluster"]
    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    service: str | None = None  # sentinel: the name of the monitored master
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False


def parse_redis_url(url: str) -> RedisTarget:
    """The target of a `redis://`, `rediss://`, `redis+sentinel://` or `redis+cluster://` URL."""
    parts = urlsplit(url.strip())
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    auth = {"username": unquote(username) or None, "password": unquote(password) or None}
    if not hosts:
        raise ValueError("a Redis URL needs a host")
    path = [segment for segment in parts.path.split("/") if segment]
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss"):
        return _single(hosts, path, **auth, ssl=scheme == "rediss")
    if scheme == "redis+sentinel":
        return _sentinel(hosts, path, _options(parts.query, "sentinel_password", "ssl"), **auth)
    if scheme == "redis+cluster":
        return _cluster(hosts, path, _options(parts.query, "ssl"), **auth)
    raise ValueError(f"not a Redis URL: {scheme}://")


def _single(hosts: str, path: list[str], **common: Any) -> RedisTarget:
    if "," in hosts or len(path) > 1:
        raise ValueError("expected redis://host:port/db (one host, the database number as path)")
    db = _db(path[0]) if path else 0
    return RedisTarget("single", (_node(hosts, 6379),), db, **common)


def _sentinel(hosts: str, path: list[str], options: dict[str, str], **auth: Any) -> RedisTarget:
    if not 1 <= len(path) <= 2:
        raise ValueError("expected redis+sentinel://host:port,host:port/service_name[/db]")
    return RedisTarget(
        "sentinel",
        tuple(_node(node, 26379) for node in hosts.split(",")),
        _db(path[1]) if len(path) == 2 else 0,
        service=path[0],
        sentinel_password=options.get("sentinel_password"),
        ssl=_flag(options.get("ssl")),
        **auth,
    )


def _cluster(hosts: str, path: list[str], options: dict[str, str], **auth: Any) -> RedisTarget:
    if path not in ([], ["0"]):
        raise ValueError("a Redis cluster has only database 0: drop the path")
    nodes = tuple(_node(node, 6379) for node in hosts.split(","))
    return RedisTarget("cluster", nodes, ssl=_flag(options.get("ssl")), **auth)


def _node(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.partition(":")
    if not host or (port_text and not port_text.isdigit()):
        raise ValueError(f"bad Redis node {text!r}: expected host:port")
    port = int(port_text) if port_text else default_port
    if not 0 < port < 65536:
        raise ValueError(f"bad Redis node {text!r}: port out of range")
    return host, port


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad Redis database {text!r}: expected a number")
    return int(text)


def _options(query: str, *allowed: str) -> dict[str, str]:
    options = {name: values[-1] for name, values in parse_qs(query).items()}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown Redis URL option(s): {', '.join(unknown)}")
    return options


def _flag(text: str | None) -> bool:
    return (text or "").lower() in ("1", "true", "yes", "on")


# -- clients -----------------------------------------------------------------------------------


class _Connector:
    """Builds the store's command client, and a fresh pub/sub client per subscribe attempt."""

    def __init__(self, url: str, target: RedisTarget) -> None:
        self._url, self._target = url, target
        self._sentinel = self._sentinels() if target.mode == "sentinel" else None
        # One retry with a new connection: a pooled connection may be dead after a restart.
        self.client = self._client(Retry(NoBackoff(), 1))

    def subscriber(self, attempt: int) -> Redis:
        """A client with retries off (a drop must surface); cluster nodes taken in turn."""
        retry = Retry(NoBackoff(), 0)
        if self._target.mode == "cluster":  # PUBLISH reaches every node: any node serves
            host, port = self._target.nodes[attempt % len(self._target.nodes)]
            return Redis(host=host, port=port, retry=retry, **self._auth(), **_TIMEOUTS)
        return self._node_client(retry)

    async def close(self) -> None:
        await self.client.aclose()
        for sentinel in self._sentinel.sentinels if self._sentinel else ():
            await sentinel.aclose()

    def _client(self, retry: Retry) -> Redis | RedisCluster:
        if self._target.mode == "cluster":
            nodes = [ClusterNode(host, port) for host, port in self._target.nodes]
            return RedisCluster(startup_nodes=nodes, retry=retry, **self._auth(), **_TIMEOUTS)
        return self._node_client(retry)

    def _node_client(self, retry: Retry) -> Redis:
        """A client of the one server: the URL's, or the master the sentinels name."""
        if self._sentinel is None:
            return Redis.from_url(self._url, retry=retry, **_TIMEOUTS)
        client: Redis = self._sentinel.master_for(self._target.service or "", retry=retry)
        return client

    def _sentinels(self) -> Sentinel:
        target = self._target
        sentinel_kwargs = {"password": target.sentinel_password, "ssl": target.ssl, **_TIMEOUTS}
        return Sentinel(  # type: ignore[no-untyped-call]
            list(target.nodes),
            sentinel_kwargs=sentinel_kwargs,
            db=target.db,
            **self._auth(),
            **_TIMEOUTS,
        )

    def _auth(self) -> dict[str, Any]:
        target = self._target
        return {"username": target.username, "password": target.password, "ssl": target.ssl}


def _guarded(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """`method` with every Redis or network failure raised as StoreUnavailable."""

    @functools.wraps(method)
    async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except _ERRORS as err:
            raise StoreUnavailable() from err

    return guarded


def _ms(ttl: float) -> int:
    return max(1, math.ceil(check_ttl(ttl) * 1000))


# -- the store ---------------------------------------------------------------------------------


class RedisStore:
    """A `SessionStore` on Redis (single, Sentinel or Cluster)."""

    def __init__(self, url: str) -> None:
        self._target = parse_redis_url(url)
        self._connector = _Connector(url, self._target)
        self._redis = self._connector.client
        self._incr = self._redis.register_script(_INCR)
        self._advance = self._redis.register_script(_ADVANCE)
        self._index_add = self._redis.register_script(_INDEX_ADD)
        self._index_members = self._redis.register_script(_INDEX_MEMBERS)
        self._release = self._redis.register_script(_RELEASE)
        self._subscriptions: set[RedisSubscription] = set()

    def __repr__(self) -> str:
        return f"<RedisStore {self._target!r}>"

    @_guarded
    async def put(self, kind: str, key: str, value: bytes, ttl: float) -> None:
        await self._redis.set(_value_key(check_kind(kind), key), value, px=_ms(ttl))

    @_guarded
    async def get(self, kind: str, key: str) -> bytes | None:
        return _bytes(await self._redis.get(_value_key(kind, key)))

    @_guarded
    async def delete(self, kind: str, key: str) -> bool:
        return bool(await self._redis.delete(_value_key(kind, key)))

    @_guarded
    async def take(self, kind: str, key: str) -> bytes | None:
        return _bytes(await self._redis.getdel(_value_key(kind, key)))

    @_guarded
    async def put_if_absent(self, kind: str, key: str, value: bytes, ttl: float) -> bool:
        key = _value_key(check_kind(kind), key)
        return bool(await self._redis.set(key, value, px=_ms(ttl), nx=True))

    @_guarded
    async def incr(self, kind: str, key: str, ttl: float) -> int:
        return int(await self._incr(keys=[_value_key(check_kind(kind), key)], args=[_ms(ttl)]))

    @_guarded
    async def advance(self, kind: str, key: str, value: int, ttl: float) -> bool:
        keys = [_value_key(check_kind(kind), key)]
        # SECURITY: compare-and-set in one script: no TOTP step is accepted twice, or an older one.
        return bool(await self._advance(keys=keys, args=[str(value), _ms(ttl)]))

    @_guarded
    async def index_add(self, kind: str, key: str, member: str, ttl: float) -> None:
        await self._index_add(keys=[_index_key(check_kind(kind), key)], args=[member, _ms(ttl)])

    @_guarded
    async def index_members(self, kind: str, key: str) -> set[str]:
        members = await self._index_members(keys=[_index_key(kind, key)])
        return {member.decode() if isinstance(member, bytes) else member for member in members}

    @_guarded
    async def index_remove(self, kind: str, key: str, member: str) -> None:
        await self._redis.zrem(_index_key(kind, key), member)

    @_guarded
    async def acquire(self, name: str, ttl: float) -> str | None:
        token = secrets.token_urlsafe(16)
        taken = await self._redis.set(_LOCK + name, token, px=_ms(ttl), nx=True)
        return token if taken else None

    @_guarded
    async def release(self, name: str, token: str) -> None:
        # SECURITY: compare-and-delete in one script: only the holder's token releases.
        await self._release(keys=[_LOCK + name], args=[token])

    @_guarded
    async def publish(self, channel: str, message: bytes) -> None:
        await self._redis.publish(_CHANNEL + channel, message)

    async def subscribe(self, channel: str, *, on_connect: OnConnect | None = None) -> Subscription:
        subscription = RedisSubscription(channel, on_connect, self._drop, self._connector)
        self._subscriptions.add(subscription)
        return subscription

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except _ERRORS:
            return False

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()
        await self._connector.close()

    async def _drop(self, subscription: QueueSubscription) -> None:
        self._subscriptions.discard(subscription)


def _value_key(kind: str, key: str) -> str:
    return f"{_VALUE}{kind}:{key}"


def _index_key(kind: str, key: str) -> str:
    return f"{_INDEX}{kind}:{key}"


def _bytes(value: object) -> bytes | None:
    return bytes(value) if isinstance(value, bytes | bytearray) else None


# -- subscriptions -----------------------------------------------------------------------------


class RedisSubscription(QueueSubscription):
    """A channel followed over its own connection, resubscribed whenever the link drops."""

    def __init__(
        self,
        channel: str,
        on_connect: OnConnect | None,
        on_close: Callable[[QueueSubscription], Awaitable[None]],
        connector: _Connector,
    ) -> None:
        super().__init__(channel, on_connect, on_close)
        self._connector = connector
        self._failures = 0
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._follow(), name=f"redis subscription {channel!r}")

    async def close(self) -> None:
        await super().close()
        self._task.cancel()
        await asyncio.wait([self._task])

    async def _follow(self) -> None:
        while not self.closed:
            client = self._connector.subscriber(self._failures)
            try:
                await self._listen(client)
            except Exception as err:  # any failure: drop the link, then retry
                self._lost(err)
            finally:
                self.mark_disconnected()
                await _close_quietly(client)
            if not self.closed:
                await asyncio.sleep(self._backoff())

    async def _listen(self, client: Redis) -> None:
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(_CHANNEL + self.channel)
            await _confirmed(pubsub)
            await self.mark_connected()  # runs on_connect first
            self._failures = 0
            await self._pump(pubsub)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _pump(self, pubsub: Any) -> None:
        """Deliver messages until closed; PING when quiet; a silent link counts as dropped."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while not self.closed:
            message = await pubsub.get_message(timeout=_PING_EVERY)
            now = loop.time()
            if message is not None:
                heard = now
                if message["type"] == "message":
                    self.deliver(bytes(message["data"]))
            elif now - heard > _DEAD_AFTER:
                raise ConnectionError("no answer from Redis")
            else:
                await pubsub.ping()

    def _lost(self, err: Exception) -> None:
        self._failures += 1
        if not isinstance(err, _ERRORS):
            log.exception("subscription to %r failed; resubscribing", self.channel)
        elif self._failures == 1:
            log.warning("subscription to %r lost (%s); resubscribing", self.channel, err)

    def _backoff(self) -> float:
        first, longest = _BACKOFF
        delay = min(longest, first * 2.0 ** max(0, self._failures - 1))
        return delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret


async def _confirmed(pubsub: Any) -> None:
    """Wait for Redis to confirm the SUBSCRIBE: from then on no message is missed."""
    async with asyncio.timeout(_DEAD_AFTER):
        while True:
            message = await pubsub.get_message(timeout=_DEAD_AFTER)
            if message is not None and message["type"] == "subscribe":
                return


async def _close_quietly(client: Redis) -> None:
    try:
        await client.aclose()
    except _ERRORS:
        log.debug("closing a Redis subscription client failed", exc_info=True)
