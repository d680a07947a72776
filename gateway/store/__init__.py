"""Ephemeral state: the `SessionStore` protocol and its three stores, chosen by URL.

    memory://                      this process's dicts (tests, the demo)
    sqlite:///path/to/state.db     one SQLite file (the embedded default, one process)
    redis:// rediss://             Redis, shared by every process and replica; also
    redis+sentinel:// redis+cluster://   through Sentinel or a Cluster

`open_session_store(url)` opens one; the contract is in `gateway.store.base`, and one test
suite (tests/test_session_store.py) holds every store to it. A store that cannot be reached
raises `StoreUnavailable`. Values are opaque bytes: callers seal them first
(`gateway.keyring.Sealer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.configtypes import StoreUrl
from gateway.store.base import OnConnect, SessionStore, StoreUnavailable, Subscription
from gateway.store.memory import MemoryStore

__all__ = [
    "MemoryStore",
    "OnConnect",
    "SessionStore",
    "StoreUnavailable",
    "Subscription",
    "open_session_store",
]


async def open_session_store(
    url: StoreUrl | str, *, clock: Callable[[], float] = time.time
) -> SessionStore:
    """The store at `url`. `clock` drives expiry on memory and SQLite (Redis keeps its own).

    ValueError for a URL that is no session store; StoreUnavailable if SQLite cannot open
    its file. Redis connects on first use (`ping()` tells readiness).
    """
    scheme = StoreUrl(url).scheme
    if scheme == "memory":
        return MemoryStore(clock=clock)
    if scheme == "sqlite":
        from gateway.store.sqlite import SqliteStore, sqlite_path

        return await SqliteStore.open(sqlite_path(url), clock=clock)
    if scheme in ("redis", "rediss", "redis+sentinel", "redis+cluster"):
        from gateway.store.redis import RedisStore  # imported only when used: redis is large

        return RedisStore(str(url))
    raise ValueError(f"not a session store URL: {StoreUrl(url).masked()}")
