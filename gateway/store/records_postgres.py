"""`postgresql://` (or `postgres://`): the record store in PostgreSQL, through asyncpg.

Shared by every process and replica. Every operation is ONE SQL statement (an upsert,
`UPDATE ... WHERE version = $n`, `DELETE ... RETURNING`), so each is atomic across
processes: under READ COMMITTED a second writer waits for the first and then re-checks its
WHERE on the new row, so of concurrent `replace` or `delete` calls exactly one wins.

The URL is handed to asyncpg as it is. asyncpg sends every query parameter it does not know
itself (it knows sslmode, sslrootcert, password, ...) to the server as a run-time setting at
connect time, so `postgresql://gw@db/gateway?search_path=gateway` puts the tables in the
schema `gateway` (which must exist) and `&application_name=gw` names the connections. A
parameter that is no server setting (`?schema=x`) makes every connection fail.

Keys are `COLLATE "C"`: `scan` pages in code point order, as on SQLite and in memory,
whatever the database's collation.

Migrations: `MIGRATIONS[n]` takes the schema from version n to n + 1; `gateway_schema` holds
the number applied. `open` applies the missing ones in one transaction holding
`pg_advisory_xact_lock(MIGRATION_LOCK)`, so replicas starting together apply each once. A
schema newer than this code (after a rollback) is left as it is.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from gateway.configtypes import StoreUrl
from gateway.store.base import StoreUnavailable, check_kind
from gateway.store.records import Stored

UNAVAILABLE = "the record store is unavailable"  # what clients see: no address, no cause
MIGRATION_LOCK = 0x67_61_74_65_77_61_79  # "gateway": the advisory lock key of migrations

_CONNECT_TIMEOUT = 5.0  # seconds to open one connection
_COMMAND_TIMEOUT = 10.0  # seconds for one statement
_PING_TIMEOUT = 2.0
_CLOSE_TIMEOUT = 5.0  # then the connections are cut

# Connection refused or reset, timeouts, server errors, a closed pool: all "unavailable".
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE gateway_record (
        kind TEXT NOT NULL, key TEXT COLLATE "C" NOT NULL, value BYTEA NOT NULL,
        version BIGINT NOT NULL, updated TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (kind, key)
    )
    """,
)

_SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS gateway_schema (version INT NOT NULL)"
_GET = "SELECT value, version FROM gateway_record WHERE kind = $1 AND key = $2"
_CREATE = """
INSERT INTO gateway_record (kind, key, value, version) VALUES ($1, $2, $3, 1)
ON CONFLICT (kind, key) DO NOTHING RETURNING version
"""
_REPLACE = """
UPDATE gateway_record SET value = $3, version = version + 1, updated = now()
WHERE kind = $1 AND key = $2 AND version = $4 RETURNING version
"""
_PUT = """
INSERT INTO gateway_record (kind, key, value, version) VALUES ($1, $2, $3, 1)
ON CONFLICT (kind, key) DO UPDATE SET
    value = excluded.value, version = gateway_record.version + 1, updated = now()
RETURNING version
"""
_DELETE = """
DELETE FROM gateway_record
WHERE kind = $1 AND key = $2 AND ($3::BIGINT IS NULL OR version = $3) RETURNING version
"""
_SCAN = """
SELECT key, value, version FROM gateway_record WHERE kind = $1 AND key > $2
ORDER BY key LIMIT $3
"""


