"""The audit log end to end (SPEC §8, §9, §10): a real `gateway run`, real traffic, real files.

Everything here is the real thing: `gateway run` as a process, the dev IdP and an echo upstream
on loopback, keys from `gateway keys generate`'s code, and `gateway audit verify` / `gateway
audit tail` as a user runs them. Nothing writes a record but the gateway itself.

    real_log      one run, shared by the module: a login through the dev IdP (with a token
                  refresh and a logout), a mix of requests (public, allowed, denied, 404, 401,
                  bearer), then SIGTERM. Its log is verified, tampered with (on copies),
                  continued with a rotated key, and scanned for every secret the run saw.
    tail -f       follows a running gateway within a second, across segment rotation, inert.
    plugins       redis_stream carries the exact line bytes; a hanging sink slows nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import os
import re
import secrets
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import aiohttp
import orjson
import pytest
import pytest_asyncio
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from redis.asyncio import Redis
from yarl import URL

from gateway.audit.record import b64, canonical, signed_bytes
from gateway.cli import main
from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.keyfiles import generate, key_id, load_private_key
from gateway.keyring import Keyring
from tests.conftest import REPO, Server, echo_app, raw_request, redis_admin, start_server
from tests.test_login import free_port, submit_login

ORIGIN = "e2e"
DEADLINE = 10.0  # seconds any awaited condition gets before the test fails
HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}
REDIS_URL = "redis://127.0.0.1:6379/8"  # this file's database; only its own stream is touched


# -- the parts: a gateway process, the dev IdP, configs ------------------------------------------


class RecordingIdP(DevIdP):
    """The dev IdP, keeping every token response it gives (secrets the log must never hold)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.issued: list[dict[str, Any]] = []

    def _issue_tokens(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        payload: dict[str, Any] = super()._issue_tokens(*args, **kwargs)
        self.issued.append(payload)
        return payload


@dataclass
class GatewayProcess:
    """`gateway run -c FILE` as a process; its log (stderr) is kept byte for byte."""

    proc: asyncio.subprocess.Process
    log: bytearray = field(default_factory=bytearray)
    events: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    reader: asyncio.Task[None] | None = None
    port: int = 0

    @classmethod
    async def start(cls, config: Path, pythonpath: Path | None = None) -> GatewayProcess:
        env = dict(os.environ)
        if pythonpath is not None:  # where a plugin module given by a dotted path lives
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(REPO)])
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "run", "-c", str(config)),
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self = cls(proc)
        loop = asyncio.get_running_loop()
        self.reader = loop.create_task(self._read(), name="gateway process log")
        try:
            started = await self.event("server.started")
        except BaseException:
            await self.kill()
            raise
        self.port = int(started["listen"][0].rsplit(":", 1)[1])
        return self

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            async with self.arrived:
                self.log += line
                if line.startswith(b"{"):
                    self.events.append(orjson.loads(line))
                self.arrived.notify_all()
        async with self.arrived:
            self.events.append({"event": "<exited>"})
            self.arrived.notify_all()

    async def event(self, kind: str) -> dict[str, Any]:
        def seen() -> bool:
            return any(e.get("event") in (kind, "<exited>") for e in self.events)

        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(seen), DEADLINE)
        found = [e for e in self.events if e.get("event") == kind]
        assert found, f"no {kind} event: {self.log.decode(errors='replace')}"
        return found[0]

    async def stop(self) -> int:
        """SIGTERM, the exit status; the log is read to its end."""
        if self.proc.returncode is None:
            self.proc.terminate()
        code = await asyncio.wait_for(self.proc.wait(), 40)
        if self.reader is not None:
            await self.reader
        return code

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.stop()


def audit_settings(directory: Path, keys: Path) -> dict[str, Any]:
    return {
        "dir": str(directory),
        "origin": ORIGIN,
        "signing_key_file": str(keys / "audit-ed25519.pem"),  # from `gateway keys generate`
        "segment_max_bytes": "4KiB",  # several segments from a few dozen requests
        "checkpoint_every": 5,
    }


def public_config(directory: Path, keys: Path, upstream: str, **sections: Any) -> dict[str, Any]:
    """A gateway on any free port serving one public route, `/open`, on the host gw.test."""
    config: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "public_url": "http://gw.test"},
        "state": {"sessions": "memory://", "records": "memory://"},
        "audit": audit_settings(directory, keys),
        "routes": [{"id": "open", "path": "/open", "upstream": upstream, "public": True}],
    }
    for name, value in sections.items():
        config[name] = {**config.get(name, {}), **value} if isinstance(value, dict) else value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def lines_of(directory: Path) -> list[bytes]:
    """Every record line of the origin, in seq order (segments by name), without newlines."""
    found: list[bytes] = []
    for segment in segments_of(directory):
        found += segment.read_bytes().splitlines()
    return found


