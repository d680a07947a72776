"""Durable state: the `RecordStore` protocol and `open_record_store(url)` (SPEC §3 state.records).

    memory://                        this process's dicts (tests, the demo; warns at start)
    sqlite:///path/to/state.db       one SQLite file (the embedded default; may be the same
                                     file as the session store: its tables are `durable_*`)
    postgresql://user@host/db        PostgreSQL through asyncpg, shared by every process and
    postgres://…                     replica; `?search_path=SCHEMA` selects a schema

MFA enrollments, recovery codes, enrollment links, the directory of users, disabled users
and reviews live here. Durable state never lives only in Redis: a Redis without
persistence would re-enable disabled users and wipe enrollments.

Values are opaque bytes under `(kind, key)`: callers seal them first
(`gateway.keyring.Sealer`, associated data = kind and key). Every record carries a
`version`, 1 when created and one more on every change, so a read-modify-write is a
compare-and-swap (`replace(..., version)`), atomic across processes and machines.
Schema migrations are applied by `open_record_store`, once, under a lock.

    StoreUnavailable (gateway.store.base; 503 store-unavailable)
        the store cannot be reached or failed: never a raw asyncpg or sqlite exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.configtypes import StoreUrl


@dataclass(frozen=True, slots=True)
class Stored:
    value: bytes
    version: int  # 1 when created, +1 on every change


class RecordStore(Protocol):
    """Durable values under (kind, key), each with a version for compare-and-swap."""

    async def get(self, kind: str, key: str) -> Stored | None:
        """The record, or None."""

    async def create(self, kind: str, key: str, value: bytes) -> bool:
        """Store a new record (version 1) only if none is there; True if stored."""

    async def replace(self, kind: str, key: str, value: bytes, version: int) -> bool:
        """Overwrite only if the record is still at `version` (it becomes version + 1)."""

    async def put(self, kind: str, key: str, value: bytes) -> int:
        """Create or overwrite unconditionally; the new version."""

    async def delete(self, kind: str, key: str, version: int | None = None) -> bool:
        """Remove the record (only at `version`, when given); True if this call removed it.

        Of two concurrent deleters exactly one gets True: single-use records are taken so.
        """

    async def scan(self, kind: str, after: str = "", limit: int = 1000) -> list[tuple[str, Stored]]:
        """Up to `limit` records of `kind` whose key sorts after `after`, in key order."""

    async def ping(self) -> bool:
        """True if the store answers (readiness); never raises."""

    async def close(self) -> None:
        """Close connections."""


async def open_record_store(url: StoreUrl | str) -> RecordStore:
    """The store at `url`, its schema migrated; ValueError for a URL that is no record store,
    StoreUnavailable if it cannot be opened."""
    scheme = StoreUrl(url).scheme
    if scheme == "memory":
        from gateway.store.records_memory import MemoryRecords

        return MemoryRecords()
    if scheme == "sqlite":
        from gateway.store.records_sqlite import SqliteRecords
        from gateway.store.sqlite import sqlite_path

        return await SqliteRecords.open(sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        from gateway.store.records_postgres import PostgresRecords  # asyncpg: only when used

        return await PostgresRecords.open(str(url))
    raise ValueError(f"not a record store URL: {StoreUrl(url).masked()}")
