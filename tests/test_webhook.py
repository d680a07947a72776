"""The shipped webhook plugin (plugins/webhook.py), against a real receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from aiohttp import web
from pydantic import SecretStr

from gateway.plugins import PluginError, load_plugins
from gateway.settings import Plugin, load_settings
from plugins import webhook
from plugins.webhook import Webhook, backoff, sign, verify
from tests.conftest import REPO, Server, start_server

SECRET = "s3cret-for-tests-only-0123456789abcdef"  # 38 bytes
KEY = SECRET.encode()
ALERT = {"type": "alert.new_ip", "user": "alice@example.org", "client_ip": "203.0.113.9"}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


# -- a receiver: its own signature check, not webhook.verify -----------------------------------


def receiver_accepts(headers: dict[str, str], body: bytes, key: bytes = KEY) -> bool:
    """What a receiver written from the docs does: recompute, compare, refuse stale stamps."""
    stamp = headers.get("X-Gateway-Timestamp", "")
    scheme, _, given = headers.get("X-Gateway-Signature", "").partition("=")
    expected = hmac.new(key, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = stamp.isdigit() and abs(time.time() - int(stamp)) <= 300
    return scheme == "v1" and fresh and hmac.compare_digest(given, expected)


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    answers: list[int] = field(default_factory=list)  # statuses to give, in order; then 200
    hang: bool = False
    requests: list[Received] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), body))
        if self.hang:
            await self.released.wait()
        status = self.answers.pop(0) if self.answers else 200
        headers = {"Location": "/elsewhere"} if 300 <= status < 400 else {}
        return web.Response(status=status, headers=headers)


MakeReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def make_receiver() -> AsyncIterator[MakeReceiver]:
    servers: list[tuple[Server, Receiver]] = []

    async def make(*, tls: ssl.SSLContext | None = None, **kwargs: Any) -> Receiver:
        receiver = Receiver(url="", **kwargs)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", receiver.handle)
        server = await start_server(app, ssl_context=tls)
        scheme, host = ("https", "localhost") if tls else ("http", "127.0.0.1")
        receiver.url = f"{scheme}://{host}:{server.port}/hooks/T0KEN-in-path"
        servers.append((server, receiver))
        return receiver

    yield make
    for server, receiver in servers:
        receiver.released.set()
        await server.runner.cleanup()


class Naps:
    """An injected sleep: records each backoff and returns at once."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def hook(url: str, *, naps: Naps | None = None, **options: Any) -> Webhook:
    return Webhook({"url": url, "secret": SecretStr(SECRET), **options}, sleep=naps or Naps())


async def started(plugin: Webhook) -> Webhook:
    await plugin.start()
    return plugin


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- delivery and signature --------------------------------------------------------------------


