"""`memory://`: the record store in this process's dicts, for tests and the demo.

Nothing survives a restart and nothing is shared between processes. Each operation runs
without awaiting, so each one (the compare-and-swap in `replace`, the take in `delete`) is
atomic against every other task. Keys sort by code point, as on SQLite and PostgreSQL.
"""

from __future__ import annotations

from gateway.store.base import check_kind
from gateway.store.records import Stored


class MemoryRecords:
    """A `RecordStore` in dicts: kind → key → record."""

    def __init__(self) -> None:
        self._kinds: dict[str, dict[str, Stored]] = {}

    def __repr__(self) -> str:
        count = sum(len(records) for records in self._kinds.values())
        return f"<MemoryRecords {count} records>"

    async def get(self, kind: str, key: str) -> Stored | None:
        return self._kinds.get(kind, {}).get(key)

    async def create(self, kind: str, key: str, value: bytes) -> bool:
        records = self._kinds.setdefault(check_kind(kind), {})
        if key in records:
            return False
        records[key] = Stored(bytes(value), 1)
        return True

    async def replace(self, kind: str, key: str, value: bytes, version: int) -> bool:
        records = self._kinds.get(check_kind(kind), {})
        current = records.get(key)
        # SECURITY: compare-and-swap: a writer that read an older version loses, so two
        # concurrent read-modify-writes (e.g. spending one recovery code twice) cannot both land.
        if current is None or current.version != version:
            return False
        records[key] = Stored(bytes(value), version + 1)
        return True

    async def put(self, kind: str, key: str, value: bytes) -> int:
        records = self._kinds.setdefault(check_kind(kind), {})
        current = records.get(key)
        version = 1 if current is None else current.version + 1
        records[key] = Stored(bytes(value), version)
        return version

    async def delete(self, kind: str, key: str, version: int | None = None) -> bool:
        records = self._kinds.get(kind, {})
        current = records.get(key)
        if current is None or (version is not None and current.version != version):
            return False
        del records[key]
        return True

    async def scan(self, kind: str, after: str = "", limit: int = 1000) -> list[tuple[str, Stored]]:
        _check_limit(limit)
        records = self._kinds.get(kind, {})
        keys = sorted(key for key in records if key > after)[:limit]
        return [(key, records[key]) for key in keys]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"a scan limit must not be negative, got {limit!r}")
