"""The client's address, and what X-Forwarded-For says upstream (SPEC §3 trusted_proxies, §4.6).

X-Forwarded-For is believed only from a trusted proxy, and then only up to
the first hop (from the right) that is not itself trusted: that hop is the
client. Everything left of it could have been written by the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Addresses:
    client: str  # the address used everywhere: policy, log, rate limits
    forwarded_for: str  # the X-Forwarded-For sent upstream
    peer_trusted: bool  # whether the peer's X-Forwarded-* headers were believed


class TrustedProxies:
    def __init__(self, networks: Iterable[Network]) -> None:
        self._networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def trusts(self, address: str) -> bool:
        known = self._cache.get(address)
        if known is None:
            known = _within(address, self._networks)
            if len(self._cache) < 4096:  # peers are few; never let a scan grow this unbounded
                self._cache[address] = known
        return known

    def resolve(self, peer: str, forwarded_for: Sequence[str]) -> Addresses:
        """Addresses for a connection from `peer` carrying these X-Forwarded-For values."""
        # SECURITY: an untrusted peer's X-Forwarded-For is discarded, never appended to.
        if not self._networks or not self.trusts(peer):
            return Addresses(peer, peer, False)
        hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
        client = peer
        for hop in reversed(hops):
            if not _is_address(hop):
                break  # garbage from the left: the last address we could read is the client
            client = hop
            if not self.trusts(hop):
                break
        return Addresses(client, ", ".join([*hops, peer]), True)


def _within(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # a dual-stack listener shows IPv4 peers as ::ffff:a.b.c.d
    return any(ip in net for net in networks)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
