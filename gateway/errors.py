"""Errors that end a request with a page or JSON, never a traceback.

    GatewayError                 .status, .reason (a stable code of SPEC §3), .detail
    ├── BadRequest          400  bad-path, bad-host, bad-request-id, websocket-not-allowed
    ├── NotFound            404  no-route, no-endpoint
    ├── MethodNotAllowed    405  method-not-allowed
    ├── MisdirectedRequest  421  bad-host (a Host we do not serve, or an absolute-form target)
    ├── BadGateway          502  upstream-unreachable, upstream-tls, upstream-error
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


class NotFound(GatewayError):
    status = 404
    reason = "no-route"


class MethodNotAllowed(GatewayError):
    status = 405
    reason = "method-not-allowed"


class MisdirectedRequest(GatewayError):
    status = 421
    reason = "bad-host"


class BadGateway(GatewayError):
    status = 502
    reason = "upstream-unreachable"


class GatewayTimeout(GatewayError):
    status = 504
    reason = "upstream-timeout"
