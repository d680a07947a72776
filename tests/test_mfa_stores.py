"""MFA state shared by processes, kept across restarts, and never written to a log (SPEC §6, §8).

    the race     two `gateway run` processes on one Redis (sessions) and one PostgreSQL schema
                 (records): one user's two sessions send the same valid code at the same moment,
                 one to each process; exactly one is accepted, round after round
    restarts     an enrollment, and a spent recovery code, outlive the gateway (SQLite and
                 PostgreSQL record stores)
    no leaks     a whole MFA life in real processes; every byte of their audit logs and process
                 logs is searched for the secret, the codes, the link token and the cookies

Real clock: codes come from pyotp at time.time(). The enrollment's code is spent (the replay
guard), so a later login types the code of the next step, `time.time() + STEP`: newer than the
spent one and within the one step of drift the gateway accepts, whenever the test runs.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import orjson
import pytest
import yaml
from yarl import URL

from gateway.cli import main
from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.mfa import STEP
from gateway.server import Listening, listen
from gateway.settings import load_settings
from tests.conftest import GatewayProcess, Server, assertion_key, echo_app, start_server
from tests.test_admin import TOKENS, tokens_file
from tests.test_login import SECRET, follow, free_port, submit_login
from tests.test_mfa import code_at, form_fields, mfa_config, next_link, recovery_codes, shown_secret

APP = "/secure/x"  # the route that requires MFA (test_mfa's mfa_config)
ENROLL = "/.gateway/mfa/enroll"
HTML = {"Accept": "text/html"}
RACERS = tuple(f"racer{n}" for n in range(5))  # one fresh user per round: an unspent code each
USERS = {name: DevUser(name, f"{name}-pw", groups=("sre",)) for name in ("alice", "bob", *RACERS)}
# Every request here comes from 127.0.0.1: the per-address limits are not under test.
UNLIMITED = {name: {"count": 10_000, "window": "1m"} for name in ("login", "callback", "mfa")}


# -- browsers and the pages they go through ------------------------------------------------------


class Browsers:
    """New browsers (each its own cookie jar); every cookie value a server set is noted."""

    def __init__(self) -> None:
        self.open: list[aiohttp.ClientSession] = []
        self.cookies: set[str] = set()

    def new(self) -> aiohttp.ClientSession:
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(self._saw)
        browser = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), trace_configs=[trace]
        )
        self.open.append(browser)
        return browser

    async def _saw(self, _: Any, __: Any, params: aiohttp.TraceRequestEndParams) -> None:
        self.cookies |= {m.value for m in params.response.cookies.values() if m.value}

    async def close(self) -> None:
        for browser in self.open:
            await browser.close()


async def sign_in(browser: aiohttp.ClientSession, url: str, user: str) -> aiohttp.ClientResponse:
    """Open `url`, sign in at the dev IdP's form, follow on; the page the browser ends on."""
    page = await follow(browser, url)
    assert page.status == 200 and "/authorize" in page.url.path, page.url
    return await follow(browser, await submit_login(browser, page, user, f"{user}-pw"))


async def past_notice(
    browser: aiohttp.ClientSession, page: aiohttp.ClientResponse
) -> aiohttp.ClientResponse:
    """From the one-time "a new authenticator was enrolled" page on to the code prompt."""
    text = await page.text()
    assert "A new authenticator was enrolled" in text, text
    prompt = await follow(browser, str(page.url.join(URL(next_link(text)))))
    assert prompt.status == 200 and prompt.url.path == "/.gateway/mfa", prompt.url
    return prompt


@dataclass(frozen=True)
class Enrolled:
    secret: str  # base32, as the enrollment page shows it (without its spaces)
    codes: list[str]  # the ten recovery codes
    spent: str  # the code that confirmed the enrollment


async def send_code(
    browser: aiohttp.ClientSession,
    page: aiohttp.ClientResponse,
    code: str,
    origin: str,
    action: str = "/.gateway/mfa",
) -> aiohttp.ClientResponse:
    """Post a code with the page's hidden fields, as the browser would from `origin` (the
    public_url: behind a load balancer every process is reached through it); not followed."""
    resp = await browser.post(
        str(page.url.join(URL(action))),
        data={**form_fields(await page.text()), "code": code},
        headers={**HTML, "Origin": origin},
        allow_redirects=False,
    )
    await resp.read()
    return resp


