"""The processes sharing one session store see each other: reload fan-out, policy hashes.

    await Replicas.open(settings, store, origin, reload)   one per process
      .reloaded()            after this process reloaded: its hash in the store now
      .announce(actor)       ask every other process to reload (admin `POST /reload`)
      .hashes()              {origin: policy hash} of every live process
      .converged(hash, s)    the hashes once all equal `hash` (or `s` seconds passed)
      .connected, .close()

Each process keeps `("worker", ORIGIN)` in the session store: its policy hash, pid and
worker index, rewritten every BEAT seconds with a TTL of TTL seconds, and listed in the
index `("worker", "all")`. A process that stops removes its entry; one that dies drops out
when the TTL runs out. `/readyz` shows the list, so a worker left on an old policy is
visible.

A reload request is a message on the store's channel CHANNEL, naming the actor and the
origin that sent it. Every subscribed process but the sender re-reads its own config file
(SIGHUP's reload: routes, policies, admin tokens) and writes its new hash. Requests that
arrive during a reload are folded into one more reload after it.

With Redis sessions this reaches every process on every machine sharing that Redis (which
should serve the same config file anyway). With a store of one process (memory, SQLite),
the list holds this process alone and a request reaches nobody else: there is nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable

import orjson

from gateway.store import SessionStore, StoreUnavailable, Subscription, open_session_store

log = logging.getLogger("gateway.replicas")

CHANNEL = "gateway:control"
KIND, INDEX = "worker", "all"
BEAT = 5.0  # seconds between rewrites of this process's entry
TTL = 20.0  # seconds an entry outlives its last rewrite
POLL = 0.05  # seconds between looks at the hashes while waiting for them to converge
_START_TIMEOUT = 5.0  # seconds to wait for the channel at start
_CLOSE_TIMEOUT = 5.0  # seconds a task may take to end at close

Reload = Callable[[str], Awaitable[object]]  # reload(actor): what SIGHUP does


class Replicas:
    def __init__(
        self,
        store: SessionStore,
        origin: str,
        policy_hash: Callable[[], str],
        reload: Reload,
        owned: bool,
        worker: int,
    ) -> None:
        self.origin = origin
        self._store = store
        self._hash = policy_hash
        self._reload = reload
        self._owned = owned  # opened here (all routes public): closed here too
        self._worker = worker
        self._requested: str | None = None  # the actor of a reload asked for, not yet done
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._subscription: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(
        cls,
        url: str,
        store: SessionStore | None,
        origin: str,
        policy_hash: Callable[[], str],
        reload: Reload,
        worker: int = 0,
    ) -> Replicas:
        """Follow the control channel on `store` (or on a store opened from `url`)."""
        owned = store is None
        if store is None:
            store = await open_session_store(url)
        self = cls(store, origin, policy_hash, reload, owned, worker)
        self._subscription = await store.subscribe(CHANNEL)
        with contextlib.suppress(TimeoutError):  # not yet: /readyz says so until it is
            await asyncio.wait_for(self._subscription.wait_connected(), _START_TIMEOUT)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(self._subscription), name="replicas:listen"),
            loop.create_task(self._reloader(), name="replicas:reload"),
            loop.create_task(self._beat(), name="replicas:beat"),
        ]
        return self

    @property
    def connected(self) -> bool:
        return self._subscription is not None and self._subscription.connected

    async def reloaded(self) -> None:
        """This process applied a reload (or tried): its hash in the store at once."""
        with contextlib.suppress(StoreUnavailable):
            await self._write()

    async def announce(self, actor: str) -> None:
        message = {"type": "reload", "actor": actor, "origin": self.origin}
        message["id"] = secrets.token_hex(8)
        await self._store.publish(CHANNEL, orjson.dumps(message))

    async def hashes(self) -> dict[str, str]:
        """{origin: policy hash} of the live processes; this one's from memory."""
        found = {self.origin: self._hash()}
        for origin in sorted(await self._store.index_members(KIND, INDEX)):
            if origin == self.origin:
                continue
            raw = await self._store.get(KIND, origin)
            if raw is not None:
                found[origin] = str(orjson.loads(raw).get("policy_hash"))
        return found

    async def converged(self, policy_hash: str, within: float) -> dict[str, str]:
        """The hashes once every live process has `policy_hash`, or after `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            found = await self.hashes()
            if set(found.values()) == {policy_hash} or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(POLL)

    async def close(self) -> None:
        # No cancel() in the middle of a store call: a Redis client may swallow it, and the
        # task would then never end. Each task ends by itself once told.
        self._closing.set()
        self._wake.set()
        if self._subscription is not None:
            await self._subscription.close()  # ends _listen
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=_CLOSE_TIMEOUT)
            for task in stuck:
                task.cancel()
        with contextlib.suppress(StoreUnavailable):  # gone from /readyz at once
            await self._store.delete(KIND, self.origin)
            await self._store.index_remove(KIND, INDEX, self.origin)
        if self._owned:
            await self._store.close()

    async def _write(self) -> None:
        entry = {
            "policy_hash": self._hash(),
            "pid": os.getpid(),
            "worker": self._worker,
            "at": time.time(),
        }
        await self._store.put(KIND, self.origin, orjson.dumps(entry), TTL)
        await self._store.index_add(KIND, INDEX, self.origin, TTL)

    async def _beat(self) -> None:
        while not self._closing.is_set():
            try:
                await self._write()
            except StoreUnavailable:
                log.warning("replicas: the session store is unavailable; entry not renewed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), BEAT)

    async def _listen(self, subscription: Subscription) -> None:
        async for raw in subscription:
            try:
                message = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            # SECURITY: a message carries no configuration, only a request to re-read the
            # local file: whoever can publish on the store can cause a reload, not a change.
            if not isinstance(message, dict) or message.get("type") != "reload":
                continue
            if message.get("origin") == self.origin:
                continue  # the sender reloaded itself before announcing
            self._requested = str(message.get("actor", "unknown"))[:64]
            self._wake.set()

    async def _reloader(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closing.is_set():
                return
            actor, self._requested = self._requested or "unknown", None
            try:
                await self._reload(actor)
            except Exception:
                log.exception("replicas: a requested reload failed")
            await self.reloaded()
