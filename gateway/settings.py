"""The config file (SPEC §3): YAML in, frozen pydantic models out, every problem at once.

    load_settings(path, env) -> Settings      or ConfigError(.issues: [ConfigIssue, ...])
    summary(settings) -> str                   what `gateway check-config` prints for a good file

Loading runs four steps, each collecting problems instead of stopping at the first one:

1. compose: PyYAML builds the node tree, so every key and value keeps its line and column;
2. read: nodes become plain data (`${NAME}` replaced from the environment, duplicate and
   non-string keys refused) while the position of every key and value is recorded by path,
   e.g. ("routes", 0, "timeout"); `client_secret_file`, `keys_file` and a plugin's
   `secret_file` are read into `client_secret`, `keys` and `secret`;
3. validate: pydantic checks every value; each error's `loc` is mapped back to a recorded
   position (an unknown key points at the key, anything else at the value);
4. cross-check: rules spanning sections (protected routes need an IdP, replicas need Redis...).

Only the config file and the secret files it names are read (plus a stat of each `*_file`
for the "does not exist" warnings): no network, nothing written. It is blocking file I/O,
so a running server calls it in a thread (STYLE 16).
"""

from __future__ import annotations

import base64
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import ErrorDetails
from yaml.error import Mark
from yaml.reader import ReaderError

from gateway.paths import route_prefix

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "Duration",
    "HostPort",
    "Origin",
    "Policy",
    "Route",
    "Rule",
    "Settings",
    "StoreUrl",
    "Upstream",
    "decode_state_key",
    "load_settings",
    "parse_duration",
    "parse_size",
    "summary",
]

_Loc = tuple[str | int, ...]


# -- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int  # 1-based
    col: int  # 1-based
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class ConfigError(Exception):
    """The config file is not usable; `issues` holds every problem, sorted by position."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


def _kind(value: object) -> str:
    """What a YAML value looks like to an operator, for 'expected X, got Y'."""
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a mapping" if isinstance(value, dict) else "a list"


def _shown(value: object) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return _kind(value)


# -- durations and sizes -----------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def parse_duration(value: object) -> float:
    """`30s`, `15m`, `12h`, `7d`, `500ms`, `1h30m` -> seconds; a bare number is refused."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration like 30s, got {_kind(value)}")
    text = str(value).strip()
    if _NUMBER.fullmatch(text):
        raise ValueError("duration needs a unit, like 30s")
    if not _DURATION.fullmatch(text):
        raise ValueError(
            f"bad duration {_shown(value)}: write a number and a unit (ms, s, m, h, d), "
            "like 30s or 1h30m"
        )
    seconds = sum(float(number) * _UNITS[unit] for number, unit in _DURATION_PART.findall(text))
    if seconds <= 0:
        raise ValueError(f"bad duration {_shown(value)}: must be longer than zero")
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
            f"bad size {_shown(value)}: write bytes, or a whole number with KiB, MiB, GiB, "
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
_LOOPBACK_NAMES = ("localhost", "localhost.")


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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in _LOOPBACK_NAMES or host.endswith(".localhost")


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
            raise ValueError(f"expected HOST:PORT like 0.0.0.0:8443, got {_shown(value)}")
        port = int(match[2])
        if port > 65535:
            raise ValueError(f"port {port} is out of range (1-65535)")
        return cls(_host_name(match[1]), port)

    @property
    def any_address(self) -> bool:
        return self.host in ("0.0.0.0", "::")


def _split_http_url(value: object, what: str) -> SplitResult:
    if not isinstance(value, str):
        raise ValueError(f"expected an http:// or https:// URL, got {_kind(value)}")
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"{what} {_shown(value)} is not a valid URL") from None
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


_SESSION_SCHEMES = ("memory", "sqlite", "redis", "rediss", "redis+sentinel", "redis+cluster")
_RECORD_SCHEMES = ("memory", "sqlite", "postgresql", "postgres")


class StoreUrl(str):
    """A store URL such as `redis://:pw@host/0`; its repr masks the password."""

    @property
    def scheme(self) -> str:
        return self.partition("://")[0].lower()

    def masked(self) -> str:
        parts = urlsplit(self)
        if parts.password is None:
            return str(self)
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
        return parts._replace(netloc=netloc).geturl()

    def __repr__(self) -> str:
        # SECURITY: repr(settings) ends up in tracebacks and debug logs; keep passwords out.
        return repr(self.masked())


