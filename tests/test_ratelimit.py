"""Per-address rate limits (gateway/ratelimit.py): the attacks they stop, with a moved clock."""

from __future__ import annotations

from gateway.ratelimit import RateLimiter, bucket_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_beyond_count_waits_and_the_bucket_refills() -> None:
    clock = Clock()
    limiter = RateLimiter(3, 60.0, clock)
    assert [limiter.acquire("192.0.2.1") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("192.0.2.1")
    assert wait == 20.0  # one token back every 60 / 3 seconds
    clock.now += 20.0
    assert limiter.acquire("192.0.2.1") == 0.0
    assert limiter.acquire("192.0.2.2") == 0.0  # another address has its own bucket


def test_rotating_addresses_within_one_ipv6_64_shares_one_bucket() -> None:
    limiter = RateLimiter(2, 60.0, Clock())
    assert limiter.acquire("2001:db8:1:2::1") == 0.0
    assert limiter.acquire("2001:db8:1:2:ffff::9") == 0.0
    assert limiter.acquire("2001:db8:1:2:abcd:1:2:3") > 0  # same /64: the attacker's one host
    assert limiter.acquire("2001:db8:1:3::1") == 0.0  # the next /64 is someone else


def test_an_ipv4_mapped_address_counts_as_its_ipv4_address() -> None:
    assert bucket_key("::ffff:192.0.2.7") == bucket_key("192.0.2.7") == "192.0.2.7"
    assert bucket_key("2001:db8::1") == "2001:db8::/64"


def test_a_flood_of_distinct_addresses_neither_grows_the_table_nor_locks_anyone_out() -> None:
    clock = Clock()
    limiter = RateLimiter(1, 60.0, clock, max_buckets=100)
    assert limiter.acquire("192.0.2.1") == 0.0
    assert limiter.acquire("192.0.2.1") > 0  # limited
    for n in range(1000):  # a spoofed-source flood
        limiter.acquire(f"10.0.{n // 256}.{n % 256}")
        assert len(limiter._buckets) <= 100
    assert limiter.acquire("198.51.100.1") == 0.0  # a newcomer is never refused by the flood
