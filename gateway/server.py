"""The serving process: listener (TLS optional), signals, graceful shutdown.

SIGTERM or SIGINT: stop accepting, let in-flight requests finish for up to
SHUTDOWN_TIMEOUT seconds, close upstream connections, exit 0. SIGHUP: reload
the config file's routes and policies and the admin tokens (gateway.reload).

With `server.workers: N` this is one worker of N (gateway.supervisor): it binds the port
its parent reserved with SO_REUSEPORT, names its audit chain after its index, reports
`worker.started` to the parent instead of `server.started`, and stops when the parent goes.
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
from gateway.replicas import Replicas
from gateway.sessions import Clock
from gateway.settings import Settings
from gateway.store import SessionStore
from gateway.supervisor import Worker, lifeline, report_ready

SHUTDOWN_TIMEOUT = 30.0
_ALONE = Worker()  # a single process: server.listen as configured
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
        if self.gateway.replicas is not None:
            await self.gateway.replicas.reloaded()  # the new hash in /readyz everywhere
        return prepared.ok

    async def stop(self) -> None:
        self.gateway.draining = True
        await self.runner.cleanup()  # stop accepting; wait for in-flight requests (bounded)
        if self.admin is not None:
            await self.admin.stop()
        if self.gateway.replicas is not None:
            await self.gateway.replicas.close()
        await self.gateway.close()


async def listen(
    settings: Settings,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    clock: Clock = time.time,
    audit_files: FileLayer | None = None,
    worker: Worker = _ALONE,
) -> Listening:
    admin = await AdminApi.open(settings)  # a bad tokens file stops start-up before any listener
    gateway = Gateway(settings, clock, audit_files, worker=worker.index)
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
            runner,
            address.host,
            worker.port or address.port,
            ssl_context=listener_tls(settings),
            backlog=1024,
            reuse_port=worker.shared,  # N workers on one port (gateway.supervisor)
        )
        await site.start()
        if admin is not None:
            await admin.start(gateway, shutdown_timeout, worker.admin_port, worker.shared)
    except BaseException:
        # A port already taken must not leave stores and threads running behind the error.
        if admin is not None:
            await admin.stop()
        await runner.cleanup()
        await gateway.close()
        raise
    addresses = tuple(_address(s.getsockname()) for s in _sockets(site))
    listening = Listening(gateway, runner, addresses, admin)
    try:
        gateway.replicas = await _replicas(settings, listening, worker)
    except BaseException:
        await listening.stop()
        raise
    return listening


async def _replicas(settings: Settings, listening: Listening, worker: Worker) -> Replicas:
    """This process among the others sharing its session store (reload fan-out, /readyz)."""
    gateway = listening.gateway
    assert gateway.audit is not None
    store: SessionStore | None = gateway.auth.store if gateway.auth is not None else None
    shared = settings.server.workers > 1 or settings.state.sessions.scheme.startswith("redis")
    return await Replicas.open(
        str(settings.state.sessions) if shared else "memory://",
        store,
        gateway.audit.writer.origin,
        lambda: gateway.runtime.policies.hash,
        listening.reload,
        worker.index,
    )


def listener_tls(settings: Settings) -> ssl.SSLContext | None:
    tls = settings.server.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


GC_THRESHOLDS = (20_000, 50, 100)  # CPython's default: (700, 10, 10)


async def serve(settings: Settings, worker: Worker | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or, as a worker, until the parent goes), then stop."""
    listening = await listen(settings, worker=worker or _ALONE)
    # The config (thousands of route objects) lives as long as the process: keep it out of every
    # full garbage collection, which would otherwise pause the loop in proportion to its size.
    gc.freeze()
    # A request's objects die young, mostly by reference counting: a collection every 20,000
    # allocations instead of every 700 scans far fewer of them (measured: 3 µs less CPU per
    # protected request, bench/run.py) for at most a few MB of cyclic garbage waiting longer.
    gc.set_threshold(*GC_THRESHOLDS)
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
    kind, who = "server", {}
    if worker is not None:  # the parent says server.started, once every worker serves
        kind, who = "worker", {"worker": worker.index, "origin": _origin(listening)}
    started = {**_started(settings, listening), **who}
    emit(Event(f"{kind}.started", started))  # after the handlers: a SIGHUP now is a reload
    parent = await lifeline(stop.set) if worker is not None else None
    if worker is not None:
        report_ready(started)
    try:
        await stop.wait()
        emit(Event(f"{kind}.stopping", {"grace_seconds": SHUTDOWN_TIMEOUT, **who}))
    finally:
        if parent is not None:
            parent.close()
        await listening.stop()
    emit(Event(f"{kind}.stopped", who))


def _started(settings: Settings, listening: Listening) -> dict[str, object]:
    return {
        "version": __version__,
        "listen": list(listening.addresses),
        "admin": list(listening.admin.addresses) if listening.admin else None,
        "routes": len(settings.routes),
        "config": str(settings.source),
    }


def _origin(listening: Listening) -> str:
    assert listening.gateway.replicas is not None
    return listening.gateway.replicas.origin


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
