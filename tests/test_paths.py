from __future__ import annotations

import posixpath
import re
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequest
from gateway.paths import canonicalize, route_prefix, strip_segments

REFUSED = [
    "/a/%2e%2e/b",
    "/a/..%2fb",
    "/a%2fb",
    "/a%2Fb",
    "/a%5cb",
    "/a%00b",
    "/a/%c0%ae%c0%ae/b",
    "/a/b;x=1",
    "/../x",
    "/a/../../x",
    "/a/%2e/b",
    "/a/.%2e/b",
    "/a/%2E%2e",
    "/a\\b",
    "/a#b",
    "/a%zz",
    "/a%2",
    "/a%0ab",
    "/a%7f",
    "/a%252e%252e/b",
    "/a%2525",
    "/a%25%32%65",
    "/a/%ff",
    "/a\x01b",
    "/a b",
    "a/b",
    "",
]


@pytest.mark.parametrize("raw", REFUSED)
def test_refuses_ambiguous_paths(raw: str) -> None:
    with pytest.raises(BadRequest) as err:
        canonicalize(raw)
    assert err.value.status == 400
    assert err.value.reason == "bad-path"


@pytest.mark.parametrize(
    ("raw", "path", "match"),
    [
        ("/", "/", "/"),
        ("/a/b", "/a/b", "/a/b"),
        ("/a/b/", "/a/b/", "/a/b/"),
        ("//a//b", "/a/b", "/a/b"),
        ("/a/./b", "/a/b", "/a/b"),
        ("/a/b/../c", "/a/c", "/a/c"),
        ("/a/b/..", "/a/", "/a/"),
        ("/a/.", "/a/", "/a/"),
        ("/a/..", "/", "/"),
        ("/%7Euser", "/~user", "/~user"),
        ("/%41%62c", "/Abc", "/Abc"),
        ("/file%2ejson", "/file.json", "/file.json"),
        ("/a%3Fb", "/a%3Fb", "/a?b"),
        ("/a%3fb", "/a%3Fb", "/a?b"),
        ("/a%23b", "/a%23b", "/a#b"),
        ("/a%20b", "/a%20b", "/a b"),
        ("/a%2Cb", "/a%2Cb", "/a,b"),
        ("/a,b:c@d", "/a,b:c@d", "/a,b:c@d"),
        ("/a|b", "/a%7Cb", "/a|b"),
        ("/%C3%A9t%C3%A9", "/%C3%A9t%C3%A9", "/été"),
        ("/.well-known/x", "/.well-known/x", "/.well-known/x"),
        ("/a/...", "/a/...", "/a/..."),
        ("/a%25zz", "/a%25zz", "/a%zz"),
    ],
)
def test_canonical_forms(raw: str, path: str, match: str) -> None:
    target = canonicalize(raw)
    assert (target.path, target.match) == (path, match)


def test_query_is_split_off_and_kept_raw() -> None:
    target = canonicalize("/a/../b?x=/admin&y=%2F..")
    assert (target.path, target.query) == ("/b", "x=/admin&y=%2F..")


@pytest.mark.parametrize(
    ("value", "prefix"), [("/", "/"), ("/app", "/app"), ("/app/", "/app"), ("/a b/c", "/a b/c")]
)
def test_route_prefix_normalizes(value: str, prefix: str) -> None:
    assert route_prefix(value) == prefix


@pytest.mark.parametrize("value", ["app", "/a//b", "/a/../b", "/a/./b", "/a\\b", "/a\nb"])
def test_route_prefix_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        route_prefix(value)


@pytest.mark.parametrize(
    ("path", "count", "rest"),
    [
        ("/app/x/y", 1, "/x/y"),
        ("/app", 1, "/"),
        ("/app/", 1, "/"),
        ("/a/b/c", 2, "/c"),
        ("/x", 0, "/x"),
    ],
)
def test_strip_segments(path: str, count: int, rest: str) -> None:
    assert strip_segments(path, count) == rest


# Property tests. Paths are built from pieces that stress the canonicalizer: separators,
# dots, and every encoded form of them, in any case.
PIECES = [
    "/",
    "//",
    ".",
    "..",
    "a",
    "B",
    "~",
    "%7e",
    "%7E",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%00",
    "%25",
    "%3f",
    "%3B",
    ";",
    "\\",
    "%c0%ae",
    "%c3%a9",
    "|",
    ",",
    "%2C",
    "%41",
    "x%",
]
raw_paths = st.lists(st.sampled_from(PIECES), max_size=12).map(lambda parts: "/" + "".join(parts))


def _refused(raw: str) -> bool:
    try:
        canonicalize(raw)
    except BadRequest:
        return True
    return False


@settings(max_examples=3000)
@given(raw_paths)
def test_canonical_path_is_idempotent_and_clean(raw: str) -> None:
    try:
        target = canonicalize(raw)
    except BadRequest:
        return
    again = canonicalize(target.path)
    assert (again.path, again.match) == (target.path, target.match)
    for bad in ("/../", "/./", "//", ";", "\\"):
        assert bad not in target.path
    assert not target.path.endswith(("/..", "/."))
    assert re.fullmatch(r"(?:[^%]|%[0-9A-F]{2})*", target.path)
    assert unquote(target.path, errors="strict") == target.match
    assert all(seg not in (".", "..") for seg in target.match.split("/"))


@settings(max_examples=3000)
@given(raw_paths)
def test_every_smuggled_separator_or_dot_segment_is_refused(raw: str) -> None:
    lowered = raw.lower()
    smuggles = any(enc in lowered for enc in ("%2f", "%5c", "%00", ";", "\\"))
    segments = raw.split("/")
    encoded_dot = any("%" in s and unquote(s, errors="replace") in (".", "..") for s in segments)
    if smuggles or encoded_dot:
        assert _refused(raw)


def _oracle(raw: str) -> str | None:
    """Plain paths (no '%'), resolved the textbook way; None where the path climbs above root."""
    depth = 0
    for seg in [s for s in raw.split("/") if s and s != "."]:
        depth += -1 if seg == ".." else 1
        if depth < 0:
            return None
    resolved = posixpath.normpath(raw)
    resolved = "/" + resolved.lstrip("/")
    last = raw.rsplit("/", 1)[-1]
    if resolved != "/" and (raw.endswith("/") or last in (".", "..")):
        resolved += "/"
    return resolved


@settings(max_examples=2000)
@given(st.lists(st.sampled_from(["/", "//", ".", "..", "a", "b", "c.d", "..."]), max_size=12))
def test_plain_paths_resolve_like_the_oracle(parts: list[str]) -> None:
    raw = "/" + "".join(parts)
    expected = _oracle(raw)
    if expected is None:
        assert _refused(raw)
    else:
        assert canonicalize(raw).path == expected
