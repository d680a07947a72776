"""`sqlite:///path`: the session store in one SQLite file, the embedded default.

For one gateway process: aiosqlite runs the single connection on its own thread, so no
query blocks the event loop. The file is in WAL mode, every statement commits by itself,
and every atomic operation is one SQL statement (an upsert or `DELETE ... RETURNING`), so
it stays atomic even if another process opens the same file. Pub/sub is in-process.

Rows carry their expiry time (seconds of the injected clock): reads ignore expired rows,
and writes sweep them out now and then. The tables are prefixed `ephemeral_` because the
durable record store may share the file.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import aiosqlite

from gateway.store.base import (
    OnConnect,
    StoreUnavailable,
    Subscription,
    check_kind,
    check_ttl,
)
from gateway.store.pubsub import LocalHub

_SWEEP_EVERY = 60.0  # seconds of clock between sweeps of expired rows

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ephemeral_value (
    kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ephemeral_value_expires ON ephemeral_value (expires);
CREATE TABLE IF NOT EXISTS ephemeral_index (
    kind TEXT NOT NULL, key TEXT NOT NULL, member TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (kind, key, member)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ephemeral_index_expires ON ephemeral_index (expires);
CREATE TABLE IF NOT EXISTS ephemeral_lock (
    name TEXT NOT NULL PRIMARY KEY, token TEXT NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
"""

_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000")

_PUT = "INSERT OR REPLACE INTO ephemeral_value VALUES (:kind, :key, :value, :expires)"
_GET = "SELECT value FROM ephemeral_value WHERE kind = :kind AND key = :key AND expires > :now"
_TAKE = "DELETE FROM ephemeral_value WHERE kind = :kind AND key = :key RETURNING value, expires"
_PUT_IF_ABSENT = """
INSERT INTO ephemeral_value VALUES (:kind, :key, :value, :expires)
ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value, expires = excluded.expires
WHERE ephemeral_value.expires <= :now
"""
# In SET, `value` and `expires` are the old row's: an expired counter starts again at 1.
_INCR = """
INSERT INTO ephemeral_value VALUES (:kind, :key, CAST('1' AS BLOB), :expires)
ON CONFLICT (kind, key) DO UPDATE SET
    value = CAST(CAST(CASE WHEN expires <= :now THEN 1
                      ELSE CAST(CAST(value AS TEXT) AS INTEGER) + 1 END AS TEXT) AS BLOB),
    expires = CASE WHEN expires <= :now THEN excluded.expires ELSE expires END
RETURNING CAST(CAST(value AS TEXT) AS INTEGER)
"""
# The live value must read back as exactly the integer it spells (ASCII digits, as `incr` and
# `advance` write them) and be smaller; anything else is kept (fails closed).
_ADVANCE = """
INSERT INTO ephemeral_value VALUES (:kind, :key, :digits, :expires)
ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value, expires = excluded.expires
WHERE ephemeral_value.expires <= :now OR (
    CAST(CAST(ephemeral_value.value AS TEXT) AS INTEGER) < :value
    AND CAST(CAST(ephemeral_value.value AS TEXT) AS INTEGER) || ''
        = CAST(ephemeral_value.value AS TEXT)
)
"""
_INT64 = range(-(2**63), 2**63)  # what SQLite's INTEGER holds
_INDEX_ADD = "INSERT OR REPLACE INTO ephemeral_index VALUES (:kind, :key, :member, :expires)"
_INDEX_MEMBERS = """
SELECT member FROM ephemeral_index WHERE kind = :kind AND key = :key AND expires > :now
"""
_INDEX_REMOVE = """
DELETE FROM ephemeral_index WHERE kind = :kind AND key = :key AND member = :member
"""
_ACQUIRE = """
INSERT INTO ephemeral_lock VALUES (:name, :token, :expires)
ON CONFLICT (name) DO UPDATE SET token = excluded.token, expires = excluded.expires
WHERE ephemeral_lock.expires <= :now
"""
_RELEASE = "DELETE FROM ephemeral_lock WHERE name = :name AND token = :token"
_SWEEP = (
    "DELETE FROM ephemeral_value WHERE expires <= :now",
    "DELETE FROM ephemeral_index WHERE expires <= :now",
    "DELETE FROM ephemeral_lock WHERE expires <= :now",
)


def sqlite_path(url: str) -> str:
    """The file of `sqlite:///var/lib/gateway/state.db`: `/var/lib/gateway/state.db`."""
    scheme, sep, rest = url.partition("://")
    path = unquote(rest.partition("?")[0])
    if scheme.lower() != "sqlite" or not sep or not path.strip("/"):
        raise ValueError("expected sqlite:///path/to/state.db")
    return "/" + path.lstrip("/") if path.startswith("/") else path


def _create_private(path: str) -> None:
    # SECURITY: the file holds session HMACs and sealed records: readable by its owner only.
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))


