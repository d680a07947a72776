"""The serving process: listener (TLS optional), signals, graceful shutdown.

SIGTERM or SIGINT: stop accepting, let in-flight requests finish for up to
SHUTDOWN_TIMEOUT seconds, close upstream connections, exit 0. SIGHUP: reload
the config file's routes and policies and the admin tokens (gateway.reload).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import ssl
import time
from dataclasses import dataclass

from aiohttp import web

from gateway import __version__
from gateway.admin import AdminApi, TokensFileError
from gateway.app import Gateway
from gateway.audit.files import FileLayer
from gateway.events import Event, emit
from gateway.sessions import Clock
from gateway.settings import Settings

SHUTDOWN_TIMEOUT = 30.0
log = logging.getLogger("gateway.server")


@dataclass(frozen=True, slots=True)
class Listening:
    """A started gateway and its listeners; `stop()` is the graceful shutdown."""

    gateway: Gateway
    runner: web.ServerRunner
    addresses: tuple[str, ...]
    admin: AdminApi | None = None  # the admin API's own listener (admin.listen), if configured

    @property
    def port(self) -> int:
        return int(self.addresses[0].rsplit(":", 1)[1])

    async def reload(self, actor: str = "signal") -> bool:
        """SIGHUP: the config file's routes and policies, and the admin tokens file."""
        prepared = await self.gateway.reload(actor)
        if self.admin is not None:
            try:
                await self.admin.reload_tokens()
            except (OSError, TokensFileError) as err:  # the tokens in use stay
                log.error("admin tokens not reloaded: %s", err)
        return prepared.ok

    async def stop(self) -> None:
        self.gateway.draining = True
        await self.runner.cleanup()  # stop accepting; wait for in-flight requests (bounded)
        if self.admin is not None:
            await self.admin.stop()
        await self.gateway.close()


async def listen(
    settings: Settings,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    clock: Clock = time.time,
    audit_files: FileLayer | None = None,
) -> Listening:
    admin = await AdminApi.open(settings)  # a bad tokens file stops start-up before any listener
    gateway = Gateway(settings, clock, audit_files)
    await gateway.start()
    runner = web.ServerRunner(
        web.Server(gateway.handle, access_log=None),
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
    )
    try:
        await runner.setup()
        address = settings.server.listen
        site = web.TCPSite(
            runner, address.host, address.port, ssl_context=listener_tls(settings), backlog=1024
        )
        await site.start()
        if admin is not None:
            await admin.start(gateway, shutdown_timeout)
    except BaseException:
        # A port already taken must not leave stores and threads running behind the error.
        await runner.cleanup()
        await gateway.close()
        raise
    addresses = tuple(_address(s.getsockname()) for s in _sockets(site))
    return Listening(gateway, runner, addresses, admin)


def listener_tls(settings: Settings) -> ssl.SSLContext | None:
    tls = settings.server.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully."""
    listening = await listen(settings)
    # The config (thousands of route objects) lives as long as the process: keep it out of every
    # full garbage collection, which would otherwise pause the loop in proportion to its size.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = loop.create_task(listening.reload(), name="gateway:reload")
        reloads.add(task)  # a reference until done (no fire-and-forget)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    started = {
        "version": __version__,
        "listen": list(listening.addresses),
        "admin": list(listening.admin.addresses) if listening.admin else None,
        "routes": len(settings.routes),
        "config": str(settings.source),
    }
    emit(Event("server.started", started))  # after the handlers: a SIGHUP now is a reload
    try:
        await stop.wait()
        emit(Event("server.stopping", {"grace_seconds": SHUTDOWN_TIMEOUT}))
    finally:
        await listening.stop()
    emit(Event("server.stopped"))


def _sockets(site: web.TCPSite) -> list[socket.socket]:
    server = site._server  # aiohttp keeps the asyncio.Server here; its sockets give the real port
    return list(getattr(server, "sockets", None) or [])


def _address(name: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (SPEC §2), the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
