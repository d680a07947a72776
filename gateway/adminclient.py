"""A client of the admin API (SPEC §10, §11): what `gateway sessions …`, `users …` and
`review attest` run.

    sessions_command(admin, token, action, selection, env, as_json=False) -> str
        the text for stdout, or CallFailed (one line for stderr: what failed, and the status)
    users_command(admin, token, action, user, env) -> str      disable, enable, enroll-link,
                                                                reset-mfa
    review_command(admin, token, user, decision, note, env) -> str    POST /reviews
    AdminClient(admin, token, env)          async context manager; `.call(method, path)` -> JSON

The address is the config's `admin.listen` (a wildcard address becomes loopback), over https
when `admin.tls` is set. The server is then trusted by pinning: the certificate in the same
config's `admin.tls.cert_file` is the only trust anchor, so neither a CA nor a host name has to
match. With `admin.tls.client_ca_file` the client certificate and key are read from the files
named by GATEWAY_ADMIN_CLIENT_CERT and GATEWAY_ADMIN_CLIENT_KEY.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from gateway.settings import Admin, AdminTls

TIMEOUT = 30.0  # seconds for one call
CLIENT_CERT_ENV, CLIENT_KEY_ENV = "GATEWAY_ADMIN_CLIENT_CERT", "GATEWAY_ADMIN_CLIENT_KEY"
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_COLUMNS = (
    ("HANDLE", "handle"),
    ("USER", "user"),
    ("SUB", "sub"),
    ("CREATED", "created"),
    ("LAST ACTIVE", "last_active"),
)


class CallFailed(Exception):
    """A call did not succeed; `str()` is one line for stderr, `status` the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Selection:
    """Which sessions: of one user, one handle, or all (the default for `list`)."""

    user: str | None = None
    handle: str | None = None
    every: bool = False


def sessions_command(
    admin: Admin,
    token: str,
    action: str,
    selection: Selection,
    env: Mapping[str, str],
    as_json: bool = False,
) -> str:
    """Run `gateway sessions ACTION` against the running gateway; what to print."""
    return asyncio.run(_sessions_command(admin, token, action, selection, env, as_json))


async def _sessions_command(
    admin: Admin,
    token: str,
    action: str,
    selection: Selection,
    env: Mapping[str, str],
    as_json: bool,
) -> str:
    async with AdminClient(admin, token, env) as client:
        if action == "list":
            return await list_sessions(client, selection, as_json)
        return await revoke_sessions(client, selection)


def users_command(admin: Admin, token: str, action: str, user: str, env: Mapping[str, str]) -> str:
    """Run `gateway users ACTION USER` (disable, enable, enroll-link, reset-mfa); what to print."""
    return asyncio.run(_users_command(admin, token, action, user, env))


async def _users_command(
    admin: Admin, token: str, action: str, user: str, env: Mapping[str, str]
) -> str:
    async with AdminClient(admin, token, env) as client:
        answer = await client.call("POST", f"/users/{quote(user, safe='')}/{action}")
    if action == "enroll-link":
        return (
            f"{answer['link']}\n(single use, for {_shown(answer.get('user'))} only, "
            f"valid until {_shown(answer.get('expires'))} UTC)"
        )
    if action in ("disable", "enable"):
        done = "disabled" if action == "disable" else "enabled"
        ended = f"; ended {answer.get('ended', 0)} session(s)" if action == "disable" else ""
        return f"{done} {_shown(answer.get('user'))} ({_shown(answer.get('identity'))}){ended}"
    if answer.get("removed"):
        return f"removed the second factor of {_shown(answer.get('user'))}"
    return f"{_shown(answer.get('user'))} had no second factor"


def review_command(
    admin: Admin, token: str, user: str, decision: str, note: str, env: Mapping[str, str]
) -> str:
    """Run `gateway review attest` (POST /reviews); the one line to print."""
    return asyncio.run(_review_command(admin, token, user, decision, note, env))


async def _review_command(
    admin: Admin, token: str, user: str, decision: str, note: str, env: Mapping[str, str]
) -> str:
    body = {"user": user, "decision": decision, "note": note}
    async with AdminClient(admin, token, env) as client:
        answer = await client.call("POST", "/reviews", body)
    who = f"{_shown(answer.get('user'))} ({_shown(answer.get('identity'))})"
    done = (
        f"attested {_shown(answer.get('decision'))} for {who} as {_shown(answer.get('reviewer'))}"
    )
    if answer.get("disabled"):
        done += f"; disabled, ended {_count(answer.get('ended'))}"
    return f"{done}; policy {_shown(answer.get('policy_hash'))}"


