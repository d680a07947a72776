"""`server.workers: N` on one machine: a parent process supervising N worker processes.

    supervise(settings) -> exit status      the parent (`gateway run` with workers > 1)
    Worker(index, port, admin_port)          what one worker is told (`gateway run --worker`)
    report_ready(started), lifeline(lost)    the worker's side of the protocol

Each worker is `python -m gateway run -c FILE --worker I --port P [--admin-port Q]`: a
fresh interpreter running the same code as a single-process gateway, which `ps` and
systemd show by its index. (multiprocessing's spawn would be the same fresh interpreter,
with pickling and a `__main__` guard in the way.) A worker owns everything a process
owns: its audit chain (origin `origin_for(audit.origin, I)`), its store connections, its
upstream connection pools, its rate-limit buckets. Shared state lives where it always does
with workers > 1 (settings insist): sessions in Redis, records in PostgreSQL.

Ports: the parent binds the public port (and the admin port) with SO_REUSEPORT first,
without listening, which turns `:0` into a real port, fails fast when the port is taken,
and keeps it reserved. Each worker then binds the same port with SO_REUSEPORT and listens;
the kernel spreads connections over the listening sockets. Any worker may answer an admin
call.

Start: worker 0 first (a bad key file or tokens file is then reported once, not N times,
and the audit dir and schemas are made with nobody racing), then the others at once. Each
tells the parent on its stdout when it serves (one line, READY); the parent then says
`server.started` once, with the addresses. A worker that fails to start stops the start:
the parent stops the others and exits with that worker's status.

Signals to the parent: SIGTERM/SIGINT are passed on (each worker drains and ends its chain
with chain.closed); SIGHUP is passed on (each worker reloads its file). A worker's stdin is
a pipe from the parent: when the parent dies, even by SIGKILL, the pipe closes and the
worker stops.

A worker that exits unexpectedly is started again (same index, so the same chain
continues), after the parent checks that the config file still loads and changes nothing
that needs a restart (a worker must never run other stores or keys than its siblings).
More than MAX_RESTARTS attempts within RESTART_WINDOW seconds is a crash loop: the parent
stops everything and exits 1.

Metrics: the parent makes a fresh PROMETHEUS_MULTIPROC_DIR for the workers
(gateway.metrics), tells prometheus-client when a worker is gone, and removes the
directory at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway import __version__
from gateway.configtypes import HostPort
from gateway.events import Event, emit
from gateway.metrics import MULTIPROC_DIR
from gateway.settings import ConfigError, Settings, load_settings

log = logging.getLogger("gateway.supervisor")

READY = b"gateway-worker-ready "  # the line a worker writes on its stdout once it serves
START_TIMEOUT = 60.0  # seconds a worker may take to serve
STOP_TIMEOUT = 40.0  # seconds a worker may take to stop (its own grace is 30 s)
MAX_RESTARTS, RESTART_WINDOW = 5, 60.0
RETRY_DELAY = 1.0  # seconds between attempts to start a worker again


@dataclass(frozen=True, slots=True)
class Worker:
    """One process of server.workers: its index, and the ports its parent reserved."""

    index: int = 0
    port: int | None = None  # None: server.listen's port (a single process)
    admin_port: int | None = None

    @property
    def shared(self) -> bool:
        """Several processes on one port (SO_REUSEPORT)."""
        return self.port is not None


class WorkerFailed(Exception):
    def __init__(self, index: int, status: int) -> None:
        super().__init__(f"worker {index} did not start (exit status {status})")
        self.status = status


# -- the worker's side -------------------------------------------------------------------------


def worker_logs(index: int) -> None:
    """Every line of this worker's process log names it (`"worker": I`)."""

    def tag(record: logging.LogRecord) -> bool:
        record.worker = index
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)


def report_ready(started: dict[str, Any]) -> None:
    """Tell the parent this worker serves (its stdout is a pipe the parent reads)."""
    sys.stdout.buffer.write(READY + orjson.dumps(started) + b"\n")
    sys.stdout.buffer.flush()


