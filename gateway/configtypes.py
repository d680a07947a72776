"""The value types of the config file: what one YAML value may be, parsed and checked.

Each is a parser raising ValueError with an operator's message, wrapped as an `Annotated`
field type for the models in `gateway.settings`:

    Duration, Size                        `1h30m` -> seconds; `64MiB` -> bytes
    Listen (a HostPort)                   `0.0.0.0:8443`
    PublicUrl (an Origin)                 `https://gw.example.org`, no path
    UpstreamUrl (an Upstream)             `http://10.0.0.5:3000/base`
    SessionStore, RecordStore (StoreUrl)  `redis://:pw@host/0`, the password masked in repr
    Network, TrustedNetwork               `10.0.0.0/8`; never a /0 as trusted
    HostName, AllowedHost, RouteHost      `gw.example.org`; `*.example.org` for a route
    Ident, Method, Glob, RoutePath        `grafana-admin`, `POST`, `/api/**`, `/app`
    CookieName, AuditOrigin, Issuer, Scopes, EmailDomain, StateKey
    FilePath                              relative to the config file's directory

`parse_duration`, `parse_size` and `decode_state_key` are also called on their own. Nothing
here reads a file or knows where a value sits in it (that is `gateway.configfile`).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    ValidationInfo,
)

from gateway.configfile import shown, yaml_kind
from gateway.paths import route_prefix

# -- durations and sizes -----------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def parse_duration(value: object) -> float:
    """`30s`, `15m`, `12h`, `7d`, `500ms`, `1h30m` -> seconds; a bare number is refused."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration like 30s, got {yaml_kind(value)}")
    text = str(value).strip()
    if _NUMBER.fullmatch(text):
        raise ValueError("duration needs a unit, like 30s")
    if not _DURATION.fullmatch(text):
        raise ValueError(
            f"bad duration {shown(value)}: write a number and a unit (ms, s, m, h, d), "
            "like 30s or 1h30m"
        )
    seconds = sum(float(number) * _UNITS[unit] for number, unit in _DURATION_PART.findall(text))
    if seconds <= 0:
        raise ValueError(f"bad duration {shown(value)}: must be longer than zero")
    return seconds


def _duration(value: object, info: ValidationInfo) -> object:
    # Models built in Python (tests, tools) may give plain seconds; a config file may not.
    if info.context is None and isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("must be longer than zero")
        return float(value)
    return parse_duration(value)


_SIZE = re.compile(r"(\d+)\s*([a-z]*)")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value: object) -> int:
    """`64MiB`, `10MB`, `4096` -> bytes (KiB = 1024 bytes, KB = 1000)."""
    match = _SIZE.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif match and match[2] in _SIZE_UNITS:
        size = int(match[1]) * _SIZE_UNITS[match[2]]
    else:
        raise ValueError(
            f"bad size {shown(value)}: write bytes, or a whole number with KiB, MiB, GiB, "
            "KB, MB or GB, like 64MiB"
        )
    if size <= 0:
        raise ValueError("size must be larger than zero")
    return size


