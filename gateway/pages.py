"""What a person or a client sees when the gateway answers itself (SPEC §12).

Browsers get an HTML page (jinja2, autoescape on), everything else JSON; both
carry the request id and the stable reason code, never a traceback.
"""

from __future__ import annotations

import math
from http import HTTPStatus

import jinja2
import orjson
from aiohttp import web

from gateway.errors import Denied, GatewayError, TooManyRequests

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)

# SPEC §12: pages cannot be framed, sniffed or leak the URL onward.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def wants_html(request: web.BaseRequest) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def error_response(
    request: web.BaseRequest, error: GatewayError, request_id: str, secure: bool
) -> web.Response:
    headers = {**PAGE_HEADERS, "X-Request-Id": request_id}
    if secure:
        headers["Strict-Transport-Security"] = "max-age=31536000"
    if isinstance(error, TooManyRequests):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    denied = error if isinstance(error, Denied) else None
    if wants_html(request):
        body = _templates.get_template("error.html").render(
            status=error.status,
            title=HTTPStatus(error.status).phrase,
            detail=error.detail,
            reason=error.reason,
            request_id=request_id,
            user=denied.user if denied else None,
            asked=denied.asked if denied else None,
        )
        return web.Response(
            status=error.status, text=body, content_type="text/html", headers=headers
        )
    payload = {
        "status": error.status,
        "reason": error.reason,
        "detail": error.detail,
        "request_id": request_id,
    }
    if denied is not None:
        payload["user"] = denied.user
    return web.Response(
        status=error.status,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers=headers,
    )


def page(
    template: str,
    request_id: str,
    *,
    status: int = 200,
    secure: bool = False,
    form_targets: tuple[str, ...] = (),
    **context: object,
) -> web.Response:
    """One of the gateway's HTML pages, with the SPEC §12 headers.

    `form_targets`: origins a form's POST may be redirected to (CSP form-action also governs
    redirects after the POST, e.g. sign-out continuing at the IdP).
    """
    headers = {**PAGE_HEADERS, "X-Request-Id": request_id}
    if form_targets:
        csp = headers["Content-Security-Policy"]
        headers["Content-Security-Policy"] = csp.replace(
            "form-action 'self'", "form-action 'self' " + " ".join(form_targets)
        )
    if secure:
        headers["Strict-Transport-Security"] = "max-age=31536000"
    body = _templates.get_template(template).render(request_id=request_id, **context)
    return web.Response(status=status, text=body, content_type="text/html", headers=headers)


def redirect(location: str, request_id: str) -> web.Response:
    headers = {"Location": location, "X-Request-Id": request_id, "Cache-Control": "no-store"}
    return web.Response(status=302, headers=headers)


def json_response(payload: object, request_id: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers={"X-Request-Id": request_id, "Cache-Control": "no-store"},
    )
