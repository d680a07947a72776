"""webhook (SPEC §9): each alert POSTed as signed JSON to a receiver, retried with backoff.

    plugins:
      - use: webhook
        url: https://hooks.example.org/gateway   # https; http only to a loopback host
        secret_file: /etc/gateway/webhook-secret  # or secret: ${WEBHOOK_SECRET}; >= 32 bytes
        timeout: 5                                 # default; seconds per attempt (or 5s, 500ms)
        retries: 5                                 # default; attempts after the first (0: none)
        ca_file: /etc/gateway/hooks-ca.pem         # optional: a CA trusted besides the system's
        events: [alert.new_ip, alert.deny_*]       # optional: alert types (globs); default all

The body is the alert as JSON (orjson, sorted keys), with these headers:

    Content-Type: application/json
    User-Agent: access-gateway-webhook
    X-Gateway-Timestamp: 1764158067                 unix seconds of this attempt
    X-Gateway-Signature: v1=<hex>                   HMAC-SHA256(secret, b"<timestamp>." + body)
    X-Gateway-Delivery: 5f0c...                     a UUID, the same on every retry

A receiver recomputes the HMAC over the timestamp header, a dot and the raw body, compares in
constant time, and rejects a timestamp more than 5 minutes off (a replay); it may drop a
delivery id it has already seen. `sign` and `verify` below do this for Python receivers.

Deliveries run in the plugin's own task, not in the hook: `on_alert` only queues the alert
(QUEUE_SIZE at most; beyond, alerts are dropped and counted), because attempts and waits
(6 x 5 s plus 0.5 + 1 + 2 + 4 + 8 s by default) outlast the gateway's HOOK_TIMEOUT. One
alert at a time, in order. Connection errors, timeouts, 408, 429 and 5xx are retried after
0.5 s, 1 s, 2 s ... (at most 30 s, each less up to a quarter at random); other answers are
final, and redirects are never followed. Failures are logged at most once per LOG_EVERY.
`close()` stops the waits, gives queued alerts one attempt each for up to CLOSE_GRACE
seconds, then drops the rest and logs how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import random
import re
import ssl
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from pydantic import SecretStr

from gateway.configfile import yaml_kind
from gateway.configtypes import parse_duration
from gateway.plugins import LOG_EVERY, Options, PluginError

USER_AGENT = "access-gateway-webhook"
MIN_SECRET = 32  # bytes of the HMAC key
TOLERANCE = 300  # seconds a receiver accepts between the timestamp and its clock
QUEUE_SIZE = 1_000  # alerts waiting; beyond it new ones are dropped
FIRST_BACKOFF, MAX_BACKOFF, JITTER = 0.5, 30.0, 0.25
CLOSE_GRACE = 2.0  # close(): time left to queued alerts, well below the gateway's HOOK_TIMEOUT
RETRY_STATUS = frozenset({408, 429})  # and every 5xx

_log = logging.getLogger("gateway.plugins.webhook")
_DIGITS = re.compile(r"[0-9]{1,15}")
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")

Sleep = Callable[[float], Coroutine[Any, Any, None]]


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The X-Gateway-Signature value: `v1=` and the hex HMAC-SHA256 of `<timestamp>.<body>`."""
    return _signature(secret, str(timestamp), body)


def verify(
    secret: bytes,
    timestamp_header: str,
    signature_header: str,
    body: bytes,
    now: float | None = None,
    tolerance: float = TOLERANCE,
) -> bool:
    """Whether a delivery is genuine and fresh; `signature_header` may list several `v1=`."""
    if not _DIGITS.fullmatch(timestamp_header):
        return False
    now = time.time() if now is None else now
    if abs(now - int(timestamp_header)) > tolerance:
        return False  # SECURITY: a captured delivery replayed later is refused
    expected = _signature(secret, timestamp_header, body).encode()
    given = (part.strip().encode() for part in signature_header.split(","))
    return any(hmac.compare_digest(expected, value) for value in given)  # SECURITY: timing


def _signature(secret: bytes, timestamp: str, body: bytes) -> str:
    return "v1=" + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class WebhookStats:
    sent: int  # alerts the receiver accepted (2xx)
    failed: int  # alerts given up: a final answer, or out of retries
    dropped: int  # alerts refused by a full queue, or cut short by close()
    queued: int  # alerts waiting now


@dataclass(frozen=True, slots=True)
class _Delivery:
    id: str
    body: bytes


