"""Alerts (SPEC §3 `alerts`, §9 `on_alert`): misuse seen as it happens, each cause once.

    Monitor(alerts, clock)
      .login(seen, session, client_ip)      alert.new_ip: a /24 (IPv6 /64) never seen for the
                                            user (not on a first login: there is no history);
                                            alert.privilege_change: groups gained or lost since
                                            the last login, with the routes newly reachable
      .reload(gained)                       alert.privilege_change for a reload that widens access
      .refused(user, identity, why, ...)    alert.disabled_user_attempt: a disabled user, or a
                                            session an admin revoked, trying again
      .denied(user, client_ip)              alert.deny_burst: more than deny_burst.count policy
                                            denials for one user or address within the window

Alerts are `alert.*` events (gateway.events.emit): they reach the audit log and the process
log, and the gateway hands every one to the plugins' `on_alert` hook (a webhook, say).
"Once per cause": a new network alerts once (it is then known); a disabled user once per
disable; a revoked session once per session; a deny burst once until a whole window passes
without one. Counting is per process (with N workers, up to N alerts for one burst).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from gateway.directory import Seen
from gateway.events import Event, emit
from gateway.policy import Identity, PolicySet, reachable
from gateway.sessions import Session
from gateway.settings import Alerts

Clock = Callable[[], float]
_MAX_KEYS = 50_000  # distinct users/addresses tracked for bursts; past it, start over
_MAX_ONCE = 100_000


@dataclass(slots=True)
class _Burst:
    times: deque[float] = field(default_factory=deque)
    quiet_until: float = 0.0  # no second alert for this key before then


class Monitor:
    def __init__(self, alerts: Alerts, clock: Clock = time.time) -> None:
        self.alerts = alerts  # replaced by a reload with the rest of the settings
        self.policies: PolicySet | None = None  # set by the gateway: routes newly reachable
        self._clock = clock
        self._bursts: dict[str, _Burst] = {}
        self._once: set[str] = set()

    def login(self, seen: Seen, session: Session, client_ip: str) -> None:
        who: dict[str, object] = {
            "user": session.user,
            "sub": session.sub,
            "session": session.handle,
        }
        if self.alerts.new_ip_login and seen.new_network is not None:
            known = sorted(n for n in seen.entry.networks if n != seen.new_network)
            _alert(
                "alert.new_ip",
                who,
                client_ip=client_ip,
                network=seen.new_network,
                known_networks=known[-10:],
            )
        if self.alerts.privilege_change and (seen.gained or seen.lost):
            before = _groups_before(session.groups, seen.gained, seen.lost)
            routes = self._newly_reachable(session, before)
            _alert(
                "alert.privilege_change",
                who,
                cause="groups-changed-at-idp",
                gained=list(seen.gained),
                lost=list(seen.lost),
                routes_gained=routes,
            )
        if seen.email_before is not None:
            emit(
                Event(
                    "user.email_changed",
                    {**who, "email_before": seen.email_before, "email": session.email},
                )
            )

    def reload(self, gained: Iterable[tuple[str, str]], policy_hash: str) -> None:
        """A reload gave these (user, route) pairs access they did not have."""
        pairs = sorted(set(gained))
        if self.alerts.privilege_change and pairs:
            _alert(
                "alert.privilege_change",
                {"actor": "reload"},
                cause="policy-reload",
                policy_hash=policy_hash,
                routes_gained=[{"user": user, "route": route} for user, route in pairs],
            )

    def refused(self, cause: str, fields: Mapping[str, object]) -> None:
        """A disabled user or an admin-revoked session trying again; `cause` is its key."""
        if not self.alerts.disabled_user_attempt or not self._first(cause):
            return
        _alert("alert.disabled_user_attempt", fields)

    def denied(self, user: str | None, client_ip: str) -> None:
        limit = self.alerts.deny_burst
        now = self._clock()
        for key in (f"user:{user}" if user else None, f"address:{client_ip}"):
            if key is None:
                continue
            burst = self._burst(key)
            burst.times.append(now)
            while burst.times and burst.times[0] <= now - limit.window:
                burst.times.popleft()
            if len(burst.times) > limit.count and now >= burst.quiet_until:
                burst.quiet_until = now + limit.window
                kind, _, value = key.partition(":")
                _alert(
                    "alert.deny_burst",
                    {kind if kind == "user" else "client_ip": value},
                    denials=len(burst.times),
                    window_s=limit.window,
                )
            elif len(burst.times) > limit.count:
                burst.quiet_until = now + limit.window  # still bursting: still the same cause

    def _burst(self, key: str) -> _Burst:
        burst = self._bursts.get(key)
        if burst is None:
            if len(self._bursts) >= _MAX_KEYS:
                self._bursts.clear()  # a flood of distinct keys: forget, never block anything
            burst = self._bursts[key] = _Burst()
        return burst

    def _first(self, cause: str) -> bool:
        if cause in self._once:
            return False
        if len(self._once) >= _MAX_ONCE:
            self._once.clear()
        self._once.add(cause)
        return True

    def _newly_reachable(self, session: Session, before: tuple[str, ...]) -> list[str]:
        if self.policies is None:
            return []
        now = Identity(session.user, session.email, session.email_verified, session.groups, None)
        then = Identity(session.user, session.email, session.email_verified, before, None)
        return sorted(
            route
            for route, policy in self.policies.items()
            if reachable(now, policy) and not reachable(then, policy)
        )


def _groups_before(
    now: tuple[str, ...], gained: tuple[str, ...], lost: tuple[str, ...]
) -> tuple[str, ...]:
    return tuple(g for g in now if g not in gained) + lost


def _alert(kind: str, who: Mapping[str, object], **fields: object) -> None:
    emit(Event(kind, {**who, **fields}))
