"""The evidence bundle's sections on identities and access (docs/reports.md): 01.a policy,
01.b registration, 01.c privileges, 01.e reviews, 01.j/01.q authentication, 01.t/01.u sessions.

    access_sections(inputs) -> (Section, ...)
"""

from __future__ import annotations

from collections import Counter

from gateway.evidence import Inputs, Scalar, Section, events_table, percent, table
from gateway.policy import PolicySet
from gateway.reports import utc
from gateway.settings import Route


def access_sections(i: Inputs) -> tuple[Section, ...]:
    return (
        _policy(i),
        _registration(i),
        _privileges(i),
        _reviews(i),
        _authentication(i),
        _sessions(i),
    )


def _policy(i: Inputs) -> Section:
    routes = i.settings.routes
    reloads = i.tally.events("policy.reloaded")
    return Section(
        "01.a",
        ("01.a",),
        ("164.312(a)(1)",),
        "Access control policy and its changes",
        "The policy in force when the bundle was made (its hash and routes; every protected "
        "route denies by default), the policy hashes that access decisions in the period were "
        "made under, and every policy reload in the period.",
        {
            "policy_hash": i.policies.hash,
            "protected_routes": sum(1 for r in routes if r.protected),
            "public_routes": sum(1 for r in routes if r.public),
            "hashes_seen": len(i.tally.policy_hashes),
            "reloads": reloads.total,
            "reloads_refused": i.tally.types["policy.reload_failed"],
        },
        (
            table(
                "routes",
                "Routes in force",
                ("route", "host", "path", "public", "mode", "mfa", "classification", "rules"),
                (
                    (r.id, r.host, r.path, r.public, *_policy_cells(r.id, i.policies, r))
                    for r in routes
                ),
            ),
            table(
                "hashes",
                "Policy hashes of access decisions",
                ("policy_hash", "decisions", "first", "last"),
                ((h, s.count, s.first, s.last) for h, s in sorted(i.tally.policy_hashes.items())),
            ),
            events_table(
                "reloads",
                "Policy reloads",
                ("ts", "actor", "before", "after", "added", "removed", "gained", "lost"),
                reloads,
                lambda r: (
                    r.get("ts"),
                    r.get("actor"),
                    r.get("policy_hash_before"),
                    r.get("policy_hash_after"),
                    r.get("routes_added"),
                    r.get("routes_removed"),
                    r.get("gained_count"),
                    r.get("lost_count"),
                ),
            ),
        ),
    )


def _policy_cells(route_id: str, policies: PolicySet, route: Route) -> tuple[Scalar, ...]:
    if route_id not in policies:
        return (None, None, route.classification, None)
    policy = policies[route_id]
    rules = [rule.id for rule in policy.allow] + [rule.id for rule in policy.deny]
    mode = "report" if policy.report else "enforce"
    return (mode, policy.require_mfa, route.classification, ", ".join(rules))


def _registration(i: Inputs) -> Section:
    new = [e for e in i.entries if i.start <= e.first_login < i.end]
    refused = i.tally.events("auth.login_refused")
    return Section(
        "01.b",
        ("01.b",),
        ("164.312(a)(2)(i)",),
        "User registration and unique identities",
        "Identities in the gateway's directory when the bundle was made (one per issuer and "
        "subject, so no two people share one), those first seen in the period, and the "
        "logins, failed logins and refused logins of the period.",
        {
            "identities": len(i.entries),
            "new_in_period": len(new),
            "disabled_now": sum(1 for e in i.entries if e.disabled),
            "logins": i.tally.types["auth.login"],
            "users_active": len(i.tally.active),
            "logins_failed": sum(i.tally.login_failed.values()),
            "logins_refused": refused.total,
        },
        (
            table(
                "new_identities",
                "Identities first seen in the period",
                ("first_login", "user", "identity", "groups"),
                ((utc(e.first_login), e.user, e.identity, e.groups) for e in new),
            ),
            table(
                "failed_logins",
                "Failed logins by reason",
                ("reason", "count"),
                sorted(i.tally.login_failed.items()),
            ),
            events_table(
                "refused_logins",
                "Refused logins",
                ("ts", "identity", "reason", "client_ip"),
                refused,
                lambda r: (r.get("ts"), r.get("identity"), r.get("reason"), r.get("client_ip")),
            ),
        ),
    )


