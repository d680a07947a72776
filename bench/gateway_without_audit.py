"""`gateway` with its audit log replaced by a writer that drops every record: bench only.

The baseline for "logging adds at most 10% to the protected path's CPU per request": the
same gateway, the same config, the same requests, with `open_recorder` patched to hand the
pipeline a recorder whose writer keeps nothing. Everything else (record building included)
still runs, except the writer's work; see bench/README.md. Never a way to run the product:
it exists only in bench/ and says so in its process title.

    .venv/bin/python bench/gateway_without_audit.py run -c CONFIG
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway import app
from gateway.audit.recorder import Recorder
from gateway.cli import main
from gateway.settings import Settings


class NullWriter:
    """AuditWriter's interface, keeping nothing."""

    healthy = True
    origin = "no-audit"

    def submit(
        self,
        type: str,
        fields: Mapping[str, Any],
        *,
        durable: bool = False,
        anonymous: bool = False,
    ) -> asyncio.Future[None] | None:
        if not durable:
            return None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def post(self, type: str, fields: Mapping[str, Any], *, anonymous: bool = False) -> bool:
        return True

    def add_listener(self, fn: Callable[..., None]) -> None:
        pass

    @property
    def stats(self) -> dict[str, int | str]:
        return {"queued": 0}

    async def close(self, give_up_after: float | None = None) -> None:
        pass


async def open_null_recorder(
    settings: Settings,
    clock: Callable[[], float] = time.time,
    files: object = None,
    plugins: object = None,
    worker: int = 0,
) -> Recorder:
    methods = frozenset(settings.audit.sync_methods)
    return Recorder(NullWriter(), b"k" * 32, methods, clock)  # type: ignore[arg-type]


app.open_recorder = open_null_recorder  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main())
