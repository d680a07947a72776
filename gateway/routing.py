"""Which hosts we serve, and which route a request belongs to (SPEC §3 routes, §4.2). Pure.

A route is found by path prefix on segment boundaries, longest first, and for
the same prefix by host specificity: an exact host, then the most specific
wildcard (`*.example.org` covers any name below example.org, not the apex),
then a route without a host. Every lookup walks the request path's own
prefixes and hashes each one, so its cost depends on the path's depth, never
on how many routes exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from gateway.errors import BadRequest, MisdirectedRequest
from gateway.paths import Target, canonicalize


class RouteLike(Protocol):
    @property
    def host(self) -> str | None: ...
    @property
    def path(self) -> str: ...


R = TypeVar("R", bound=RouteLike)

_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")


def normalize_host(raw: str) -> str:
    """The Host header lower-cased, without port and trailing dot; BadRequest if malformed."""
    host = raw.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[: end + 1], host[end + 1 :]
    else:
        name, _, port = host.partition(":")
        rest = ":" + port if port else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        raise BadRequest("malformed Host header", reason="bad-host")
    name = name.removesuffix(".")
    if not _HOSTNAME.fullmatch(name):
        raise BadRequest("malformed Host header", reason="bad-host")
    return name


def locate(raw_target: str, host_headers: list[str], table: RouteTable[R]) -> tuple[str, Target]:
    """Stage 2: the served host and the canonical target, from the raw request line."""
    if not raw_target.startswith("/"):
        if "://" in raw_target:
            # SECURITY: an absolute-form target names a host other than the Host header's.
            raise MisdirectedRequest("absolute-form request targets are not served")
        raise BadRequest("the request target must be a path", reason="bad-path")
    if len(host_headers) != 1:
        raise BadRequest("a request needs exactly one Host header", reason="bad-host")
    host = normalize_host(host_headers[0])
    table.check_host(host)
    return host, canonicalize(raw_target)


@dataclass(slots=True)
class _Slot(Generic[R]):
    exact: dict[str, R] = field(default_factory=dict)
    wildcard: dict[str, R] = field(default_factory=dict)  # "example.org" for *.example.org
    any_host: R | None = None


class RouteTable(Generic[R]):
    def __init__(self, routes: Iterable[R], extra_hosts: Iterable[str] = ()) -> None:
        self._slots: dict[str, _Slot[R]] = {}
        self._hosts: set[str] = set(extra_hosts)
        self._wild_hosts: set[str] = set()
        for route in routes:
            self._add(route)

    def _add(self, route: R) -> None:
        slot = self._slots.setdefault(route.path, _Slot())
        if route.host is None:
            if slot.any_host is not None:
                raise ValueError(f"two routes for path {route.path} on every host")
            slot.any_host = route
            return
        if route.host.startswith("*."):
            table, key, hosts = slot.wildcard, route.host[2:], self._wild_hosts
        else:
            table, key, hosts = slot.exact, route.host, self._hosts
        if key in table:
            raise ValueError(f"two routes for host {route.host} and path {route.path}")
        table[key] = route
        hosts.add(key)

    def check_host(self, host: str) -> None:
        """MisdirectedRequest unless `host` (normalized) is one we serve."""
        if host in self._hosts or any(s in self._wild_hosts for s in _parents(host)):
            return
        # SECURITY: a foreign Host could poison caches and redirects built from it.
        raise MisdirectedRequest(f"this gateway does not serve host {host!r}")

    def match(self, host: str, path: str) -> R | None:
        """The route for a normalized host and a canonical (decoded) path, or None."""
        for prefix in _prefixes(path):
            slot = self._slots.get(prefix)
            if slot is None:
                continue
            route = slot.exact.get(host)
            if route is None and slot.wildcard:
                route = next((slot.wildcard[s] for s in _parents(host) if s in slot.wildcard), None)
            if route is None:
                route = slot.any_host
            if route is not None:
                return route
        return None


def _prefixes(path: str) -> Iterator[str]:
    """'/a/b/c' -> '/a/b/c', '/a/b', '/a', '/' (a trailing '/' is not a segment of its own)."""
    end = len(path) - 1 if path.endswith("/") else len(path)
    while end > 0:
        yield path[:end]
        end = path.rfind("/", 0, end)
    yield "/"


def _parents(host: str) -> Iterator[str]:
    """'a.b.example.org' -> 'b.example.org', 'example.org', 'org' (most specific first)."""
    dot = host.find(".")
    while dot >= 0:
        yield host[dot + 1 :]
        dot = host.find(".", dot + 1)