class PostgresRecords:
    """A `RecordStore` in PostgreSQL, on a pool of up to four connections."""

    def __init__(self, pool: Any, url: str) -> None:
        self._pool: Any = pool  # an asyncpg.Pool (asyncpg is untyped)
        self._url = url

    @classmethod
    async def open(cls, url: str) -> PostgresRecords:
        """Connect and migrate; StoreUnavailable if the server cannot be reached or fails,
        ValueError if asyncpg cannot make sense of the URL."""
        store = cls(await _create_pool(url), url)
        try:
            await store._migrate()
        except BaseException:
            await store.close()
            raise
        return store

    def __repr__(self) -> str:
        return f"<PostgresRecords {_shown(self._url)!r}>"

    async def get(self, kind: str, key: str) -> Stored | None:
        row = await self._row(_GET, kind, key)
        return None if row is None else Stored(bytes(row[0]), int(row[1]))

    async def create(self, kind: str, key: str, value: bytes) -> bool:
        return await self._row(_CREATE, check_kind(kind), key, bytes(value)) is not None

    async def replace(self, kind: str, key: str, value: bytes, version: int) -> bool:
        # SECURITY: compare-and-swap in one statement: of concurrent read-modify-writes (two
        # replicas spending one recovery code) only the one at the current version lands.
        row = await self._row(_REPLACE, check_kind(kind), key, bytes(value), version)
        return row is not None

    async def put(self, kind: str, key: str, value: bytes) -> int:
        row = await self._row(_PUT, check_kind(kind), key, bytes(value))
        assert row is not None  # an upsert always returns its row
        return int(row[0])

    async def delete(self, kind: str, key: str, version: int | None = None) -> bool:
        # SECURITY: one DELETE ... RETURNING: of concurrent takers of a single-use record
        # (an enrollment link) exactly one sees the row go.
        return await self._row(_DELETE, kind, key, version) is not None

    async def scan(self, kind: str, after: str = "", limit: int = 1000) -> list[tuple[str, Stored]]:
        if limit < 0:
            raise ValueError(f"a scan limit must not be negative, got {limit!r}")
        rows = await self._call(self._pool.fetch, _SCAN, kind, after, limit)
        return [(str(row[0]), Stored(bytes(row[1]), int(row[2]))) for row in rows]

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(_PING_TIMEOUT):  # bounds waiting for a connection too
                await self._call(self._pool.fetchval, "SELECT 1")
        except (StoreUnavailable, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._pool.close()  # waits for borrowed connections to come back
        except _ERRORS:
            self._pool.terminate()  # close() cut them on an error or the timeout already

    async def _migrate(self) -> None:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # Held to the end of the transaction: replicas starting together take turns.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await conn.execute(_SCHEMA_TABLE)
                applied = int(await conn.fetchval("SELECT max(version) FROM gateway_schema") or 0)
                for script in MIGRATIONS[applied:]:
                    await conn.execute(script)
                if applied < len(MIGRATIONS):
                    await conn.execute("DELETE FROM gateway_schema")
                    await conn.execute("INSERT INTO gateway_schema VALUES ($1)", len(MIGRATIONS))
        except _ERRORS as err:
            raise StoreUnavailable(UNAVAILABLE) from err

    async def _row(self, sql: str, *args: object) -> Any:
        """The first row of `sql` (an asyncpg Record), or None."""
        return await self._call(self._pool.fetchrow, sql, *args)

    async def _call(self, method: Any, sql: str, *args: object) -> Any:
        """`method` (pool.fetch, fetchrow or fetchval) on `sql`; StoreUnavailable if it fails."""
        try:
            return await method(sql, *args)
        except _ERRORS as err:
            raise StoreUnavailable(UNAVAILABLE) from err


async def _create_pool(url: str) -> Any:
    """A pool with one connection open; StoreUnavailable, or ValueError for a bad URL."""
    try:
        return await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=4,
            timeout=_CONNECT_TIMEOUT,
            command_timeout=_COMMAND_TIMEOUT,
        )
    except ValueError as err:  # first: asyncpg's ClientConfigurationError is one too
        # SECURITY: asyncpg's message may quote the URL and its password: cause only.
        raise ValueError(f"not a usable PostgreSQL URL: {_shown(url)}") from err
    except _ERRORS as err:
        raise StoreUnavailable(UNAVAILABLE) from err


def _shown(url: str) -> str:
    """`url` fit for logs: its password masked and its query (`?password=` works too) cut."""
    # SECURITY: reprs and errors reach logs and tracebacks; neither may carry a password.
    return StoreUrl(url).masked().partition("?")[0]