def segments_of(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{ORIGIN}.*.jsonl"))


def records_of(directory: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines_of(directory)]


async def until(
    check: Callable[[], Any], what: str, timeout: float = DEADLINE, every: float = 0.02
) -> None:
    """Poll `check` (sync or async) until it holds; fail naming `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


def audit_verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# -- one real run: a login, a mix of requests, a clean stop --------------------------------------


@dataclass(frozen=True)
class Expect:
    """What the log must say about one request."""

    record: str  # "access" (+ access.done), "noise" (an anonymous refusal), "none", "redirect"
    decision: str | None = None
    reason: str | None = None  # a prefix of the logged reason; None: not checked
    user: str | None = None
    session: bool = False  # signed in with the session cookie: the log names its handle
    client: str | None = None  # a service client's bearer token


NONE = Expect("none")  # the gateway's own endpoints: recorded through their events
ALICE = Expect("access", "allow", "app.allow", "alice@example.org", session=True)
PUBLIC = Expect("access", "allow", "public")
SERVICE = Expect("access", "allow", "app.allow", "svc-1", client="reporting-job")
NOT_FOUND = Expect("noise", reason="no-route")


@dataclass(frozen=True)
class Sent:
    """One request of the run, what it got, and what the log must say about it."""

    request_id: str
    method: str
    path: str
    status: int
    length: int  # bytes of the response body the client received
    expect: Expect


@dataclass
class RealLog:
    directory: Path  # the gateway's audit.dir, after SIGTERM
    keys: Path  # `gateway keys generate` output: audit-ed25519.pem and .pub.pem
    exit_status: int
    process_log: bytes
    secrets: dict[str, str]  # every secret value the run used or saw, by what it is
    state_key: bytes
    handle: str  # the session's public handle, as /.gateway/sessions shows it
    sent: list[Sent]
    refreshed: int  # token responses the IdP gave (2: the login and one refresh)

    @property
    def public_key(self) -> Path:
        return self.keys / "audit-ed25519.pub.pem"

    def copy(self, to: Path) -> Path:
        shutil.copytree(self.directory, to)
        return to


class Run:
    """The browser and API clients of one run, noting what they sent and every secret seen."""

    def __init__(self, base: str, idp: RecordingIdP) -> None:
        self.base, self.idp = base, idp
        self.browser = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.api = aiohttp.ClientSession()  # no cookies: anonymous, or a bearer token
        self.sent: list[Sent] = []
        self.secrets: dict[str, str] = {}
        self.callback = self.cookie_id = ""  # known once logged in
        self._n = 0

    async def close(self) -> None:
        await self.browser.close()
        await self.api.close()

    def keep(self, name: str, value: str | None) -> None:
        if value:
            self.secrets[f"{name} #{len(self.secrets)}"] = value

    def saw(self, resp: aiohttp.ClientResponse) -> None:
        """Every cookie value set, and every secret carried by a redirect's query."""
        for name, morsel in resp.cookies.items():
            self.keep(f"Set-Cookie {name}", morsel.value)
        location = resp.headers.get("Location", "")
        for name, values in parse_qs(urlsplit(location).query).items():
            if name in ("code", "state", "nonce", "id_token_hint"):
                for value in values:
                    self.keep(f"{name}= in a redirect", value)

    async def send(
        self,
        method: str,
        path: str,
        expect: Expect,
        *,
        as_browser: bool = True,
        headers: dict[str, str] | None = None,
        data: Any = None,
    ) -> aiohttp.ClientResponse:
        self._n += 1
        request_id = f"e2e-request-{self._n:04d}"
        client = self.browser if as_browser else self.api
        sent_headers = {**(HTML if as_browser else JSON), "X-Request-Id": request_id}
        async with client.request(
            method,
            self.base + path,
            headers={**sent_headers, **(headers or {})},
            data=data,
            allow_redirects=False,
        ) as resp:
            body = await resp.read()
        self.saw(resp)
        self.sent.append(Sent(request_id, method, path, resp.status, len(body), expect))
        return resp

    async def follow(self, url: str) -> aiohttp.ClientResponse:
        """One GET by the browser, anywhere (the IdP too), not following redirects."""
        async with self.browser.get(url, headers=HTML, allow_redirects=False) as resp:
            await resp.read()
        self.saw(resp)
        return resp

    async def log_in(self) -> None:
        first = await self.send("GET", "/app/start", Expect("redirect"))
        assert first.status == 302, first.status
        to_login = await self.follow(str(URL(self.base).join(URL(first.headers["Location"]))))
        assert to_login.status == 302 and "gateway-login" in to_login.cookies
        page = await self.browser.get(to_login.headers["Location"], headers=HTML)
        assert page.status == 200
        callback = await submit_login(self.browser, page, "alice", "alice-pw")
        for name, values in parse_qs(urlsplit(callback).query).items():
            if name in ("code", "state"):
                self.keep(f"{name}= in the callback", values[0])
        landed = await self.follow(callback)
        assert landed.status == 302 and "gateway" in landed.cookies, landed.status
        self.callback, self.cookie_id = callback, landed.cookies["gateway"].value

    def jar(self) -> None:
        """The cookies the browser still holds (the IdP's own session cookie too)."""
        for cookie in self.browser.cookie_jar:
            self.keep(
                f"IdP cookie {cookie.key}"
                if cookie.key.startswith("devidp")
                else f"cookie {cookie.key}",
                cookie.value,
            )

    def bearer(self) -> str:
        now = int(time.time())
        claims = {
            "iss": self.idp.issuer,
            "aud": "reports-api",
            "sub": "svc-1",
            "azp": "reporting-job",
            "iat": now,
            "exp": now + 300,
        }
        token = self.idp.mint_token({"alg": "RS256", "kid": self.idp.current_kid}, claims)
        self.keep("a service client's bearer token", token)
        return token


def protected_config(
    tmp: Path, port: int, issuer: str, upstream: str, client_secret: str, state_key: str
) -> dict[str, Any]:
    app_policy = {"allow": [{"groups": ["sre"]}, {"clients": ["reporting-job"]}]}
    return {
        "server": {"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"},
        "identity": {
            "issuer": issuer,
            "client_id": "gateway",
            "client_secret": client_secret,
            "scopes": ["openid", "email", "groups", "offline_access"],
            "api_audiences": ["reports-api"],
        },
        "state": {"sessions": "memory://", "records": "memory://", "keys": [state_key]},
        "sessions": {"cookie_name": "gateway"},
        "audit": audit_settings(tmp / "audit", tmp / "keys"),
        "routes": [
            {"id": "app", "path": "/app", "upstream": upstream, "policy": app_policy},
            {
                "id": "admin",
                "path": "/admin",
                "upstream": upstream,
                "policy": {"allow": [{"groups": ["admins"]}]},
            },
            {"id": "open", "path": "/open", "upstream": upstream, "public": True},
        ],
    }


async def exercise(run: Run) -> str:
    """The run's traffic, after the login; returns the session's public handle."""
    for path in ("/app/start", "/app/a?token=not-for-the-log", "/app/b"):
        assert (await run.send("GET", path, ALICE)).status == 200
    posted = await run.send("POST", "/app/form", ALICE, data={"field": "value"})
    assert posted.status == 200
    denied = replace(ALICE, decision="deny", reason="no-allow-rule")
    assert (await run.send("GET", "/admin/x", denied)).status == 403
    assert (await run.send("GET", "/nothere", NOT_FOUND)).status == 404
    assert (await run.send("GET", "/nowhere", NOT_FOUND, as_browser=False)).status == 404
    for path in ("/open/p1", "/open/p2?x=1"):
        assert (await run.send("GET", path, PUBLIC, as_browser=False)).status == 200
    anonymous = Expect("noise", reason="no-session")
    assert (await run.send("GET", "/app/x", anonymous, as_browser=False)).status == 401
    token = {"Authorization": f"Bearer {run.bearer()}"}
    resp = await run.send("GET", "/app/report", SERVICE, as_browser=False, headers=token)
    assert resp.status == 200
    bad = {"Authorization": "Bearer " + run.bearer()[:-8] + "AAAAAAAA"}
    refused = Expect("noise", reason="bad-token")
    assert (
        await run.send("GET", "/app/report", refused, as_browser=False, headers=bad)
    ).status == 401
    # the callback URL (code and state in its query) again: refused, and logged without them
    replay = run.callback.removeprefix(run.base)
    assert (await run.send("GET", replay, Expect("noise"))).status == 400
    mine = await run.send("GET", "/.gateway/sessions", NONE, headers=JSON)
    [listed] = (await mine.json())["sessions"]
    return str(listed["handle"])


async def refresh_and_log_out(run: Run) -> None:
    """Wait (polling with requests) for the session's token refresh, then sign out."""
    run.idp.set_groups("alice", ("sre", "auditors"))  # the refresh brings a new group

    async def refreshed() -> bool:
        resp = await run.send("GET", "/app/poll", ALICE)
        assert resp.status == 200
        return len(run.idp.issued) >= 2

    await until(refreshed, "the session's token refresh", every=0.2)
    page = await run.send("GET", "/.gateway/logout", NONE)
    csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert csrf is not None, "no CSRF token on the logout page"
    run.keep("the logout form's CSRF token", html.unescape(csrf[1]))
    out = await run.send(
        "POST", "/.gateway/logout", NONE, headers={"Origin": run.base}, data={"csrf": csrf[1]}
    )
    assert out.status == 302 and "id_token_hint=" in out.headers["Location"]
    for token in ("access_token", "refresh_token", "id_token"):
        for issued in run.idp.issued:
            run.keep(f"the IdP's {token}", issued[token])


def short_lived_first_id_token(idp: RecordingIdP) -> None:
    """The login's ID token lives 2 s, so the gateway refreshes the session at once (3/4 life)."""

    def hook(header: dict[str, Any], claims: dict[str, Any]) -> None:
        if "nonce" in claims:  # the code exchange's token; refreshed ones have no nonce
            claims["exp"] = claims["iat"] + 2

    idp.id_token_hook = hook


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_log(tmp_path_factory: pytest.TempPathFactory) -> RealLog:
    tmp = tmp_path_factory.mktemp("real-log")
    generate(tmp / "keys")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client_secret = secrets.token_urlsafe(24)
    state_key = os.urandom(32)
    client = DevClient(
        "gateway",
        client_secret,
        redirect_uris=(f"{base}/.gateway/callback",),
        post_logout_redirect_uris=(f"{base}/",),
    )
    idp = RecordingIdP({"alice": DevUser("alice", "alice-pw", groups=("sre",))}, [client])
    short_lived_first_id_token(idp)
    issuer = await idp.start()
    upstream = await start_server(echo_app())
    config = protected_config(
        tmp, port, issuer, upstream.url, client_secret, base64.b64encode(state_key).decode()
    )
    gateway = await GatewayProcess.start(write_config(tmp / "gateway.yaml", config))
    run = Run(base, idp)
    try:
        await run.log_in()
        handle = await exercise(run)
        await refresh_and_log_out(run)
        old_cookie = {"Cookie": f"gateway={run.cookie_id}"}  # the signed-out session's
        ended = Expect("noise")
        gone = await run.send("GET", "/app/after", ended, as_browser=False, headers=old_cookie)
        assert gone.status == 401
        run.jar()
    finally:
        status = await gateway.stop()
        await run.close()
        await upstream.runner.cleanup()
        await idp.stop()
    run.keep("identity.client_secret", client_secret)
    return RealLog(
        tmp / "audit",
        tmp / "keys",
        status,
        bytes(gateway.log),
        run.secrets,
        state_key,
        handle,
        run.sent,
        len(idp.issued),
    )


# -- 1. verify: the real log passes, and every kind of tampering is named ------------------------


def test_the_real_log_verifies_with_the_pinned_key(
    real_log: RealLog, capsys: pytest.CaptureFixture[str]
) -> None:
    assert real_log.exit_status == 0
    assert len(segments_of(real_log.directory)) >= 4, "segment_max_bytes: 4KiB made few segments"
    records = records_of(real_log.directory)
    assert [r["type"] for r in records[-2:]] == ["chain.closed", "checkpoint"]
    checkpoints = sum(r["type"] == "checkpoint" for r in records)
    code, out = audit_verify(capsys, str(real_log.directory), "--key", str(real_log.public_key))
    assert code == 0, out
    last = len(records) - 1
    assert out.splitlines() == [
        f"OK: origin {ORIGIN}, {len(records)} records, {checkpoints} checkpoints, "
        f"last signed seq {last}"
    ]


def test_verify_without_a_pinned_key_is_a_usage_error(
    real_log: RealLog, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = audit_verify(capsys, str(real_log.directory))
    assert code == 2
    assert "--key" in out and "Traceback" not in out


@dataclass(frozen=True)
class Line:
    """Where one record is: its segment, its index there, and the record."""

    segment: Path
    index: int
    record: dict[str, Any]

    @property
    def seq(self) -> int:
        return int(self.record["seq"])


def located(directory: Path) -> list[Line]:
    return [
        Line(segment, index, orjson.loads(raw))
        for segment in segments_of(directory)
        for index, raw in enumerate(segment.read_bytes().splitlines())
    ]


def middle_access(directory: Path) -> Line:
    """An access record inside the middle segment, neither its first nor its last line."""
    found = located(directory)
    segments = segments_of(directory)
    middle = segments[len(segments) // 2]
    inside = [x for x in found if x.segment == middle]
    candidates = [x for x in inside[1:-2] if x.record["type"] == "access"]
    assert candidates, f"no access record inside {middle.name}"
    return candidates[0]


def edit_lines(segment: Path, change: Callable[[list[bytes]], list[bytes]]) -> None:
    lines = segment.read_bytes().splitlines()
    segment.write_bytes(b"".join(line + b"\n" for line in change(lines)))


def change_a_byte(directory: Path, other_key: Ed25519PrivateKey) -> tuple[int, str]:
    target = middle_access(directory)

    def change(lines: list[bytes]) -> list[bytes]:
        line = lines[target.index]
        at = line.index(b'"method":"') + len(b'"method":"')
        lines[target.index] = line[:at] + b"P" + line[at + 1 :]  # GET -> PET: still JSON
        return lines

    edit_lines(target.segment, change)
    return target.seq, "modified"


def delete_a_record(directory: Path, other_key: Ed25519PrivateKey) -> tuple[int, str]:
    target = middle_access(directory)
    edit_lines(target.segment, lambda lines: lines[: target.index] + lines[target.index + 1 :])
    return target.seq, "missing"


def insert_a_copy(directory: Path, other_key: Ed25519PrivateKey) -> tuple[int, str]:
    target = middle_access(directory)
    earlier = target.segment.read_bytes().splitlines()[0]  # another record, copied

    def change(lines: list[bytes]) -> list[bytes]:
        return [*lines[: target.index + 1], earlier, *lines[target.index + 1 :]]

    edit_lines(target.segment, change)
    return target.seq + 1, "inserted"


def swap_two(directory: Path, other_key: Ed25519PrivateKey) -> tuple[int, str]:
    target = middle_access(directory)

    def change(lines: list[bytes]) -> list[bytes]:
        i = target.index
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        return lines

    edit_lines(target.segment, change)
    return target.seq, "reordered"


def tear_the_last(directory: Path, other_key: Ed25519PrivateKey) -> tuple[int, str]:
    last = segments_of(directory)[-1]
    data = last.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    seq = orjson.loads(data[start:])["seq"]
    last.write_bytes(data[: start + (len(data) - start) // 2])  # half a line, no newline
    return seq, "torn record"


def delete_a_segment(directory: Path, other_key: Ed25519PrivateKey) -> tuple[int, str]:
    segments = segments_of(directory)
    middle = segments[len(segments) // 2]
    first_seq = orjson.loads(middle.read_bytes().splitlines()[0])["seq"]
    middle.unlink()
    return first_seq, "gap between segments"


def resign_a_checkpoint(directory: Path, other_key: Ed25519PrivateKey) -> tuple[int, str]:
    """A checkpoint signed again, by a key nobody pinned (its key_id and sig both changed)."""
    found = [x for x in located(directory) if x.record["type"] == "checkpoint"]
    target = found[len(found) // 2]
    forged = {**target.record, "key_id": key_id(other_key.public_key())}
    forged["sig"] = b64(other_key.sign(signed_bytes(forged)))

    def change(lines: list[bytes]) -> list[bytes]:
        lines[target.index] = canonical(forged)
        return lines

    edit_lines(target.segment, change)
    return target.seq, "unknown key"


def truncate_before_closed(directory: Path, other_key: Ed25519PrivateKey) -> tuple[int, str]:
    [closed] = [x for x in located(directory) if x.record["type"] == "chain.closed"]
    edit_lines(closed.segment, lambda lines: lines[: closed.index])
    for later in segments_of(directory):
        if later.name > closed.segment.name:
            later.unlink()
    if closed.segment.stat().st_size == 0:
        closed.segment.unlink()
    return closed.seq, "chain ended without chain.closed"


TAMPERING = {
    "a changed byte": change_a_byte,
    "a deleted record": delete_a_record,
    "an inserted copy": insert_a_copy,
    "two records swapped": swap_two,
    "a torn last record": tear_the_last,
    "a deleted middle segment": delete_a_segment,
    "a checkpoint re-signed by another key": resign_a_checkpoint,
    "truncated before chain.closed": truncate_before_closed,
}
FAILED = re.compile(rf"FAIL: origin {ORIGIN}: seq (\d+): ([a-z. ]+?): ")


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_tampering_with_the_real_log_is_named(
    real_log: RealLog, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    directory = real_log.copy(tmp_path / "audit")
    generate(tmp_path / "other-keys")  # a keypair of its own, not pinned
    other = load_private_key(tmp_path / "other-keys" / "audit-ed25519.pem", "ed25519")
    seq, kind = TAMPERING[how](directory, other)
    code, out = audit_verify(capsys, str(directory), "--key", str(real_log.public_key))
    assert code == 1, out
    found = FAILED.match(out)
    assert found is not None, out
    assert (int(found[1]), found[2]) == (seq, kind), out


async def test_a_key_rotation_verifies_with_only_the_old_key_pinned(
    real_log: RealLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = real_log.copy(tmp_path / "audit")
    generate(tmp_path / "new-keys")
    upstream = await start_server(echo_app())
    audit = {
        "previous_signing_key_files": [str(real_log.keys / "audit-ed25519.pem")],
        **audit_settings(directory, tmp_path / "new-keys"),
    }
    config = public_config(directory, tmp_path / "new-keys", upstream.url, audit=audit)
    gateway = await GatewayProcess.start(write_config(tmp_path / "gateway.yaml", config))
    try:
        async with aiohttp.ClientSession() as client:
            for n in range(8):
                url = f"http://127.0.0.1:{gateway.port}/open/after-rotation-{n}"
                async with client.get(url, headers={"Host": "gw.test"}) as resp:
                    assert resp.status == 200
    finally:
        assert await gateway.stop() == 0
        await upstream.runner.cleanup()
    old = load_private_key(real_log.keys / "audit-ed25519.pem", "ed25519").public_key()
    new = load_private_key(tmp_path / "new-keys" / "audit-ed25519.pem", "ed25519").public_key()
    records = records_of(directory)
    [rotated] = [r for r in records if r["type"] == "key.rotated"]
    assert (rotated["previous_key_id"], rotated["key_id"]) == (key_id(old), key_id(new))
    assert records[rotated["seq"] + 1]["type"] == "chain.reopened"
    assert records[rotated["seq"] + 1]["after"] == "closed"
    later = [r for r in records[rotated["seq"] :] if r["type"] == "checkpoint"]
    assert later and {r["key_id"] for r in later} == {key_id(new)}
    code, out = audit_verify(capsys, str(directory), "--key", str(real_log.public_key))
    assert code == 0, out
    assert out.startswith(f"OK: origin {ORIGIN}, {len(records)} records, "), out


# -- the pipeline's records for each request of the run ------------------------------------------


def test_every_request_of_the_run_has_its_records(real_log: RealLog) -> None:
    records = records_of(real_log.directory)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["type"] in ("access", "access.done"):
            by_id.setdefault(record["request_id"], []).append(record)
    checked = 0
    for sent in real_log.sent:
        if sent.expect.record in ("access", "noise"):
            check_records(sent, by_id.get(sent.request_id, []), real_log.handle)
            checked += 1
    assert checked >= 15  # the run's fixed requests; the refresh polls add a varying number
    types = {r["type"] for r in records}
    events = {"auth.login", "session.created", "session.claims_changed", "session.ended"}
    assert events <= types, f"no {events - types} record"
    assert "auth.login_failed" in types  # the replayed callback
    assert real_log.refreshed == 2  # the login's tokens, and one refresh


def check_records(sent: Sent, found: list[dict[str, Any]], handle: str) -> None:
    """An access record (and its access.done) as `sent.expect` says; or one anonymous refusal."""
    expect = sent.expect
    kinds = [r["type"] for r in found]
    access = found[0] if found else {}
    if expect.record == "noise":  # an unidentified client refused: one record, no access.done
        assert kinds == ["access"], (sent, found)
        assert access["status"] == sent.status, (sent, access)
        assert access["path"] == urlsplit(sent.path).path, (sent, access)  # never the query
    else:
        assert kinds == ["access", "access.done"], (sent, found)
        logged = {k: access[k] for k in ("decision", "user", "client")}
        assert logged == {"decision": expect.decision, "user": expect.user, "client": expect.client}
        assert access["session"] == (handle if expect.session else None), (sent, access)
        query = urlsplit(sent.path).query
        assert (access["query_hmac"] is None) is (query == ""), (sent, access)  # never the query
        assert found[1]["status"] == sent.status, (sent, found[1])
    if expect.reason is not None:
        assert access["reason"].startswith(expect.reason), (sent, access)


def test_an_anonymous_browser_sent_to_the_login_is_recorded(real_log: RealLog) -> None:
    """SPEC §4.7: "a decision record for every request, allowed or not". A browser without a
    session gets a 302 to the login (an API client in its place gets a 401, recorded)."""
    [first] = [s for s in real_log.sent if s.expect.record == "redirect"]
    found = [r for r in records_of(real_log.directory) if r.get("request_id") == first.request_id]
    assert [r["type"] for r in found] == ["access"], (
        f"GET {first.path} (302 to the login) left no record in the audit log"
    )


def test_access_done_counts_the_bytes_sent(real_log: RealLog) -> None:
    """access.done's bytes_out: at least the body the client received (SPEC §8)."""
    done = {
        r["request_id"]: r for r in records_of(real_log.directory) if r["type"] == "access.done"
    }
    allowed = [s for s in real_log.sent if s.expect.record == "access" and s.status == 200]
    short = {
        s.request_id: (done[s.request_id]["bytes_out"], s.length)
        for s in allowed
        if done[s.request_id]["bytes_out"] < s.length
    }
    assert short == {}, f"(bytes_out, body bytes received) of {len(short)}/{len(allowed)}"


# -- 3. no secret in the log ---------------------------------------------------------------------


def forms_of(value: str) -> set[str]:
    """The value as it could be written down: raw, URL-encoded, base64; a JWT's parts."""
    raw = value.encode()
    forms = {
        value,
        quote(value, safe=""),
        quote_plus(value),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }
    if value.count(".") == 2:  # a JWT: its claims and its signature alone
        forms |= {part for part in value.split(".")[1:] if len(part) >= 16}
    return {form for form in forms if len(form) >= 12}


def key_forms(name: str, key: bytes) -> dict[str, str]:
    return {
        f"{name} (base64)": base64.b64encode(key).decode(),
        f"{name} (base64url)": b64(key),
        f"{name} (hex)": key.hex(),
    }


def session_key_of(cookie_id: str, state_key: bytes) -> str:
    """The session store's key for a cookie id (gateway.sessions: keyed BLAKE2b)."""
    mac_key = Keyring([state_key]).derive("session-id")
    return hashlib.blake2b(cookie_id.encode(), key=mac_key, digest_size=32).hexdigest()


SEEN = {
    "Set-Cookie gateway",
    "Set-Cookie gateway-login",
    "IdP cookie devidp_session",
    "state= in a redirect",
    "nonce= in a redirect",
    "code= in the callback",
    "id_token_hint= in a redirect",
    "the IdP's access_token",
    "the IdP's refresh_token",
    "the IdP's id_token",
    "a service client's bearer token",
    "the logout form's CSRF token",
    "identity.client_secret",
}


def test_no_secret_the_run_saw_is_in_the_log(real_log: RealLog) -> None:
    found = dict(real_log.secrets)
    cookies = [v for k, v in found.items() if k.startswith("Set-Cookie gateway ")]
    assert cookies, "the session cookie was never seen"
    for n, cookie_id in enumerate(cookies):
        found[f"the session's store key #{n}"] = session_key_of(cookie_id, real_log.state_key)
    kinds = {re.sub(r" #\d+$", "", name) for name in found}
    assert kinds >= SEEN, f"the run never saw: {SEEN - kinds}"
    found |= key_forms("state.keys[0]", real_log.state_key)
    found |= key_forms("the audit HMAC key", Keyring([real_log.state_key]).derive("audit-hmac"))
    signing = load_private_key(real_log.keys / "audit-ed25519.pem", "ed25519")
    raw = signing.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    found |= key_forms("the audit signing key", raw)
    found["the query string sent"] = "not-for-the-log"
    logs = {segment.name: segment.read_bytes() for segment in segments_of(real_log.directory)}
    logs["the process log (stderr)"] = real_log.process_log
    audit = b"".join(data for where, data in logs.items() if where.endswith(".jsonl"))
    for data in (audit, real_log.process_log):  # the scan sees what is there: the handle is
        assert real_log.handle.encode() in data
    leaks = [
        f"{name} ({form[:12]}...) in {where}"
        for name, value in sorted(found.items())
        for form in forms_of(value)
        for where, data in logs.items()
        if form.encode() in data
    ]
    assert leaks == []


def test_the_session_is_named_only_by_its_public_handle(real_log: RealLog) -> None:
    records = records_of(real_log.directory)
    named = [r for r in records if r.get("session") is not None]
    assert {r["session"] for r in named} == {real_log.handle}
    assert {"auth.login", "session.created", "access"} <= {r["type"] for r in named}
    assert re.fullmatch(r"[0-9a-f]{16}", real_log.handle)


# -- 2. audit tail -f against a running gateway --------------------------------------------------


@dataclass
class Follower:
    """`gateway audit tail DIR -f [ARGS]` as a process; its stdout kept line by line."""

    proc: asyncio.subprocess.Process
    lines: list[bytes] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, directory: Path, *args: str) -> Follower:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "audit", "tail", str(directory), "-f", *args),
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self = cls(proc)
        self.reader = asyncio.get_running_loop().create_task(self._read(), name="tail -f")
        return self

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            async with self.arrived:
                self.lines.append(line.rstrip(b"\n"))
                self.arrived.notify_all()

    async def line_with(self, *needles: bytes, timeout: float = DEADLINE) -> bytes:
        """The first line containing every one of `needles`, waiting for it."""

        def match() -> bytes | None:
            return next((x for x in self.lines if all(n in x for n in needles)), None)

        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: match() is not None), timeout)
        found = match()
        assert found is not None
        return found

    @property
    def output(self) -> bytes:
        return b"\n".join(self.lines)

    async def stop(self) -> bytes:
        """Ends the process; its stderr."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        await asyncio.wait_for(self.proc.wait(), DEADLINE)
        if self.reader is not None:
            await self.reader
        assert self.proc.stderr is not None
        return await self.proc.stderr.read()


@dataclass
class Stack:
    """A gateway process with the dev IdP (for its login endpoints) and an echo upstream."""

    gateway: GatewayProcess
    idp: DevIdP
    upstream: Server
    base: str
    directory: Path


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    generate(tmp_path / "keys")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client = DevClient("gateway", "tail-secret", redirect_uris=(f"{base}/.gateway/callback",))
    idp = DevIdP({"alice": DevUser("alice", "alice-pw", groups=("sre",))}, [client])
    issuer = await idp.start()
    upstream = await start_server(echo_app())
    key = base64.b64encode(os.urandom(32)).decode()
    config = protected_config(tmp_path, port, issuer, upstream.url, "tail-secret", key)
    gateway = await GatewayProcess.start(write_config(tmp_path / "gateway.yaml", config))
    yield Stack(gateway, idp, upstream, base, tmp_path / "audit")
    await gateway.stop()
    await upstream.runner.cleanup()
    await idp.stop()


UNSAFE = (b"\x1b", b"\x9b", "\u009b".encode(), "\u202e".encode())


async def test_tail_follows_the_running_gateway_within_a_second(stack: Stack) -> None:
    human = await Follower.start(stack.directory)
    raw = await Follower.start(stack.directory, "--json")
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:

            async def get(path: str, request_id: str) -> None:
                headers = {"X-Request-Id": request_id, **JSON}
                async with client.get(stack.base + path, headers=headers) as resp:
                    assert resp.status == 200

            await get("/open/ready", "e2e-ready-0001")  # both tails are up once they show it
            await human.line_with(b"request_id=e2e-ready-0001", timeout=20)
            await raw.line_with(b'"request_id":"e2e-ready-0001"', timeout=20)
            for n in range(3):
                request_id = f"e2e-latency-{n:04d}"
                sent = time.monotonic()
                await get(f"/open/latency/{n}", request_id)
                await human.line_with(f"request_id={request_id}".encode(), timeout=2)
                elapsed = time.monotonic() - sent
                assert elapsed < 1.0, f"the access record was shown after {elapsed:.2f} s"
            await follow_across_rotation(stack, human, get)
            await inert_output(stack, client, human, raw)
        written = lines_of(stack.directory)
    finally:
        human_err, raw_err = await human.stop(), await raw.stop()
    assert b"CHAIN BROKEN" not in human.output and human_err == b"", human_err
    assert raw_err == b""
    # --json printed the stored lines: one run of the log, nothing missed or repeated
    start = written.index(raw.lines[0])
    assert raw.lines == written[start : start + len(raw.lines)]


async def follow_across_rotation(stack: Stack, human: Follower, get: Callable[..., Any]) -> None:
    """Enough requests for several new segments, in bursts: each shown exactly once."""
    before = len(segments_of(stack.directory))
    ids = [f"e2e-rotation-{n:04d}" for n in range(60)]
    for burst in range(0, len(ids), 15):
        await asyncio.gather(*(get(f"/open/r/{i}", i) for i in ids[burst : burst + 15]))
    await get("/open/sentinel", "e2e-sentinel-0001")
    await human.line_with(b" access.done ", b"request_id=e2e-sentinel-0001")
    assert len(segments_of(stack.directory)) - before >= 3, "no segment rotation happened"
    for request_id in ids:
        shown = [
            line for line in human.lines if f"request_id={request_id} ".encode() in line + b" "
        ]
        done = [line for line in shown if b" access.done " in line]
        assert (len(shown), len(done)) == (2, 1), (request_id, shown)


async def inert_output(
    stack: Stack, client: aiohttp.ClientSession, human: Follower, raw: Follower
) -> None:
    """Control characters from the network reach the log; tail prints every one inert."""
    port = stack.gateway.port
    host = f"127.0.0.1:{port}"
    # an encoded ESC in the path: refused (400), and logged as an anonymous refusal
    status, _, _ = await raw_request(port, request(b"/open/%1B%5B31mred-%1B%5B2J", host))
    assert status == 400
    # C1 CSI and a bidi override, percent-encoded: a valid path, decoded in the access record
    status, _, _ = await raw_request(port, request(b"/open/csi-%C2%9B31m-%E2%80%AE-bidi", host))
    assert status == 200
    # CSI raw in a header (obs-text is valid there); a raw ESC is refused by the HTTP parser
    status, _, _ = await raw_request(port, request(b"/open/ua", host, b"ua-\xc2\x9b[2J"))
    assert status == 200
    status, _, _ = await raw_request(port, request(b"/open/esc-ua", host, b"ua-\x1b[2J"))
    assert status == 400
    # ESC and CSI decoded from the callback's query, into an auth.login_failed event
    async with client.get(stack.base + "/.gateway/login?rd=/open/x", allow_redirects=False) as r:
        state = parse_qs(urlsplit(r.headers["Location"]).query)["state"][0]
    query = f"state={quote(state)}&error=%1B%5B2J%C2%9B31m"
    async with client.get(stack.base + "/.gateway/callback?" + query, headers=JSON) as resp:
        assert resp.status == 400
    async with client.get(stack.base + "/open/end", headers={"X-Request-Id": "e2e-end-0001"}):
        pass
    await human.line_with(b"request_id=e2e-end-0001")
    await raw.line_with(b'"request_id":"e2e-end-0001"')
    shown = human.output
    for seen in (
        b"/open/%1B%5B31mred-%1B%5B2J",
        b"/open/csi-\\u009b31m-\\u202e-bidi",
        b"reason=op-error:\\x1b[2J\\u009b31m",
    ):
        assert seen in shown, (seen, [x for x in human.lines if b"login_failed" in x])
    assert b'"user_agent":"ua-\\\\u009b[2J"' in raw.output
    for output in (human.output, raw.output):
        assert [unsafe for unsafe in UNSAFE if unsafe in output] == []


def request(path: bytes, host: str, user_agent: bytes = b"e2e") -> bytes:
    """A GET exactly as given (no client library cleans it up)."""
    head = b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nConnection: close\r\n\r\n"
    return head % (path, host.encode(), user_agent)


# -- 4. plugins through the gateway --------------------------------------------------------------


async def stream_lines(admin: Redis, stream: str) -> list[bytes]:
    """The `r` field of every entry of the stream: a record's line bytes (plugins/redis_stream)."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await admin.xrange(stream))
    return [fields[b"r"] for _, fields in entries]


async def test_redis_stream_carries_the_exact_lines_of_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = await redis_admin(REDIS_URL)
    stream = f"gateway-e2e:{uuid.uuid4().hex}"
    generate(tmp_path / "keys")
    upstream = await start_server(echo_app())
    directory = tmp_path / "audit"
    plugin = {"use": "redis_stream", "url": REDIS_URL, "stream": stream}
    config = public_config(directory, tmp_path / "keys", upstream.url, plugins=[plugin])
    try:
        gateway = await GatewayProcess.start(write_config(tmp_path / "gateway.yaml", config))
        try:
            async with aiohttp.ClientSession() as client:
                for n in range(12):
                    path, status = (f"/open/{n}", 200) if n % 4 else (f"/missing/{n}", 404)
                    headers = {"Host": "gw.test", "X-Request-Id": f"e2e-redis-{n:04d}"}
                    url = f"http://127.0.0.1:{gateway.port}{path}"
                    async with client.get(url, headers=headers) as resp:
                        assert resp.status == status

            async def in_the_stream() -> bool:  # while the gateway runs, not only at its stop
                lines = await stream_lines(admin, stream)
                return any(b'"request_id":"e2e-redis-0011"' in line for line in lines)

            await until(in_the_stream, "the last request's record in the stream")
        finally:
            assert await gateway.stop() == 0
        entries = await stream_lines(admin, stream)
    finally:
        await admin.delete(stream)
        await admin.aclose()
        await upstream.runner.cleanup()
    written = lines_of(directory)
    assert len(segments_of(directory)) >= 2
    assert entries == written[len(written) - len(entries) :]  # byte for byte, in order
    assert sum(b'"type":"checkpoint"' in e for e in entries) >= 3  # checkpoints included
    assert b'"type":"chain.closed"' in entries[-2]
    missing = [orjson.loads(line)["type"] for line in written[: len(written) - len(entries)]]
    assert missing == [], f"the stream lacks the log's first records: {missing}"
    # the copy anchors the log off-host: it verifies on its own against the pinned key
    copy = tmp_path / "from-redis"
    copy.mkdir()
    (copy / f"{ORIGIN}.000000000000.jsonl").write_bytes(b"".join(e + b"\n" for e in entries))
    public_key = tmp_path / "keys" / "audit-ed25519.pub.pem"
    code, out = audit_verify(capsys, str(copy), "--key", str(public_key))
    assert code == 0, out


HANGING_SINK = '''
"""A sink whose hooks never return (the gateway gives up on each after HOOK_TIMEOUT)."""
import asyncio
from pathlib import Path


class HangingSink:
    def __init__(self, options):
        self.marker = Path(options["marker"])

    async def _hang(self, what):
        if not self.marker.exists():
            self.marker.write_text(what)
        await asyncio.Event().wait()

    async def on_access(self, record):
        await self._hang("on_access")

    async def on_event(self, record):
        await self._hang("on_event")

    async def on_records(self, lines):
        await self._hang("on_records")
'''


async def test_a_hanging_sink_does_not_slow_requests(tmp_path: Path) -> None:
    """200 requests to a gateway whose sink never returns take no longer than ~1.5x the same
    requests to one without it (interleaved, so both see the same machine)."""
    module = f"e2e_hanging_sink_{uuid.uuid4().hex[:8]}"  # loaded by its dotted path
    (tmp_path / f"{module}.py").write_text(HANGING_SINK)
    marker = tmp_path / "sink-entered"
    generate(tmp_path / "keys")
    upstream = await start_server(echo_app())
    plain = public_config(tmp_path / "audit-plain", tmp_path / "keys", upstream.url)
    sink = {"use": f"{module}:HangingSink", "marker": str(marker)}
    hanging = public_config(tmp_path / "audit-hang", tmp_path / "keys", upstream.url)
    hanging["plugins"] = [sink]
    took: dict[str, list[float]] = {"plain": [], "hanging": []}
    try:
        without = await GatewayProcess.start(write_config(tmp_path / "plain.yaml", plain))
        try:
            config = write_config(tmp_path / "hanging.yaml", hanging)
            with_sink = await GatewayProcess.start(config, pythonpath=tmp_path)
            try:
                ports = {"plain": without.port, "hanging": with_sink.port}
                await timed_requests(ports, took, marker)
                await until(
                    lambda: all_recorded(tmp_path / "audit-hang", 200),
                    "the 200 access records of the gateway with the hanging sink",
                )
            finally:
                await with_sink.kill()  # a clean stop would wait HOOK_TIMEOUT for the sink
        finally:
            await without.stop()
    finally:
        await upstream.runner.cleanup()
    plain_total, hanging_total = sum(took["plain"]), sum(took["hanging"])
    assert hanging_total <= 1.5 * plain_total, (hanging_total, plain_total)
    assert max(took["hanging"]) < 1.0  # a request waiting for the sink would take 5 s or more


async def timed_requests(ports: dict[str, int], took: dict[str, list[float]], marker: Path) -> None:
    async with aiohttp.ClientSession() as client:

        async def get(name: str, n: int) -> float:
            headers = {"Host": "gw.test", "X-Request-Id": f"e2e-sink-{n:04d}"}
            started = time.monotonic()
            async with client.get(f"http://127.0.0.1:{ports[name]}/open/{n}", headers=headers) as r:
                await r.read()
                assert r.status == 200
            return time.monotonic() - started

        for name in ports:  # warm up: connections, first imports
            for n in range(5):
                await get(name, n)
        await until(marker.exists, "the sink's first (hanging) call")
        for n in range(1000, 1200):
            for name in ports:
                took[name].append(await get(name, n))


def all_recorded(directory: Path, count: int) -> bool:
    ids = {r.get("request_id") for r in records_of(directory) if r["type"] == "access"}
    return {f"e2e-sink-{n:04d}" for n in range(1000, 1000 + count)} <= ids