def _store_url(allowed: tuple[str, ...], what: str) -> Callable[[object], StoreUrl]:
    def validate(value: object) -> StoreUrl:
        if not isinstance(value, str):
            raise ValueError(f"expected a store URL like {allowed[1]}://..., got {_kind(value)}")
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
        raise ValueError(f"expected an address or network like 10.0.0.0/8, got {_kind(value)}")
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
            f"expected a file path, got {_kind(value) if value else 'an empty string'}"
        )
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    return base / value if isinstance(base, Path) and not value.is_absolute() else value


_str = PlainSerializer(str, return_type=str)
Ident = Annotated[str, AfterValidator(_ident)]
Method = Annotated[str, AfterValidator(_method)]
Glob = Annotated[str, AfterValidator(_glob)]
Network = Annotated[IPv4Network | IPv6Network, PlainValidator(_network), _str]
FilePath = Annotated[Path, BeforeValidator(_path_text), AfterValidator(_resolve_path)]
Listen = Annotated[HostPort, PlainValidator(HostPort.parse), _str]


# -- the models --------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class ServerTls(_Model):
    cert_file: FilePath
    key_file: FilePath


class Server(_Model):
    listen: Listen = HostPort("0.0.0.0", 8443)
    public_url: Annotated[Origin, PlainValidator(Origin), _str]
    allowed_hosts: tuple[Annotated[str, AfterValidator(_allowed_host)], ...] = ()
    trusted_proxies: tuple[Annotated[Network, AfterValidator(_trusted_network)], ...] = ()
    workers: int = Field(default=1, ge=1)
    tls: ServerTls | None = None


class Identity(_Model):
    issuer: Annotated[str, AfterValidator(_issuer)]
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    token_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"  # noqa: S105
    scopes: Annotated[tuple[str, ...], AfterValidator(_scopes)] = (
        "openid",
        "email",
        "profile",
        "groups",
        "offline_access",
    )
    user_claim: str = "email"
    groups_claim: str = "groups"
    require_email_verified: bool = True
    mfa_amr: tuple[str, ...] = ("mfa", "otp", "hwk", "swk", "sc")
    ca_file: FilePath | None = None
    api_audiences: tuple[str, ...] = ()


_DEFAULT_STORE = "sqlite:///var/lib/gateway/state.db"


class State(_Model):
    sessions: Annotated[
        StoreUrl, PlainValidator(_store_url(_SESSION_SCHEMES, "sessions")), _str
    ] = StoreUrl(_DEFAULT_STORE)
    records: Annotated[StoreUrl, PlainValidator(_store_url(_RECORD_SCHEMES, "records")), _str] = (
        StoreUrl(_DEFAULT_STORE)
    )
    keys: tuple[Annotated[SecretStr, AfterValidator(_state_key)], ...] = ()

    @property
    def key_bytes(self) -> tuple[bytes, ...]:
        """The decoded keys; the first seals, all open."""
        return tuple(decode_state_key(key.get_secret_value()) or b"" for key in self.keys)


class Sessions(_Model):
    cookie_name: Annotated[str, AfterValidator(_cookie_name)] = "__Host-gateway"
    idle_timeout: Duration = 15 * 60.0
    max_lifetime: Duration = 12 * 3600.0
    max_per_user: int = Field(default=0, ge=0)
    idle_ignore_paths: tuple[Glob, ...] = ()


class Mfa(_Model):
    totp_issuer: str = Field(default="access-gateway", min_length=1)
    enrollment: Literal["invite", "open"] = "invite"


class Assertion(_Model):
    signing_key_file: FilePath | None = None
    previous_key_files: tuple[FilePath, ...] = ()
    ttl: Duration = 60.0


class Audit(_Model):
    dir: FilePath = Path("/var/log/gateway/audit")
    origin: Annotated[str, AfterValidator(_audit_origin)] | None = None
    signing_key_file: FilePath | None = None
    checkpoint_every: int = Field(default=1000, ge=1)
    checkpoint_interval: Duration = 1.0
    heartbeat_interval: Duration = 60.0
    segment_max_bytes: Size = 64 * 2**20
    retention: Duration = 2190 * 86400.0
    on_failure: Literal["deny", "allow"] = "deny"
    sync_methods: tuple[Method, ...] = ("POST", "PUT", "PATCH", "DELETE")


