"""The evidence bundle's sections on operations (docs/reports.md): 02.i removal of access,
09.aa/09.ac audit logging and its protection, 09.ab monitoring, 09.ad admin actions, and
break-glass (HIPAA 164.312(a)(2)(ii)).

    operations_sections(inputs) -> (Section, ...)
"""

from __future__ import annotations

from datetime import datetime

from gateway.audit.verify import OriginReport
from gateway.evidence import Inputs, Scalar, Section, detail, events_table, table
from gateway.evidence_log import ENDED_WITHIN, Disable, LogTally


def operations_sections(i: Inputs) -> tuple[Section, ...]:
    return (_removal(i), _logging(i), _monitoring(i), _administrators(i), _break_glass(i))


def _removal(i: Inputs) -> Section:
    disables = i.tally.disables()
    rows = []
    for disable, allowed in zip(disables, i.allowed_after, strict=True):
        rows.append((*_disable_cells(i.tally, disable), allowed, disable.until))
    admin = i.tally.events("admin")
    revokes = [r for r in admin.rows if r.get("type") in _REVOKING and r.get("outcome") == "ok"]
    ended = i.tally.sessions_ended
    return Section(
        "02.i",
        ("02.i",),
        ("164.308(a)(3)(ii)(C)",),
        "Removal of access rights",
        "Disables in the period (by an admin, or an access review's revoke), the sessions each "
        f"ended within {ENDED_WITHIN:.0f} s and how long after the disable the last one ended, "
        "and the requests allowed to that identity after its disable (0 expected); session "
        "revocations by admins.",
        {
            "disables": len(disables),
            "enables": i.tally.types["user.enabled"],
            "review_revokes": sum(1 for a in i.attestations if a.decision == "revoke"),
            "sessions_ended_user_disabled": ended["user-disabled"],
            "sessions_ended_admin_revoked": ended["admin-revoked"],
            "allowed_after_disable": sum(i.allowed_after),
        },
        (
            table(
                "disables",
                "Disables and their effect",
                (
                    "ts",
                    "user",
                    "actor",
                    "reason",
                    "sessions_ended",
                    "seconds_to_last_end",
                    "allowed_after",
                    "enabled_at",
                ),
                rows,
            ),
            table(
                "revocations",
                "Session revocations by admins",
                ("ts", "actor", "action", "subject", "count"),
                (
                    (r.get("ts"), r.get("actor"), r.get("type"), r.get("subject"), r.get("count"))
                    for r in revokes
                ),
            ),
        ),
    )


_REVOKING = frozenset({"admin.user_revoked", "admin.session_ended", "admin.user_disabled"})


def _disable_cells(tally: LogTally, disable: Disable) -> tuple[Scalar, ...]:
    sub = disable.identity.partition("|")[2]
    start = datetime.fromisoformat(disable.ts).timestamp()
    waits = [
        datetime.fromisoformat(ts).timestamp() - start
        for ts, who in tally.ended_disabled
        if who == sub and ts >= disable.ts
    ]
    waits = [wait for wait in waits if wait <= ENDED_WITHIN]
    last = round(max(waits), 3) if waits else None
    return (disable.ts, disable.user, disable.actor, disable.reason, len(waits), last)


def _logging(i: Inputs) -> Section:
    reports = i.verification
    retention = i.tally.events("retention")
    return Section(
        "09.aa",
        ("09.aa", "09.ac"),
        ("164.312(b)", "164.312(c)(1)"),
        "Audit logging and protection of log information",
        "Records written in the period, by origin and type, and the access decisions among "
        'them; and for the whole log in the directories given, the result of "gateway audit '
        'verify" against the audit public key (every hash link and checkpoint signature).',
        {
            "records": sum(i.tally.types.values()),
            "origins": len(reports),
            "origins_ok": sum(1 for r in reports if r.ok),
            "allowed": i.tally.decisions["allow"],
            "denied": i.tally.decisions["deny"],
            "would_deny": i.tally.decisions["would-deny"],
            "folded_unauthenticated": i.tally.folded,
            "checkpoints": i.tally.types["checkpoint"],
            "retention_events": retention.total,
        },
        (
            table(
                "verification",
                "Verification of each origin (whole log)",
                (
                    "origin",
                    "result",
                    "records",
                    "checkpoints",
                    "last_signed_seq",
                    "unsigned",
                    "open",
                    "problem",
                ),
                (_verified(r) for r in reports),
            ),
            table(
                "origins",
                "Records in the period by origin",
                ("origin", "records", "first", "last"),
                ((o, s.count, s.first, s.last) for o, s in sorted(i.tally.origins.items())),
            ),
            table(
                "types",
                "Records in the period by type",
                ("type", "count"),
                sorted(i.tally.types.items()),
            ),
            events_table(
                "retention",
                "Retention",
                ("ts", "type", "detail"),
                retention,
                lambda r: (r.get("ts"), r.get("type"), detail(r)),
            ),
        ),
    )


