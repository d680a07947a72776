"""Typed application state (aiohttp `web.AppKey`): every key the app holds, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.proxy import Proxy
from gateway.requestid import RequestIds
from gateway.runtime import Runtime


@dataclass(slots=True)
class Lifecycle:
    draining: bool = False  # set when shutdown begins: readyz turns 503 so balancers move away


RUNTIME = web.AppKey("runtime", Runtime)
PROXY = web.AppKey("proxy", Proxy)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