class AdminTls(_Model):
    cert_file: FilePath
    key_file: FilePath
    client_ca_file: FilePath | None = None


class Admin(_Model):
    listen: Listen = HostPort("127.0.0.1", 8081)
    tokens_file: FilePath
    tls: AdminTls | None = None


class DenyBurst(_Model):
    count: int = Field(default=20, ge=1)
    window: Duration = 60.0


class Alerts(_Model):
    new_ip_login: bool = True
    privilege_change: bool = True
    disabled_user_attempt: bool = True
    deny_burst: DenyBurst = Field(default_factory=DenyBurst)


_SECRET_OPTION = re.compile(r"(?:^|_)(?:secret|password|token)$")


class Plugin(_Model):
    """`use:` names the plugin; every other key goes to `options`, checked by the plugin."""

    use: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _gather_options(cls, data: Any, info: ValidationInfo) -> Any:
        if info.context is None or not isinstance(data, dict):
            return data  # built in Python: already {use, options}
        base = info.context.get("base_dir")
        options = {k: _plugin_option(k, v, base) for k, v in data.items() if k != "use"}
        return {"options": options} | ({"use": data["use"]} if "use" in data else {})


def _plugin_option(key: str, value: object, base: object) -> object:
    if isinstance(value, str) and _SECRET_OPTION.search(key):
        return SecretStr(value)  # SECURITY: masked in repr, like every other secret
    if isinstance(value, str) and value and key.endswith("_file") and isinstance(base, Path):
        return base / value
    return value


class BreakGlass(_Model):
    accounts_file: FilePath | None = None
    max_duration: Duration = 3600.0


class UpstreamTls(_Model):
    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    server_name: Annotated[str, AfterValidator(_host_name)] | None = None

    @model_validator(mode="after")
    def _client_cert_pair(self) -> UpstreamTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate for mTLS)")
        return self


class Rule(_Model):
    """Holds when every condition given in it holds; each list matches any of its items."""

    id: Ident | None = None
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    groups_not: tuple[str, ...] = ()
    email_domains: tuple[Annotated[str, AfterValidator(_email_domain)], ...] = ()
    clients: tuple[str, ...] = ()
    methods: tuple[Method, ...] = ()
    paths: tuple[Glob, ...] = ()
    source_ips: tuple[Network, ...] = ()


class Policy(_Model):
    require_mfa: bool = False
    max_auth_age: Duration | None = None
    mode: Literal["enforce", "report"] = "enforce"
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()


class Route(_Model):
    id: Ident
    host: Annotated[str, AfterValidator(_route_host)] | None = None
    path: Annotated[str, AfterValidator(_route_path)] = "/"
    upstream: Annotated[Upstream, PlainValidator(Upstream), _str]
    upstream_tls: UpstreamTls | None = None
    strip_prefix: bool = False
    websocket: bool = False
    timeout: Duration = 60.0
    idle_timeout: Duration | None = None
    max_lifetime: Duration | None = None
    classification: str | None = None
    log_path: Literal["full", "route", "hmac"] = "full"
    cors_preflight: Literal["pass"] | None = None
    public: bool = False
    policy: Policy | None = None

    @property
    def protected(self) -> bool:
        return not self.public


class Settings(_Model):
    server: Server
    identity: Identity | None = None
    state: State = Field(default_factory=State)
    sessions: Sessions = Field(default_factory=Sessions)
    mfa: Mfa = Field(default_factory=Mfa)
    assertion: Assertion = Field(default_factory=Assertion)
    audit: Audit = Field(default_factory=Audit)
    admin: Admin | None = None
    alerts: Alerts = Field(default_factory=Alerts)
    plugins: tuple[Plugin, ...] = ()
    break_glass: BreakGlass = Field(default_factory=BreakGlass)
    routes: tuple[Route, ...] = ()

    _source: Path = PrivateAttr(default=Path("<settings>"))
    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @property
    def source(self) -> Path:
        """The config file this was loaded from (absolute)."""
        return self._source

    @property
    def warnings(self) -> tuple[str, ...]:
        return self._warnings

    @property
    def protected_routes(self) -> tuple[Route, ...]:
        return tuple(route for route in self.routes if route.protected)

    def __eq__(self, other: object) -> bool:
        # The same content loaded from another path is the same configuration.
        if not isinstance(other, Settings):
            return NotImplemented
        return self.__dict__ == other.__dict__


