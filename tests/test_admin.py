"""The admin API over real HTTP, and `gateway sessions` as a real process using it (SPEC §10, §11).

A gateway with the dev IdP (as in test_login) and an `admin:` section: three tokens, one per role.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import trustme
import yaml

from gateway.admin import AdminApi, TokensFileError, parse_tokens, read_tokens
from gateway.devidp import DevClient, DevIdP, DevUser
from gateway.server import listen
from gateway.settings import load_settings
from tests.conftest import REPO, assertion_key, echo_app, gateway_config, start_server
from tests.test_login import HTML, SECRET, Clock, Env, _Events, config, free_port, signed_in

TOKENS = {"read": "auditor-token-1", "operate": "ops-token-2", "admin": "root-token-3"}
NAMES = {"read": "auditor", "operate": "ops", "admin": "root"}


def tokens_file(path: Path, tokens: dict[str, str] = TOKENS) -> Path:
    lines = ["# name:role:sha256", ""]
    for role, token in tokens.items():
        lines.append(f"{NAMES[role]}:{role}:{hashlib.sha256(token.encode()).hexdigest()}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class AdminEnv:
    env: Env
    admin: str  # http://127.0.0.1:PORT of the admin listener
    config: Path
    tokens: Path

    async def call(
        self, method: str, path: str, role: str | None = "admin", token: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token or TOKENS[role]}"} if role or token else {}
        async with (
            aiohttp.ClientSession() as client,
            client.request(method, self.admin + path, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    def admin_events(self) -> list[dict[str, Any]]:
        return [e for e in self.env.events if str(e.get("event", "")).startswith("admin.")]


@pytest.fixture
async def admin_env(tmp_path: Path, store: str) -> AsyncIterator[AdminEnv]:
    """A running gateway with the admin API, on each session store (memory, SQLite, Redis)."""
    clock, port, admin_port = Clock(), free_port(), free_port()
    users = {
        "alice": DevUser("alice", "alice-pw", groups=("sre",)),
        "bob": DevUser("bob", "bob-pw", groups=("finance",)),
        # another identity whose user_claim value differs from alice's only in case
        "alice2": DevUser("alice2", "alice2-pw", email="Alice@example.org", groups=("sre",)),
    }
    client = DevClient(
        "gateway", SECRET, redirect_uris=(f"http://127.0.0.1:{port}/.gateway/callback",)
    )
    idp = DevIdP(users, [client], clock=clock)
    issuer = await idp.start()
    upstream = await start_server(echo_app())
    tokens = tokens_file(tmp_path / "admin-tokens")
    settings = config(port, issuer, upstream.url, tmp_path)
    settings["admin"] = {"listen": f"127.0.0.1:{admin_port}", "tokens_file": str(tokens)}
    settings["state"]["sessions"] = store
    if store.startswith("redis"):
        settings["assertion"] = {"signing_key_file": str(assertion_key(tmp_path))}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    events: list[dict[str, Any]] = []
    handler, event_log = _Events(events), logging.getLogger("gateway.events")
    event_log.addHandler(handler)
    level = event_log.level
    event_log.setLevel(logging.INFO)
    gateway = await listen(load_settings(path), shutdown_timeout=2, clock=clock)
    base = f"http://127.0.0.1:{port}"
    env = Env(gateway, idp, upstream, clock, base, f"http://localhost:{port}", events)
    yield AdminEnv(env, f"http://127.0.0.1:{admin_port}", path, tokens)
    for browser in env.browsers:
        await browser.close()
    event_log.removeHandler(handler)
    event_log.setLevel(level)
    await gateway.stop()
    await upstream.runner.cleanup()
    await idp.stop()


async def sent_to_login(env: Env, browser: aiohttp.ClientSession) -> bool:
    resp = await browser.get(env.base + "/app/x", headers=HTML, allow_redirects=False)
    return resp.status == 302 and "/.gateway/login" in resp.headers["Location"]


async def gateway_cli(
    *args: str, token: str | None = TOKENS["operate"], **env: str
) -> tuple[int, str, str]:
    """`python -m gateway ARGS` as a real process (without blocking the in-process gateway)."""
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"} | env
    if token is not None:
        environ["GATEWAY_ADMIN_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        cwd=REPO,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- tokens and roles --------------------------------------------------------------------------


async def test_no_token_or_a_wrong_one_gets_401_and_an_event(admin_env: AdminEnv) -> None:
    status, body = await admin_env.call("GET", "/sessions", role=None)
    assert status == 401 and body["reason"] == "no-token" and body["request_id"]
    status, body = await admin_env.call("GET", "/sessions", token="not-a-token")
    assert status == 401 and body["reason"] == "bad-token"
    async with aiohttp.ClientSession() as client:
        resp = await client.get(admin_env.admin + "/no-such-thing")
        assert resp.status == 401  # no token: not even which paths exist is told
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway-admin"'
    refused = admin_env.admin_events()
    assert [e["event"] for e in refused] == ["admin.sessions_listed"] * 2 + ["admin.request"]
    for event in refused:
        assert (event["actor"], event["outcome"], event["status"]) == ("anonymous", "refused", 401)
        assert event["method"] == "GET" and event["path"] in ("/sessions", "/no-such-thing")
    assert [e["reason"] for e in refused] == ["no-token", "bad-token", "no-token"]


async def test_a_read_token_cannot_end_sessions(admin_env: AdminEnv) -> None:
    status, body = await admin_env.call("DELETE", "/sessions/0123456789abcdef", role="read")
    assert status == 403 and body["reason"] == "insufficient-role"
    status, _ = await admin_env.call("POST", "/users/alice@example.org/revoke", role="read")
    assert status == 403
    [first, _] = admin_env.admin_events()
    assert first["event"] == "admin.session_ended"
    assert (first["actor"], first["role"], first["outcome"]) == ("auditor", "read", "refused")


async def test_health_and_readiness_need_a_read_token(admin_env: AdminEnv) -> None:
    assert (await admin_env.call("GET", "/healthz", role=None))[0] == 401
    status, body = await admin_env.call("GET", "/healthz", role="read")
    assert (status, body["status"]) == (200, "ok")
    status, body = await admin_env.call("GET", "/readyz", role="read")
    assert status == 200 and body["checks"]["session_store"] == "ok"


async def test_unknown_endpoints_and_methods(admin_env: AdminEnv) -> None:
    status, body = await admin_env.call("GET", "/nothing-here")
    assert (status, body["reason"]) == (404, "no-endpoint")
    status, body = await admin_env.call("PUT", "/sessions")
    assert (status, body["reason"]) == (405, "method-not-allowed")


async def test_the_admin_api_is_not_on_the_public_port(admin_env: AdminEnv) -> None:
    headers = {"Authorization": f"Bearer {TOKENS['admin']}", "Accept": "application/json"}
    async with aiohttp.ClientSession() as client:
        resp = await client.get(admin_env.env.base + "/sessions", headers=headers)
        assert resp.status == 404
        assert (await resp.json())["reason"] == "no-route"


async def test_tokens_are_reread_on_reload(admin_env: AdminEnv) -> None:
    admin = admin_env.env.gateway.admin
    assert admin is not None
    tokens_file(admin_env.tokens, {"read": "a-brand-new-token"})
    assert await admin.reload_tokens() == 1
    assert (await admin_env.call("GET", "/sessions", role="read"))[0] == 401
    assert (await admin_env.call("GET", "/sessions", token="a-brand-new-token"))[0] == 200
    admin_env.tokens.write_text("broken line\n")
    with pytest.raises(TokensFileError, match=r"admin-tokens:1: "):
        await admin.reload_tokens()
    assert (await admin_env.call("GET", "/sessions", token="a-brand-new-token"))[0] == 200


# -- sessions ----------------------------------------------------------------------------------


async def test_a_signed_in_user_is_listed_without_secrets(admin_env: AdminEnv) -> None:
    env = admin_env.env
    browser = await signed_in(env)
    status, body = await admin_env.call("GET", "/sessions", role="read")
    assert status == 200
    [row] = body["sessions"]
    assert set(row) == {"handle", "user", "iss", "sub", "created", "last_active"}
    assert row["user"] == "alice@example.org" and row["iss"] == env.idp.issuer
    cookie = next(c.value for c in browser.cookie_jar if c.key == "gateway")
    assert cookie not in str(body)
    for user in ("alice@example.org", "ALICE@EXAMPLE.ORG", f"{row['iss']}|{row['sub']}"):
        status, body = await admin_env.call("GET", f"/sessions?user={quote(user, safe='')}")
        assert [r["handle"] for r in body["sessions"]] == [row["handle"]], user
    _, body = await admin_env.call("GET", "/sessions?user=bob%40example.org")
    assert body["sessions"] == []
    listed = [e for e in admin_env.admin_events() if e["event"] == "admin.sessions_listed"]
    assert listed[0]["actor"] == "auditor" and listed[0]["count"] == 1


async def test_deleting_a_session_ends_it(admin_env: AdminEnv) -> None:
    env = admin_env.env
    alice, bob = await signed_in(env), await signed_in(env, user="bob")
    _, body = await admin_env.call("GET", "/sessions?user=alice%40example.org")
    handle = body["sessions"][0]["handle"]
    status, body = await admin_env.call("DELETE", f"/sessions/{handle}", role="operate")
    assert (status, body) == (200, {"handle": handle, "user": "alice@example.org"})
    assert await sent_to_login(env, alice)
    assert not await sent_to_login(env, bob)
    [ended] = env.events_of("session.ended")
    assert (ended["actor"], ended["session"]) == ("ops", handle)
    status, body = await admin_env.call("DELETE", f"/sessions/{handle}", role="operate")
    assert (status, body["reason"]) == (404, "unknown-session")
    done = [e for e in admin_env.admin_events() if e["event"] == "admin.session_ended"]
    assert [(e["outcome"], e["subject"]) for e in done] == [("ok", handle), ("failed", handle)]


async def test_revoking_a_user_ends_all_their_sessions_and_no_one_elses(
    admin_env: AdminEnv,
) -> None:
    env = admin_env.env
    alices = [await signed_in(env), await signed_in(env)]
    bob = await signed_in(env, user="bob")
    status, body = await admin_env.call("POST", "/users/alice@example.org/revoke", "operate")
    assert (status, body) == (200, {"user": "alice@example.org", "revoked": 2})
    for browser in alices:
        assert await sent_to_login(env, browser)
    assert not await sent_to_login(env, bob)
    [event] = [e for e in admin_env.admin_events() if e["event"] == "admin.user_revoked"]
    assert (event["actor"], event["subject"], event["count"]) == ("ops", "alice@example.org", 2)
    _, body = await admin_env.call("POST", "/users/alice@example.org/revoke", "operate")
    assert body["revoked"] == 0


async def test_a_user_is_revoked_by_iss_and_sub(admin_env: AdminEnv) -> None:
    env = admin_env.env
    alice = await signed_in(env)
    _, body = await admin_env.call("GET", "/sessions")
    identity = f"{body['sessions'][0]['iss']}|{body['sessions'][0]['sub']}"
    status, body = await admin_env.call("POST", f"/users/{quote(identity, safe='')}/revoke")
    assert (status, body["revoked"]) == (200, 1)
    assert await sent_to_login(env, alice)


async def test_an_ambiguous_user_is_refused(admin_env: AdminEnv) -> None:
    env = admin_env.env
    alice, alice2 = await signed_in(env), await signed_in(env, user="alice2")
    status, body = await admin_env.call("POST", "/users/alice@example.org/revoke", "operate")
    assert (status, body["reason"]) == (409, "ambiguous-user")
    assert "2 identities" in body["detail"] and "ISS|SUB" in body["detail"]
    assert (await admin_env.call("GET", "/sessions?user=alice%40example.org"))[0] == 409
    assert not await sent_to_login(env, alice)
    assert not await sent_to_login(env, alice2)
    assert env.events_of("session.ended") == []


# -- the command line --------------------------------------------------------------------------


async def test_cli_lists_and_revokes_through_the_running_gateway(admin_env: AdminEnv) -> None:
    env, config_file = admin_env.env, str(admin_env.config)
    alice, bob = await signed_in(env), await signed_in(env, user="bob")
    code, out, err = await gateway_cli("sessions", "list", "-c", config_file, token=TOKENS["read"])
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["HANDLE", "USER", "SUB", "CREATED", "LAST", "ACTIVE"]
    assert sorted(row.split()[1] for row in rows) == ["alice@example.org", "bob@example.org"]
    assert len({row.index(row.split()[1]) for row in rows}) == 1  # aligned columns
    code, out, _ = await gateway_cli("sessions", "list", "-c", config_file, "--json")
    assert code == 0 and len(yaml.safe_load(out)["sessions"]) == 2
    revoke = ("sessions", "revoke", "--user", "alice@example.org", "-c", config_file)
    code, out, err = await gateway_cli(*revoke)
    assert (code, out.strip()) == (0, "ended 1 session of alice@example.org"), err
    assert await sent_to_login(env, alice)
    assert not await sent_to_login(env, bob)
    [event] = [e for e in admin_env.admin_events() if e["event"] == "admin.user_revoked"]
    assert event["actor"] == "ops"
    code, out, err = await gateway_cli("sessions", "revoke", "--all", "-c", config_file)
    assert (code, out.strip()) == (0, "ended 1 session"), err
    assert await sent_to_login(env, bob)


async def test_cli_revokes_one_session_by_its_handle(admin_env: AdminEnv) -> None:
    env, config_file = admin_env.env, str(admin_env.config)
    alice = await signed_in(env)
    _, body = await admin_env.call("GET", "/sessions")
    handle = body["sessions"][0]["handle"]
    code, out, err = await gateway_cli("sessions", "revoke", "--id", handle, "-c", config_file)
    assert (code, out.strip()) == (0, f"ended session {handle} of alice@example.org"), err
    assert await sent_to_login(env, alice)


@pytest.mark.parametrize(
    ("args", "token", "status", "message"),
    [
        (["revoke"], TOKENS["operate"], 2, "needs --user U, --id HANDLE or --all"),
        (["revoke", "--user", "a", "--id", "b"], TOKENS["operate"], 2, "not allowed with"),
        (["list"], None, 2, "set GATEWAY_ADMIN_TOKEN"),
        (["list"], "wrong-token", 1, "the admin API refused the token (401)"),
        (["revoke", "--all"], TOKENS["read"], 1, "refused this call (403)"),
        (["revoke", "--id", "0123456789abcdef"], TOKENS["operate"], 1, "(404)"),
    ],
)
async def test_cli_errors_are_one_line(
    admin_env: AdminEnv, args: list[str], token: str | None, status: int, message: str
) -> None:
    if args == ["revoke", "--all"]:
        await signed_in(admin_env.env)  # something to refuse
    code, _, err = await gateway_cli("sessions", *args, "-c", str(admin_env.config), token=token)
    assert code == status
    assert len(err.strip().splitlines()) == 1 and err.startswith("gateway: "), err
    assert message in err and "Traceback" not in err


async def test_cli_without_a_running_gateway_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    admin = {"listen": f"127.0.0.1:{free_port()}", "tokens_file": str(tokens_file(tmp_path / "t"))}
    routes = [{"id": "app", "path": "/", "upstream": "http://127.0.0.1:9", "public": True}]
    path.write_text(yaml.safe_dump(gateway_config(routes, admin=admin)))
    code, _, err = await gateway_cli("sessions", "list", "-c", str(path))
    assert code == 1 and err.startswith("gateway: cannot reach the admin API at http://127.0.0.1:")
    assert len(err.strip().splitlines()) == 1


# -- the tokens file ---------------------------------------------------------------------------


def test_tokens_file_format() -> None:
    digest = hashlib.sha256(b"t").hexdigest()
    text = (
        f"# comment\n\nops:operate:{digest}  # trailing comment\nro:read:{digest.upper()[:-1]}0\n"
    )
    ops, ro = parse_tokens(text, "tokens")
    assert (ops.name, ops.role, ops.digest) == ("ops", "operate", hashlib.sha256(b"t").digest())
    assert (ro.name, ro.role) == ("ro", "read")
    assert "digest" not in repr(ops) and digest not in repr(ops)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("just-a-token-pasted-here", "expected name:role:sha256-of-token"),
        ("ops:operate", "expected name:role:sha256-of-token"),
        ("ops:superuser:" + "a" * 64, "must be read, operate or admin"),
        ("ops:read:s3cret-token", "64 hex digits"),
        ("bad name:read:" + "a" * 64, "bad token name"),
    ],
)
def test_a_malformed_tokens_line_names_file_and_line(line: str, message: str) -> None:
    with pytest.raises(TokensFileError) as raised:
        parse_tokens(f"# tokens\n{line}\n", "/etc/gateway/admin-tokens")
    assert str(raised.value).startswith("/etc/gateway/admin-tokens:2: ")
    assert message in str(raised.value)
    assert "s3cret" not in str(raised.value)  # a token pasted by mistake is never echoed


def test_duplicate_names_and_hashes_are_refused() -> None:
    one, two = hashlib.sha256(b"1").hexdigest(), hashlib.sha256(b"2").hexdigest()
    with pytest.raises(TokensFileError, match="used more than once"):
        parse_tokens(f"a:read:{one}\na:admin:{two}\n", "f")
    with pytest.raises(TokensFileError, match="same token hash"):
        parse_tokens(f"a:read:{one}\nb:admin:{one}\n", "f")


def test_an_unreadable_tokens_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokensFileError, match="cannot read the admin tokens file"):
        read_tokens(tmp_path / "absent")


async def test_a_bad_tokens_file_stops_start_up(tmp_path: Path) -> None:
    tokens = tmp_path / "admin-tokens"
    tokens.write_text("ops:operate:not-a-hash\n")
    admin = {"listen": f"127.0.0.1:{free_port()}", "tokens_file": str(tokens)}
    routes = [{"id": "app", "path": "/", "upstream": "http://127.0.0.1:9", "public": True}]
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway_config(routes, admin=admin)))
    with pytest.raises(TokensFileError, match=r"admin-tokens:1: "):
        await AdminApi.open(load_settings(path))
    code, _, err = await gateway_cli("run", "-c", str(path))
    [message] = [line for line in err.splitlines() if not line.startswith("{")]  # not the log
    assert code == 2 and message.startswith(f"gateway: {tokens}:1: "), err
    assert "Traceback" not in err


# -- TLS ---------------------------------------------------------------------------------------


async def test_admin_tls_with_client_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("gateway-admin.test")  # not 127.0.0.1: the CLI pins, not names
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "admin.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "admin-key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    client = ca.issue_cert("ops@example.org")
    client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    admin = {
        "listen": f"127.0.0.1:{free_port()}",
        "tokens_file": str(tokens_file(tmp_path / "tokens")),
        "tls": {
            "cert_file": "admin.pem",
            "key_file": "admin-key.pem",
            "client_ca_file": "client-ca.pem",
        },
    }
    routes = [{"id": "app", "path": "/", "upstream": "http://127.0.0.1:9", "public": True}]
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway_config(routes, admin=admin)))
    listening = await listen(load_settings(path), shutdown_timeout=2)
    try:
        cert = {"GATEWAY_ADMIN_CLIENT_CERT": str(tmp_path / "client.pem")}
        code, out, err = await gateway_cli("sessions", "list", "-c", str(path), **cert)
        assert (code, out.strip()) == (0, "no sessions"), err
        code, _, err = await gateway_cli("sessions", "list", "-c", str(path))
        assert code == 1 and "client certificate" in err
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        trusting.check_hostname = False
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):  # no client certificate: no handshake
                await plain.get(
                    f"https://{admin['listen']}/healthz",
                    ssl=trusting,
                    headers={"Authorization": f"Bearer {TOKENS['read']}"},
                )
    finally:
        await listening.stop()
