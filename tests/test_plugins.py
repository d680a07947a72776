"""Plugins (gateway/plugins.py) and the shipped ones (plugins/redis_stream.py, syslog.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from gateway.access import Ask, plugin_facts
from gateway.audit import record
from gateway.caller import Caller
from gateway.plugins import Deny, PluginError, Plugins, PluginStats, load_plugins
from gateway.settings import Plugin
from plugins.redis_stream import RedisStream
from plugins.syslog import Syslog
from tests.conftest import redis_admin

REDIS_URL = "redis://127.0.0.1:6379/9"  # this file's database; each test uses its own stream

PLUGIN_MODULE = """
import asyncio
from gateway.plugins import Deny, Options


class Recorder:
    def __init__(self, options):
        read = Options(options)
        self.tag = read.text("tag", "r")
        read.done()
        self.records, self.lines, self.calls = [], [], 0
        self.started = self.closed = False

    async def start(self):
        self.started = True

    async def close(self):
        self.closed = True

    def on_access(self, record):
        self.records.append(record)

    async def on_records(self, lines):
        self.calls += 1
        self.lines.extend(lines)


class Raiser:
    def __init__(self, options):
        pass

    def on_access(self, record):
        raise RuntimeError("sink is broken")


class Hanger:
    def __init__(self, options):
        pass

    async def on_access(self, record):
        await asyncio.sleep(3600)

    async def on_records(self, lines):
        await asyncio.sleep(3600)


class Check:
    def __init__(self, options):
        read = Options(options)
        self.answer = read.text("answer")
        self.name = read.text("label", "ipcheck")
        read.done()

    async def check(self, facts):
        if self.answer == "deny":
            return Deny("blocked ip!")
        if self.answer == "raise":
            raise RuntimeError("reputation service down")
        if self.answer == "hang":
            await asyncio.sleep(3600)
        if self.answer == "swallow":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return None
        if self.answer == "bad":
            return False
        return None


class SyncCheck:
    name = "synccheck"

    def __init__(self, options):
        pass

    def check(self, facts):
        return Deny("sync") if facts == "deny-me" else None


class Typo:
    def __init__(self, options):
        pass

    def on_acess(self, record):
        pass


class NoHooks:
    def __init__(self, options):
        pass


class Picky:
    def __init__(self, options):
        raise ValueError("level must be low or high")


class Careless:
    def __init__(self):
        pass

    def on_access(self, record):
        pass


Plugin = Recorder
"""


def entry(use: str, **options: Any) -> Plugin:
    return Plugin(use=use, options=options)


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of an importable module holding the test plugins above."""
    name = f"gw_test_plugins_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def audit_lines(count: int) -> list[bytes]:
    """A chain of real audit lines: genesis, access records (odd characters), checkpoints."""
    lines: list[bytes] = []
    prev = record.GENESIS_PREV
    for seq in range(count):
        fields: dict[str, Any]
        if seq == 0:
            kind, fields = "genesis", {"key_id": "k1", "public_key": "pk"}
        elif seq % 10 == 0:
            kind, fields = "checkpoint", {"head": prev, "count": seq, "key_id": "k1", "sig": "s"}
        else:
            path = f"/ünïcode/\x1b[31m/\u202e/{seq}"
            kind, fields = "access", {"request_id": f"r{seq}", "path": path, "decision": "allow"}
        line = record.line(fields, origin="gw1", seq=seq, ts=time.time(), type=kind, prev=prev)
        lines.append(line)
        prev = record.digest(line)
    return lines


# -- loading -----------------------------------------------------------------------------------


def test_loads_shipped_plugins_by_name() -> None:
    plugins = load_plugins(
        [
            entry("redis_stream", url=REDIS_URL),
            entry("syslog", host="siem.example.org"),
            entry("redis_stream", url="rediss://siem.example.org:6380/0", maxlen="500"),
        ]
    )
    assert plugins.names == ("redis_stream", "syslog", "redis_stream#2")
    assert isinstance(plugins["redis_stream"], RedisStream)
    assert isinstance(plugins["syslog"], Syslog)
    second = plugins["redis_stream#2"]
    assert isinstance(second, RedisStream)
    assert (second.stream, second.maxlen) == ("gateway:audit", 500)


def test_loads_dotted_paths(module: str) -> None:
    plugins = load_plugins(
        [
            entry(f"{module}:Recorder"),
            entry(f"{module}.Recorder", tag="x"),
            entry(f"{module}.Check", answer="deny"),
        ]
    )
    assert plugins.names == (f"{module}:Recorder", f"{module}.Recorder", "ipcheck")
    recorder: Any = plugins[f"{module}.Recorder"]
    assert recorder.tag == "x"


