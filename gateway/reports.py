"""Reports for auditors (SPEC §10 `gateway report`, docs/reports.md): what both reports share.

    load_config(path)           the settings, or ReportError naming every problem
    open_sources(settings)      async context: the config's record store, read through the
                                directory, MFA and reviews; nothing is started, nothing written
    CONTROLS, HIPAA             the HITRUST CSF (and HIPAA) references the reports cite
    render(template, **values)  a report template (jinja2, autoescape, strict undefined)
    utc(ts) / parse_date(text)  RFC 3339 UTC out; a date or RFC 3339 time in
    csv_cell(value)             one spreadsheet-safe CSV cell

The two reports live in `gateway.access_review` and `gateway.evidence` (with
`gateway.evidence_log` reading the audit log and `gateway.bundle` writing and signing).

    ReportError     what stops a report: one line for stderr, and the exit status
                    (2: the operator's input or config; 1: a store or file that failed)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import jinja2

from gateway.configtypes import StoreUrl
from gateway.directory import Directory
from gateway.keyring import Keyring
from gateway.mfa import Mfa
from gateway.policy import PolicySet, compile_policies
from gateway.reviews import Reviews
from gateway.settings import ConfigError, Settings, load_settings
from gateway.store import MemoryStore, StoreUnavailable
from gateway.store.records import RecordStore, open_record_store
from gateway.store.sqlite import sqlite_path

CONTROLS: dict[str, str] = {
    "01.a": "Access Control Policy",
    "01.b": "User Registration",
    "01.c": "Privilege Management",
    "01.e": "Review of User Access Rights",
    "01.j": "User Authentication for External Connections",
    "01.q": "User Identification and Authentication",
    "01.t": "Session Time-out",
    "01.u": "Limitation of Connection Time",
    "02.i": "Removal of Access Rights",
    "09.aa": "Audit Logging",
    "09.ab": "Monitoring System Use",
    "09.ac": "Protection of Log Information",
    "09.ad": "Administrator and Operator Logs",
}
HIPAA: dict[str, str] = {
    "164.308(a)(1)(ii)(D)": "Information system activity review",
    "164.308(a)(3)(ii)(C)": "Termination procedures",
    "164.308(a)(4)(ii)(C)": "Access establishment and modification",
    "164.312(a)(1)": "Access control",
    "164.312(a)(2)(i)": "Unique user identification",
    "164.312(a)(2)(ii)": "Emergency access procedure",
    "164.312(a)(2)(iii)": "Automatic logoff",
    "164.312(b)": "Audit controls",
    "164.312(c)(1)": "Integrity",
    "164.312(d)": "Person or entity authentication",
}
_FORMULA = ("=", "+", "-", "@", "\t", "\r")

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _shown(value: object) -> object:
    """A cell as a reader wants it: yes / no, and nothing for None."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else value


_templates.filters["shown"] = _shown


class ReportError(Exception):
    """A report cannot be made; the message is one line."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Sources:
    settings: Settings
    policies: PolicySet
    directory: Directory
    mfa: Mfa
    reviews: Reviews


@asynccontextmanager
async def open_sources(settings: Settings) -> AsyncIterator[Sources]:
    """The config's durable records, read-only: the directory and MFA are never started (no
    subscription, no flusher), and the session store they are built with is a placeholder in
    memory that nothing here uses."""
    records = await _open_records(settings)
    try:
        keyring = Keyring(settings.state.key_bytes)
        unused = MemoryStore()
        issuer = settings.mfa.totp_issuer
        yield Sources(
            settings,
            compile_policies(settings),
            Directory(records, unused, keyring),
            Mfa(records, unused, keyring, issuer=issuer),
            Reviews(records, keyring),
        )
    except StoreUnavailable as err:
        raise ReportError(f"the record store failed: {err}", status=1) from None
    finally:
        await records.close()


async def _open_records(settings: Settings) -> RecordStore:
    url = StoreUrl(settings.state.records)
    where = f"{settings.source}: state.records {url.masked()}"
    if url.scheme == "memory":
        raise ReportError(f"{where} lives in the gateway's memory: nothing durable to report on")
    if url.scheme == "sqlite" and not await asyncio.to_thread(_is_file, sqlite_path(str(url))):
        raise ReportError(f"{where}: no such file (has this gateway run yet?)")
    if not settings.state.keys:
        raise ReportError(f"{settings.source}: state.keys is empty: sealed records cannot be read")
    try:
        return await open_record_store(url)
    except StoreUnavailable as err:
        raise ReportError(f"{where}: cannot open: {err}", status=1) from None


def load_config(config: str) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as err:
        raise ReportError(str(err)) from None  # every problem, FILE:LINE:COL each


def _is_file(path: str) -> bool:
    return Path(path).is_file()


def write_private(path: Path, data: bytes) -> None:
    """Write a report file readable by its owner only: reports name people and addresses."""
    # SECURITY: 0600 whatever the umask, also when the file was there before.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def render(template: str, **values: Any) -> str:
    return _templates.get_template(template).render(**values)


def utc(ts: float | None) -> str | None:
    """RFC 3339 UTC to the second (`2026-01-31T09:15:00Z`); None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_date(text: str, *, end: bool = False) -> float:
    """`2026-01-31` (its start; with `end`, the start of the next day, so the day is whole)
    or an RFC 3339 time with its offset; ValueError for anything else."""
    try:
        if len(text) == 10:
            day = datetime.strptime(text, "%Y-%m-%d").date()
            start = datetime.combine(day, time(), UTC)
            return (start + timedelta(days=1) if end else start).timestamp()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"bad date {text!r}: write 2026-01-31 or 2026-01-31T09:00:00Z") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no offset: add Z for UTC")
    return moment.timestamp()


def csv_cell(value: object) -> str:
    """Text for one CSV cell that no spreadsheet runs as a formula: a cell starting with
    = + - @ (or a tab or carriage return, which some programs skip first) gets a leading '."""
    text = "" if value is None else str(value)
    # SECURITY: names, emails and groups come from the IdP; `=HYPERLINK(...)` or
    # `=cmd|'/c calc'!A0` in one would run when the reviewer opens the file (CSV injection).
    return "'" + text if text.startswith(_FORMULA) else text
