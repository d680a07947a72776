"""`gateway report access-review` (SPEC §10; CSF 01.e, 01.c, 02.i): who can reach what, now.

    build(sources, since, now) -> Report     one Row per identity in the directory
    write(report, out)                       .html, .csv or .json, by the file's extension
    main(config, since, out) -> int          the command

A row shows the identity, its groups at its last login, the routes the CURRENT policy lets
it reach (`policy.reachable`: MFA and sign-in age aside) with the allow rules that let it in,
the last access per route, the last login, the gateway's second factor, the disabled flag,
flags, and the latest attestation (`gateway review attest`). Flags:

    stale          no login within --since
    unused-access  a reachable route not used within --since
    phi-route      reaches a route with `classification: phi`
    mfa-route      reaches a route whose policy has `require_mfa`
    admin-route    reaches a route whose id contains "admin"
    unreviewed     no attestation within --since

Last-access times are written by the gateway every 30 s: a report run while it serves may
miss the last half minute of use. MFA is the gateway's own TOTP factor (enrolled, locked or
none); a second factor done at the IdP (`amr`) is not kept in the directory, so "none" can
still mean MFA at the IdP: the evidence report (01.j) counts what access records show.
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.configtypes import parse_duration
from gateway.directory import Entry
from gateway.reports import (
    CONTROLS,
    ReportError,
    Sources,
    csv_cell,
    load_config,
    open_sources,
    render,
    utc,
    write_private,
)
from gateway.reviews import Attestation, Grant, grants
from gateway.settings import Route, Settings

SUPPORTS = ("01.e", "01.c", "02.i")
FORMATS = (".html", ".csv", ".json")
CSV_COLUMNS = (
    "user",
    "identity",
    "email",
    "groups",
    "disabled",
    "last_login",
    "logins",
    "mfa",
    "flags",
    "routes",
    "rules",
    "last_access",
    "review_decision",
    "review_by",
    "review_at",
    "review_note",
)


@dataclass(frozen=True, slots=True)
class Access:
    """One route in a row: reachable now, or used before (and reachable no longer)."""

    route: str
    reachable: bool
    rules: tuple[str, ...]
    limited: bool  # every rule letting them in also limits methods, paths or addresses
    report_mode: bool
    last_access: float | None
    flags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Row:
    entry: Entry
    mfa: str  # enrolled | locked | none
    recovery_codes_left: int
    access: tuple[Access, ...]
    flags: tuple[str, ...]
    review: Attestation | None


@dataclass(frozen=True, slots=True)
class Report:
    generated_at: float
    config: Path
    policy_hash: str
    since: str  # as given: 90d
    start: float  # generated_at - since
    routes: tuple[Route, ...]
    rows: tuple[Row, ...]


def route_flags(route: Route) -> tuple[str, ...]:
    flags = []
    if route.classification == "phi":
        flags.append("phi-route")
    if route.policy is not None and route.policy.require_mfa:
        flags.append("mfa-route")
    if "admin" in route.id:
        flags.append("admin-route")
    return tuple(flags)


async def build(sources: Sources, since: str, now: float) -> Report:
    start = now - parse_duration(since)
    routes = {route.id: route for route in sources.settings.protected_routes}
    latest = await sources.reviews.latest()
    rows = []
    async for entry in sources.directory.entries():
        factor = await sources.mfa.factor(entry.identity)
        mfa = "none" if factor is None else "locked" if factor.locked is not None else "enrolled"
        left = len(factor.recovery) if factor is not None else 0
        access = _access(entry, grants(entry, sources.policies), routes, start)
        review = latest.get(entry.identity)
        flags = _flags(entry, access, review, start)
        rows.append(Row(entry, mfa, left, access, flags, review))
    rows.sort(key=lambda row: (row.entry.user.casefold(), row.entry.identity))
    config = sources.settings.source
    return Report(
        now, config, sources.policies.hash, since, start, tuple(routes.values()), tuple(rows)
    )


def _access(
    entry: Entry, found: tuple[Grant, ...], routes: dict[str, Route], start: float
) -> tuple[Access, ...]:
    granted = {grant.route: grant for grant in found}
    out = []
    for route_id in sorted(set(granted) | set(entry.last_access)):
        grant, last = granted.get(route_id), entry.last_access.get(route_id)
        flags = route_flags(routes[route_id]) if route_id in routes else ()
        if grant is not None and (last is None or last < start):
            flags += ("unused-access",)
        if grant is None:
            out.append(Access(route_id, False, (), False, False, last, flags))
        else:
            out.append(
                Access(route_id, True, grant.rules, grant.limited, grant.report_mode, last, flags)
            )
    return tuple(out)


def _flags(
    entry: Entry, access: tuple[Access, ...], review: Attestation | None, start: float
) -> tuple[str, ...]:
    flags = ["stale"] if entry.last_login < start else []
    reached = {flag for a in access if a.reachable for flag in a.flags}
    order = ("unused-access", "phi-route", "mfa-route", "admin-route")
    flags += [flag for flag in order if flag in reached]
    if review is None or review.at < start:
        flags.append("unreviewed")
    return tuple(flags)


# -- output ------------------------------------------------------------------------------------


def as_json(report: Report) -> dict[str, Any]:
    return {
        "report": "access-review",
        "version": 1,
        "generated_at": utc(report.generated_at),
        "config": str(report.config),
        "policy_hash": report.policy_hash,
        "window": {
            "since": report.since,
            "start": utc(report.start),
            "end": utc(report.generated_at),
        },
        "controls": [{"ref": ref, "title": CONTROLS[ref]} for ref in SUPPORTS],
        "routes": [_route_json(route) for route in report.routes],
        "rows": [_row_json(row) for row in report.rows],
    }


def _route_json(route: Route) -> dict[str, Any]:
    policy = route.policy
    return {
        "id": route.id,
        "host": route.host,
        "path": route.path,
        "classification": route.classification,
        "require_mfa": bool(policy and policy.require_mfa),
        "mode": policy.mode if policy is not None else None,
        "flags": list(route_flags(route)),
    }


def _row_json(row: Row) -> dict[str, Any]:
    entry, review = row.entry, row.review
    disabled = entry.disabled
    return {
        "user": entry.user,
        "identity": entry.identity,
        "email": entry.email,
        "groups": list(entry.groups),
        "first_login": utc(entry.first_login),
        "last_login": utc(entry.last_login),
        "logins": entry.logins,
        "mfa": {"state": row.mfa, "recovery_codes_left": row.recovery_codes_left},
        "disabled": None
        if disabled is None
        else {
            "at": utc(disabled.get("at")),
            "actor": str(disabled.get("actor", "")),
            "reason": str(disabled.get("reason", "")),
        },
        "flags": list(row.flags),
        "access": [
            {
                "route": a.route,
                "reachable": a.reachable,
                "rules": list(a.rules),
                "limited": a.limited,
                "report_mode": a.report_mode,
                "last_access": utc(a.last_access),
                "flags": list(a.flags),
            }
            for a in row.access
        ],
        "review": None
        if review is None
        else {
            "decision": review.decision,
            "reviewer": review.reviewer,
            "at": utc(review.at),
            "note": review.note,
            "policy_hash": review.policy_hash,
        },
    }


def as_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in as_json(report)["rows"]:
        writer.writerow([csv_cell(value) for value in _csv_values(row)])
    return buffer.getvalue()


def _csv_values(row: dict[str, Any]) -> list[object]:
    reachable = [a for a in row["access"] if a["reachable"]]
    review = row["review"] or {}
    return [
        row["user"],
        row["identity"],
        row["email"],
        "; ".join(row["groups"]),
        "yes" if row["disabled"] else "no",
        row["last_login"],
        row["logins"],
        row["mfa"]["state"],
        " ".join(row["flags"]),
        "; ".join(a["route"] for a in reachable),
        "; ".join(f"{a['route']}={','.join(a['rules']) or '-'}" for a in reachable),
        "; ".join(f"{a['route']}={a['last_access'] or 'never'}" for a in row["access"]),
        review.get("decision"),
        review.get("reviewer"),
        review.get("at"),
        review.get("note"),
    ]


def as_html(report: Report) -> str:
    return render(
        "report_access_review.html",
        report=as_json(report),
        controls=[(ref, CONTROLS[ref]) for ref in SUPPORTS],
    )


def write(report: Report, out: Path) -> None:
    kind = out.suffix.lower()
    if kind == ".json":
        data = orjson.dumps(as_json(report), option=orjson.OPT_INDENT_2) + b"\n"
    elif kind == ".csv":
        data = as_csv(report).encode("utf-8")
    else:
        data = as_html(report).encode("utf-8")
    try:
        write_private(out, data)
    except OSError as err:
        raise ReportError(f"cannot write {out}: {err.strerror}", status=1) from None


# -- the command -------------------------------------------------------------------------------


def main(config: str, since: str, out: str) -> int:
    """`gateway report access-review`; ReportError (one line) for what stops it."""
    target = Path(out)
    if target.suffix.lower() not in FORMATS:
        raise ReportError(f"--out {out}: name a .html, .csv or .json file (the format)")
    try:
        parse_duration(since)
    except ValueError as err:
        raise ReportError(f"--since: {err}") from None
    settings = load_config(config)
    report = asyncio.run(_build(settings, since, time.time()))
    write(report, target)
    print(f"access review of {len(report.rows)} identities written to {target}")
    return 0


async def _build(settings: Settings, since: str, now: float) -> Report:
    async with open_sources(settings) as sources:
        return await build(sources, since, now)
