"""`gateway explain`: the decision for one request, from the config alone."""

from __future__ import annotations

import base64
import re
import socket
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.explain import Question, explain
from gateway.policy import compile_policies
from gateway.settings import load_settings

KEY = base64.b64encode(b"k" * 32).decode()

CONFIG = f"""\
server:
  public_url: https://gw.example.org
identity:
  issuer: https://idp.example.org
  client_id: gw
  client_secret: s3cret-value
state:
  sessions: memory://
  records: memory://
  keys: [{KEY}]
routes:
  - id: grafana
    host: grafana.example.org
    upstream: http://127.0.0.1:3000
    policy:
      require_mfa: true
      allow:
        - id: sre
          groups: [sre]
        - users: [alice@example.org]
          methods: [GET, HEAD]
          paths: [/d/**]
          source_ips: [10.0.0.0/8]
        - clients: [ci-bot]
      deny:
        - paths: [/admin/**]
          groups_not: [grafana-admins]
  - id: wiki
    path: /wiki
    upstream: http://127.0.0.1:3001
    policy:
      mode: report
      allow: [{{email_domains: [example.org]}}]
  - id: health
    path: /healthz
    upstream: http://127.0.0.1:3002
    public: true
"""

GRAFANA = "https://grafana.example.org"
HASH = re.compile(r"policy sha256:[0-9a-f]{64}")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    status = main(["explain", *args])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


def ask(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, list[str], str]:
    return run(capsys, "-c", str(config), *args)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """explain never contacts anyone: the IdP and the upstreams are not reachable here."""

    def refuse(*_: object) -> None:
        raise AssertionError("gateway explain opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_allow_names_the_rule_the_route_and_the_policy(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    status, lines, err = ask(
        capsys, config, "--user", "bob@example.org", "--groups", "dev,sre", "--mfa",
        "GET", f"{GRAFANA}/d/x",
    )  # fmt: skip
    assert status == 0 and err == ""
    assert lines[0] == "ALLOW  grafana.allow.sre"
    assert "route  grafana (host grafana.example.org, path /)" in lines
    assert HASH.fullmatch(lines[-1])
    assert lines[-1] == f"policy {compile_policies(load_settings(config)).hash}"
    caller = next(line for line in lines if line.startswith("caller "))
    assert "bob@example.org" in caller and "dev,sre" in caller and "mfa yes" in caller


