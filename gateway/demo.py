"""`gateway demo`: the dev IdP, a "whoami" app and the gateway in one process, on loopback.

    whoami   an upstream that shows the request it received (HTML, or JSON for
             Accept: application/json; a WebSocket gets the same JSON, then an echo)
    dev IdP  gateway.devidp with the users of config/devidp-users.yaml and one client,
             "gateway", registered with the gateway's callback, post-logout and
             back-channel logout addresses
    gateway  config/demo.yaml with the addresses, a client secret, a state key and a
             temp dir (SQLite state, audit) filled in at start: see that file's header

Everything listens on 127.0.0.1 only. Ports default to 8080 (gateway), 8090 (IdP)
and 8091 (whoami); port 0 picks a free one. It prints the addresses and the demo
users, serves until SIGINT or SIGTERM, then stops all three and removes its temp
dir. A port already taken is one line on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import orjson
import yaml
from aiohttp import WSMsgType, web

from gateway.configfile import ConfigError
from gateway.devidp import DevClient, DevIdP, DevUser, load_users
from gateway.server import listen, new_event_loop
from gateway.settings import Settings, load_settings

HOST = "127.0.0.1"
GATEWAY_PORT, IDP_PORT, WHOAMI_PORT = 8080, 8090, 8091
IDP_PATH = "/idp"  # the issuer is http://127.0.0.1:PORT/idp
_CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = _CHECKOUT / "config" / "demo.yaml"
DEFAULT_USERS = _CHECKOUT / "config" / "devidp-users.yaml"
EXIT_CANNOT_SERVE, EXIT_USAGE = 1, 2

log = logging.getLogger("gateway.demo")


class DemoError(Exception):
    """Why the demo cannot run, as one line for stderr; `status` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_CANNOT_SERVE) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Options:
    """What `gateway demo` was asked for; a port of None takes its default (0 if port is 0)."""

    config: Path = DEFAULT_CONFIG
    users: Path = DEFAULT_USERS
    port: int = GATEWAY_PORT
    idp_port: int | None = None
    whoami_port: int | None = None

    def port_of(self, given: int | None, default: int) -> int:
        if given is not None:
            return given
        return 0 if self.port == 0 else default


@dataclass(frozen=True, slots=True)
class Running:
    """The three started servers' addresses, the demo users and the temp dir."""

    gateway: str
    idp: str
    whoami: str
    state_dir: Path
    users: tuple[DevUser, ...]


# -- the whoami upstream -------------------------------------------------------------------------

