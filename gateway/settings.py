"""The config file (SPEC §3): YAML in, frozen pydantic models out, every problem at once.

    load_settings(path, env) -> Settings      or ConfigError(.issues: [ConfigIssue, ...])
    summary(settings) -> str                   what `gateway check-config` prints for a good file

Here is what is the gateway's own: the sections (Server, Identity, ..., Route, Settings),
the secret files read in (`client_secret_file`, `keys_file`, a plugin's `secret_file`,
`password_file`, ...), the rules spanning sections (protected routes need an IdP, replicas
need Redis...) and the warnings, which stat each `*_file`. The value types are in
`gateway.configtypes`; reading the YAML with positions, in four steps, is
`gateway.configfile`. Loading is blocking file I/O,
so a running server calls `load_settings` in a thread (STYLE 16).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    model_validator,
)

from gateway.configfile import ConfigError, ConfigIssue, Loc, Problem, dotted, load_model
from gateway.configtypes import (
    AllowedHost,
    AuditOrigin,
    CookieName,
    Duration,
    EmailDomain,
    FilePath,
    Glob,
    HostName,
    HostPort,
    Ident,
    Issuer,
    Listen,
    Method,
    Network,
    Origin,
    PublicUrl,
    RecordStore,
    RouteHost,
    RoutePath,
    Scopes,
    SessionStore,
    Size,
    StateKey,
    StoreUrl,
    TrustedNetwork,
    Upstream,
    UpstreamUrl,
    decode_state_key,
    parse_duration,
    parse_size,
)

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


# -- the models --------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class ServerTls(_Model):
    cert_file: FilePath
    key_file: FilePath


class Server(_Model):
    listen: Listen = HostPort("0.0.0.0", 8443)
    public_url: PublicUrl
    allowed_hosts: tuple[AllowedHost, ...] = ()
    trusted_proxies: tuple[TrustedNetwork, ...] = ()
    workers: int = Field(default=1, ge=1)
    tls: ServerTls | None = None


class Identity(_Model):
    issuer: Issuer
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    token_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"  # noqa: S105
    scopes: Scopes = (
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
    sessions: SessionStore = StoreUrl(_DEFAULT_STORE)
    records: RecordStore = StoreUrl(_DEFAULT_STORE)
    keys: tuple[StateKey, ...] = ()

    @property
    def key_bytes(self) -> tuple[bytes, ...]:
        """The decoded keys; the first seals, all open."""
        return tuple(decode_state_key(key.get_secret_value()) or b"" for key in self.keys)


class Sessions(_Model):
    cookie_name: CookieName = "__Host-gateway"
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
    origin: AuditOrigin | None = None
    signing_key_file: FilePath | None = None
    previous_signing_key_files: tuple[FilePath, ...] = ()  # sign the key.rotated announcement
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


class RateLimit(_Model):
    count: int = Field(ge=1)
    window: Duration = Field(gt=0)


class RateLimits(_Model):
    """Per client address (IPv6 per /64) and per process; beyond them, 429 with Retry-After."""

    login: RateLimit = RateLimit(count=30, window=60.0)
    callback: RateLimit = RateLimit(count=30, window=60.0)
    backchannel_logout: RateLimit = RateLimit(count=120, window=60.0)
    mfa: RateLimit = RateLimit(count=30, window=60.0)  # /.gateway/mfa and its enrollment page
    break_glass: RateLimit = RateLimit(count=10, window=60.0)  # /.gateway/break-glass


class BreakGlass(_Model):
    accounts_file: FilePath | None = None
    max_duration: Duration = 3600.0


class UpstreamTls(_Model):
    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    server_name: HostName | None = None

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
    email_domains: tuple[EmailDomain, ...] = ()
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
    host: RouteHost | None = None
    path: RoutePath = "/"
    upstream: UpstreamUrl
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
    rate_limits: RateLimits = Field(default_factory=RateLimits)
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


# -- step 4: cross-field checks and warnings ---------------------------------------------------


def _first_protected(s: Settings) -> tuple[Loc, ...]:
    i = next(i for i, route in enumerate(s.routes) if route.protected)
    return ("routes", i, "policy"), ("routes", i)


def _check_routes(s: Settings) -> Iterator[Problem]:
    if not s.routes:
        yield Problem("routes: at least one route is needed", (("routes",),))
    seen_ids: set[str] = set()
    seen_places: dict[tuple[str | None, str], str] = {}
    for i, route in enumerate(s.routes):
        if route.id in seen_ids:
            yield Problem(
                f"routes[{i}].id: duplicate route id {route.id!r}", (("routes", i, "id"),)
            )
        seen_ids.add(route.id)
        other = seen_places.setdefault((route.host, route.path), route.id)
        if other != route.id:
            where = f"host {route.host}" if route.host else "any host"
            message = (
                f"routes[{i}].path: {other!r} and {route.id!r} both serve {route.path} on {where}"
            )
            yield Problem(message, (("routes", i, "path"), ("routes", i)))
        yield from _check_route(s, i, route)


def _check_route(s: Settings, i: int, route: Route) -> Iterator[Problem]:
    at = ("routes", i)
    if route.policy is None and not route.public:
        message = f"routes[{i}]: route {route.id!r} needs a policy, or public: true"
        yield Problem(message, (at,))
    if route.policy is not None and route.public:
        message = f"routes[{i}].public: route {route.id!r} is public and has a policy; choose one"
        yield Problem(message, ((*at, "public"),))
    for name in ("idle_timeout", "max_lifetime"):
        mine, limit = getattr(route, name), getattr(s.sessions, name)
        if mine is not None and mine > limit:
            message = f"routes[{i}].{name}: may only be shorter than sessions.{name} ({limit:g}s)"
            yield Problem(message, ((*at, name),))
    if route.upstream_tls is not None and route.upstream.scheme != "https":
        yield Problem(
            f"routes[{i}].upstream_tls: needs an https:// upstream", ((*at, "upstream_tls"),)
        )
    yield from _check_rule_ids(i, route)


def _check_rule_ids(i: int, route: Route) -> Iterator[Problem]:
    """Every rule's id (given, or its content hash) is unique in its list: reasons name one rule."""
    from gateway.policy import rule_id  # the policy module builds on these models

    for kind in ("allow", "deny"):
        rules: tuple[Rule, ...] = getattr(route.policy, kind, ())
        ids = [rule_id(route.id, kind, rule) for rule in rules]
        for k, this in enumerate(ids):
            if this in ids[:k]:
                first = ids.index(this)
                loc = ("routes", i, "policy", kind, k)
                what = "id" if rules[k].id is not None else "conditions"
                message = f"{dotted(loc)}: same {what} as {kind}[{first}] ({this})"
                yield Problem(message, ((*loc, "id") if rules[k].id else loc,))


