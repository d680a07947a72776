"""`gateway run` as a real process: bounded memory while streaming, graceful shutdown."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web

from tests.conftest import GatewayProcess, echo_app, gateway_config, start_server

GIB = 1024**3
Events = tuple[asyncio.Event, asyncio.Event]  # the slow request arrived upstream; release it
CHUNK = b"x" * (256 * 1024)


def streaming_app(arrived: asyncio.Event, release: asyncio.Event) -> web.Application:
    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = GIB
        await resp.prepare(request)
        for _ in range(GIB // len(CHUNK)):
            await resp.write(CHUNK)
        return resp

    async def upload(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.json_response({"received": total})

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="finished")

    app = web.Application(client_max_size=0)
    app.router.add_get("/download", download)
    app.router.add_post("/upload", upload)
    app.router.add_get("/slow", slow)
    return app


@pytest.fixture
async def gateway_process(tmp_path: Path) -> AsyncIterator[tuple[GatewayProcess, Events]]:
    arrived, release = asyncio.Event(), asyncio.Event()
    upstream = await start_server(streaming_app(arrived, release))
    config = gateway_config([{"id": "all", "path": "/", "upstream": upstream.url, "public": True}])
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.to_thread(GatewayProcess, path)
    yield proc, (arrived, release)
    await asyncio.to_thread(proc.stop)
    await upstream.runner.cleanup()


async def _upload_body() -> AsyncIterator[bytes]:
    for _ in range(GIB // len(CHUNK)):
        yield CHUNK


async def test_a_gigabyte_streams_both_ways_in_bounded_memory(
    gateway_process: tuple[GatewayProcess, Events],
) -> None:
    proc, _ = gateway_process
    url = f"http://127.0.0.1:{proc.port}"
    headers = {"Host": "gw.test"}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        async with client.get(url + "/.gateway/healthz", headers=headers) as resp:
            assert resp.status == 200
        baseline = proc.rss_kib()
        received = 0
        async with client.get(url + "/download", headers=headers) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                received += len(chunk)
        assert received == GIB
        async with client.post(url + "/upload", data=_upload_body(), headers=headers) as resp:
            assert (await resp.json()) == {"received": GIB}
    growth_mib = (proc.rss_kib() - baseline) / 1024
    print(f"gateway peak RSS: baseline {baseline / 1024:.1f} MiB, growth {growth_mib:.1f} MiB")
    assert growth_mib < 64, f"2 GiB streamed, but peak RSS grew by {growth_mib:.1f} MiB"


async def test_sigterm_lets_in_flight_requests_finish_and_exits_0(
    gateway_process: tuple[GatewayProcess, Events],
) -> None:
    proc, (arrived, release) = gateway_process
    url = f"http://127.0.0.1:{proc.port}"
    async with aiohttp.ClientSession() as client:
        in_flight = asyncio.ensure_future(client.get(url + "/slow", headers={"Host": "gw.test"}))
        await asyncio.wait_for(arrived.wait(), 10)
        proc.proc.terminate()
        stopping = await asyncio.to_thread(proc.wait_for, "server.stopping")
        assert stopping["grace_seconds"] > 0
        release.set()
        resp = await in_flight
        assert (resp.status, await resp.text()) == (200, "finished")
        resp.release()
    assert await asyncio.to_thread(proc.proc.wait, 40) == 0


async def test_listener_tls_from_server_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("gw.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    upstream = await start_server(echo_app())
    config = gateway_config(
        [{"id": "all", "path": "/", "upstream": upstream.url, "public": True}],
        server={
            "public_url": "https://gw.test",
            "tls": {"cert_file": "cert.pem", "key_file": "key.pem"},
        },
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.to_thread(GatewayProcess, path)
    try:
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        connector = aiohttp.TCPConnector(ssl=client_ctx)
        async with aiohttp.ClientSession(connector=connector) as client:
            # the certificate names gw.test; connect to loopback and check it against that name
            url = f"https://127.0.0.1:{proc.port}/x"
            async with client.get(
                url, headers={"Host": "gw.test"}, server_hostname="gw.test"
            ) as resp:
                assert resp.status == 200
                seen = await resp.json()
        assert seen["raw_path"] == "/x"
        assert ["X-Forwarded-Proto", "https"] in seen["headers"]
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
        await upstream.runner.cleanup()