def test_loads_an_entry_point(module: str, tmp_path: Path) -> None:
    dist = tmp_path / "gw_test_dist-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gw-test-dist\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[gateway.plugins]\ntest-recorder = {module}\n")
    plugins = load_plugins([entry("test-recorder", tag="ep")])
    assert type(plugins["test-recorder"]).__name__ == "Recorder"  # the module's `Plugin`
    recorder: Any = plugins["test-recorder"]
    assert recorder.tag == "ep"


def test_every_bad_entry_is_reported_at_once(module: str, tmp_path: Path) -> None:
    with pytest.raises(PluginError) as caught:
        load_plugins(
            [
                entry("redis_stream", url=REDIS_URL),
                entry("redis_stream", url=REDIS_URL, maxlen=0),
                entry("redis_stream", url=REDIS_URL, maxln=5),
                entry("nope"),
                entry("syslog", host="siem", ca_file=tmp_path / "missing.pem"),
                entry(f"{module}:Typo"),
            ]
        )
    problems = caught.value.problems
    assert len(problems) == 5
    assert [p.message for p in problems[:4]] == [
        "plugins[1] (redis_stream): maxlen must be a positive integer",
        "plugins[2] (redis_stream): unknown option 'maxln' "
        "(did you mean 'maxlen'? options: ca_file, maxlen, password, stream, url)",
        "plugins[3].use: unknown plugin 'nope': not shipped in plugins/ "
        "(redis_stream, syslog, webhook), "
        "and no entry point of group gateway.plugins has this name",
        f"plugins[4] (syslog): ca_file: cannot load {tmp_path / 'missing.pem'}: "
        "[Errno 2] No such file or directory",
    ]
    assert problems[4].message == (
        f"plugins[5] ({module}:Typo): on_acess is not a hook "
        "(hooks: on_access, on_event, on_alert, on_records, check)"
    )
    assert [p.where for p in problems[1:3]] == [(("plugins", 2),), (("plugins", 3, "use"),)]
    assert str(caught.value) == "\n".join(p.message for p in problems)


@pytest.mark.parametrize(
    ("use", "options", "message"),
    [
        ("redis_stream", {}, "url is required"),
        ("redis_stream", {"url": "http://h"}, "url must be redis://HOST[:PORT][/DB] or rediss://"),
        ("redis_stream", {"url": "redis://h:99999"}, "url is not a valid redis:// or rediss://"),
        ("redis_stream", {"url": "redis://h/x"}, "url: the path is the database number"),
        ("redis_stream", {"url": REDIS_URL, "maxlen": "many"}, "maxlen must be a positive int"),
        ("redis_stream", {"url": REDIS_URL, "maxlen": True}, "maxlen must be a positive integer"),
        ("redis_stream", {"url": REDIS_URL, "maxlen": -5}, "maxlen must be a positive integer"),
        ("redis_stream", {"url": REDIS_URL, "stream": ""}, "stream must be a non-empty string"),
        ("redis_stream", {"url": REDIS_URL, "ca_file": "ca.pem"}, "ca_file needs a rediss:// url"),
        ("syslog", {}, "host is required"),
        ("syslog", {"host": "h", "port": 70000}, "port must be at most 65535"),
        ("syslog", {"host": "h", "facility": "nope"}, "facility must be one of kern, user,"),
        ("syslog", {"host": "h", "cert_file": "c.pem"}, "cert_file and key_file go together"),
        ("syslog", {"host": ["h"]}, "host must be a non-empty string, not a list"),
        ("no_such_module:Thing", {}, "cannot import no_such_module: ModuleNotFoundError"),
        ("gateway.settings:Nothing", {}, "'gateway.settings:Nothing' does not name a plugin"),
        ("../etc/passwd", {}, "'../etc/passwd' is not a plugin name, a dotted path or an entry"),
        (":NoHooks", {}, "is not a plugin name"),
    ],
)
def test_option_and_name_errors_are_clear(use: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(PluginError) as caught:
        load_plugins([entry(use, **options)])
    assert message in str(caught.value)
    assert str(caught.value).startswith("plugins[0]")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("NoHooks", ": has no hook method (on_access, on_event, on_alert, on_records, check)"),
        ("Picky", ": level must be low or high"),
        ("Careless", ": cannot be set up: TypeError: "),
    ],
)
def test_plugin_class_errors_are_clear(module: str, name: str, message: str) -> None:
    with pytest.raises(PluginError, match=re.escape(f"plugins[0] ({module}:{name}){message}")):
        load_plugins([entry(f"{module}:{name}")])


