"""The gateway's own cookies: names, flags, reading them, and keeping them from upstreams.

    <cookie_name>          the session: an opaque 256-bit id, Max-Age = sessions.max_lifetime
    <cookie_name>-login    the sealed login state (state, nonce, PKCE verifier, rd), 10 minutes
    <cookie_name>-break-glass  the break-glass form's sealed token, 10 minutes

Always HttpOnly, SameSite=Lax, Path=/, Secure under https, and never a Domain attribute:
each host gets its own host-only cookie (through the handoff), so no app on a sibling
subdomain ever receives or can overwrite it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from aiohttp import web

from gateway.errors import BadRequest


class Cookies:
    def __init__(self, name: str, *, secure: bool, max_age: float) -> None:
        self.session = name
        self.login = f"{name}-login"
        self.break_glass = f"{name}-break-glass"
        self.secure = secure
        self._max_age = int(max_age)
        self.names = frozenset({self.session, self.login, self.break_glass})
        # One cookie pair `name=value` of ours, at the start or after a ';' (on every request).
        self._session_pair = re.compile(rf"(?:^|;)\s*{re.escape(name)}=\s*\"?([^;\"]*)")

    def session_id(self, headers: Sequence[str]) -> str | None:
        """The session cookie's value from the request's Cookie headers; 400 if sent twice."""
        if len(headers) == 1:  # the common case, without the nested loop
            values = self._session_pair.findall(headers[0])
        else:
            values = [v for header in headers for v in self._session_pair.findall(header)]
        if len(values) > 1:
            # SECURITY: two of our cookies (one planted by a sibling host) is cookie tossing.
            raise BadRequest("two session cookies were sent", reason="bad-cookie")
        return values[0] if values else None

    def login_state(self, headers: Iterable[str]) -> str | None:
        return self.one(headers, self.login)

    def one(self, headers: Iterable[str], name: str) -> str | None:
        """The value of the cookie `name`, if the request sent exactly one."""
        values = [v for n, v in _pairs(headers) if n == name]
        return values[0] if len(values) == 1 else None

    def set_session(self, response: web.StreamResponse, cookie_id: str) -> None:
        self._set(response, self.session, cookie_id, self._max_age)

    def set_login(self, response: web.StreamResponse, sealed: str) -> None:
        self._set(response, self.login, sealed, 600)

    def set_break_glass(self, response: web.StreamResponse, sealed: str) -> None:
        self._set(response, self.break_glass, sealed, 600)

    def clear(self, response: web.StreamResponse, name: str) -> None:
        self._set(response, name, "", 0)

    def _set(self, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="Lax",
        )

    def without_ours(self, cookie_header: str) -> str | None:
        """The Cookie header for the upstream: ours removed (None when nothing is left)."""
        # SECURITY: the session id must never reach an upstream (or its logs).
        if self.session not in cookie_header:  # the login cookie's name contains it too
            return cookie_header
        kept = [p for p in cookie_header.split(";") if p.split("=", 1)[0].strip() not in self.names]
        joined = ";".join(kept).strip()
        return joined or None


def _pairs(headers: Iterable[str]) -> list[tuple[str, str]]:
    pairs = []
    for header in headers:
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep:
                pairs.append((name, value.strip().strip('"')))
    return pairs
