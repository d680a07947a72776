"""Per-address rate limits on the endpoints an attacker would hammer (SPEC §12).

Login, callback and back-channel logout each get a token bucket per client
address (`rate_limits:` in the config): `count` requests per `window`, bursts
up to `count`, then 429 with `Retry-After`. IPv6 clients are counted per /64,
since one host owns a whole /64 and would otherwise rotate through it. The
client address is the one `trusted_proxies` resolved, so behind a trusted
load balancer each real client has its own bucket, and nobody else's.

The buckets live in the process (a limit per process: with N workers an
address gets up to N times the budget; docs/configuration.md says so). The
table is bounded: when it is full, buckets that have refilled are dropped
first, and if none has, the table starts over, which can only ever let
requests through, never lock an address out.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

_MAX_BUCKETS = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(
        self,
        count: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = _MAX_BUCKETS,
    ) -> None:
        self.count = count
        self.window = window
        self._rate = count / window  # tokens per second
        self._clock = clock
        self._max = max_buckets
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, address: str) -> float:
        """0.0 when this request may go ahead; else the seconds until one token is back."""
        now = self._clock()
        key = bucket_key(address)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[key] = _Bucket(float(self.count), now)
        bucket.tokens = min(float(self.count), bucket.tokens + (now - bucket.at) * self._rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self._rate

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self._max:
            return
        full = now - self.window  # a bucket untouched for a whole window is full again
        self._buckets = {k: b for k, b in self._buckets.items() if b.at > full}
        if len(self._buckets) >= self._max:
            self._buckets.clear()  # a flood of distinct addresses: forget, never lock out


def bucket_key(address: str) -> str:
    """The address itself for IPv4; its /64 for IPv6 (an IPv4-mapped one counts as IPv4)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an address (a unix socket peer): its own bucket
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        # SECURITY: one host owns a /64; counting addresses would let it rotate past the limit.
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)