def test_a_password_is_never_shown() -> None:
    plugins = load_plugins([entry("redis_stream", url=REDIS_URL, password="hunter2")])
    assert "hunter2" not in repr(vars(plugins["redis_stream"]))


# -- isolation ---------------------------------------------------------------------------------


async def test_failing_and_hanging_sinks_never_slow_dispatch(
    module: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.plugins")
    hook_timeout = 0.5  # the hanging hook sleeps an hour; each call is cut after this
    uses = [f"{module}:Raiser", f"{module}:Hanger", f"{module}:Recorder"]
    plugins = load_plugins([entry(use) for use in uses], hook_timeout=hook_timeout)
    await plugins.start()
    started = time.perf_counter()
    for i in range(1000):
        plugins.on_access({"request_id": f"r{i}"})
    elapsed = time.perf_counter() - started
    assert elapsed < hook_timeout / 10

    recorder: Any = plugins[uses[2]]
    await eventually(lambda: len(recorder.records) == 1000)
    await eventually(lambda: plugins.stats()[uses[0]].failed == 1000)
    await eventually(lambda: plugins.stats()[uses[1]].failed == 1)
    stats = plugins.stats()
    assert stats[uses[0]] == PluginStats(delivered=0, dropped=0, failed=1000, queued=0)
    assert stats[uses[2]] == PluginStats(delivered=1000, dropped=0, failed=0, queued=0)
    assert stats[uses[1]].queued >= 998

    started = time.perf_counter()
    await plugins.close(drain=0.1)
    assert time.perf_counter() - started < 1.0
    hanger = plugins.stats()[uses[1]]
    assert hanger.queued == 0 and hanger.failed + hanger.dropped == 1000
    assert recorder.closed

    logged = [(r.msg, getattr(r, "plugin", None)) for r in caplog.records]
    assert logged.count(("plugin.failed", uses[0])) == 1  # 1000 failures, one line a minute
    assert ("plugin.failed", uses[1]) in logged
    (hang,) = [r for r in caplog.records if getattr(r, "plugin", None) == uses[1]]
    assert hang.__dict__["error"] == "timed out after 0.5s"


async def test_a_full_queue_drops_and_counts(module: str) -> None:
    use = f"{module}:Hanger"
    plugins = load_plugins([entry(use)], queue_size=10)
    for i in range(100):
        plugins.on_access({"request_id": f"r{i}"})
    plugins.on_records([b"{}"] * 5)  # 10 + 5 > 10: the whole batch is dropped
    assert plugins.stats()[use] == PluginStats(delivered=0, dropped=95, failed=0, queued=10)
    await plugins.close(drain=0)
    plugins.on_access({"request_id": "late"})
    assert plugins.stats()[use] == PluginStats(delivered=0, dropped=106, failed=0, queued=0)


async def test_records_are_copied_batched_and_bare(module: str) -> None:
    plugins = load_plugins([entry(f"{module}:Recorder")])
    recorder: Any = plugins[f"{module}:Recorder"]
    access: dict[str, Any] = {"request_id": "r1", "status": None}
    plugins.on_access(access)
    access["status"] = 200  # changed after dispatch: the plugin sees it as dispatched
    for batch in range(10):
        plugins.on_records([b'{"seq":%d}\n' % (batch * 100 + i) for i in range(100)])
    await plugins.start()
    assert recorder.started
    await eventually(lambda: len(recorder.lines) == 1000)
    assert recorder.records == [{"request_id": "r1", "status": None}]
    assert recorder.calls == 1  # ten queued batches, one call
    assert recorder.lines[:2] == [b'{"seq":0}', b'{"seq":1}']  # what record.digest hashes
    await plugins.close()
    assert plugins.stats()[f"{module}:Recorder"].delivered == 1001


async def test_no_plugins_is_cheap() -> None:
    plugins = Plugins()
    await plugins.start()
    plugins.on_access({})
    plugins.on_records([b"x"])
    assert await plugins.check(object()) is None
    assert plugins.stats() == {}
    await plugins.close()


# -- the policy check --------------------------------------------------------------------------


async def test_check_deny_names_the_plugin_and_its_reason(module: str) -> None:
    plugins = load_plugins(
        [
            entry(f"{module}:Check", answer="allow"),
            entry(f"{module}:Check", answer="deny", label="iprep"),
            entry(f"{module}:Check", answer="raise", label="never-asked"),
        ]
    )
    assert await plugins.check(object()) == Deny("denied-by-plugin:iprep:blocked-ip-")
    assert plugins.stats()["never-asked"].failed == 0  # the first Deny ends the chain


async def test_check_allows_when_every_plugin_allows(module: str) -> None:
    plugins = load_plugins([entry(f"{module}:Check", answer="allow"), entry(f"{module}:SyncCheck")])
    assert await plugins.check("fine") is None
    assert await plugins.check("deny-me") == Deny("denied-by-plugin:synccheck:sync")


@pytest.mark.parametrize("answer", ["raise", "hang", "swallow", "bad"])
async def test_check_fails_closed(module: str, answer: str) -> None:
    plugins = load_plugins([entry(f"{module}:Check", answer=answer)], check_timeout=0.1)
    started = time.perf_counter()
    assert await plugins.check(object()) == Deny("policy-check-failed:ipcheck")
    assert time.perf_counter() - started < 1.0
    assert plugins.stats()["ipcheck"].failed == 1


async def test_the_documented_example_plugin_works(tmp_path: Path, monkeypatch: Any) -> None:
    docs = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    example = docs.split("## An example plugin", 1)[1].split("```python\n", 1)[1].split("```")[0]
    (tmp_path / "gw_docs_example.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gw_docs_example", raising=False)
    plugins = load_plugins([entry("gw_docs_example:Blocklist", networks="203.0.113.0/24, ::1")])
    # What the gateway's pipeline hands a check, built by the same function.
    caller = Caller(user="alice", sub="alice", groups=("staff",), session=None)
    ask = Ask("GET", "gw.test", "/", "203.0.113.9", "req-1")
    facts = plugin_facts("app", ask, caller, False)
    assert await plugins.check(facts) == Deny("denied-by-plugin:blocklist:blocklisted-address")
    other = plugin_facts("app", ask._replace(client_ip="192.0.2.1"), caller, False)
    assert await plugins.check(other) is None
    await plugins.start()
    plugins.on_access({"decision": "deny", "user": "alice"})
    await plugins.close()
    blocklist: Any = plugins["blocklist"]
    assert blocklist.denials == {"alice": 1}
    with pytest.raises(PluginError, match=r"networks: .* does not appear to be an IPv4 or IPv6"):
        load_plugins([entry("gw_docs_example:Blocklist", networks="10.0.0.0/33")])


# -- redis_stream ------------------------------------------------------------------------------


@pytest.fixture
async def redis_stream_name() -> AsyncIterator[str]:
    admin = await redis_admin(REDIS_URL)
    name = f"test:plugins:{uuid.uuid4().hex}"
    yield name
    await admin.delete(name)
    await admin.aclose()


async def test_redis_stream_keeps_every_line_byte_for_byte(redis_stream_name: str) -> None:
    lines = audit_lines(25)
    plugins = load_plugins([entry("redis_stream", url=REDIS_URL, stream=redis_stream_name)])
    await plugins.start()
    plugins.on_records([line + b"\n" for line in lines[:12]])
    plugins.on_records(lines[12:])
    await plugins.close()  # drains the queue first
    admin = await redis_admin(REDIS_URL)
    entries: Any = await admin.xrange(redis_stream_name)
    await admin.aclose()
    copied = [fields[b"r"] for _, fields in entries]
    assert copied == lines
    assert [set(fields) for _, fields in entries] == [{b"r"}] * len(lines)
    for before, after in itertools.pairwise(copied):  # a consumer re-checks the chain
        assert orjson.loads(after)["prev"] == record.digest(before)
    assert sum(orjson.loads(line)["type"] == "checkpoint" for line in copied) == 2
    assert plugins.stats()["redis_stream"] == PluginStats(len(lines), 0, 0, 0)


async def test_redis_stream_trims_to_about_maxlen(redis_stream_name: str) -> None:
    options: dict[str, Any] = {"url": REDIS_URL, "stream": redis_stream_name, "maxlen": 10}
    plugins = load_plugins([entry("redis_stream", **options)])
    await plugins.start()
    for _ in range(20):
        plugins.on_records([b'{"type":"access"}'] * 100)
    await plugins.close()
    admin = await redis_admin(REDIS_URL)
    length = await admin.xlen(redis_stream_name)
    await admin.aclose()
    assert plugins.stats()["redis_stream"].delivered == 2000
    assert 10 <= length < 2000  # MAXLEN ~: whole nodes are trimmed, never below maxlen


async def test_redis_stream_down_is_counted_not_raised() -> None:
    plugins = load_plugins([entry("redis_stream", url="redis://127.0.0.1:1/0")])
    await plugins.start()
    plugins.on_records([b"{}"] * 3)
    await eventually(lambda: plugins.stats()["redis_stream"].failed == 3)
    await plugins.close()


# -- syslog ------------------------------------------------------------------------------------


class Collector:
    """A small RFC 5425 receiver: TLS, client certificate required, octet-counted frames."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.messages: list[bytes] = []
        self.peers: list[Any] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self.context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        await eventually(lambda: not self._writers)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.peers.append(writer.get_extra_info("peercert"))
        try:
            while True:
                length = int((await reader.readuntil(b" "))[:-1])
                self.messages.append(await reader.readexactly(length))
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca.configure_trust(server)
    server.verify_mode = ssl.CERT_REQUIRED  # the collector wants the gateway's certificate
    client = ca.issue_cert("gateway.test")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    files = {"ca_file": tmp_path / "ca.pem", "cert_file": tmp_path / "client.pem"}
    return {"server": server, "options": files | {"key_file": tmp_path / "client.key"}}


@pytest.fixture
async def collector(pki: dict[str, Any]) -> AsyncIterator[Collector]:
    collector = Collector(pki["server"])
    await collector.start()
    yield collector
    if collector._server is not None and collector._server.is_serving():
        await collector.stop()


_MESSAGE = re.compile(rb"<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) - (.*)", re.DOTALL)


async def test_syslog_sends_rfc5424_messages_over_mutual_tls(
    pki: dict[str, Any], collector: Collector
) -> None:
    lines = audit_lines(3)
    alert = record.line(
        {"subject": "alice"}, origin="gw1", seq=3, ts=time.time(), type="alert.new_ip", prev="0"
    )
    options = {"host": "127.0.0.1", "port": collector.port, "hostname": "gw1", **pki["options"]}
    plugins = load_plugins([entry("syslog", **options)])
    await plugins.start()
    plugins.on_records([*lines, alert + b"\n"])
    await eventually(lambda: len(collector.messages) == 4)
    await plugins.close()

    parsed = [_MESSAGE.fullmatch(message) for message in collector.messages]
    assert all(parsed)
    fields = [m.groups() for m in parsed if m]
    assert [f[6] for f in fields] == [*lines, alert]  # MSG: the exact bytes
    assert [f[0] for f in fields] == [b"86", b"86", b"86", b"84"]  # authpriv.info / .warning
    assert [f[5] for f in fields] == [b"genesis", b"access", b"access", b"alert.new_ip"]
    assert {f[2:5] for f in fields} == {(b"gw1", b"access-gateway", str(os.getpid()).encode())}
    assert [f[1].decode() for f in fields] == [orjson.loads(x)["ts"] for x in [*lines, alert]]
    assert ("DNS", "gateway.test") in collector.peers[0]["subjectAltName"]  # mutual TLS


async def test_syslog_reconnects_after_the_collector_restarts(
    pki: dict[str, Any], collector: Collector
) -> None:
    options = {"host": "127.0.0.1", "port": collector.port, **pki["options"]}
    plugins = load_plugins([entry("syslog", **options)])
    await plugins.start()
    syslog = plugins["syslog"]
    assert isinstance(syslog, Syslog)
    plugins.on_records([b'{"type":"a"}'])
    await eventually(lambda: len(collector.messages) == 1)

    await collector.stop()  # a restart: the open connection is closed
    await eventually(lambda: not syslog.connected)
    await collector.start()
    plugins.on_records([b'{"type":"b"}'])
    await eventually(lambda: len(collector.messages) == 2)

    await collector.stop()  # down: batches fail and are counted, then back off
    await eventually(lambda: not syslog.connected)
    plugins.on_records([b'{"type":"c"}'])
    await eventually(lambda: plugins.stats()["syslog"].failed == 1)
    await collector.start()
    await asyncio.sleep(0.6)  # the first backoff is 0.5s
    plugins.on_records([b'{"type":"d"}'])
    await eventually(lambda: len(collector.messages) == 3)
    assert [m.split(b" ")[5] for m in collector.messages] == [b"a", b"b", b"d"]
    assert plugins.stats()["syslog"] == PluginStats(delivered=3, dropped=0, failed=1, queued=0)
    await plugins.close()


async def test_syslog_refuses_a_collector_it_does_not_trust(
    pki: dict[str, Any], collector: Collector, tmp_path: Path
) -> None:
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    options: dict[str, Any] = {"host": "127.0.0.1", "port": collector.port, **pki["options"]}
    options["ca_file"] = tmp_path / "other-ca.pem"
    plugins = load_plugins([entry("syslog", **options)])
    await plugins.start()
    plugins.on_records([b'{"type":"access"}'])
    await eventually(lambda: plugins.stats()["syslog"].failed == 1)
    await plugins.close()
    assert collector.messages == []