# -- step 2: YAML nodes to data, with positions ------------------------------------------------

_STR_TAG = "tag:yaml.org,2002:str"
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_ENV_REF_NAMED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SHIELD, _UNSHIELD = "\ue000\ue001", str.maketrans("\ue000\ue001", "{}")


def _shield_env_refs(text: str) -> str:
    """`${NAME}` -> `$\ue000NAME\ue001` before parsing, restored in every scalar after.

    YAML reads `{` inside a flow list as the start of a mapping, so the SPEC's own
    `keys: [${GATEWAY_STATE_KEY}]` would be a syntax error. The swap keeps every length,
    so line and column marks stay exact.
    """
    if any(char in text for char in _SHIELD):
        return text
    return _ENV_REF_NAMED.sub(lambda m: f"${_SHIELD[0]}{m[1]}{_SHIELD[1]}", text)


_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _dotted(path: _Loc) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _prefix(path: _Loc) -> str:
    return f"{_dotted(path)}: " if path else ""


class _Reader:
    """Turns composed YAML nodes into plain data, recording where every key and value is."""

    def __init__(self, loader: yaml.SafeLoader, env: Mapping[str, str]) -> None:
        self.loader = loader
        self.env = env
        self.marks: dict[_Loc, tuple[Mark, Mark]] = {}  # path -> (key mark, value mark)
        self.problems: list[tuple[Mark, str]] = []
        self.poisoned: set[_Loc] = set()  # values already reported: no second error on them
        self.mappings: set[_Loc] = set()  # problems with a whole mapping point at its key
        self._checked: set[int] = set()
        self._open: set[int] = set()

    def fail(self, mark: Mark, message: str, path: _Loc | None = None) -> None:
        self.problems.append((mark, message))
        if path is not None:
            self.poisoned.add(path)

    def read(self, node: yaml.Node, path: _Loc, key_mark: Mark) -> Any:
        self.marks[path] = (key_mark, node.start_mark)
        if isinstance(node, yaml.CollectionNode) and node.tag not in _PLAIN_TAGS:
            self.fail(
                node.start_mark, f"{_prefix(path)}YAML tag {node.tag!r} is not supported", path
            )
            return None
        if id(node) in self._open:
            self.fail(node.start_mark, f"{_prefix(path)}an alias refers to itself", path)
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return [
                    self.read(item, (*path, i), item.start_mark)
                    for i, item in enumerate(node.value)
                ]
            return self._scalar(node, path)
        finally:
            self._open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: _Loc) -> dict[str, Any]:
        self.mappings.add(path)
        if id(node) not in self._checked:  # an alias reuses a node: check it once
            self._checked.add(id(node))
            self._refuse_duplicates(node, path)
        try:
            self.loader.flatten_mapping(node)  # '<<' merge keys
        except yaml.MarkedYAMLError as err:
            self.fail(err.problem_mark or node.start_mark, f"{_prefix(path)}{err.problem}", path)
            return {}
        data: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if self._is_name(key_node, path):
                key = key_node.value
                data[key] = self.read(value_node, (*path, key), key_node.start_mark)
        return data

    def _refuse_duplicates(self, node: yaml.MappingNode, path: _Loc) -> None:
        # PyYAML keeps the last of two equal keys without a word; an operator means one of them.
        seen: dict[str, Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag != _STR_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            first = seen.setdefault(key_node.value, key_node.start_mark)
            if first is not key_node.start_mark:
                key = key_node.value.translate(_UNSHIELD)
                message = f"duplicate key {key!r} (first at line {first.line + 1})"
                self.fail(key_node.start_mark, f"{_prefix(path)}{message}")

    def _is_name(self, node: yaml.Node, path: _Loc) -> bool:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG:
            node.value = node.value.translate(_UNSHIELD)
            return True
        if isinstance(node, yaml.ScalarNode):
            read_as = node.tag.rpartition(":")[2]
            message = f"key {node.value!r} is read by YAML as a {read_as}: quote it"
        else:
            message = "a key must be a name, not a list or mapping"
        self.fail(node.start_mark, f"{_prefix(path)}{message}")
        return False

    def _scalar(self, node: yaml.Node, path: _Loc) -> Any:
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as err:
            self.fail(err.problem_mark or node.start_mark, f"{_prefix(path)}{err.problem}", path)
            return None
        if not isinstance(value, str):
            return value
        return self._interpolate(value.translate(_UNSHIELD), node.start_mark, path)

    def _interpolate(self, text: str, mark: Mark, path: _Loc) -> str:
        """`${NAME}` -> the environment's NAME; `$${` -> a literal `${`."""
        if "${" not in text:
            return text
        errors: list[str] = []

        def replace(match: re.Match[str]) -> str:
            name = match[1]
            if match[0] == "$${":
                return "${"
            if name is None:
                errors.append("unclosed '${' (write $${ for a literal ${)")
            elif not _ENV_NAME.fullmatch(name):
                errors.append(f"bad environment variable name {name!r} in ${{...}}")
            elif name not in self.env:
                errors.append(f"environment variable {name} is not set")
            else:
                return self.env[name]
            return match[0]

        result = _ENV_REF.sub(replace, text)
        for error in errors:
            self.fail(mark, f"{_prefix(path)}{error}", path)
        return text if errors else result

    def inline_secret_file(
        self, section: dict[str, Any], path: _Loc, name: str, base_dir: Path
    ) -> None:
        """Replace `NAME_file: PATH` by `NAME: <the file's content>` (`keys`: one per line)."""
        file_key = f"{name}_file"
        file_loc, value_loc = (*path, file_key), (*path, name)
        key_mark, value_mark = self.marks[file_loc]
        given = section.pop(file_key)
        if name in section:
            self.fail(
                key_mark, f"{_prefix(path)}give either {name} or {file_key}, not both", value_loc
            )
        elif not isinstance(given, str) or not given:
            self.fail(value_mark, f"{_dotted(file_loc)}: expected a file path", value_loc)
        elif (text := self._read_text(base_dir / given, file_loc, value_loc)) is not None:
            lines = [s for s in (line.strip() for line in text.splitlines()) if s[:1] not in "#"]
            section[name] = lines if name == "keys" else text.strip()
            for loc in [value_loc, *((*value_loc, i) for i in range(len(lines)))]:
                self.marks[loc] = self.marks[file_loc]

    def _read_text(self, file: Path, file_loc: _Loc, value_loc: _Loc) -> str | None:
        mark = self.marks[file_loc][1]
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
            self.fail(mark, f"{_dotted(file_loc)}: cannot read {file}: {reason}", value_loc)
            return None
        if not text.strip():
            self.fail(mark, f"{_dotted(file_loc)}: {file} is empty", value_loc)
            return None
        return text


def _secret_file_sections(data: dict[str, Any]) -> Iterator[tuple[dict[str, Any], _Loc, str]]:
    for key, name in (("identity", "client_secret"), ("state", "keys")):
        section = data.get(key)
        if isinstance(section, dict) and f"{name}_file" in section:
            yield section, (key,), name
    plugins = data.get("plugins")
    for i, entry in enumerate(plugins if isinstance(plugins, list) else []):
        if isinstance(entry, dict) and "secret_file" in entry:
            yield entry, ("plugins", i), "secret"


# -- step 3: pydantic errors to positions ------------------------------------------------------

_EXPECTED = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "path_type": "a file path",
}


