"""The serving process: listener (TLS optional), signals, graceful shutdown.

SIGTERM or SIGINT: stop accepting, let in-flight requests finish for up to
SHUTDOWN_TIMEOUT seconds, close upstream connections, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl

from aiohttp import web

from gateway import __version__
from gateway.app import create_app
from gateway.events import Event, emit
from gateway.settings import Settings

SHUTDOWN_TIMEOUT = 30.0
log = logging.getLogger("gateway.server")


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
    runner = web.AppRunner(
        create_app(settings),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    listen = settings.server.listen
    site = web.TCPSite(
        runner, listen.host, listen.port, ssl_context=listener_tls(settings), backlog=1024
    )
    await site.start()
    addresses = [_address(sock.getsockname()) for sock in _sockets(site)]
    emit(
        Event(
            "server.started",
            {
                "version": __version__,
                "listen": addresses,
                "routes": len(settings.routes),
                "config": str(settings.source),
            },
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        emit(Event("server.stopping", {"grace_seconds": SHUTDOWN_TIMEOUT}))
    finally:
        await runner.cleanup()
    emit(Event("server.stopped"))


def _sockets(site: web.TCPSite) -> list[socket.socket]:
    server = site._server  # aiohttp keeps the asyncio.Server here; its sockets give the real port
    return list(getattr(server, "sockets", None) or [])


def _address(name: object) -> str:
    host, port = name[0], name[1]  # type: ignore[index]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (SPEC §2), the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
