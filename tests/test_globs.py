from __future__ import annotations

import pytest

from gateway.globs import GlobSet, compile_glob


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        ("/x/**", "/x", True),
        ("/x/**", "/x/", True),
        ("/x/**", "/x/a/b", True),
        ("/x/**", "/xy", False),
        ("/d/*", "/d/a", True),
        ("/d/*", "/d/a/b", False),
        ("/d/*", "/d", False),
        ("/api/*/x", "/api/1/x", True),
        ("/a*b", "/axxb", True),
        ("/a*b", "/a/b", False),
        ("/**", "/anything/at/all", True),
        ("/**", "/", True),
        ("/a/**/z", "/a/z", True),
        ("/a/**/z", "/a/b/c/z", True),
        ("/a/**/z", "/a/bz", False),
        ("/health", "/health", True),
        ("/health", "/health/", True),
        ("/health", "/healthz", False),
        ("/a.b", "/axb", False),  # no regex: '.' is a dot
        ("/(x)", "/(x)", True),
    ],
)
def test_glob(glob: str, path: str, matches: bool) -> None:
    assert (compile_glob(glob).fullmatch(path) is not None) is matches


def test_glob_set() -> None:
    globs = GlobSet(["/api/heartbeat", "/live/**"])
    assert globs.matches("/api/heartbeat") and globs.matches("/live/x/y")
    assert not globs.matches("/api/other")
    assert not GlobSet([]).matches("/")
