"""The evidence bundle's sections (`gateway report evidence`, docs/reports.md): one per
HITRUST CSF control (or pair of controls), each saying what was measured, over which period.

    Inputs                                what the sections are made from: the config, the
                                          log's tally, the directory, MFA factors, stored
                                          attestations, the verification of every origin
    Section(id, controls, hipaa, title, measured, summary, tables)
    section_json(section, start, end)     its form in evidence.json (index.html shows the same)
    table(...) / events_table(...)        a Table of rows, or of logged events (capped)

A section's `summary` holds named numbers and texts and its `tables` columns and rows of
scalars, so evidence.json stays regular for programs and index.html renders every section
the same way. The sections themselves are in `gateway.evidence_access` (01.a to 01.u) and
`gateway.evidence_operations` (02.i, 09.aa to 09.ad, break-glass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.audit.verify import OriginReport
from gateway.directory import Entry
from gateway.evidence_log import Kept, LogTally, Record
from gateway.mfa import Factor
from gateway.policy import PolicySet
from gateway.reports import CONTROLS, HIPAA, utc
from gateway.reviews import Attestation
from gateway.settings import Settings

Scalar = str | int | float | bool | None
_CHAIN = frozenset({"v", "origin", "seq", "ts", "type", "prev"})
_DETAIL_MAX = 300


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    title: str
    columns: tuple[str, ...]
    rows: list[list[Scalar]]
    total: int  # rows there were; those past `rows` were only counted


@dataclass(frozen=True, slots=True)
class Section:
    id: str
    controls: tuple[str, ...]  # CSF references
    hipaa: tuple[str, ...]  # HIPAA Security Rule references
    title: str
    measured: str
    summary: dict[str, Scalar]
    tables: tuple[Table, ...]


@dataclass(frozen=True, slots=True)
class Inputs:
    settings: Settings
    policies: PolicySet
    tally: LogTally
    entries: tuple[Entry, ...]
    factors: Mapping[str, Factor]  # identity -> its enrolled factor
    attestations: tuple[Attestation, ...]  # made in the period
    verification: tuple[OriginReport, ...]
    allowed_after: tuple[int, ...]  # per tally.disables(): requests allowed after it
    start: float
    end: float


def table(name: str, title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    listed = [[scalar(cell) for cell in row] for row in rows]
    return Table(name, title, tuple(columns), listed, len(listed))


def events_table(
    name: str,
    title: str,
    columns: Iterable[str],
    kept: Kept,
    cells: Callable[[Record], Iterable[Any]],
) -> Table:
    """A table of logged events, one row per kept record; `total` counts every one."""
    found = table(name, title, columns, (cells(record) for record in kept.rows))
    return Table(found.name, found.title, found.columns, found.rows, kept.total)


def scalar(value: object) -> Scalar:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return ", ".join(str(scalar(item)) for item in value)
    if isinstance(value, dict):
        return " ".join(f"{key}={scalar(item)}" for key, item in value.items())
    return str(value)


def detail(record: Record, skip: Iterable[str] = ()) -> str:
    """The fields of an event no column shows, as `name=value; ...` (shortened)."""
    left = sorted(set(record) - _CHAIN - set(skip))
    text = "; ".join(f"{name}={scalar(record[name])}" for name in left)
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"


def percent(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


def section_json(section: Section, start: float, end: float) -> dict[str, Any]:
    return {
        "id": section.id,
        "controls": [{"ref": ref, "title": CONTROLS[ref]} for ref in section.controls],
        "hipaa": [{"ref": ref, "title": HIPAA[ref]} for ref in section.hipaa],
        "title": section.title,
        "measured": section.measured,
        "period": {"since": utc(start), "until": utc(end)},
        "summary": section.summary,
        "tables": [
            {
                "name": t.name,
                "title": t.title,
                "columns": list(t.columns),
                "rows": t.rows,
                "total": t.total,
            }
            for t in section.tables
        ],
    }
