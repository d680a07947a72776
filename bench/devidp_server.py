"""A dev IdP for the benchmark's logged-in subjects: one user, one client, loopback only.

python bench/devidp_server.py --port P --redirect-uri http://127.0.0.1:G/.gateway/callback
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from gateway.devidp import DevClient, DevIdP, DevUser

CLIENT_SECRET = "bench-client-secret"
USER, PASSWORD = "bench", "bench-pw"


async def serve(port: int, redirect_uri: str) -> None:
    users = {USER: DevUser(USER, PASSWORD, groups=("bench",))}
    idp = DevIdP(users, [DevClient("gateway", CLIENT_SECRET, redirect_uris=(redirect_uri,))])
    await idp.start(port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await idp.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redirect-uri", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.redirect_uri))


if __name__ == "__main__":
    main()
