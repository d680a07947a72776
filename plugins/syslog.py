"""syslog (SPEC §9): the audit log's lines as RFC 5424 messages over TLS (RFC 5425).

    plugins:
      - use: syslog
        host: siem.example.org
        port: 6514                           # default (the syslog-over-TLS port)
        ca_file: /etc/gateway/siem-ca.pem    # the CA that signed the collector's certificate;
                                             # without it, the system's trust store
        cert_file: /etc/gateway/syslog.pem   # optional client certificate (mutual TLS),
        key_file: /etc/gateway/syslog.key    # with its key
        server_name: siem.example.org        # optional: the name checked in its certificate
        facility: authpriv                   # default; an RFC 5424 facility name
        hostname: gw1                        # default: this host's name (the HOSTNAME field)

One message per record, framed by octet counting (`LEN SP MSG`, RFC 5425 §4.3):

    <86>1 2026-11-26T11:54:27.123456Z gw1 access-gateway 4242 access - {"decision":...}

PRI is the facility with severity info (warning for `alert.*`), TIMESTAMP the record's `ts`,
MSGID its `type`, no structured data, and MSG the record's exact bytes (no BOM), so the
collector can re-hash the chain. The collector must accept messages of the longest record
(rsyslog: `$MaxMessageSize 64k`). Only asyncio streams: nothing blocks the loop. A broken
connection is noticed before writing (the collector never sends, so EOF means it closed)
and reopened; a batch that fails on a connection that had been fine is sent once more on a
new one (a collector may see a record twice, never a gap from that); while the collector
is unreachable, attempts back off from 0.5s to 30s and batches fail (counted by the gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.plugins import Options, PluginError

APP_NAME = "access-gateway"
CONNECT_TIMEOUT = 4.0  # below the gateway's HOOK_TIMEOUT, so a hung connect reports as ours
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 30.0
_NAMES = "kern user mail daemon auth syslog lpr news uucp cron authpriv ftp ntp audit alert clock"
FACILITIES = {name: code for code, name in enumerate(_NAMES.split(" "))} | {
    f"local{n}": 16 + n for n in range(8)
}
INFO, WARNING = 6, 4
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?Z")
_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


class Syslog:
    name = "syslog"

    def __init__(self, options: Mapping[str, Any]) -> None:
        read = Options(options)
        self.host = read.text("host")
        self.port = read.integer("port", 6514, maximum=65535)
        ca_file, cert_file, key_file = (read.path(k) for k in ("ca_file", "cert_file", "key_file"))
        self.server_name = read.optional("server_name") or self.host
        facility = read.text("facility", "authpriv")
        hostname = read.text("hostname", socket.gethostname())
        read.done()
        if facility not in FACILITIES:
            raise PluginError(f"facility must be one of {', '.join(FACILITIES)}")
        self.facility = FACILITIES[facility]
        self.hostname = _field(hostname, 255)
        self._ssl = _tls_context(ca_file, cert_file, key_file)
        self._procid = str(os.getpid())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._backoff = 0.0
        self._retry_at = 0.0

    @property
    def connected(self) -> bool:
        if self._reader is None or self._writer is None:
            return False
        return not (self._reader.at_eof() or self._writer.is_closing())

    async def on_records(self, lines: Sequence[bytes]) -> None:
        data = b"".join(self.frame(line) for line in lines)
        was_open = self.connected
        try:
            await self._send(data)
        except OSError:
            await self._drop()
            if not was_open:
                raise
            await self._send(data)  # the connection died since the last batch: once more

    async def close(self) -> None:
        await self._drop()

    def frame(self, line: bytes) -> bytes:
        """One RFC 5425 frame: the octet count, a space, the RFC 5424 message."""
        kind, ts = _type_and_time(line)
        severity = WARNING if kind.startswith("alert.") else INFO
        header = (
            f"<{self.facility * 8 + severity}>1 {ts} {self.hostname} {APP_NAME} "
            f"{self._procid} {_field(kind, 32)} - "
        )
        message = header.encode("ascii") + line
        return b"%d %s" % (len(message), message)

    async def _send(self, data: bytes) -> None:
        writer = await self._connection()
        writer.write(data)
        await writer.drain()

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None and self.connected:
            return self._writer
        await self._drop()
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise ConnectionError(f"{self.host}:{self.port} unreachable; next try in {wait:.1f}s")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl, server_hostname=self.server_name
                ),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError):
            self._backoff = min(self._backoff * 2, MAX_BACKOFF) if self._backoff else FIRST_BACKOFF
            self._retry_at = time.monotonic() + self._backoff
            raise
        self._reader, self._writer, self._backoff = reader, writer, 0.0
        return writer

    async def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):  # broken: nothing more to close
                await asyncio.wait_for(writer.wait_closed(), 1.0)


def _tls_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    if (cert_file is None) != (key_file is None):
        raise PluginError("cert_file and key_file go together (a client certificate)")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as err:
        raise PluginError(f"ca_file: cannot load {ca_file}: {err}") from err
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as err:
            raise PluginError(f"cert_file/key_file: cannot load {cert_file}: {err}") from err
    return context


def _type_and_time(line: bytes) -> tuple[str, str]:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        record = None
    record = record if isinstance(record, dict) else {}
    kind, ts = record.get("type"), record.get("ts")
    if not (isinstance(ts, str) and _TIMESTAMP.fullmatch(ts)):
        ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return (kind if isinstance(kind, str) else ""), ts


def _field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, or `-` (NILVALUE)."""
    return _NOT_PRINTUSASCII.sub("_", value)[:limit] or "-"


Plugin = Syslog
