"""The contract every session store keeps: the `SessionStore` protocol and its one error.

The session store holds ephemeral state (sessions, login states, handoff codes, replay
guards, lockouts, revocation tombstones) as opaque bytes under `(kind, key)`, each with a
TTL in seconds; callers seal values (`gateway.keyring.Sealer`) before `put`, so the store
never sees a secret in the clear and write access to it is no way to mint a session.

Namespaces: values and counters share `(kind, key)` (a counter is a value holding ASCII
digits, so `get` reads it and `delete` resets it); index sets and locks each have their own.

    StoreUnavailable (a GatewayError, 503 store-unavailable)
        the store cannot be reached or failed; never a raw redis or sqlite exception.
        Callers fail closed on it.

Atomic operations (`take`, `put_if_absent`, `incr`, `advance`, `acquire`/`release`) stay
atomic across processes on Redis and SQLite, and across tasks everywhere.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from gateway.errors import GatewayError

# Run on every (re)subscribe, before `connected` turns True (flush caches there).
OnConnect = Callable[[], Awaitable[None] | None]

_KIND = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class StoreUnavailable(GatewayError):
    """The session store cannot be reached; requests that need it fail closed."""

    status = 503
    reason = "store-unavailable"

    def __init__(self, detail: str = "the session store is unavailable") -> None:
        # The detail reaches clients: the cause (addresses, paths) stays in __cause__ only.
        super().__init__(detail)


def check_kind(kind: str) -> str:
    """`kind` if it is a short namespace like `session` or `totp-step`; ValueError if not."""
    if not _KIND.fullmatch(kind):
        raise ValueError(f"bad record kind {kind!r}: use [a-z][a-z0-9_-]*, at most 32 long")
    return kind


def check_ttl(ttl: float) -> float:
    """`ttl` if it is a positive number of seconds; ValueError if not."""
    if not ttl > 0:
        raise ValueError(f"a TTL must be positive, got {ttl!r}")
    return ttl


class Subscription(Protocol):
    """Messages of one pub/sub channel, as an async iterator of bytes.

    `connected` is False until subscribed and the `on_connect` hook has run, and again
    whenever the link drops; messages published meanwhile are lost, so callers refuse what
    needs them while unsubscribed and flush their caches in `on_connect`.
    """

    @property
    def channel(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self) -> bool:
        """Wait until connected (True) or closed (False); bound it with `asyncio.timeout`."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def __anext__(self) -> bytes: ...

    async def close(self) -> None: ...


class SessionStore(Protocol):
    """Ephemeral state with TTLs; all values opaque bytes, all TTLs seconds."""

    async def put(self, kind: str, key: str, value: bytes, ttl: float) -> None:
        """Store `value`, replacing any, for `ttl` seconds."""

    async def get(self, kind: str, key: str) -> bytes | None:
        """The live value, or None."""

    async def delete(self, kind: str, key: str) -> bool:
        """Remove the value; True if a live one was there."""

    async def take(self, kind: str, key: str) -> bytes | None:
        """Get and delete at once: of two concurrent takers exactly one gets the value."""

    async def put_if_absent(self, kind: str, key: str, value: bytes, ttl: float) -> bool:
        """Store `value` only if no live value is there; True if stored (replay guards)."""

    async def incr(self, kind: str, key: str, ttl: float) -> int:
        """Add one to a counter that expires `ttl` seconds after its first increment."""

    async def advance(self, kind: str, key: str, value: int, ttl: float) -> bool:
        """Store the integer `value` (for `ttl` seconds from now) only if it is greater than
        the live value, or there is none; True if stored. Of concurrent callers with the same
        value exactly one gets True (TOTP replay guards: the last accepted time step).
        """

    async def index_add(self, kind: str, key: str, member: str, ttl: float) -> None:
        """Add `member` to the set `(kind, key)`, expiring `ttl` seconds from now."""

    async def index_members(self, kind: str, key: str) -> set[str]:
        """The live members of the set `(kind, key)`."""

    async def index_remove(self, kind: str, key: str, member: str) -> None:
        """Remove `member` from the set `(kind, key)`."""

    async def acquire(self, name: str, ttl: float) -> str | None:
        """Take the lock `name` for at most `ttl` seconds: its token, or None if held."""

    async def release(self, name: str, token: str) -> None:
        """Release the lock `name` if `token` still holds it; otherwise do nothing."""

    async def publish(self, channel: str, message: bytes) -> None:
        """Send `message` to every current subscriber of `channel`."""

    async def subscribe(self, channel: str, *, on_connect: OnConnect | None = None) -> Subscription:
        """Follow `channel`; `on_connect` runs on every (re)subscribe."""

    async def ping(self) -> bool:
        """True if the store answers (readiness); never raises."""

    async def close(self) -> None:
        """Close subscriptions and connections."""