def test_deny_without_an_allow_rule(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    status, lines, _ = ask(capsys, config, "--user", "carol@example.org", "--mfa", "GET", GRAFANA)
    assert status == 1
    assert lines[0] == "DENY  no-allow-rule"
    assert lines[1] == "route  grafana (host grafana.example.org, path /)"
    assert HASH.fullmatch(lines[-1])


def test_deny_rule_and_mfa(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    sre = ["--user", "bob@example.org", "--groups", "sre"]
    status, lines, _ = ask(capsys, config, *sre, "--mfa", "POST", f"{GRAFANA}/admin/users")
    assert status == 1 and re.fullmatch(r"DENY  denied-by:grafana\.deny#[0-9a-f]{6}", lines[0])
    status, lines, _ = ask(capsys, config, *sre, "GET", f"{GRAFANA}/d/x")
    assert status == 1 and lines[0] == "DENY  mfa-required"


def test_source_ips_need_ip(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    alice = ["--user", "Alice@Example.org", "--mfa"]
    status, lines, _ = ask(capsys, config, *alice, "--ip", "10.1.2.3", "get", f"{GRAFANA}/d/1")
    assert status == 0 and re.fullmatch(r"ALLOW  grafana\.allow#[0-9a-f]{6}", lines[0])
    status, lines, _ = ask(capsys, config, *alice, "GET", f"{GRAFANA}/d/1")
    assert status == 1 and lines[0] == "DENY  no-allow-rule"
    status, lines, _ = ask(capsys, config, *alice, "--ip", "10.1.2.3", "POST", f"{GRAFANA}/d/1")
    assert status == 1 and lines[0] == "DENY  no-allow-rule"


def test_a_service_client(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    args = ["--user", "svc-123", "--client", "ci-bot", "--mfa", "GET", f"{GRAFANA}/api/x"]
    status, lines, _ = ask(capsys, config, *args)
    assert status == 0 and lines[0].startswith("ALLOW  grafana.allow#")


def test_report_mode(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    status, lines, _ = ask(capsys, config, "--user", "mallory@evil.org", "GET", "/wiki/page")
    assert status == 0
    assert lines[0] == "ALLOW (report mode; enforce would DENY: no-allow-rule)"
    assert lines[1] == "route  wiki (any host, path /wiki)"
    status, lines, _ = ask(capsys, config, "--user", "bob@example.org", "GET", "/wiki")
    assert status == 0 and lines[0].startswith("ALLOW  wiki.allow#")
    status, lines, _ = ask(
        capsys, config, "--user", "bob", "--email", "bob@example.org", "GET", "/wiki"
    )
    assert status == 0 and lines[0].startswith("ALLOW  wiki.allow#")


def test_public_route(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    status, lines, _ = ask(capsys, config, "--user", "anyone", "GET", "/healthz")
    assert status == 0
    assert lines[0] == "ALLOW  public"
    assert lines[1] == "route  health (any host, path /healthz)"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("/other", "no-route"),
        ("https://gw.example.org/other?x=1", "no-route"),
        ("/wiki/%2e%2e/admin", "bad-path"),
        ("/a%2Fb", "bad-path"),
        ("https://evil.example.com/", "bad-host"),
        ("https://grafana.example.org:bad/", "bad-host"),
    ],
)
def test_requests_that_reach_no_policy(
    capsys: pytest.CaptureFixture[str], config: Path, url: str, reason: str
) -> None:
    status, lines, err = ask(capsys, config, "--user", "bob@example.org", "GET", url)
    assert status == 1 and err == ""
    assert lines[0] == f"DENY  {reason}"
    assert lines[1].startswith("detail ")
    assert not any(line.startswith("route ") for line in lines)
    assert HASH.fullmatch(lines[-1])


def test_gateway_endpoints(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    status, lines, _ = ask(capsys, config, "--user", "bob", "GET", "/.gateway/login")
    assert status == 0 and lines[0] == "ALLOW  gateway-endpoint"


def test_bad_config_is_exit_2(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    config.write_text(CONFIG.replace("upstream: http://127.0.0.1:3001", "upstream: nowhere"))
    status, lines, err = ask(capsys, config, "--user", "bob", "GET", "/wiki")
    assert status == 2 and lines == []
    assert err.startswith(f"{config}:") and "Traceback" not in err
    status, _, err = run(capsys, "-c", str(tmp_path / "absent.yaml"), "--user", "u", "GET", "/")
    assert status == 2 and "absent.yaml" in err


def test_the_same_rule_twice_is_exit_2(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    twice = CONFIG.replace("- id: sre\n          groups", "- groups")
    config.write_text(twice.replace("- clients: [ci-bot]", "- groups: [sre]"))
    status, lines, err = ask(capsys, config, "--user", "bob", "GET", GRAFANA)
    assert status == 2 and lines == []
    assert err.startswith(f"{config}:") and err.count("\n") == 1 and "allow[2]" in err


@pytest.mark.parametrize(
    "args",
    [
        ["--user", "bob", "--ip", "10.0.0.300", "GET", "/"],
        ["--user", "bob", "GET", "ftp://gw.example.org/"],
        ["--user", "bob", "GET", "gw.example.org/x"],
        ["--user", "bob", "G ET", "/"],
        ["--user", "", "GET", "/"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], config: Path, args: list[str]
) -> None:
    status, lines, err = ask(capsys, config, *args)
    assert status == 2 and lines == []
    assert err.startswith("gateway: ") and err.count("\n") == 1


def test_missing_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["explain", "-c", str(config), "GET", "/"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gateway: ") and "--user" in err


def test_explain_is_a_function_of_settings_and_time(config: Path) -> None:
    settings = load_settings(config)
    question = Question.parse("get", "/wiki/x", "bob@example.org", groups="a, b,,")
    assert question.groups == ("a", "b") and question.method == "GET" and question.host is None
    answer = explain(settings, question, now=0.0)
    assert answer == explain(settings, question, now=0.0)
    assert answer.facts is not None and answer.facts.email == "bob@example.org"
    assert answer.facts.email_verified and answer.facts.auth_time == 0.0
    assert answer.facts.source_ip is None and not answer.facts.mfa
