"""Server-side sessions (SPEC §5): sealed records, idle and absolute limits, revocation everywhere.

The browser holds only an opaque 256-bit id. The store keys the session by an HMAC of that
id (so a store dump names no cookie) and holds it sealed (so write access to the store mints
nothing). Its public handle, for listings and logs, is another, short HMAC.

Limits are checked on every request against this process's clock: `sessions.idle_timeout`
and `max_lifetime`, and shorter per-route ones. Activity is written at most once every
TOUCH_INTERVAL seconds per session (a quarter of the idle timeout when that is shorter),
so idle time is exact to that granularity, and it is
written to a record of its own: a touch never rewrites the session, so a request in flight
can neither bring back a session that was just ended nor undo a change to its claims.

Each process caches sessions it has read. The cache is exact because every change other
than a touch (end, refresh, MFA step) is announced on the store's revocation channel: a
message evicts the entry everywhere; the whole cache is flushed on every (re)subscribe; and
while the channel is down no cached session is trusted and protected requests are refused
(`StoreUnavailable`, 503). An ended session leaves a tombstone until its lifetime would have
ended, so it is recognised as revoked rather than unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TypeVar

import orjson

from gateway.events import Event, emit
from gateway.keyring import Keyring
from gateway.store import SessionStore, StoreUnavailable, Subscription

log = logging.getLogger("gateway.sessions")

TOUCH_INTERVAL = 5.0  # seconds: activity is written at most this often per session
# Records outlive the session by this much, so a late request still learns *why* it ended
# (session-expired) instead of finding nothing; `check` enforces the lifetime itself.
_EXPIRED_GRACE = 3600.0
CHANNEL = "gateway:sessions"
_V = TypeVar("_V")
CACHE_MAX = 100_000  # sessions cached per process; past it the oldest eighth is dropped
_HMAC_LABEL = "session-id"
_HANDLE_LABEL = "session-handle"
_SEAL_LABEL = "session-record"
_SEEN = "session-seen"  # the activity record: last_active, apart from the session's claims
_START_TIMEOUT = 5.0  # seconds to wait for the revocation channel at start
# Admin-API indexes, each member expiring with the session that added it (bounded by TTLs):
_ALL, _HANDLES = "all-sessions", "session-handles"

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Limits:
    idle_timeout: float
    max_lifetime: float
    max_per_user: int = 0


@dataclass(frozen=True, slots=True)
class Session:
    key: str  # HMAC of the cookie id: the store key, never shown
    handle: str  # short public handle: listings, the admin API, the log
    iss: str
    sub: str
    user: str  # the user_claim value
    email: str | None
    groups: tuple[str, ...]
    amr: tuple[str, ...]
    sid: str | None  # the IdP's session id (back-channel logout)
    created: float
    last_active: float
    auth_time: float | None
    id_token: str | None = field(default=None, repr=False)  # id_token_hint at logout
    refresh_token: str | None = field(default=None, repr=False)
    refresh_after: float | None = None  # renew claims from then on (before the ID token expires)
    version: int = 1  # bumped whenever claims change (assertions are cached per version)
    email_verified: bool = False  # the IdP said email_verified: true
    mfa_at: float | None = None  # when a TOTP or recovery code was verified by the gateway
    max_lifetime: float | None = None  # this session's own cap, under the global (break-glass)

    @property
    def identity(self) -> str:
        return f"{self.iss}|{self.sub}"

    def expires(self, limits: Limits) -> float:
        life = limits.max_lifetime
        return self.created + (life if self.max_lifetime is None else min(life, self.max_lifetime))


class SessionInvalid(Exception):
    """The cookie names no usable session; `reason` is a SPEC §3 code."""

    def __init__(self, reason: str, ended: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason  # session-idle | session-expired | session-revoked | no-session
        self.ended = ended  # a revoked session's tombstone: why, by whom, whose (alerts)


class Sessions:
    def __init__(
        self,
        store: SessionStore,
        keyring: Keyring,
        limits: Limits,
        clock: Clock = time.time,
        cache_max: int = CACHE_MAX,
    ) -> None:
        self._store = store
        self._cache_max = cache_max
        self._keyring = keyring
        self._sealer = keyring.sealer(_SEAL_LABEL)
        self._id_keys = keyring.derive_all(_HMAC_LABEL)
        self.limits = limits
        self._clock = clock
        self._cache: dict[str, Session] = {}
        self._key_of: dict[str, str] = {}  # cookie id -> store key, for cached sessions only
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._subscription: Subscription | None = None
        self._listener: asyncio.Task[None] | None = None
        self._generation = 0  # bumped by every invalidation: reads begun before do not cache
        self._touching: set[str] = set()  # sessions whose activity is being written right now
        self._touch_interval = min(TOUCH_INTERVAL, limits.idle_timeout / 4)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._subscription = await self._store.subscribe(CHANNEL, on_connect=self._resubscribed)
        loop = asyncio.get_running_loop()
        self._listener = loop.create_task(self._listen(self._subscription), name="sessions:listen")
        with contextlib.suppress(TimeoutError):  # not connected: requests fail closed meanwhile
            await asyncio.wait_for(self._subscription.wait_connected(), _START_TIMEOUT)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._subscription is not None:
            await self._subscription.close()

    @property
    def connected(self) -> bool:
        return self._subscription is not None and self._subscription.connected

    def _resubscribed(self) -> None:
        """On every (re)subscribe: announcements may have been missed, so forget and re-check."""
        self._cache.clear()
        self._key_of.clear()
        self._generation += 1
        for events in self._watchers.values():
            for event in events:
                event.set()

    async def _listen(self, subscription: Subscription) -> None:
        async for message in subscription:
            key = message.decode("ascii", "replace")
            self._generation += 1
            self._cache.pop(key, None)
            for event in self._watchers.get(key, ()):
                event.set()

    # -- ids ---------------------------------------------------------------------------------

    def keys_for(self, cookie_id: str) -> list[str]:
        """The store keys this id may be under: current state key first (rotation)."""
        # Keyed BLAKE2b (a MAC): on the path of every request, and 3x cheaper than HMAC-SHA256.
        data = cookie_id.encode()
        return [hashlib.blake2b(data, key=k, digest_size=32).hexdigest() for k in self._id_keys]

    def handle_of(self, key: str) -> str:
        return self._keyring.hmac(_HANDLE_LABEL, key.encode()).hex()[:16]

    # -- create, load, check, touch ----------------------------------------------------------

    async def create(
        self,
        *,
        iss: str,
        sub: str,
        user: str,
        email: str | None,
        groups: Iterable[str],
        amr: Iterable[str],
        sid: str | None,
        auth_time: float | None,
        id_token: str | None,
        refresh_token: str | None,
        refresh_after: float | None,
        email_verified: bool = False,
        mfa_at: float | None = None,
        max_lifetime: float | None = None,
    ) -> tuple[str, Session]:
        """A new session under a new random id; (the cookie id, the session)."""
        cookie_id = secrets.token_urlsafe(32)  # 256 bits
        key = self.keys_for(cookie_id)[0]
        now = self._clock()
        session = Session(
            key,
            self.handle_of(key),
            iss,
            sub,
            user,
            email,
            tuple(groups),
            tuple(amr),
            sid,
            now,
            now,
            auth_time,
            id_token,
            refresh_token,
            refresh_after,
            email_verified=email_verified,
            mfa_at=mfa_at,
            max_lifetime=max_lifetime,
        )
        await self._save(session)
        await self._index(session)
        await self._enforce_max_per_user(session)
        emit(Event("session.created", {"session": session.handle, "user": user, "sub": sub}))
        return cookie_id, session

    async def rotate(self, session: Session, reason: str, **changes: object) -> tuple[str, Session]:
        """The same session under a new id (after a privilege step such as MFA): the old id
        stops working everywhere at once. (the new cookie id, the session)."""
        cookie_id = secrets.token_urlsafe(32)
        key = self.keys_for(cookie_id)[0]
        fresh = replace(
            session,
            key=key,
            handle=self.handle_of(key),
            version=session.version + 1,
            **changes,  # type: ignore[arg-type]
        )
        await self._save(fresh)
        await self._index(fresh)
        # SECURITY: a session id seen before the step (fixation, a shoulder) is worth nothing.
        await self.end(session.key, reason, actor=session.user)
        fields = {"session": fresh.handle, "user": fresh.user, "sub": fresh.sub}
        emit(Event("session.rotated", {**fields, "previous": session.handle, "reason": reason}))
        return cookie_id, fresh

    async def _index(self, session: Session) -> None:
        ttl = self._ttl(session)
        key = session.key
        await self._store.index_add("user-sessions", _digest(session.identity), key, ttl)
        if session.sid:
            sid = _digest(f"{session.iss}|{session.sid}")
            await self._store.index_add("sid-sessions", sid, key, ttl)
        await self._store.index_add(_ALL, "all", key, ttl)
        await self._store.index_add(_HANDLES, session.handle, key, ttl)

    async def load(self, cookie_id: str) -> Session:
        """The session for a cookie id, or SessionInvalid; limits are checked by `check`."""
        if not self.connected:
            # SECURITY: while revocations cannot reach us, no session is trusted (fail closed).
            raise StoreUnavailable("session revocations are not reaching this process")
        known = self._key_of.get(cookie_id)  # the MAC computed once per session, not per request
        if known is not None and (session := self._cache.get(known)) is not None:
            return session
        for key in self.keys_for(cookie_id):
            session = self._cache.get(key) or await self._read(key)
            if session is not None:
                # SECURITY: only ids of real sessions are remembered: no growth by guessing.
                self._remember(self._key_of, cookie_id, key)
                return session
        for key in self.keys_for(cookie_id):
            tombstone = await self._store.get("revoked", key)
            if tombstone is not None:
                raise SessionInvalid("session-revoked", self._ended(key, tombstone))
        raise SessionInvalid("no-session")

    async def reload(self, key: str) -> Session:
        """The current state of a session by its store key (bypassing this process's cache)."""
        if not self.connected:
            raise StoreUnavailable("session revocations are not reaching this process")
        session = await self._read(key)
        if session is None:
            raise SessionInvalid("session-revoked")
        return session

    async def check(
        self,
        session: Session,
        *,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
    ) -> Session:
        """`session` if within its limits (a route's may be shorter), else SessionInvalid.

        Going past the global limits ends the session; past only a route's shorter ones, it
        is refused there and lives on for other routes.
        """
        if self.within_limits(session, idle_timeout=idle_timeout, max_lifetime=max_lifetime):
            return session
        now = self._clock()
        if now >= session.expires(self.limits):
            await self.end(session.key, "session-expired")
            raise SessionInvalid("session-expired")
        if now >= session.last_active + self.limits.idle_timeout:
            fresh = await self._read(session.key)  # another process may have seen activity
            if fresh is None or now >= fresh.last_active + self.limits.idle_timeout:
                await self.end(session.key, "session-idle")
                raise SessionInvalid("session-idle")
            session = fresh
        if max_lifetime is not None and now >= session.created + max_lifetime:
            raise SessionInvalid("session-expired")
        if idle_timeout is not None and now >= session.last_active + idle_timeout:
            fresh = await self._read(session.key)  # activity seen by another process counts
            if fresh is None or now >= fresh.last_active + idle_timeout:
                raise SessionInvalid("session-idle")
            session = fresh
        return session

    def within_limits(
        self,
        session: Session,
        *,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
    ) -> bool:
        """True when no limit has been reached: the common case, decided without any I/O."""
        now = self._clock()
        idle = self.limits.idle_timeout if idle_timeout is None else idle_timeout
        life = self.limits.max_lifetime if max_lifetime is None else max_lifetime
        return now < session.last_active + min(idle, self.limits.idle_timeout) and now < min(
            session.created + life, session.expires(self.limits)
        )

    def touch_due(self, session: Session) -> bool:
        """Whether this request's activity should be written (cheap; no I/O)."""
        return self._clock() - session.last_active >= self._touch_interval

    async def touch(self, session: Session) -> None:
        """Record activity (an authorized request); written at most every TOUCH_INTERVAL."""
        now = self._clock()
        if now - session.last_active < self._touch_interval or session.key in self._touching:
            return
        # Cached first: requests arriving while the write is under way must not write again.
        cached = self._cache.get(session.key)
        if cached is not None:
            self._cache[session.key] = replace(cached, last_active=max(cached.last_active, now))
        self._touching.add(session.key)
        try:
            blob = self._sealer.seal(_SEEN, session.key, repr(now).encode())
            await self._store.put(_SEEN, session.key, blob, self._ttl(session))
        finally:
            self._touching.discard(session.key)

    async def update(self, session: Session, **changes: object) -> Session:
        """Change a session (refreshed claims, tokens); every process drops its cached copy."""
        updated = replace(session, version=session.version + 1, **changes)  # type: ignore[arg-type]
        await self._save(updated)
        # SECURITY: an update racing end() must not bring the session back (end tombstones first).
        if await self._store.get("revoked", session.key) is not None:
            await self._store.delete("session", session.key)
            self._cache.pop(session.key, None)
            raise SessionInvalid("session-revoked")
        await self._store.publish(CHANNEL, session.key.encode())
        return updated

    # -- ending ------------------------------------------------------------------------------

    async def end(self, key: str, reason: str, actor: str = "gateway") -> bool:
        """End one session everywhere; a tombstone remembers it until its lifetime ends."""
        session = self._cache.pop(key, None) or await self._read(key)
        ttl = self._ttl(session) if session is not None else self.limits.max_lifetime
        ended = {"reason": reason, "actor": actor}
        if session is not None:
            ended |= {"user": session.user, "identity": session.identity, "handle": session.handle}
        tombstone = self._sealer.seal("revoked", key, orjson.dumps(ended))
        await self._store.put("revoked", key, tombstone, ttl)  # before the delete: see update
        existed = await self._store.delete("session", key)
        await self._store.delete(_SEEN, key)
        if session is not None:
            await self._store.index_remove("user-sessions", _digest(session.identity), key)
            await self._store.index_remove(_ALL, "all", key)
            await self._store.index_remove(_HANDLES, session.handle, key)
        await self._store.publish(CHANNEL, key.encode())
        if existed and session is not None:
            fields = {"session": session.handle, "user": session.user, "sub": session.sub}
            emit(Event("session.ended", {**fields, "reason": reason, "actor": actor}))
        return existed

    def _ended(self, key: str, tombstone: bytes) -> dict[str, str]:
        plain = self._sealer.open("revoked", key, tombstone)
        return orjson.loads(plain) if plain is not None else {"reason": "unknown"}

    async def end_user(self, iss: str, sub: str, reason: str, actor: str = "gateway") -> int:
        keys = await self._store.index_members("user-sessions", _digest(f"{iss}|{sub}"))
        return sum([await self.end(key, reason, actor) for key in sorted(keys)])

    async def end_sid(self, iss: str, sid: str, reason: str, actor: str = "gateway") -> int:
        keys = await self._store.index_members("sid-sessions", _digest(f"{iss}|{sid}"))
        return sum([await self.end(key, reason, actor) for key in sorted(keys)])

    async def of_user(self, iss: str, sub: str) -> list[Session]:
        return await self.of_identity(f"{iss}|{sub}")

    async def of_identity(self, identity: str) -> list[Session]:
        """The sessions of one `iss|sub`, oldest first."""
        return await self._live(await self._store.index_members("user-sessions", _digest(identity)))

    async def listing(self) -> list[Session]:
        """Every stored session, oldest first (the admin API)."""
        return await self._live(await self._store.index_members(_ALL, "all"))

    async def find(self, handle: str) -> Session | None:
        """The session with this public handle, whoever it belongs to (the admin API)."""
        found = await self._live(await self._store.index_members(_HANDLES, handle))
        return next((s for s in found if s.handle == handle), None)

    async def _live(self, keys: Iterable[str]) -> list[Session]:
        found = [await self._read(key) for key in keys]
        return sorted((s for s in found if s is not None), key=lambda s: s.created)

    async def by_handle(self, iss: str, sub: str, handle: str) -> Session | None:
        return next((s for s in await self.of_user(iss, sub) if s.handle == handle), None)

    def watch(self, key: str) -> asyncio.Event:
        """An event set when the session changes or ends (long-lived streams re-check then)."""
        event = asyncio.Event()
        self._watchers.setdefault(key, set()).add(event)
        return event

    def unwatch(self, key: str, event: asyncio.Event) -> None:
        watchers = self._watchers.get(key)
        if watchers is not None:
            watchers.discard(event)
            if not watchers:
                del self._watchers[key]

    async def _enforce_max_per_user(self, session: Session) -> None:
        if self.limits.max_per_user <= 0:
            return
        sessions = await self.of_user(session.iss, session.sub)
        for old in sessions[: max(len(sessions) - self.limits.max_per_user, 0)]:
            await self.end(old.key, "max-per-user")

    # -- storage -----------------------------------------------------------------------------

    def _ttl(self, session: Session) -> float:
        return max(session.expires(self.limits) + _EXPIRED_GRACE - self._clock(), 1.0)

    async def _save(self, session: Session) -> None:
        blob = self._sealer.seal("session", session.key, orjson.dumps(asdict(session)))
        await self._store.put("session", session.key, blob, self._ttl(session))
        self._remember(self._cache, session.key, session)

    async def _read(self, key: str) -> Session | None:
        generation = self._generation
        blob = await self._store.get("session", key)
        if blob is None:
            return None
        plain = self._sealer.open("session", key, blob)
        if plain is None:
            # SECURITY: a record that does not open (tampered, foreign key) is treated as absent.
            log.warning("a session record failed to open and is ignored", extra={"key": key[:8]})
            return None
        data = orjson.loads(plain)
        session = Session(**{**data, "groups": tuple(data["groups"]), "amr": tuple(data["amr"])})
        seen = self._sealer.open(_SEEN, key, await self._store.get(_SEEN, key))
        if seen is not None:
            session = replace(session, last_active=max(session.last_active, float(seen)))
        if generation == self._generation:  # no invalidation raced this read: safe to cache
            self._remember(self._cache, key, session)
        return session

    def _remember(self, cache: dict[str, _V], key: str, value: _V) -> None:
        """Bounded: when full, the oldest eighth goes (no cliff where every entry goes)."""
        if key not in cache and len(cache) >= self._cache_max:
            for old in list(itertools.islice(cache, max(self._cache_max // 8, 1))):
                del cache[old]
        cache[key] = value


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
