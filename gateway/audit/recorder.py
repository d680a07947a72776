"""What the gateway writes into its audit log, and when (SPEC §8, stage 7 of the pipeline).

    Recorder.access(...)   the decision record of one request; a future to await when it
                           must be on disk before forwarding (sync methods, phi routes)
    Recorder.done(...)     access.done: status, bytes, duration, once the response is over
    Recorder.noise(...)    refusals of unidentified clients (400/401/404/421...): recorded
                           one by one up to NOISE_PER_MINUTE, then folded into one
                           access.summary record a minute, so an anonymous flood can neither
                           fill the disk nor crowd out the records of signed-in users
    Recorder.event(event)  every security event (auth.*, session.*, admin.*, policy.*)

Paths follow the route's `log_path` (full, the route id, or a keyed HMAC); query strings are
always keyed HMACs. Nothing that identifies a session or proves an identity (ids, tokens,
cookies, codes) is ever a field here: the session is named by its public handle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.files import FileLayer
from gateway.audit.record import keyed_hmac
from gateway.audit.writer import AuditWriter, WriterConfig, origin_for
from gateway.events import Event
from gateway.keyfiles import load_private_key
from gateway.keyring import Keyring
from gateway.plugins import Plugins
from gateway.settings import Route, Settings

log = logging.getLogger("gateway.audit")

NOISE_PER_MINUTE = 60  # individual records of unidentified refusals per minute, per process
_BUSIEST = 10  # addresses named in an access.summary


class Who(NamedTuple):  # per request: built 3x faster than a frozen dataclass
    """The caller as the log shows them (None fields for an anonymous request)."""

    user: str | None = None
    sub: str | None = None
    groups: tuple[str, ...] = ()
    client: str | None = None
    session: str | None = None  # the public handle, never the id
    mfa: bool = False


ANONYMOUS = Who()


class Recorder:
    def __init__(
        self,
        writer: AuditWriter,
        hmac_key: bytes,
        sync_methods: frozenset[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.writer = writer
        self.plugins: Plugins | None = None  # sinks for access records and events
        self._key = hmac_key
        self._sync = sync_methods
        self._clock = clock
        self._minute = self._minute_of(clock())
        self._noise = 0  # unidentified refusals recorded one by one this minute
        self._folded: Counter[tuple[int, str]] = Counter()
        self._folded_clients: Counter[str] = Counter()

    @property
    def available(self) -> bool:
        return bool(self.writer.healthy)

    def access(
        self,
        *,
        request_id: str,
        route: Route,
        method: str,
        host: str,
        path: str,
        query: str,
        decision: str,
        reason: str,
        who: Who,
        client_ip: str,
        user_agent: str | None,
        upstream: str | None,
        policy_hash: str | None,
    ) -> asyncio.Future[None] | None:
        """Hand the decision record to the writer; durable ones come with a future to await."""
        durable = method in self._sync or route.classification == "phi"
        fields = {
            "request_id": request_id,
            "route": route.id,
            "method": method,
            "host": host,
            "path": self._path(route, path),
            "query_hmac": keyed_hmac(self._key, query) if query else None,
            "decision": decision,
            "reason": reason,
            "user": who.user,
            "sub": who.sub,
            "groups": who.groups,  # a tuple: orjson writes it as a list
            "client": who.client,
            "session": who.session,
            "mfa": who.mfa,
            "client_ip": client_ip,
            "user_agent": user_agent,
            "upstream": upstream,
            "policy_hash": policy_hash,
        }
        anonymous = who.user is None
        if self.plugins is not None:  # first: the writer owns `fields` once it has them
            self.plugins.on_access(fields)
        if durable:
            return self.writer.submit("access", fields, durable=True, anonymous=anonymous)
        self.writer.post("access", fields, anonymous=anonymous)
        return None

    def done(
        self,
        request_id: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        *,
        anonymous: bool,
    ) -> None:
        fields = {
            "request_id": request_id,
            "status": status,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "duration_ms": round(duration * 1000, 3),
        }
        self.writer.post("access.done", fields, anonymous=anonymous)

    def noise(self, status: int, reason: str, client_ip: str, fields: Mapping[str, Any]) -> None:
        """An unidentified client refused: a record while under the rate, else a tally."""
        self._roll()
        if self._noise < NOISE_PER_MINUTE:
            self._noise += 1
            record = {**fields, "status": status, "reason": reason, "client_ip": client_ip}
            self.writer.post("access", record, anonymous=True)
            return
        self._folded[(status, reason)] += 1
        self._folded_clients[client_ip] += 1

    def tick(self) -> None:
        """Called now and then (every few seconds): a quiet minute still gets its summary."""
        self._roll()

    def event(self, event: Event) -> None:
        self.writer.post(event.type, dict(event.fields))
        if self.plugins is not None:
            self.plugins.on_event({"type": event.type, **event.fields})

    def flush(self) -> None:
        """Write the pending access.summary now (at a minute's end, and before closing)."""
        if self._folded:
            counts = [
                {"status": status, "reason": reason, "count": n}
                for (status, reason), n in sorted(self._folded.items())
            ]
            busiest = [
                {"client_ip": ip, "count": n}
                for ip, n in self._folded_clients.most_common(_BUSIEST)
            ]
            summary = {
                "minute": self._minute,
                "counts": counts,
                "clients": busiest,
                "total": sum(self._folded.values()),
            }
            self.writer.post("access.summary", summary, anonymous=True)
        self._folded.clear()
        self._folded_clients.clear()

    def _roll(self) -> None:
        minute = self._minute_of(self._clock())
        if minute != self._minute:
            self.flush()
            self._minute, self._noise = minute, 0

    def _path(self, route: Route, path: str) -> str:
        if route.log_path == "route":
            return route.id
        if route.log_path == "hmac":
            return keyed_hmac(self._key, path)
        return path

    @staticmethod
    def _minute_of(ts: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(ts))


async def open_recorder(
    settings: Settings,
    clock: Callable[[], float] = time.time,
    files: FileLayer | None = None,
    plugins: Plugins | None = None,
    worker: int = 0,
) -> Recorder:
    """The process's audit log: its writer (chain continued or begun) and HMAC key; worker
    N > 0 of server.workers writes its own chain (origin_for)."""
    audit = settings.audit
    if audit.signing_key_file is not None:
        key = await asyncio.to_thread(load_private_key, audit.signing_key_file, "ed25519")
    else:
        key = Ed25519PrivateKey.generate()
        log.warning(
            "audit.signing_key_file is not set: checkpoints are signed with an ephemeral key "
            "named only by the log itself; make one with `gateway keys generate DIR`"
        )
    previous = [
        await asyncio.to_thread(load_private_key, path, "ed25519")
        for path in audit.previous_signing_key_files
    ]
    config = WriterConfig.from_settings(audit, origin_for(audit.origin, worker))
    listeners = [plugins.on_records] if plugins is not None else []
    writer = await AuditWriter.open(
        config, key, previous_keys=previous, clock=clock, files=files, listeners=listeners
    )
    keys = settings.state.key_bytes
    # Without state.keys (public routes only) the HMACs are of this process alone.
    hmac_key = Keyring(keys).derive(_HMAC_LABEL) if keys else os.urandom(32)
    recorder = Recorder(writer, hmac_key, frozenset(audit.sync_methods), clock)
    recorder.plugins = plugins
    return recorder


_HMAC_LABEL = "audit-hmac"
