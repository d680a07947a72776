"""One contract for every session store: memory, SQLite and Redis keep the same promises.

Expiry on memory and SQLite follows an injected clock; on Redis it is real (TTLs of a few
hundred ms, then a bounded wait for the key to go). Redis is 127.0.0.1:6379, database 13,
flushed before and after each test; without it the Redis cases are skipped, except in CI
(CI=true), where they fail.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.store import SessionStore, StoreUnavailable, open_session_store
from gateway.store import redis as redis_store
from gateway.store.redis import RedisStore, RedisTarget, parse_redis_url
from gateway.store.sqlite import SqliteStore, sqlite_path
from tests.conftest import IN_CI, redis_admin

REDIS_URL = "redis://127.0.0.1:6379/13"
WAIT = 5.0  # ceiling of every bounded wait


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """A store under test, and how time passes for it."""

    name: str
    store: SessionStore
    clock: Clock | None  # None: Redis, whose clock is its own and real
    opener: Callable[[], Awaitable[SessionStore]]
    peers: list[SessionStore] = field(default_factory=list)

    @property
    def real_time(self) -> bool:
        return self.clock is None

    async def peer(self) -> SessionStore:
        """Another store on the same state, as another process would open it."""
        peer = await self.opener()
        self.peers.append(peer)
        return peer

    async def advance(self, seconds: float) -> None:
        """Let `seconds` pass: move the clock, or (Redis) really wait."""
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    async def until(self, condition: Callable[[], Awaitable[bool]], after: float) -> float:
        """Seconds until `condition` holds once `after` seconds have passed (bounded)."""
        start = time.monotonic()
        if self.clock is not None:
            self.clock.now += after
            assert await condition()
            return after
        async with asyncio.timeout(WAIT):
            while not await condition():
                await asyncio.sleep(0.01)
        return time.monotonic() - start


@pytest.fixture
async def admin() -> AsyncIterator[Redis]:
    client = await redis_admin(REDIS_URL)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


async def _harness(name: str, tmp_path: Path) -> tuple[Harness, Redis | None]:
    clock = Clock()
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path}/state.db"}.get(name, REDIS_URL)
    admin = await redis_admin(REDIS_URL) if name == "redis" else None
    if admin is not None:
        await admin.flushdb()
    first = await open_session_store(url, clock=clock)

    async def opener() -> SessionStore:
        # One process's memory is not shared: the memory store's "peer" is itself.
        return first if name == "memory" else await open_session_store(url, clock=clock)

    return Harness(name, first, None if admin else clock, opener), admin


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    harness, admin = await _harness(request.param, tmp_path)
    yield harness
    for store in {id(s): s for s in [harness.store, *harness.peers]}.values():
        await store.close()
    if admin is not None:
        await admin.flushdb()
        await admin.aclose()


# -- values ------------------------------------------------------------------------------------


async def test_put_get_and_overwrite(harness: Harness) -> None:
    store = harness.store
    assert await store.get("session", "a") is None
    await store.put("session", "a", b"one", 60)
    assert await store.get("session", "a") == b"one"
    await store.put("session", "a", b"two", 60)
    assert await store.get("session", "a") == b"two"


async def test_values_are_opaque_bytes(harness: Harness) -> None:
    binary = bytes(range(256)) * 4
    await harness.store.put("session", "bin", binary, 60)
    await harness.store.put("session", "empty", b"", 60)
    assert await harness.store.get("session", "bin") == binary
    assert await harness.store.get("session", "empty") == b""


async def test_kinds_and_keys_are_separate(harness: Harness) -> None:
    store = harness.store
    await store.put("session", "a:b", b"1", 60)
    await store.put("login", "a:b", b"2", 60)
    await store.put("session", "a", b"3", 60)
    await store.put("session", "ünï/cödé key", b"4", 60)
    assert await store.get("session", "a:b") == b"1"
    assert await store.get("login", "a:b") == b"2"
    assert await store.get("session", "a") == b"3"
    assert await store.get("session", "ünï/cödé key") == b"4"
    assert await store.get("session", "b") is None


async def test_a_value_expires_after_its_ttl(harness: Harness) -> None:
    store = harness.store
    await store.put("session", "a", b"x", 0.2)
    await store.put("session", "b", b"y", 60)
    assert await store.get("session", "a") == b"x"

    async def gone() -> bool:
        return await store.get("session", "a") is None

    await harness.until(gone, after=0.25)
    assert await store.get("session", "b") == b"y"
    assert await store.take("session", "a") is None
    assert await store.delete("session", "a") is False


async def test_delete(harness: Harness) -> None:
    store = harness.store
    await store.put("session", "a", b"x", 60)
    assert await store.delete("session", "a") is True
    assert await store.get("session", "a") is None
    assert await store.delete("session", "a") is False
    assert await store.delete("session", "never") is False


async def test_take_returns_the_value_once(harness: Harness) -> None:
    store = harness.store
    await store.put("handoff", "code", b"x", 30)
    assert await store.take("handoff", "code") == b"x"
    assert await store.take("handoff", "code") is None
    assert await store.get("handoff", "code") is None
    assert await store.take("handoff", "never") is None


async def test_of_concurrent_takers_exactly_one_wins(harness: Harness) -> None:
    stores = [harness.store, await harness.peer()]
    for round_ in range(10):
        await harness.store.put("handoff", f"code{round_}", b"x", 30)
        takes = [stores[i % 2].take("handoff", f"code{round_}") for i in range(4)]
        results = await asyncio.gather(*takes)
        assert sorted(results, key=bool) == [None, None, None, b"x"]


async def test_put_if_absent(harness: Harness) -> None:
    store = harness.store
    assert await store.put_if_absent("jti", "a", b"first", 0.2) is True
    assert await store.put_if_absent("jti", "a", b"second", 0.2) is False
    assert await store.get("jti", "a") == b"first"

    async def free_again() -> bool:
        return await store.put_if_absent("jti", "a", b"third", 60)

    await harness.until(free_again, after=0.25)
    assert await store.get("jti", "a") == b"third"


async def test_of_concurrent_put_if_absent_exactly_one_stores(harness: Harness) -> None:
    stores = [harness.store, await harness.peer()]
    for round_ in range(10):
        puts = [stores[i % 2].put_if_absent("jti", f"j{round_}", b"%d" % i, 60) for i in range(6)]
        results = await asyncio.gather(*puts)
        assert results.count(True) == 1
        assert await harness.store.get("jti", f"j{round_}") == b"%d" % results.index(True)


# -- counters ----------------------------------------------------------------------------------


async def test_incr_counts_and_reads_as_a_value(harness: Harness) -> None:
    store = harness.store
    assert [await store.incr("totp-fail", "alice", 60) for _ in range(3)] == [1, 2, 3]
    assert await store.get("totp-fail", "alice") == b"3"
    assert await store.incr("totp-fail", "bob", 60) == 1
    assert await store.delete("totp-fail", "alice") is True
    assert await store.incr("totp-fail", "alice", 60) == 1


async def test_incr_expires_ttl_after_the_first_increment(harness: Harness) -> None:
    store = harness.store
    start = time.monotonic()
    assert await store.incr("lockout", "alice", 0.4) == 1
    await harness.advance(0.25)
    assert await store.incr("lockout", "alice", 0.4) == 2  # must not push the expiry out

    async def gone() -> bool:
        return await store.get("lockout", "alice") is None

    await harness.until(gone, after=0.2)
    if harness.real_time:
        assert time.monotonic() - start < 0.6  # by 0.65 s if the second incr had extended it
    assert await store.incr("lockout", "alice", 0.4) == 1


async def test_concurrent_increments_are_all_counted(harness: Harness) -> None:
    stores = [harness.store, await harness.peer()]
    counts = await asyncio.gather(*(stores[i % 2].incr("rate", "ip", 60) for i in range(20)))
    assert sorted(counts) == list(range(1, 21))


# -- advance (the last accepted TOTP step) ----------------------------------------------------


async def test_advance_stores_a_first_value_and_then_only_greater_ones(harness: Harness) -> None:
    store = harness.store
    assert await store.advance("totp-step", "alice", -5, 60) is True  # any int: only compared
    assert await store.get("totp-step", "alice") == b"-5"
    assert await store.advance("totp-step", "alice", 0, 60) is True
    assert await store.advance("totp-step", "alice", 56_666_666, 60) is True
    assert await store.get("totp-step", "alice") == b"56666666"
    assert await store.advance("totp-step", "bob", 3, 60) is True  # another key: its own value


async def test_advance_refuses_an_equal_or_smaller_value(harness: Harness) -> None:
    store = harness.store
    assert await store.advance("totp-step", "alice", 123, 60) is True
    assert await store.advance("totp-step", "alice", 123, 60) is False  # a replayed code
    assert await store.advance("totp-step", "alice", 122, 60) is False  # an older code
    assert await store.advance("totp-step", "alice", -1, 60) is False
    assert await store.get("totp-step", "alice") == b"123"


async def test_advance_refuses_over_a_live_value_that_is_no_integer(harness: Harness) -> None:
    store = harness.store
    for raw in (b"not a number", b"", b"007", b" 12", b"-0", b"1.5", b"\xff"):
        await store.put("totp-step", "alice", raw, 60)
        assert await store.advance("totp-step", "alice", 10**9, 60) is False  # fails closed
        assert await store.get("totp-step", "alice") == raw


async def test_advance_accepts_a_smaller_value_once_the_ttl_expired(harness: Harness) -> None:
    store = harness.store
    assert await store.advance("totp-step", "alice", 100, 0.2) is True
    assert await store.advance("totp-step", "alice", 50, 60) is False

    async def free_again() -> bool:
        return await store.advance("totp-step", "alice", 50, 60)

    await harness.until(free_again, after=0.25)
    assert await store.get("totp-step", "alice") == b"50"
    assert await store.advance("totp-step", "alice", 50, 60) is False  # stored for 60 s now


async def test_of_concurrent_advances_with_one_value_exactly_one_stores(harness: Harness) -> None:
    stores = [harness.store, await harness.peer()]
    for round_ in range(5):
        calls = [stores[i % 2].advance("totp-step", f"u{round_}", 777, 60) for i in range(20)]
        assert (await asyncio.gather(*calls)).count(True) == 1
        assert await harness.store.get("totp-step", f"u{round_}") == b"777"


async def test_concurrent_advances_end_at_the_greatest_value(harness: Harness) -> None:
    stores = [harness.store, await harness.peer()]
    values = [(i * 37) % 20 for i in range(20)]  # 0..19, shuffled
    calls = [stores[i % 2].advance("totp-step", "alice", v, 60) for i, v in enumerate(values)]
    results = await asyncio.gather(*calls)
    assert results[values.index(19)] is True
    assert await harness.store.get("totp-step", "alice") == b"19"


async def test_delete_removes_an_advanced_value(harness: Harness) -> None:
    store = harness.store
    assert await store.advance("totp-step", "alice", 9, 60) is True
    assert await store.delete("totp-step", "alice") is True
    assert await store.get("totp-step", "alice") is None
    assert await store.advance("totp-step", "alice", 1, 60) is True


# -- index sets --------------------------------------------------------------------------------


async def test_index_add_members_remove(harness: Harness) -> None:
    store = harness.store
    assert await store.index_members("user-sessions", "alice") == set()
    await store.index_add("user-sessions", "alice", "s1", 60)
    await store.index_add("user-sessions", "alice", "s2", 60)
    await store.index_add("user-sessions", "alice", "s2", 60)
    await store.index_add("user-sessions", "bob", "s3", 60)
    await store.index_add("sid-sessions", "alice", "s4", 60)
    assert await store.index_members("user-sessions", "alice") == {"s1", "s2"}
    await store.index_remove("user-sessions", "alice", "s1")
    await store.index_remove("user-sessions", "alice", "never")
    await store.index_remove("user-sessions", "nobody", "s1")
    assert await store.index_members("user-sessions", "alice") == {"s2"}
    assert await store.index_members("user-sessions", "bob") == {"s3"}
    assert await store.index_members("sid-sessions", "alice") == {"s4"}
    await store.index_remove("user-sessions", "alice", "s2")
    assert await store.index_members("user-sessions", "alice") == set()


async def test_index_members_expire_one_by_one(harness: Harness) -> None:
    store = harness.store
    await store.index_add("user-sessions", "alice", "short", 0.2)
    await store.index_add("user-sessions", "alice", "long", 60)
    assert await store.index_members("user-sessions", "alice") == {"short", "long"}

    async def short_gone() -> bool:
        return await store.index_members("user-sessions", "alice") == {"long"}

    await harness.until(short_gone, after=0.25)
    await store.index_add("user-sessions", "alice", "short", 60)  # re-added: back, live
    assert await store.index_members("user-sessions", "alice") == {"short", "long"}


async def test_index_values_are_a_separate_namespace(harness: Harness) -> None:
    store = harness.store
    await store.put("user-sessions", "alice", b"value", 60)
    await store.index_add("user-sessions", "alice", "s1", 60)
    assert await store.get("user-sessions", "alice") == b"value"
    assert await store.index_members("user-sessions", "alice") == {"s1"}


# -- locks -------------------------------------------------------------------------------------


async def test_a_lock_is_held_by_one_and_released_only_by_its_token(harness: Harness) -> None:
    store = harness.store
    token = await store.acquire("refresh:s1", 30)
    assert token
    assert await store.acquire("refresh:s1", 30) is None
    assert await store.acquire("refresh:s2", 30) is not None  # another name is another lock
    await store.release("refresh:s1", "not-the-token")
    assert await store.acquire("refresh:s1", 30) is None  # a wrong token releases nothing
    await store.release("refresh:s1", token)
    again = await store.acquire("refresh:s1", 30)
    assert again and again != token
    await store.release("refresh:s1", token)  # the old holder, finishing late: no effect
    assert await store.acquire("refresh:s1", 30) is None


async def test_a_lock_expires(harness: Harness) -> None:
    store = harness.store
    first = await store.acquire("refresh:s1", 0.2)
    assert first

    async def free_again() -> bool:
        return await store.acquire("refresh:s1", 30) is not None

    await harness.until(free_again, after=0.25)
    await store.release("refresh:s1", first or "")  # expired holder: must not free the new one
    assert await store.acquire("refresh:s1", 30) is None


async def test_of_concurrent_acquirers_exactly_one_holds(harness: Harness) -> None:
    stores = [harness.store, await harness.peer()]
    for round_ in range(10):
        tokens = await asyncio.gather(*(stores[i % 2].acquire(f"l{round_}", 30) for i in range(6)))
        assert len([t for t in tokens if t]) == 1


# -- pub/sub -----------------------------------------------------------------------------------


async def next_message(subscription: AsyncIterator[bytes]) -> bytes:
    async with asyncio.timeout(WAIT):
        return await anext(subscription)


async def test_publish_reaches_every_subscriber_in_order(harness: Harness) -> None:
    connects: list[str] = []

    async def flush() -> None:
        connects.append("async")

    first = await harness.store.subscribe("revoke", on_connect=lambda: connects.append("sync"))
    second = await harness.store.subscribe("revoke", on_connect=flush)
    other = await harness.store.subscribe("other")
    async with asyncio.timeout(WAIT):
        assert all([await s.wait_connected() for s in (first, second, other)])
    assert sorted(connects) == ["async", "sync"]
    assert first.connected and second.connected
    for message in (b"s1", b"s2", b"\0binary\xff"):
        await harness.store.publish("revoke", message)
    await harness.store.publish("other", b"elsewhere")
    for subscription in (first, second):
        assert [await next_message(subscription) for _ in range(3)] == [
            b"s1",
            b"s2",
            b"\0binary\xff",
        ]
    assert await next_message(other) == b"elsewhere"


async def test_a_closed_subscription_ends_and_reports_unconnected(harness: Harness) -> None:
    subscription = await harness.store.subscribe("revoke")
    async with asyncio.timeout(WAIT):
        assert await subscription.wait_connected()
    await subscription.close()
    assert not subscription.connected
    assert await subscription.wait_connected() is False
    with pytest.raises(StopAsyncIteration):
        await next_message(subscription)
    await harness.store.publish("revoke", b"after close")  # no subscriber left: no error


async def test_publish_without_subscribers(harness: Harness) -> None:
    await harness.store.publish("nobody-listens", b"x")


async def test_ping(harness: Harness) -> None:
    assert await harness.store.ping() is True


# -- argument checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["", "Session", "a:b", "a b", "x" * 33, "se\0ssion"])
async def test_bad_kinds_are_refused(harness: Harness, kind: str) -> None:
    with pytest.raises(ValueError, match="kind"):
        await harness.store.put(kind, "k", b"x", 60)
    with pytest.raises(ValueError, match="kind"):
        await harness.store.index_add(kind, "k", "m", 60)
    with pytest.raises(ValueError, match="kind"):
        await harness.store.advance(kind, "k", 1, 60)


@pytest.mark.parametrize("ttl", [0, -1.0])
async def test_a_ttl_must_be_positive(harness: Harness, ttl: float) -> None:
    with pytest.raises(ValueError, match="TTL"):
        await harness.store.put("session", "k", b"x", ttl)
    with pytest.raises(ValueError, match="TTL"):
        await harness.store.incr("session", "k", ttl)
    with pytest.raises(ValueError, match="TTL"):
        await harness.store.advance("session", "k", 1, ttl)


# -- opening -----------------------------------------------------------------------------------


async def test_open_refuses_other_urls() -> None:
    with pytest.raises(ValueError):
        await open_session_store("postgresql://db/x")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/lib/gateway/state.db", "/var/lib/gateway/state.db"),
        ("sqlite:////tmp/x.db", "/tmp/x.db"),
        ("sqlite:///tmp/with%20space.db", "/tmp/with space.db"),
        ("sqlite://relative.db", "relative.db"),
    ],
)
def test_sqlite_path(url: str, path: str) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "memory://x"])
def test_sqlite_path_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        sqlite_path(url)


async def test_sqlite_that_cannot_open_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable) as caught:
        await open_session_store(f"sqlite:///{tmp_path}/missing-dir/state.db")
    assert caught.value.status == 503 and "missing-dir" not in caught.value.detail


async def test_sqlite_keeps_state_across_reopen_and_sweeps_expired_rows(tmp_path: Path) -> None:
    clock = Clock()
    url = f"sqlite:///{tmp_path}/state.db"
    store = await open_session_store(url, clock=clock)
    await store.put("session", "kept", b"x", 3600)
    await store.put("session", "short", b"y", 1)
    await store.index_add("user-sessions", "alice", "short", 1)
    await store.close()
    assert (tmp_path / "state.db").stat().st_mode & 0o777 == 0o600
    store = await open_session_store(url, clock=clock)
    assert await store.get("session", "kept") == b"x"
    clock.now += 120  # past the sweep interval: the next write sweeps
    await store.put("session", "other", b"z", 3600)
    await store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        keys = {row[0] for row in db.execute("SELECT key FROM ephemeral_value")}
        members = db.execute("SELECT count(*) FROM ephemeral_index").fetchone()[0]
        journal = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert keys == {"kept", "other"} and members == 0
    assert journal == "wal"


async def test_a_closed_sqlite_store_is_unavailable(tmp_path: Path) -> None:
    store = await open_session_store(f"sqlite:///{tmp_path}/state.db")
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get("session", "a")
    assert await store.ping() is False


OpenSqlite = Callable[[], Awaitable[SqliteStore]]


@pytest.fixture
async def open_sqlite(tmp_path: Path) -> AsyncIterator[OpenSqlite]:
    """Open SqliteStores on one file, each its own connection (as another process would);
    all closed afterwards, even when a test fails (their threads would keep pytest alive)."""
    clock = Clock()
    opened: list[SqliteStore] = []

    async def open_() -> SqliteStore:
        opened.append(await SqliteStore.open(str(tmp_path / "state.db"), clock=clock))
        return opened[-1]

    yield open_
    for store in opened:
        await store.close()


async def test_two_sqlite_stores_on_one_file_race_advance_and_one_wins(
    open_sqlite: OpenSqlite,
) -> None:
    stores = (await open_sqlite(), await open_sqlite())
    for round_ in range(10):
        calls = [stores[i % 2].advance("totp-step", f"u{round_}", 5, 60) for i in range(20)]
        assert (await asyncio.gather(*calls)).count(True) == 1
    assert await stores[1].get("totp-step", "u0") == b"5"


async def test_sqlite_advance_takes_signed_64_bit_values(open_sqlite: OpenSqlite) -> None:
    store = await open_sqlite()
    assert await store.advance("totp-step", "a", 2**63 - 1, 60) is True
    assert await store.get("totp-step", "a") == b"%d" % (2**63 - 1)
    for value in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match="64-bit"):
            await store.advance("totp-step", "b", value, 60)


# -- Redis: URLs, outages, reconnection --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://127.0.0.1:6379/13", RedisTarget("single", (("127.0.0.1", 6379),), 13)),
        ("redis://cache", RedisTarget("single", (("cache", 6379),), 0)),
        (
            "rediss://:s3cret@cache:6380/2",
            RedisTarget("single", (("cache", 6380),), 2, password="s3cret", ssl=True),
        ),
        (
            "redis+sentinel://s1:26379,s2,[::1]:26380/mymaster/3",
            RedisTarget(
                "sentinel",
                (("s1", 26379), ("s2", 26379), ("::1", 26380)),
                3,
                service="mymaster",
            ),
        ),
        (
            "redis+sentinel://gw:p%40ss@s1/main?sentinel_password=sp&ssl=true",
            RedisTarget(
                "sentinel",
                (("s1", 26379),),
                0,
                service="main",
                username="gw",
                password="p@ss",
                sentinel_password="sp",
                ssl=True,
            ),
        ),
        (
            "redis+cluster://:pw@n1:7000,n2:7001,n3",
            RedisTarget("cluster", (("n1", 7000), ("n2", 7001), ("n3", 6379)), password="pw"),
        ),
        ("redis+cluster://n1:7000/0?ssl=1", RedisTarget("cluster", (("n1", 7000),), ssl=True)),
    ],
)
def test_redis_url_parsing(url: str, target: RedisTarget) -> None:
    assert parse_redis_url(url) == target


@pytest.mark.parametrize(
    "url",
    [
        "redis://",
        "redis://host/notanumber",
        "redis://host/1/2",
        "redis://a:1,b:2/0",
        "redis://host:99999/0",
        "redis://host:port/0",
        "redis+sentinel://s1:26379",  # no service name
        "redis+sentinel://s1/main/1/extra",
        "redis+sentinel://s1/main?bogus=1",
        "redis+cluster://n1:7000/1",  # a cluster has database 0 only
        "redis+cluster://n1?sentinel_password=x",
        "memcached://host",
    ],
)
def test_redis_url_errors(url: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_url(url)


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/mymaster/1", "redis+cluster://:pw@127.0.0.1:1"],
)
async def test_sentinel_and_cluster_stores_are_built_without_connecting(url: str) -> None:
    store = await open_session_store(url)
    assert isinstance(store, RedisStore)
    assert "pw" not in repr(store)
    await store.close()


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_unreachable_redis_raises_store_unavailable() -> None:
    store = await open_session_store(f"redis://127.0.0.1:{unused_port()}/13")
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: store.put("session", "a", b"x", 60),
        lambda: store.get("session", "a"),
        lambda: store.delete("session", "a"),
        lambda: store.take("session", "a"),
        lambda: store.put_if_absent("jti", "a", b"x", 60),
        lambda: store.incr("rate", "a", 60),
        lambda: store.advance("totp-step", "a", 1, 60),
        lambda: store.index_add("user-sessions", "a", "s", 60),
        lambda: store.index_members("user-sessions", "a"),
        lambda: store.index_remove("user-sessions", "a", "s"),
        lambda: store.acquire("lock", 60),
        lambda: store.release("lock", "token"),
        lambda: store.publish("revoke", b"x"),
    ]
    for operation in operations:
        with pytest.raises(StoreUnavailable) as caught:
            await operation()
        assert caught.value.status == 503 and caught.value.reason == "store-unavailable"
    assert await store.ping() is False
    subscription = await store.subscribe("revoke")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await subscription.wait_connected()
    assert not subscription.connected
    await store.close()


async def kill_subscriber_connections(admin: Redis) -> int:
    """CLIENT KILL the pub/sub connections on database 13 (other users of Redis are spared)."""
    killed = 0
    for client in await admin.client_list(_type="pubsub"):
        if str(client.get("db")) == "13":
            killed += await admin.client_kill_filter(_id=client["id"])
    return killed


async def wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.001)


async def test_a_redis_subscription_survives_a_killed_connection(admin: Redis) -> None:
    store = await open_session_store(REDIS_URL)
    connects: list[float] = []
    subscription = await store.subscribe("revoke", on_connect=lambda: connects.append(1))
    async with asyncio.timeout(WAIT):
        assert await subscription.wait_connected()
    assert len(connects) == 1

    assert await kill_subscriber_connections(admin) == 1
    await wait_for(lambda: not subscription.connected)
    await wait_for(lambda: subscription.connected)
    assert len(connects) == 2  # on_connect ran again, before connected turned True

    await admin.publish("gw:c:revoke", b"after the kill")  # what another process publishes
    assert await next_message(subscription) == b"after the kill"
    await store.close()


async def test_a_failing_on_connect_hook_is_retried(admin: Redis) -> None:
    store = await open_session_store(REDIS_URL)
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("cache flush failed")

    subscription = await store.subscribe("revoke", on_connect=flaky)
    async with asyncio.timeout(WAIT):
        assert await subscription.wait_connected()
    assert len(calls) == 2
    await store.close()


async def test_redis_keys_carry_their_ttl(admin: Redis) -> None:
    store = await open_session_store(REDIS_URL)
    await store.put("session", "a", b"x", 30)
    await store.incr("rate", "ip", 20)
    await store.index_add("user-sessions", "alice", "s1", 40)
    await store.advance("totp-step", "alice", 7, 25)
    assert 29_000 < await admin.pttl("gw:v:session:a") <= 30_000
    assert 19_000 < await admin.pttl("gw:v:rate:ip") <= 20_000
    assert 39_000 < await admin.pttl("gw:i:user-sessions:alice") <= 40_000
    assert 24_000 < await admin.pttl("gw:v:totp-step:alice") <= 25_000
    await store.advance("totp-step", "alice", 8, 50)  # a stored step gets the new TTL
    assert 49_000 < await admin.pttl("gw:v:totp-step:alice") <= 50_000
    assert await admin.get("gw:v:totp-step:alice") == b"8"
    await store.close()


# -- Redis: a private server that stops, freezes and comes back --------------------------------


class PrivateRedis:
    """A redis-server of this test's own on a free port, to stop and start at will."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = unused_port()
        self.dir = tmp_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        args = [
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.dir),
        ]
        self.process = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL)
        probe = Redis(port=self.port, socket_connect_timeout=0.5)
        async with asyncio.timeout(WAIT):
            while not await _answers(probe):
                await asyncio.sleep(0.02)
        await probe.aclose()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)


