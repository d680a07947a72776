from __future__ import annotations

import base64
import textwrap
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st

from gateway.settings import (
    ConfigError,
    ConfigIssue,
    HostPort,
    Origin,
    Route,
    Settings,
    Upstream,
    load_settings,
    parse_duration,
    parse_size,
    summary,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = base64.b64encode(b"k" * 32).decode()

PUBLIC = """\
server:
  listen: 127.0.0.1:0
  public_url: http://127.0.0.1:8080
state:
  sessions: memory://
  records: memory://
routes:
  - id: app
    upstream: http://127.0.0.1:3000
    public: true
"""

PROTECTED = f"""\
server:
  public_url: https://gw.example.org
identity:
  issuer: https://idp.example.org
  client_id: gw
  client_secret: s3cret-value
state:
  keys: [{KEY}]
routes:
  - id: app
    upstream: http://127.0.0.1:3000
    policy:
      allow: [{{groups: [staff]}}]
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    return load_settings(write(tmp_path, text), env=env or {})


def issues(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, env)
    return caught.value.issues


def positions(found: list[ConfigIssue]) -> list[tuple[int, int]]:
    return [(issue.line, issue.col) for issue in found]


def test_unknown_key_and_bad_duration_are_reported_at_their_positions(tmp_path: Path) -> None:
    text = """\
    server:
      listen: 127.0.0.1:8080
      public_url: http://127.0.0.1:8080
    state:
      sessions: memory://
    sessions:
      idle_timout: 5m
      cookie_name: gateway
    routes:
      - id: app
        upstream: http://127.0.0.1:3000
        timeout: 15x
        public: true
    """
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    found = caught.value.issues
    assert positions(found) == [(7, 3), (12, 14)]
    assert found[0].message == "sessions: unknown key 'idle_timout' (did you mean 'idle_timeout'?)"
    assert found[1].message.startswith("routes[0].timeout: bad duration '15x'")
    assert found[0].file == str(path)
    assert str(caught.value).splitlines()[0] == f"{path}:7:3: {found[0].message}"


def test_every_error_is_reported_at_once_sorted_by_position(tmp_path: Path) -> None:
    text = """\
    server:
      listen: nowhere
      public_url: ftp://x
      workers: 0
    state:
      sessions: mysql://db
      keys: [${MISSING}]
    audit:
      on_failure: maybe
      segment_max_bytes: lots
    routes:
      - id: Bad_Id
        path: no-slash
        upstream: http://127.0.0.1:3000
        public: yes-please
    """
    found = issues(tmp_path, text)
    assert [issue.line for issue in found] == [2, 3, 4, 6, 7, 9, 10, 12, 13, 15]
    assert found == sorted(found, key=lambda i: (i.line, i.col))
    messages = "\n".join(issue.message for issue in found)
    assert "expected HOST:PORT" in messages
    assert "environment variable MISSING is not set" in messages
    assert "expected 'deny' or 'allow', got 'maybe'" in messages


def test_duplicate_keys_are_refused_at_the_second_one(tmp_path: Path) -> None:
    text = PUBLIC + "sessions:\n  cookie_name: a\n  cookie_name: b\n"
    found = issues(tmp_path, text)
    assert positions(found) == [(13, 3)]
    assert found[0].message == "sessions: duplicate key 'cookie_name' (first at line 12)"


def test_yaml_syntax_error_points_at_the_problem(tmp_path: Path) -> None:
    found = issues(tmp_path, "server:\n  listen: [1, 2\nroutes: []\n")
    assert len(found) == 1
    assert found[0].line == 3
    assert found[0].message.startswith("invalid YAML:")


def test_a_control_character_is_placed_by_characters_not_bytes(tmp_path: Path) -> None:
    # libyaml reports the byte offset; after two-byte letters and a ${VAR} it must still be
    # the character the operator's editor shows.
    text = PUBLIC + "sessions:\n  cookie_name: ${HOME}_séssiön\x07x\n"
    found = issues(tmp_path, text)
    assert positions(found) == [(12, 31)]
    assert found[0].message.startswith("invalid character in the file:")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the config file is empty"),
        ("# only a comment\n", "the config file is empty"),
        ("- a\n- b\n", "must be a mapping of sections"),
        (PUBLIC + "1: x\n", "key '1' is read by YAML as a int: quote it"),
        (PUBLIC + "mfa: !!set {a}\n", "YAML tag 'tag:yaml.org,2002:set' is not supported"),
    ],
)
def test_bad_file_shapes_give_one_clear_issue(tmp_path: Path, text: str, expected: str) -> None:
    found = issues(tmp_path, text)
    assert len(found) == 1
    assert expected in found[0].message


def test_env_interpolation(tmp_path: Path) -> None:
    text = (
        PUBLIC.replace("id: app", "id: ${APP}") + "mfa:\n  totp_issuer: pre-${CORP}-$${LITERAL}\n"
    )
    settings = load(tmp_path, text, env={"APP": "web", "CORP": "Acme"})
    assert settings.routes[0].id == "web"
    assert settings.mfa.totp_issuer == "pre-Acme-${LITERAL}"


def test_env_reference_inside_a_flow_list_as_in_the_spec(tmp_path: Path) -> None:
    text = PROTECTED.replace(f"keys: [{KEY}]", "keys: [${GATEWAY_STATE_KEY}, ${OLD_KEY}]")
    settings = load(tmp_path, text, env={"GATEWAY_STATE_KEY": KEY, "OLD_KEY": KEY})
    assert settings.state.key_bytes == (b"k" * 32, b"k" * 32)


def test_unset_env_variable_is_an_error_at_its_value(tmp_path: Path) -> None:
    found = issues(tmp_path, PUBLIC.replace("id: app", "id: ${APP_ID}"))
    assert positions(found) == [(8, 9)]
    assert found[0].message == "routes[0].id: environment variable APP_ID is not set"


def test_client_secret_file_is_read_and_masked(tmp_path: Path) -> None:
    (tmp_path / "oidc-secret").write_text("  file-secret-value\n")
    text = PROTECTED.replace("client_secret: s3cret-value", "client_secret_file: oidc-secret")
    settings = load(tmp_path, text)
    assert settings.identity is not None and settings.identity.client_secret is not None
    assert settings.identity.client_secret.get_secret_value() == "file-secret-value"
    assert "file-secret-value" not in repr(settings)
    assert KEY not in repr(settings)
    assert "file-secret-value" not in summary(settings)


def test_secret_and_secret_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "oidc-secret").write_text("x")
    text = PROTECTED.replace(
        "client_secret: s3cret-value", "client_secret: a\n  client_secret_file: oidc-secret"
    )
    found = issues(tmp_path, text)
    assert positions(found) == [(7, 3)]
    assert "either client_secret or client_secret_file" in found[0].message


def test_unreadable_secret_file_is_an_error_at_its_value(tmp_path: Path) -> None:
    text = PROTECTED.replace("client_secret: s3cret-value", "client_secret_file: nope")
    text = text.replace("client_id: gw", "client_id: gw\n  bogus: 1")
    found = issues(tmp_path, text)
    assert positions(found) == [(6, 3), (7, 23)]
    assert "unknown key 'bogus'" in found[0].message
    assert "cannot read" in found[1].message


def test_keys_file_and_plugin_secret_file(tmp_path: Path) -> None:
    other = base64.urlsafe_b64encode(b"o" * 32).decode().rstrip("=")
    (tmp_path / "keys").write_text(f"# current first\n{KEY}\n\n{other}\n")
    (tmp_path / "hook").write_text("hook-secret\n")
    text = PROTECTED.replace(f"keys: [{KEY}]", "keys_file: keys")
    text += "plugins:\n  - use: redis_stream\n    url: redis://h.example.org\n"
    text += "    password_file: hook\n"
    settings = load(tmp_path, text)
    assert settings.state.key_bytes == (b"k" * 32, b"o" * 32)
    assert settings.plugins[0].use == "redis_stream"
    assert settings.plugins[0].options["password"].get_secret_value() == "hook-secret"
    assert "hook-secret" not in repr(settings)


def test_bad_state_key_is_refused_without_showing_it(tmp_path: Path) -> None:
    short = base64.b64encode(b"short-key-material").decode()
    found = issues(tmp_path, PROTECTED.replace(KEY, short))
    assert positions(found) == [(8, 10)]
    assert "not base64 of 32 bytes" in found[0].message
    assert short not in str(found[0])


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0"])
def test_trusted_proxies_everything_is_refused(tmp_path: Path, network: str) -> None:
    text = PUBLIC.replace("server:\n", f"server:\n  trusted_proxies: [10.0.0.0/8, '{network}']\n")
    found = issues(tmp_path, text)
    assert positions(found) == [(2, 33)]
    assert "would let any client forge X-Forwarded-For" in found[0].message


def test_duplicate_route_ids_are_refused_at_the_second(tmp_path: Path) -> None:
    text = (
        PUBLIC
        + "  - id: app\n    path: /b\n    upstream: http://127.0.0.1:3001\n    public: true\n"
    )
    found = issues(tmp_path, text)
    assert positions(found) == [(11, 9)]
    assert found[0].message == "routes[1].id: duplicate route id 'app'"


def test_route_idle_timeout_may_only_be_shorter(tmp_path: Path) -> None:
    found = issues(tmp_path, PROTECTED + "    idle_timeout: 1h\n")
    assert positions(found) == [(14, 19)]
    assert "may only be shorter than sessions.idle_timeout" in found[0].message
    assert load(tmp_path, PROTECTED + "    idle_timeout: 10m\n").routes[0].idle_timeout == 600


def test_identity_is_required_only_with_protected_routes(tmp_path: Path) -> None:
    assert load(tmp_path, PUBLIC).identity is None
    identity = PROTECTED[PROTECTED.index("identity:") : PROTECTED.index("state:")]
    found = issues(tmp_path, PROTECTED.replace(identity, ""))
    assert [issue.message.split(":")[0] for issue in found] == ["identity"]
    assert positions(found) == [(8, 5)]  # the protected route's policy
    no_secret = issues(tmp_path, PROTECTED.replace("  client_secret: s3cret-value\n", ""))
    assert [(i.line, i.message.split(":")[0]) for i in no_secret] == [(3, "identity")]


def test_route_needs_policy_or_public_but_not_both(tmp_path: Path) -> None:
    text = PROTECTED.replace("    policy:\n      allow: [{groups: [staff]}]\n", "")
    neither = issues(tmp_path, text)
    assert [(i.line, i.col, i.message) for i in neither] == [
        (10, 5, "routes[0]: route 'app' needs a policy, or public: true")
    ]
    both = issues(tmp_path, PUBLIC + "    policy: {allow: [{groups: [a]}]}\n")
    assert positions(both) == [(10, 13)]


def test_several_workers_need_shared_stores(tmp_path: Path) -> None:
    text = PROTECTED.replace("server:\n", "server:\n  workers: 2\n")
    found = issues(tmp_path, text)
    messages = [issue.message for issue in found]
    assert any("need redis sessions" in m for m in messages)
    assert any("need a postgresql records store" in m for m in messages)
    assert any("assertion.signing_key_file: needed" in m for m in messages)
    stores = "  sessions: redis://r:6379/0\n  records: postgresql://db/gw\n"
    (tmp_path / "a.pem").write_text("pem")
    shared = (
        text.replace("state:\n", "state:\n" + stores) + "assertion:\n  signing_key_file: a.pem\n"
    )
    assert load(tmp_path, shared).server.workers == 2


def test_host_cookie_needs_https(tmp_path: Path) -> None:
    text = PROTECTED.replace("https://gw.example.org", "http://127.0.0.1:8080")
    found = issues(tmp_path, text)
    assert [i.message.split(":")[0] for i in found] == ["sessions.cookie_name"]
    assert found[0].line == 2  # cookie_name not written: points at public_url
    plain = text + "sessions:\n  cookie_name: gateway\n"
    assert load(tmp_path, plain).sessions.cookie_name == "gateway"


def test_relative_paths_resolve_against_the_config_dir(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "keys").mkdir()
    (conf / "keys" / "assertion.pem").write_text("pem")
    text = PROTECTED + "assertion:\n  signing_key_file: keys/assertion.pem\naudit:\n  dir: logs\n"
    settings = load_settings(write(conf, text), env={})
    assert settings.assertion.signing_key_file == conf / "keys" / "assertion.pem"
    assert settings.audit.dir == conf / "logs"
    assert settings.source == conf / "gateway.yaml"
    assert settings.warnings == ()


def test_missing_referenced_file_is_a_warning(tmp_path: Path) -> None:
    settings = load(tmp_path, PROTECTED + "assertion:\n  signing_key_file: /nonexistent/a.pem\n")
    assert settings.warnings == ("assertion.signing_key_file: /nonexistent/a.pem does not exist",)
    ephemeral = load(tmp_path, PROTECTED).warnings
    assert ephemeral == (
        "assertion.signing_key_file: not set; an ephemeral assertion key is made per process",
    )


def test_merge_keys_and_anchors(tmp_path: Path) -> None:
    text = PUBLIC + (
        "  - &base\n    id: one\n    path: /one\n    upstream: http://127.0.0.1:3001\n"
        "    public: true\n  - <<: *base\n    id: two\n    path: /two\n"
    )
    settings = load(tmp_path, text)
    assert [(r.id, r.path, str(r.upstream)) for r in settings.routes[1:]] == [
        ("one", "/one", "http://127.0.0.1:3001"),
        ("two", "/two", "http://127.0.0.1:3001"),
    ]


def test_value_normalization(tmp_path: Path) -> None:
    text = PROTECTED.replace("server:\n", "server:\n  allowed_hosts: [Alt.Example.ORG.]\n")
    text = text.replace("  - id: app\n", "  - id: app\n    host: Grafana.Example.org.:8443\n")
    text = text.replace("allow: [", "allow: [{methods: [get], paths: ['/d/**']}, ")
    settings = load(tmp_path, text)
    route = settings.routes[0]
    assert settings.server.allowed_hosts == ("alt.example.org",)
    assert route.host == "grafana.example.org"
    assert route.policy is not None and route.policy.allow[0].methods == ("GET",)
    assert settings.audit.sync_methods == ("POST", "PUT", "PATCH", "DELETE")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("12h", 43200),
        ("7d", 604800),
        ("500ms", 0.5),
        ("1h30m", 5400),
        ("1.5s", 1.5),
        (" 2m ", 120),
    ],
)
def test_parse_duration(value: str, seconds: float) -> None:
    assert parse_duration(value) == seconds


@hypothesis.given(
    st.lists(st.sampled_from(["ms", "s", "m", "h", "d"]), min_size=1), st.integers(1, 999)
)
@hypothesis.settings(max_examples=25)
def test_parse_duration_adds_up_its_parts(units: list[str], number: int) -> None:
    seconds = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    text = "".join(f"{number}{unit}" for unit in units)
    assert parse_duration(text) == pytest.approx(sum(number * seconds[unit] for unit in units))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (30, "needs a unit"),
        ("30", "needs a unit"),
        ("15x", "bad duration '15x'"),
        ("0s", "longer than zero"),
        ("-5s", "bad duration"),
        ("", "bad duration"),
        (True, "got"),
        (None, "got"),
    ],
)
def test_parse_duration_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("64MiB", 64 * 2**20),
        ("1 GiB", 2**30),
        ("8KiB", 8192),
        ("10MB", 10_000_000),
        ("2kb", 2000),
        ("1GB", 10**9),
        ("7B", 7),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["64XB", "1.5MiB", "", "-1", 0, True, None])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("0.0.0.0:8443", "0.0.0.0", 8443),
        ("[::1]:8443", "::1", 8443),
        ("localhost:0", "localhost", 0),
    ],
)
def test_host_port(text: str, host: str, port: int) -> None:
    parsed = HostPort.parse(text)
    assert (parsed.host, parsed.port, str(parsed)) == (host, port, text)


@pytest.mark.parametrize("text", ["8443", "host:", ":80", "h:70000", "[::1]8443"])
def test_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        HostPort.parse(text)


def test_origin_and_upstream() -> None:
    origin = Origin("HTTPS://Gateway.Example.org./")
    assert (origin, origin.scheme, origin.host, origin.port) == (
        "https://gateway.example.org",
        "https",
        "gateway.example.org",
        443,
    )
    assert Origin("http://[::1]:8080").host == "::1"
    upstream = Upstream("https://10.0.0.5:3000/base/")
    assert (upstream, upstream.host, upstream.port, upstream.base_path) == (
        "https://10.0.0.5:3000/base",
        "10.0.0.5",
        3000,
        "/base",
    )
    for bad in ("https://x/path", "https://x?q", "ftp://x", "https://u:p@x", "//x"):
        with pytest.raises(ValueError):
            Origin(bad)
    for bad in ("https://x/a?b", "https://x#f", "https:///p", "https://x/a/../b"):
        with pytest.raises(ValueError):
            Upstream(bad)


def test_store_url_password_is_masked_in_repr(tmp_path: Path) -> None:
    text = PUBLIC.replace("sessions: memory://", "sessions: rediss://:pa55word@r.example.org/0")
    settings = load(tmp_path, text)
    assert settings.state.sessions == "rediss://:pa55word@r.example.org/0"
    assert "pa55word" not in repr(settings)
    assert "pa55word" not in summary(settings)


def test_a_password_in_a_store_urls_query_is_masked_too(tmp_path: Path) -> None:
    url = "postgresql://gw@db.example.org/gw?search_path=gw&password=pa55word"
    text = PUBLIC.replace("records: memory://", f"records: {url}")
    settings = load(tmp_path, text)
    assert settings.state.records == url
    assert "pa55word" not in repr(settings) and "pa55word" not in summary(settings)
    assert "search_path=gw" in summary(settings)  # only the password is hidden


def test_models_built_in_python_take_plain_seconds() -> None:
    route = Route(id="r", upstream="http://127.0.0.1:1", timeout=0.25, public=True)
    assert route.timeout == 0.25
    assert route.upstream.port == 1
    assert route.protected is False


def test_example_configs_load(tmp_path: Path) -> None:
    example = load_settings(ROOT / "config" / "gateway.example.yaml", env={})
    assert {route.id for route in example.routes} >= {"grafana", "health"}
    assert any(route.host and route.host.startswith("*.") for route in example.routes)
    grafana = example.routes[0]
    assert grafana.policy is not None and grafana.policy.require_mfa
    text = summary(example)
    assert all(route.id in text for route in example.routes)

    public = load_settings(ROOT / "config" / "public-only.yaml", env={})
    assert public.identity is None
    assert len(public.warnings) == 2
    assert all("memory://" in warning for warning in public.warnings)
    assert "app" in summary(public)
