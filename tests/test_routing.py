from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.errors import BadRequest, MisdirectedRequest
from gateway.routing import RouteTable, normalize_host


@dataclass(frozen=True)
class R:
    id: str
    path: str = "/"
    host: str | None = None


def table(*routes: R, hosts: tuple[str, ...] = ("gw.example.org",)) -> RouteTable[R]:
    return RouteTable(routes, extra_hosts=hosts)


def ids(t: RouteTable[R], host: str, path: str) -> str | None:
    route = t.match(host, path)
    return route.id if route else None


def test_longest_prefix_on_segment_boundaries() -> None:
    t = table(R("root"), R("app", "/app"), R("deep", "/app/deep"))
    assert ids(t, "h", "/app") == "app"
    assert ids(t, "h", "/app/") == "app"
    assert ids(t, "h", "/app/x") == "app"
    assert ids(t, "h", "/apple") == "root"
    assert ids(t, "h", "/app/deep/er") == "deep"
    assert ids(t, "h", "/app/deeper") == "app"
    assert ids(t, "h", "/") == "root"


def test_no_route_is_none() -> None:
    assert ids(table(R("app", "/app")), "h", "/other") is None


def test_host_specificity_after_prefix_length() -> None:
    t = table(
        R("any", "/"),
        R("wild", "/", "*.example.org"),
        R("deepwild", "/", "*.b.example.org"),
        R("exact", "/", "a.b.example.org"),
        R("any-api", "/api"),
    )
    assert ids(t, "a.b.example.org", "/x") == "exact"
    assert ids(t, "c.b.example.org", "/x") == "deepwild"
    assert ids(t, "c.example.org", "/x") == "wild"
    assert ids(t, "example.org", "/x") == "any"  # a wildcard never covers the apex
    assert ids(t, "a.b.example.org", "/api/v1") == "any-api"  # a longer prefix wins first


def test_hosts_served() -> None:
    t = table(R("a", "/", "app.example.org"), R("w", "/", "*.apps.example.org"))
    for host in ("gw.example.org", "app.example.org", "x.apps.example.org", "y.x.apps.example.org"):
        t.check_host(host)
    for host in ("evil.org", "apps.example.org", "example.org", "app.example.org.evil.org"):
        with pytest.raises(MisdirectedRequest):
            t.check_host(host)


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("Example.ORG", "example.org"),
        ("example.org.", "example.org"),
        ("example.org:8443", "example.org"),
        ("EXAMPLE.org.:80", "example.org"),
        ("[::1]:8443", "[::1]"),
        ("127.0.0.1:8080", "127.0.0.1"),
    ],
)
def test_normalize_host(raw: str, host: str) -> None:
    assert normalize_host(raw) == host


@pytest.mark.parametrize("raw", ["", "a b", "a/b", "exa mple", "host:port", "a@b", "[::1]x"])
def test_normalize_host_refuses_malformed(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_host(raw)


def test_duplicate_routes_refused() -> None:
    with pytest.raises(ValueError):
        table(R("a", "/x"), R("b", "/x"))
    with pytest.raises(ValueError):
        table(R("a", "/x", "h.example.org"), R("b", "/x", "h.example.org"))


class CountingDict(dict[str, object]):
    probes = 0

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        CountingDict.probes += 1
        return super().get(key, default)


def test_lookup_work_does_not_grow_with_the_route_count() -> None:
    """A lookup probes one hash slot per prefix of the request path, however many routes exist.

    (bench/ measures the wall-clock figure: 10,000 routes within 10% of 10.)
    """

    def probes(n: int) -> int:
        t = table(*(R(f"r{i}", f"/r{i}") for i in range(n)), R("root"))
        t._slots = CountingDict(t._slots)  # type: ignore[assignment]
        CountingDict.probes = 0
        assert ids(t, "gw.example.org", f"/r{n // 2}/x/y") == f"r{n // 2}"
        return CountingDict.probes

    assert probes(10) == probes(10_000) == 3
