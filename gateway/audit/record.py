"""The audit record: its fields and its exact bytes (SPEC §8). Pure.

A record is one line of canonical JSON (orjson, keys sorted, no spaces) ending in `\\n`.
Its hash is the SHA-256 (hex) of the line's bytes without the `\\n`, and the next record of
the chain carries it in `prev`. The verifier hashes the bytes as stored and never
re-serializes, so only the writer ever makes a line (`line()`), exactly once.

Every record:

    v       1                               origin  the chain's name (audit.origin)
    seq     0, 1, 2, ... per origin, across segments and restarts
    ts      UTC, RFC 3339 with microseconds: 2026-11-26T11:54:27.123456Z
    type    genesis | chain.reopened | chain.closed | checkpoint | key.rotated | recovery |
            access | access.done | access.summary | auth.* | session.* | admin.* | policy.* ...
    prev    the hash of the previous record's line; 64 zeros before the genesis

The chain fields are set last, so no event field can stand in for them. Control characters
in strings are escaped: C0 ones by JSON itself (`\\u001b`), DEL and C1 ones here, so that
no line can move a terminal's cursor or hide text when printed (`gateway audit tail`).

Checkpoints and key announcements are signed with Ed25519 over `signed_bytes(record)`: the
canonical bytes of the record without its `sig` field (base64url, no padding).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

VERSION = 1
GENESIS_PREV = "0" * 64
CHAIN_FIELDS = ("v", "origin", "seq", "ts", "type", "prev")

_C1 = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# The same characters as UTF-8 in an encoded line: DEL, C1, U+2028-202E, U+2066-2069.
_UNSAFE_BYTES = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8-\xae]|\xe2\x81[\xa6-\xa9]")


def line(
    fields: Mapping[str, Any], *, origin: str, seq: int, ts: float, type: str, prev: str
) -> bytes:
    """The record's exact bytes (without the newline): canonical JSON, chain fields last."""
    # The writer owns the fields it was handed (AuditWriter.submit): no copy on this hot path.
    record: dict[str, Any] = fields if isinstance(fields, dict) else dict(fields)
    # SECURITY: the chain fields are written over anything an event carried under their names.
    record.update(v=VERSION, origin=origin, seq=seq, ts=timestamp(ts), type=type, prev=prev)
    encoded = canonical(record)
    if encoded.isascii() and b"\x7f" not in encoded:  # the common case, at memchr speed
        return encoded
    if _UNSAFE_BYTES.search(encoded) is None:  # non-ASCII text, but nothing to escape
        return encoded
    return canonical({k: escape(v) for k, v in record.items()})


def canonical(record: Mapping[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def digest(record_line: bytes) -> str:
    """The hash the next record carries in `prev`."""
    return hashlib.sha256(record_line).hexdigest()


def timestamp(ts: float) -> str:
    last_ts, last_text = _last_stamp[0]
    if last_ts == ts:  # a batch's records share one clock reading
        return last_text
    text = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    _last_stamp[0] = (ts, text)
    return text


_last_stamp: list[tuple[float | None, str]] = [(None, "")]


def escape(value: Any) -> Any:
    """Strings (also inside lists and dicts) with DEL, C1 and bidi controls made visible."""
    if isinstance(value, str):
        # SECURITY: ESC is escaped by JSON; CSI (U+009B) and bidi overrides are not, and would
        # let a request path rewrite what an operator sees in a terminal or report.
        return _C1.sub(lambda m: f"\\u{ord(m[0]):04x}", value) if _C1.search(value) else value
    if isinstance(value, list | tuple):
        return [escape(v) for v in value]
    if isinstance(value, dict):
        return {k: escape(v) for k, v in value.items()}
    return value


def signed_bytes(record: Mapping[str, Any]) -> bytes:
    """What a checkpoint's or key announcement's `sig` signs: the record without `sig`."""
    return canonical({k: v for k, v in record.items() if k != "sig"})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def keyed_hmac(key: bytes, text: str) -> str:
    """A query string or path as it appears in the log (log_path: hmac): 32 hex digits."""
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:32]
