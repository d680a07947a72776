"""Access reviews (SPEC §11 `POST /reviews`, HITRUST CSF 01.e): a reviewer's attestation that
a user's access is kept, or revoked.

    Asked.parse(body) -> Asked                   the POST /reviews body; BadRequest otherwise
    grants(entry, policies) -> (Grant, ...)      the routes the loaded policy lets an identity
                                                 reach, and the allow rules that let it in
    Reviews(records, keyring, clock)
      .attest(entry, reviewer, asked, policies)  stored, then the `review.attested` event
      .every() -> AsyncIterator[Attestation]     every stored attestation (reports)
      .latest() -> {identity: Attestation}       the newest one of each identity

An attestation is sealed in the record store (kind `review`) under the key
`<SHA-256 of iss|sub>.<microseconds since 1970, 16 digits>.<4 random hex>`: created, never
replaced, so each user's reviews stay whole and sort in time order. It keeps what was
reviewed (groups, reachable routes, policy hash) beside the decision, because the policy and
the groups change afterwards. The reviewer is always the admin token's name: the body cannot
name one.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson

from gateway.directory import Entry
from gateway.errors import BadRequest
from gateway.events import Event, emit
from gateway.keyring import Keyring
from gateway.policy import Identity, PolicySet, reachable, who_facts
from gateway.store.records import RecordStore

KIND = "review"
NOTE_MAX = 1000  # characters of a note kept
_SEAL = "review-record"
_FIELDS = frozenset({"user", "decision", "note"})

Decision = Literal["keep", "revoke"]
_DECISIONS: dict[str, Decision] = {"keep": "keep", "revoke": "revoke"}


@dataclass(frozen=True, slots=True)
class Asked:
    """What a reviewer decided, as sent to POST /reviews."""

    user: str  # a user_claim value, or ISS|SUB
    decision: Decision
    note: str = ""

    @classmethod
    def parse(cls, body: Mapping[str, object]) -> Asked:
        unknown = sorted(set(body) - _FIELDS)
        if "reviewer" in unknown:
            # SECURITY: the reviewer is the token that made the call, never a claim in the body.
            raise BadRequest("the reviewer is the admin token's name; send no 'reviewer'")
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}: send user, decision and note")
        user, decision, note = body.get("user"), body.get("decision"), body.get("note", "")
        if not isinstance(user, str) or not user.strip():
            raise BadRequest("'user' must name the reviewed user: a user_claim value or ISS|SUB")
        chosen = _DECISIONS.get(decision) if isinstance(decision, str) else None
        if chosen is None:
            raise BadRequest("'decision' must be keep or revoke")
        if not isinstance(note, str) or len(note) > NOTE_MAX:
            raise BadRequest(f"'note' must be text of at most {NOTE_MAX} characters")
        return cls(user.strip(), chosen, note)


@dataclass(frozen=True, slots=True)
class Grant:
    """One route an identity can reach, and why."""

    route: str
    rules: tuple[str, ...]  # the allow rules whose conditions on the caller hold
    limited: bool  # each of those rules also limits methods, paths or addresses
    report_mode: bool  # the route's policy only reports: everyone gets through


def grants(entry: Entry, policies: PolicySet) -> tuple[Grant, ...]:
    """The routes `policies` let `entry` reach (`policy.reachable`), in route id order.

    The directory keeps no email_verified: the email is taken as verified, so a route shown
    may be one an unverified address could not reach. A review errs towards more access.
    """
    identity = Identity(entry.user, entry.email, True, entry.groups, None)
    facts = who_facts(identity)
    found = []
    for route_id in sorted(policies):
        policy = policies[route_id]
        if not reachable(identity, policy):
            continue
        admitting = [rule for rule in policy.allow if rule.admits(facts)]
        limited = bool(admitting) and not any(rule.every_request for rule in admitting)
        rules = tuple(rule.id for rule in admitting)
        found.append(Grant(route_id, rules, limited, policy.report))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Attestation:
    identity: str  # iss|sub
    user: str
    email: str | None
    groups: tuple[str, ...]  # at the review
    routes: tuple[str, ...]  # reachable at the review, under policy_hash
    decision: Decision
    reviewer: str  # the admin token's name
    note: str
    at: float
    policy_hash: str

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "groups": list(self.groups), "routes": list(self.routes)}


def _identity_key(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()


class Reviews:
    def __init__(
        self, records: RecordStore, keyring: Keyring, clock: Callable[[], float] = time.time
    ) -> None:
        self._records = records
        self._sealer = keyring.sealer(_SEAL)
        self._clock = clock

    async def attest(
        self, entry: Entry, reviewer: str, asked: Asked, policies: PolicySet
    ) -> Attestation:
        """Store the decision (durable first), then announce it as `review.attested`."""
        attestation = Attestation(
            identity=entry.identity,
            user=entry.user,
            email=entry.email,
            groups=entry.groups,
            routes=tuple(grant.route for grant in grants(entry, policies)),
            decision=asked.decision,
            reviewer=reviewer,
            note=asked.note,
            at=self._clock(),
            policy_hash=policies.hash,
        )
        stamp = f"{round(attestation.at * 1_000_000):016d}"
        key = f"{_identity_key(entry.identity)}.{stamp}.{secrets.token_hex(2)}"
        blob = self._sealer.seal(KIND, key, orjson.dumps(attestation.public()))
        if not await self._records.create(KIND, key, blob):
            raise RuntimeError(f"review record {key} exists already")  # 4 random hex: never
        shown = attestation.public()
        fields = {name: shown[name] for name in ("reviewer", "user", "identity", "decision")}
        fields |= {"note": asked.note, "policy_hash": policies.hash, "routes": shown["routes"]}
        emit(Event("review.attested", fields))
        return attestation

    async def every(self) -> AsyncIterator[Attestation]:
        """Every attestation that opens, each identity's in time order."""
        after = ""
        while batch := await self._records.scan(KIND, after):
            for key, stored in batch:
                plain = self._sealer.open(KIND, key, stored.value)
                # SECURITY: a record that does not open (tampered, foreign key) is left out.
                if plain is not None:
                    yield _attestation(orjson.loads(plain))
            after = batch[-1][0]

    async def latest(self) -> dict[str, Attestation]:
        newest: dict[str, Attestation] = {}
        async for attestation in self.every():
            before = newest.get(attestation.identity)
            if before is None or attestation.at >= before.at:
                newest[attestation.identity] = attestation
        return newest


def _attestation(data: dict[str, Any]) -> Attestation:
    return Attestation(**{**data, "groups": tuple(data["groups"]), "routes": tuple(data["routes"])})
