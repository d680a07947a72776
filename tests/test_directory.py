"""The directory of users (gateway/directory.py) on real stores: entries, networks, last access,
USER resolution, disabling across processes, tampering and concurrent logins.

Record stores: memory, SQLite and PostgreSQL (`pg_records`); the cross-process tests share one
Redis session store (`redis_db`) between two `Directory` objects, as two gateway processes do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway import directory as directory_module
from gateway.directory import KIND, Directory, network_of
from gateway.errors import Conflict, NotFound
from gateway.keyring import Keyring
from gateway.sessions import Session
from gateway.store import MemoryStore, SessionStore, StoreUnavailable, open_session_store
from gateway.store.records import RecordStore, Stored, open_record_store

ISS = "https://idp.example.org"
KEYRING = Keyring([os.urandom(32)])


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def session(sub: str = "alice-sub", user: str = "alice@example.org", **changes: Any) -> Session:
    fields: dict[str, Any] = {
        "key": f"key-{sub}",
        "handle": f"handle-{sub}",
        "iss": ISS,
        "sub": sub,
        "user": user,
        "email": user if "@" in user else None,
        "groups": ("sre",),
        "amr": ("pwd",),
        "sid": None,
        "created": 0.0,
        "last_active": 0.0,
        "auth_time": None,
    }
    return Session(**(fields | changes))


def identity(sub: str = "alice-sub") -> str:
    return f"{ISS}|{sub}"


class Watched:
    """A RecordStore in front of another: counts calls, can be made to fail, and swapped
    for a reopened store (what a restarted database looks like to the directory)."""

    def __init__(self, inner: RecordStore) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}
        self.failing = False
        self.failed = asyncio.Event()  # set at each refused call

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.failing:
            self.failed.set()
            raise StoreUnavailable("the record store is down (test)")

    def writes(self) -> int:
        return sum(self.calls.get(n, 0) for n in ("create", "replace", "put", "delete"))

    async def get(self, kind: str, key: str) -> Stored | None:
        self._count("get")
        return await self.inner.get(kind, key)

    async def create(self, kind: str, key: str, value: bytes) -> bool:
        self._count("create")
        await asyncio.sleep(0)  # a real store yields here: a retry loop must not starve the loop
        if self.calls["create"] > 50:
            raise RuntimeError("create() retried more than 50 times: a livelock")
        return await self.inner.create(kind, key, value)

    async def replace(self, kind: str, key: str, value: bytes, version: int) -> bool:
        self._count("replace")
        return await self.inner.replace(kind, key, value, version)

    async def put(self, kind: str, key: str, value: bytes) -> int:
        self._count("put")
        return await self.inner.put(kind, key, value)

    async def delete(self, kind: str, key: str, version: int | None = None) -> bool:
        self._count("delete")
        return await self.inner.delete(kind, key, version)

    async def scan(self, kind: str, after: str = "", limit: int = 1000) -> list[tuple[str, Stored]]:
        self._count("scan")
        return await self.inner.scan(kind, after, limit)

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Stores:
    url: str
    opened: list[RecordStore] = field(default_factory=list)

    async def open(self) -> RecordStore:
        store = await open_record_store(self.url)
        self.opened.append(store)
        return store


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def records_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_records"))
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/records.db"


@pytest.fixture
async def stores(records_url: str) -> AsyncIterator[Stores]:
    """Where records live: each `open()` is another connection to the same records (memory: a
    store of its own; only the SQLite and PostgreSQL ones are shared)."""
    stores = Stores(records_url)
    yield stores
    for store in stores.opened:
        with contextlib.suppress(Exception):  # the failure test closed one already
            await store.close()


shared_stores = pytest.mark.parametrize("records_url", ["sqlite", "postgresql"], indirect=True)

MakeDirectory = Callable[..., Awaitable[Directory]]


@pytest.fixture
async def make_directory() -> AsyncIterator[MakeDirectory]:
    made: list[tuple[Directory, SessionStore]] = []

    async def make(
        records: RecordStore, store: SessionStore | None = None, clock: Clock | None = None
    ) -> Directory:
        store = store or MemoryStore()
        directory = Directory(records, store, KEYRING, clock or Clock())
        await directory.start()
        made.append((directory, store))
        return directory

    yield make
    for directory, store in made:
        # close() re-raises what ended a background task; the tests say what went wrong
        with contextlib.suppress(Exception):
            await directory.close()
        await store.close()


# -- login: the entry ----------------------------------------------------------------------------


async def test_login_creates_then_updates_the_entry(
    stores: Stores, make_directory: MakeDirectory
) -> None:
    clock = Clock()
    directory = await make_directory(await stores.open(), clock=clock)
    first = await directory.login(session(), "198.51.100.7")
    assert first.first and first.new_network is None and (first.gained, first.lost) == ((), ())
    entry = first.entry
    assert (entry.identity, entry.user, entry.email) == (
        identity(),
        "alice@example.org",
        "alice@example.org",
    )
    assert (entry.first_login, entry.last_login, entry.logins) == (clock.now, clock.now, 1)
    assert entry.groups_history == ((clock.now, ("sre",)),)
    assert entry.networks == {"198.51.100.0/24": clock.now} and entry.last_ip == "198.51.100.7"
    started = clock.now

    clock.now += 60
    again = await directory.login(session(), "198.51.100.8")
    assert not again.first and (again.gained, again.lost, again.email_before) == ((), (), None)
    entry = again.entry
    assert (entry.first_login, entry.last_login, entry.logins) == (started, clock.now, 2)
    assert entry.groups_history == ((started, ("sre",)),)  # unchanged groups: no new step
    assert entry.last_ip == "198.51.100.8"

    clock.now += 60
    changed = await directory.login(
        session(groups=("finance", "sre"), email="alice@new.example.org"), "198.51.100.9"
    )
    assert (changed.gained, changed.lost) == (("finance",), ())
    assert changed.email_before == "alice@example.org"
    assert changed.entry.groups_history == (
        (started, ("sre",)),
        (clock.now, ("finance", "sre")),
    )
    assert await directory.get(identity()) == changed.entry  # what was stored is what came back

    clock.now += 60
    order_only = await directory.login(session(groups=("sre", "finance")), "198.51.100.9")
    assert (order_only.gained, order_only.lost) == ((), ())
    assert len(order_only.entry.groups_history) == 2  # the same set in another order


async def test_networks_and_group_history_are_bounded(
    monkeypatch: pytest.MonkeyPatch, make_directory: MakeDirectory
) -> None:
    monkeypatch.setattr(directory_module, "MAX_NETWORKS", 3)
    monkeypatch.setattr(directory_module, "MAX_HISTORY", 2)
    clock = Clock()
    directory = await make_directory(await open_record_store("memory://"), clock=clock)
    for n in range(6):
        clock.now += 1
        seen = await directory.login(session(groups=(f"g{n}",)), f"10.0.{n}.1")
    entry = seen.entry
    assert entry.networks == {f"10.0.{n}.0/24": clock.now - 5 + n for n in (3, 4, 5)}
    assert [groups for _, groups in entry.groups_history] == [("g4",), ("g5",)]
    assert entry.logins == 6 and entry.last_ip == "10.0.5.1"


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("198.51.100.7", "198.51.100.0/24"),
        ("2001:db8:1:2::5", "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.20", "198.51.100.0/24"),  # IPv4-mapped: the IPv4 network
        ("unix-socket", None),
        ("", None),
    ],
)
def test_network_of(address: str, network: str | None) -> None:
    assert network_of(address) == network


async def test_seen_names_a_network_never_seen_before(make_directory: MakeDirectory) -> None:
    directory = await make_directory(await open_record_store("memory://"))
    logins = [
        ("198.51.100.7", None),  # the first login: no history, so nothing is "new"
        ("198.51.100.200", None),  # the same /24
        ("203.0.113.5", "203.0.113.0/24"),
        ("203.0.113.6", None),
        ("::ffff:198.51.100.1", None),  # IPv4-mapped IPv6 counts as the IPv4 address
        ("::ffff:192.0.2.1", "192.0.2.0/24"),
        ("2001:db8:1:2::5", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", None),  # the same /64
        ("2001:db8:1:3::5", "2001:db8:1:3::/64"),
    ]
    for address, expected in logins:
        seen = await directory.login(session(), address)
        assert seen.new_network == expected, address
    assert "::ffff:198.51.100.0/120" not in seen.entry.networks
    assert len(seen.entry.networks) == 5


# -- last access: in memory until flushed ----------------------------------------------------------


async def test_accessed_writes_nothing_until_flush(
    stores: Stores, make_directory: MakeDirectory
) -> None:
    clock = Clock()
    records = Watched(await stores.open())
    directory = await make_directory(records, clock=clock)
    await directory.login(session(), "198.51.100.7")
    await directory.login(session("bob-sub", "bob@example.org"), "198.51.100.8")
    writes = records.writes()
    for n in range(50):
        clock.now += 1
        directory.accessed(identity(), "app" if n % 2 else "grafana")
    directory.accessed(identity("bob-sub"), "app")
    directory.accessed(identity("svc-no-login"), "app")  # a bearer client: no entry to attach to
    assert records.writes() == writes  # no I/O on the request path
    assert (await directory.get(identity()) or pytest.fail()).last_access == {}

    assert await directory.flush() == 2
    entry = await directory.get(identity())
    assert entry is not None and entry.last_access == {"app": clock.now, "grafana": clock.now - 1}
    assert await directory.get(identity("svc-no-login")) is None
    assert await directory.flush() == 0  # nothing new: nothing written


async def test_flush_keeps_the_latest_time_of_every_process(
    stores: Stores, make_directory: MakeDirectory
) -> None:
    """Two processes flush the same user: the stored time per route is the later one."""
    early, late = Clock(), Clock()
    late.now += 100
    records = await stores.open()
    a = await make_directory(records, clock=early)
    b = await make_directory(
        records if stores.url == "memory://" else await stores.open(), clock=late
    )
    await a.login(session(), "198.51.100.7")
    b.accessed(identity(), "app")
    a.accessed(identity(), "app")
    a.accessed(identity(), "grafana")
    await b.flush()
    await a.flush()  # older for "app": must not move it back
    entry = await a.get(identity())
    assert entry is not None and entry.last_access == {"app": late.now, "grafana": early.now}


@shared_stores
async def test_flush_keeps_pending_times_when_the_store_fails(
    stores: Stores, make_directory: MakeDirectory
) -> None:
    """The record store goes away (closed) during a flush: the times wait for the next one."""
    clock = Clock()
    records = Watched(await stores.open())
    directory = await make_directory(records, clock=clock)
    users = [("alice-sub", "alice@example.org"), ("bob-sub", "bob@example.org")]
    for sub, user in users:
        await directory.login(session(sub, user), "198.51.100.7")
        directory.accessed(identity(sub), "app")
    await records.inner.close()
    with pytest.raises(StoreUnavailable):
        await directory.flush()
    records.inner = await stores.open()  # the database is back
    written = await directory.flush()
    for sub, _ in users:  # the one whose write failed, and the one not yet tried
        entry = await directory.get(identity(sub))
        assert entry is not None and entry.last_access == {"app": clock.now}, sub
    assert written == 2


# -- USER: resolve ---------------------------------------------------------------------------------


async def test_resolve_by_identity_or_by_name_in_any_ascii_case(
    stores: Stores, make_directory: MakeDirectory
) -> None:
    directory = await make_directory(await stores.open())
    await directory.login(session("k-sub", "kim@example.org"), "198.51.100.7")
    await directory.login(session("bob-sub", "bob@example.org"), "198.51.100.8")
    for user in ("kim@example.org", "KIM@EXAMPLE.ORG", "Kim@Example.Org", identity("k-sub")):
        assert (await directory.resolve(user)).identity == identity("k-sub"), user
    # SECURITY: no Unicode case folding: the Kelvin sign and the dotless i are other names.
    for lookalike in ("\u212aim@example.org", "k\u0131m@example.org", "kim@example.org "):
        with pytest.raises(NotFound) as missing:
            await directory.resolve(lookalike)
        assert (missing.value.status, missing.value.reason) == (404, "unknown-user")
    for unknown in ("carol@example.org", identity("nobody"), f"{ISS}|KIM@EXAMPLE.ORG"):
        with pytest.raises(NotFound):
            await directory.resolve(unknown)


async def test_a_name_of_two_identities_is_a_conflict(
    stores: Stores, make_directory: MakeDirectory
) -> None:
    directory = await make_directory(await stores.open())
    await directory.login(session("one", "alice@example.org"), "198.51.100.7")
    await directory.login(session("two", "Alice@Example.org"), "198.51.100.8")
    with pytest.raises(Conflict) as conflict:
        await directory.resolve("alice@example.org")
    assert (conflict.value.status, conflict.value.reason) == (409, "ambiguous-user")
    assert identity("one") in str(conflict.value.detail) and identity("two") in str(
        conflict.value.detail
    )
    assert (await directory.resolve(identity("two"))).user == "Alice@Example.org"


# -- disable / enable ----------------------------------------------------------------------------


async def test_disable_and_enable_set_and_clear_the_flag(
    stores: Stores, make_directory: MakeDirectory
) -> None:
    clock = Clock()
    directory = await make_directory(await stores.open(), clock=clock)
    await directory.login(session(), "198.51.100.7")
    assert not directory.disabled(identity()) and not await directory.disabled_now(identity())
    entry = await directory.disable(identity(), "ops", "left the team")
    flag = dict(entry.disabled or {})
    assert re.fullmatch(r"[0-9a-f]{16}", flag.pop("id"))  # tells this disable from the next
    assert flag == {"at": clock.now, "actor": "ops", "reason": "left the team"}
    assert directory.disabled(identity()) and await directory.disabled_now(identity())
    stored = await directory.get(identity())
    assert stored is not None and stored.disabled == entry.disabled and stored.logins == 1
    entry = await directory.enable(identity(), "ops")
    assert entry.disabled is None
    assert not directory.disabled(identity()) and not await directory.disabled_now(identity())
    for change in (
        directory.disable(identity("nobody"), "ops"),
        directory.enable(identity("nobody"), "ops"),
    ):
        with pytest.raises(NotFound):
            await change
    assert not directory.disabled(identity("nobody"))


async def until(check: Callable[[], bool], what: str, timeout: float = 2.0) -> float:
    """Poll `check` until it holds; the seconds it took, or AssertionError after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.002)
    return time.monotonic() - started


