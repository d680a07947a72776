"""The `gateway` command as a user runs it: a real process, its stdout, stderr and exit status."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

BROKEN = """\
server:
  listen: 127.0.0.1:8080
  public_url: http://127.0.0.1:8080
state:
  sessions: memory://
  records: memory://
  idle_timout: 15m
routes:
  - id: app
    path: /
    upstream: http://127.0.0.1:3000
    timeout: 15x
    public: true
"""


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_reports_every_error_with_its_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = gateway("check-config", "-c", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"{path}:7:3: ") and "idle_timout" in lines[0]
    assert lines[1].startswith(f"{path}:12:14: ") and "15x" in lines[1]
    assert "Traceback" not in result.stderr


def test_check_config_summarizes_a_valid_file() -> None:
    result = gateway("check-config", "-c", str(REPO / "config/gateway.example.yaml"))
    assert result.returncode == 0, result.stderr
    assert "grafana" in result.stdout


def test_bad_command_line_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for args in (["frobnicate"], ["run"], ["check-config", "-c"], []):
        result = gateway(*args)
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("gateway: ")


def test_missing_config_file_is_one_clear_line(tmp_path: Path) -> None:
    result = gateway("check-config", "-c", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr and "Traceback" not in result.stderr


def test_python_dash_m_and_version() -> None:
    result = gateway("--version")
    assert result.returncode == 0 and result.stdout.startswith("gateway ")


def test_run_on_a_taken_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "gateway.yaml"
        key = base64.b64encode(os.urandom(32)).decode()
        path.write_text(
            f"server: {{listen: 127.0.0.1:{port}, public_url: http://127.0.0.1:{port}}}\n"
            "identity: {issuer: 'http://127.0.0.1:9', client_id: g, client_secret: s}\n"
            f"state: {{sessions: 'sqlite:///{tmp_path}/s.db', records: 'memory://',"
            f" keys: ['{key}']}}\n"
            "sessions: {cookie_name: gateway}\n"
            "audit: {dir: audit}\n"
            "routes:\n  - {id: app, path: /, upstream: 'http://127.0.0.1:9',"
            " policy: {allow: [{groups: [x]}]}}\n"
        )
        result = gateway("run", "-c", str(path))  # must exit, not hang on a store's thread
    assert result.returncode == 1
    assert "cannot serve" in result.stderr and "Traceback" not in result.stderr
