"""Prometheus metrics (SPEC §11 `GET /metrics`), summed over every worker of one gateway.

    Metrics()                     one per Gateway: written where things happen
      .served(route, decision, status, reason, started)   once per request (the hot path:
                                  one counter increment and one histogram observation)
      .event(event)               an events sink: logins, MFA failures, alerts
      .start(audit, plugins)      samples the audit queue and plugin failures every second
    exposition(metrics, sessions) -> (body, content type)   what a scrape answers

With `server.workers: N` the parent sets PROMETHEUS_MULTIPROC_DIR to a fresh directory
before starting the workers (gateway.supervisor): prometheus-client then keeps every value
in a small memory-mapped file per process there, and a scrape, answered by whichever worker
the admin connection reached, reads all the files and adds them up (its multiprocess
mode). Without that variable the values live in the process's default registry.

    gateway_requests_total{route,decision}   every request; route is a route id, `gateway`
                                             for /.gateway/*, `none` when nothing matched;
                                             decision allow | deny | would-deny | none
    gateway_request_duration_seconds         the same requests, by latency
    gateway_upstream_errors_total{route,reason}   502/504 made by the gateway (unreachable,
                                             timed out, TLS refused), not an upstream's own
    gateway_logins_total, gateway_mfa_failures_total, gateway_alerts_total{type}
    gateway_audit_queue_depth                records waiting for the disk, all workers
    gateway_plugin_failures_total{plugin}    records a plugin sink lost (raised, timed out)
    gateway_active_sessions                  live sessions, counted in the store at scrape
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from gateway.events import Event
from gateway.store import StoreUnavailable

if TYPE_CHECKING:
    from gateway.audit.recorder import Recorder
    from gateway.plugins import Plugins
    from gateway.sessions import Sessions

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_EVERY = 1.0  # seconds between samples of the audit queue and plugin failures

REQUESTS = Counter(
    "gateway_requests", "Requests answered, by route and decision", ("route", "decision")
)
LATENCY = Histogram(
    "gateway_request_duration_seconds",
    "Time from the request's arrival to its response (headers and body handed over)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors", "502 and 504 answers made by the gateway", ("route", "reason")
)
LOGINS = Counter("gateway_logins", "Logins completed at the identity provider")
MFA_FAILURES = Counter("gateway_mfa_failures", "Second-factor codes refused (mfa.failed)")
ALERTS = Counter("gateway_alerts", "Alerts raised, by type (alert.*)", ("type",))
AUDIT_QUEUE = Gauge(
    "gateway_audit_queue_depth",
    "Audit records waiting to be written, summed over live workers",
    multiprocess_mode="livesum",
)
PLUGIN_FAILURES = Counter(
    "gateway_plugin_failures", "Records a plugin sink lost (it raised or timed out)", ("plugin",)
)


class Metrics:
    def __init__(self) -> None:
        self._counted: dict[tuple[str, str], Counter] = {}  # label children, found once
        self._failed: dict[str, int] = {}  # plugin failures already counted
        self._audit: Recorder | None = None
        self._plugins: Plugins | None = None
        self._sampler: asyncio.Task[None] | None = None

    def served(self, route: str, decision: str, status: int, reason: str, started: float) -> None:
        """One request answered; `started` is its time.monotonic() on arrival."""
        key = (route, decision)
        child = self._counted.get(key)
        if child is None:  # route ids come from the config: a bounded set of labels
            child = self._counted[key] = REQUESTS.labels(route, decision)
        child.inc()
        LATENCY.observe(time.monotonic() - started)
        if status in (502, 504) and reason != "-":
            UPSTREAM_ERRORS.labels(route, reason).inc()

    def event(self, event: Event) -> None:
        """An events sink (gateway.events.add_sink)."""
        kind = event.type
        if kind == "auth.login":
            LOGINS.inc()
        elif kind == "mfa.failed":
            MFA_FAILURES.inc()
        elif kind.startswith("alert."):
            ALERTS.labels(kind.removeprefix("alert.")).inc()

    def start(self, audit: Recorder | None, plugins: Plugins) -> None:
        self._audit, self._plugins = audit, plugins
        loop = asyncio.get_running_loop()
        self._sampler = loop.create_task(self._sample_now_and_then(), name="metrics:sample")

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None

    def sample(self) -> None:
        """The audit queue's depth now; plugin failures since the last sample."""
        if self._audit is not None:
            AUDIT_QUEUE.set(int(self._audit.writer.stats["queued"]))
        if self._plugins is not None:
            for name, stats in self._plugins.stats().items():
                new = stats.failed - self._failed.get(name, 0)
                if new > 0:
                    PLUGIN_FAILURES.labels(name).inc(new)
                    self._failed[name] = stats.failed

    async def _sample_now_and_then(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_EVERY)


class _Sessions(Collector):
    """gateway_active_sessions, counted when scraped (the store is shared by every worker)."""

    def __init__(self, count: int | None) -> None:
        self._count = count

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._count is not None:
            yield GaugeMetricFamily(
                "gateway_active_sessions", "Live sessions in the session store", self._count
            )


async def exposition(metrics: Metrics, sessions: Sessions | None) -> tuple[bytes, str]:
    """The text a scrape answers, and its content type; the files are read in a thread."""
    metrics.sample()  # this worker's own values fresh; the others' are at most a second old
    count = None
    if sessions is not None:
        with contextlib.suppress(StoreUnavailable):  # the rest is still worth a scrape
            count = sum(sessions.within_limits(s) for s in await sessions.listing())
    multiprocess = bool(os.environ.get(MULTIPROC_DIR))
    body = await asyncio.to_thread(_generate, _Sessions(count), multiprocess)
    return body, CONTENT_TYPE_LATEST


def _generate(sessions: _Sessions, multiprocess: bool) -> bytes:
    registry = CollectorRegistry()
    if multiprocess:
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # every worker's files
    registry.register(sessions)
    own = generate_latest(registry)
    return own if multiprocess else generate_latest(REGISTRY) + own