class Webhook:
    name = "webhook"

    def __init__(
        self,
        options: Mapping[str, Any],
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        grace: float | None = None,
    ) -> None:
        read = _Options(options)
        self.url = read.text("url")
        secret, secret_file = read.secret("secret"), read.path("secret_file")
        self.timeout = read.seconds("timeout", 5.0, maximum=60.0)
        self.retries = read.count("retries", 5, maximum=20)
        ca_file = read.path("ca_file")
        self.events = read.names("events")
        read.done()
        self.receiver = _check_url(self.url)
        self._secret = _secret(secret, secret_file)
        if ca_file is not None and not self.url.startswith("https://"):
            raise PluginError("ca_file needs an https:// url")
        self._ssl = _tls_context(ca_file)
        self._sleep, self._clock = sleep, clock
        self._grace = CLOSE_GRACE if grace is None else grace
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(QUEUE_SIZE)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._nap: asyncio.Task[None] | None = None
        self._current: _Delivery | None = None
        self._closing = False
        self._sent = self._failed = self._dropped = self._unlogged = 0
        self._logged_at = -LOG_EVERY

    def __repr__(self) -> str:
        # SECURITY: neither the secret nor the url's path and query (often a token) are shown.
        return f"Webhook(receiver={self.receiver!r}, secret=SecretStr('**********'))"

    @property
    def stats(self) -> WebhookStats:
        return WebhookStats(self._sent, self._failed, self._dropped, self._queue.qsize())

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # a receiver cannot set state in the gateway
        )
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._send_all(), name="webhook deliveries")

    async def on_alert(self, alert: Mapping[str, Any]) -> None:
        """Queue the alert and return at once (a failing receiver never holds the gateway)."""
        if self._task is None:
            raise RuntimeError("webhook is not started")
        kind = alert.get("type")
        if self.events is not None and not _wanted(kind, self.events):
            return
        body = orjson.dumps(alert, option=orjson.OPT_SORT_KEYS)
        if self._closing:
            self._dropped += 1
            return
        try:
            self._queue.put_nowait(_Delivery(str(uuid.uuid4()), body))
        except asyncio.QueueFull:
            self._dropped += 1
            self._report("webhook.dropped", f"queue full ({QUEUE_SIZE} alerts)")

    async def close(self) -> None:
        """Stop waiting between retries, give the queue CLOSE_GRACE seconds, drop the rest."""
        self._closing = True
        dropped = self._dropped
        if self._nap is not None:
            self._nap.cancel()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._grace):
                    await self._queue.join()
            self._dropped += self._queue.qsize() + (self._current is not None)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._dropped > dropped:
            fields = {"event": "webhook.closed", "plugin": self.name, "receiver": self.receiver}
            extra = fields | {"dropped": self._dropped - dropped}
            _log.warning("webhook.closed: undelivered alerts dropped", extra=extra)

    async def _send_all(self) -> None:
        while True:
            self._current = await self._queue.get()
            try:
                await self._deliver(self._current)
            except Exception as err:  # a bug must not end the deliveries
                self._failed += 1
                self._report("webhook.failed", f"{type(err).__name__}: {err}")
            finally:
                self._current = None
                self._queue.task_done()

    async def _deliver(self, delivery: _Delivery) -> None:
        for attempt in range(self.retries + 1):
            retry, problem = await self._attempt(delivery)
            if problem is None:
                self._sent += 1
                return
            if not retry or attempt == self.retries:
                break
            if not self._closing:
                await self._pause(backoff(attempt))
            if self._closing:
                self._dropped += 1  # close() ended the retries
                return
        self._failed += 1
        self._report("webhook.failed", f"{problem} (delivery {delivery.id})")

    async def _attempt(self, delivery: _Delivery) -> tuple[bool, str | None]:
        """(retry?, None if the receiver took it, else what went wrong)."""
        assert self._session is not None
        timestamp = int(self._clock())  # each attempt signed afresh: a retry is never stale
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Gateway-Timestamp": str(timestamp),
            "X-Gateway-Signature": sign(self._key(), timestamp, delivery.body),
            "X-Gateway-Delivery": delivery.id,
        }
        try:
            # SECURITY: no redirects: the signed alert goes to the configured receiver only.
            post = self._session.post(
                self.url, data=delivery.body, headers=headers, allow_redirects=False
            )
            async with post as response:
                status = response.status
        except aiohttp.ClientConnectorCertificateError as err:
            return False, f"certificate: {err.certificate_error}"
        except TimeoutError:
            return True, f"no answer within {self.timeout:g}s"
        except aiohttp.ClientError as err:
            text = str(err).replace(self.url, self.receiver)  # SECURITY: the path may be a token
            return True, f"{type(err).__name__}: {text}" if text else type(err).__name__
        if 200 <= status < 300:
            return False, None
        what = "redirects are not followed" if 300 <= status < 400 else "refused"
        return status in RETRY_STATUS or status >= 500, f"HTTP {status} ({what})"

    async def _pause(self, seconds: float) -> None:
        """The wait before a retry, as its own task so that close() can cut it short."""
        loop = asyncio.get_running_loop()
        self._nap = loop.create_task(self._sleep(seconds), name="webhook backoff")
        try:
            await asyncio.wait([self._nap])
        finally:
            self._nap.cancel()
            self._nap = None

    def _key(self) -> bytes:
        return self._secret.get_secret_value().encode()

    def _report(self, event: str, problem: str) -> None:
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY:
            self._unlogged += 1
            return
        fields = {"event": event, "plugin": self.name, "receiver": self.receiver}
        counts = {"failed": self._failed, "dropped": self._dropped, "not_logged": self._unlogged}
        _log.warning(event, extra=fields | counts | {"error": problem})
        self._logged_at, self._unlogged = now, 0