def _verified(report: OriginReport) -> tuple[Scalar, ...]:
    failure = report.failure
    problem = f"seq {failure.seq}: {failure.kind}: {failure.detail}" if failure else None
    return (
        report.origin,
        "OK" if report.ok else "FAIL",
        report.records,
        report.checkpoints,
        report.last_signed_seq,
        report.unsigned,
        report.still_open,
        problem,
    )


def _monitoring(i: Inputs) -> Section:
    alerts = i.tally.events("alert")
    config = i.settings.alerts
    summary: dict[str, Scalar] = {
        "alerts": alerts.total,
        "new_ip_login_enabled": config.new_ip_login,
        "privilege_change_enabled": config.privilege_change,
        "disabled_user_attempt_enabled": config.disabled_user_attempt,
        "deny_burst": f"{config.deny_burst.count} in {config.deny_burst.window:g} s",
    }
    summary |= {kind: n for kind, n in sorted(i.tally.alerts.items())}
    return Section(
        "09.ab",
        ("09.ab",),
        ("164.308(a)(1)(ii)(D)",),
        "Monitoring system use",
        "Alerts raised in the period (a login from a new network, a privilege change, a "
        "disabled user trying again, a burst of denials) and the alert settings in force.",
        summary,
        (
            events_table(
                "alerts",
                "Alerts",
                ("ts", "type", "who", "detail"),
                alerts,
                lambda r: (
                    r.get("ts"),
                    r.get("type"),
                    r.get("user") or r.get("identity") or r.get("client_ip"),
                    detail(r, ("user",)),
                ),
            ),
        ),
    )


def _administrators(i: Inputs) -> Section:
    calls = i.tally.events("admin")
    actors = i.tally.admin_actors
    return Section(
        "09.ad",
        ("09.ad",),
        ("164.312(b)",),
        "Administrator and operator logs",
        "Every admin API call in the period: each is an admin.* record naming the token that "
        "made it as the actor, with its outcome (ok, refused, failed).",
        {
            "calls": calls.total,
            "refused": sum(n for (_, outcome), n in actors.items() if outcome == "refused"),
            "failed": sum(n for (_, outcome), n in actors.items() if outcome == "failed"),
            "actors": len({actor for actor, _ in actors}),
        },
        (
            table(
                "by_actor",
                "Calls by actor and outcome",
                ("actor", "outcome", "count"),
                ((a, o, n) for (a, o), n in sorted(actors.items())),
            ),
            events_table(
                "calls",
                "Admin calls",
                ("ts", "actor", "role", "action", "method", "path", "status", "outcome"),
                calls,
                lambda r: (
                    r.get("ts"),
                    r.get("actor"),
                    r.get("role"),
                    r.get("type"),
                    r.get("method"),
                    r.get("path"),
                    r.get("status"),
                    r.get("outcome"),
                ),
            ),
        ),
    )


def _break_glass(i: Inputs) -> Section:
    used = i.tally.events("break_glass")
    config = i.settings.break_glass
    return Section(
        "break-glass",
        (),
        ("164.312(a)(2)(ii)",),
        "Emergency access (break-glass)",
        "Whether break-glass accounts are configured, and every break_glass.* event of the "
        "period (an account opened, closed, failed or locked).",
        {
            "configured": config.accounts_file is not None,
            "max_duration_seconds": config.max_duration,
            "events": used.total,
        },
        (
            events_table(
                "break_glass",
                "Break-glass events",
                ("ts", "type", "actor", "detail"),
                used,
                lambda r: (r.get("ts"), r.get("type"), r.get("actor"), detail(r, ("actor",))),
            ),
        ),
    )