@shared_stores
async def test_disabling_reaches_another_process_within_a_second(
    stores: Stores, make_directory: MakeDirectory, redis_db: str
) -> None:
    """Two processes: each its own Redis connection and record store connection."""
    a = await make_directory(await stores.open(), await open_session_store(redis_db))
    b = await make_directory(await stores.open(), await open_session_store(redis_db))
    await a.login(session(), "198.51.100.7")
    await a.disable(identity(), "ops")
    took = await until(lambda: b.disabled(identity()), "B to see the disable")
    assert took < 1.0
    assert await b.disabled_now(identity())
    # a process started later loads the whole set when it subscribes
    c = await make_directory(await stores.open(), await open_session_store(redis_db))
    assert c.disabled(identity())
    await a.enable(identity(), "ops")
    took = await until(lambda: not b.disabled(identity()) and not c.disabled(identity()), "enable")
    assert took < 1.0


@shared_stores
async def test_a_failed_read_does_not_stop_later_announcements(
    stores: Stores, make_directory: MakeDirectory, redis_db: str
) -> None:
    """B's record store fails while it handles one announcement; the next ones still arrive."""
    a = await make_directory(await stores.open(), await open_session_store(redis_db))
    b_records = Watched(await stores.open())
    b = await make_directory(b_records, await open_session_store(redis_db))
    await a.login(session(), "198.51.100.7")
    await a.login(session("bob-sub", "bob@example.org"), "198.51.100.8")
    b_records.failing = True
    await a.disable(identity(), "ops")
    await asyncio.wait_for(b_records.failed.wait(), 2.0)  # B tried to read alice's entry
    b_records.failing = False
    await a.disable(identity("bob-sub"), "ops")
    await until(lambda: b.disabled(identity("bob-sub")), "B to see bob disabled after a failure")


