"""Errors that end a request with a page or JSON, never a traceback.

    GatewayError                 .status, .reason (a stable code of SPEC §3), .detail
    ├── BadRequest          400  bad-path, bad-host, bad-cookie, websocket-not-allowed,
    │                            login-failed, handoff-invalid, bad-origin, bad-csrf
    ├── Unauthorized        401  no-session, session-idle, session-expired, session-revoked,
    │                            bad-token
    ├── Forbidden           403  insufficient-role (admin API), not-trusted (forward-auth)
    │   └── Denied          403  a policy decision: no-allow-rule, denied-by:…, mfa-required
    ├── NotFound            404  no-route, no-endpoint
    ├── MethodNotAllowed    405  method-not-allowed
    ├── Conflict            409  ambiguous-user (admin API)
    ├── MisdirectedRequest  421  bad-host (a Host we do not serve, or an absolute-form target)
    ├── TooManyRequests     429  rate-limited (.retry_after seconds)
    ├── BadGateway          502  upstream-unreachable, upstream-tls, upstream-error
    ├── ServiceUnavailable  503  idp-unavailable, store-unavailable
    └── GatewayTimeout      504  upstream-timeout

`detail` is shown to the client: it must say what went wrong in terms the
client can act on, never echo secrets or internal addresses.
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    reason = "internal-error"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason


class BadRequest(GatewayError):
    status = 400
    reason = "bad-request"


class Unauthorized(GatewayError):
    status = 401
    reason = "no-session"


class Forbidden(GatewayError):
    status = 403
    reason = "insufficient-role"


class Denied(Forbidden):
    """The route's policy said no; the page names the user and what was asked, never the rules."""

    def __init__(self, detail: str, *, reason: str, user: str, asked: str) -> None:
        super().__init__(detail, reason=reason)
        self.user = user
        self.asked = asked  # "GET app.example.org/admin"


class NotFound(GatewayError):
    status = 404
    reason = "no-route"


class MethodNotAllowed(GatewayError):
    status = 405
    reason = "method-not-allowed"


class Conflict(GatewayError):
    status = 409
    reason = "ambiguous-user"


class MisdirectedRequest(GatewayError):
    status = 421
    reason = "bad-host"


class TooManyRequests(GatewayError):
    status = 429
    reason = "rate-limited"

    def __init__(self, detail: str, *, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class BadGateway(GatewayError):
    status = 502
    reason = "upstream-unreachable"


class ServiceUnavailable(GatewayError):
    status = 503
    reason = "idp-unavailable"


class GatewayTimeout(GatewayError):
    status = 504
    reason = "upstream-timeout"
