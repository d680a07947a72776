"""`server.workers: 2` as operators run it: `gateway run`, Redis sessions, PostgreSQL records.

Every test starts a real parent process with two workers on one port (SO_REUSEPORT), the
dev IdP and an echo upstream on loopback, and reads the process log (stderr) for events.
Which worker answered is visible in `/.gateway/readyz` (`origin`); what every worker runs
is visible there too (`workers`: origin -> policy hash).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from gateway.cli import main
from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.keyfiles import generate
from tests.conftest import REPO, Server, echo_app, start_server
from tests.test_admin import TOKENS, tokens_file
from tests.test_login import SECRET, free_port

ORIGIN = "wk"  # audit.origin: the workers' chains are wk and wk-w1
ORIGINS = {ORIGIN, f"{ORIGIN}-w1"}
DEADLINE = 20.0  # seconds any awaited condition gets before the test fails


@dataclass
class Fleet:
    """`gateway run -c FILE` with server.workers: 2; its events as they arrive."""

    proc: asyncio.subprocess.Process
    config: Path
    settings: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    reader: asyncio.Task[None] | None = None
    started: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return str(self.settings["server"]["public_url"])

    @property
    def admin(self) -> str:
        return f"http://{self.started['admin'][0]}"

    @property
    def audit(self) -> Path:
        return Path(self.settings["audit"]["dir"])

    @classmethod
    async def start(cls, config: Path, settings: dict[str, Any]) -> Fleet:
        config.write_text(yaml.safe_dump(settings))
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "run", "-c", str(config)),
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "TMPDIR": str(config.parent)},  # its metrics dir, even if killed
        )
        self = cls(proc, config, settings)
        self.reader = asyncio.get_running_loop().create_task(self._read(), name="fleet log")
        try:
            self.started = await self.event("server.started")
        except BaseException:
            await self.kill()
            raise
        return self

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            async with self.arrived:
                entry = orjson.loads(line) if line.startswith(b"{") else {"msg": line.decode()}
                self.events.append(entry)
                self.arrived.notify_all()
        async with self.arrived:
            self.events.append({"event": "<exited>"})
            self.arrived.notify_all()

    async def event(self, kind: str, count: int = 1, **fields: Any) -> dict[str, Any]:
        """The `count`th event of this kind (with these fields), waited for."""

        def found() -> list[dict[str, Any]]:
            return [
                e
                for e in self.events
                if e.get("event") == kind and all(e.get(k) == v for k, v in fields.items())
            ]

        async with self.arrived:
            await asyncio.wait_for(
                self.arrived.wait_for(
                    lambda: len(found()) >= count or self.events[-1:] == [{"event": "<exited>"}]
                ),
                DEADLINE,
            )
        assert len(found()) >= count, f"no {kind} {fields}: {self.events}"
        return found()[count - 1]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def rewrite(self, change: Callable[[dict[str, Any]], None]) -> None:
        change(self.settings)
        self.config.write_text(yaml.safe_dump(self.settings))

    async def stop(self) -> int:
        """SIGTERM to the parent; its exit status, the log read to the end."""
        if self.proc.returncode is None:
            self.proc.terminate()
        status = await asyncio.wait_for(self.proc.wait(), 60)
        if self.reader is not None:
            await self.reader
        return status

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.stop()


def fleet_config(
    tmp: Path, port: int, issuer: str, upstream: str, redis: str, pg: str
) -> dict[str, Any]:
    """Two workers: one protected route (its policy is what a reload changes), one public."""
    generate(tmp / "keys")  # `gateway keys generate`: assertion and audit keys
    return {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "public_url": f"http://127.0.0.1:{port}",
            "workers": 2,
        },
        "identity": {
            "issuer": issuer,
            "client_id": "gateway",
            "client_secret": SECRET,
            "scopes": ["openid", "email", "groups"],
        },
        "state": {
            "sessions": redis,
            "records": pg,
            "keys": [base64.b64encode(os.urandom(32)).decode()],
        },
        "sessions": {"cookie_name": "gateway"},
        "assertion": {"signing_key_file": str(tmp / "keys" / "assertion-es256.pem")},
        "audit": {
            "dir": str(tmp / "audit"),
            "origin": ORIGIN,
            "signing_key_file": str(tmp / "keys" / "audit-ed25519.pem"),
        },
        "admin": {"listen": "127.0.0.1:0", "tokens_file": str(tokens_file(tmp / "tokens"))},
        "routes": [
            {"id": "app", "path": "/app", "upstream": upstream, "policy": allow("sre")},
            {"id": "open", "path": "/open", "upstream": upstream, "public": True},
        ],
    }


def allow(*groups: str) -> dict[str, Any]:
    return {"allow": [{"groups": list(groups)}]}


@dataclass
class Parts:
    """What a fleet needs around it: the dev IdP and the echo upstream, for one test."""

    tmp: Path
    port: int  # the gateway's public port, known to the dev IdP (its callback)
    idp: DevIdP
    issuer: str
    upstream: Server
    redis: str
    pg: str

    def config(self) -> dict[str, Any]:
        return fleet_config(
            self.tmp, self.port, self.issuer, self.upstream.url, self.redis, self.pg
        )


@pytest.fixture
async def parts(tmp_path: Path, redis_db: str, pg_records: str) -> AsyncIterator[Parts]:
    port = free_port()  # the gateway's; the dev IdP must know its callback first
    users = {"alice": DevUser("alice", "alice-pw", groups=("sre",))}
    client = DevClient(
        "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
    )
    idp = DevIdP(users, [client])
    issuer = await idp.start()
    upstream = await start_server(echo_app())
    yield Parts(tmp_path, port, idp, issuer, upstream, redis_db, pg_records)
    await upstream.runner.cleanup()
    await idp.stop()


@pytest.fixture
async def fleet(parts: Parts) -> AsyncIterator[Fleet]:
    running = await Fleet.start(parts.tmp / "gateway.yaml", parts.config())
    yield running
    if running.proc.returncode is None:
        await running.stop()


async def readyz(base: str, admin: str | None = None) -> dict[str, Any]:
    """One readiness check on a new connection (so the kernel may pick either worker): the
    public one at `base`, or with `admin` the admin API's, which names origins and workers."""
    url = f"{admin}/readyz" if admin else base + "/.gateway/readyz"
    headers = {"Authorization": f"Bearer {TOKENS['read']}"} if admin else {}
    async with (
        aiohttp.ClientSession() as client,
        client.get(url, headers=headers) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        return body


async def until(check: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll `check` (async) until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def answered_by_both(admin: str) -> set[str]:
    seen: set[str] = set()
    for _ in range(60):
        seen.add((await readyz("", admin))["origin"])
        if seen == ORIGINS:
            break
    return seen


async def public_port_answered_by_two(base: str) -> int:
    """How many processes answered on the public port: request ids start with one random
    prefix per process."""
    prefixes: set[str] = set()
    async with aiohttp.ClientSession() as client:
        for _ in range(60):
            async with client.get(
                base + "/.gateway/healthz", headers={"Connection": "close"}
            ) as resp:
                prefixes.add(resp.headers["X-Request-Id"].split("-")[0])
            if len(prefixes) == 2:
                break
    return len(prefixes)


async def every_worker_has(admin: str, policy_hash: str) -> bool:
    workers = (await readyz("", admin))["workers"]
    return bool(workers == dict.fromkeys(ORIGINS, policy_hash))


def records(directory: Path, origin: str) -> list[dict[str, Any]]:
    lines: list[bytes] = []
    for segment in sorted(directory.glob(f"{origin}.*.jsonl")):
        lines += segment.read_bytes().splitlines()
    return [orjson.loads(line) for line in lines]


def verify(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    key = fleet.audit.parent / "keys" / "audit-ed25519.pub.pem"
    code = main(["audit", "verify", str(fleet.audit), "--key", str(key)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# -- one port, two chains ----------------------------------------------------------------------


async def test_two_workers_share_one_port_and_each_keeps_its_own_chain(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    started = fleet.started
    assert (started["workers"], set(started["origins"])) == (2, ORIGINS)
    assert len(set(started["pids"])) == 2
    assert len(fleet.of("server.started")) == 1  # once, when both serve
    assert await public_port_answered_by_two(fleet.base) == 2
    assert await answered_by_both(fleet.admin) == ORIGINS
    ready = await readyz(fleet.base, fleet.admin)
    assert set(ready["workers"]) == ORIGINS and ready["checks"]["reload_channel"] == "ok"
    public = await readyz(fleet.base)
    assert "workers" not in public and "origin" not in public  # host names: admin only
    async with aiohttp.ClientSession() as client:
        for i in range(30):  # a new connection each: spread over both workers
            async with client.get(fleet.base + f"/open/{i}", headers={"Connection": "close"}) as r:
                assert r.status == 200
    assert await fleet.stop() == 0
    assert len(fleet.of("worker.stopped")) == 2
    served = {}
    for origin in ORIGINS:
        chain = records(fleet.audit, origin)
        assert [r["type"] for r in chain[-2:]] == ["chain.closed", "checkpoint"], origin
        served[origin] = sum(r["type"] == "access" and r.get("route") == "open" for r in chain)
    assert sum(served.values()) == 30 and all(served.values()), served
    code, out = verify(fleet, capsys)
    assert code == 0, out
    assert sorted(line.split(",")[0] for line in out.splitlines() if line.startswith("OK")) == [
        f"OK: origin {origin}" for origin in sorted(ORIGINS)
    ]


# -- reloads reach every worker ----------------------------------------------------------------


async def test_sighup_reloads_every_worker(fleet: Fleet) -> None:
    before = (await readyz(fleet.base))["policy_hash"]
    await until(lambda: every_worker_has(fleet.admin, before), "both workers listed")
    fleet.rewrite(lambda s: s["routes"][0].update(policy=allow("sre", "finance")))
    fleet.proc.send_signal(signal.SIGHUP)
    for worker in (0, 1):
        await fleet.event("admin.tokens_reloaded", worker=worker)  # the reload's last step
    after = [e["policy_hash_after"] for e in fleet.of("policy.reloaded")]
    assert len(after) == 2 and len(set(after)) == 1 and after[0] != before
    await until(lambda: every_worker_has(fleet.admin, after[0]), "the new hash everywhere")


async def test_admin_reload_reaches_every_worker(fleet: Fleet) -> None:
    before = (await readyz(fleet.base))["policy_hash"]
    await until(lambda: every_worker_has(fleet.admin, before), "both workers listed")
    fleet.rewrite(lambda s: s["routes"][0].update(policy=allow("sre", "auditors")))
    headers = {"Authorization": f"Bearer {TOKENS['operate']}"}
    async with (
        aiohttp.ClientSession() as client,
        client.post(fleet.admin + "/reload", headers=headers) as resp,
    ):
        body = await resp.json()
        assert resp.status == 200, body
    after = body["policy_hash"]
    assert after != before
    assert body["workers"] == dict.fromkeys(ORIGINS, after)  # the answer waited for both
    reloads = await fleet.event("policy.reloaded", count=2)
    assert {e["actor"] for e in fleet.of("policy.reloaded")} == {"ops"}
    assert {e["worker"] for e in fleet.of("policy.reloaded")} == {0, 1}, reloads
    assert await every_worker_has(fleet.admin, after)
    # the admin API is on one port for both workers too
    async with aiohttp.ClientSession() as client:
        for _ in range(10):
            async with client.get(
                fleet.admin + "/readyz",
                headers={"Authorization": f"Bearer {TOKENS['read']}", "Connection": "close"},
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["workers"] == dict.fromkeys(ORIGINS, after)


# -- supervision -------------------------------------------------------------------------------


async def test_a_killed_worker_is_restarted_and_its_chain_continues(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = fleet.started["pids"][1]
    os.kill(victim, signal.SIGKILL)
    exited = await fleet.event("worker.exited")
    assert (exited["worker"], exited["pid"], exited["status"]) == (1, victim, -signal.SIGKILL)
    restarted = await fleet.event("worker.restarted")
    assert restarted["worker"] == 1 and restarted["pid"] != victim
    assert await answered_by_both(fleet.admin) == ORIGINS
    assert await fleet.stop() == 0
    reopened = [r for r in records(fleet.audit, f"{ORIGIN}-w1") if r["type"] == "chain.reopened"]
    assert [r["after"] for r in reopened] == ["crash"]
    code, out = verify(fleet, capsys)
    assert code == 0, out


async def test_a_crash_loop_stops_the_gateway(fleet: Fleet) -> None:
    pid = fleet.started["pids"][1]
    for attempt in range(1, 6):  # five restarts within a minute are allowed
        os.kill(pid, signal.SIGKILL)
        pid = (await fleet.event("worker.restarted", count=attempt))["pid"]
    os.kill(pid, signal.SIGKILL)  # the sixth death: a crash loop
    assert await asyncio.wait_for(fleet.proc.wait(), DEADLINE) == 1
    await fleet.stop()
    assert len(fleet.of("worker.stopped")) == 1  # worker 0 was stopped cleanly
    assert any("crash loop" in str(e.get("msg")) for e in fleet.events)


async def test_workers_stop_when_the_parent_is_killed(fleet: Fleet) -> None:
    pids = fleet.started["pids"]
    fleet.proc.kill()
    await fleet.stop()
    # stop() read stderr to its end: every worker (each holds it) has exited by now
    stopped = {e["worker"] for e in fleet.of("worker.stopped")}
    assert stopped == {0, 1}, "each drains and stops once its stdin pipe closes"
    assert {e.get("pid") for e in fleet.of("worker.started")} <= {None, *pids}


async def test_a_worker_that_cannot_start_stops_the_start(parts: Parts) -> None:
    settings = parts.config()
    config = parts.tmp / "gateway.yaml"
    config.write_text(yaml.safe_dump(settings))
    Path(settings["admin"]["tokens_file"]).write_text("not a token line\n")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "run", "-c", str(config)),
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 2  # as a single process: a bad tokens file is a usage error
    errors = [line for line in err.decode().splitlines() if line.startswith("gateway: ")]
    assert len(errors) == 1 and "tokens:1" in errors[0], err  # worker 0 alone said it
    assert b"server.started" not in err and b"Traceback" not in err
