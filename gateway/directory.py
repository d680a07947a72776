"""The users the gateway has seen (SPEC §10 USER, §11 users): one durable entry per identity.

    Directory(records, store, keyring, clock)
      .login(session, client_ip) -> Seen     at every login: what changed since the last one
                                             (first login, a new network, groups gained and
                                             lost, a changed email); one compare-and-swap
      .accessed(identity, route)             in memory only; `flush()` (every FLUSH_EVERY s,
                                             and at close) writes the latest time per route
      .get(identity) / .entries()            one entry / every entry (reports)
      .resolve(user) -> Entry                USER: `ISS|SUB`, or a user_claim value in any
                                             ASCII case; NotFound, Conflict when ambiguous
      .disable(identity, actor, reason)      the flag, announced to every process
      .enable(identity, actor)
      .disabled(identity) -> bool            this process's copy (bearer tokens: no I/O)
      .disabled_now(identity) -> bool        read from the store (logins: fail closed)

An entry is sealed in the record store (kind `user`, key SHA-256 of `iss|sub`). Its
`networks` are the /24 (IPv4) or /64 (IPv6) networks the user logged in from, with when they
were last seen; `groups_history` keeps the groups at each login where they changed.

Disabling is announced on the session store's channel `gateway:directory`; every process
keeps the set of disabled identities, reloaded whole on every (re)subscribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson

from gateway.errors import Conflict, NotFound
from gateway.events import Event, emit
from gateway.keyring import Keyring
from gateway.sessions import Session
from gateway.store import SessionStore, Subscription
from gateway.store.records import RecordStore

log = logging.getLogger("gateway.directory")

KIND = "user"
CHANNEL = "gateway:directory"
FLUSH_EVERY = 30.0  # seconds between writes of last-access times
MAX_NETWORKS = 100  # per user, the most recently seen kept
MAX_HISTORY = 50  # group changes kept per user
_SEAL = "directory-record"

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Entry:
    identity: str  # iss|sub
    user: str  # the user_claim value at the last login
    email: str | None
    first_login: float
    last_login: float
    logins: int
    groups: tuple[str, ...]
    groups_history: tuple[tuple[float, tuple[str, ...]], ...] = ()
    networks: dict[str, float] = field(default_factory=dict)  # network -> last seen
    last_ip: str | None = None
    last_access: dict[str, float] = field(default_factory=dict)  # route id -> time
    disabled: dict[str, Any] | None = None  # {at, actor, reason}

    @property
    def iss(self) -> str:
        return self.identity.split("|", 1)[0] if "|" in self.identity else ""

    @property
    def sub(self) -> str:
        return self.identity.split("|", 1)[1] if "|" in self.identity else self.identity


@dataclass(frozen=True, slots=True)
class Seen:
    """What a login shows against the entry before it."""

    entry: Entry
    first: bool
    new_network: str | None  # the /24 or /64 never seen for this user (None on a first login)
    gained: tuple[str, ...]
    lost: tuple[str, ...]
    email_before: str | None  # the previous email, when it changed


def network_of(address: str) -> str | None:
    """The /24 of an IPv4 address, the /64 of an IPv6 one; None for anything else."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _key(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()


def _fold(text: str) -> str:
    return text.translate(_ASCII_LOWER)  # ASCII only: str.lower maps the Kelvin sign to "k"


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def is_identity(user: str) -> bool:
    """`ISS|SUB`: an http(s) issuer before the first '|' (an issuer URL never holds one)."""
    issuer, bar, sub = user.partition("|")
    return bool(bar and sub) and issuer.startswith(("https://", "http://"))


def _entry(data: dict[str, Any]) -> Entry:
    history = tuple((at, tuple(groups)) for at, groups in data.get("groups_history", ()))
    return Entry(**{**data, "groups": tuple(data["groups"]), "groups_history": history})