def _check_protection(s: Settings) -> Iterator[Problem]:
    if not s.protected_routes:
        return
    name = s.protected_routes[0].id
    if s.identity is None:
        message = f"identity: missing; route {name!r} is protected and needs an identity provider"
        yield Problem(message, _first_protected(s))
    if s.identity is not None and s.identity.client_secret is None:
        message = (
            f"identity: client_secret (or client_secret_file) is needed for {s.identity.token_auth}"
        )
        yield Problem(message, (("identity", "client_secret"), ("identity",)))
    if not s.state.keys:
        message = (
            "state.keys: at least one key is needed for protected routes (openssl rand -base64 32)"
        )
        yield Problem(message, (("state", "keys"), ("state",), *_first_protected(s)))
    cookie = s.sessions.cookie_name.lower()
    if s.server.public_url.scheme != "https" and cookie.startswith(("__host-", "__secure-")):
        message = (
            f"sessions.cookie_name: {s.sessions.cookie_name!r} needs an https public_url; "
            "with http use a plain name such as gateway"
        )
        yield Problem(message, (("sessions", "cookie_name"), ("server", "public_url")))
    if s.assertion.signing_key_file is None and _shared_state(s):
        message = (
            "assertion.signing_key_file: needed with several workers or Redis sessions "
            "(every process must sign with the same key; make one with `gateway keys generate`)"
        )
        yield Problem(message, (("assertion",), ("server", "workers"), ("state", "sessions")))


