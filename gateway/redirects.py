"""Where the gateway may send a browser after login (SPEC §5 `rd`): never somewhere else. Pure.

`rd` is a relative path, or an absolute URL with public_url's scheme and port whose host is
exactly public_url's host or an exact (non-wildcard) route host. Anything else, including
anything a browser could read as another host (`//evil`, `/\\evil`, control characters that
browsers strip, user-info tricks), falls back to `/`.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import urlsplit

_FALLBACK = "/"


def safe_redirect(rd: str | None, *, scheme: str, port: int, hosts: Collection[str]) -> str:
    """`rd` if it stays on our hosts, else '/'. `hosts`: public_url's host and exact route hosts."""
    if not rd or len(rd) > 4096:
        return _FALLBACK
    # SECURITY: browsers drop tabs/newlines and read '\' as '/': '/\t/evil' is '//evil'.
    if any(ord(c) <= 0x20 or c in "\\\x7f" for c in rd):
        return _FALLBACK
    if rd.startswith("/"):
        return _FALLBACK if rd.startswith("//") else rd
    try:
        parts = urlsplit(rd)
        rd_port = parts.port
    except ValueError:
        return _FALLBACK
    if parts.scheme != scheme or parts.username is not None or parts.password is not None:
        return _FALLBACK  # SECURITY: 'https://ours@evil' is evil's; 'javascript:' is not ours
    host = (parts.hostname or "").rstrip(".")
    if host not in hosts or (rd_port or _default_port(scheme)) != port:
        return _FALLBACK
    return rd


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80
