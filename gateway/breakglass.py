"""Break-glass: emergency access while the IdP is down (HIPAA 164.312(a)(2)(ii); SPEC §3).

    BreakGlass.configured(settings, store, keyring, provider, clock) -> BreakGlass | None
      .opening()                      why the form may be used now (an Opening), or None
      .open(actor, duration, reason)  an operator opens it for a while (admin API); the
      .close(actor)                   opening is a sealed record in the session store, so
                                      every process and replica sees it
      .enter(attempt, client_ip, ..)  account name, password, TOTP code, reason -> the Account
      .new_form() / .form_ok(..)      the form's token (there is no session yet to bind it to)

"The IdP is unreachable" means: a fresh GET of its discovery document, or of the JWKS that
document names, fails, answers anything but 200 with JSON, names another issuer, or takes
longer than PROBE_TIMEOUT. The answer is kept PROBE_TTL seconds and one probe runs at a
time, so a flood of requests here is never a flood at the IdP.

An attempt is counted before it is checked, in a counter in the session store (atomic on
every process), so parallel guesses cannot outrun the lock: after LOCK_AFTER failures in a
day, an account refuses every attempt, right or wrong, until the day is over. A code is
accepted once (the last accepted time step per account, as for MFA). The accounts file is
read again for every attempt: an account removed or a password changed counts at once.

    BreakGlassRefused (a GatewayError)
    ├── Closed            403 break-glass-closed       the IdP answers and no operator opened it
    ├── NoReason          400 break-glass-reason       the written reason is missing or too short
    ├── WrongCredentials  401 break-glass-failed       wrong name, password or code, or a replay
    ├── Locked            403 break-glass-locked       LOCK_AFTER failures today
    └── Unavailable       503 break-glass-unavailable  the accounts file cannot be read now
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from gateway.breakglass_accounts import Account, Accounts, AccountsFileError, fold, load_accounts
from gateway.errors import BadRequest, GatewayError
from gateway.events import Event, emit
from gateway.keyring import Keyring
from gateway.mfa import DRIFT, STEP, matching_step
from gateway.oidc import Provider
from gateway.settings import Settings, parse_duration
from gateway.store import SessionStore

log = logging.getLogger("gateway.breakglass")

ISS = "break-glass"  # the issuer of break-glass sessions: identities are "break-glass|NAME"
PROBE_TIMEOUT = 3.0  # seconds the IdP has to answer a probe
PROBE_TTL = 5.0  # seconds a probe's answer is kept
LOCK_AFTER = 5  # failures in a day
DAY = 86400.0
MIN_REASON, MAX_REASON = 10, 1000  # characters of the written reason
MAX_OPEN = 86400.0  # the longest an operator may open it for at once
FORM_TTL = 600.0  # seconds a form may stay open
HASHING = 2  # password hashes derived at once (scrypt: 32 MiB and ~0.1 s of a core each)
_OPEN, _FAILS, _STEP, _FORM = "break-glass-open", "break-glass-fails", "break-glass-step", "bg-form"
_STEP_TTL = float(STEP * (2 * DRIFT + 2))

Clock = Callable[[], float]


class BreakGlassRefused(GatewayError):
    status = 401
    reason = "break-glass-failed"


class Closed(BreakGlassRefused):
    status = 403
    reason = "break-glass-closed"

    def __init__(self) -> None:
        super().__init__(
            "break-glass access is closed: the identity provider is reachable; sign in as usual"
        )


class NoReason(BreakGlassRefused):
    status = 400
    reason = "break-glass-reason"

    def __init__(self) -> None:
        super().__init__(
            f"write why you need emergency access ({MIN_REASON} to {MAX_REASON} characters)"
        )


class WrongCredentials(BreakGlassRefused):
    def __init__(self) -> None:
        super().__init__("the account name, password or code is not right")


class Locked(BreakGlassRefused):
    status = 403
    reason = "break-glass-locked"

    def __init__(self) -> None:
        super().__init__("this account is locked after too many failures today; use another one")


class Unavailable(BreakGlassRefused):
    status = 503
    reason = "break-glass-unavailable"

    def __init__(self) -> None:
        super().__init__("break-glass accounts cannot be read; the gateway's log says why")


@dataclass(frozen=True, slots=True)
class Opening:
    cause: str  # idp-unreachable | operator
    actor: str | None = None  # the operator who opened it
    until: float | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    name: str
    password: str
    code: str
    reason: str


class BreakGlass:
    def __init__(
        self,
        accounts_file: Path,
        max_duration: float,
        store: SessionStore,
        keyring: Keyring,
        provider: Provider,
        clock: Clock = time.time,
    ) -> None:
        self.accounts_file = accounts_file
        self.max_duration = max_duration  # the most a break-glass session lives
        self._store = store
        self._sealer = keyring.sealer("break-glass")
        self._provider = provider
        self._clock = clock
        self._probing = asyncio.Lock()
        self._hashing = asyncio.Semaphore(HASHING)
        self._probed_at = float("-inf")
        self._idp_up = True

    @classmethod
    def configured(
        cls,
        settings: Settings,
        store: SessionStore,
        keyring: Keyring,
        provider: Provider,
        clock: Clock = time.time,
    ) -> BreakGlass | None:
        """Break-glass for these settings, or None without `break_glass.accounts_file`."""
        config = settings.break_glass
        if config.accounts_file is None:
            return None
        return cls(config.accounts_file, config.max_duration, store, keyring, provider, clock)

    @staticmethod
    async def check(settings: Settings) -> None:
        """AccountsFileError when the accounts file is unusable (at start: nothing is served)."""
        if settings.break_glass.accounts_file is not None:
            await asyncio.to_thread(load_accounts, settings.break_glass.accounts_file)

    # -- when it is open ---------------------------------------------------------------------

    async def opening(self) -> Opening | None:
        """Why break-glass may be used now: an operator's opening, or an unreachable IdP."""
        opened = await self._opened()
        if opened is not None:
            return opened
        return None if await self._idp_answers() else Opening("idp-unreachable")

    async def _idp_answers(self) -> bool:
        async with self._probing:  # one probe at a time; the others wait for its answer
            now = self._clock()
            if not 0 <= now - self._probed_at < PROBE_TTL:
                self._idp_up = await self._provider.probe(PROBE_TIMEOUT)
                self._probed_at = self._clock()
        return self._idp_up

    async def _opened(self) -> Opening | None:
        plain = self._sealer.open(_OPEN, _OPEN, await self._store.get(_OPEN, _OPEN))
        if plain is None:  # SECURITY: a record forged in the store does not open
            return None
        record = orjson.loads(plain)
        if self._clock() >= record["until"]:
            return None
        return Opening("operator", record["actor"], record["until"])

    async def open(self, actor: str, duration: float, reason: str) -> float:
        """Open break-glass for `duration` seconds whatever the IdP does; when it closes."""
        until = self._clock() + duration
        record = {"until": until, "actor": actor, "reason": reason}
        sealed = self._sealer.seal(_OPEN, _OPEN, orjson.dumps(record))
        await self._store.put(_OPEN, _OPEN, sealed, duration)
        fields = {"actor": actor, "duration": duration, "until": utc(until), "reason": reason}
        emit(Event("break_glass.opened", fields))
        return until

    async def close(self, actor: str) -> bool:
        """End an operator's opening now; whether there was one."""
        was_open = await self._opened() is not None
        await self._store.delete(_OPEN, _OPEN)
        emit(Event("break_glass.closed", {"actor": actor, "was_open": was_open}))
        return was_open

    # -- an attempt --------------------------------------------------------------------------

    async def enter(self, attempt: Attempt, client_ip: str, request_id: str) -> Account:
        """The account whose name, password and current code these are; BreakGlassRefused."""
        name = attempt.name[:64]
        who: dict[str, object] = {"actor": name, "account": name, "client_ip": client_ip}
        who["request_id"] = request_id
        if not MIN_REASON <= len(attempt.reason.strip()) <= MAX_REASON:
            _failed(who, "no-reason")
            raise NoReason()
        accounts = await self._accounts()
        key = hashlib.sha256(fold(attempt.name).encode()).hexdigest()
        # SECURITY: counted before it is checked: parallel guesses cannot outrun the lock.
        failures = await self._store.incr(_FAILS, key, DAY)
        if failures > LOCK_AFTER:
            _failed(who, "locked", failures - 1)
            raise Locked()
        # SECURITY: a flood of attempts queues here instead of taking every core and GiBs.
        async with self._hashing:
            account = await asyncio.to_thread(accounts.password_ok, attempt.name, attempt.password)
        step = None
        if account is not None:
            step = matching_step(account.totp_secret, attempt.code.strip(), self._clock())
        if account is None or step is None:
            raise _wrong(who, "bad-credentials", failures)
        # SECURITY: a code is accepted once: its time step must be newer than the last one.
        if not await self._store.advance(_STEP, key, step, _STEP_TTL):
            raise _wrong(who, "replayed-code", failures)
        await self._store.delete(_FAILS, key)
        return account

    async def _accounts(self) -> Accounts:
        try:
            return await asyncio.to_thread(load_accounts, self.accounts_file)
        except AccountsFileError as err:
            log.error("break-glass accounts file unusable: %s", err)
            raise Unavailable() from None

    # -- the form's token --------------------------------------------------------------------

    def new_form(self) -> tuple[str, str]:
        """(a sealed cookie value, the token the form carries): the POST must bring both."""
        token = secrets.token_urlsafe(24)
        state = orjson.dumps({"token": token, "at": self._clock()})
        return base64.urlsafe_b64encode(self._sealer.seal(_FORM, _FORM, state)).decode(), token

    def form_ok(self, cookie: str | None, token: str) -> bool:
        """Whether `token` is the one sealed in this browser's cookie, within FORM_TTL."""
        try:
            blob = base64.urlsafe_b64decode((cookie or "").encode("ascii"))
        except ValueError:
            return False
        plain = self._sealer.open(_FORM, _FORM, blob)
        if plain is None:
            return False
        state = orjson.loads(plain)
        fresh = 0 <= self._clock() - state["at"] <= FORM_TTL
        return fresh and hmac.compare_digest(state["token"], token)


def open_duration(value: object) -> float:
    """How long an operator opens break-glass for (`30m`); BadRequest if unusable."""
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise BadRequest(f"duration: {err}", reason="bad-duration") from None
    if seconds > MAX_OPEN:
        raise BadRequest("duration: at most 24h at once", reason="bad-duration")
    return seconds


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _failed(who: dict[str, object], reason: str, failures: int | None = None) -> None:
    counted = {} if failures is None else {"failures": failures}
    emit(Event("break_glass.failed", {**who, "reason": reason, **counted}))


def _wrong(who: dict[str, object], reason: str, failures: int) -> WrongCredentials:
    _failed(who, reason, failures)
    if failures == LOCK_AFTER:
        emit(Event("break_glass.locked", {**who, "failures": failures}))
    return WrongCredentials()
