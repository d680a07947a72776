from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.redirects import safe_redirect

HOSTS = {"gw.example.org", "app.example.org"}


def rd(value: str | None) -> str:
    return safe_redirect(value, scheme="https", port=443, hosts=HOSTS)


@pytest.mark.parametrize(
    "attack",
    [
        "//evil.com",
        "/\\evil.com",
        "/\t/evil.com",
        "\t//evil.com",
        "https://evil.com",
        "https://app.example.org.evil.com",
        "https://app.example.org@evil.com",
        "https://user:pw@app.example.org/",
        "http://app.example.org/",
        "javascript:alert(1)",
        "JAVASCRIPT:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "https://*.example.org/",
        "https://app.example.org:8443/",
        "https:app.example.org",
        "///evil.com",
        "",
        None,
    ],
)
def test_open_redirects_end_on_root(attack: str | None) -> None:
    assert rd(attack) == "/"


@pytest.mark.parametrize(
    "good",
    ["/", "/app/x?y=1#z", "https://app.example.org/x", "https://gw.example.org:443/", "/a//b"],
)
def test_our_own_places_are_kept(good: str) -> None:
    assert rd(good) == good


@given(st.text(max_size=60))
def test_nothing_leaves_our_hosts(value: str) -> None:
    out = rd(value)
    if out.startswith("/"):
        assert not out.startswith("//") and "\\" not in out
        assert all(ord(c) > 0x20 for c in out)
    else:
        assert out.split("/")[2].split(":")[0] in HOSTS
