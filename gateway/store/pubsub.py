"""Subscriptions: the queue and connected-state every store's pub/sub shares, and the
in-process hub that the single-process stores (memory, SQLite) publish through.

A `QueueSubscription` is fed by its store (`deliver`), and told when its link comes up
(`mark_connected`, which first runs the caller's `on_connect` hook) or drops
(`mark_disconnected`). The consumer iterates it; `close()` ends the iteration.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

from gateway.store.base import OnConnect

_CLOSED = object()


class QueueSubscription:
    """One channel's messages in arrival order, and whether the link is up."""

    def __init__(
        self,
        channel: str,
        on_connect: OnConnect | None,
        on_close: Callable[[QueueSubscription], Awaitable[None]],
    ) -> None:
        self.channel = channel
        self._on_connect = on_connect
        self._on_close = on_close
        self._queue: asyncio.Queue[bytes | object] = asyncio.Queue()
        self._up = asyncio.Event()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self.connected else "waiting"
        return f"<{type(self).__name__} {self.channel!r} {state}>"

    @property
    def connected(self) -> bool:
        return self._up.is_set() and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_connected(self) -> bool:
        """Wait until connected (True) or closed (False); bound it with `asyncio.timeout`."""
        await self._up.wait()
        return not self._closed

    async def mark_connected(self) -> None:
        """Run the `on_connect` hook, then report connected (an error in the hook propagates)."""
        if self._on_connect is not None:
            result = self._on_connect()
            if inspect.isawaitable(result):
                await result
        if not self._closed:
            self._up.set()

    def mark_disconnected(self) -> None:
        if not self._closed:
            self._up.clear()

    def deliver(self, message: bytes) -> None:
        if not self._closed:
            self._queue.put_nowait(message)

    def __aiter__(self) -> QueueSubscription:
        return self

    async def __anext__(self) -> bytes:
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # every later reader ends too
            raise StopAsyncIteration
        assert isinstance(item, bytes)
        return item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._up.set()  # wakes every wait_connected(), which then reports False
        self._queue.put_nowait(_CLOSED)
        await self._on_close(self)


class LocalHub:
    """In-process pub/sub: what one process publishes, its own subscribers receive."""

    def __init__(self) -> None:
        self._channels: dict[str, set[QueueSubscription]] = {}

    async def subscribe(self, channel: str, on_connect: OnConnect | None) -> QueueSubscription:
        subscription = QueueSubscription(channel, on_connect, self._drop)
        self._channels.setdefault(channel, set()).add(subscription)
        try:
            await subscription.mark_connected()
        except BaseException:
            await subscription.close()
            raise
        return subscription

    def publish(self, channel: str, message: bytes) -> None:
        for subscription in self._channels.get(channel, ()):
            subscription.deliver(message)

    async def close(self) -> None:
        for subscriptions in list(self._channels.values()):
            for subscription in list(subscriptions):
                await subscription.close()

    async def _drop(self, subscription: QueueSubscription) -> None:
        subscribers = self._channels.get(subscription.channel)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._channels[subscription.channel]
