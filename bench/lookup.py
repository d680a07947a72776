"""The CPU of one session lookup on the request path, on SQLite and on Redis (issue: identity).

What a protected request does to find its session, exactly as the pipeline does it:
`caller.identify()` on a request carrying the session cookie: the cookie parsed, the store
key found (a keyed BLAKE2b, once per session), the session read (from the process cache,
which revocations on the store's channel invalidate), its limits checked, a touch decided.
Measured in one process with `time.process_time()` over many lookups, beside a baseline
loop that builds the same request and does nothing else, so only the lookup is counted.
Run alone on a quiet core:

    .venv/bin/python bench/lookup.py [--n 200000]

The whole-request view (a logged-in request beside a public one, in the harness's
together mode) is in bench/run.py; its difference also holds the policy, the identity
headers and the assertion, which the identity issue's target does not cover.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.auth import Auth
from gateway.caller import identify
from gateway.settings import Route

REDIS_URL = "redis://127.0.0.1:6379/10"
TARGETS_US = {"sqlite": 15.0, "redis": 25.0}


@dataclass(frozen=True, slots=True)
class Result:
    store: str
    lookup_us: list[float]  # per round

    @property
    def median(self) -> float:
        return statistics.median(self.lookup_us)

    def row(self) -> str:
        target = TARGETS_US[self.store]
        spread = f"{min(self.lookup_us):.1f}-{max(self.lookup_us):.1f}"
        verdict = "PASS" if self.median <= target else "FAIL"
        return f"| {self.store} | {self.median:.1f} ({spread}) | ≤ {target:.0f} µs | {verdict} |"


def settings_for(store: str, tmp: Path) -> object:
    import base64

    import yaml

    from gateway.settings import load_settings

    key = base64.b64encode(os.urandom(32)).decode()
    (tmp / "assertion").mkdir(exist_ok=True)
    config = {
        "server": {"listen": "127.0.0.1:0", "public_url": "http://127.0.0.1:8443"},
        "identity": {
            "issuer": "http://127.0.0.1:1",  # never contacted: discovery fails quietly
            "client_id": "gateway",
            "client_secret": "bench",
        },
        "state": {"sessions": store, "records": "memory://", "keys": [key]},
        "sessions": {"cookie_name": "gateway"},
        "assertion": {"signing_key_file": str(_assertion_key(tmp))},
        "audit": {"dir": str(tmp / "audit")},
        "routes": [
            {"id": "app", "path": "/", "upstream": "http://127.0.0.1:1", "policy": {"allow": [{}]}}
        ],
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(path)


def _assertion_key(tmp: Path) -> Path:
    from gateway.keyfiles import generate

    keys = tmp / "keys"
    if not keys.exists():
        generate(keys)
    return keys / "assertion-es256.pem"


async def measure(store: str, n: int, rounds: int) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        url = REDIS_URL if store == "redis" else f"sqlite:///{tmp}/state.db"
        settings = settings_for(url, Path(tmp))
        auth = await Auth.open(settings)  # type: ignore[arg-type]
        assert auth is not None
        try:
            cookie_id, _ = await auth.sessions.create(
                iss="http://idp",
                sub="bench",
                user="bench@example.org",
                email="bench@example.org",
                groups=["bench"] * 10,
                amr=["pwd"],
                sid=None,
                auth_time=time.time(),
                id_token=None,
                refresh_token=None,
                refresh_after=None,
            )
            route: Route = settings.routes[0]  # type: ignore[attr-defined]
            headers = CIMultiDict({"Host": "127.0.0.1", "Cookie": f"gateway={cookie_id}"})
            request = make_mocked_request("GET", "/", headers=headers)

            async def lookup() -> None:
                caller = await identify(auth, request, route)
                auth.sessions.touch_due(caller.session)  # type: ignore[arg-type]

            async def nothing() -> None:
                request.headers.getall("Cookie", [])

            per_round = []
            for _ in range(rounds):
                spent = await _cpu(lookup, n) - await _cpu(nothing, n)
                per_round.append(spent / n * 1e6)
            return Result(store, per_round)
        finally:
            await auth.close()


async def _cpu(step: Callable[[], object], n: int) -> float:
    await step()  # type: ignore[misc]
    start = time.process_time()
    for _ in range(n):
        await step()  # type: ignore[misc]
    return time.process_time() - start


def main() -> None:
    logging.getLogger("gateway").setLevel(logging.ERROR)  # the IdP is never there: no warnings
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("| session store | CPU µs per lookup: median (min-max) | target | result |")
    print("|---|---:|---:|---|")
    for store in ("sqlite", "redis"):
        print(asyncio.run(measure(store, args.n, args.rounds)).row())


if __name__ == "__main__":
    main()