async def _answers(client: Redis) -> bool:
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is required in CI")
        pytest.skip("redis-server is not installed; with CI=true this fails")
    server = PrivateRedis(tmp_path)
    await server.start()
    yield server
    if server.process is not None:
        server.signal(signal.SIGCONT)
    server.stop()


async def test_a_redis_restart_is_survived(private_redis: PrivateRedis) -> None:
    store = await open_session_store(private_redis.url)
    connects: list[int] = []
    subscription = await store.subscribe("revoke", on_connect=lambda: connects.append(1))
    async with asyncio.timeout(WAIT):
        assert await subscription.wait_connected()
    await store.put("session", "a", b"x", 60)

    private_redis.stop()
    await wait_for(lambda: not subscription.connected)
    with pytest.raises(StoreUnavailable):
        await store.get("session", "a")
    assert await store.ping() is False

    await private_redis.start()  # empty again: it kept nothing
    async with asyncio.timeout(WAIT):
        assert await subscription.wait_connected()
    assert len(connects) == 2
    assert await store.get("session", "a") is None
    await store.publish("revoke", b"back")
    assert await next_message(subscription) == b"back"
    await store.close()


async def test_a_silent_redis_counts_as_dropped(
    private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "_PING_EVERY", 0.05)
    monkeypatch.setattr(redis_store, "_DEAD_AFTER", 0.3)
    store = await open_session_store(private_redis.url)
    connects: list[int] = []
    subscription = await store.subscribe("revoke", on_connect=lambda: connects.append(1))
    async with asyncio.timeout(WAIT):
        assert await subscription.wait_connected()

    private_redis.signal(signal.SIGSTOP)  # the socket stays open; nothing answers
    await wait_for(lambda: not subscription.connected)
    private_redis.signal(signal.SIGCONT)
    async with asyncio.timeout(WAIT):
        assert await subscription.wait_connected()
    assert len(connects) == 2
    await store.close()
