"""Live reload (SIGHUP, admin `POST /reload`): re-read the file, swap routes and policies whole.

    prepare(current, identities) -> Prepared     off the event loop: parse, validate, compile
    Gateway.apply(prepared.runtime)              one assignment: in-flight requests finish on
                                                 the Runtime they started with

A file with errors changes nothing and reports them all (FILE:LINE:COL, as check-config).
What a reload may change: `routes` (and their policies), `server.allowed_hosts`,
`server.trusted_proxies`, `sessions.idle_ignore_paths`, `rate_limits`, `alerts`. Any other
change (listeners, the IdP, stores, keys, cookie names, timeouts) needs a restart, so a file
that changes one of those is refused as a whole, naming the sections: half of a new config
must never run beside half of the old one.

Every reload is an event: `policy.reloaded` with both policy hashes and who gained and who
lost access to which route (for the identities with live sessions: a widened policy is
visible the moment it ships), or `policy.reload_failed` with the errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.events import Event, emit
from gateway.policy import Identity, RoutePolicy, reachable
from gateway.runtime import Runtime
from gateway.settings import ConfigError, Settings, load_settings

log = logging.getLogger("gateway.reload")

# Top-level sections (and server.* keys) a reload may change; everything else needs a restart.
RELOADABLE = frozenset({"routes", "rate_limits", "alerts"})
RELOADABLE_SERVER = frozenset({"allowed_hosts", "trusted_proxies"})
RELOADABLE_SESSIONS = frozenset({"idle_ignore_paths"})
MAX_DIFF = 1000  # gains and losses listed in the event; the counts are always whole


@dataclass(frozen=True, slots=True)
class Change:
    user: str
    route: str


@dataclass(frozen=True, slots=True)
class Prepared:
    """A reload's outcome: a new Runtime to apply, or the errors that kept the old one."""

    runtime: Runtime | None
    errors: tuple[str, ...] = ()
    gained: tuple[Change, ...] = ()
    lost: tuple[Change, ...] = ()
    routes_added: tuple[str, ...] = ()
    routes_removed: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.runtime is not None


async def prepare(current: Runtime, identities: Iterable[Identity]) -> Prepared:
    """Read and compile the config file again; nothing changes until the caller applies it."""
    source = current.settings.source
    if source is None:
        return Prepared(None, ("this configuration was not loaded from a file",))
    try:
        settings = await asyncio.to_thread(load_settings, source)
    except ConfigError as err:
        return Prepared(None, tuple(str(err).splitlines()))
    restart = restart_needed(current.settings, settings)
    if settings.protected_routes and not current.settings.protected_routes:
        restart.append("the first protected route (login and sessions start with the process)")
    if restart:
        return Prepared(None, (f"{source}: changes need a restart: {', '.join(restart)}",))
    try:
        runtime = await asyncio.to_thread(Runtime.build, settings)
    except (OSError, ValueError) as err:  # an unreadable upstream CA file, ...
        return Prepared(None, (f"{source}: {err}",))
    gained, lost = access_changes(current, runtime, identities)
    old_ids, new_ids = set(current.upstreams), set(runtime.upstreams)
    return Prepared(
        runtime,
        gained=gained,
        lost=lost,
        routes_added=tuple(sorted(new_ids - old_ids)),
        routes_removed=tuple(sorted(old_ids - new_ids)),
    )


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The sections that differ but cannot change without a restart."""
    # SECURITY: Python mode, not JSON: JSON masks every secret as "****", so a swapped state key
    # or client secret would compare equal, be reported as reloaded, and never be applied.
    a, b = old.model_dump(), new.model_dump()
    changed = [k for k in a.keys() | b.keys() if k not in RELOADABLE and a.get(k) != b.get(k)]
    needs = []
    for section in sorted(changed):
        keep = {"server": RELOADABLE_SERVER, "sessions": RELOADABLE_SESSIONS}.get(section)
        if keep is None:
            needs.append(section)
            continue
        before, after = a.get(section) or {}, b.get(section) or {}
        needs += [
            f"{section}.{k}"
            for k in sorted(before.keys() | after.keys())
            if k not in keep and before.get(k) != after.get(k)
        ]
    return needs


def access_changes(
    old: Runtime, new: Runtime, identities: Iterable[Identity]
) -> tuple[tuple[Change, ...], tuple[Change, ...]]:
    """Who can reach which route now and could not before (gained), and the reverse (lost)."""
    changed = [
        route_id
        for route_id in old.policies.keys() | new.policies.keys()
        if _content(old.policies.get(route_id)) != _content(new.policies.get(route_id))
    ]
    gained: list[Change] = []
    lost: list[Change] = []
    for identity in identities:
        for route_id in sorted(changed):
            before = _reaches(identity, old.policies.get(route_id))
            after = _reaches(identity, new.policies.get(route_id))
            if after and not before:
                gained.append(Change(identity.user, route_id))
            elif before and not after:
                lost.append(Change(identity.user, route_id))
    return tuple(gained), tuple(lost)


def _content(policy: RoutePolicy | None) -> object:
    return None if policy is None else policy.content_hash


def _reaches(identity: Identity, policy: RoutePolicy | None) -> bool:
    return policy is not None and reachable(identity, policy)


def announce(before: Runtime, prepared: Prepared, actor: str) -> None:
    if not prepared.ok:
        emit(Event("policy.reload_failed", {"actor": actor, "errors": list(prepared.errors)}))
        return
    assert prepared.runtime is not None
    fields: dict[str, object] = {
        "actor": actor,
        "policy_hash_before": before.policies.hash,
        "policy_hash_after": prepared.runtime.policies.hash,
        "routes_added": list(prepared.routes_added),
        "routes_removed": list(prepared.routes_removed),
        "gained": [{"user": c.user, "route": c.route} for c in prepared.gained[:MAX_DIFF]],
        "lost": [{"user": c.user, "route": c.route} for c in prepared.lost[:MAX_DIFF]],
        "gained_count": len(prepared.gained),
        "lost_count": len(prepared.lost),
    }
    emit(Event("policy.reloaded", fields))
