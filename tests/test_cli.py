"""The `gateway` command as a user runs it: a real process, its stdout, stderr and exit status."""

from __future__ import annotations

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
