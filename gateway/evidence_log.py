"""What the audit log shows over a period, for the evidence report (docs/reports.md).

    read(dirs) -> Iterator[dict]          every record of every origin in `dirs`, each
                                          origin's in chain order (gateway.audit.tail.Reader)
    LogTally(start, end).take(record)     one pass: counts and the events each section cites
    after_disable(records, disables)      allowed requests by each disabled identity after
                                          its disable (a second pass: origins interleave)

Records are in the period when `start <= ts < end`; `ts` is compared as text, which the
fixed RFC 3339 form of the log (`2026-01-31T09:15:00.123456Z`) orders correctly. Event
lists keep the first KEPT of each kind and count the rest. Reading is blocking file I/O:
this runs from the command line, never on the gateway's event loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.audit.record import timestamp
from gateway.audit.tail import Reader

KEPT = 1000  # events of one kind listed in a bundle; beyond, only counted
ENDED_WITHIN = 60.0  # seconds after a disable in which its session.ended records are its effect

Record = Mapping[str, Any]


def read(dirs: Iterable[Path]) -> Iterator[Record]:
    seen: set[Path] = set()
    for directory in dirs:
        if directory.resolve() in seen:
            continue
        seen.add(directory.resolve())
        for entry in Reader(directory).read():
            if entry.record is not None:  # a broken line: `audit verify` names it
                yield entry.record


@dataclass(slots=True)
class Kept:
    """The first KEPT events of a kind, and how many there were."""

    rows: list[Record] = field(default_factory=list)
    total: int = 0

    def add(self, record: Record) -> None:
        self.total += 1
        if len(self.rows) < KEPT:
            self.rows.append(record)


@dataclass(slots=True)
class Span:
    count: int = 0
    first: str = ""
    last: str = ""

    def add(self, ts: str) -> None:
        self.count += 1
        self.first = min(self.first, ts) if self.first else ts
        self.last = max(self.last, ts)


@dataclass(frozen=True, slots=True)
class Disable:
    ts: str
    identity: str
    user: str
    actor: str
    reason: str
    until: str | None  # when it was enabled again, within the period


class LogTally:
    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = timestamp(start), timestamp(end)
        self.types: Counter[str] = Counter()
        self.origins: dict[str, Span] = {}
        self.decisions: Counter[str] = Counter()
        self.policy_hashes: dict[str, Span] = {}
        self.active: dict[str, str] = {}  # sub -> user: logged in or allowed in the period
        self.second_factor: set[str] = set()  # subs whose allowed requests carried MFA
        self.login_failed: Counter[str] = Counter()
        self.sessions_ended: Counter[str] = Counter()
        self.mfa: Counter[str] = Counter()
        self.alerts: Counter[str] = Counter()
        self.admin_actors: Counter[tuple[str, str]] = Counter()  # (actor, outcome)
        self.folded = 0  # requests folded into access.summary records
        self.ended_disabled: list[tuple[str, str]] = []  # (ts, sub) of session.ended user-disabled
        self.kept: dict[str, Kept] = {}
        self._enabled: list[tuple[str, str]] = []  # (ts, identity)
        self._by_type: dict[str, Callable[[Record], None]] = {
            "access": self._access,
            "access.summary": self._summary,
            "auth.login": self._login,
            "auth.login_failed": self._login_failed,
            "session.ended": self._session_ended,
            "user.enabled": self._user_enabled,
        }

    def events(self, kind: str) -> Kept:
        return self.kept.get(kind) or Kept()

    def take(self, record: Record) -> None:
        ts, kind = record.get("ts"), record.get("type")
        if not (isinstance(ts, str) and isinstance(kind, str) and self.start <= ts < self.end):
            return
        self.types[kind] += 1
        self.origins.setdefault(str(record.get("origin")), Span()).add(ts)
        handler = self._by_type.get(kind)
        if handler is not None:
            handler(record)
        family = kind.partition(".")[0]
        if family == "mfa":
            self.mfa[kind] += 1
        elif family == "alert":
            self.alerts[kind] += 1
        elif family == "admin":
            self.admin_actors[(str(record.get("actor")), str(record.get("outcome")))] += 1
        if family in _LISTED_FAMILIES:
            self.kept.setdefault(family, Kept()).add(record)
        if kind in _LISTED:
            self.kept.setdefault(kind, Kept()).add(record)

    def _access(self, record: Record) -> None:
        decision = str(record.get("decision"))
        self.decisions[decision] += 1
        digest = record.get("policy_hash")
        if isinstance(digest, str):
            self.policy_hashes.setdefault(digest, Span()).add(str(record["ts"]))
        sub = record.get("sub")
        if decision == "allow" and isinstance(sub, str) and record.get("client") is None:
            self.active.setdefault(sub, str(record.get("user")))
            if record.get("mfa") is True:
                self.second_factor.add(sub)

    def _summary(self, record: Record) -> None:
        total = record.get("total")
        self.folded += total if isinstance(total, int) else 0

    def _login(self, record: Record) -> None:
        sub = record.get("sub")
        if isinstance(sub, str):
            self.active[sub] = str(record.get("user"))

    def _login_failed(self, record: Record) -> None:
        self.login_failed[str(record.get("reason"))] += 1

    def _session_ended(self, record: Record) -> None:
        reason = str(record.get("reason"))
        self.sessions_ended[reason] += 1
        if reason == "user-disabled":
            self.ended_disabled.append((str(record["ts"]), str(record.get("sub"))))

    def _user_enabled(self, record: Record) -> None:
        self._enabled.append((str(record["ts"]), str(record.get("identity"))))

    def disables(self) -> list[Disable]:
        """The disables of the period, each with its enable (if one followed in the period)."""
        found = []
        for record in self.events("user.disabled").rows:
            ts, identity = str(record["ts"]), str(record.get("identity"))
            later = [at for at, who in self._enabled if who == identity and at > ts]
            found.append(
                Disable(
                    ts,
                    identity,
                    str(record.get("user")),
                    str(record.get("actor")),
                    str(record.get("reason") or ""),
                    min(later) if later else None,
                )
            )
        return found


# Events listed in the bundle: these types, and every type of these families (as the family).
_LISTED = frozenset(
    {
        "policy.reloaded",
        "policy.reload_failed",
        "review.attested",
        "user.disabled",
        "user.enabled",
        "user.email_changed",
        "auth.login_refused",
        "alert.privilege_change",
    }
)
_LISTED_FAMILIES = frozenset({"alert", "admin", "break_glass", "retention"})


def after_disable(records: Iterable[Record], disables: list[Disable], end: str) -> list[int]:
    """For each disable: the allowed requests by its identity after it (until its enable)."""
    counts = [0] * len(disables)
    by_sub: dict[str, list[int]] = {}
    for i, disable in enumerate(disables):
        by_sub.setdefault(disable.identity.partition("|")[2], []).append(i)
    for record in records:
        if record.get("type") != "access" or record.get("decision") != "allow":
            continue
        ts = str(record.get("ts"))
        for i in by_sub.get(str(record.get("sub")), ()):
            if disables[i].ts < ts < (disables[i].until or end):
                counts[i] += 1
    return counts
