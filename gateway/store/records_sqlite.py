"""`sqlite:///path`: the record store in one SQLite file, the embedded default.

aiosqlite runs the connection on its own thread, so no query blocks the event loop. The
file is in WAL mode and every operation is ONE SQL statement that commits by itself (an
upsert, `UPDATE ... WHERE version = ?`, `DELETE ... RETURNING`), so each stays atomic even
when another process, or the session store (`gateway.store.sqlite`, tables `ephemeral_*`),
opens the same file. These tables are `durable_*`.

Migrations: `MIGRATIONS[n]` is the script that takes the schema from version n to n + 1;
`durable_schema` holds the number applied. `open` applies the missing ones inside
`BEGIN IMMEDIATE`, the file's write lock, so two processes opening at once apply each once.
A schema newer than this code (after a rollback) is left as it is.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from typing import Any

import aiosqlite

from gateway.store.base import StoreUnavailable, check_kind
from gateway.store.records import Stored
from gateway.store.sqlite import _create_private

UNAVAILABLE = "the record store is unavailable"  # what clients see: no path, no cause

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE durable_record (
        kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
        version INTEGER NOT NULL, updated REAL NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;
    """,
)

_PRAGMAS = ("PRAGMA busy_timeout=5000", "PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL")

_OPEN_ATTEMPTS = 40  # about 40 s of retries while other openers migrate the file

_SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS durable_schema (version INTEGER NOT NULL)"
_GET = "SELECT value, version FROM durable_record WHERE kind = :kind AND key = :key"
_CREATE = """
INSERT INTO durable_record VALUES (:kind, :key, :value, 1, :now)
ON CONFLICT (kind, key) DO NOTHING
"""
_REPLACE = """
UPDATE durable_record SET value = :value, version = version + 1, updated = :now
WHERE kind = :kind AND key = :key AND version = :version
"""
_PUT = """
INSERT INTO durable_record VALUES (:kind, :key, :value, 1, :now)
ON CONFLICT (kind, key) DO UPDATE SET
    value = excluded.value, version = durable_record.version + 1, updated = excluded.updated
RETURNING version
"""
_DELETE = """
DELETE FROM durable_record
WHERE kind = :kind AND key = :key AND (:version IS NULL OR version = :version)
RETURNING version
"""
_SCAN = """
SELECT key, value, version FROM durable_record WHERE kind = :kind AND key > :after
ORDER BY key LIMIT :limit
"""


class SqliteRecords:
    """A `RecordStore` in one SQLite file."""

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self._db = db
        self._path = path

    @classmethod
    async def open(cls, path: str) -> SqliteRecords:
        """Open (creating, 0600) the file and migrate it; StoreUnavailable if it cannot be."""
        try:
            await asyncio.to_thread(_create_private, path)
            db = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as err:
            raise StoreUnavailable(UNAVAILABLE) from err
        store = cls(db, path)
        try:
            await store._migrate()
        except BaseException:
            await db.close()
            raise
        return store

    def __repr__(self) -> str:
        return f"<SqliteRecords {self._path!r}>"

    async def get(self, kind: str, key: str) -> Stored | None:
        rows = await self._rows(_GET, kind=kind, key=key)
        return Stored(bytes(rows[0][0]), int(rows[0][1])) if rows else None

    async def create(self, kind: str, key: str, value: bytes) -> bool:
        params = {"kind": check_kind(kind), "key": key, "value": value, "now": time.time()}
        return await self._change(_CREATE, **params) > 0

    async def replace(self, kind: str, key: str, value: bytes, version: int) -> bool:
        params = {"kind": check_kind(kind), "key": key, "value": value, "version": version}
        # SECURITY: compare-and-swap in one statement: of concurrent read-modify-writes (two
        # processes spending one recovery code) only the one at the current version lands.
        return await self._change(_REPLACE, **params, now=time.time()) > 0

    async def put(self, kind: str, key: str, value: bytes) -> int:
        params = {"kind": check_kind(kind), "key": key, "value": value, "now": time.time()}
        rows = await self._rows(_PUT, **params)
        return int(rows[0][0])

    async def delete(self, kind: str, key: str, version: int | None = None) -> bool:
        # SECURITY: one DELETE ... RETURNING: of concurrent takers of a single-use record
        # (an enrollment link) exactly one sees the row go.
        return bool(await self._rows(_DELETE, kind=kind, key=key, version=version))

    async def scan(self, kind: str, after: str = "", limit: int = 1000) -> list[tuple[str, Stored]]:
        if limit < 0:
            raise ValueError(f"a scan limit must not be negative, got {limit!r}")
        rows = await self._rows(_SCAN, kind=kind, after=after, limit=limit)
        return [(str(row[0]), Stored(bytes(row[1]), int(row[2]))) for row in rows]

    async def ping(self) -> bool:
        try:
            await self._rows("SELECT 1")
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._db.close()

    async def _migrate(self) -> None:
        """Set the pragmas, then apply the missing migrations under the file's write lock."""
        for pragma in _PRAGMAS:
            await self._patiently(pragma)
        await self._patiently("BEGIN IMMEDIATE")  # the write lock: a second opener waits here
        await self._rows(_SCHEMA_TABLE)
        rows = await self._rows("SELECT max(version) FROM durable_schema")
        applied = int(rows[0][0] or 0)
        for script in MIGRATIONS[applied:]:
            for statement in _statements(script):  # executescript would COMMIT first
                await self._rows(statement)
        if applied < len(MIGRATIONS):
            await self._rows("DELETE FROM durable_schema")
            await self._rows("INSERT INTO durable_schema VALUES (:v)", v=len(MIGRATIONS))
        await self._rows("COMMIT")

    async def _patiently(self, sql: str) -> None:
        """`sql`, retried while another opener holds the file: switching to WAL can answer
        "database is locked" at once, without waiting for busy_timeout."""
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                await self._db.execute_fetchall(sql)
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or attempt == _OPEN_ATTEMPTS - 1:
                    raise StoreUnavailable(UNAVAILABLE) from err
                await asyncio.sleep(0.05 * (attempt + 1))

    async def _rows(self, sql: str, **params: Any) -> list[sqlite3.Row]:
        try:
            return list(await self._db.execute_fetchall(sql, params))
        except (sqlite3.Error, ValueError) as err:  # ValueError: the connection is closed
            raise StoreUnavailable(UNAVAILABLE) from err

    async def _change(self, sql: str, **params: Any) -> int:
        try:
            async with self._db.execute(sql, params) as cursor:
                return cursor.rowcount
        except (sqlite3.Error, ValueError) as err:
            raise StoreUnavailable(UNAVAILABLE) from err


def _statements(script: str) -> list[str]:
    """The statements of `script`, each whole (a `;` inside a string or trigger stays)."""
    statements, pending = [], ""
    for piece in re.split(r"(?<=;)", script):
        pending += piece
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return [*statements, pending.strip()] if pending.strip() else statements
