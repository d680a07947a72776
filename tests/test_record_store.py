"""One contract for every record store: memory, SQLite and PostgreSQL keep the same promises.

Each PostgreSQL test has a schema of its own in 127.0.0.1:5432/test (the `pg_records`
fixture); without PostgreSQL those cases are skipped, except in CI (CI=true), where they
fail. "Another process" is a second store opened on the same file or schema: races between
the two must still have exactly one winner.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import asyncpg  # type: ignore[import-untyped]
import pytest

from gateway.store import StoreUnavailable, open_session_store, records_postgres, records_sqlite
from gateway.store.records import RecordStore, Stored, open_record_store
from gateway.store.sqlite import sqlite_path
from tests.conftest import PG_DSN

ROUNDS = 10  # races per concurrency test
RACERS = 8  # callers per race, alternating between two stores


@dataclass
class Records:
    """A store under test, and how to open another on the same state."""

    name: str
    url: str
    store: RecordStore
    opened: list[RecordStore] = field(default_factory=list)

    async def peer(self) -> RecordStore:
        """Another store on the same state, as another process opens it (memory: itself)."""
        if self.name == "memory":
            return self.store
        peer = await open_record_store(self.url)
        self.opened.append(peer)
        return peer

    async def racers(self) -> list[RecordStore]:
        return [self.store, await self.peer()]


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def record_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The record store URL for `state.records` (a fresh file or schema)."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    return str(request.getfixturevalue("pg_records"))


@pytest.fixture
async def records(record_url: str) -> AsyncIterator[Records]:
    name = record_url.partition(":")[0]
    harness = Records(name, record_url, await open_record_store(record_url))
    yield harness
    for store in {id(s): s for s in [harness.store, *harness.opened]}.values():
        await store.close()


durable = pytest.mark.parametrize("record_url", ["sqlite", "postgresql"], indirect=True)


# -- single operations -------------------------------------------------------------------------


async def test_create_and_get(records: Records) -> None:
    store = records.store
    assert await store.get("user", "alice") is None
    assert await store.create("user", "alice", b"one") is True
    assert await store.get("user", "alice") == Stored(b"one", 1)


async def test_create_refuses_when_present(records: Records) -> None:
    store = records.store
    assert await store.create("user", "alice", b"one") is True
    assert await store.create("user", "alice", b"two") is False
    assert await store.get("user", "alice") == Stored(b"one", 1)


async def test_versions_grow_by_one_on_every_change(records: Records) -> None:
    store = records.store
    await store.create("user", "alice", b"v1")
    assert await store.replace("user", "alice", b"v2", 1) is True
    assert await store.put("user", "alice", b"v3") == 3
    assert await store.replace("user", "alice", b"v4", 3) is True
    assert await store.get("user", "alice") == Stored(b"v4", 4)


async def test_replace_succeeds_only_at_the_current_version(records: Records) -> None:
    store = records.store
    await store.create("user", "alice", b"one")
    assert await store.replace("user", "alice", b"two", 1) is True
    assert await store.replace("user", "alice", b"stale", 1) is False
    assert await store.replace("user", "alice", b"future", 3) is False
    assert await store.get("user", "alice") == Stored(b"two", 2)
    assert await store.replace("user", "nobody", b"x", 1) is False
    assert await store.get("user", "nobody") is None


async def test_put_creates_and_overwrites(records: Records) -> None:
    store = records.store
    assert await store.put("user", "alice", b"one") == 1
    assert await store.put("user", "alice", b"two") == 2
    assert await store.get("user", "alice") == Stored(b"two", 2)


async def test_delete(records: Records) -> None:
    store = records.store
    await store.put("user", "alice", b"x")
    assert await store.delete("user", "alice") is True
    assert await store.get("user", "alice") is None
    assert await store.delete("user", "alice") is False
    assert await store.delete("user", "never") is False


async def test_delete_at_a_version_deletes_only_that_version(records: Records) -> None:
    store = records.store
    await store.put("user", "alice", b"one")
    await store.put("user", "alice", b"two")
    assert await store.delete("user", "alice", version=1) is False
    assert await store.delete("user", "alice", version=3) is False
    assert await store.get("user", "alice") == Stored(b"two", 2)
    assert await store.delete("user", "alice", version=2) is True
    assert await store.get("user", "alice") is None
    assert await store.create("user", "alice", b"again") is True  # a new life starts at 1
    assert await store.get("user", "alice") == Stored(b"again", 1)


async def test_kinds_and_keys_are_separate(records: Records) -> None:
    store = records.store
    await store.put("user", "a:b", b"1")
    await store.put("mfa", "a:b", b"2")
    await store.put("user", "a", b"3")
    await store.put("user", "ünï/cödé key", b"4")
    assert await store.get("user", "a:b") == Stored(b"1", 1)
    assert await store.get("mfa", "a:b") == Stored(b"2", 1)
    assert await store.get("user", "a") == Stored(b"3", 1)
    assert await store.get("user", "ünï/cödé key") == Stored(b"4", 1)
    assert await store.get("user", "b") is None
    assert await store.delete("mfa", "a:b") is True
    assert await store.get("user", "a:b") == Stored(b"1", 1)


async def test_values_are_opaque_bytes(records: Records) -> None:
    store = records.store
    binary = bytes(range(256)) * 4
    await store.create("mfa", "bin", binary)
    await store.put("mfa", "empty", b"")
    await store.put("mfa", "nul", b"\0")
    await store.create("mfa", "ff", b"\xff" * 3)
    assert await store.replace("mfa", "ff", b"\xff\0\xfe", 1)
    assert await store.get("mfa", "bin") == Stored(binary, 1)
    assert await store.get("mfa", "empty") == Stored(b"", 1)
    assert await store.get("mfa", "nul") == Stored(b"\0", 1)
    assert await store.get("mfa", "ff") == Stored(b"\xff\0\xfe", 2)
    assert [value.value for _, value in await store.scan("mfa")] == [
        binary,
        b"",
        b"\xff\0\xfe",
        b"\0",
    ]


# -- scan --------------------------------------------------------------------------------------

KEYS = ["Zed", "a", "a-b", "a_b", "ab", "b", "é", "ü", "日本", "😀"]  # code point order


async def test_scan_returns_records_in_key_order(records: Records) -> None:
    store = records.store
    for key in reversed(KEYS):
        await store.put("user", key, key.encode())
    await store.put("user", "ab", b"ab again")
    found = await store.scan("user")
    assert [key for key, _ in found] == sorted(KEYS) == KEYS
    assert found[4] == ("ab", Stored(b"ab again", 2))


async def test_scan_pages_with_after_and_limit(records: Records) -> None:
    store = records.store
    for key in KEYS:
        await store.create("user", key, b"x")
    assert [key for key, _ in await store.scan("user", after="a_b")] == KEYS[4:]
    assert [key for key, _ in await store.scan("user", after="a", limit=2)] == ["a-b", "a_b"]
    assert await store.scan("user", after="😀") == []
    assert await store.scan("user", limit=0) == []
    pages, after = [], ""
    while page := await store.scan("user", after=after, limit=3):
        pages.append([key for key, _ in page])
        after = page[-1][0]
    assert pages == [KEYS[0:3], KEYS[3:6], KEYS[6:9], KEYS[9:]]


async def test_scan_sees_only_its_kind(records: Records) -> None:
    store = records.store
    await store.put("user", "alice", b"u")
    await store.put("userx", "bob", b"x")
    await store.put("mfa", "alice", b"m")
    assert await store.scan("user") == [("alice", Stored(b"u", 1))]
    assert await store.scan("mfa") == [("alice", Stored(b"m", 1))]
    assert await store.scan("review") == []


async def test_a_negative_scan_limit_is_refused(records: Records) -> None:
    with pytest.raises(ValueError, match="limit"):
        await records.store.scan("user", limit=-1)


# -- races: two stores on the same state, as two processes ----------------------------------------


async def test_of_concurrent_creators_exactly_one_wins(records: Records) -> None:
    stores = await records.racers()
    for round_ in range(ROUNDS):
        key = f"link{round_}"
        calls = [stores[i % 2].create("link", key, b"%d" % i) for i in range(RACERS)]
        results = await asyncio.gather(*calls)
        assert results.count(True) == 1
        assert await records.store.get("link", key) == Stored(b"%d" % results.index(True), 1)


async def test_of_concurrent_replacers_at_one_version_exactly_one_wins(records: Records) -> None:
    stores = await records.racers()
    for round_ in range(ROUNDS):
        key = f"codes{round_}"
        await records.store.create("recovery", key, b"start")
        calls = [stores[i % 2].replace("recovery", key, b"%d" % i, 1) for i in range(RACERS)]
        results = await asyncio.gather(*calls)
        assert results.count(True) == 1
        winner = b"%d" % results.index(True)
        assert await records.store.get("recovery", key) == Stored(winner, 2)


async def test_of_concurrent_deleters_exactly_one_takes(records: Records) -> None:
    stores = await records.racers()
    for round_ in range(ROUNDS):
        key = f"link{round_}"
        await records.store.create("link", key, b"single use")
        version = None if round_ % 2 else 1  # with and without a version
        calls = [stores[i % 2].delete("link", key, version) for i in range(RACERS)]
        assert (await asyncio.gather(*calls)).count(True) == 1
        assert await records.store.get("link", key) is None


async def test_concurrent_puts_each_get_their_own_version(records: Records) -> None:
    stores = await records.racers()
    versions = await asyncio.gather(*(stores[i % 2].put("user", "a", b"x") for i in range(20)))
    assert sorted(versions) == list(range(1, 21))


# -- argument checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["", "User", "a:b", "a b", "x" * 33, "us\0er"])
async def test_bad_kinds_are_refused(records: Records, kind: str) -> None:
    store = records.store
    writes: list[Callable[[], Awaitable[object]]] = [
        lambda: store.create(kind, "k", b"x"),
        lambda: store.replace(kind, "k", b"x", 1),
        lambda: store.put(kind, "k", b"x"),
    ]
    for write in writes:
        with pytest.raises(ValueError, match="kind"):
            await write()


async def test_ping(records: Records) -> None:
    assert await records.store.ping() is True


# -- durability, closing, migrations -----------------------------------------------------------


@durable
async def test_records_survive_close_and_reopen(records: Records) -> None:
    await records.store.create("user", "alice", b"\0kept\xff")
    await records.store.put("user", "bob", b"one")
    await records.store.put("user", "bob", b"two")
    await records.store.close()
    records.store = await open_record_store(records.url)
    assert await records.store.get("user", "alice") == Stored(b"\0kept\xff", 1)
    assert await records.store.replace("user", "bob", b"three", 2) is True
    assert await records.store.get("user", "bob") == Stored(b"three", 3)


@durable
async def test_a_closed_store_is_unavailable_and_does_not_ping(records: Records) -> None:
    store = await records.peer()
    await store.close()
    assert await store.ping() is False
    with pytest.raises(StoreUnavailable) as caught:
        await store.get("user", "alice")
    assert caught.value.status == 503 and caught.value.reason == "store-unavailable"
    assert caught.value.__cause__ is not None
    assert await records.store.ping() is True  # the other store is unaffected


async def schema_versions(url: str) -> list[object]:
    """The rows of the schema version table of the SQLite file or PostgreSQL schema."""
    return [row[0] for row in await query(url, "SELECT version FROM {prefix}_schema")]


async def query(url: str, sql: str) -> list[tuple[object, ...]]:
    """Rows of `sql` on the store's own database; `{prefix}` becomes durable or gateway."""
    if url.startswith("sqlite:"):
        with closing(sqlite3.connect(sqlite_path(url))) as db:
            return list(db.execute(sql.format(prefix="durable")))
    conn = await asyncpg.connect(url)  # the URL's search_path selects the test's schema
    try:
        return [tuple(row) for row in await conn.fetch(sql.format(prefix="gateway"))]
    finally:
        await conn.close()