def _shared_state(s: Settings) -> bool:
    return s.server.workers > 1 or s.state.sessions.scheme.startswith("redis")


def _check_workers(s: Settings) -> Iterator[Problem]:
    if s.server.workers <= 1:
        return
    where = (("server", "workers"),)
    if not s.state.sessions.scheme.startswith("redis"):
        message = f"server.workers: {s.server.workers} workers need redis sessions (state.sessions)"
        yield Problem(message, where)
    if s.state.records.scheme not in ("postgresql", "postgres"):
        message = f"server.workers: {s.server.workers} workers need a postgresql records store"
        yield Problem(message, where)


def _check_admin(s: Settings) -> Iterator[Problem]:
    admin, public = (s.admin.listen if s.admin else None), s.server.listen
    if admin is None or admin.port != public.port or admin.port == 0:
        return
    if admin.host == public.host or admin.any_address or public.any_address:
        message = f"admin.listen: {admin} overlaps server.listen {public}; use another port"
        yield Problem(message, (("admin", "listen"), ("admin",)))


def _check_plugins(s: Settings) -> Iterator[Problem]:
    """Each plugin is built once (no network), so its own option checks run here too."""
    from gateway.plugins import PluginError, load_plugins  # plugins build on these models

    try:
        load_plugins(s.plugins)
    except PluginError as err:
        yield from err.problems


def _check_break_glass(s: Settings) -> Iterator[Problem]:
    """The accounts file is read and checked now: a bad one is found before the emergency."""
    from gateway.breakglass_accounts import AccountsFileError, load_accounts

    path = s.break_glass.accounts_file
    if path is None:
        return
    where = (("break_glass", "accounts_file"), ("break_glass",))
    if not s.protected_routes:
        yield Problem("break_glass.accounts_file: break-glass needs a protected route", where)
    if not path.exists():
        return  # a warning says so, as for every *_file; the start refuses it
    try:
        load_accounts(path)
    except AccountsFileError as err:
        yield from (Problem(f"break_glass.accounts_file: {issue}", where) for issue in err.issues)


def _problems(s: Settings) -> Iterator[Problem]:
    checks = (
        _check_routes,
        _check_protection,
        _check_workers,
        _check_admin,
        _check_plugins,
        _check_break_glass,
    )
    for check in checks:
        yield from check(s)


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


_LOOPBACK_NAMES = ("localhost", "localhost.")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in _LOOPBACK_NAMES or host.endswith(".localhost")


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


def _secret_file_sections(data: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Loc, str]]:
    """(section, its path, NAME) for each `NAME_file` that load_model reads into `NAME`."""
    for key, name in (("identity", "client_secret"), ("state", "keys")):
        section = data.get(key)
        if isinstance(section, dict) and f"{name}_file" in section:
            yield section, (key,), name
    plugins = data.get("plugins")
    for i, entry in enumerate(plugins if isinstance(plugins, list) else []):
        if not isinstance(entry, dict):
            continue
        # a secret-named option (secret, password, token, *_secret...) may come from a file
        for key in [k for k in entry if isinstance(k, str) and k.endswith("_file")]:
            if _SECRET_OPTION.search(key.removesuffix("_file")):
                yield entry, ("plugins", i), key.removesuffix("_file")


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Load and check a config file; ConfigError lists every problem, sorted by position."""
    path = Path(path)
    settings = load_model(
        path,
        os.environ if env is None else env,
        Settings,
        secret_files=_secret_file_sections,
        checks=_problems,
    )
    settings._source = path.absolute()
    settings._warnings = tuple(_warnings(settings))
    return settings


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
