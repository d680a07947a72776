"""`GET /metrics` on the admin API (SPEC §11): Prometheus text, summed over every worker.

The main test runs `gateway run` with two workers (tests/test_workers.py's Fleet), signs a
user in through the dev IdP, fails an MFA enrollment code, sets off a deny burst, sends
public traffic spread over both workers, and reads the counters back through the parser
Prometheus itself documents for the Python client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from gateway.server import listen
from gateway.settings import load_settings
from tests import test_workers
from tests.conftest import StartGateway, echo_app, gateway_config, start_server
from tests.test_admin import TOKENS, tokens_file
from tests.test_login import follow, submit_login
from tests.test_mfa import HTML, is_enrollment, submit
from tests.test_workers import ORIGINS, Fleet, Parts, allow, records

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
OPEN_REQUESTS = 40
DENIALS = 8  # on at most two workers: one of them sees more than deny_burst.count = 2

parts = test_workers.parts  # the fixture: dev IdP, echo upstream, Redis db, PostgreSQL schema


def samples(text: str) -> Samples:
    """Every sample of an exposition, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(
        value
        for (sample, have), value in found.items()
        if sample == name and set(labels.items()) <= set(have)
    )


async def scrape(admin: str, token: str | None = TOKENS["read"]) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as client,
        client.get(admin + "/metrics", headers=headers) as resp,
    ):
        return resp.status, await resp.text()


def metrics_config(parts: Parts) -> dict[str, Any]:
    settings = parts.config()
    upstream = parts.upstream.url
    settings["mfa"] = {"totp_issuer": "Test Corp", "enrollment": "open"}
    settings["alerts"] = {"deny_burst": {"count": 2, "window": "1m"}}
    settings["routes"] += [
        {"id": "admin", "path": "/admin", "upstream": upstream, "policy": allow("admins")},
        {
            "id": "secure",
            "path": "/secure",
            "upstream": upstream,
            "policy": {"require_mfa": True, **allow("sre")},
        },
    ]
    return settings


@pytest.fixture
async def fleet(parts: Parts) -> AsyncIterator[Fleet]:
    running = await Fleet.start(parts.tmp / "gateway.yaml", metrics_config(parts))
    yield running
    if running.proc.returncode is None:
        await running.stop()


async def sign_in(base: str, browser: aiohttp.ClientSession) -> None:
    page = await follow(browser, base + "/app/x")
    callback = await submit_login(browser, page, "alice", "alice-pw")
    landed = await follow(browser, callback)
    assert landed.status == 200, await landed.text()


async def fail_an_enrollment_code(base: str, browser: aiohttp.ClientSession) -> None:
    page = await follow(browser, base + "/secure/x")  # no second factor yet: enroll (open)
    assert is_enrollment(await page.text()), await page.text()
    refused = await submit(browser, page, "/.gateway/mfa/enroll", "000000")
    assert is_enrollment(await refused.text())  # shown again, with the error


async def test_metrics_add_up_every_worker(fleet: Fleet) -> None:
    assert (await scrape(fleet.admin, token=None))[0] == 401
    assert (await scrape(fleet.admin, token="not-a-token"))[0] == 401
    async with aiohttp.ClientSession() as client:
        for i in range(OPEN_REQUESTS):  # a new connection each: spread over both workers
            url = fleet.base + f"/open/{i}"
            async with client.get(url, headers={"Connection": "close"}) as resp:
                assert resp.status == 200
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        await sign_in(fleet.base, browser)
        await fail_an_enrollment_code(fleet.base, browser)
        for _ in range(DENIALS):
            async with browser.get(fleet.base + "/admin/x", headers=HTML) as resp:
                assert resp.status == 403
    status, text = await scrape(fleet.admin)
    assert status == 200, text
    found = samples(text)
    assert total(found, "gateway_requests_total", route="open") == OPEN_REQUESTS
    assert total(found, "gateway_requests_total", route="open", decision="allow") == 40
    assert total(found, "gateway_requests_total", route="admin", decision="deny") == DENIALS
    assert total(found, "gateway_requests_total", route="gateway") >= 3  # login, callback, mfa
    assert total(found, "gateway_logins_total") == 1
    assert total(found, "gateway_mfa_failures_total") == 1
    assert total(found, "gateway_alerts_total", type="deny_burst") >= 1
    assert total(found, "gateway_active_sessions") == 1
    counted = total(found, "gateway_requests_total")
    assert total(found, "gateway_request_duration_seconds_count") == counted
    assert ("gateway_audit_queue_depth", ()) in found
    assert await fleet.stop() == 0
    served = {
        origin: sum(r.get("route") == "open" for r in records(fleet.audit, origin))
        for origin in ORIGINS
    }
    assert sum(served.values()) == OPEN_REQUESTS and all(served.values()), served


async def test_a_read_token_suffices_and_a_single_process_has_them_too(
    tmp_path: Path, start_gateway: StartGateway
) -> None:
    upstream = await start_server(echo_app())
    try:
        config = gateway_config(
            [{"id": "solo", "path": "/", "upstream": upstream.url, "public": True}],
            admin={"listen": "127.0.0.1:0", "tokens_file": str(tokens_file(tmp_path / "t"))},
        )
        path = tmp_path / "solo.yaml"
        path.write_text(yaml.safe_dump(config))
        listening = await listen(load_settings(path), shutdown_timeout=2)
        try:
            assert listening.admin is not None
            admin = f"http://{listening.admin.addresses[0]}"
            before = samples((await scrape(admin))[1])
            base = URL(f"http://127.0.0.1:{listening.port}")
            async with aiohttp.ClientSession() as client:
                for _ in range(3):
                    async with client.get(base / "x", headers={"Host": "gw.test"}) as resp:
                        assert resp.status == 200
            status, text = await scrape(admin, TOKENS["read"])
            assert status == 200
            after = samples(text)
            name, labels = "gateway_requests_total", {"route": "solo", "decision": "allow"}
            assert total(after, name, **labels) - total(before, name, **labels) == 3
            assert "gateway_active_sessions" not in text  # every route public: no sessions
        finally:
            await listening.stop()
    finally:
        await upstream.runner.cleanup()
