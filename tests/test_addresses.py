from __future__ import annotations

import ipaddress

import pytest

from gateway.addresses import TrustedProxies

TRUSTED = TrustedProxies([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")])


def test_untrusted_peer_replaces_x_forwarded_for() -> None:
    got = TRUSTED.resolve("203.0.113.5", ["1.2.3.4"])
    assert (got.client, got.forwarded_for, got.peer_trusted) == (
        "203.0.113.5",
        "203.0.113.5",
        False,
    )


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        ([], "10.0.0.1"),
        (["198.51.100.7"], "198.51.100.7"),
        (["6.6.6.6, 198.51.100.7"], "198.51.100.7"),  # the client wrote 6.6.6.6; we stop earlier
        (["6.6.6.6, 198.51.100.7, 10.2.2.2"], "198.51.100.7"),  # trusted hops are skipped
        (["6.6.6.6", "198.51.100.7, 10.2.2.2"], "198.51.100.7"),  # several headers, in order
        (["10.9.9.9, 10.2.2.2"], "10.9.9.9"),  # all trusted: the leftmost
        (["198.51.100.7, not-an-ip, 10.2.2.2"], "10.2.2.2"),  # garbage: the last readable hop
    ],
)
def test_trusted_peer_client_is_the_rightmost_untrusted_hop(xff: list[str], client: str) -> None:
    got = TRUSTED.resolve("10.0.0.1", xff)
    assert got.client == client
    assert got.peer_trusted
    assert got.forwarded_for.endswith("10.0.0.1")


def test_ipv4_mapped_peer_is_recognised() -> None:
    assert TRUSTED.resolve("::ffff:127.0.0.1", ["198.51.100.7"]).client == "198.51.100.7"


def test_no_trusted_proxies_trusts_nobody() -> None:
    got = TrustedProxies([]).resolve("127.0.0.1", ["198.51.100.7"])
    assert (got.client, got.peer_trusted) == ("127.0.0.1", False)