class Directory:
    def __init__(
        self, records: RecordStore, store: SessionStore, keyring: Keyring, clock: Clock = time.time
    ) -> None:
        self._records = records
        self._store = store
        self._sealer = keyring.sealer(_SEAL)
        self._clock = clock
        self._accessed: dict[str, dict[str, float]] = {}  # identity -> route -> time
        self._disabled: dict[str, str] = {}  # identity -> the disable's id
        self._unsure: set[str] = set()  # announced, but the entry could not be read yet
        self._subscription: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._subscription = await self._store.subscribe(CHANNEL, on_connect=self._reload)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(self._subscription), name="directory:listen"),
            loop.create_task(self._flusher(), name="directory:flush"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscription.wait_connected(), 5.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # logged where it failed
                await task
        if self._subscription is not None:
            await self._subscription.close()
        with contextlib.suppress(Exception):  # a store that is gone loses these times only
            await self.flush()

    async def _reload(self) -> None:
        self._disabled = {e.identity: disable_id(e) async for e in self.entries() if e.disabled}

    async def _listen(self, subscription: Subscription) -> None:
        async for message in subscription:
            identity = message.decode("utf-8", "replace")
            try:
                entry = await self.get(identity)
            except Exception:
                # SECURITY: unreadable now: treat as disabled (fail closed) until a read works.
                log.warning("a disable or enable could not be read; refusing the user meanwhile")
                self._disabled.setdefault(identity, "unread")
                self._unsure.add(identity)
                continue
            self._unsure.discard(identity)
            self._note(identity, entry)

    def _note(self, identity: str, entry: Entry | None) -> None:
        if entry is not None and entry.disabled:
            self._disabled[identity] = disable_id(entry)
        else:
            self._disabled.pop(identity, None)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            try:
                await self.flush()
                for identity in list(self._unsure):  # announcements that could not be read
                    self._note(identity, await self.get(identity))
                    self._unsure.discard(identity)
            except Exception:
                log.exception("the directory could not be written or read; trying again later")

    # -- reading -----------------------------------------------------------------------------

    async def _read(self, identity: str) -> tuple[Entry | None, int | None]:
        """(the entry, its version); an entry that does not open is (None, its version)."""
        key = _key(identity)
        stored = await self._records.get(KIND, key)
        if stored is None:
            return None, None
        plain = self._sealer.open(KIND, key, stored.value)
        # SECURITY: an entry that does not open (tampered, foreign key) reads as absent, and
        # the next login writes a good one over it.
        return (_entry(orjson.loads(plain)) if plain is not None else None), stored.version

    async def get(self, identity: str) -> Entry | None:
        return (await self._read(identity))[0]

    async def entries(self) -> AsyncIterator[Entry]:
        after = ""
        while batch := await self._records.scan(KIND, after):
            for key, stored in batch:
                plain = self._sealer.open(KIND, key, stored.value)
                if plain is not None:
                    yield _entry(orjson.loads(plain))
            after = batch[-1][0]

    async def named(self, user: str) -> set[str]:
        """The identities that signed in with this user_claim value (ASCII case-insensitive)."""
        return {e.identity async for e in self.entries() if _fold(e.user) == _fold(user)}

    async def resolve(self, user: str) -> Entry:
        """The one entry USER names; NotFound, or Conflict when it names several."""
        if is_identity(user):
            entry = await self.get(user)
            if entry is None:
                raise NotFound(f"no user {user!r} has signed in here", reason="unknown-user")
            return entry
        found = [e async for e in self.entries() if _fold(e.user) == _fold(user)]
        if len(found) > 1:
            # SECURITY: never guess which person an operator meant.
            names = ", ".join(sorted(e.identity for e in found))
            raise Conflict(f"{user!r} names {len(found)} identities ({names}); give one as ISS|SUB")
        if not found:
            raise NotFound(f"no user {user!r} has signed in here", reason="unknown-user")
        return found[0]

    # -- writing -----------------------------------------------------------------------------

    async def _change(
        self, identity: str, change: Callable[[Entry | None], Entry | None]
    ) -> tuple[Entry | None, Entry | None]:
        """Compare-and-swap `change` into the entry; (before, after)."""
        key = _key(identity)
        while True:
            before, version = await self._read(identity)
            after = change(before)
            if after is None:
                return before, before
            blob = self._sealer.seal(KIND, key, orjson.dumps(asdict(after)))
            if version is None:
                if await self._records.create(KIND, key, blob):
                    return before, after
            elif await self._records.replace(KIND, key, blob, version):
                return before, after

    async def login(self, session: Session, client_ip: str) -> Seen:
        now = self._clock()
        network = network_of(client_ip)

        def seen(before: Entry | None) -> Entry:
            history: tuple[tuple[float, tuple[str, ...]], ...]
            if before is None:
                history = ((now, session.groups),)
                networks = {network: now} if network else {}
                return Entry(
                    session.identity,
                    session.user,
                    session.email,
                    now,
                    now,
                    1,
                    session.groups,
                    history,
                    networks,
                    client_ip,
                )
            history = before.groups_history
            if set(session.groups) != set(before.groups):
                history = (*history, (now, session.groups))[-MAX_HISTORY:]
            networks = dict(before.networks)
            if network:
                networks[network] = now
                networks = dict(sorted(networks.items(), key=lambda n: n[1])[-MAX_NETWORKS:])
            return replace(
                before,
                user=session.user,
                email=session.email,
                last_login=now,
                logins=before.logins + 1,
                groups=session.groups,
                groups_history=history,
                networks=networks,
                last_ip=client_ip,
            )

        before, after = await self._change(session.identity, seen)
        assert after is not None
        return _compare(before, after, network)

    def accessed(self, identity: str, route: str) -> None:
        """An allowed request: remembered here, written by the next flush (no I/O now)."""
        self._accessed.setdefault(identity, {})[route] = self._clock()

    async def flush(self) -> int:
        """Write the remembered last-access times; how many users were written."""
        pending, self._accessed = self._accessed, {}
        written = 0
        for done, (identity, routes) in enumerate(pending.items()):

            def merge(before: Entry | None, routes: dict[str, float] = routes) -> Entry | None:
                if before is None:
                    return None  # a bearer client with no login: nothing to attach it to
                latest = dict(before.last_access)
                for route, at in routes.items():
                    latest[route] = max(at, latest.get(route, 0.0))
                return replace(before, last_access=latest)

            try:
                _, after = await self._change(identity, merge)
            except Exception:
                self._keep(list(pending.items())[done:])  # this one and every one not yet tried
                raise
            written += after is not None
        return written

    def _keep(self, unwritten: list[tuple[str, dict[str, float]]]) -> None:
        """Put back times a flush could not write (newer ones noted meanwhile win)."""
        for identity, routes in unwritten:
            noted = self._accessed.setdefault(identity, {})
            for route, at in routes.items():
                noted[route] = max(at, noted.get(route, 0.0))

    async def disable(self, identity: str, actor: str, reason: str = "") -> Entry:
        # `id` tells one disable from the next (alerts fire once per disable).
        flag = {"at": self._clock(), "actor": actor, "reason": reason, "id": secrets.token_hex(8)}
        _, after = await self._change(
            identity, lambda e: replace(e, disabled=flag) if e is not None else None
        )
        if after is None:
            raise NotFound(f"no user {identity!r} has signed in here", reason="unknown-user")
        self._disabled[identity] = disable_id(after)
        await self._store.publish(CHANNEL, identity.encode())
        emit(
            Event(
                "user.disabled",
                {"user": after.user, "identity": identity, "actor": actor, "reason": reason},
            )
        )
        return after

    async def enable(self, identity: str, actor: str) -> Entry:
        _, after = await self._change(
            identity, lambda e: replace(e, disabled=None) if e is not None else None
        )
        if after is None:
            raise NotFound(f"no user {identity!r} has signed in here", reason="unknown-user")
        self._disabled.pop(identity, None)
        await self._store.publish(CHANNEL, identity.encode())
        emit(Event("user.enabled", {"user": after.user, "identity": identity, "actor": actor}))
        return after

    def disabled(self, identity: str) -> bool:
        return identity in self._disabled

    def disable_id(self, identity: str) -> str | None:
        """Which disable holds the identity now (alerts fire once per disable)."""
        return self._disabled.get(identity)

    async def disabled_now(self, identity: str) -> bool:
        entry = await self.get(identity)
        return entry is not None and entry.disabled is not None


def disable_id(entry: Entry) -> str:
    return str((entry.disabled or {}).get("id", ""))


def _compare(before: Entry | None, after: Entry, network: str | None) -> Seen:
    if before is None:
        return Seen(after, True, None, (), (), None)
    new_network = network if network and network not in before.networks else None
    gained = tuple(sorted(set(after.groups) - set(before.groups)))
    lost = tuple(sorted(set(before.groups) - set(after.groups)))
    email_before = before.email if before.email != after.email else None
    return Seen(after, False, new_network, gained, lost, email_before)