# The headers the gateway sets on the way upstream (Host: the upstream's own), marked on the page.
_FROM_GATEWAY = frozenset(
    {"host", "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
)
_WHOAMI_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; "
        "frame-ancestors 'none'; base-uri 'none'; object-src 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def seen_request(request: web.BaseRequest) -> dict[str, Any]:
    """What the whoami app shows: the request line and every header, as received."""
    version = f"HTTP/{request.version.major}.{request.version.minor}"
    return {
        "request_line": f"{request.method} {request.raw_path} {version}",
        "method": request.method,
        "path": request.raw_path,
        "version": version,
        "remote": request.remote,
        "headers": [[name, value] for name, value in request.headers.items()],
    }


def _wants_json(request: web.BaseRequest) -> bool:
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


def _whoami_page(seen: Mapping[str, Any]) -> str:
    e = html.escape
    rows = []
    for name, value in seen["headers"]:
        mark = ' class="gw"' if name.lower() in _FROM_GATEWAY else ""
        rows.append(f"<tr{mark}><th>{e(name)}</th><td>{e(value)}</td></tr>")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>whoami · access-gateway demo</title>
<style>
  body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 56rem; margin: 2.5rem auto;
         padding: 0 1rem; color: #1f2328; }}
  h1 {{ font-size: 1.4rem; margin-bottom: .25rem; }}
  .note {{ color: #57606a; margin-top: 0; }}
  code, td, th {{ font-family: ui-monospace, monospace; font-size: .9rem; }}
  .line {{ background: #f6f8fa; padding: .5rem .75rem; border-radius: 4px; display: block;
          overflow-wrap: anywhere; }}
  table {{ border-collapse: collapse; width: 100%; margin-top: .5rem; }}
  th, td {{ text-align: left; vertical-align: top; padding: .3rem .5rem;
           border-bottom: 1px solid #d0d7de; overflow-wrap: anywhere; }}
  th {{ white-space: nowrap; font-weight: 600; width: 1%; }}
  tr.gw {{ background: #ddf4ff; }}
  .key {{ background: #ddf4ff; padding: 0 .3rem; }}
  nav a {{ margin-right: 1rem; }}
</style>
</head>
<body>
<main>
  <h1>whoami</h1>
  <p class="note">The demo's upstream app. This is the request exactly as it arrived here,
  from the gateway. <span class="key">Blue rows</span> are headers the gateway set; its own
  session cookie never reaches the app.</p>
  <h2>Request line</h2>
  <code class="line">{e(seen["request_line"])}</code>
  <h2>Headers ({len(seen["headers"])})</h2>
  <table>
{chr(10).join(rows)}
  </table>
  <h2>Try</h2>
  <nav>
    <a href="/public">/public (no login)</a>
    <a href="/.gateway/sessions">/.gateway/sessions</a>
    <a href="/.gateway/logout">/.gateway/logout</a>
  </nav>
  <p class="note">The same as JSON: send <code>Accept: application/json</code>.</p>
</main>
</body>
</html>
"""


async def _whoami(request: web.Request) -> web.StreamResponse:
    seen = seen_request(request)
    if request.headers.get("Upgrade", "").lower() == "websocket":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(orjson.dumps(seen))  # what the WebSocket handshake looked like
        async for message in ws:  # then an echo
            if message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws
    if _wants_json(request):
        return web.Response(
            body=orjson.dumps(seen, option=orjson.OPT_INDENT_2) + b"\n",
            content_type="application/json",
            headers=_WHOAMI_HEADERS,
        )
    return web.Response(text=_whoami_page(seen), content_type="text/html", headers=_WHOAMI_HEADERS)


def whoami_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _whoami)
    return app


# -- the gateway's config ------------------------------------------------------------------------


def gateway_client(gateway_url: str, secret: str) -> DevClient:
    """The dev IdP's registration of the gateway."""
    return DevClient(
        "gateway",
        secret,
        redirect_uris=(f"{gateway_url}/.gateway/callback",),
        post_logout_redirect_uris=(f"{gateway_url}/",),
        backchannel_logout_uri=f"{gateway_url}/.gateway/backchannel-logout",
    )


def demo_config(
    shipped: Mapping[str, Any],
    *,
    gateway_url: str,
    issuer: str,
    whoami_url: str,
    client_secret: str,
    state_dir: Path,
) -> dict[str, Any]:
    """config/demo.yaml with the running demo's addresses, secrets and temp dir filled in."""
    config = {k: dict(v) if isinstance(v, Mapping) else v for k, v in shipped.items()}
    listen_at = urlsplit(gateway_url).netloc
    config["server"] = {**config.get("server", {}), "listen": listen_at, "public_url": gateway_url}
    config["identity"] = {
        **config.get("identity", {}),
        "issuer": issuer,
        "client_secret": client_secret,
    }
    config["identity"].pop("client_secret_file", None)
    state_db = f"sqlite:///{state_dir / 'state.db'}"
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    config["state"] = {"sessions": state_db, "records": state_db, "keys": [key]}
    config["audit"] = {**config.get("audit", {}), "dir": str(state_dir / "audit")}
    routes = config.get("routes") or []
    config["routes"] = [_to_whoami(route, whoami_url) for route in routes]
    return config


def _to_whoami(route: Any, whoami_url: str) -> Any:
    """A route whose upstream is the shipped whoami address points at the running whoami."""
    if not isinstance(route, Mapping) or not isinstance(route.get("upstream"), str):
        return route
    upstream = urlsplit(route["upstream"])
    try:
        place = (upstream.hostname, upstream.port)
    except ValueError:
        return route
    if upstream.scheme != "http" or place != (HOST, WHOAMI_PORT):
        return route
    actual = urlsplit(whoami_url)
    target = urlunsplit(("http", actual.netloc, upstream.path, upstream.query, ""))
    return {**route, "upstream": target}


def _read_config(path: Path) -> dict[str, Any]:
    """The shipped file, checked as `gateway check-config` would, then as plain data."""
    try:
        load_settings(path)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except ConfigError as err:
        raise DemoError(str(err), EXIT_USAGE) from err
    except (OSError, yaml.YAMLError) as err:
        raise DemoError(f"gateway demo: cannot read {path}: {err}", EXIT_USAGE) from err
    if not isinstance(data, dict):
        raise DemoError(f"gateway demo: {path} is not a mapping", EXIT_USAGE)
    return data


def _load_users(path: Path) -> dict[str, DevUser]:
    try:
        return load_users(path)
    except ConfigError as err:
        raise DemoError(str(err), EXIT_USAGE) from err


# -- running -------------------------------------------------------------------------------------


def _url(port: int) -> str:
    return f"http://{HOST}:{port}"


def _free_port() -> int:
    """A port free right now: the gateway's and the IdP's are in each other's settings."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _cannot_listen(what: str, port: int, flag: str, err: OSError) -> DemoError:
    reason = (err.strerror or str(err)).lower()
    return DemoError(
        f"gateway demo: the {what} cannot listen on {HOST}:{port}: {reason} "
        f"(choose another port with {flag}, or 0 for a free one)"
    )


def _check_free(what: str, port: int, flag: str) -> None:
    """Refuse a taken port before anything starts (port 0 is always free)."""
    if port == 0:
        return
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind((HOST, port))
        except OSError as err:
            raise _cannot_listen(what, port, flag, err) from err


async def _start_whoami(port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(whoami_app(), access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise _cannot_listen("whoami app", port, "--whoami-port", err) from err
    return runner, int(runner.addresses[0][1])


async def run(options: Options, stop: asyncio.Event, out: TextIO = sys.stdout) -> Running:
    """Start the three servers, announce them on `out`, serve until `stop` is set, stop them.

    Returns what ran; raises DemoError when something cannot start (what did is stopped).
    """
    shipped = _read_config(options.config)
    users = _load_users(options.users)
    whoami_port = options.port_of(options.whoami_port, WHOAMI_PORT)
    idp_port = options.port_of(options.idp_port, IDP_PORT)
    _check_free("gateway", options.port, "--port")
    _check_free("dev IdP", idp_port, "--idp-port")
    _check_free("whoami app", whoami_port, "--whoami-port")
    async with contextlib.AsyncExitStack() as stack:
        state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-demo-")))
        runner, whoami_port = await _start_whoami(whoami_port)
        stack.push_async_callback(runner.cleanup)

        gateway_port = options.port or _free_port()
        gateway_url = _url(gateway_port)
        secret = secrets.token_urlsafe(32)
        idp_port = idp_port or _free_port()
        # Under a path, so the IdP's session cookie (cookies ignore ports) never rides along to
        # the gateway and on to the app: the whoami page shows only what a real setup would send.
        issuer = f"{_url(idp_port)}{IDP_PATH}"
        idp = DevIdP(users, [gateway_client(gateway_url, secret)], issuer=issuer)
        try:
            await idp.start(HOST, idp_port)
        except OSError as err:
            raise _cannot_listen("dev IdP", idp_port, "--idp-port", err) from err
        stack.push_async_callback(idp.stop)

        config = demo_config(
            shipped,
            gateway_url=gateway_url,
            issuer=issuer,
            whoami_url=_url(whoami_port),
            client_secret=secret,
            state_dir=state_dir,
        )
        settings = _settings(config, state_dir)
        try:
            listening = await listen(settings, shutdown_timeout=5)
        except OSError as err:
            raise _cannot_listen("gateway", gateway_port, "--port", err) from err
        stack.push_async_callback(listening.stop)

        running = Running(gateway_url, issuer, _url(whoami_port), state_dir, tuple(users.values()))
        out.write(announcement(running, options.users))
        out.flush()
        await stop.wait()
        log.info("stopping the demo")
    return running


def _settings(config: Mapping[str, Any], state_dir: Path) -> Settings:
    path = state_dir / "gateway.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # holds the client secret
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        yaml.safe_dump(dict(config), file, sort_keys=False)
    try:
        settings = load_settings(path)
    except ConfigError as err:
        raise DemoError(
            f"gateway demo: the filled-in config is not valid:\n{err}", EXIT_USAGE
        ) from err
    for warning in settings.warnings:
        log.warning(warning)
    return settings


def announcement(running: Running, users_file: Path) -> str:
    """What a person reads at start: where to go and who to be."""
    name_w = max([len("user"), *(len(u.username) for u in running.users)])
    pass_w = max([len("password"), *(len(u.password) for u in running.users)])
    lines = [
        "access-gateway demo: the dev IdP, a whoami app and the gateway, on loopback only",
        "",
        f"  gateway:  {running.gateway}/   <- open this and log in as a user below",
        f"  dev IdP:  {running.idp}",
        f"  whoami:   {running.whoami}   (the upstream: shows what the gateway sends it)",
        f"  state:    {running.state_dir}   (SQLite; removed on exit)",
        f"  audit:    gateway audit tail {running.state_dir / 'audit'} -f   (in another terminal)",
        "",
        f"demo users (DEMO passwords, from {users_file}):",
        f"  {'user':<{name_w}}  {'password':<{pass_w}}  groups",
    ]
    for user in running.users:
        groups = ", ".join(user.groups) or "-"
        mfa = "   (MFA at the IdP)" if "otp" in user.amr else ""
        lines.append(f"  {user.username:<{name_w}}  {user.password:<{pass_w}}  {groups}{mfa}")
    lines += [
        "",
        f"try: {running.gateway}/public (no login), {running.gateway}/.gateway/sessions, "
        f"{running.gateway}/.gateway/logout",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


async def _main(options: Options) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await run(options, stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def main(options: Options) -> int:
    """`gateway demo`: serve until SIGINT/SIGTERM; the exit status."""
    from gateway.events import configure_logging

    configure_logging()
    loop = new_event_loop()
    try:
        loop.run_until_complete(_main(options))
    except DemoError as err:
        print(err, file=sys.stderr)
        return err.status
    except OSError as err:  # a listener or the temp dir failed in a way not foreseen above
        print(f"gateway demo: cannot serve: {err}", file=sys.stderr)
        return EXIT_CANNOT_SERVE
    finally:
        loop.close()
    return 0