async def enroll(browser: aiohttp.ClientSession, link: str, user: str) -> Enrolled:
    """Open an admin's enrollment link, sign in, confirm a code."""
    page = await sign_in(browser, link, user)
    assert page.status == 200 and page.url.path == "/.gateway/mfa/enroll", await page.text()
    secret = shown_secret(await page.text())
    spent = code_at(secret, time.time())
    done = await send_code(browser, page, spent, origin_of(page), ENROLL)
    assert done.status == 200, await done.text()
    codes = recovery_codes(await done.text())
    assert len(codes) == 10
    return Enrolled(secret, codes, spent)


def origin_of(page: aiohttp.ClientResponse) -> str:
    return f"{page.url.scheme}://{page.url.host}:{page.url.port}"


def later_code(secret: str) -> str:
    """The next step's code: newer than any spent one, still within the drift (see the top)."""
    return code_at(secret, time.time() + STEP)


def stepped_up(resp: aiohttp.ClientResponse, base: str) -> bool:
    """The success answer: a new session cookie, and on to the route the user asked for."""
    location = str(URL(base).join(URL(resp.headers.get("Location", ""))))
    return resp.status == 302 and "gateway" in resp.cookies and location == base + APP


async def admin_call(admin: str, method: str, path: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKENS['admin']}"}
    async with (
        aiohttp.ClientSession() as client,
        client.request(method, admin + path, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def email(user: str) -> str:
    """The user_claim value (email) the dev IdP gives `user`: what an admin names them by."""
    return USERS[user].email


async def enroll_link(admin: str, user: str) -> str:
    status, answer = await admin_call(admin, "POST", f"/users/{quote(user, safe='')}/enroll-link")
    assert status == 200, answer
    return str(answer["link"])


def gateway_settings(
    tmp: Path, port: int, public: str, issuer: str, upstream: str, **state: str
) -> dict[str, Any]:
    """test_mfa's gateway (/secure requires MFA, invite only) on `port`, for `public`."""
    settings = mfa_config(port, issuer, upstream, tmp, "invite")
    settings["server"]["public_url"] = public
    settings["state"].update(state)
    settings["rate_limits"] = UNLIMITED
    return settings


def write(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


# -- two gateway processes on Redis and PostgreSQL -----------------------------------------------


class Process(GatewayProcess):
    """`gateway run` (tests.conftest), its stderr read by a thread from the start on, so a full
    pipe never blocks the gateway; `text` is the whole process log as written."""

    def __init__(self, config_path: Path) -> None:
        super().__init__(config_path)  # returns once server.started is read
        # The lines up to server.started were parsed by the base class: written back as JSON.
        self.lines = [orjson.dumps(e).decode() + "\n" for e in self.log]
        self.status: int | None = None
        self._reader = threading.Thread(target=self._read, name="gateway log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("{"):
                self.log.append(orjson.loads(line))

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.status is None:
            if self.proc.poll() is None:
                self.proc.terminate()
            self._reader.join(timeout=40)  # the log read to its end: the process has exited
            self.status = super().stop()
        return self.status


@dataclass
class Cluster:
    """Two `gateway run` processes sharing Redis sessions, PostgreSQL records, state.keys and
    the assertion key, each with its own audit dir; public_url is the first's. The dev IdP."""

    idp: DevIdP
    upstream: Server
    keys: Path  # `gateway keys generate`: the assertion key and the audit signing key
    admin: str  # the first process's admin API
    audits: list[Path]
    procs: list[Process] = field(default_factory=list)
    browsers: Browsers = field(default_factory=Browsers)

    def base(self, n: int) -> str:
        return f"http://127.0.0.1:{self.procs[n].port}"

    @property
    def public(self) -> str:
        return self.base(0)

    async def stop(self) -> list[int]:
        return [await asyncio.to_thread(proc.stop) for proc in self.procs]


def cluster_configs(
    tmp: Path, public_port: int, admin_port: int, issuer: str, upstream: str, **stores: str
) -> list[Path]:
    """The two processes' configs: the first on `public_port` (public_url) with the admin API,
    the second on any free port (read from its server.started event)."""
    keys = assertion_key(tmp).parent  # `gateway keys generate`: the audit key beside it
    state = {**stores, "keys": [base64.b64encode(os.urandom(32)).decode()]}
    public = f"http://127.0.0.1:{public_port}"
    paths = []
    for n, port in enumerate((public_port, 0)):
        settings = gateway_settings(tmp, port, public, issuer, upstream)
        settings["state"] = state
        settings["assertion"] = {"signing_key_file": str(keys / "assertion-es256.pem")}
        settings["audit"] = {
            "dir": str(tmp / f"audit-{n}"),
            "origin": f"gw{n}",
            "signing_key_file": str(keys / "audit-ed25519.pem"),
        }
        if n == 0:
            tokens = tokens_file(tmp / "admin-tokens")
            settings["admin"] = {"listen": f"127.0.0.1:{admin_port}", "tokens_file": str(tokens)}
        paths.append(write(tmp / f"gateway-{n}.yaml", settings))
    return paths


@pytest.fixture
async def env(tmp_path: Path, redis_db: str, pg_records: str) -> AsyncIterator[Cluster]:
    port, admin_port = free_port(), free_port()
    client = DevClient(
        "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
    )
    idp = DevIdP(USERS, [client])
    issuer = await idp.start()
    upstream = await start_server(echo_app())
    paths = cluster_configs(
        tmp_path, port, admin_port, issuer, upstream.url, sessions=redis_db, records=pg_records
    )
    audits = [tmp_path / f"audit-{n}" for n in range(2)]
    env = Cluster(idp, upstream, tmp_path / "keys", f"http://127.0.0.1:{admin_port}", audits)
    # On threads: the base class blocks reading the log until server.started.
    started = await asyncio.gather(
        *(asyncio.to_thread(Process, path) for path in paths), return_exceptions=True
    )
    env.procs = [p for p in started if isinstance(p, Process)]
    try:
        for failed in started:
            if isinstance(failed, BaseException):
                raise failed
        yield env
    finally:
        await env.stop()
        await env.browsers.close()
        await upstream.runner.cleanup()
        await idp.stop()


# -- 1. one code, two processes, the same moment -------------------------------------------------


async def two_prompts(
    env: Cluster, user: str
) -> tuple[tuple[aiohttp.ClientSession, aiohttp.ClientResponse], ...]:
    """Two separate logins of `user` (two sessions, neither with MFA yet); the first session's
    code prompt from process 1, the second's from process 2."""
    first, second = env.browsers.new(), env.browsers.new()
    prompt_1 = await past_notice(first, await sign_in(first, env.public + APP, user))
    landed = await sign_in(second, env.public + APP, user)  # the notice was shown once already
    assert landed.status == 200 and landed.url.path == "/.gateway/mfa", landed.url
    prompt_2 = await follow(second, f"{env.base(1)}/.gateway/mfa?rd={quote(APP, safe='')}")
    assert prompt_2.status == 200 and "Enter your authenticator code" in await prompt_2.text()
    return (first, prompt_1), (second, prompt_2)


async def test_one_code_sent_to_two_processes_at_once_is_accepted_once(env: Cluster) -> None:
    for user in RACERS:  # a fresh user per round: each round has an unspent code
        link = await enroll_link(env.admin, email(user))
        enrolled = await enroll(env.browsers.new(), link, user)
        prompts = await two_prompts(env, user)
        code = later_code(enrolled.secret)
        answers = await asyncio.gather(
            *(send_code(browser, prompt, code, env.public) for browser, prompt in prompts)
        )
        won = [stepped_up(answer, env.public) for answer in answers]
        assert won.count(True) == 1, [(a.status, a.headers.get("Location")) for a in answers]
        (winner, _), (loser, loser_prompt) = prompts if won[0] else prompts[::-1]
        refused = answers[won.index(False)]
        # Refused as a replay (after the winner), or while the winner held the identity's lock.
        assert refused.status in (401, 429), refused.status
        assert "gateway" not in refused.cookies and 'role="alert"' in await refused.text()
        # Sent again once the race is over: a replay, whichever process saw the code first.
        again = await send_code(loser, loser_prompt, code, env.public)
        assert again.status == 401 and "gateway" not in again.cookies, again.status
        app = await follow(winner, env.public + APP)
        assert app.status == 200 and orjson.loads(await app.read())["raw_path"] == APP
        still = await follow(loser, env.public + APP)  # that session is still without MFA
        assert still.url.path == "/.gateway/mfa", still.url


# -- 2. an enrollment outlives the gateway -------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def records(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The durable record store (state.records) both gateways of a restart use."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    return str(request.getfixturevalue("pg_records"))


@dataclass
class Lineup:
    """The dev IdP and an upstream, for in-process gateways started one after the other with
    one config's keys (state.keys, the assertion and audit keys)."""

    tmp: Path
    idp: DevIdP
    issuer: str
    upstream: Server
    ports: tuple[int, int]  # the first gateway's, then its successor's
    admin: str = ""  # the admin API of the gateway started last
    state_key: str = field(default_factory=lambda: base64.b64encode(os.urandom(32)).decode())
    browsers: Browsers = field(default_factory=Browsers)

    async def start(self, n: int, **state: str) -> Listening:
        port, admin_port = self.ports[n], free_port()
        public = f"http://127.0.0.1:{port}"
        settings = gateway_settings(self.tmp, port, public, self.issuer, self.upstream.url, **state)
        settings["state"]["keys"] = [self.state_key]
        keys = assertion_key(self.tmp).parent
        settings["assertion"] = {"signing_key_file": str(keys / "assertion-es256.pem")}
        settings["audit"]["signing_key_file"] = str(keys / "audit-ed25519.pem")
        tokens = tokens_file(self.tmp / "admin-tokens")
        settings["admin"] = {"listen": f"127.0.0.1:{admin_port}", "tokens_file": str(tokens)}
        self.admin = f"http://127.0.0.1:{admin_port}"
        return await listen(load_settings(write(self.tmp / f"gateway-{n}.yaml", settings)))


@pytest.fixture
async def lineup(tmp_path: Path) -> AsyncIterator[Lineup]:
    ports = (free_port(), free_port())
    callbacks = tuple(f"http://127.0.0.1:{port}/.gateway/callback" for port in ports)
    idp = DevIdP(USERS, [DevClient("gateway", SECRET, redirect_uris=callbacks)])
    issuer = await idp.start()
    upstream = await start_server(echo_app())
    env = Lineup(tmp_path, idp, issuer, upstream, ports)
    yield env
    await env.browsers.close()
    await upstream.runner.cleanup()
    await idp.stop()


async def prompt_of(env: Lineup, base: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    """A new login of alice (enrolled, her notice shown before): the code prompt at once."""
    browser = env.browsers.new()
    prompt = await sign_in(browser, base + APP, "alice")
    assert prompt.status == 200 and prompt.url.path == "/.gateway/mfa", prompt.url
    assert "Enter your authenticator code" in await prompt.text()  # not the enrollment page
    return browser, prompt


async def before_restart(env: Lineup, base: str) -> Enrolled:
    """alice enrolls through a link, signs in again and spends her first recovery code."""
    enrolled = await enroll(
        env.browsers.new(), await enroll_link(env.admin, email("alice")), "alice"
    )
    browser = env.browsers.new()
    prompt = await past_notice(browser, await sign_in(browser, base + APP, "alice"))
    assert stepped_up(await send_code(browser, prompt, enrolled.codes[0], base), base)
    return enrolled


async def after_restart(env: Lineup, base: str, enrolled: Enrolled, guard_kept: bool) -> None:
    replayed = None
    if guard_kept:  # the replay guard is in the session store: here the same SQLite file
        browser, prompt = await prompt_of(env, base)
        replayed = (await send_code(browser, prompt, enrolled.spent, base)).status
    browser, prompt = await prompt_of(env, base)
    spent = await send_code(browser, prompt, enrolled.codes[0], base)
    assert spent.status == 401 and "gateway" not in spent.cookies, spent.status
    assert stepped_up(await send_code(browser, prompt, later_code(enrolled.secret), base), base)
    app = await follow(browser, base + APP)
    assert app.status == 200 and orjson.loads(await app.read())["raw_path"] == APP
    other, prompt = await prompt_of(env, base)  # an unspent recovery code: its keyed hash kept
    assert stepped_up(await send_code(other, prompt, enrolled.codes[1], base), base)
    assert replayed in (None, 401), f"the enrollment's spent code got {replayed} after a restart"


async def test_an_enrollment_and_a_spent_recovery_code_outlive_a_restart(
    lineup: Lineup, records: str
) -> None:
    # SQLite: the sessions share its file, as the embedded default does. PostgreSQL: the new
    # gateway's sessions are a fresh memory://, so only the durable record store carries over.
    sessions = records if records.startswith("sqlite") else "memory://"
    first = await lineup.start(0, sessions=sessions, records=records)
    try:
        enrolled = await before_restart(lineup, f"http://127.0.0.1:{first.port}")
    finally:
        await first.stop()
    second = await lineup.start(1, sessions=sessions, records=records)
    try:
        base = f"http://127.0.0.1:{second.port}"
        await after_restart(lineup, base, enrolled, guard_kept=sessions == records)
    finally:
        await second.stop()


async def test_the_code_that_confirmed_an_enrollment_is_spent(
    lineup: Lineup, store: str, tmp_path: Path
) -> None:
    """On every session store (memory, SQLite, Redis) the replay guard refuses it at once."""
    gateway = await lineup.start(0, sessions=store, records=f"sqlite:///{tmp_path}/records.db")
    try:
        base = f"http://127.0.0.1:{gateway.port}"
        enrolled = await enroll(
            lineup.browsers.new(), await enroll_link(lineup.admin, email("alice")), "alice"
        )
        browser = lineup.browsers.new()
        prompt = await past_notice(browser, await sign_in(browser, base + APP, "alice"))
        replayed = await send_code(browser, prompt, enrolled.spent, base)
        assert replayed.status == 401 and "gateway" not in replayed.cookies, replayed.status
        assert stepped_up(await send_code(browser, prompt, later_code(enrolled.secret), base), base)
    finally:
        await gateway.stop()


# -- 3. nothing secret in any log ----------------------------------------------------------------


def wrong_code(secret: str) -> str:
    """Six digits that are no code of this secret anywhere near now."""
    near = {code_at(secret, time.time() + STEP * d) for d in range(-2, 4)}
    return next(c for c in (f"{n:06d}" for n in range(0, 10**6, 111_111)) if c not in near)


@dataclass
class Needles:
    """What the logs must never hold, by what it is, in every form it could be written."""

    forms: dict[str, set[bytes]] = field(default_factory=dict)

    def add(self, what: str, *forms: str) -> None:
        self.forms.setdefault(what, set()).update(f.encode() for f in forms if f)

    def secret(self, secret: str) -> None:
        spaced = " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))  # as shown
        self.add("the TOTP secret", secret, secret.lower(), spaced, spaced.lower())

    def code(self, code: str) -> None:
        # Six bare digits occur by chance in any log: the microseconds of every `ts`, sequence
        # numbers, durations, ports, hex digests. So a code is searched in the two forms it
        # would take if written: a JSON string value ("123456", as any event field holding it
        # would be) and a form field or query parameter (code=123456, as a logged body or URL).
        self.add(f"the code {code}", f'"{code}"', f"code={code}")

    def recovery(self, codes: list[str]) -> None:
        for code in codes:
            bare = code.replace("-", "")
            self.add(f"the recovery code {code}", code, bare, code.upper(), bare.upper())

    def link(self, link: str) -> None:
        [token] = parse_qs(urlsplit(link).query)["link"]
        self.add("the enrollment link's token", token)

    def csrf(self, page_text: str) -> None:
        self.add("a form's CSRF token", form_fields(page_text).get("csrf", ""))

    def found_in(self, haystacks: dict[str, bytes]) -> list[tuple[str, str]]:
        """(what, where) for every needle found in a haystack."""
        return [
            (what, where)
            for what, forms in self.forms.items()
            for where, hay in haystacks.items()
            if any(form in hay for form in forms)
        ]


async def whole_life(env: Cluster, needles: Needles) -> None:
    """bob's second factor from link to reset, across both processes: an enrollment (a wrong
    code first), a wrong code, a right one, a recovery code, a replayed code, the reset."""
    one, two = env.public, env.base(1)
    link = await enroll_link(env.admin, email("bob"))
    needles.link(link)
    browser = env.browsers.new()
    page = await sign_in(browser, link, "bob")
    secret = shown_secret(await page.text())
    needles.secret(secret)
    needles.csrf(await page.text())
    wrong = wrong_code(secret)
    refused = await send_code(browser, page, wrong, one, ENROLL)
    assert refused.status == 401, refused.status
    enrolling = code_at(secret, time.time())
    done = await send_code(browser, page, enrolling, one, ENROLL)
    assert done.status == 200, done.status
    codes = recovery_codes(await done.text())
    needles.recovery(codes)

    browser = env.browsers.new()  # process 2: a wrong code, then the right one
    await past_notice(browser, await sign_in(browser, one + APP, "bob"))
    prompt = await follow(browser, f"{two}/.gateway/mfa?rd={quote(APP, safe='')}")
    needles.csrf(await prompt.text())
    assert (await send_code(browser, prompt, wrong, one)).status == 401
    right = later_code(secret)
    assert stepped_up(await send_code(browser, prompt, right, one), one)

    browser = env.browsers.new()  # process 1: a recovery code
    prompt = await sign_in(browser, one + APP, "bob")
    assert stepped_up(await send_code(browser, prompt, codes[0], one), one)

    browser = env.browsers.new()  # process 2: the right code again, replayed
    await sign_in(browser, one + APP, "bob")
    prompt = await follow(browser, f"{two}/.gateway/mfa?rd={quote(APP, safe='')}")
    assert (await send_code(browser, prompt, right, one)).status == 401

    status, answer = await admin_call(env.admin, "POST", f"/users/{email('bob')}/reset-mfa")
    assert status == 200 and answer["removed"] is True, answer
    browser = env.browsers.new()
    notice = await sign_in(browser, one + APP, "bob")
    assert "Your authenticator was removed" in await notice.text()
    for code in (wrong, enrolling, right):
        needles.code(code)
    needles.add("a cookie value", *env.browsers.cookies)


MFA_EVENTS = {
    "mfa.enroll_link_issued",
    "mfa.enrolled",
    "mfa.failed",
    "mfa.verified",
    "mfa.recovery_used",
    "mfa.replay",
    "mfa.reset",
}


async def test_no_secret_of_the_second_factor_reaches_a_log(
    env: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    needles = Needles()
    await whole_life(env, needles)
    assert await env.stop() == [0, 0]  # a clean stop: chain.closed, everything on disk
    haystacks = {
        str(path): path.read_bytes()
        for audit in env.audits
        for path in sorted(audit.rglob("*"))
        if path.is_file()
    }
    assert len(haystacks) >= 2, haystacks.keys()
    haystacks |= {f"process log {n}": proc.text.encode() for n, proc in enumerate(env.procs)}
    assert needles.found_in(haystacks) == []
    # Not a vacuous search: the events are there, in the audit logs and the process logs,
    # with the user they are about.
    records = [
        orjson.loads(line)
        for audit in env.audits
        for segment in audit.glob("*.jsonl")
        for line in segment.read_bytes().splitlines()
    ]
    assert {r["type"] for r in records} >= MFA_EVENTS, MFA_EVENTS - {r["type"] for r in records}
    assert any(r.get("user") == email("bob") for r in records if r["type"] == "mfa.verified")
    logged = {entry.get("event") for proc in env.procs for entry in proc.log}
    assert logged >= MFA_EVENTS, MFA_EVENTS - logged
    key = str(env.keys / "audit-ed25519.pub.pem")
    for n, audit in enumerate(env.audits):
        code = main(["audit", "verify", str(audit), "--key", key])
        out = capsys.readouterr()
        assert code == 0 and out.out.startswith(f"OK: origin gw{n}, "), out
