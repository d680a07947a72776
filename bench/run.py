"""Proxy benchmark: sets up an upstream and every subject, measures them interleaved.

    .venv/bin/python bench/run.py            # 3 rounds x 10 s, prints a Markdown table
    .venv/bin/python bench/run.py --write    # ... and writes bench/RESULTS.md
    .venv/bin/python bench/run.py --quick    # 1 round x 2 s smoke test

Layout on a 2-core machine: every subject (the server under test) is pinned to
CPU 0; the upstream nginx and wrk share CPU 1. The headline figure is CPU time
per request of the subject's process tree (utime+stime from /proc), which stays
meaningful when throughput is bounded by the load side. Each round ends with the
targeted ratios' two subjects loaded together on the same core, which cancels the
drift of a shared machine. Traffic goes only to 127.0.0.1. This is never part of
the test suite. See bench/README.md.

To add a subject, subclass Subject (or reuse one) and append it in
build_subjects(); to add a headline ratio, append to RATIOS.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from subprocess import PIPE

BENCH_DIR = Path(__file__).resolve().parent
BODY = b"Hello, world!"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK_THREADS = 1
WRK_CONNECTIONS = 64
DISTURBED = 0.10  # share of the subject's core used by others above which a measurement is flagged
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy


class StartError(Exception):
    """A subject (or the upstream) did not come up; the message says why."""


# --------------------------------------------------------------------------- tools


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/bin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    return None


def apt_install(packages: Sequence[str]) -> None:
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if sudo and shutil.which("sudo") is None:
        raise SystemExit(f"install {' '.join(packages)} (as root: apt-get install -y ...)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", *packages]
    print(f"# installing {' '.join(packages)} with apt-get", file=sys.stderr)
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode == 0:
        return
    subprocess.run([*sudo, "apt-get", "update"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(install, env=env, check=True, stdout=subprocess.DEVNULL)


def ensure_tools() -> tuple[str, str]:
    """Paths of nginx and wrk, installing the Debian packages when missing."""
    missing = [name for name in ("nginx", "wrk") if find_tool(name) is None]
    if missing:
        apt_install(missing)
    nginx, wrk = find_tool("nginx"), find_tool("wrk")
    if nginx is None or wrk is None:
        raise SystemExit("nginx and wrk are required (apt-get install -y nginx wrk)")
    return nginx, wrk


def tool_version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A process we started (pinned with taskset), its log, and a clean stop."""

    def __init__(self, name: str, argv: list[str], cpu: int, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["taskset", "-c", str(cpu), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # still alive: the group is ours
            self.proc.wait()


# --------------------------------------------------------------------------- CPU accounting


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold spaces


def _children_map() -> dict[int, list[int]]:
    """ppid -> pids, from one scan of /proc (task/*/children needs CONFIG_PROC_CHILDREN)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                tree.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    return tree


def process_tree(roots: Sequence[int]) -> list[int]:
    tree, found, todo = _children_map(), [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def cpu_seconds(roots: Sequence[int]) -> float:
    """utime+stime (fields 14, 15 of /proc/PID/stat) of the roots and all their descendants."""
    ticks = 0
    for pid in process_tree(roots):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def core_busy_seconds(cpu: int) -> float:
    """user+nice+system+steal time of one CPU from /proc/stat (irq and softirq left out)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = line.split()[1:9]
            return (int(user) + int(nice) + int(system) + int(steal)) / CLK_TCK
    return 0.0


# --------------------------------------------------------------------------- environment


@dataclass
class Env:
    """What every subject shares: binaries, CPUs, the temp dir and the upstream."""

    nginx: str
    wrk: str
    tmp: Path
    subject_cpu: int
    load_cpu: int
    upstream_port: int = 0
    upstream: Server | None = None
    servers: list[Server] = field(default_factory=list)

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    def spawn(self, name: str, argv: list[str], cpu: int) -> Server:
        server = Server(name, argv, cpu, self.tmp / f"{name}.log")
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            with contextlib.suppress(Exception):
                server.stop()


def nginx_conf(prefix: Path, http_body: str) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
{temp}
{http_body}
}}
"""


def start_nginx(env: Env, name: str, http_body: str, cpu: int) -> Server:
    prefix = env.tmp / name
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, http_body))
    argv = [env.nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return env.spawn(name, argv, cpu)


def start_upstream(env: Env) -> None:
    env.upstream_port = free_port()
    body = f"""    server {{
        listen 127.0.0.1:{env.upstream_port} backlog=4096;
        location / {{ return 200 "{BODY.decode()}"; }}
    }}"""
    env.upstream = start_nginx(env, "upstream", body, env.load_cpu)
    wait_ready(env.upstream, env.upstream_url + "/", timeout=15)
    check_response(env.upstream_url + "/")


# --------------------------------------------------------------------------- readiness


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, bytes]:
    try:
        with HTTP.open(
            urllib.request.Request(url, headers=headers or {}), timeout=timeout
        ) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def wait_ready(server: Server, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise StartError(f"exited with status {server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            if http_get(url, timeout=1.0)[0] == 200:
                return
        time.sleep(0.1)
    raise StartError(f"no 200 from {url} within {timeout:.0f}s:\n{server.log_tail()}")


def check_response(url: str, headers: dict[str, str] | None = None) -> None:
    status, body = http_get(url, headers)
    if status != 200 or body != BODY:
        raise StartError(f"GET {url} gave {status} {body[:200]!r}, expected 200 {BODY!r}")


# --------------------------------------------------------------------------- subjects


class Subject:
    """A server under test: started once, measured every round, stopped at the end."""

    def __init__(self, name: str, description: str, path: str = "/") -> None:
        self.name = name
        self.description = description
        self.path = path
        self.port = 0
        self.server: Server | None = None
        self.error: str | None = None
        self.headers: dict[str, str] = {}  # sent with every request (a session cookie, ...)
        self.ready_timeout = 30.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def health_url(self) -> str:
        return self.url

    def command(self, env: Env) -> list[str]:
        """The argv of the server, listening on 127.0.0.1:self.port (or override start)."""
        raise NotImplementedError

    def start(self, env: Env) -> None:
        self.port = free_port()
        self.server = env.spawn(self.name, self.command(env), env.subject_cpu)

    def wait_ready(self) -> None:
        assert self.server is not None
        wait_ready(self.server, self.health_url, self.ready_timeout)
        check_response(self.url, self.headers)

    def cpu(self, env: Env) -> int:
        """The core the subject runs on."""
        return env.subject_cpu

    def pids(self) -> list[int]:
        """Roots of the process trees whose CPU time is charged to this subject."""
        return [self.server.pid] if self.server else []

    def alive(self) -> bool:
        return self.server is not None and self.server.alive()

    def log_tail(self) -> str:
        return self.server.log_tail() if self.server else ""


class DirectSubject(Subject):
    """wrk straight at the upstream nginx (CPU 1, shared with wrk): the floor of all floors."""

    def start(self, env: Env) -> None:
        self.port, self.server = env.upstream_port, env.upstream

    def cpu(self, env: Env) -> int:
        return env.load_cpu  # where wrk runs too: "others" is mostly wrk


class NginxProxySubject(Subject):
    """A second nginx with proxy_pass and an upstream keepalive pool."""

    def start(self, env: Env) -> None:
        self.port = free_port()
        body = f"""    upstream backend {{
        server 127.0.0.1:{env.upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
        self.server = start_nginx(env, self.name, body, env.subject_cpu)


class MinimalProxySubject(Subject):
    """bench/minimal_proxy.py: the aiohttp floor."""

    def command(self, env: Env) -> list[str]:
        script = BENCH_DIR / "minimal_proxy.py"
        port = str(self.port)
        return [sys.executable, str(script), "--port", port, "--upstream", env.upstream_url]


class LeanProxySubject(Subject):
    """bench/lean_proxy.py: the floor's experiments (low-level server; lean or aiohttp client)."""

    def __init__(self, name: str, description: str, client: str) -> None:
        super().__init__(name, description)
        self.client = client

    def command(self, env: Env) -> list[str]:
        script = BENCH_DIR / "lean_proxy.py"
        argv = [sys.executable, str(script), "--port", str(self.port)]
        return [*argv, "--upstream", env.upstream_url, "--client", self.client]


def gateway_argv() -> list[str]:
    console = Path(sys.executable).parent / "gateway"
    return [str(console)] if console.exists() else [sys.executable, "-m", "gateway"]


class GatewaySubject(Subject):
    """`gateway run -c CONFIG` with public routes to the upstream, memory:// stores."""

    def __init__(self, name: str, description: str, routes: int = 0) -> None:
        super().__init__(name, description, path=f"/r{routes // 2}/x" if routes else "/")
        self.routes = routes
        self.ready_timeout = 120.0  # 10k routes take a while to validate

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.gateway/healthz"

    def config(self, env: Env) -> str:
        audit = env.tmp / self.name / "audit"
        audit.mkdir(parents=True, exist_ok=True)
        up = json.dumps(env.upstream_url)
        lines = [
            f"server: {{listen: 127.0.0.1:{self.port}, public_url: http://127.0.0.1:{self.port}}}",
            'state: {sessions: "memory://", records: "memory://"}',
            f"audit: {{dir: {json.dumps(str(audit))}}}",
            "routes:",
            f"  - {{id: bench, path: /, upstream: {up}, public: true}}",
        ]
        lines += [
            f"  - {{id: r{i}, path: /r{i}, upstream: {up}, public: true}}"
            for i in range(self.routes)
        ]
        return "\n".join(lines) + "\n"

    def command(self, env: Env) -> list[str]:
        path = env.tmp / self.name / "gateway.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.config(env))
        return [*gateway_argv(), "run", "-c", str(path)]


class LoggedInSubject(GatewaySubject):
    """The gateway with a protected route, requests carrying a real session cookie.

    Its own dev IdP (bench/devidp_server.py, on the load CPU: it only works during the login)
    issues the login once at start; wrk then sends the session cookie with every request.
    `audit=False` runs bench/gateway_without_audit.py instead: the same gateway whose audit
    writer keeps nothing, the baseline for what logging costs.
    """

    def __init__(
        self, name: str, description: str, store: str, routes: int = 0, audit: bool = True
    ) -> None:
        super().__init__(name, description, routes)
        self.store = store
        self.idp_port = 0
        self.gateway_port = 0  # where the gateway listens: self.port unless a proxy is in front
        self.audit = audit
        self.records = "memory://"  # state.records (bench/workers.py: PostgreSQL)

    def command(self, env: Env) -> list[str]:
        argv = super().command(env)  # [...gateway, "run", "-c", CONFIG]
        if self.audit:
            return argv
        return [sys.executable, str(BENCH_DIR / "gateway_without_audit.py"), *argv[-3:]]

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/.gateway/healthz"

    def server_extra(self) -> str:
        """More `server:` keys (a leading ", "), for subclasses."""
        return ""

    def more_routes(self, env: Env) -> list[str]:
        """Route lines after the protected `/`, for subclasses."""
        return []

    def config(self, env: Env) -> str:
        audit = env.tmp / self.name / "audit"
        audit.mkdir(parents=True, exist_ok=True)
        store = self.store.replace("{tmp}", str(env.tmp / self.name))
        key = base64.b64encode(os.urandom(32)).decode()
        signing_key = assertion_key(env.tmp / self.name)
        port = self.gateway_port
        lines = [
            f"server: {{listen: 127.0.0.1:{port}, public_url: http://127.0.0.1:{port}"
            f"{self.server_extra()}}}",
            f"identity: {{issuer: http://127.0.0.1:{self.idp_port}, client_id: gateway, "
            f"client_secret: {BENCH_CLIENT_SECRET}}}",
            f'state: {{sessions: "{store}", records: "{self.records}", keys: ["{key}"]}}',
            "sessions: {cookie_name: gateway}",
            f"assertion: {{signing_key_file: {json.dumps(str(signing_key))}}}",
            f"audit: {{dir: {json.dumps(str(audit))}}}",
            "routes:",
            f"  - {{id: bench, path: /, upstream: {json.dumps(env.upstream_url)}, "
            "policy: {allow: [{groups: [bench]}]}}",
            *self.more_routes(env),
        ]
        return "\n".join(lines) + "\n"

    def start(self, env: Env) -> None:
        self.port, self.idp_port = free_port(), free_port()
        self.gateway_port = self.port
        redirect = f"http://127.0.0.1:{self.gateway_port}/.gateway/callback"
        script = BENCH_DIR / "devidp_server.py"
        idp = [
            sys.executable,
            str(script),
            "--port",
            str(self.idp_port),
            "--redirect-uri",
            redirect,
        ]
        env.spawn(f"{self.name}-idp", idp, env.load_cpu)
        wait_for_port(self.idp_port, 30.0)
        self.server = env.spawn(self.name, self.command(env), env.subject_cpu)

    def wait_ready(self) -> None:
        assert self.server is not None
        wait_ready(self.server, self.health_url, self.ready_timeout)
        self.headers = {"Cookie": f"gateway={login(self.gateway_port)}"}
        check_response(self.url, self.headers)


# Ten allow rules per route for the policy subjects: nine the bench user (bench@example.org,
# group bench, GET from 127.0.0.1) fails, each on a different kind of condition, then the one it
# passes, which gives every kind of condition; so each request tries all ten rules.
POLICY_RULES = [
    "{{groups: [team-{i}, team-{i}-admins]}}",
    "{{users: [user-{i}@example.org, svc-{i}]}}",
    "{{groups: [bench], methods: [POST, PUT, DELETE]}}",
    '{{groups: [bench], paths: ["/admin/**", "/r{i}-private/*"]}}',
    "{{groups: [bench], source_ips: [10.{a}.{b}.0/24, 192.168.{b}.0/24, fd00::/8]}}",
    "{{email_domains: [example-{i}.org, corp.example.net]}}",
    "{{groups_not: [bench, staff], methods: [GET]}}",
    '{{users: [bench@example.org], paths: ["/x/*/edit", "/x/**/secret"], methods: [GET]}}',
    "{{clients: [robot-{i}], groups: [bench]}}",
    '{{groups: [ops, bench], methods: [GET, HEAD], paths: ["/**"], source_ips: [127.0.0.0/8]}}',
]


class PolicySubject(LoggedInSubject):
    """Logged in (SQLite sessions), with `routes` protected routes `/r{i}` of ten rules each."""

    def more_routes(self, env: Env) -> list[str]:
        up = json.dumps(env.upstream_url)
        lines = []
        for i in range(self.routes):
            fill = {"i": i, "a": i // 256 % 256, "b": i % 256}
            rules = ", ".join(rule.format(**fill) for rule in POLICY_RULES)
            lines.append(
                f"  - {{id: r{i}, path: /r{i}, upstream: {up}, policy: {{allow: [{rules}]}}}}"
            )
        return lines


class ForwardAuthSubject(LoggedInSubject):
    """nginx (1 worker) with `auth_request` to a logged-in gateway's `/.gateway/auth`, then
    `proxy_pass` to the upstream with the identity headers the gateway answered with.

    Both processes run on the subject CPU and both are charged: CPU per request is nginx's plus
    the gateway's. wrk talks to nginx (self.port); the gateway listens on self.gateway_port.
    """

    IDENTITY = {  # the gateway's answer header -> the nginx variable holding it
        "X-Auth-Request-User": "auth_user",
        "X-Auth-Request-Email": "auth_email",
        "X-Auth-Request-Groups": "auth_groups",
        "X-Gateway-Assertion": "auth_assertion",
        "X-Request-Id": "auth_request_id",
    }

    def __init__(self, name: str, description: str, store: str) -> None:
        super().__init__(name, description, store)
        self.nginx: Server | None = None

    def server_extra(self) -> str:
        return ", trusted_proxies: [127.0.0.1/32]"

    def start(self, env: Env) -> None:
        super().start(env)  # the IdP and the gateway (self.gateway_port)
        self.port = free_port()
        body = auth_request_conf(
            env, self.port, self.gateway_port, "/.gateway/auth", self.IDENTITY.items()
        )
        self.nginx = start_nginx(env, f"{self.name}-nginx", body, env.subject_cpu)

    def wait_ready(self) -> None:
        assert self.server is not None and self.nginx is not None
        wait_ready(self.server, self.health_url, self.ready_timeout)
        self.headers = {"Cookie": f"gateway={login(self.gateway_port)}"}
        # The gateway's own answer: 200 with the bench user's identity and an assertion.
        asked = {
            **self.headers,
            "X-Forwarded-Method": "GET",
            "X-Forwarded-Host": "127.0.0.1",
            "X-Forwarded-Uri": self.path,
        }
        auth = f"http://127.0.0.1:{self.gateway_port}/.gateway/auth"
        with HTTP.open(urllib.request.Request(auth, headers=asked), timeout=5) as answer:
            user = answer.headers.get("X-Auth-Request-User")
            signed = answer.headers.get("X-Gateway-Assertion")
        if user != "bench@example.org" or not signed:
            raise StartError(f"/.gateway/auth answered user {user!r}, assertion {bool(signed)}")
        wait_for_port(self.port, self.ready_timeout)
        if not self.nginx.alive():
            raise StartError(f"nginx exited:\n{self.log_tail()}")
        status = http_get(self.url)[0]  # without the cookie: the gateway's 401, passed on
        if status != 401:
            raise StartError(f"GET {self.url} without a session gave {status}, expected 401")
        check_response(self.url, self.headers)

    def pids(self) -> list[int]:
        return [server.pid for server in (self.server, self.nginx) if server is not None]

    def alive(self) -> bool:
        return super().alive() and self.nginx is not None and self.nginx.alive()

    def log_tail(self) -> str:
        nginx = self.nginx.log_tail() if self.nginx else ""
        error_log = ""
        if self.nginx:
            with contextlib.suppress(OSError):
                path = self.nginx.log_path.parent / self.nginx.name / "error.log"
                error_log = "\n".join(path.read_text(errors="replace").splitlines()[-10:])
        return "\n".join(filter(None, [super().log_tail(), nginx, error_log]))


class NginxAuthSubject(Subject):
    """nginx with the forward-auth subject's config, `auth_request` going to bench/minimal_auth.py
    (fixed identity headers) instead of the gateway: what the peers' common deployment costs at
    the least. Both processes run on the subject CPU and both are charged."""

    def __init__(self, name: str, description: str) -> None:
        super().__init__(name, description)
        self.auth_port = 0
        self.nginx: Server | None = None

    def start(self, env: Env) -> None:
        self.port, self.auth_port = free_port(), free_port()
        script = [sys.executable, str(BENCH_DIR / "minimal_auth.py"), "--port", str(self.auth_port)]
        self.server = env.spawn(f"{self.name}-auth", script, env.subject_cpu)
        identity = ForwardAuthSubject.IDENTITY.items()
        body = auth_request_conf(env, self.port, self.auth_port, "/auth", identity)
        self.nginx = start_nginx(env, self.name, body, env.subject_cpu)

    def wait_ready(self) -> None:
        assert self.server is not None
        wait_ready(self.server, f"http://127.0.0.1:{self.auth_port}/auth", self.ready_timeout)
        wait_for_port(self.port, self.ready_timeout)
        check_response(self.url, self.headers)

    def pids(self) -> list[int]:
        return [server.pid for server in (self.server, self.nginx) if server is not None]

    def alive(self) -> bool:
        return super().alive() and self.nginx is not None and self.nginx.alive()


def auth_request_conf(
    env: Env, port: int, auth_port: int, auth_uri: str, identity: Iterable[tuple[str, str]]
) -> str:
    """nginx `http` body: auth_request to 127.0.0.1:auth_port`auth_uri`, then proxy_pass to the
    upstream with the identity headers (header -> nginx variable) the auth answer carried."""
    identity = list(identity)
    sets = "\n".join(
        f"            auth_request_set ${var} $upstream_http_{upstream_var(header)};"
        for header, var in identity
    )
    passes = "\n".join(f"            proxy_set_header {header} ${var};" for header, var in identity)
    return f"""    upstream backend {{
        server 127.0.0.1:{env.upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    upstream auth {{
        server 127.0.0.1:{auth_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /_gateway_auth {{
            internal;
            proxy_pass http://auth{auth_uri};
            proxy_http_version 1.1;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Method $request_method;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-Uri $request_uri;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
        location / {{
            auth_request /_gateway_auth;
{sets}
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
{passes}
        }}
    }}"""


def upstream_var(header: str) -> str:
    """nginx's name for a response header in `$upstream_http_...`."""
    return header.lower().replace("-", "_")


def assertion_key(directory: Path) -> Path:
    """An ES256 key for the identity assertion (required with Redis sessions)."""
    from gateway.keyfiles import generate

    keys = directory / "keys"
    if not keys.exists():
        generate(keys)  # what `gateway keys generate` writes
    return keys / "assertion-es256.pem"


BENCH_CLIENT_SECRET = "bench-client-secret"


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise StartError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def login(port: int) -> str:
    """Log the bench user in through the gateway and the dev IdP; the session cookie's value."""
    import html
    from http.cookiejar import CookieJar

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)

    def visit(url: str, data: bytes | None = None) -> tuple[int, str, str]:
        try:
            with opener.open(urllib.request.Request(url, data=data), timeout=10) as resp:
                return resp.status, resp.headers.get("Location", ""), resp.read().decode()
        except urllib.error.HTTPError as redirect:
            return redirect.code, redirect.headers.get("Location", ""), ""

    url, page = f"http://127.0.0.1:{port}/.gateway/login?rd=/", ""
    for _ in range(5):  # gateway login -> the IdP's authorize page (a form)
        status, location, page = visit(url)
        if status != 302:
            break
        url = urllib.parse.urljoin(url, location)
    fields = dict(re.findall(r'type="hidden" name="([^"]*)" value="([^"]*)"', page))
    form = {html.unescape(k): html.unescape(v) for k, v in fields.items()}
    form.update(username="bench", password="bench-pw")
    action = html.unescape(re.search(r'<form method="post" action="([^"]*)"', page)[1])  # type: ignore[index]
    status, location, _ = visit(
        urllib.parse.urljoin(url, action), urllib.parse.urlencode(form).encode()
    )
    status, location, _ = visit(location)  # the gateway's callback sets the session cookie
    cookie = next((c.value for c in jar if c.name == "gateway" and c.value), None)
    if cookie is None:
        raise StartError(f"the bench login did not yield a session cookie (callback {status})")
    return cookie


def build_subjects() -> list[Subject]:
    return [
        DirectSubject("direct", "wrk -> upstream nginx, no proxy (it runs on the load CPU)"),
        NginxProxySubject("nginx", "nginx proxy_pass, 1 worker, upstream keepalive 64"),
        GatewaySubject("gateway", "gateway run, one public route `/`, memory:// stores"),
        MinimalProxySubject("aiohttp-min", "bench/minimal_proxy.py: ~40-line aiohttp proxy"),
        LeanProxySubject(
            "server-min",
            "bench/lean_proxy.py --client aiohttp: aiohttp-min on the low-level web.Server",
            "aiohttp",
        ),
        LeanProxySubject(
            "lean-min",
            "bench/lean_proxy.py: server-min with a keep-alive pool of protocols and aiohttp's "
            "C response parser instead of ClientSession (GET/HEAD only)",
            "lean",
        ),
        GatewaySubject("gateway-10-routes", "gateway, 10 public routes + `/`", routes=10),
        GatewaySubject("gateway-10k-routes", "gateway, 10,000 public routes + `/`", routes=10_000),
        LoggedInSubject(
            "session-sqlite",
            "gateway, protected route, logged in, SQLite sessions",
            "sqlite:///{tmp}/state.db",
        ),
        LoggedInSubject(
            "session-sqlite-no-audit",
            "session-sqlite with bench/gateway_without_audit.py: its audit writer keeps nothing",
            "sqlite:///{tmp}/state.db",
            audit=False,
        ),
        LoggedInSubject(
            "session-redis",
            "gateway, protected route, logged in, Redis sessions",
            "redis://127.0.0.1:6379/10",
        ),
        PolicySubject(
            "policy-10-routes",
            "like session-sqlite, plus 10 protected routes of 10 allow rules (the last matches)",
            "sqlite:///{tmp}/state.db",
            routes=10,
        ),
        PolicySubject(
            "policy-1000-routes",
            "like session-sqlite, plus 1,000 protected routes of 10 allow rules (the last matches)",
            "sqlite:///{tmp}/state.db",
            routes=1000,
        ),
        ForwardAuthSubject(
            "forward-auth",
            "nginx auth_request -> gateway /.gateway/auth (logged in, SQLite sessions), "
            "then proxy_pass; CPU of nginx + gateway",
            "sqlite:///{tmp}/state.db",
        ),
        NginxAuthSubject(
            "nginx-auth-min",
            "the forward-auth subject's nginx with auth_request to bench/minimal_auth.py "
            "(~30 lines of aiohttp answering 200); CPU of nginx + the auth service",
        ),
    ]


# --------------------------------------------------------------------------- measuring


SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass(frozen=True, slots=True)
class Measurement:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # CPU time of the subject's process tree per completed request
    busy: float  # subject CPU seconds / wall seconds (1.0 = one core saturated)
    others: float  # share of the subject's core used by anything not measured (other tenants)
    errors: int  # socket errors + non-2xx/3xx responses


def to_ms(value: str, unit: str) -> float:
    return float(value) * TIME_UNITS_MS[unit]


def parse_wrk(text: str) -> WrkResult:
    done = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    pct = dict(re.findall(r"^\s*(\d+)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", text, re.M))
    if not (done and rps and "50" in pct and "99" in pct):
        raise ValueError(f"cannot parse wrk output:\n{text}")
    socket_errors = SOCKET_ERRORS.search(text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = sum(map(int, socket_errors.groups())) if socket_errors else 0
    errors += int(non2xx.group(1)) if non2xx else 0

    def pct_ms(key: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", pct[key]).groups()  # type: ignore[union-attr]
        return to_ms(number, unit)

    return WrkResult(
        requests=int(done.group(1)),
        seconds=to_ms(done.group(2), done.group(3)) / 1000,
        rps=float(rps.group(1)),
        p50_ms=pct_ms("50"),
        p99_ms=pct_ms("99"),
        errors=errors,
    )


def wrk_argv(env: Env, subject: Subject, seconds: float) -> list[str]:
    load = [f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds:g}s", "--latency"]
    headers = [arg for name, value in subject.headers.items() for arg in ("-H", f"{name}: {value}")]
    return ["taskset", "-c", str(env.load_cpu), env.wrk, *load, *headers, subject.url]


def run_wrk(env: Env, subjects: Sequence[Subject], seconds: float) -> list[WrkResult]:
    """One wrk per subject, all running at once; usually there is just one."""
    procs = [
        subprocess.Popen(wrk_argv(env, s, seconds), stdout=PIPE, stderr=PIPE, text=True)
        for s in subjects
    ]
    try:
        outputs = [proc.communicate(timeout=seconds + 60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"wrk exited {proc.returncode}: {err.strip() or out.strip()}")
    return [parse_wrk(out) for out, _ in outputs]


def measure(env: Env, subjects: Sequence[Subject], seconds: float) -> list[Measurement]:
    """Load the subjects together for `seconds`; each one's CPU per completed request."""
    cores = {s.cpu(env) for s in subjects}
    core_before = {c: core_busy_seconds(c) for c in cores}
    wall_before = time.monotonic()
    cpu_before = [cpu_seconds(s.pids()) for s in subjects]
    wrk = run_wrk(env, subjects, seconds)
    cpu = [cpu_seconds(s.pids()) - before for s, before in zip(subjects, cpu_before, strict=True)]
    core = {c: core_busy_seconds(c) - core_before[c] for c in cores}
    wall = time.monotonic() - wall_before
    if any(w.requests == 0 for w in wrk):
        raise RuntimeError("wrk completed no requests")
    measured = {
        c: sum(t for s, t in zip(subjects, cpu, strict=True) if s.cpu(env) == c) for c in cores
    }
    return [
        Measurement(
            rps=w.rps,
            p50_ms=w.p50_ms,
            p99_ms=w.p99_ms,
            cpu_us=t / w.requests * 1e6,
            busy=t / wall,
            others=max(0.0, core[s.cpu(env)] - measured[s.cpu(env)]) / wall,
            errors=w.errors,
        )
        for s, w, t in zip(subjects, wrk, cpu, strict=True)
    ]


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True, slots=True)
class Ratio:
    """numerator ÷ denominator CPU µs/request; with a target, also measured side by side."""

    label: str
    numerator: str
    denominator: str
    target: float | None  # PASS when the ratio is <= target; None = for reference only
    show_added: bool = False  # also show (ratio - 1) x the denominator's µs: the µs added
    together: bool = False  # measured together even without a target (an experiment)

    @property
    def decides(self) -> bool:
        return self.target is not None

    @property
    def measured_together(self) -> bool:
        return self.decides or self.together


RATIOS = [
    Ratio("gateway ÷ aiohttp-min", "gateway", "aiohttp-min", 1.10),
    # The performance issue's headline: the whole protected path with the audit log at most
    # 1.25x the minimal aiohttp proxy (nginx and nginx + auth_request are shown beside it).
    Ratio("session-sqlite ÷ aiohttp-min", "session-sqlite", "aiohttp-min", 1.25, show_added=True),
    Ratio("gateway-10k-routes ÷ gateway-10-routes", "gateway-10k-routes", "gateway-10-routes", 1.1),
    # The authorization issue's: the whole protected path (session, policy, identity headers,
    # assertion) at most 1.3x the public route. The µs it adds are shown too; the identity
    # issue's targets for the session lookup alone (15 µs SQLite, 25 µs Redis) are decided by
    # bench/lookup.py (below the table), which measures the lookup without the rest.
    # And 1,000 routes of ten rules cost at most 10% over 10 routes.
    Ratio("session-sqlite ÷ gateway", "session-sqlite", "gateway", 1.30, show_added=True),
    Ratio("session-redis ÷ gateway", "session-redis", "gateway", 1.30, show_added=True),
    Ratio("policy-1000-routes ÷ policy-10-routes", "policy-1000-routes", "policy-10-routes", 1.10),
    # The audit issue's: the log (records built, written, fsynced, checkpoints signed) adds at
    # most 10% to the protected path.
    Ratio(
        "session-sqlite ÷ session-sqlite-no-audit",
        "session-sqlite",
        "session-sqlite-no-audit",
        1.10,
        show_added=True,
    ),
    # Where aiohttp's own cost is (bench/lean_proxy.py): its low-level server without the
    # Application, then also without ClientSession. No target: they measure an alternative.
    Ratio(
        "server-min ÷ aiohttp-min (experiment)", "server-min", "aiohttp-min", None, together=True
    ),
    Ratio("lean-min ÷ aiohttp-min (experiment)", "lean-min", "aiohttp-min", None, together=True),
    Ratio("nginx ÷ aiohttp-min (reference)", "nginx", "aiohttp-min", None),
    Ratio("gateway ÷ nginx (reference)", "gateway", "nginx", None),
    Ratio("forward-auth ÷ nginx (reference)", "forward-auth", "nginx", None),
    Ratio("forward-auth ÷ session-sqlite (reference)", "forward-auth", "session-sqlite", None),
    Ratio("forward-auth ÷ nginx-auth-min (reference)", "forward-auth", "nginx-auth-min", None),
]


@dataclass
class Results:
    rounds: int
    revocation: list[str] = field(default_factory=list)  # bench/revocation.py's report lines
    lookup: list[str] = field(default_factory=list)  # bench/lookup.py's report lines
    writer: list[str] = field(default_factory=list)  # bench/audit_writer.py's report lines
    extras: list[str] = field(default_factory=list)  # the EXTRAS scripts' tables
    apart: dict[str, list[Measurement | None]] = field(default_factory=dict)  # subject -> rounds
    together: dict[str, list[float | None]] = field(default_factory=dict)  # ratio label -> rounds


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start_subjects(env: Env, subjects: Sequence[Subject]) -> None:
    for subject in subjects:
        try:
            subject.start(env)
        except (OSError, StartError) as error:
            subject.error = f"did not start: {error}"
    for subject in subjects:
        if subject.error is None:
            try:
                subject.wait_ready()
                log(f"# {subject.name}: ready on {subject.url}")
            except (OSError, StartError) as error:
                subject.error = str(error)
        if subject.error:
            log(f"# {subject.name}: FAILED: {subject.error}")


def live(subjects: Sequence[Subject]) -> list[Subject]:
    for subject in subjects:
        if subject.error is None and not subject.alive():
            subject.error = f"exited during the run:\n{subject.log_tail()}"
            log(f"# {subject.name}: FAILED: {subject.error}")
    return [s for s in subjects if s.error is None]


def warm_up(env: Env, subjects: Sequence[Subject], seconds: float) -> None:
    for subject in live(subjects):
        try:
            run_wrk(env, [subject], seconds)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
            subject.error = f"warm-up failed: {error}"
            log(f"# {subject.name}: FAILED: {subject.error}")


def try_measure(
    env: Env, subjects: Sequence[Subject], seconds: float, what: str
) -> list[Measurement] | None:
    try:
        return measure(env, subjects, seconds)
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
        log(f"# {what}: measurement failed: {error}")
        return None


def measure_apart(
    env: Env, subjects: Sequence[Subject], seconds: float, when: str
) -> dict[str, Measurement]:
    found = {}
    for subject in live(subjects):
        ms = try_measure(env, [subject], seconds, f"{when} {subject.name}")
        if ms:
            m = found[subject.name] = ms[0]
            log(
                f"# {when} {subject.name:<20} {m.rps:>9,.0f} req/s  "
                f"p50 {m.p50_ms:6.2f} ms  p99 {m.p99_ms:6.2f} ms  {m.cpu_us:7.1f} CPU us/req  "
                f"busy {m.busy:4.0%}  others {m.others:4.0%}  errors {m.errors}"
            )
    return found


def measure_together(
    env: Env, subjects: Sequence[Subject], seconds: float, when: str
) -> dict[str, float]:
    """Each targeted ratio with both subjects loaded at once on the same core."""
    by_name = {s.name: s for s in live(subjects)}
    found: dict[str, float] = {}
    pairs: dict[tuple[str, str], str] = {}  # a pair already measured this round -> its label
    for ratio in RATIOS:
        numerator, denominator = by_name.get(ratio.numerator), by_name.get(ratio.denominator)
        if not ratio.measured_together or numerator is None or denominator is None:
            continue
        pair = (ratio.numerator, ratio.denominator)
        if pair in pairs:  # two targets on one pair (µs added, and a ratio): one measurement
            if pairs[pair] in found:
                found[ratio.label] = found[pairs[pair]]
            continue
        pairs[pair] = ratio.label
        ms = try_measure(env, [numerator, denominator], seconds, f"{when} {ratio.label}")
        if ms:
            value = found[ratio.label] = ms[0].cpu_us / ms[1].cpu_us
            log(
                f"# {when} together: {ratio.label} = {value:.3f} "
                f"({ms[0].cpu_us:.1f} / {ms[1].cpu_us:.1f} CPU us/req, "
                f"errors {ms[0].errors + ms[1].errors})"
            )
    return found


def run_rounds(env: Env, subjects: Sequence[Subject], rounds: int, seconds: float) -> Results:
    results = Results(rounds)
    results.apart = {s.name: [None] * rounds for s in subjects}
    results.together = {r.label: [None] * rounds for r in RATIOS if r.measured_together}
    for index in range(rounds):
        when = f"round {index + 1}/{rounds}"
        for name, m in measure_apart(env, subjects, seconds, when).items():
            results.apart[name][index] = m
        for label, value in measure_together(env, subjects, seconds, when).items():
            results.together[label][index] = value
    return results


# --------------------------------------------------------------------------- report


def spread(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    middle = format(statistics.median(values), fmt)
    if len(values) == 1:
        return middle
    return f"{middle} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def subject_row(subject: Subject, runs: list[Measurement | None]) -> str:
    done = [m for m in runs if m is not None]
    if not done:
        reason = (subject.error or "no measurement").splitlines()[0]
        return f"| {subject.name} | FAILED: {reason} | | | | | | |"
    cells = [
        spread([m.cpu_us for m in done], ".1f"),
        spread([m.rps for m in done], ",.0f"),
        spread([m.p50_ms for m in done], ".2f"),
        spread([m.p99_ms for m in done], ".2f"),
        spread([m.busy * 100 for m in done], ".0f"),
        spread([m.others * 100 for m in done], ".0f"),
        str(sum(m.errors for m in done)),
    ]
    return f"| {subject.name} | " + " | ".join(cells) + " |"


def results_table(subjects: Sequence[Subject], results: Results) -> str:
    head = [
        "| subject | CPU µs/request | requests/s | p50 ms | p99 ms | subject CPU % "
        "| others on its CPU % | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(head + [subject_row(s, results.apart[s.name]) for s in subjects])


def apart_ratios(ratio: Ratio, results: Results) -> list[float]:
    """numerator / denominator CPU µs/request from each round's separate measurements."""
    if ratio.numerator not in results.apart or ratio.denominator not in results.apart:
        return []
    pairs = zip(results.apart[ratio.numerator], results.apart[ratio.denominator], strict=True)
    return [a.cpu_us / b.cpu_us for a, b in pairs if a is not None and b is not None]


def ratio_cell(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return f"**{statistics.median(values):.3f}** (" + ", ".join(f"{v:.3f}" for v in values) + ")"


def ratio_row(ratio: Ratio, results: Results) -> str:
    together = [v for v in results.together.get(ratio.label, []) if v is not None]
    apart = apart_ratios(ratio, results)
    decisive = together or apart
    base = [m.cpu_us for m in results.apart.get(ratio.denominator, []) if m is not None]
    if not ratio.decides or not decisive:
        target, verdict = "-", "-" if decisive else "n/a (not measured)"
    else:
        assert ratio.target is not None
        target = f"≤ {ratio.target:.2f}"
        verdict = "PASS" if statistics.median(decisive) <= ratio.target else "FAIL"
    if ratio.show_added and decisive and base:
        added = (statistics.median(decisive) - 1) * statistics.median(base)
        verdict += f" (+{added:.1f} µs)"
    return (
        f"| {ratio.label} | {ratio_cell(together)} | {ratio_cell(apart)} | {target} | {verdict} |"
    )


def ratios_table(results: Results) -> str:
    head = [
        "| CPU µs/request ratio | together: median (each round) "
        "| apart: median (each round) | target | result |",
        "|---|---:|---:|---:|---|",
    ]
    return "\n".join(head + [ratio_row(r, results) for r in RATIOS])


def disturbed(env: Env, subjects: Sequence[Subject], results: Results) -> list[str]:
    """A warning naming measurements where other processes took a share of the core."""
    hits = [
        f"{s.name} round {i + 1} ({m.others:.0%})"
        for s in subjects
        if s.cpu(env) != env.load_cpu
        for i, m in enumerate(results.apart[s.name])
        if m is not None and m.others > DISTURBED
    ]
    if not hits:
        return []
    return [
        "",
        f"Warning: other processes took over {DISTURBED:.0%} of the subject's CPU in: "
        + ", ".join(hits)
        + ". Those figures are less reliable; rerun on a quiet machine.",
    ]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def stamp() -> str:
    """The date and the machine, for the tables of the scripts run.py includes."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}, {cpu_model()}, {os.cpu_count()} cores"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_lines(env: Env) -> list[str]:
    uvloop = package_version("uvloop")
    return [
        f"- nproc: {os.cpu_count()}; CPU: {cpu_model()}; kernel: {platform.release()}",
        f"- Python {platform.python_version()}, aiohttp {package_version('aiohttp')}, "
        f"uvloop {'used (' + uvloop + ')' if uvloop != 'not installed' else 'not installed'}",
        f"- {tool_version([env.nginx, '-v'])}; {tool_version([env.wrk, '--version'])}",
        f"- subjects pinned to CPU {env.subject_cpu}; "
        f"upstream nginx and wrk pinned to CPU {env.load_cpu}",
    ]


def display_command() -> str:
    def rel(path: str) -> str:
        with contextlib.suppress(ValueError):
            return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
        return path

    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


def report(
    env: Env, subjects: Sequence[Subject], results: Results, args: argparse.Namespace
) -> str:
    failed = [s for s in subjects if s.error]
    parts = [
        "# Benchmark results",
        "",
        f"Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"Command: `{display_command()}`",
        "",
        *machine_lines(env),
        "",
        f"Load: `wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{args.duration:g}s --latency`, "
        f"{args.rounds} interleaved round(s), {args.warmup:g} s warm-up per subject discarded. "
        "Each cell: median over rounds (min-max).",
        "",
        results_table(subjects, results),
        "",
        "Ratios of CPU µs/request. *Together*: both subjects loaded at the same time on the "
        "same core, one wrk each, a measurement of its own in every round; this cancels the "
        "drift of the machine and decides PASS/FAIL. *Apart*: from the table above, paired "
        "within each round.",
        "",
        ratios_table(results),
        "",
        "Subjects:",
        "",
        *[f"- `{s.name}`: {s.description}; `GET {s.path}`" for s in subjects],
    ]
    if results.lookup:
        parts += ["", *results.lookup]
    if results.writer:
        parts += ["", *results.writer]
    if results.revocation:
        parts += ["", *results.revocation]
    parts += results.extras
    parts += disturbed(env, subjects, results)
    if failed:
        parts += ["", "Failures:", ""]
        parts += [f"- `{s.name}`:\n\n```\n{s.error}\n```" for s in failed]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds per subject")
    parser.add_argument("--quick", action="store_true", help="1 round x 2 s (smoke test)")
    parser.add_argument("--only", help="comma-separated subject names to run")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="only the subjects' rounds: none of the scripts run after them (lookup, writer, ...)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2.0, 1.0
    return args


def choose_cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        log("# warning: one CPU only; subjects, upstream and wrk share it")
        return cpus[0], cpus[0]
    return cpus[0], cpus[1]


def select(subjects: list[Subject], only: str | None) -> list[Subject]:
    if not only:
        return subjects
    names = {n.strip() for n in only.split(",")}
    unknown = names - {s.name for s in subjects}
    if unknown:
        raise SystemExit(f"unknown subject(s): {', '.join(sorted(unknown))}")
    return [s for s in subjects if s.name in names]


def bench(env: Env, subjects: list[Subject], args: argparse.Namespace) -> Results:
    try:
        start_upstream(env)
    except (OSError, StartError) as error:
        raise SystemExit(f"upstream nginx did not start: {error}") from None
    log(f"# upstream: nginx on {env.upstream_url} (CPU {env.load_cpu})")
    start_subjects(env, subjects)
    warm_up(env, subjects, args.warmup)
    results = run_rounds(env, subjects, args.rounds, args.duration)
    if args.table_only:
        return results
    if any(s.name.startswith("session-") and not s.error for s in subjects):
        results.lookup = session_lookup(env)
        results.writer = audit_writer(env)
    if any(s.name == "session-redis" and not s.error for s in subjects):
        import revocation  # bench/revocation.py: two processes sharing Redis

        tmp = env.tmp / "revocation"
        tmp.mkdir()
        try:
            results.revocation = revocation.measure(tmp, env.upstream_url).lines()
        except Exception as error:  # run.StartError is another class than __main__.StartError
            results.revocation = [f"Revocation latency: not measured ({error!r})"]
    results.extras = extra_tables(env, subjects)
    return results


# Issue 8's figures beyond CPU per request, each a script printing its own table (with its
# baseline, spread, machine and date): (script, the subject whose run calls it, whether it
# runs pinned to the subject CPU; latency.py and workers.py start and pin their own processes).
EXTRAS = [
    ("latency.py", "session-sqlite", False),
    ("routes_load.py", "gateway-10k-routes", True),
    ("sessions_memory.py", "session-redis", True),
    ("workers.py", "session-redis", False),
]


def extra_tables(env: Env, subjects: Sequence[Subject]) -> list[str]:
    ran = {s.name for s in subjects if s.error is None}
    lines = []
    for script, when, pinned in EXTRAS:
        if when in ran:
            log(f"# {script}")
            lines += ["", *bench_script(env, script, pinned)]
    return lines


def bench_script(env: Env, script: str, pinned: bool) -> list[str]:
    """Run bench/<script> alone (run.py's subjects stay idle meanwhile); its stdout."""
    argv = [sys.executable, str(BENCH_DIR / script)]
    if pinned:
        argv = ["taskset", "-c", str(env.subject_cpu), *argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        tail = getattr(error, "stderr", None) or ""
        return [f"{script}: not measured ({error}) {tail.strip()[-500:]}"]
    return done.stdout.strip().splitlines()


def audit_writer(env: Env) -> list[str]:
    """bench/audit_writer.py alone on the subject CPU: the records/s the audit writer sustains."""
    argv = [
        "taskset",
        "-c",
        str(env.subject_cpu),
        sys.executable,
        str(BENCH_DIR / "audit_writer.py"),
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        return [f"Audit writer: not measured ({error})"]
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    return [
        "The audit writer alone (bench/audit_writer.py: access-like records submitted as fast as "
        "they are taken, one write and one fsync per batch, on the subject CPU):",
        "",
        *table,
    ]


def session_lookup(env: Env) -> list[str]:
    """bench/lookup.py alone on the subject CPU: the CPU of one session lookup, by store."""
    argv = ["taskset", "-c", str(env.subject_cpu), sys.executable, str(BENCH_DIR / "lookup.py")]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        return [f"Session lookup: not measured ({error})"]
    return [
        "The session lookup alone (bench/lookup.py: `caller.identify` on a request with the "
        "session cookie, in one process on the subject CPU, minus a loop building the same "
        "request; median of 5 rounds of 200,000):",
        "",
        *done.stdout.strip().splitlines(),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nginx, wrk = ensure_tools()
    subject_cpu, load_cpu = choose_cpus()
    subjects = select(build_subjects(), args.only)
    env = Env(nginx, wrk, Path(tempfile.mkdtemp(prefix="gateway-bench-")), subject_cpu, load_cpu)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below
    try:
        results = bench(env, subjects, args)
    except KeyboardInterrupt:
        log("# interrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        env.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if args.keep:
            log(f"# kept {env.tmp}")
        else:
            shutil.rmtree(env.tmp, ignore_errors=True)
    text = report(env, subjects, results, args)
    print(text)
    if args.write:
        (BENCH_DIR / "RESULTS.md").write_text(text)
        log(f"# wrote {BENCH_DIR / 'RESULTS.md'}")
    return 1 if any(s.error for s in subjects) else 0


if __name__ == "__main__":
    sys.exit(main())