def _data_path(data: Any, loc: tuple[str | int, ...]) -> _Loc:
    """The part of a pydantic `loc` that exists in the data (drops union members and such)."""
    path: list[str | int] = []
    for part in loc:
        in_dict = isinstance(data, dict) and isinstance(part, str) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if in_dict or in_list:
            data = data[part]
            path.append(part)
    return tuple(path)


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Settings
    for part in loc:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        if field is not None:
            model = _find_model(field.annotation)
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, (_find_model(arg) for arg in get_args(annotation))), None)


def _did_you_mean(loc: tuple[str | int, ...]) -> str:
    model = _model_at(loc[:-1])
    known = list(model.model_fields) if model else []
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _explain(error: ErrorDetails) -> str:
    kind, ctx, value = error["type"], error.get("ctx", {}), error["input"]
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "literal_error":
        return f"expected {ctx['expected']}, got {_shown(value)}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_shown(value)}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "string_too_short":
        return "must not be empty"
    return error["msg"].replace("Input should", "should")


def _problem(error: ErrorDetails, data: Any) -> tuple[_Loc, str, bool]:
    """(path in the data, message, whether to point at the key rather than the value)."""
    loc = error["loc"]
    path = _data_path(data, loc)
    if error["type"] == "extra_forbidden":
        return path, f"{_prefix(path[:-1])}unknown key {loc[-1]!r}{_did_you_mean(loc)}", True
    if error["type"] == "missing":
        return path, f"{_prefix(path)}missing required key {loc[-1]!r}", True
    return path, f"{_prefix(path)}{_explain(error)}", False