def with_probe_migration(url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, ...]:
    """The store's migrations plus one that fails if applied twice (now in effect)."""
    module: ModuleType = records_sqlite if url.startswith("sqlite:") else records_postgres
    prefix = "durable" if module is records_sqlite else "gateway"
    probe = f"CREATE TABLE {prefix}_probe (n INTEGER); INSERT INTO {prefix}_probe VALUES (1);"
    migrations = (*module.MIGRATIONS, probe)
    monkeypatch.setattr(module, "MIGRATIONS", migrations)
    return migrations


@durable
async def test_migrations_are_applied_once_by_concurrent_openers(
    record_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await open_concurrently(record_url)  # a fresh database: every migration
    assert await schema_versions(record_url) == [1]
    migrations = with_probe_migration(record_url, monkeypatch)
    await open_concurrently(record_url)  # an upgrade: the new one only
    assert await schema_versions(record_url) == [len(migrations)]
    assert await query(record_url, "SELECT n FROM {prefix}_probe") == [(1,)]


async def open_concurrently(url: str, count: int = 4) -> None:
    """Open `count` stores at once (as replicas starting together), use each, close them."""
    stores = await asyncio.gather(*(open_record_store(url) for _ in range(count)))
    versions = [await store.put("user", "alice", b"x") for store in stores]
    for store in stores:
        await store.close()
    assert versions[1:] == [v + 1 for v in versions[:-1]]


@durable
async def test_a_new_migration_is_applied_on_the_next_open(
    record_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await open_record_store(record_url)
    await first.create("user", "alice", b"before")
    await first.close()
    assert await schema_versions(record_url) == [1]
    migrations = with_probe_migration(record_url, monkeypatch)
    second = await open_record_store(record_url)
    assert await schema_versions(record_url) == [len(migrations)]
    assert await second.get("user", "alice") == Stored(b"before", 1)
    await second.close()


@durable
async def test_a_schema_newer_than_the_code_is_left_alone(
    record_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_probe_migration(record_url, monkeypatch)
    await (await open_record_store(record_url)).close()
    monkeypatch.undo()  # the older code, after a rollback
    store = await open_record_store(record_url)
    assert await store.put("user", "alice", b"x") == 1
    await store.close()
    assert await schema_versions(record_url) == [2]


# -- opening -----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://h/0", "http://h/x", "x"])
async def test_open_refuses_other_urls(url: str) -> None:
    with pytest.raises(ValueError):
        await open_record_store(url)


async def test_an_unopenable_sqlite_file_is_unavailable(tmp_path: Path) -> None:
    for path in (tmp_path / "no" / "such" / "dir.db", tmp_path):
        with pytest.raises(StoreUnavailable) as caught:
            await open_record_store(f"sqlite:///{path}")
        assert str(tmp_path) not in str(caught.value)
        assert caught.value.__cause__ is not None


async def test_the_sqlite_file_is_private(tmp_path: Path) -> None:
    store = await open_record_store(f"sqlite:///{tmp_path}/state.db")
    await store.put("user", "alice", b"x")
    await store.close()
    assert stat.S_IMODE(os.stat(tmp_path / "state.db").st_mode) == 0o600


async def test_sqlite_records_and_sessions_share_one_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    records = await open_record_store(url)
    sessions = await open_session_store(url)
    await sessions.put("user", "alice", b"session", 60)
    assert await records.create("user", "alice", b"record") is True
    assert await sessions.get("user", "alice") == b"session"
    assert await records.get("user", "alice") == Stored(b"record", 1)
    writes = [records.put("user", "bob", b"x") for _ in range(20)]
    counts = [sessions.incr("rate", "ip", 60) for _ in range(20)]
    await asyncio.gather(*writes, *counts)  # interleaved: neither sees "database is locked"
    assert await sessions.delete("user", "alice") is True
    assert await records.get("user", "alice") == Stored(b"record", 1)
    assert await records.get("user", "bob") == Stored(b"x", 20)
    await records.close()
    await sessions.close()
    sessions = await open_session_store(url)  # the other order: sessions first
    records = await open_record_store(url)
    assert await sessions.get("rate", "ip") == b"20"
    assert [key for key, _ in await records.scan("user")] == ["alice", "bob"]
    await records.close()
    await sessions.close()
    assert stat.S_IMODE(os.stat(tmp_path / "state.db").st_mode) == 0o600


# -- PostgreSQL ----------------------------------------------------------------------------------


async def test_an_unreachable_postgres_is_unavailable() -> None:
    url = "postgresql://postgres:s3cret@127.0.0.1:1/test"
    with pytest.raises(StoreUnavailable) as caught:
        await open_record_store(url)
    assert "127.0.0.1" not in str(caught.value) and "s3cret" not in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)


async def test_a_malformed_postgres_url_is_a_value_error_without_the_password() -> None:
    with pytest.raises(ValueError, match="PostgreSQL URL") as caught:
        await open_record_store("postgresql://gw:s3cret@127.0.0.1:notaport/test")
    assert "s3cret" not in str(caught.value)


async def test_search_path_in_the_url_selects_the_schema(pg_records: str) -> None:
    schema = pg_records.rpartition("search_path=")[2]
    store = await open_record_store(pg_records)
    await store.put("user", "alice", b"x")
    await store.close()
    admin = await asyncpg.connect(PG_DSN)  # no search_path: public first
    try:
        assert await admin.fetchval(f"SELECT count(*) FROM {schema}.gateway_record") == 1
        assert await admin.fetchval("SELECT to_regclass('public.gateway_record')") is None
    finally:
        await admin.close()


async def test_a_url_parameter_that_is_no_server_setting_fails(pg_records: str) -> None:
    with pytest.raises(StoreUnavailable) as caught:
        await open_record_store(pg_records.replace("search_path", "schema"))
    assert isinstance(caught.value.__cause__, asyncpg.PostgresError)


async def test_a_missing_schema_is_unavailable(pg_records: str) -> None:
    with pytest.raises(StoreUnavailable):
        await open_record_store(f"{pg_records}_missing")


async def test_the_postgres_repr_hides_the_password(pg_records: str) -> None:
    for url in (
        pg_records.replace("postgres@", "postgres:s3cret@"),  # trust auth ignores it
        f"{pg_records}&password=s3cret",  # asyncpg takes a password from the query too
    ):
        store = await open_record_store(url)
        assert "s3cret" not in repr(store) and "127.0.0.1:5432/test" in repr(store)
        await store.close()


async def test_postgres_recovers_after_its_connections_are_killed(pg_records: str) -> None:
    name = pg_records.rpartition("search_path=")[2]
    store = await open_record_store(f"{pg_records}&application_name={name}")
    await store.put("user", "alice", b"x")
    admin = await asyncpg.connect(PG_DSN)
    try:
        killed = await admin.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))"
            " FROM pg_stat_activity WHERE application_name = $1",
            name,
        )
    finally:
        await admin.close()
    assert killed >= 1
    failures = 0
    while (found := await get_or_none(store)) is None and failures < 3:
        failures += 1
    assert found == Stored(b"x", 1) and failures <= 1  # a cut connection costs one call at most
    assert await store.ping() is True
    await store.close()


async def get_or_none(store: RecordStore) -> Stored | None:
    try:
        return await store.get("user", "alice")
    except StoreUnavailable:
        return None