async def test_a_delivered_alert_verifies(make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    plugin = await started(hook(receiver.url))
    await plugin.on_alert(ALERT)
    await eventually(lambda: plugin.stats.sent == 1)
    await plugin.close()

    (got,) = receiver.requests
    assert got.path == "/hooks/T0KEN-in-path"
    assert got.body == orjson.dumps(ALERT, option=orjson.OPT_SORT_KEYS)
    assert list(orjson.loads(got.body)) == sorted(ALERT)
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"] == "access-gateway-webhook"
    assert UUID.fullmatch(got.headers["X-Gateway-Delivery"])
    assert abs(int(got.headers["X-Gateway-Timestamp"]) - time.time()) < 5
    assert receiver_accepts(got.headers, got.body)
    stamp, signature = got.headers["X-Gateway-Timestamp"], got.headers["X-Gateway-Signature"]
    assert verify(KEY, stamp, signature, got.body, time.time())
    assert signature == sign(KEY, int(stamp), got.body)
    assert plugin.stats == webhook.WebhookStats(sent=1, failed=0, dropped=0, queued=0)


async def test_a_tampered_body_or_a_wrong_secret_fails(make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    plugin = await started(hook(receiver.url))
    await plugin.on_alert(ALERT)
    await eventually(lambda: plugin.stats.sent == 1)
    await plugin.close()

    (got,) = receiver.requests
    tampered = got.body.replace(b"alice", b"mallory")
    stamp, signature = got.headers["X-Gateway-Timestamp"], got.headers["X-Gateway-Signature"]
    assert not receiver_accepts(got.headers, tampered)
    assert not receiver_accepts(got.headers, got.body, key=b"another-secret-of-32-bytes-or-more!")
    now = time.time()
    assert not verify(KEY, stamp, signature, tampered, now)
    assert not verify(b"another-secret-of-32-bytes-or-more!", stamp, signature, got.body, now)
    assert not verify(KEY, str(int(stamp) + 1), signature, got.body, now)  # the stamp is signed
    assert not verify(KEY, stamp, signature.upper(), got.body, now)
    assert not verify(KEY, stamp, "", got.body, now)


def test_verify_rejects_replayed_and_malformed_timestamps() -> None:
    body, stamp = b'{"type":"alert.x"}', 1_764_158_067
    signature = sign(KEY, stamp, body)
    assert re.fullmatch(r"v1=[0-9a-f]{64}", signature)
    assert verify(KEY, str(stamp), signature, body, now=stamp + 299)
    assert not verify(KEY, str(stamp), signature, body, now=stamp + 301)  # replayed later
    assert not verify(KEY, str(stamp), signature, body, now=stamp - 301)  # from the future
    assert verify(KEY, str(stamp), signature, body, now=stamp + 30, tolerance=60)
    assert not verify(KEY, str(stamp), signature, body, now=stamp + 90, tolerance=60)
    for bad in ("", "-1", "1e9", " 1764158067", "١٧٦٤١٥٨٠٦٧", "9" * 400):
        assert not verify(KEY, bad, signature, body, now=stamp)
    # several signatures (a receiver rotating its secret sees each): any one may match
    assert verify(KEY, str(stamp), f"v1={'0' * 64}, {signature}", body, now=stamp)


# -- retries -----------------------------------------------------------------------------------


async def test_retries_after_500_and_503_with_one_delivery_id(make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver(answers=[500, 503])
    naps = Naps()
    plugin = await started(hook(receiver.url, naps=naps))
    await plugin.on_alert(ALERT)
    await eventually(lambda: plugin.stats.sent == 1)
    await plugin.close()

    assert len(receiver.requests) == 3
    assert len({r.headers["X-Gateway-Delivery"] for r in receiver.requests}) == 1
    assert len({r.body for r in receiver.requests}) == 1
    assert all(receiver_accepts(r.headers, r.body) for r in receiver.requests)
    assert len(naps.seconds) == 2
    assert 0.375 <= naps.seconds[0] <= 0.5 < 0.75 <= naps.seconds[1] <= 1.0  # grows
    assert plugin.stats.failed == 0


async def test_backoff_grows_to_its_cap_and_retries_stop(make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver(answers=[502] * 10)
    naps = Naps()
    plugin = await started(hook(receiver.url, naps=naps, retries=8))
    await plugin.on_alert(ALERT)
    await eventually(lambda: plugin.stats.failed == 1)
    await plugin.close()

    assert len(receiver.requests) == 9  # the first attempt and 8 retries
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert len(naps.seconds) == len(ceilings)
    for seconds, ceiling in zip(naps.seconds, ceilings, strict=True):
        assert 0.75 * ceiling <= seconds <= ceiling
    assert naps.seconds[:6] == sorted(naps.seconds[:6])
    assert all(0.375 <= backoff(0) <= 0.5 and 22.5 <= backoff(20) <= 30 for _ in range(100))


@pytest.mark.parametrize("status", [408, 429, 500, 502, 504])
async def test_these_answers_are_retried(make_receiver: MakeReceiver, status: int) -> None:
    receiver = await make_receiver(answers=[status])
    plugin = await started(hook(receiver.url))
    await plugin.on_alert(ALERT)
    await eventually(lambda: plugin.stats.sent == 1)
    await plugin.close()
    assert len(receiver.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 404, 413, 302, 307])
async def test_other_answers_are_final(make_receiver: MakeReceiver, status: int) -> None:
    receiver = await make_receiver(answers=[status] * 3)
    naps = Naps()
    plugin = await started(hook(receiver.url, naps=naps))
    await plugin.on_alert(ALERT)
    await eventually(lambda: plugin.stats.failed == 1)
    await plugin.close()
    assert [r.path for r in receiver.requests] == ["/hooks/T0KEN-in-path"]  # no redirect taken
    assert naps.seconds == []
    assert plugin.stats.sent == 0


async def test_a_receiver_that_is_down_is_retried_then_given_up() -> None:
    naps = Naps()
    plugin = await started(hook(f"http://127.0.0.1:{free_port()}/hook", naps=naps, retries=2))
    await plugin.on_alert(ALERT)
    await eventually(lambda: plugin.stats.failed == 1)
    await plugin.close()
    assert len(naps.seconds) == 2


async def test_a_hanging_receiver_times_out_and_close_is_prompt(
    make_receiver: MakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.plugins.webhook")
    receiver = await make_receiver(hang=True)
    plugin = Webhook(
        {"url": receiver.url, "secret": SecretStr(SECRET), "timeout": "150ms", "retries": 1},
        sleep=Naps(),
        grace=0.2,
    )
    await plugin.start()
    began = time.monotonic()
    await plugin.on_alert(ALERT)
    await eventually(lambda: plugin.stats.failed == 1)
    assert 0.3 <= time.monotonic() - began < 2  # two attempts of 150 ms each
    assert len(receiver.requests) == 2

    await plugin.on_alert(ALERT)  # hangs too: close() stops waiting for it
    await eventually(lambda: len(receiver.requests) == 3)
    began = time.monotonic()
    await plugin.close()
    assert time.monotonic() - began < 1
    assert plugin.stats == webhook.WebhookStats(sent=0, failed=1, dropped=1, queued=0)
    (failed, closed) = [r for r in caplog.records if r.name == "gateway.plugins.webhook"]
    assert failed.msg == "webhook.failed" and "no answer within 0.15s" in failed.__dict__["error"]
    assert closed.__dict__["event"] == "webhook.closed" and closed.__dict__["dropped"] == 1


async def test_close_cuts_a_backoff_short(make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver(answers=[503] * 10)
    forever = asyncio.Event()

    async def long_sleep(seconds: float) -> None:
        await forever.wait()

    plugin = Webhook({"url": receiver.url, "secret": SecretStr(SECRET)}, sleep=long_sleep)
    await plugin.start()
    await plugin.on_alert(ALERT)
    await plugin.on_alert(ALERT)  # queued behind: one attempt at close
    await eventually(lambda: len(receiver.requests) == 1)
    began = time.monotonic()
    await plugin.close()
    assert time.monotonic() - began < 1
    assert len(receiver.requests) == 2
    assert plugin.stats.dropped == 2 and plugin.stats.sent == 0


async def test_a_full_queue_drops_new_alerts(
    make_receiver: MakeReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook, "QUEUE_SIZE", 2)
    receiver = await make_receiver(hang=True)
    plugin = Webhook({"url": receiver.url, "secret": SecretStr(SECRET)}, grace=0.05)
    await plugin.start()
    await plugin.on_alert(ALERT)
    await eventually(lambda: len(receiver.requests) == 1)  # in flight, so not queued
    for _ in range(5):
        await plugin.on_alert(ALERT)
    assert plugin.stats == webhook.WebhookStats(sent=0, failed=0, dropped=3, queued=2)
    await plugin.close()
    assert plugin.stats.dropped == 6


async def test_events_selects_alert_types(make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    plugin = await started(hook(receiver.url, events=["alert.deny_*", "alert.privilege_change"]))
    for kind in ("alert.new_ip", "alert.deny_burst", "alert.privilege_change", None):
        await plugin.on_alert({"type": kind, "user": "bob"})
    await eventually(lambda: plugin.stats.sent == 2)
    await plugin.close()
    kinds = [orjson.loads(r.body)["type"] for r in receiver.requests]
    assert kinds == ["alert.deny_burst", "alert.privilege_change"]


async def test_https_with_an_extra_ca(make_receiver: MakeReceiver, tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    receiver = await make_receiver(tls=tls)

    trusting = await started(hook(receiver.url, ca_file=tmp_path / "ca.pem"))
    await trusting.on_alert(ALERT)
    await eventually(lambda: trusting.stats.sent == 1)
    await trusting.close()

    naps = Naps()
    untrusting = await started(hook(receiver.url, naps=naps))
    await untrusting.on_alert(ALERT)
    await eventually(lambda: untrusting.stats.failed == 1)
    await untrusting.close()
    assert naps.seconds == []  # a certificate the system does not trust is not retried
    assert len(receiver.requests) == 1


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": None}, "url is required"),
        ({"url": "http://hooks.example.org/x"}, "url must be https:// for a remote receiver"),
        ({"url": "http://10.0.0.5/x"}, "url must be https:// for a remote receiver"),
        ({"url": "ftp://hooks.example.org/x"}, "url must be https://HOST[:PORT]/PATH"),
        ({"url": "https://[::1/x"}, "url is not a valid http:// or https:// url"),
        ({"url": "https://hooks.example.org:0/"}, "url: port must be 1-65535"),
        ({"secret": None}, "secret (or secret_file) is required"),
        ({"secret": "too-short"}, "secret must be at least 32 bytes"),
        (
            {"secret": None, "secret_file": "/nonexistent/webhook-secret"},
            "secret_file: cannot read /nonexistent/webhook-secret: No such file or directory",
        ),
        ({"secret": None, "secret_file": "/"}, "secret_file: cannot read /: Is a directory"),
        ({"secret_file": "SECRET_FILE"}, "give either secret or secret_file, not both"),
        ({"timeout": 0}, "timeout must be more than 0 and at most 60 seconds"),
        ({"timeout": "5 minutes"}, "timeout: bad duration"),
        ({"retries": -1}, "retries must be a whole number from 0 to 20"),
        ({"retries": 21}, "retries must be a whole number from 0 to 20"),
        ({"events": 5}, "events must be a list of alert types"),
        ({"events": ["alert.x", ""]}, "events: each item must be an alert type"),
        ({"ca_file": "/etc/ca.pem", "url": "http://127.0.0.1:9/x"}, "ca_file needs an https://"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file: cannot load /nonexistent/ca.pem"),
        ({"secrets": SECRET}, "unknown option 'secrets' (did you mean 'secret'?"),
    ],
)
def test_bad_options_are_clear_plugin_errors(
    options: dict[str, Any], message: str, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    given = {"url": "https://hooks.example.org/x", "secret": SecretStr(SECRET)} | options
    given = {k: secret_file if v == "SECRET_FILE" else v for k, v in given.items()}
    given = {k: v for k, v in given.items() if v is not None}
    with pytest.raises(PluginError) as caught:
        Webhook(given)
    assert message in str(caught.value)
    assert SECRET not in str(caught.value)


def test_errors_name_the_entry_and_never_show_the_secret_or_url(tmp_path: Path) -> None:
    entries = [
        Plugin(use="webhook", options={"url": "http://hooks.example.org/T0KEN", "secret": SECRET}),
        Plugin(use="webhook", options={"url": "https://h.example.org/x", "secret": "short"}),
        Plugin(use="webhook", options={"url": "https://h.example.org/x", "secret_file": "nope"}),
    ]
    with pytest.raises(PluginError) as caught:
        load_plugins(entries)
    assert [p.message for p in caught.value.problems] == [
        "plugins[0] (webhook): url must be https:// for a remote receiver "
        "(http:// only to loopback, not hooks.example.org)",
        "plugins[1] (webhook): secret must be at least 32 bytes (make one: openssl rand -hex 32)",
        "plugins[2] (webhook): secret_file: cannot read nope: No such file or directory",
    ]
    assert "T0KEN" not in str(caught.value) and SECRET not in str(caught.value)


def test_accepted_options(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(f"  {SECRET}\n")
    plugin = Webhook(
        {
            "url": "http://localhost:8080/hook",
            "secret_file": str(tmp_path / "secret"),
            "timeout": "2.5",
            "retries": "0",
            "events": "alert.new_ip, alert.deny_*",
        }
    )
    assert plugin._key() == KEY
    assert (plugin.timeout, plugin.retries) == (2.5, 0)
    assert plugin.events == ("alert.new_ip", "alert.deny_*")
    assert plugin.receiver == "http://localhost:8080"
    assert Webhook({"url": "http://[::1]/h", "secret": SECRET}).receiver == "http://[::1]"
    assert (
        Webhook({"url": "https://h.example.org/", "secret": SECRET, "timeout": "1m"}).timeout == 60
    )
    default = Webhook({"url": "https://h.example.org/T0KEN", "secret": SECRET})
    assert (default.timeout, default.retries, default.events) == (5.0, 5, None)
    assert (
        repr(default) == "Webhook(receiver='https://h.example.org', secret=SecretStr('**********'))"
    )


async def test_failures_are_logged_without_the_secret_or_the_url_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    plugin = await started(hook(f"http://127.0.0.1:{free_port()}/T0KEN", retries=0))
    await plugin.on_alert(ALERT)
    await eventually(lambda: plugin.stats.failed == 1)
    await plugin.close()
    logged = [str(r.__dict__) for r in caplog.records if r.name.startswith("gateway.plugins")]
    assert logged
    assert not any("T0KEN" in text or SECRET in text for text in logged)


# -- through the gateway's plugin manager ------------------------------------------------------


async def test_loaded_by_name_and_dispatched_by_the_manager(make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    plugins = load_plugins([Plugin(use="webhook", options={"url": receiver.url, "secret": SECRET})])
    assert plugins.names == ("webhook",)
    await plugins.start()
    plugins.on_alert(ALERT)
    plugins.on_access({"type": "access"})  # not a hook of this plugin
    plugin = plugins["webhook"]
    assert isinstance(plugin, Webhook)
    await eventually(lambda: plugin.stats.sent == 1)
    await plugins.close()
    (got,) = receiver.requests
    assert orjson.loads(got.body) == ALERT
    assert receiver_accepts(got.headers, got.body)
    assert plugins.stats()["webhook"].delivered == 1


async def test_a_receiver_down_or_hanging_never_delays_the_caller(
    make_receiver: MakeReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook, "CLOSE_GRACE", 0.2)
    hanging = await make_receiver(hang=True)
    options = {"secret": SECRET, "timeout": "30s"}
    plugins = load_plugins(
        [
            Plugin(use="webhook", options={"url": f"http://127.0.0.1:{free_port()}/", **options}),
            Plugin(use="webhook", options={"url": hanging.url, **options}),
        ]
    )
    await plugins.start()
    began = time.monotonic()
    for _ in range(100):
        plugins.on_alert(ALERT)
    assert time.monotonic() - began < 0.1
    await eventually(lambda: all(s.delivered == 100 for s in plugins.stats().values()))
    assert time.monotonic() - began < 1  # handed over at once: the hook only queues

    direct = plugins["webhook#1"]
    assert isinstance(direct, Webhook)
    began = time.monotonic()
    await direct.on_alert(ALERT)
    assert time.monotonic() - began < 0.05

    began = time.monotonic()
    await plugins.close()
    assert time.monotonic() - began < 1
    assert direct.stats.dropped == 101


def test_the_example_config_builds_a_webhook() -> None:
    settings = load_settings(REPO / "config" / "gateway.example.yaml", env={})
    plugins = load_plugins(settings.plugins)
    hooks = [plugins[name] for name in plugins.names if name.startswith("webhook")]
    assert len(hooks) == 1 and isinstance(hooks[0], Webhook)


async def test_a_secret_file_in_a_config_file(tmp_path: Path, make_receiver: MakeReceiver) -> None:
    receiver = await make_receiver()
    (tmp_path / "webhook-secret").write_text(SECRET + "\n")
    config = (REPO / "config" / "public-only.yaml").read_text()
    config += f"\nplugins:\n  - use: webhook\n    url: {receiver.url}\n"
    config += "    secret_file: webhook-secret\n    timeout: 2s\n    retries: 1\n"
    (tmp_path / "gateway.yaml").write_text(config)
    settings = load_settings(tmp_path / "gateway.yaml", env={})
    plugins = load_plugins(settings.plugins)
    plugin = plugins["webhook"]
    assert isinstance(plugin, Webhook)
    assert (plugin.timeout, plugin.retries) == (2.0, 1)
    await plugins.start()
    plugins.on_alert(ALERT)
    await eventually(lambda: plugin.stats.sent == 1)
    await plugins.close()
    assert receiver_accepts(receiver.requests[0].headers, receiver.requests[0].body)
