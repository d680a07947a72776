"""One loaded configuration, compiled for the request path.

`Runtime.build(settings)` turns validated settings into what each request
needs: the route table, each route's upstream (TLS contexts built once), the
trusted proxies, every protected route's compiled policy. A request reads
the current Runtime once and uses it to the end, so a reload (which swaps
the whole object) never mixes two configs in one request.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.addresses import TrustedProxies
from gateway.globs import GlobSet
from gateway.policy import PolicySet, compile_policies
from gateway.proxy import Upstream, compile_upstream, upstream_tls_context
from gateway.routing import RouteTable
from gateway.settings import Route, Settings

_TlsKey = tuple[str | None, str | None, str | None]


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    routes: RouteTable[Route]
    upstreams: Mapping[str, Upstream]
    trusted: TrustedProxies
    secure: bool  # users reach us over https (public_url): HSTS on our pages
    idle_ignore: GlobSet  # requests that never count as session activity
    policies: PolicySet  # route id -> compiled policy, for every protected route; .hash

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        server = settings.server
        hosts = {server.public_url.host, *server.allowed_hosts}
        contexts: dict[_TlsKey, ssl.SSLContext] = {}
        return cls(
            settings=settings,
            routes=RouteTable(settings.routes, extra_hosts=hosts),
            upstreams={r.id: _upstream(r, contexts) for r in settings.routes},
            trusted=TrustedProxies(server.trusted_proxies),
            secure=server.public_url.scheme == "https",
            idle_ignore=GlobSet(settings.sessions.idle_ignore_paths),
            policies=compile_policies(settings),
        )


def _upstream(route: Route, contexts: dict[_TlsKey, ssl.SSLContext]) -> Upstream:
    """Compile one route's upstream; routes with the same TLS settings share one context."""
    up, tls = route.upstream, route.upstream_tls
    context = None
    if up.scheme == "https":
        key: _TlsKey = (None, None, None)
        if tls is not None:
            key = tuple(str(f) if f else None for f in (tls.ca_file, tls.cert_file, tls.key_file))  # type: ignore[assignment]
        if key not in contexts:
            contexts[key] = upstream_tls_context(*key)
        context = contexts[key]
    host = f"[{up.host}]" if ":" in up.host else up.host
    base = f"{up.scheme}://{host}:{up.port}{up.base_path}"
    server_name = tls.server_name if tls is not None else None
    return compile_upstream(route, base, context, server_name)
