"""`memory://`: the session store in this process's dicts, for tests and the demo.

Nothing survives a restart and nothing is shared between processes. Expiry follows an
injectable clock, so tests move time instead of sleeping; expired entries read as absent
and are swept now and then on writes. Each operation runs without awaiting, so each one is
atomic against every other task.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from gateway.store.base import OnConnect, Subscription, check_kind, check_ttl
from gateway.store.pubsub import LocalHub

_SWEEP_EVERY = 60.0  # seconds of clock between sweeps of expired entries

_Entry = tuple[bytes, float]  # value, expires at


class MemoryStore:
    """A `SessionStore` in dicts."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: dict[tuple[str, str], _Entry] = {}
        self._indexes: dict[tuple[str, str], dict[str, float]] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._hub = LocalHub()
        self._next_sweep = clock() + _SWEEP_EVERY

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._values)} values>"

    async def put(self, kind: str, key: str, value: bytes, ttl: float) -> None:
        self._values[check_kind(kind), key] = (bytes(value), self._expiry(ttl))

    async def get(self, kind: str, key: str) -> bytes | None:
        entry = self._live(kind, key)
        return None if entry is None else entry[0]

    async def delete(self, kind: str, key: str) -> bool:
        return await self.take(kind, key) is not None

    async def take(self, kind: str, key: str) -> bytes | None:
        entry = self._values.pop((kind, key), None)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def put_if_absent(self, kind: str, key: str, value: bytes, ttl: float) -> bool:
        if self._live(kind, key) is not None:
            return False
        self._values[check_kind(kind), key] = (bytes(value), self._expiry(ttl))
        return True

    async def incr(self, kind: str, key: str, ttl: float) -> int:
        entry = self._live(kind, key)
        if entry is None:
            self._values[check_kind(kind), key] = (b"1", self._expiry(ttl))
            return 1
        count = int(entry[0]) + 1  # ValueError if the value is not a counter
        self._values[kind, key] = (str(count).encode(), entry[1])
        return count

    async def advance(self, kind: str, key: str, value: int, ttl: float) -> bool:
        expires = self._expiry(ttl)
        entry = self._live(check_kind(kind), key)
        # SECURITY: only a greater step is stored: no TOTP code is accepted twice, or an older one.
        if entry is not None and not _below(entry[0], value):
            return False
        self._values[kind, key] = (str(value).encode(), expires)
        return True

    async def index_add(self, kind: str, key: str, member: str, ttl: float) -> None:
        members = self._indexes.setdefault((check_kind(kind), key), {})
        members[member] = self._expiry(ttl)

    async def index_members(self, kind: str, key: str) -> set[str]:
        now = self._clock()
        members = self._indexes.get((kind, key), {})
        return {member for member, expires in members.items() if expires > now}

    async def index_remove(self, kind: str, key: str, member: str) -> None:
        members = self._indexes.get((kind, key))
        if members is not None:
            members.pop(member, None)
            if not members:
                del self._indexes[kind, key]

    async def acquire(self, name: str, ttl: float) -> str | None:
        held = self._locks.get(name)
        if held is not None and held[1] > self._clock():
            return None
        token = secrets.token_urlsafe(16)
        self._locks[name] = (token, self._expiry(ttl))
        return token

    async def release(self, name: str, token: str) -> None:
        held = self._locks.get(name)
        # SECURITY: only the holder's token releases; a late finisher cannot free another's lock.
        if held is not None and held[0] == token:
            del self._locks[name]

    async def publish(self, channel: str, message: bytes) -> None:
        self._hub.publish(channel, bytes(message))

    async def subscribe(self, channel: str, *, on_connect: OnConnect | None = None) -> Subscription:
        return await self._hub.subscribe(channel, on_connect)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        await self._hub.close()

    def _live(self, kind: str, key: str) -> _Entry | None:
        entry = self._values.get((kind, key))
        return entry if entry is not None and entry[1] > self._clock() else None

    def _expiry(self, ttl: float) -> float:
        """The expiry time `ttl` seconds from now; sweeps expired entries now and then."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        return now + check_ttl(ttl)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_EVERY
        self._values = {k: entry for k, entry in self._values.items() if entry[1] > now}
        self._locks = {k: held for k, held in self._locks.items() if held[1] > now}
        for index_key, members in list(self._indexes.items()):
            live = {member: expires for member, expires in members.items() if expires > now}
            if live:
                self._indexes[index_key] = live
            else:
                del self._indexes[index_key]


def _below(raw: bytes, value: int) -> bool:
    """True if `raw` is an integer in ASCII digits (as `str(int)` writes them) below `value`.

    Anything else counts as not below, so `advance` refuses it (fails closed).
    """
    text = raw.decode("ascii", "replace")
    try:
        live = int(text)
    except ValueError:
        return False
    return str(live) == text and live < value
