"""Shared test parts: real servers on loopback, a real gateway, raw HTTP for raw request lines."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
import pytest
import yaml
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.keyfiles import generate
from gateway.server import Listening, listen
from gateway.settings import load_settings

IN_CI = os.environ.get("CI") == "true"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    runner: web.BaseRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_server(app: web.Application, host: str = "127.0.0.1", **site: Any) -> Server:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, host, 0, **site)
    await tcp.start()
    port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Server(runner, port)


def gateway_config(routes: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A config for a gateway on loopback serving only `routes`; sections override defaults."""
    config: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "public_url": "http://gw.test"},
        "state": {"sessions": "memory://", "records": "memory://"},
        "audit": {"dir": "audit"},  # beside the config file: each test's own tmp dir
        "routes": routes,
    }
    for name, value in sections.items():
        config[name] = {**config.get(name, {}), **value}
    return config


StartGateway = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """Start an in-process gateway from a config dict (written to a real YAML file first)."""
    started: list[Listening] = []

    async def start(config: dict[str, Any]) -> Server:
        if config.get("audit", {}).get("dir") == "audit":  # two gateways never share one chain
            config = {**config, "audit": {**config["audit"], "dir": f"audit-{len(started)}"}}
        path = tmp_path / f"gateway-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        listening = await listen(load_settings(path), shutdown_timeout=5)
        started.append(listening)
        return Server(listening.runner, listening.port)

    yield start
    for listening in started:
        await listening.stop()


async def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as given (no client library normalizes them); read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        return status, headers, body
    finally:
        writer.close()


def get(target: str, host: str = "gw.test", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()


def echo_app() -> web.Application:
    """An upstream that answers with what it received: the raw path and the headers.

    `?set-cookie=a,b` makes it set cookies of those names too.
    """

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen = {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_length": len(body),
        }
        response = web.Response(body=orjson.dumps(seen), content_type="application/json")
        for name in filter(None, request.query.get("set-cookie", "").split(",")):
            response.set_cookie(name, "from-upstream")  # ?set-cookie=a,b: the upstream sets these
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def header_values(seen: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


@pytest.fixture
async def echo_upstream() -> AsyncIterator[Server]:
    server = await start_server(echo_app())
    yield server
    await server.runner.cleanup()


class GatewayProcess:
    """`gateway run` as a real process; its port comes from the server.started event."""

    def __init__(self, config_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config_path)],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[dict[str, Any]] = []
        self.port = self._wait_started()

    def _wait_started(self) -> int:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            entry = orjson.loads(line) if line.startswith("{") else {"msg": line}
            self.log.append(entry)
            if entry.get("event") == "server.started":
                return int(entry["listen"][0].rsplit(":", 1)[1])
        raise AssertionError(f"gateway exited before serving: {self.log}")

    def wait_for(self, event: str) -> dict[str, Any]:
        """Read the process log until an event of this type (the process keeps running)."""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            entry = orjson.loads(line) if line.startswith("{") else {"msg": line}
            self.log.append(entry)
            if entry.get("event") == event:
                return entry
        raise AssertionError(f"no {event} event before the process ended: {self.log}")

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(
            next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]
        )

    def stop(self) -> int:
        """SIGTERM (unless it already exited), then its exit status; the log is read to the end."""
        if self.proc.poll() is None:
            self.proc.terminate()
        assert self.proc.stderr is not None
        rest = self.proc.stderr.read()
        self.proc.stderr.close()
        self.log += [orjson.loads(line) for line in rest.splitlines() if line.startswith("{")]
        return self.proc.wait(timeout=40)


# -- session stores: one fixture parametrized over memory, SQLite and Redis ----------------------

# This suite's own database, flushed around each test. GATEWAY_TEST_REDIS_DB picks another
# one, so that two test runs on one machine (two developers' checkouts) do not flush each other.
REDIS_DB = int(os.environ.get("GATEWAY_TEST_REDIS_DB", "11"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


async def redis_admin(url: str = REDIS_URL) -> Redis:
    """A plain client on a test database; skips (or fails in CI) if Redis is not there."""
    admin = Redis.from_url(url, socket_connect_timeout=1.0)
    try:
        await admin.ping()
    except (RedisError, OSError) as err:
        await admin.aclose()
        if IN_CI:
            pytest.fail(f"Redis is required in CI ({url}): {err}")
        pytest.skip(f"Redis is not reachable at {url} ({err}); with CI=true this fails")
    return admin


@pytest.fixture
async def redis_db() -> AsyncIterator[str]:
    admin = await redis_admin()
    await admin.flushdb()
    yield REDIS_URL
    await admin.flushdb()
    await admin.aclose()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The session store URL for `state.sessions`."""
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/sessions.db"
    else:
        admin = await redis_admin()
        await admin.flushdb()
        yield REDIS_URL
        await admin.flushdb()
        await admin.aclose()


# -- record stores: a PostgreSQL schema of each test's own ---------------------------------------

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


async def pg_admin(dsn: str = PG_DSN) -> Any:
    """An asyncpg connection to the test database; skips (or fails in CI) if it is not there."""
    try:
        return await asyncpg.connect(dsn, timeout=2.0)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as err:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI ({dsn}): {err!r}")
        pytest.skip(f"PostgreSQL is not reachable at {dsn} ({err!r}); with CI=true this fails")


@pytest.fixture(name="pg_records")
async def pg_schema() -> AsyncIterator[str]:
    """The record store URL of a fresh schema `gw_test_<hex>`, dropped afterwards."""
    schema = f"gw_test_{secrets.token_hex(6)}"
    admin = await pg_admin()
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
    finally:
        await admin.close()
    yield f"{PG_DSN}?search_path={schema}"
    admin = await pg_admin()
    try:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await admin.close()


def assertion_key(tmp: Path) -> Path:
    """An ES256 key for the identity assertion (configs with Redis sessions need one)."""
    keys = tmp / "keys"
    if not keys.exists():
        generate(keys)  # what `gateway keys generate` writes
    return keys / "assertion-es256.pem"
