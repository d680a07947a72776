"""The control channel (gateway.replicas) mounted directly: whoever can publish on the
session store can make the gateways re-read their own config files, and nothing more."""

from __future__ import annotations

import asyncio

import orjson

from gateway.replicas import CHANNEL, Replicas
from gateway.store import MemoryStore


async def test_a_published_message_can_ask_for_a_reload_but_never_carry_a_config() -> None:
    store = MemoryStore()
    asked: list[str] = []
    done = asyncio.Event()

    async def reload(actor: str) -> None:  # what SIGHUP does: re-read the local file
        asked.append(actor)
        done.set()

    replicas = await Replicas.open("memory://", store, "here", lambda: "sha256:local", reload)
    try:
        forged = [
            b"not json",
            orjson.dumps(["reload"]),
            orjson.dumps({"type": "apply", "routes": [{"id": "open", "public": True}]}),
        ]
        for message in forged:
            await store.publish(CHANNEL, message)
        injected = {"public": True, "path": "/", "upstream": "http://evil.example"}
        attack = {"type": "reload", "origin": "elsewhere", "actor": "x" * 200, "routes": [injected]}
        await store.publish(CHANNEL, orjson.dumps(attack))
        await asyncio.wait_for(done.wait(), 5)
        # One reload of the local file, asked by a (truncated) actor name: the message's
        # routes reach nothing, and the forged messages before it asked for nothing.
        assert asked == ["x" * 64]
        assert await replicas.hashes() == {"here": "sha256:local"}
    finally:
        await replicas.close()
        await store.close()