class _Lifeline(asyncio.Protocol):
    def __init__(self, lost: Callable[[], None]) -> None:
        self._lost = lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()


async def lifeline(lost: Callable[[], None]) -> asyncio.BaseTransport:
    """Call `lost` when stdin (a pipe from the parent) closes: the parent is gone."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: _Lifeline(lost), sys.stdin)
    return transport


# -- the parent --------------------------------------------------------------------------------


def reserve(address: HostPort) -> socket.socket:
    """Bind (not listen) with SO_REUSEPORT: the port is ours, and known when it was 0."""
    family, kind, proto, _, where = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(where)
    except BaseException:
        sock.close()
        raise
    return sock


async def supervise(settings: Settings) -> int:
    """Run server.workers workers until SIGTERM/SIGINT; the exit status."""
    public = reserve(settings.server.listen)
    admin = reserve(settings.admin.listen) if settings.admin is not None else None
    metrics = tempfile.mkdtemp(prefix="gateway-metrics-")
    try:
        ports = (public.getsockname()[1], admin.getsockname()[1] if admin else None)
        return await _Fleet(settings, ports, metrics).run()
    finally:
        public.close()
        if admin is not None:
            admin.close()
        shutil.rmtree(metrics, ignore_errors=True)


@dataclass
class _Child:
    index: int
    proc: asyncio.subprocess.Process
    output: asyncio.Task[None]  # reads its stdout: READY, then passes lines on


class _Fleet:
    def __init__(self, settings: Settings, ports: tuple[int, int | None], metrics: str) -> None:
        assert settings.source is not None  # `gateway run -c FILE`
        self._settings = settings
        self._ports = ports
        self._metrics = metrics
        self._env = {**os.environ, MULTIPROC_DIR: metrics}
        self._children: dict[int, _Child] = {}
        self._keepers: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._stopping = False
        self._gave_up = False
        self._attempts: deque[float] = deque()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        try:
            started = await self._start_all()
        except WorkerFailed as failed:
            await self._stop_all()
            return failed.status
        emit(Event("server.started", started))
        await self._stop.wait()
        emit(Event("server.stopping", {"grace_seconds": STOP_TIMEOUT}))
        statuses = await self._stop_all()
        emit(Event("server.stopped", {"statuses": statuses}))
        return 1 if self._gave_up or any(statuses) else 0

    def _request_stop(self) -> None:
        # At once, not when run() wakes: a worker that got the terminal's SIGINT too and
        # exits first must not be taken for a crash and started again.
        self._stopping = True
        self._stop.set()

    async def _start_all(self) -> dict[str, Any]:
        first = await self._spawn(0)  # alone: its start-up errors are reported once
        others = range(1, self._settings.server.workers)
        rest = await asyncio.gather(*(self._spawn(i) for i in others))
        for child in self._children.values():
            self._keep(child)
        shown = ("listen", "admin", "routes", "config")
        return {
            "version": __version__,
            **{k: first.get(k) for k in shown},
            "workers": len(self._children),
            "origins": [w.get("origin") for w in (first, *rest)],
            "pids": [w.get("pid") for w in (first, *rest)],
        }

    async def _spawn(self, index: int) -> dict[str, Any]:
        """Start worker `index` and wait until it serves: what it reported."""
        public, admin = self._ports
        args = ["--worker", str(index), "--port", str(public)]
        if admin is not None:
            args += ["--admin-port", str(admin)]
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "run", "-c", str(self._settings.source), *args),
            stdin=asyncio.subprocess.PIPE,  # the lifeline: closed when this process goes
            stdout=asyncio.subprocess.PIPE,
            env=self._env,
        )
        ready: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        output = asyncio.get_running_loop().create_task(
            _pass_on(proc, ready), name=f"worker {index}: stdout"
        )
        self._children[index] = _Child(index, proc, output)
        try:
            started = await asyncio.wait_for(ready, START_TIMEOUT)
        except TimeoutError:
            started = None
        if started is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise WorkerFailed(index, await proc.wait() or 1)
        return started

    def _keep(self, child: _Child) -> None:
        task = asyncio.get_running_loop().create_task(
            self._watch(child), name=f"worker {child.index}: watch"
        )
        self._keepers.add(task)  # a reference until done (no fire-and-forget)
        task.add_done_callback(self._keepers.discard)

    async def _watch(self, child: _Child) -> None:
        status = await child.proc.wait()
        self._gone(child)
        if self._stopping:
            return
        fields = {"worker": child.index, "pid": child.proc.pid, "status": status}
        emit(Event("worker.exited", fields))
        log.error("worker %d exited unexpectedly (status %s): restarting it", child.index, status)
        if await self._respawn(child.index):
            self._keep(self._children[child.index])

    async def _respawn(self, index: int) -> bool:
        """Start worker `index` again, within the crash-loop budget; False if given up."""
        while not self._stopping:
            if not self._within_budget():
                log.error(
                    "workers restarted %d times within %d s: a crash loop; stopping",
                    MAX_RESTARTS,
                    RESTART_WINDOW,
                )
                self._gave_up = True
                self._stop.set()
                return False
            problem = await asyncio.to_thread(_config_problem, self._settings)
            if problem is None:
                try:
                    started = await self._spawn(index)
                except WorkerFailed as failed:
                    problem = str(failed)
                else:
                    emit(Event("worker.restarted", {"worker": index, "pid": started["pid"]}))
                    return True
            log.error("worker %d not restarted: %s", index, problem)
            await asyncio.sleep(RETRY_DELAY)
        return False

    def _within_budget(self) -> bool:
        now = time.monotonic()
        while self._attempts and self._attempts[0] <= now - RESTART_WINDOW:
            self._attempts.popleft()
        if len(self._attempts) >= MAX_RESTARTS:
            return False
        self._attempts.append(now)
        return True

    def _gone(self, child: _Child) -> None:
        """A worker exited: its live gauges leave the metrics, its stdin pipe is closed."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(child.proc.pid, self._metrics)  # type: ignore[no-untyped-call]
        if child.proc.stdin is not None:
            child.proc.stdin.close()

    def _signal_all(self, sig: int) -> None:
        for child in self._children.values():
            if child.proc.returncode is None:
                child.proc.send_signal(sig)

    async def _stop_all(self) -> list[int]:
        """SIGTERM to every worker; their exit statuses (after SIGKILL for a stuck one)."""
        self._stopping = True
        keepers = list(self._keepers)  # a restart under way ends here, its worker registered
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        self._signal_all(signal.SIGTERM)
        children = list(self._children.values())
        statuses = await asyncio.gather(*(_ended(c.proc) for c in children))
        await asyncio.gather(*(c.output for c in children), return_exceptions=True)
        for child in children:
            self._gone(child)
        return list(statuses)


async def _ended(proc: asyncio.subprocess.Process) -> int:
    try:
        return await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
    except TimeoutError:
        log.error("worker pid %d did not stop in %d s: killed", proc.pid, STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return await proc.wait()


async def _pass_on(
    proc: asyncio.subprocess.Process, ready: asyncio.Future[dict[str, Any] | None]
) -> None:
    """A worker's stdout: its READY line resolves `ready`; anything else goes to ours."""
    assert proc.stdout is not None
    async for line in proc.stdout:
        if line.startswith(READY) and not ready.done():
            ready.set_result({**orjson.loads(line[len(READY) :]), "pid": proc.pid})
        else:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
    if not ready.done():
        ready.set_result(None)  # it ended before serving


def _config_problem(settings: Settings) -> str | None:
    """Why a worker must not start from the config file now; None when it may."""
    from gateway.reload import restart_needed

    assert settings.source is not None
    try:
        now = load_settings(Path(settings.source))
    except ConfigError as err:
        return f"the config file has errors: {str(err).splitlines()[0]}"
    changed = restart_needed(settings, now)
    if changed:
        return f"the config file changes what needs a restart of all workers: {', '.join(changed)}"
    return None