class SqliteStore:
    """A `SessionStore` in one SQLite file."""

    def __init__(self, db: aiosqlite.Connection, path: str, clock: Callable[[], float]) -> None:
        self._db = db
        self._path = path
        self._clock = clock
        self._hub = LocalHub()
        self._next_sweep = clock() + _SWEEP_EVERY

    @classmethod
    async def open(cls, path: str, *, clock: Callable[[], float] = time.time) -> SqliteStore:
        """Open (creating) the file and its tables; StoreUnavailable if it cannot be."""
        try:
            await asyncio.to_thread(_create_private, path)
            db = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as err:
            raise StoreUnavailable() from err
        try:
            for pragma in _PRAGMAS:
                await db.execute_fetchall(pragma)
            await db.executescript(_SCHEMA)
        except sqlite3.Error as err:
            await db.close()
            raise StoreUnavailable() from err
        return cls(db, path, clock)

    def __repr__(self) -> str:
        return f"<SqliteStore {self._path!r}>"

    async def put(self, kind: str, key: str, value: bytes, ttl: float) -> None:
        expires = await self._expiry(ttl)
        await self._change(_PUT, kind=check_kind(kind), key=key, value=value, expires=expires)

    async def get(self, kind: str, key: str) -> bytes | None:
        rows = await self._rows(_GET, kind=kind, key=key, now=self._clock())
        return bytes(rows[0][0]) if rows else None

    async def delete(self, kind: str, key: str) -> bool:
        return await self.take(kind, key) is not None

    async def take(self, kind: str, key: str) -> bytes | None:
        rows = await self._rows(_TAKE, kind=kind, key=key)
        if not rows or rows[0][1] <= self._clock():
            return None
        return bytes(rows[0][0])

    async def put_if_absent(self, kind: str, key: str, value: bytes, ttl: float) -> bool:
        expires = await self._expiry(ttl)
        params = {"kind": check_kind(kind), "key": key, "value": value, "expires": expires}
        return await self._change(_PUT_IF_ABSENT, **params, now=self._clock()) > 0

    async def incr(self, kind: str, key: str, ttl: float) -> int:
        expires = await self._expiry(ttl)
        params = {"kind": check_kind(kind), "key": key, "expires": expires}
        rows = await self._rows(_INCR, **params, now=self._clock())
        return int(rows[0][0])

    async def advance(self, kind: str, key: str, value: int, ttl: float) -> bool:
        """See `SessionStore.advance`; ValueError for a `value` beyond signed 64 bits."""
        if value not in _INT64:
            raise ValueError(f"advance takes a signed 64-bit integer, got {value!r}")
        expires = await self._expiry(ttl)
        params = {"kind": check_kind(kind), "key": key, "value": value, "expires": expires}
        digits = str(value).encode()
        # SECURITY: one statement stores only a greater step: no TOTP code is accepted twice.
        return await self._change(_ADVANCE, **params, digits=digits, now=self._clock()) > 0

    async def index_add(self, kind: str, key: str, member: str, ttl: float) -> None:
        expires = await self._expiry(ttl)
        params = {"kind": check_kind(kind), "key": key, "member": member, "expires": expires}
        await self._change(_INDEX_ADD, **params)

    async def index_members(self, kind: str, key: str) -> set[str]:
        rows = await self._rows(_INDEX_MEMBERS, kind=kind, key=key, now=self._clock())
        return {row[0] for row in rows}

    async def index_remove(self, kind: str, key: str, member: str) -> None:
        await self._change(_INDEX_REMOVE, kind=kind, key=key, member=member)

    async def acquire(self, name: str, ttl: float) -> str | None:
        token = secrets.token_urlsafe(16)
        expires = await self._expiry(ttl)
        params = {"name": name, "token": token, "expires": expires}
        taken = await self._change(_ACQUIRE, **params, now=self._clock())
        return token if taken else None

    async def release(self, name: str, token: str) -> None:
        # SECURITY: only the holder's token releases; a late finisher cannot free another's lock.
        await self._change(_RELEASE, name=name, token=token)

    async def publish(self, channel: str, message: bytes) -> None:
        self._hub.publish(channel, bytes(message))

    async def subscribe(self, channel: str, *, on_connect: OnConnect | None = None) -> Subscription:
        return await self._hub.subscribe(channel, on_connect)

    async def ping(self) -> bool:
        try:
            await self._rows("SELECT 1")
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._hub.close()
        await self._db.close()

    async def _expiry(self, ttl: float) -> float:
        """The expiry time `ttl` seconds from now; sweeps expired rows now and then."""
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_EVERY
            for statement in _SWEEP:
                await self._change(statement, now=now)
        return now + check_ttl(ttl)

    async def _rows(self, sql: str, **params: Any) -> list[sqlite3.Row]:
        try:
            return list(await self._db.execute_fetchall(sql, params))
        except (sqlite3.Error, ValueError) as err:  # ValueError: the connection is closed
            raise StoreUnavailable() from err

    async def _change(self, sql: str, **params: Any) -> int:
        try:
            async with self._db.execute(sql, params) as cursor:
                return cursor.rowcount
        except (sqlite3.Error, ValueError) as err:
            raise StoreUnavailable() from err