# -- step 4: cross-field checks and warnings ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Problem:
    message: str
    where: tuple[_Loc, ...]  # candidates: the first one written in the file is used


def _first_protected(s: Settings) -> tuple[_Loc, ...]:
    i = next(i for i, route in enumerate(s.routes) if route.protected)
    return ("routes", i, "policy"), ("routes", i)


def _check_routes(s: Settings) -> Iterator[_Problem]:
    if not s.routes:
        yield _Problem("routes: at least one route is needed", (("routes",),))
    seen_ids: set[str] = set()
    seen_places: dict[tuple[str | None, str], str] = {}
    for i, route in enumerate(s.routes):
        if route.id in seen_ids:
            yield _Problem(
                f"routes[{i}].id: duplicate route id {route.id!r}", (("routes", i, "id"),)
            )
        seen_ids.add(route.id)
        other = seen_places.setdefault((route.host, route.path), route.id)
        if other != route.id:
            where = f"host {route.host}" if route.host else "any host"
            message = (
                f"routes[{i}].path: {other!r} and {route.id!r} both serve {route.path} on {where}"
            )
            yield _Problem(message, (("routes", i, "path"), ("routes", i)))
        yield from _check_route(s, i, route)


def _check_route(s: Settings, i: int, route: Route) -> Iterator[_Problem]:
    at = ("routes", i)
    if route.policy is None and not route.public:
        message = f"routes[{i}]: route {route.id!r} needs a policy, or public: true"
        yield _Problem(message, (at,))
    if route.policy is not None and route.public:
        message = f"routes[{i}].public: route {route.id!r} is public and has a policy; choose one"
        yield _Problem(message, ((*at, "public"),))
    for name in ("idle_timeout", "max_lifetime"):
        mine, limit = getattr(route, name), getattr(s.sessions, name)
        if mine is not None and mine > limit:
            message = f"routes[{i}].{name}: may only be shorter than sessions.{name} ({limit:g}s)"
            yield _Problem(message, ((*at, name),))
    if route.upstream_tls is not None and route.upstream.scheme != "https":
        yield _Problem(
            f"routes[{i}].upstream_tls: needs an https:// upstream", ((*at, "upstream_tls"),)
        )
    yield from _check_rule_ids(i, route)


def _check_rule_ids(i: int, route: Route) -> Iterator[_Problem]:
    for kind in ("allow", "deny"):
        rules: tuple[Rule, ...] = getattr(route.policy, kind, ())
        ids = [rule.id for rule in rules]
        for k, rule_id in enumerate(ids):
            if rule_id is not None and rule_id in ids[:k]:
                loc = ("routes", i, "policy", kind, k, "id")
                yield _Problem(f"{_dotted(loc)}: duplicate rule id {rule_id!r}", (loc,))


def _check_protection(s: Settings) -> Iterator[_Problem]:
    if not s.protected_routes:
        return
    name = s.protected_routes[0].id
    if s.identity is None:
        message = f"identity: missing; route {name!r} is protected and needs an identity provider"
        yield _Problem(message, _first_protected(s))
    if s.identity is not None and s.identity.client_secret is None:
        message = (
            f"identity: client_secret (or client_secret_file) is needed for {s.identity.token_auth}"
        )
        yield _Problem(message, (("identity", "client_secret"), ("identity",)))
    if not s.state.keys:
        message = (
            "state.keys: at least one key is needed for protected routes (openssl rand -base64 32)"
        )
        yield _Problem(message, (("state", "keys"), ("state",), *_first_protected(s)))
    cookie = s.sessions.cookie_name.lower()
    if s.server.public_url.scheme != "https" and cookie.startswith(("__host-", "__secure-")):
        message = (
            f"sessions.cookie_name: {s.sessions.cookie_name!r} needs an https public_url; "
            "with http use a plain name such as gateway"
        )
        yield _Problem(message, (("sessions", "cookie_name"), ("server", "public_url")))
    if s.assertion.signing_key_file is None and _shared_state(s):
        message = (
            "assertion.signing_key_file: needed with several workers or Redis sessions "
            "(every process must sign with the same key; make one with `gateway keys generate`)"
        )
        yield _Problem(message, (("assertion",), ("server", "workers"), ("state", "sessions")))


