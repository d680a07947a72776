"""Sessions held to one contract on every store: memory, SQLite and Redis.

Each case asserts what a user would see: the cookie loads its identity and appears nowhere
in the store; records are sealed; idle and absolute limits, global and per route; touch
throttling; `max_per_user`; ending one session, a user's, an IdP session's; key rotation;
and on Redis, between two processes, revocation within 1 s, failing closed while the
revocation channel is down, and updates reaching every cache.

Time is an injected clock. Memory and SQLite expire records by it too; Redis keeps real
TTLs, so no case here waits for Redis to expire anything. Redis is 127.0.0.1:6379,
database 12, flushed before and after each test; without it the Redis cases are skipped,
except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.keyring import Keyring
from gateway.sessions import TOUCH_INTERVAL, Limits, Session, SessionInvalid, Sessions
from gateway.store import (
    MemoryStore,
    OnConnect,
    SessionStore,
    StoreUnavailable,
    Subscription,
    open_session_store,
)
from gateway.store import redis as redis_store
from tests.conftest import redis_admin

REDIS_DB = 12
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
WAIT = 5.0  # ceiling of every bounded wait
ISS = "https://idp.test"
EMAIL = "alice.sealed-check@example.org"
LIMITS = Limits(idle_timeout=900, max_lifetime=43200)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SpyStore:
    """A `SessionStore` passing everything to `inner`; records writes, can hold one read."""

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        self.puts: list[tuple[str, str]] = []
        self.reads: list[str] = []  # keys of the session records read
        self._hold: tuple[asyncio.Event, asyncio.Event] | None = None

    def hold_next_session_read(self) -> tuple[asyncio.Event, asyncio.Event]:
        """The next session read gets its value, then waits: (reached, release)."""
        self._hold = (asyncio.Event(), asyncio.Event())
        return self._hold

    async def put(self, kind: str, key: str, value: bytes, ttl: float) -> None:
        self.puts.append((kind, key))
        await self.inner.put(kind, key, value, ttl)

    async def get(self, kind: str, key: str) -> bytes | None:
        value = await self.inner.get(kind, key)
        if kind == "session":
            self.reads.append(key)
        if kind == "session" and self._hold is not None:
            (reached, release), self._hold = self._hold, None
            reached.set()
            await release.wait()
        return value

    async def delete(self, kind: str, key: str) -> bool:
        return await self.inner.delete(kind, key)

    async def take(self, kind: str, key: str) -> bytes | None:
        return await self.inner.take(kind, key)

    async def put_if_absent(self, kind: str, key: str, value: bytes, ttl: float) -> bool:
        return await self.inner.put_if_absent(kind, key, value, ttl)

    async def incr(self, kind: str, key: str, ttl: float) -> int:
        return await self.inner.incr(kind, key, ttl)

    async def index_add(self, kind: str, key: str, member: str, ttl: float) -> None:
        await self.inner.index_add(kind, key, member, ttl)

    async def index_members(self, kind: str, key: str) -> set[str]:
        return await self.inner.index_members(kind, key)

    async def index_remove(self, kind: str, key: str, member: str) -> None:
        await self.inner.index_remove(kind, key, member)

    async def acquire(self, name: str, ttl: float) -> str | None:
        return await self.inner.acquire(name, ttl)

    async def release(self, name: str, token: str) -> None:
        await self.inner.release(name, token)

    async def publish(self, channel: str, message: bytes) -> None:
        await self.inner.publish(channel, message)

    async def subscribe(self, channel: str, *, on_connect: OnConnect | None = None) -> Subscription:
        return await self.inner.subscribe(channel, on_connect=on_connect)

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Backend:
    """A store under test, its clock, and the `Sessions` built over it."""

    name: str
    url: str
    dir: Path
    clock: Clock
    store: SessionStore
    admin: Redis | None  # Redis only: a plain client on database 12
    keyring: Keyring = field(default_factory=lambda: Keyring([os.urandom(32)]))
    opened: list[SessionStore] = field(default_factory=list)
    running: list[Sessions] = field(default_factory=list)

    async def sessions(
        self,
        *,
        store: SessionStore | None = None,
        keyring: Keyring | None = None,
        limits: Limits = LIMITS,
        cache_max: int = 100_000,
    ) -> Sessions:
        """Started sessions with their own cache (a process of their own), once subscribed."""
        store = store or self.store
        sessions = Sessions(store, keyring or self.keyring, limits, self.clock, cache_max)
        await sessions.start()
        self.running.append(sessions)
        await wait_for(lambda: sessions.connected)
        return sessions

    async def process(self) -> Sessions:
        """Sessions over a connection of their own, as another process opens the store."""
        if self.name == "memory":  # a memory store is one process's: share it
            return await self.sessions()
        store = await open_session_store(self.url, clock=self.clock)
        self.opened.append(store)
        return await self.sessions(store=store)

    async def raw(self) -> bytes:
        """Every key and value the store holds, as the store holds them."""
        if isinstance(self.store, MemoryStore):
            return _memory_dump(self.store)
        if self.admin is None:  # SQLite: the file itself, write-ahead log included
            return b"".join(path.read_bytes() for path in sorted(self.dir.glob("state.db*")))
        found: list[object] = []
        async for name in self.admin.scan_iter(count=1000):
            found.append(name)
            kind = await self.admin.type(name)
            if kind == b"string":
                found.append(await self.admin.get(name))
            elif kind == b"zset":
                found.extend(await self.admin.zrange(name, 0, -1))
            else:
                raise AssertionError(f"unexpected Redis type {kind!r} at {name!r}")
        assert all(isinstance(part, bytes) for part in found)
        return b"\n".join(part for part in found if isinstance(part, bytes))


def _memory_dump(store: MemoryStore) -> bytes:
    parts = [
        f"{kind} {key}".encode() + b" " + value for (kind, key), (value, _) in store._values.items()
    ]
    for (kind, key), members in store._indexes.items():
        parts.append(" ".join([kind, key, *members]).encode())
    return b"\n".join(parts)


async def wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def opened(name: str, tmp_path: Path) -> AsyncIterator[Backend]:
    admin = await redis_admin(REDIS_URL) if name == "redis" else None
    if admin is not None:
        await admin.flushdb()
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path}/state.db"}.get(name, REDIS_URL)
    clock = Clock(float(int(time.time())))  # near real time: Redis TTLs are computed from it
    backend = Backend(name, url, tmp_path, clock, await open_session_store(url, clock=clock), admin)
    try:
        yield backend
    finally:
        for sessions in backend.running:
            await sessions.close()
        for store in [backend.store, *backend.opened]:
            await store.close()
        if admin is not None:
            await admin.flushdb()
            await admin.aclose()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with opened(request.param, tmp_path) as backend:
        yield backend


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[Backend]:
    async with opened("redis", tmp_path) as backend:
        yield backend


async def new_session(
    sessions: Sessions,
    sub: str = "alice",
    *,
    iss: str = ISS,
    sid: str | None = None,
    groups: tuple[str, ...] = ("staff",),
) -> tuple[str, Session]:
    """A login: (the cookie id, the session)."""
    return await sessions.create(
        iss=iss,
        sub=sub,
        user=sub,
        email=EMAIL if sub == "alice" else f"{sub}@example.org",
        groups=groups,
        amr=("pwd",),
        sid=sid,
        auth_time=None,
        id_token="id-token-secret",
        refresh_token="refresh-token-secret",
        refresh_after=None,
    )


async def outcome(sessions: Sessions, cookie: str, *, touch: bool = False, **route: float) -> str:
    """What a request with this cookie meets: "ok", or the reason it is refused.

    `touch`: the request was authorized, so it counts as activity. `route`: the route's own
    `idle_timeout` / `max_lifetime`.
    """
    try:
        session = await sessions.check(await sessions.load(cookie), **route)
        if touch:
            await sessions.touch(session)
    except SessionInvalid as refused:
        return refused.reason
    return "ok"


# -- create and load ---------------------------------------------------------------------------


async def test_a_cookie_loads_its_identity(backend: Backend) -> None:
    sessions = await backend.sessions()
    cookie, created = await new_session(sessions, sid="idp-session-1")
    assert len(base64.urlsafe_b64decode(cookie + "=")) == 32  # 256 random bits
    loaded = await sessions.load(cookie)
    assert loaded == created
    assert (loaded.identity, loaded.user, loaded.email) == (f"{ISS}|alice", "alice", EMAIL)
    assert (loaded.groups, loaded.amr, loaded.sid, loaded.version) == (
        ("staff",),
        ("pwd",),
        "idp-session-1",
        1,
    )
    assert len(loaded.handle) == 16 and loaded.handle not in cookie
    other = await backend.process()  # no cache: read from the store
    assert await other.load(cookie) == created
    with pytest.raises(SessionInvalid) as refused:
        await other.load(secrets.token_urlsafe(32))  # an id nobody was given
    assert refused.value.reason == "no-session"


async def test_the_store_holds_no_cookie_id_and_only_sealed_records(backend: Backend) -> None:
    sessions = await backend.sessions()
    cookie, session = await new_session(sessions, sid="idp-session-1")
    await sessions.touch(session)
    raw = await backend.raw()
    assert session.key.encode() in raw  # the dump does see the session record
    decoded = base64.urlsafe_b64decode(cookie + "=")
    for secret in (cookie.encode(), decoded, decoded.hex().encode()):
        assert secret not in raw
    for clear in (EMAIL, "id-token-secret", "refresh-token-secret", "idp-session-1"):
        assert clear.encode() not in raw
    blob = await backend.store.get("session", session.key)
    assert blob is not None and b"alice" not in blob and b"staff" not in blob


async def test_a_tampered_record_reads_as_no_session(backend: Backend) -> None:
    sessions = await backend.sessions()
    cookie, session = await new_session(sessions)
    blob = await backend.store.get("session", session.key)
    assert blob is not None
    await backend.store.put("session", session.key, blob[:-1] + bytes([blob[-1] ^ 1]), 3600)
    other = await backend.process()  # has not cached the genuine record
    with pytest.raises(SessionInvalid) as refused:
        await other.load(cookie)
    assert refused.value.reason == "no-session"


async def test_a_record_moved_to_another_key_reads_as_no_session(backend: Backend) -> None:
    sessions = await backend.sessions()
    alice_cookie, alice = await new_session(sessions)
    _, bob = await new_session(sessions, "bob")
    bob_blob = await backend.store.get("session", bob.key)
    assert bob_blob is not None
    await backend.store.put("session", alice.key, bob_blob, 3600)  # sealed for bob's key
    other = await backend.process()
    with pytest.raises(SessionInvalid) as refused:
        await other.load(alice_cookie)
    assert refused.value.reason == "no-session"


# -- idle timeout and absolute lifetime --------------------------------------------------------


async def test_idle_timeout(backend: Backend) -> None:
    sessions = await backend.sessions()
    clock = backend.clock
    cookie, _ = await new_session(sessions)
    quiet_cookie, _ = await new_session(sessions, "bob")
    clock.advance(900 - 0.5)
    assert await outcome(sessions, cookie) == "ok"  # just before the limit
    assert await outcome(sessions, quiet_cookie) == "ok"
    await sessions.touch(await sessions.load(cookie))  # an authorized request
    clock.advance(900 - 0.5)  # past the first deadline: the touch kept it alive
    assert await outcome(sessions, cookie) == "ok"
    assert await outcome(sessions, quiet_cookie) == "session-idle"  # after the limit
    clock.advance(0.5)  # exactly idle_timeout since the last activity
    assert await outcome(sessions, cookie) == "session-idle"
    assert await outcome(sessions, cookie) == "session-revoked"  # ended: its tombstone
    assert await outcome(sessions, quiet_cookie) == "session-revoked"
    assert await outcome(await backend.process(), cookie) == "session-revoked"
    assert await sessions.of_user(ISS, "alice") == []


async def test_activity_seen_by_another_process_keeps_a_session_alive(backend: Backend) -> None:
    first = await backend.sessions()
    second = await backend.process()
    cookie, _ = await new_session(first)
    assert await outcome(first, cookie) == "ok"  # cached by the first process
    backend.clock.advance(600)
    assert await outcome(second, cookie, touch=True) == "ok"  # activity on the second
    backend.clock.advance(600)  # idle for the first process's copy, not for the store's
    assert await outcome(first, cookie) == "ok"
    backend.clock.advance(900)
    assert await outcome(first, cookie) == "session-idle"


async def test_absolute_lifetime_ends_even_an_active_session(backend: Backend) -> None:
    sessions = await backend.sessions()
    clock = backend.clock
    cookie, session = await new_session(sessions)
    end_of_life = session.created + LIMITS.max_lifetime
    while clock.now + 600 < end_of_life:
        clock.advance(600)
        assert await outcome(sessions, cookie, touch=True) == "ok"
    clock.now = end_of_life - 0.5
    assert await outcome(sessions, cookie, touch=True) == "ok"
    clock.now = end_of_life
    assert await outcome(sessions, cookie, touch=True) == "session-expired"
    assert await outcome(sessions, cookie) == "session-revoked"


async def test_a_route_limit_refuses_only_on_its_route(backend: Backend) -> None:
    sessions = await backend.sessions()
    clock = backend.clock
    cookie, session = await new_session(sessions)
    clock.advance(61)
    assert await outcome(sessions, cookie, idle_timeout=60) == "session-idle"
    assert await outcome(sessions, cookie, touch=True) == "ok"  # not ended; activity elsewhere
    assert await outcome(sessions, cookie, idle_timeout=60) == "ok"
    while clock.now + 600 < session.created + 3600:
        clock.advance(600)
        assert await outcome(sessions, cookie, touch=True, max_lifetime=3600) == "ok"
    clock.now = session.created + 3600
    assert await outcome(sessions, cookie, touch=True, max_lifetime=3600) == "session-expired"
    assert await outcome(sessions, cookie, touch=True) == "ok"
    assert await outcome(sessions, cookie, max_lifetime=3600) == "session-expired"
    assert await outcome(await backend.process(), cookie) == "ok"


async def test_touch_writes_at_most_every_touch_interval(backend: Backend) -> None:
    spy = SpyStore(backend.store)
    sessions = await backend.sessions(store=spy)
    cookie, _ = await new_session(sessions)
    spy.puts.clear()
    seconds = 4 * TOUCH_INTERVAL
    for _ in range(int(seconds)):  # a request every second
        backend.clock.advance(1)
        assert await outcome(sessions, cookie, touch=True) == "ok"
    writes = [key for kind, key in spy.puts if kind == "session-seen"]  # the activity record
    assert 1 <= len(writes) <= seconds / TOUCH_INTERVAL
    stored = await (await backend.process()).load(cookie)  # what the store says
    assert backend.clock.now - TOUCH_INTERVAL <= stored.last_active <= backend.clock.now


# -- ending ------------------------------------------------------------------------------------


async def test_max_per_user_ends_the_oldest(backend: Backend) -> None:
    sessions = await backend.sessions(limits=replace(LIMITS, max_per_user=2))
    bob_cookie, _ = await new_session(sessions, "bob")
    made: list[tuple[str, Session]] = []
    for _ in range(3):
        backend.clock.advance(1)
        made.append(await new_session(sessions))
    (oldest, _), (second, second_session), (third, third_session) = made
    assert await outcome(sessions, oldest) == "session-revoked"
    assert await outcome(sessions, second) == "ok"
    assert await outcome(sessions, third) == "ok"
    assert await outcome(sessions, bob_cookie) == "ok"
    listed = await sessions.of_user(ISS, "alice")
    assert [s.handle for s in listed] == [second_session.handle, third_session.handle]


async def test_end_ends_one_session(backend: Backend) -> None:
    sessions = await backend.sessions()
    cookie, session = await new_session(sessions)
    other_cookie, _ = await new_session(sessions)
    bob_cookie, _ = await new_session(sessions, "bob")
    watched = sessions.watch(session.key)
    assert await sessions.end(session.key, "logout") is True
    await asyncio.wait_for(watched.wait(), WAIT)
    assert await outcome(sessions, cookie) == "session-revoked"
    assert await outcome(await backend.process(), cookie) == "session-revoked"
    assert await outcome(sessions, other_cookie) == "ok"
    assert await outcome(sessions, bob_cookie) == "ok"
    assert await sessions.end(session.key, "logout") is False


async def test_end_user_ends_all_of_one_identity(backend: Backend) -> None:
    sessions = await backend.sessions()
    first, _ = await new_session(sessions)
    second, _ = await new_session(sessions)
    bob, _ = await new_session(sessions, "bob")
    namesake, _ = await new_session(sessions, iss="https://other-idp.test")  # another alice
    assert await sessions.end_user(ISS, "alice", "admin") == 2
    assert await outcome(sessions, first) == "session-revoked"
    assert await outcome(sessions, second) == "session-revoked"
    assert await outcome(sessions, bob) == "ok"
    assert await outcome(sessions, namesake) == "ok"
    assert await sessions.of_user(ISS, "alice") == []
    assert await sessions.end_user(ISS, "alice", "admin") == 0


async def test_end_sid_ends_the_sessions_of_one_idp_session(backend: Backend) -> None:
    sessions = await backend.sessions()
    ended, _ = await new_session(sessions, sid="sid-1")
    other_idp_session, _ = await new_session(sessions, sid="sid-2")
    same_sid_other_issuer, _ = await new_session(sessions, "bob", iss="https://x.test", sid="sid-1")
    assert await sessions.end_sid(ISS, "sid-1", "backchannel-logout") == 1
    assert await outcome(sessions, ended) == "session-revoked"
    assert await outcome(sessions, other_idp_session) == "ok"
    assert await outcome(sessions, same_sid_other_issuer) == "ok"


async def test_of_user_and_by_handle(backend: Backend) -> None:
    sessions = await backend.sessions()
    _, first = await new_session(sessions)
    backend.clock.advance(1)
    _, second = await new_session(sessions)
    _, bob = await new_session(sessions, "bob")
    listed = await sessions.of_user(ISS, "alice")
    assert [s.handle for s in listed] == [first.handle, second.handle]
    assert (await sessions.by_handle(ISS, "alice", second.handle)) == second
    assert await sessions.by_handle(ISS, "alice", bob.handle) is None  # not alice's to end
    assert await sessions.by_handle(ISS, "alice", "0" * 16) is None
    await sessions.end(first.key, "logout")
    assert await sessions.by_handle(ISS, "alice", first.handle) is None
    assert [s.handle for s in await sessions.of_user(ISS, "alice")] == [second.handle]


# -- keys, updates -----------------------------------------------------------------------------


async def test_sessions_survive_key_rotation(backend: Backend) -> None:
    key_a, key_b = os.urandom(32), os.urandom(32)
    before = await backend.sessions(keyring=Keyring([key_a]))
    cookie, session = await new_session(before)
    rotated = await backend.sessions(keyring=Keyring([key_b, key_a]))
    assert (await rotated.load(cookie)).identity == session.identity
    backend.clock.advance(TOUCH_INTERVAL)
    assert await outcome(rotated, cookie, touch=True) == "ok"  # rewritten, sealed under B
    new_cookie, _ = await new_session(rotated)
    after = await backend.sessions(keyring=Keyring([key_b]))  # A retired
    assert await outcome(after, new_cookie) == "ok"
    assert await outcome(after, cookie) == "no-session"  # an id only A's HMAC finds
    await rotated.end(session.key, "logout")
    assert await outcome(rotated, cookie) == "session-revoked"


async def test_update_bumps_the_version(backend: Backend) -> None:
    sessions = await backend.sessions()
    cookie, session = await new_session(sessions)
    updated = await sessions.update(session, groups=("staff", "ops"))
    assert (updated.version, updated.groups) == (2, ("staff", "ops"))
    assert await sessions.load(cookie) == updated
    assert await (await backend.process()).load(cookie) == updated


# -- races that must not undo a revocation or an update ---------------------------------------


async def test_a_request_in_flight_cannot_bring_an_ended_session_back(backend: Backend) -> None:
    sessions = await backend.sessions()
    cookie, _ = await new_session(sessions)
    session = await sessions.check(await sessions.load(cookie))  # a request passed its checks
    await sessions.end(session.key, "logout")  # meanwhile the user logs out
    backend.clock.advance(TOUCH_INTERVAL)
    await sessions.touch(session)  # then the request records its activity
    assert await outcome(sessions, cookie) == "session-revoked"
    assert await outcome(await backend.process(), cookie) == "session-revoked"


async def test_touch_with_an_older_copy_keeps_an_update(backend: Backend) -> None:
    sessions = await backend.sessions()
    cookie, _ = await new_session(sessions, groups=("staff", "admin"))
    seen = await sessions.load(cookie)  # request A
    refreshed = await sessions.update(seen, groups=("staff",))  # request B: admin removed
    backend.clock.advance(TOUCH_INTERVAL)
    await sessions.touch(seen)  # request A records its activity
    for reader in (sessions, await backend.process()):
        now = await reader.load(cookie)
        assert (now.groups, now.version) == (("staff",), refreshed.version)


async def test_a_read_racing_an_end_does_not_cache_the_ended_session(backend: Backend) -> None:
    spy = SpyStore(backend.store)
    cookie, session = await new_session(await backend.sessions())
    server = await backend.sessions(store=spy)  # has not cached it yet
    reached, release = spy.hold_next_session_read()
    loop = asyncio.get_running_loop()
    in_flight = loop.create_task(server.load(cookie), name="a request in flight")
    await asyncio.wait_for(reached.wait(), WAIT)  # its read has the record...
    watched = server.watch(session.key)
    await server.end(session.key, "admin")  # ...when the session is ended
    await asyncio.wait_for(watched.wait(), WAIT)  # and the revocation has arrived
    release.set()
    await in_flight  # read before the end: it may still answer with the session
    assert await outcome(server, cookie) == "session-revoked"


async def test_the_process_cache_is_bounded_and_keeps_the_newest(backend: Backend) -> None:
    # 100,000 live sessions must not all sit in every process: past the bound the oldest go,
    # a few at a time (no cliff where every request reads the store again), and stay valid.
    maker = await backend.sessions()
    cookies = [(await new_session(maker, f"user{i}"))[0] for i in range(20)]
    spy = SpyStore(backend.store)
    server = await backend.sessions(store=spy, cache_max=8)
    for cookie in cookies:
        assert await outcome(server, cookie) == "ok"
    assert len(spy.reads) == 20
    spy.reads.clear()
    for cookie in cookies[-7:]:
        assert await outcome(server, cookie) == "ok"
    assert spy.reads == []  # the newest are served from memory
    for cookie in cookies[:5]:
        assert await outcome(server, cookie) == "ok"  # the oldest are read again, still valid
    assert len(spy.reads) == 5


# -- Redis: two processes ----------------------------------------------------------------------


async def test_revocation_reaches_another_process_within_a_second(redis: Backend) -> None:
    first, second = await redis.sessions(), await redis.process()
    latencies: list[float] = []
    for _ in range(5):
        cookie, session = await new_session(first)
        assert await outcome(first, cookie) == "ok"  # cached by the first process
        watched = first.watch(session.key)
        start = time.perf_counter()
        await second.end(session.key, "admin")

        async def refused(cookie: str = cookie) -> str:
            while (reason := await outcome(first, cookie)) == "ok":
                await asyncio.sleep(0.001)
            return reason

        assert await asyncio.wait_for(refused(), WAIT) == "session-revoked"
        latencies.append(time.perf_counter() - start)
        await asyncio.wait_for(watched.wait(), WAIT)
        first.unwatch(session.key, watched)
    print(
        f"\nrevocation latency across processes: median {statistics.median(latencies) * 1e3:.2f}"
        f" ms, max {max(latencies) * 1e3:.2f} ms"
    )
    assert max(latencies) < 1.0


async def test_an_update_reaches_the_other_process(redis: Backend) -> None:
    first, second = await redis.sessions(), await redis.process()
    cookie, session = await new_session(first)
    assert (await first.load(cookie)).version == 1  # cached by the first process
    watched = first.watch(session.key)
    updated = await second.update(await second.load(cookie), groups=("staff", "ops"))

    async def seen() -> Session:
        while (loaded := await first.load(cookie)).version != updated.version:
            await asyncio.sleep(0.001)
        return loaded

    assert (await asyncio.wait_for(seen(), WAIT)).groups == ("staff", "ops")
    await asyncio.wait_for(watched.wait(), WAIT)


async def kill_subscriber_connections(admin: Redis) -> int:
    """CLIENT KILL the pub/sub connections on database 12 (other users of Redis are spared)."""
    killed = 0
    for client in await admin.client_list(_type="pubsub"):
        if str(client.get("db")) == str(REDIS_DB):
            killed += await admin.client_kill_filter(_id=client["id"])
    return killed


async def test_no_session_is_trusted_while_revocations_cannot_arrive(
    redis: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "_BACKOFF", (0.6, 2.0))  # a dropped link stays down 0.3 s+
    first, second = await redis.sessions(), await redis.process()
    cookie, session = await new_session(second)
    kept_cookie, _ = await new_session(second, "bob")
    assert await outcome(first, cookie) == "ok"  # both cached by the first process
    assert await outcome(first, kept_cookie) == "ok"
    assert redis.admin is not None
    assert await kill_subscriber_connections(redis.admin) == 2
    await wait_for(lambda: not first.connected)
    for any_cookie in (cookie, kept_cookie):
        with pytest.raises(StoreUnavailable):
            await first.load(any_cookie)
    await second.end(session.key, "admin")
    assert not first.connected  # so the first process missed the announcement
    await wait_for(lambda: first.connected)
    assert await outcome(first, cookie) == "session-revoked"  # not served from the old cache
    assert await outcome(first, kept_cookie) == "ok"


async def test_watchers_are_woken_when_revocations_may_have_been_missed(
    redis: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "_BACKOFF", (0.6, 2.0))
    first, second = await redis.sessions(), await redis.process()
    cookie, session = await new_session(second)
    assert await outcome(first, cookie) == "ok"
    watched = first.watch(session.key)  # e.g. a WebSocket of this session on the first process
    assert redis.admin is not None
    await kill_subscriber_connections(redis.admin)
    await wait_for(lambda: not first.connected)
    await second.end(session.key, "admin")  # announced while the first cannot hear it
    await wait_for(lambda: first.connected)
    await asyncio.wait_for(watched.wait(), 1.0)  # the stream must re-check, and close