def _privileges(i: Inputs) -> Section:
    alerts = i.tally.events("alert.privilege_change")
    history = [
        (utc(at), e.user, groups)
        for e in i.entries
        for at, groups in e.groups_history[1:]  # the first is the first login's groups
        if i.start <= at < i.end
    ]
    return Section(
        "01.c",
        ("01.c",),
        ("164.308(a)(4)(ii)(C)",),
        "Privilege management",
        "Privilege changes in the period: groups gained or lost at the identity provider "
        "between two logins, and policy reloads that widened access (alert.privilege_change), "
        "with the group changes the directory recorded.",
        {"privilege_change_alerts": alerts.total, "group_changes": len(history)},
        (
            events_table(
                "privilege_changes",
                "Privilege change alerts",
                ("ts", "user", "cause", "gained", "lost", "routes_gained"),
                alerts,
                lambda r: (
                    r.get("ts"),
                    r.get("user") or r.get("actor"),
                    r.get("cause"),
                    r.get("gained"),
                    r.get("lost"),
                    r.get("routes_gained"),
                ),
            ),
            table("group_history", "Group changes", ("at", "user", "groups"), history),
        ),
    )


def _reviews(i: Inputs) -> Section:
    made = sorted(i.attestations, key=lambda a: a.at)
    enabled = {e.identity for e in i.entries if e.disabled is None}
    reviewed = {a.identity for a in made}
    decisions = Counter(a.decision for a in made)
    return Section(
        "01.e",
        ("01.e",),
        ("164.308(a)(4)(ii)(C)",),
        "Review of user access rights",
        "Access review attestations made in the period (kept durably in the record store; each "
        "is also a review.attested record of the audit log), and the share of identities not "
        "disabled when the bundle was made that were reviewed in the period.",
        {
            "attestations": len(made),
            "attestation_events": i.tally.types["review.attested"],
            "kept": decisions["keep"],
            "revoked": decisions["revoke"],
            "reviewers": len({a.reviewer for a in made}),
            "identities_reviewed": len(reviewed),
            "identities_enabled": len(enabled),
            "coverage_percent": percent(len(reviewed & enabled), len(enabled)),
        },
        (
            table(
                "attestations",
                "Attestations",
                ("at", "reviewer", "user", "identity", "decision", "note", "policy_hash"),
                (
                    (utc(a.at), a.reviewer, a.user, a.identity, a.decision, a.note, a.policy_hash)
                    for a in made
                ),
            ),
        ),
    )


def _authentication(i: Inputs) -> Section:
    by_sub = {e.sub: e for e in i.entries}
    rows = []
    for sub, user in sorted(i.tally.active.items(), key=lambda item: item[1]):
        entry = by_sub.get(sub)
        factor = i.factors.get(entry.identity) if entry is not None else None
        enrolled = factor is not None and factor.created < i.end
        seen = sub in i.tally.second_factor
        rows.append((user, sub, enrolled, seen, enrolled or seen))
    covered = sum(1 for row in rows if row[4])
    mfa_routes = [rid for rid in sorted(i.policies) if i.policies[rid].require_mfa]
    return Section(
        "01.j",
        ("01.j", "01.q"),
        ("164.312(d)",),
        "User authentication and multi-factor coverage",
        "Users active in the period (a login, or a request allowed on a session) and whether "
        "each had a second factor: a TOTP factor enrolled at the gateway by the end of the "
        "period, or a second factor on the session of an allowed request (the mfa field of "
        "access records: the IdP's amr, or the gateway's TOTP step).",
        {
            "active_users": len(rows),
            "with_gateway_factor": sum(1 for row in rows if row[2]),
            "with_mfa_seen": sum(1 for row in rows if row[3]),
            "covered": covered,
            "coverage_percent": percent(covered, len(rows)),
            "routes_requiring_mfa": ", ".join(mfa_routes),
        },
        (
            table(
                "users",
                "Active users",
                ("user", "sub", "gateway_factor", "mfa_seen", "covered"),
                rows,
            ),
            table("mfa_events", "MFA events", ("type", "count"), sorted(i.tally.mfa.items())),
        ),
    )


def _sessions(i: Inputs) -> Section:
    limits = i.settings.sessions
    ended = i.tally.sessions_ended
    return Section(
        "01.t",
        ("01.t", "01.u"),
        ("164.312(a)(2)(iii)",),
        "Session time-out and limitation of connection time",
        "The session limits in force when the bundle was made (global, and shorter ones per "
        "route), and the sessions ended in the period by reason: session-idle is the idle "
        "time-out, session-expired the absolute lifetime.",
        {
            "idle_timeout_seconds": limits.idle_timeout,
            "max_lifetime_seconds": limits.max_lifetime,
            "max_per_user": limits.max_per_user,
            "sessions_created": i.tally.types["session.created"],
            "ended_idle": ended["session-idle"],
            "ended_expired": ended["session-expired"],
            "ended_total": sum(ended.values()),
        },
        (
            table(
                "route_limits",
                "Per-route limits",
                ("route", "idle_timeout_seconds", "max_lifetime_seconds"),
                (
                    (r.id, r.idle_timeout, r.max_lifetime)
                    for r in i.settings.routes
                    if r.idle_timeout is not None or r.max_lifetime is not None
                ),
            ),
            table("ended", "Sessions ended by reason", ("reason", "count"), sorted(ended.items())),
        ),
    )
