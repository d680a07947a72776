"""The canonical request path (SPEC §4.1), computed from the raw request target.

Pure: no I/O, no clock. `canonicalize(raw_target)` gives a `Target` with two
views of one path:

- `path`: the canonical *encoded* form, sent upstream byte for byte. Encoded
  unreserved characters are decoded (`%7E` -> `~`); every other encoding is
  kept as sent (hex upper-cased: `%3f` -> `%3F`); characters that may not
  stand raw in a path (`|`, `[`, `{`, ...) are percent-encoded; `.` and `..`
  segments are resolved and `//` merged.
- `match`: the same path fully percent-decoded. Routes and policies match this
  one, so `%2C` and `,` (which most applications treat alike) can never be
  told apart by the gateway and the upstream differently. Decoding is safe
  because everything that would change the segment structure after decoding
  (`%2F`, `%5C`, `%00`, encoded dot segments) is refused before.

Anything ambiguous is refused with `BadRequest(reason="bad-path")` rather than
guessed at: an attacker's best tool against a proxy is a path that the proxy
and the upstream read differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import BadRequest

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar (RFC 3986 §3.3) minus ';' (path parameters: Tomcat and others split on it) and '%'.
_RAW_KEEP = _UNRESERVED | frozenset("!$&'()*+,=:@")
_HEX = frozenset("0123456789abcdefABCDEF")
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")
# A path made only of these characters, with no dot segment and no '//', is already canonical.
_SIMPLE = re.compile(r"/[A-Za-z0-9\-_~!$&'()*+,=:@/]*")


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # canonical, encoded: what the upstream receives
    match: str  # canonical, decoded: what routes and policies see
    query: str  # raw query string without '?'; never matched, passed through as sent


def canonicalize(raw_target: str) -> Target:
    """Canonical path of an origin-form request target (`/a/b?q`)."""
    path, _, query = raw_target.partition("?")
    if not path.startswith("/"):
        raise _bad("the request target must start with '/'")
    if "#" in raw_target:
        # SECURITY: a raw '#' is not valid in a request target; some servers cut the path there.
        raise _bad("raw '#' in the request target")
    if _SIMPLE.fullmatch(path) and "//" not in path and "/." not in path:
        return Target(path, path, query)
    encoded, decoded = _resolve(path)
    return Target(encoded, decoded, query)


def route_prefix(value: str) -> str:
    """Normalize a route or rule path written by an operator (decoded form); ValueError if bad."""
    if not value.startswith("/"):
        raise ValueError("must start with '/'")
    if any(ord(c) < 0x20 or c in "\\\x7f" for c in value):
        raise ValueError("must not contain control characters or '\\'")
    segments = value.strip("/").split("/")
    if value.strip("/") and any(s in ("", ".", "..") for s in segments):
        raise ValueError("must not contain empty, '.' or '..' segments")
    return "/" + "/".join(segments) if value.strip("/") else "/"


def segment_count(prefix: str) -> int:
    """How many segments a normalized prefix has ('/' has none)."""
    return 0 if prefix == "/" else prefix.count("/")


def strip_segments(path: str, count: int) -> str:
    """Drop the first `count` segments of a canonical path; what is left still starts with '/'."""
    if count == 0:
        return path
    cut = 0
    for _ in range(count):
        cut = path.find("/", cut + 1)
        if cut < 0:
            return "/"
    return path[cut:]


def _bad(detail: str) -> BadRequest:
    return BadRequest(detail, reason="bad-path")


def _resolve(path: str) -> tuple[str, str]:
    encoded: list[str] = []
    decoded: list[str] = []
    trailing = False
    for raw in path[1:].split("/"):
        enc, dec, dot_encoded = _segment(raw)
        trailing = dec in ("", ".", "..")
        if dec in (".", ".."):
            if dot_encoded:
                # SECURITY: '%2e%2e' is resolved by some upstreams after we matched: refuse it.
                raise _bad("an encoded dot segment ('%2e')")
            if dec == "..":
                if not encoded:
                    raise _bad("the path climbs above the root")
                encoded.pop()
                decoded.pop()
        elif dec:
            encoded.append(enc)
            decoded.append(dec)
        # an empty segment ('//') is merged away
    tail = "/" if trailing and encoded else ""
    return "/" + "/".join(encoded) + tail, "/" + "/".join(decoded) + tail


def _segment(raw: str) -> tuple[str, str, bool]:
    """One segment: (encoded, decoded, whether a dot was percent-encoded)."""
    enc: list[str] = []
    data = bytearray()
    dot_encoded = False
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == "%":
            byte = _pct_byte(raw, i)
            char = chr(byte)
            if char in _UNRESERVED:
                enc.append(char)
                dot_encoded = dot_encoded or char == "."
            else:
                enc.append(f"%{byte:02X}")
            data.append(byte)
            i += 3
            continue
        if c in _RAW_KEEP:
            enc.append(c)
        elif c in "\\;" or ord(c) <= 0x20 or ord(c) == 0x7F:
            # SECURITY: raw '\' is a separator on some servers, ';' starts path parameters.
            raise _bad(f"character {c!r} is not allowed in a path")
        else:
            enc.append("".join(f"%{b:02X}" for b in _utf8(c)))
        data += _utf8(c)
        i += 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # SECURITY: overlong forms such as %c0%ae ('.') are invalid UTF-8 and refused here.
        raise _bad("the path is not valid UTF-8") from None
    encoded = "".join(enc)
    if "%25" in encoded and _DOUBLE.search(encoded):
        # SECURITY: '%252e' (or '%25%32%65') is '%2e' to an upstream that decodes twice.
        raise _bad("double percent-encoding in the path")
    return encoded, text, dot_encoded


def _pct_byte(raw: str, i: int) -> int:
    digits = raw[i + 1 : i + 3]
    if len(digits) != 2 or not set(digits) <= _HEX:
        raise _bad("malformed percent-encoding")
    byte = int(digits, 16)
    if byte in (0x2F, 0x5C):
        # SECURITY: an encoded '/' or '\' would add a segment after we matched the path.
        raise _bad("an encoded '/' or '\\' in the path")
    if byte < 0x20 or byte == 0x7F:
        # SECURITY: NUL truncates paths in C upstreams; other controls forge log lines.
        raise _bad("an encoded control character in the path")
    return byte


def _utf8(c: str) -> bytes:
    try:
        return c.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("the path is not valid UTF-8") from None