def _shared_state(s: Settings) -> bool:
    return s.server.workers > 1 or s.state.sessions.scheme.startswith("redis")


def _check_workers(s: Settings) -> Iterator[_Problem]:
    if s.server.workers <= 1:
        return
    where = (("server", "workers"),)
    if not s.state.sessions.scheme.startswith("redis"):
        message = f"server.workers: {s.server.workers} workers need redis sessions (state.sessions)"
        yield _Problem(message, where)
    if s.state.records.scheme not in ("postgresql", "postgres"):
        message = f"server.workers: {s.server.workers} workers need a postgresql records store"
        yield _Problem(message, where)


def _check_admin(s: Settings) -> Iterator[_Problem]:
    admin, public = (s.admin.listen if s.admin else None), s.server.listen
    if admin is None or admin.port != public.port or admin.port == 0:
        return
    if admin.host == public.host or admin.any_address or public.any_address:
        message = f"admin.listen: {admin} overlaps server.listen {public}; use another port"
        yield _Problem(message, (("admin", "listen"), ("admin",)))


_CHECKS = (_check_routes, _check_protection, _check_workers, _check_admin)


def _warnings(s: Settings) -> Iterator[str]:
    for name in ("sessions", "records"):
        if getattr(s.state, name).scheme == "memory":
            yield f"state.{name}: memory:// is lost on restart and not shared (tests and demos)"
    if s.mfa.enrollment == "open":
        yield "mfa.enrollment: open lets any signed-in user enroll (demo and development only)"
    url = s.server.public_url
    if url.scheme == "http" and not _is_loopback(url.host):
        yield f"server.public_url: {url} is http; cookies would cross the network in clear text"
    if s.protected_routes and s.assertion.signing_key_file is None:
        yield "assertion.signing_key_file: not set; an ephemeral assertion key is made per process"
    for i, route in enumerate(s.routes):
        if route.policy is not None and not route.policy.allow:
            yield f"routes[{i}].policy: route {route.id!r} has no allow rule, so it denies everyone"
        if route.policy is not None and route.policy.mode == "report":
            yield f"routes[{i}].policy.mode: route {route.id!r} logs denials but allows them"
    for where, file in _file_fields(s, ""):
        if not file.exists():
            yield f"{where}: {file} does not exist"


def _file_fields(model: BaseModel, at: str) -> Iterator[tuple[str, Path]]:
    for name in type(model).model_fields:
        value, where = getattr(model, name), f"{at}.{name}" if at else name
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, item in items:
            place = where if i is None else f"{where}[{i}]"
            if isinstance(item, BaseModel):
                yield from _file_fields(item, place)
            elif isinstance(item, Path) and name.endswith(("_file", "_files")):
                yield place, item


# -- load_settings -----------------------------------------------------------------------------