# -- integrity and concurrency ---------------------------------------------------------------------


async def test_a_tampered_entry_reads_as_absent(
    stores: Stores, make_directory: MakeDirectory
) -> None:
    records = Watched(await stores.open())
    directory = await make_directory(records)
    seen = await directory.login(session(), "198.51.100.7")
    await directory.disable(identity(), "ops")
    key = next(k for k, _ in await records.scan(KIND))
    stored = await records.get(KIND, key)
    assert stored is not None
    flipped = bytes([stored.value[0] ^ 1]) + stored.value[1:]
    await records.put(KIND, key, flipped)  # write access to the store, not to the keys
    assert await directory.get(identity()) is None
    assert [e async for e in directory.entries()] == []
    with pytest.raises(NotFound):
        await directory.resolve(seen.entry.user)
    # An entry sealed for another identity does not open under this one's key either.
    other = Directory(records, MemoryStore(), KEYRING)
    await other.login(session("bob-sub", "bob@example.org"), "198.51.100.8")
    bob_key = next(k for k, _ in await records.scan(KIND) if k != key)
    bob = await records.get(KIND, bob_key)
    assert bob is not None
    await records.put(KIND, key, bob.value)
    assert await directory.get(identity()) is None


async def test_login_over_a_tampered_entry_completes(
    stores: Stores, make_directory: MakeDirectory
) -> None:
    """An entry that does not open (tampered, or sealed under a retired state key) must not
    make the next login spin: it reads as absent, so the login starts a new entry."""
    records = Watched(await stores.open())
    directory = await make_directory(records)
    await directory.login(session(), "198.51.100.7")
    key = next(k for k, _ in await records.scan(KIND))
    await records.put(KIND, key, b"not a sealed entry")
    seen = await asyncio.wait_for(directory.login(session(), "198.51.100.8"), 5.0)
    assert seen.first and seen.entry.logins == 1
    assert await directory.get(identity()) == seen.entry


async def test_concurrent_logins_of_one_identity_all_count(
    stores: Stores, make_directory: MakeDirectory
) -> None:
    n = 20
    records = await stores.open()
    directories = [await make_directory(records)]
    if stores.url != "memory://":  # two processes' connections racing each other too
        directories.append(await make_directory(await stores.open()))
    logins = [directories[i % len(directories)].login(session(), f"198.51.{i}.7") for i in range(n)]
    seen = await asyncio.gather(*logins)
    assert sum(s.first for s in seen) == 1
    entry = await directories[0].get(identity())
    assert entry is not None and entry.logins == n
    assert sorted(s.entry.logins for s in seen) == list(range(1, n + 1))
    assert len(entry.networks) == n