class AdminClient:
    def __init__(self, admin: Admin, token: str, env: Mapping[str, str]) -> None:
        self.base = base_url(admin)
        self._token = token
        self._tls = client_tls(admin.tls, env) if admin.tls is not None else None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        connector = aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else True)
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
        )
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.close()

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One call; `path` is already percent-encoded, `body` sent as JSON. The JSON object
        answered, or CallFailed."""
        assert self._http is not None, "use AdminClient in 'async with'"
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = orjson.dumps(body)
        url = URL(self.base + path, encoded=True)  # sent as written: %2F in a USER stays one
        try:
            async with self._http.request(
                method, url, headers=headers, data=data, allow_redirects=False
            ) as response:
                return _answer(response.status, await response.read())
        except aiohttp.ClientSSLError as err:
            raise CallFailed(f"TLS with the admin API at {self.base} failed: {err}") from None
        except (aiohttp.ClientError, OSError) as err:
            raise CallFailed(f"cannot reach the admin API at {self.base}: {err}") from None
        except TimeoutError:
            raise CallFailed(
                f"the admin API at {self.base} gave no answer in {TIMEOUT:.0f}s"
            ) from None


def _answer(status: int, body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if 200 <= status < 300 and isinstance(data, dict):
        return data
    if status == 401:
        raise CallFailed("the admin API refused the token (401)", status)
    detail = _shown(data.get("detail")) if isinstance(data, dict) else ""
    if status == 403:
        raise CallFailed(f"the admin API refused this call (403): {detail}", status)
    raise CallFailed(f"{detail or 'the admin API gave an unreadable answer'} ({status})", status)


def base_url(admin: Admin) -> str:
    listen = admin.listen
    if listen.port == 0:
        raise CallFailed("admin.listen has port 0, so the gateway's admin port cannot be known")
    host = ("::1" if ":" in listen.host else "127.0.0.1") if listen.any_address else listen.host
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if admin.tls is not None else 'http'}://{host}:{listen.port}"


def client_tls(tls: AdminTls, env: Mapping[str, str]) -> ssl.SSLContext:
    """Trust exactly the admin listener's own certificate; add a client certificate if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # SECURITY: the leaf certificate from the config is the only trust anchor (pinning), so a
    # certificate any CA issued for another server is refused; no host name is involved then.
    context.check_hostname = False
    context.load_verify_locations(cadata=_leaf_pem(tls))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    cert, key = env.get(CLIENT_CERT_ENV), env.get(CLIENT_KEY_ENV)
    if cert:
        try:
            context.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as err:
            raise CallFailed(f"cannot use the client certificate {cert}: {err}") from None
    elif tls.client_ca_file is not None:
        raise CallFailed(f"the admin API wants a client certificate: set {CLIENT_CERT_ENV}")
    return context


def _leaf_pem(tls: AdminTls) -> str:
    try:
        found = _PEM_CERT.search(tls.cert_file.read_text(encoding="ascii", errors="replace"))
    except OSError as err:
        raise CallFailed(f"cannot read admin.tls.cert_file {tls.cert_file}: {err}") from None
    if found is None:
        raise CallFailed(f"admin.tls.cert_file {tls.cert_file} holds no PEM certificate")
    return found[0]


# -- the commands ------------------------------------------------------------------------------


async def list_sessions(client: AdminClient, selection: Selection, as_json: bool) -> str:
    query = f"?user={quote(selection.user, safe='')}" if selection.user is not None else ""
    rows = _rows(await client.call("GET", "/sessions" + query))
    if selection.handle is not None:
        rows = [row for row in rows if row.get("handle") == selection.handle]
    if as_json:
        return orjson.dumps({"sessions": rows}, option=orjson.OPT_INDENT_2).decode()
    return table(rows)


async def revoke_sessions(client: AdminClient, selection: Selection) -> str:
    if selection.user is not None:
        answer = await client.call("POST", f"/users/{quote(selection.user, safe='')}/revoke")
        return f"ended {_count(answer.get('revoked'))} of {_shown(selection.user)}"
    if selection.handle is not None:
        answer = await client.call("DELETE", f"/sessions/{quote(selection.handle, safe='')}")
        return f"ended session {_shown(answer.get('handle'))} of {_shown(answer.get('user'))}"
    return f"ended {_count(await _revoke_every(client))}"


async def _revoke_every(client: AdminClient) -> int:
    ended = 0
    for row in _rows(await client.call("GET", "/sessions")):
        try:
            await client.call("DELETE", f"/sessions/{quote(str(row.get('handle')), safe='')}")
        except CallFailed as failed:
            if failed.status != 404:  # 404: it ended meanwhile, which is what we want
                raise
            continue
        ended += 1
    return ended


def table(rows: list[dict[str, Any]]) -> str:
    """Sessions as aligned columns, for people; --json is for programs."""
    if not rows:
        return "no sessions"
    cells = [[title for title, _ in _COLUMNS]]
    cells += [[_shown(row.get(key)) for _, key in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells)
    return "\n".join(line.rstrip() for line in lines)


def _rows(answer: dict[str, Any]) -> list[dict[str, Any]]:
    rows = answer.get("sessions")
    if not isinstance(rows, list):
        raise CallFailed("the admin API gave an unreadable answer (no session list)")
    return [row for row in rows if isinstance(row, dict)]


def _count(value: object) -> str:
    n = value if isinstance(value, int) else 0
    return f"{n} session{'' if n == 1 else 's'}"


def _shown(value: object) -> str:
    # SECURITY: names come from the IdP and errors from the network; escape sequences in them
    # must not reach the operator's terminal.
    text = "" if value is None else str(value)
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:300]