class _Load:
    """One loading of one file: the four steps and the issues they find."""

    def __init__(self, path: Path, env: Mapping[str, str]) -> None:
        self.file = str(path)
        self.source = path.absolute()
        self.base_dir = self.source.parent
        self.env = env
        self.issues: list[ConfigIssue] = []

    def issue(self, mark: Mark | None, message: str) -> None:
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        self.issues.append(ConfigIssue(self.file, line, col, message))

    def run(self) -> Settings:
        settings = None
        data, reader = self._compose_and_read()
        if reader is not None:
            for section, path, name in list(_secret_file_sections(data)):
                reader.inline_secret_file(section, path, name, self.base_dir)
            for mark, message in reader.problems:
                self.issue(mark, message)
            settings = self._validate(data, reader)
        if self.issues:
            raise ConfigError(sorted(set(self.issues), key=lambda i: (i.line, i.col, i.message)))
        assert settings is not None
        settings._source = self.source
        settings._warnings = tuple(_warnings(settings))
        return settings

    def _compose_and_read(self) -> tuple[dict[str, Any], _Reader | None]:
        text = self._text()
        if text is None:
            return {}, None
        loader = None
        try:
            loader = yaml.SafeLoader(_shield_env_refs(text))
            return self._read(loader, loader.get_single_node())
        except yaml.MarkedYAMLError as err:
            self._syntax_error(err)
        except ReaderError as err:
            self.issue(_mark_at(text, err.position), f"invalid character in the file: {err.reason}")
        finally:
            if loader is not None:
                loader.dispose()
        return {}, None

    def _text(self) -> str | None:
        try:
            raw = self.source.read_bytes()
        except OSError as err:
            self.issue(None, f"cannot read the config file: {err.strerror or err}")
            return None
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            before = raw[: err.start].decode("utf-8", "replace")
            self.issue(_mark_at(before, len(before)), "not UTF-8 text")
            return None

    def _syntax_error(self, err: yaml.MarkedYAMLError) -> None:
        message = f"invalid YAML: {err.problem or err.context}"
        context, problem = err.context_mark, err.problem_mark
        if err.context and err.problem and context and problem and context.line != problem.line:
            message += f" ({err.context} at line {context.line + 1})"
        self.issue(err.problem_mark or err.context_mark, message)

    def _read(
        self, loader: yaml.SafeLoader, node: yaml.Node | None
    ) -> tuple[dict[str, Any], _Reader | None]:
        if node is None:
            self.issue(None, "the config file is empty; it needs at least server: and routes:")
            return {}, None
        if not isinstance(node, yaml.MappingNode):
            self.issue(
                node.start_mark,
                "the config file must be a mapping of sections (server:, routes:, ...)",
            )
            return {}, None
        reader = _Reader(loader, self.env)
        return reader.read(node, (), node.start_mark), reader

    def _validate(self, data: dict[str, Any], reader: _Reader) -> Settings | None:
        try:
            settings = Settings.model_validate(data, context={"base_dir": self.base_dir})
        except ValidationError as err:
            for path, message, at_key in (_problem(e, data) for e in err.errors()):
                self._report(reader, path, message, at_key)
            return None
        for check in _CHECKS:
            for problem in check(settings):
                path = next((w for w in problem.where if w in reader.marks), problem.where[0])
                self._report(reader, path, problem.message, at_key=False)
        return settings

    def _report(self, reader: _Reader, path: _Loc, message: str, at_key: bool) -> None:
        if any(path[: len(bad)] == bad for bad in reader.poisoned):
            return  # already reported (an unset variable, an unreadable secret file, ...)
        for depth in range(len(path), -1, -1):
            if (marks := reader.marks.get(path[:depth])) is not None:
                at_key = at_key or depth < len(path) or path in reader.mappings
                self.issue(marks[0] if at_key else marks[1], message)
                return
        self.issue(None, message)


def _mark_at(text: str, position: int) -> Mark:
    before = text[:position]
    line = before.count("\n")
    return Mark("", position, line, position - (before.rfind("\n") + 1), None, 0)


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Load and check a config file; ConfigError lists every problem, sorted by position."""
    return _Load(Path(path), os.environ if env is None else env).run()


# -- summary -----------------------------------------------------------------------------------


def _access(route: Route) -> str:
    policy = route.policy
    if route.public or policy is None:
        return "public"
    notes = ["mfa"] if policy.require_mfa else []
    notes += [f"{len(policy.allow)} allow", f"{len(policy.deny)} deny"]
    notes += ["REPORT ONLY"] if policy.mode == "report" else []
    return f"protected ({', '.join(notes)})"


def summary(settings: Settings) -> str:
    """What `gateway check-config` prints for a valid file."""
    s = settings
    width = max((len(route.id) for route in s.routes), default=0)
    workers = f"{s.server.workers} worker{'s' if s.server.workers != 1 else ''}"
    lines = [
        f"config: {s.source}",
        f"listen: {s.server.listen} ({s.server.public_url}, {workers})",
        f"identity: {s.identity.issuer if s.identity else 'none (public routes only)'}",
        f"routes ({len(s.routes)}):",
        *(
            f"  {r.id:<{width}}  {r.host or ''}{r.path} -> {r.upstream}  {_access(r)}"
            for r in s.routes
        ),
        f"stores: sessions {s.state.sessions.masked()}, records {s.state.records.masked()}",
        f"audit: {s.audit.dir}",
        f"admin: {s.admin.listen if s.admin else 'off'}",
        f"plugins: {', '.join(p.use for p in s.plugins) or 'none'}",
        f"warnings ({len(s.warnings)}):" if s.warnings else "warnings: none",
        *(f"  - {warning}" for warning in s.warnings),
    ]
    return "\n".join(lines)
