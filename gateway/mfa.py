"""The second factor at the gateway (SPEC §6): TOTP enrollment, verification, replay guard,
backoff and lock, recovery codes, enrollment links.

    Mfa(records, store, keyring, settings, clock)
      .factor(identity)                  the enrolled factor (durable, RecordStore) or None
      .issue_link(subject, actor)        a single-use enrollment link, valid 24 h (invite)
      .link(token)                       the live link a token names, or None
      .begin(session, link)              a new secret, pending in the session store (15 min)
      .confirm(session, code)            the pending secret proven by a code: enrolled;
                                         its 10 recovery codes, shown once
      .verify(identity, code, address)   a TOTP code or a recovery code; raises MfaRefused
      .reset(identity, actor)            the factor removed (and its lock with it)
      .take_notice(identity)             "a new authenticator was enrolled", once

A factor is per identity (iss|sub): a 160-bit secret from `secrets`, SHA-1, 6 digits, 30 s
steps, accepted with at most one step of drift. The last accepted step is kept per
identity in the session store (`advance`, atomic across processes), so a code works once
and an older one never after a newer (RFC 6238 §5.2). One verification per identity runs
at a time on every process (a store lock), so parallel guesses cannot outrun the count.

    MfaRefused (a GatewayError)
    ├── WrongCode           401 mfa-failed    wrong, replayed or old code; wrong recovery code
    ├── Backoff             429 mfa-backoff   3+ failures: wait 1 s, doubling (15 min at most)
    │   └── Busy                              another attempt for this identity is running
    ├── Locked              403 mfa-locked    20 failures in a day; an admin resets the factor
    ├── NotEnrolled         403 mfa-not-enrolled
    └── AddressLimited      429 mfa-address   too many failures from one address (IPv6 /64)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import orjson
import pyotp

from gateway.errors import GatewayError
from gateway.events import Event, emit
from gateway.keyring import Keyring
from gateway.ratelimit import bucket_key
from gateway.sessions import Session
from gateway.store import SessionStore
from gateway.store.records import RecordStore

STEP = 30  # seconds per TOTP time step
DIGITS = 6
DRIFT = 1  # steps either side
LINK_TTL = 24 * 3600.0
PENDING_TTL = 15 * 60.0  # an enrollment page left open this long starts over
RECOVERY_CODES = 10
BACKOFF_AFTER = 3  # failures before the first wait
BACKOFF_MAX = 900.0  # seconds
LOCK_AFTER = 20  # failures in a day
DAY = 86400.0
ADDRESS_LIMIT = 30  # failures per address per hour; beyond: refused from that address only
ADDRESS_WINDOW = 3600.0
_VERIFYING_TTL = 10.0  # seconds a verification may hold the identity's lock
_SEAL = "mfa-record"
_FACTOR, _LINK, _NOTICE = "mfa-factor", "mfa-link", "mfa-notice"  # durable kinds
_PENDING, _STEP = "mfa-pending", "totp-step"  # ephemeral kinds
_FAILS, _WAIT, _ADDRESS = "mfa-fails", "mfa-wait", "mfa-address"

Clock = Callable[[], float]


class MfaRefused(GatewayError):
    status = 401
    reason = "mfa-failed"


class WrongCode(MfaRefused):
    def __init__(self, detail: str = "that code is not right; try the current one") -> None:
        super().__init__(detail)


class Backoff(MfaRefused):
    status = 429
    reason = "mfa-backoff"

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many wrong codes; wait {int(retry_after) + 1} s and try again")
        self.retry_after = retry_after


class Busy(Backoff):
    def __init__(self) -> None:
        super().__init__(1.0)
        self.detail = "another code for your account is being checked; try again in a moment"
        self.args = (self.detail,)


class Locked(MfaRefused):
    status = 403
    reason = "mfa-locked"

    def __init__(self) -> None:
        super().__init__(
            "your second factor is locked after too many wrong codes; "
            "ask an administrator to reset it"
        )


class NotEnrolled(MfaRefused):
    status = 403
    reason = "mfa-not-enrolled"

    def __init__(self) -> None:
        super().__init__(
            "this page needs a second factor and you have none yet; "
            "ask an administrator for an enrollment link"
        )


class AddressLimited(MfaRefused):
    status = 429
    reason = "mfa-address"

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many wrong codes from this address; try again later")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Factor:
    identity: str  # iss|sub
    user: str
    secret: str  # base32
    created: float
    recovery: tuple[str, ...]  # keyed hashes of the unused recovery codes
    locked: float | None = None


@dataclass(frozen=True, slots=True)
class Link:
    key: str  # the store key: a hash of the token, never the token
    subject: str  # a user_claim value, or iss|sub
    expires: float
    actor: str

    def binds(self, session: Session) -> bool:
        """Whether this link may be used by the signed-in `session` (SPEC: bound to the user)."""
        if "|" in self.subject and self.subject.startswith(("https://", "http://")):
            return hmac.compare_digest(self.subject, session.identity)
        return _fold(self.subject) == _fold(session.user)


@dataclass(frozen=True, slots=True)
class Pending:
    secret: str
    link: str | None  # the link's store key, taken when the enrollment is confirmed
    created: float


@dataclass(frozen=True, slots=True)
class Notice:
    what: str  # enrolled | reset
    at: float
    actor: str


def _fold(text: str) -> str:
    # ASCII case only: str.lower maps the Kelvin sign to "k" (docs/authorization.md).
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _key(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()


def new_secret() -> str:
    """160 random bits (RFC 4226 §4 recommends 160), base32 without padding."""
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii")


def otpauth_uri(secret: str, user: str, issuer: str) -> str:
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP).provisioning_uri(
        name=user, issuer_name=issuer
    )


def matching_step(secret: str, code: str, now: float) -> int | None:
    """The time step (within the drift) whose code is `code`, or None."""
    if not (len(code) == DIGITS and code.isascii() and code.isdigit()):
        return None  # full-width or Arabic-Indic digits are digits to str, never a code
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP)
    current = int(now // STEP)
    found = None
    for step in range(current - DRIFT, current + DRIFT + 1):
        # SECURITY: constant-time, and every step compared: timing tells nothing of the code.
        if hmac.compare_digest(totp.generate_otp(step), code):
            found = step
    return found


def _recovery_code() -> str:
    raw = secrets.token_hex(5)  # 40 bits: with 20 guesses a day, beyond reach
    return f"{raw[:5]}-{raw[5:]}"


def _normal_recovery(code: str) -> str:
    return code.strip().lower().replace("-", "").replace(" ", "")


class Mfa:
    def __init__(
        self,
        records: RecordStore,
        store: SessionStore,
        keyring: Keyring,
        *,
        issuer: str,
        clock: Clock = time.time,
    ) -> None:
        self.records = records
        self.issuer = issuer  # the label in authenticator apps (mfa.totp_issuer)
        self._store = store
        self._keyring = keyring
        self._sealer = keyring.sealer(_SEAL)
        self._clock = clock

    # -- durable records ---------------------------------------------------------------------

    async def _read(self, kind: str, key: str) -> tuple[dict[str, object], int] | None:
        stored = await self.records.get(kind, key)
        if stored is None:
            return None
        plain = self._sealer.open(kind, key, stored.value)
        # SECURITY: a record that does not open (tampered, foreign key) reads as absent.
        return (orjson.loads(plain), stored.version) if plain is not None else None

    def _seal(self, kind: str, key: str, value: object) -> bytes:
        return self._sealer.seal(kind, key, orjson.dumps(value))

    async def factor(self, identity: str) -> Factor | None:
        found = await self._factor(identity)
        return found[0] if found is not None else None

    async def _factor(self, identity: str) -> tuple[Factor, int] | None:
        found = await self._read(_FACTOR, _key(identity))
        if found is None:
            return None
        data, version = found
        factor = Factor(**{**data, "recovery": tuple(data["recovery"])})  # type: ignore[arg-type]
        return factor, version

    async def _create_factor(self, factor: Factor) -> bool:
        key = _key(factor.identity)
        return await self.records.create(_FACTOR, key, self._seal(_FACTOR, key, asdict(factor)))

    async def _save_factor(self, factor: Factor, version: int | None) -> bool:
        key = _key(factor.identity)
        blob = self._seal(_FACTOR, key, asdict(factor))
        if version is None:
            await self.records.put(_FACTOR, key, blob)
            return True
        return await self.records.replace(_FACTOR, key, blob, version)

    # -- enrollment links (invite) -----------------------------------------------------------

    async def issue_link(self, subject: str, actor: str) -> tuple[str, float]:
        """A new single-use link token for `subject` (a user_claim value or iss|sub)."""
        token = secrets.token_urlsafe(32)
        key = _key(token)
        expires = self._clock() + LINK_TTL
        link = Link(key, subject, expires, actor)
        await self.records.create(_LINK, key, self._seal(_LINK, key, asdict(link)))
        emit(Event("mfa.enroll_link_issued", {"subject": subject, "actor": actor}))
        return token, expires

    async def link(self, token: str) -> Link | None:
        """The live link a token names; None if unknown, used or expired."""
        if not token or len(token) > 128:
            return None
        found = await self._read(_LINK, _key(token))
        if found is None:
            return None
        link = Link(**found[0])  # type: ignore[arg-type]
        return link if self._clock() < link.expires else None

    # -- enrollment --------------------------------------------------------------------------

    async def begin(self, session: Session, link: Link | None) -> Pending:
        """A fresh secret for this session's enrollment page (a reload starts over)."""
        pending = Pending(new_secret(), link.key if link else None, self._clock())
        blob = self._sealer.seal(_PENDING, session.key, orjson.dumps(asdict(pending)))
        await self._store.put(_PENDING, session.key, blob, PENDING_TTL)
        return pending

    async def pending(self, session: Session) -> Pending | None:
        plain = self._sealer.open(
            _PENDING, session.key, await self._store.get(_PENDING, session.key)
        )
        return Pending(**orjson.loads(plain)) if plain is not None else None

    async def confirm(self, session: Session, code: str) -> list[str]:
        """Enroll the pending secret once a code proves the app holds it; the recovery codes.

        WrongCode for a wrong code (not counted toward the lock: it guesses no secret of
        anyone's); NotEnrolled when nothing is pending or the link was used meanwhile.
        """
        pending = await self.pending(session)
        if pending is None:
            raise NotEnrolled()
        step = matching_step(pending.secret, code.strip(), self._clock())
        if step is None:
            emit(Event("mfa.failed", {**_who(session), "reason": "enrollment-code"}))
            raise WrongCode()
        # SECURITY: single use: of two sessions confirming with one link, one enrolls.
        if pending.link is not None and not await self.records.delete(_LINK, pending.link):
            await self._store.delete(_PENDING, session.key)
            raise NotEnrolled()
        await self._store.delete(_PENDING, session.key)
        # The confirming code is spent: it cannot pass the next prompt (RFC 6238 §5.2).
        await self._store.advance(_STEP, _key(session.identity), step, _step_ttl())
        codes = [_recovery_code() for _ in range(RECOVERY_CODES)]
        hashes = tuple(self._recovery_hash(c) for c in codes)
        now = self._clock()
        factor = Factor(session.identity, session.user, pending.secret, now, hashes)
        if pending.link is not None:
            await self._save_factor(factor, None)  # a link replaces a factor (a lost phone)
        elif not await self._create_factor(factor):
            # SECURITY: without a link nothing replaces a factor, not even a page opened
            # before the enrollment and confirmed after it (a password alone is not enough).
            raise NotEnrolled()
        await self._clear_failures(session.identity)
        how = "link" if pending.link else "open"
        await self._notify(session.identity, Notice("enrolled", now, session.user))
        emit(Event("mfa.enrolled", {**_who(session), "via": how}))
        return codes

    # -- verification ------------------------------------------------------------------------

    async def verify(self, session: Session, code: str, address: str) -> str:
        """Check a TOTP code (6 digits) or a recovery code; what was used ("totp" or
        "recovery"), or MfaRefused."""
        bucket = bucket_key(address)
        if await self._address_failures(bucket) >= ADDRESS_LIMIT:
            # SECURITY: spraying from one address stops here, and locks out no one else.
            emit(Event("mfa.address_limited", {**_who(session), "client_ip": address}))
            raise AddressLimited(ADDRESS_WINDOW)
        lock = await self._store.acquire(f"mfa:{_key(session.identity)}", _VERIFYING_TTL)
        if lock is None:
            # SECURITY: one attempt at a time per identity, on every process: parallel
            # guesses cannot all pass before the first failure is counted.
            raise Busy()
        try:
            return await self._verify(session, code.strip(), bucket)
        finally:
            await self._store.release(f"mfa:{_key(session.identity)}", lock)

    async def _verify(self, session: Session, code: str, bucket: str) -> str:
        found = await self._factor(session.identity)
        if found is None:
            raise NotEnrolled()
        factor, version = found
        if factor.locked is not None:
            raise Locked()
        wait = await self._waiting(session.identity)
        if wait > 0:
            raise Backoff(wait)
        if len(code) == DIGITS and code.isascii() and code.isdigit():
            return await self._totp(session, factor, code, bucket)
        return await self._recovery(session, factor, version, code, bucket)

    async def _totp(self, session: Session, factor: Factor, code: str, bucket: str) -> str:
        step = matching_step(factor.secret, code, self._clock())
        if step is None:
            await self._failed(session, bucket, "wrong-code")
        assert step is not None
        # SECURITY: accepted once: the step must be newer than the last one accepted.
        if not await self._store.advance(_STEP, _key(session.identity), step, _step_ttl()):
            emit(Event("mfa.replay", _who(session)))
            await self._failed(session, bucket, "replay")
        await self._clear_failures(session.identity)
        emit(Event("mfa.verified", {**_who(session), "method": "totp"}))
        return "totp"

    async def _recovery(
        self, session: Session, factor: Factor, version: int, code: str, bucket: str
    ) -> str:
        digest = self._recovery_hash(code)
        while digest in factor.recovery:
            left = tuple(h for h in factor.recovery if h != digest)
            # SECURITY: compare-and-swap: a code spent twice at once is accepted once.
            if await self._save_factor(replace(factor, recovery=left), version):
                await self._clear_failures(session.identity)
                emit(Event("mfa.recovery_used", {**_who(session), "remaining": len(left)}))
                return "recovery"
            found = await self._factor(session.identity)
            if found is None:
                break
            factor, version = found
        await self._failed(session, bucket, "wrong-recovery-code")
        raise AssertionError("unreachable")  # _failed always raises

    def _recovery_hash(self, code: str) -> str:
        normal = _normal_recovery(code).encode()
        # SECURITY: keyed: a copy of the store alone cannot test guesses offline.
        return self._keyring.hmac("recovery-code", normal).hex()

    # -- failures, backoff, lock -------------------------------------------------------------

    async def _failed(self, session: Session, bucket: str, reason: str) -> None:
        key = _key(session.identity)
        count = await self._store.incr(_FAILS, key, DAY)
        await self._store.incr(_ADDRESS, bucket, ADDRESS_WINDOW)
        emit(Event("mfa.failed", {**_who(session), "reason": reason, "failures": count}))
        if count >= LOCK_AFTER:
            await self._lock(session)
            raise Locked()
        if count >= BACKOFF_AFTER:
            wait = min(2.0 ** (count - BACKOFF_AFTER), BACKOFF_MAX)
            until = repr(self._clock() + wait).encode()
            await self._store.put(_WAIT, key, until, wait)
        raise WrongCode()

    async def _lock(self, session: Session) -> None:
        while (found := await self._factor(session.identity)) is not None:
            factor, version = found
            if factor.locked is not None:
                return
            if await self._save_factor(replace(factor, locked=self._clock()), version):
                emit(Event("mfa.locked", _who(session)))
                return

    async def _waiting(self, identity: str) -> float:
        until = await self._store.get(_WAIT, _key(identity))
        return max(float(until) - self._clock(), 0.0) if until is not None else 0.0

    async def _address_failures(self, bucket: str) -> int:
        value = await self._store.get(_ADDRESS, bucket)
        return int(value) if value is not None else 0

    async def _clear_failures(self, identity: str) -> None:
        await self._store.delete(_FAILS, _key(identity))
        await self._store.delete(_WAIT, _key(identity))

    # -- reset and notices -------------------------------------------------------------------

    async def reset(self, identity: str, user: str, actor: str) -> bool:
        """Remove the factor (and its lock); True if there was one."""
        removed = await self.records.delete(_FACTOR, _key(identity))
        await self._clear_failures(identity)
        if removed:
            await self._notify(identity, Notice("reset", self._clock(), actor))
        emit(
            Event(
                "mfa.reset",
                {"user": user, "identity": identity, "actor": actor, "removed": removed},
            )
        )
        return removed

    async def factors_named(self, user: str) -> list[Factor]:
        """Enrolled factors whose user_claim value is `user` (ASCII case-insensitive)."""
        found: list[Factor] = []
        after = ""
        while batch := await self.records.scan(_FACTOR, after):
            for key, stored in batch:
                plain = self._sealer.open(_FACTOR, key, stored.value)
                if plain is not None:
                    data = orjson.loads(plain)
                    if _fold(data["user"]) == _fold(user):
                        found.append(Factor(**{**data, "recovery": tuple(data["recovery"])}))
            after = batch[-1][0]
        return found

    async def _notify(self, identity: str, notice: Notice) -> None:
        key = _key(identity)
        await self.records.put(_NOTICE, key, self._seal(_NOTICE, key, asdict(notice)))

    async def take_notice(self, identity: str) -> Notice | None:
        """The notice waiting for this identity's next login, removed as it is read."""
        key = _key(identity)
        found = await self._read(_NOTICE, key)
        if found is None or not await self.records.delete(_NOTICE, key, found[1]):
            return None
        return Notice(**found[0])  # type: ignore[arg-type]


def _step_ttl() -> float:
    return float(STEP * (2 * DRIFT + 2))  # past it, every step it guards is out of the window


def _who(session: Session) -> dict[str, object]:
    return {"user": session.user, "sub": session.sub, "session": session.handle}