def backoff(attempt: int) -> float:
    """The wait after failed attempt `attempt` (0, 1, ...): 0.5 s doubling to 30 s, less jitter."""
    ceiling = min(FIRST_BACKOFF * 2.0**attempt, MAX_BACKOFF)
    return ceiling * (1 - JITTER * random.random())  # noqa: S311 (spreads retries; not a secret)


class _Options(Options):
    """Options, plus what this plugin reads that `Options` has no reader for."""

    def count(self, key: str, default: int, *, maximum: int) -> int:
        value = self._get(key)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            raise PluginError(f"{key} must be a whole number from 0 to {maximum}")
        return value

    def seconds(self, key: str, default: float, *, maximum: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        try:
            if isinstance(value, str) and _SECONDS.fullmatch(value):
                value = float(value)  # `${NAME}` from the environment is a string
            seconds = value if _is_number(value) else parse_duration(value)
        except ValueError as err:
            raise PluginError(f"{key}: {err}") from err
        if not 0 < seconds <= maximum:
            raise PluginError(f"{key} must be more than 0 and at most {maximum:g} seconds")
        return float(seconds)

    def names(self, key: str) -> tuple[str, ...] | None:
        value = self._get(key)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise PluginError(f"{key} must be a list of alert types, not {yaml_kind(value)}")
        if not all(isinstance(item, str) and item for item in value):
            raise PluginError(f"{key}: each item must be an alert type like alert.new_ip")
        return tuple(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _wanted(kind: object, patterns: tuple[str, ...]) -> bool:
    return isinstance(kind, str) and any(fnmatch.fnmatchcase(kind, p) for p in patterns)


def _check_url(url: str) -> str:
    """The receiver's origin (scheme://host:port), shown in logs instead of the url."""
    # SECURITY: never echo the url: its path or query is often the receiver's token.
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise PluginError("url is not a valid http:// or https:// url") from err
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PluginError("url must be https://HOST[:PORT]/PATH")
    if port == 0:
        raise PluginError("url: port must be 1-65535")
    # SECURITY: the alert and its signature travel in clear over http: loopback only.
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise PluginError(
            f"url must be https:// for a remote receiver (http:// only to loopback, "
            f"not {parts.hostname})"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secret(secret: SecretStr | None, secret_file: Path | None) -> SecretStr:
    if secret is not None and secret_file is not None:
        raise PluginError("give either secret or secret_file, not both")
    if secret_file is not None:
        try:
            secret = SecretStr(secret_file.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8"
            raise PluginError(f"secret_file: cannot read {secret_file}: {reason}") from err
    if secret is None:
        raise PluginError("secret (or secret_file) is required: the key that signs each alert")
    if len(secret.get_secret_value().encode()) < MIN_SECRET:
        # SECURITY: a short key can be guessed offline from one signed alert.
        raise PluginError(
            f"secret must be at least {MIN_SECRET} bytes (make one: openssl rand -hex 32)"
        )
    return secret


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as err:
            raise PluginError(f"ca_file: cannot load {ca_file}: {err}") from err
    return context


Plugin = Webhook