Duration = Annotated[float, BeforeValidator(_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


# -- hosts, addresses, URLs --------------------------------------------------------------------

_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_name(value: str) -> str:
    """A host lower-cased, without trailing dot; IPv6 without brackets. ValueError if not one."""
    host = value.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{value!r} is not a host name or IP address") from None
    host = host.removesuffix(".")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise ValueError(f"{value!r} is not a valid host name") from None
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{value!r} is not a host name or IP address")
    return host


def _without_port(value: str) -> str:
    if value.startswith("["):
        return value.partition("]")[0] + "]"
    name, sep, port = value.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else value


def _route_host(value: str) -> str:
    """Exact host or `*.example.org`; stored lower-case, without trailing dot or port."""
    host = _without_port(value.strip())
    if host.startswith("*."):
        return "*." + _host_name(host[2:])
    if "*" in host:
        raise ValueError(f"{value!r}: a wildcard must be the whole first label, like *.example.org")
    return _host_name(host)


@dataclass(frozen=True, slots=True)
class HostPort:
    """A listen address; `str()` gives `host:port` (`[::1]:8443` for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, value: object) -> HostPort:
        if isinstance(value, HostPort):
            return value
        match = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]+):(\d{1,5})", str(value).strip())
        if not isinstance(value, str) or match is None:
            raise ValueError(f"expected HOST:PORT like 0.0.0.0:8443, got {shown(value)}")
        port = int(match[2])
        if port > 65535:
            raise ValueError(f"port {port} is out of range (1-65535)")
        return cls(_host_name(match[1]), port)

    @property
    def any_address(self) -> bool:
        return self.host in ("0.0.0.0", "::")


def _split_http_url(value: object, what: str) -> SplitResult:
    if not isinstance(value, str):
        raise ValueError(f"expected an http:// or https:// URL, got {yaml_kind(value)}")
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"{what} {shown(value)} is not a valid URL") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL with a host, got {value!r}")
    if parts.username is not None or parts.password is not None:
        # SECURITY: credentials in a URL end up in logs and summaries; never accept them here.
        raise ValueError(f"{what} must not contain a user name or password")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError(f"{what} must not have a query or fragment")
    if port == 0:
        raise ValueError(f"{what}: port 0 is not a port")
    return parts


def _netloc(host: str, port: int | None) -> str:
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port is None else f"{bracketed}:{port}"


class Origin(str):
    """`server.public_url`: an http(s) origin, kept without trailing slash."""

    scheme: str
    host: str  # lower-case, no port, no trailing dot; IPv6 without brackets
    port: int  # explicit, or 80/443

    def __new__(cls, value: object) -> Origin:
        parts = _split_http_url(value, "public_url")
        if parts.path not in ("", "/"):
            raise ValueError(
                "public_url is an origin: no path (the gateway's own pages use /.gateway/)"
            )
        host = _host_name(parts.hostname or "")
        self = super().__new__(cls, f"{parts.scheme}://{_netloc(host, parts.port)}")
        self.scheme, self.host = parts.scheme, host
        self.port = parts.port or _DEFAULT_PORTS[parts.scheme]
        return self


class Upstream(str):
    """`routes[].upstream`: an http(s) URL, maybe with a base path; no trailing slash kept."""

    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/base" (no trailing slash)

    def __new__(cls, value: object) -> Upstream:
        parts = _split_http_url(value, "upstream")
        base_path = parts.path.rstrip("/")
        if base_path:
            route_prefix(base_path)  # ValueError for '..', '//', control characters
        host = _host_name(parts.hostname or "")
        self = super().__new__(cls, f"{parts.scheme}://{_netloc(host, parts.port)}{base_path}")
        self.scheme, self.host, self.base_path = parts.scheme, host, base_path
        self.port = parts.port or _DEFAULT_PORTS[parts.scheme]
        return self


_QUERY_PASSWORD = re.compile(r"((?:^|&)(?:password|passwd|pwd)=)[^&]*", re.IGNORECASE)
_SESSION_SCHEMES = ("memory", "sqlite", "redis", "rediss", "redis+sentinel", "redis+cluster")
_RECORD_SCHEMES = ("memory", "sqlite", "postgresql", "postgres")


class StoreUrl(str):
    """A store URL such as `redis://:pw@host/0`; its repr masks the password."""

    @property
    def scheme(self) -> str:
        return self.partition("://")[0].lower()

    def masked(self) -> str:
        parts = urlsplit(self)
        if parts.password is None and not _QUERY_PASSWORD.search(parts.query):
            return str(self)  # unchanged (geturl would drop the empty netloc of memory://)
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
            parts = parts._replace(netloc=netloc)
        if parts.query:
            # SECURITY: asyncpg and redis-py also take `?password=…`; mask it there too.
            query = _QUERY_PASSWORD.sub(r"\1***", parts.query)
            parts = parts._replace(query=query)
        return parts.geturl()

    def __repr__(self) -> str:
        # SECURITY: repr(settings) ends up in tracebacks and debug logs; keep passwords out.
        return repr(self.masked())


def _store_url(allowed: tuple[str, ...], what: str) -> Callable[[object], StoreUrl]:
    def validate(value: object) -> StoreUrl:
        if not isinstance(value, str):
            raise ValueError(
                f"expected a store URL like {allowed[1]}://..., got {yaml_kind(value)}"
            )
        url = StoreUrl(value.strip())
        if "://" not in url or url.scheme not in allowed:
            schemes = ", ".join(f"{scheme}://" for scheme in allowed)
            raise ValueError(f"the {what} store must be one of {schemes}")
        return url

    return validate


def _network(value: object) -> IPv4Network | IPv6Network:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an address or network like 10.0.0.0/8, got {yaml_kind(value)}")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network like 10.0.0.0/8") from None


def _trusted_network(value: IPv4Network | IPv6Network) -> IPv4Network | IPv6Network:
    if value.prefixlen == 0:
        # SECURITY: trusting every address would let any client forge X-Forwarded-For.
        raise ValueError(f"{value} would let any client forge X-Forwarded-For")
    return value


def _allowed_host(value: str) -> str:
    if "*" in value or "/" in value:
        raise ValueError(f"{value!r}: allowed_hosts takes exact host names")
    return _host_name(_without_port(value.strip()))


# -- small value checks ------------------------------------------------------------------------

_IDENT = re.compile(r"[a-z0-9-]+")
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ORIGIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _ident(value: str) -> str:
    if not _IDENT.fullmatch(value):
        raise ValueError(f"{value!r}: use lower-case letters, digits and '-' (like grafana-admin)")
    return value


def _method(value: str) -> str:
    method = value.strip().upper()
    if not _METHOD.fullmatch(method):
        raise ValueError(f"{value!r} is not an HTTP method")
    return method


def _glob(value: str) -> str:
    """A path glob: starts with '/'; only `*` (one segment) and `**` (any depth) are special."""
    if any("**" in segment and segment != "**" for segment in value.split("/")):
        raise ValueError(f"path {value!r}: '**' must be a whole segment, like /d/**")
    try:
        route_prefix(value)
    except ValueError as err:
        raise ValueError(f"path {value!r} {err}") from None
    return value


def _route_path(value: str) -> str:
    try:
        return route_prefix(value)
    except ValueError as err:
        raise ValueError(f"path {value!r} {err}") from None


def _cookie_name(value: str) -> str:
    if not _COOKIE_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid cookie name")
    return value


def _audit_origin(value: str) -> str:
    if not _ORIGIN_NAME.fullmatch(value):
        raise ValueError(f"{value!r}: use letters, digits, '.', '_' and '-'")
    return value


def _issuer(value: str) -> str:
    _split_http_url(value, "issuer")
    return value.strip()  # kept exactly: it must equal the `iss` of the IdP's tokens


def _scopes(value: tuple[str, ...]) -> tuple[str, ...]:
    if "openid" not in value:
        raise ValueError("scopes must include 'openid'")
    return value


def _email_domain(value: str) -> str:
    return _host_name(value.strip().removeprefix("@"))


def decode_state_key(text: str) -> bytes | None:
    """The 32 bytes of a base64 (standard or URL-safe, padding optional) state key, or None."""
    text = text.strip()
    padded = text + "=" * (-len(text) % 4)
    for altchars in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=altchars, validate=True)
        except ValueError:
            continue
        return raw if len(raw) == 32 else None
    return None


def _state_key(value: SecretStr) -> SecretStr:
    if decode_state_key(value.get_secret_value()) is None:
        # SECURITY: the message must never echo the key itself.
        raise ValueError("not base64 of 32 bytes; make a key with: openssl rand -base64 32")
    return value


def _path_text(value: object) -> object:
    if value == "" or (value is not None and not isinstance(value, str | Path)):
        raise ValueError(
            f"expected a file path, got {yaml_kind(value) if value else 'an empty string'}"
        )
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    return base / value if isinstance(base, Path) and not value.is_absolute() else value


# -- the field types ---------------------------------------------------------------------------

_str = PlainSerializer(str, return_type=str)
Ident = Annotated[str, AfterValidator(_ident)]
Method = Annotated[str, AfterValidator(_method)]
Glob = Annotated[str, AfterValidator(_glob)]
Network = Annotated[IPv4Network | IPv6Network, PlainValidator(_network), _str]
FilePath = Annotated[Path, BeforeValidator(_path_text), AfterValidator(_resolve_path)]
Listen = Annotated[HostPort, PlainValidator(HostPort.parse), _str]
PublicUrl = Annotated[Origin, PlainValidator(Origin), _str]
UpstreamUrl = Annotated[Upstream, PlainValidator(Upstream), _str]
SessionStore = Annotated[StoreUrl, PlainValidator(_store_url(_SESSION_SCHEMES, "sessions")), _str]
RecordStore = Annotated[StoreUrl, PlainValidator(_store_url(_RECORD_SCHEMES, "records")), _str]
TrustedNetwork = Annotated[Network, AfterValidator(_trusted_network)]
HostName = Annotated[str, AfterValidator(_host_name)]
AllowedHost = Annotated[str, AfterValidator(_allowed_host)]
RouteHost = Annotated[str, AfterValidator(_route_host)]
RoutePath = Annotated[str, AfterValidator(_route_path)]
EmailDomain = Annotated[str, AfterValidator(_email_domain)]
CookieName = Annotated[str, AfterValidator(_cookie_name)]
AuditOrigin = Annotated[str, AfterValidator(_audit_origin)]
Issuer = Annotated[str, AfterValidator(_issuer)]
Scopes = Annotated[tuple[str, ...], AfterValidator(_scopes)]
StateKey = Annotated[SecretStr, AfterValidator(_state_key)]
