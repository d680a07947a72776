"""redis_stream (SPEC §9): the audit log's lines into a Redis stream, checkpoints included.

    plugins:
      - use: redis_stream
        url: rediss://siem-redis.example.org:6380/0   # redis:// or rediss://
        stream: gateway:audit                          # default
        maxlen: 1000000                                # default; trimmed approximately (MAXLEN ~)
        ca_file: /etc/gateway/siem-ca.pem              # optional: rediss:// with a private CA
        password: ${SIEM_REDIS_PASSWORD}               # optional (masked); or in the url

Each record becomes one stream entry with one field, `r`: the record's exact bytes (its line
without the newline). A consumer re-hashes them, follows `prev` and checks the signed
checkpoints as `gateway audit verify` does, trusting neither this transport nor Redis: the
copy anchors the log off-host. One pipeline (no MULTI) per batch; a batch that fails is
lost for this sink only and counted (gaps show as missing `seq`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from gateway.plugins import Options, PluginError

TIMEOUT = 5.0  # connect and socket timeout; the gateway also bounds each call (HOOK_TIMEOUT)


class RedisStream:
    name = "redis_stream"

    def __init__(self, options: Mapping[str, Any]) -> None:
        read = Options(options)
        self.url = read.text("url")
        self.stream = read.text("stream", "gateway:audit")
        self.maxlen = read.integer("maxlen", 1_000_000)
        self.ca_file = read.path("ca_file")
        self.password = read.secret("password")
        read.done()
        _check_url(self.url)
        if self.ca_file is not None and not self.url.startswith("rediss://"):
            raise PluginError("ca_file needs a rediss:// url")
        self._redis: Redis | None = None

    async def start(self) -> None:
        extra: dict[str, Any] = {"ssl_ca_certs": str(self.ca_file)} if self.ca_file else {}
        if self.password is not None:
            extra["password"] = self.password.get_secret_value()
        self._redis = Redis.from_url(
            self.url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, **extra
        )

    async def on_records(self, lines: Sequence[bytes]) -> None:
        if self._redis is None:
            raise RuntimeError("redis_stream is not started")
        async with self._redis.pipeline(transaction=False) as pipe:
            for line in lines:
                pipe.xadd(self.stream, {"r": line}, maxlen=self.maxlen, approximate=True)
            await pipe.execute()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def _check_url(url: str) -> None:
    # SECURITY: never echo the url: it may carry a password.
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise PluginError("url is not a valid redis:// or rediss:// url") from err
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise PluginError("url must be redis://HOST[:PORT][/DB] or rediss://... (TLS)")
    if port == 0:
        raise PluginError("url: port must be 1-65535")
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise PluginError("url: the path is the database number (rediss://HOST:PORT/0)")


Plugin = RedisStream
