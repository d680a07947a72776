"""Shared aliases and protocols: what modules need to know of each other, and no more."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from gateway.access import Admission, Ask
    from gateway.audit.recorder import Recorder
    from gateway.auth import Auth
    from gateway.metrics import Metrics
    from gateway.reload import Prepared
    from gateway.replicas import Replicas
    from gateway.runtime import Runtime
    from gateway.settings import Route


class GatewayState(Protocol):
    """What the gateway's own endpoints may read of the running gateway."""

    @property
    def runtime(self) -> Runtime: ...

    @property
    def draining(self) -> bool: ...

    @property
    def auth(self) -> Auth | None: ...  # None when every route is public

    @property
    def audit(self) -> Recorder | None: ...  # the audit log; None before start

    @property
    def metrics(self) -> Metrics: ...  # this process's share of GET /metrics

    @property
    def replicas(self) -> Replicas | None: ...  # the processes sharing the store; None: alone

    async def admit(
        self, request: web.BaseRequest, route: Route, ask: Ask, runtime: Runtime
    ) -> Admission: ...  # stages 5 and 6 of the pipeline, for forward-auth

    async def reload(self, actor: str = "signal") -> Prepared: ...  # SIGHUP, POST /reload


# A /.gateway/* endpoint: (request, the gateway, request id) -> response.
Endpoint = Callable[[web.BaseRequest, GatewayState, str], Awaitable[web.StreamResponse]]
