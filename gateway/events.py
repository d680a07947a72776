"""Security and lifecycle events, and the structured process log they go to.

Every event goes through `emit()`: to the process log, and to every sink added
with `add_sink()` (the running gateway's audit log, SPEC §8; plugins). A sink
that raises is logged and never stops the event reaching the others.

The process log is one JSON object per line on stderr: `ts`, `level`,
`logger`, `msg`, and any fields passed with `extra=`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

_log = logging.getLogger("gateway.events")
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # e.g. "server.started", "config.rejected"; later auth.*, session.*, admin.*
    fields: Mapping[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)


Sink = Callable[[Event], None]
_sinks: list[Sink] = []


def add_sink(sink: Sink) -> None:
    _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def emit(event: Event, *, audit: bool = True) -> None:
    """`audit=False`: the process log only (what the audit log already holds another way)."""
    _log.info(event.type, extra={"event": event.type, **event.fields})
    if not audit:
        return
    for sink in tuple(_sinks):
        try:
            sink(event)
        except Exception:
            _log.exception("an event sink failed", extra={"event": event.type})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp logs every malformed request with a traceback; the client already got its 400.
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_requests)


def _quiet_bad_requests(record: logging.LogRecord) -> bool:
    from aiohttp.http_exceptions import BadHttpMessage

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, BadHttpMessage):
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = "malformed request refused: %s", (str(exc.message)[:200],)
    return True
