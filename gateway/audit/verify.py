"""Verifying the audit log offline against pinned keys (SPEC §8, §10 `gateway audit verify`).

    verify(dirs, keys, live=False) -> [OriginReport]   one per origin, by name; VerifyError
                                                       for a directory or file it cannot use
    OriginReport.lines() -> [str]                      what `gateway audit verify` prints

Trust comes from the keys the auditor pins, never from the log (a log that names its own key
proves nothing): a genesis or `chain.reopened` must name a pinned key, and another key is
trusted only from a `key.rotated` record signed by the chain's key before it, or when it is
pinned itself. Checkpoints must be signed by the chain's current key.

Each line is hashed as stored (docs/audit-log.md), never re-serialized. An origin's segments
are walked in seq order and the first wrong record ends the walk with one of SPEC §8's kinds:

    modified  missing  reordered  inserted  torn record  bad signature  unknown key
    gap between segments  chain ended without chain.closed

Reading the segments is blocking file I/O: this is for the command line, not the event loop.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.audit.record import GENESIS_PREV, VERSION, digest, signed_bytes, unb64
from gateway.keyfiles import key_id

Kind = Literal[
    "modified",
    "missing",
    "reordered",
    "inserted",
    "torn record",
    "bad signature",
    "unknown key",
    "gap between segments",
    "chain ended without chain.closed",
]

_SEGMENT = re.compile(r"(?P<origin>[A-Za-z0-9][A-Za-z0-9._-]*)\.(?P<seq>[0-9]{12})\.jsonl")
_CHAIN_FIELDS: dict[str, type] = {
    "v": int,
    "origin": str,
    "seq": int,
    "ts": str,
    "type": str,
    "prev": str,
}
_WINDOW = 100_000  # records looked at to tell a swap from a hole (reordered from missing)


class VerifyError(Exception):
    """A directory or segment file that cannot be used; the message is one line."""


@dataclass(frozen=True, slots=True)
class Segment:
    path: Path
    origin: str
    first_seq: int


@dataclass(frozen=True, slots=True)
class Failure:
    seq: int
    kind: Kind
    detail: str


@dataclass(frozen=True, slots=True)
class OriginReport:
    origin: str
    records: int
    checkpoints: int
    last_signed_seq: int | None
    unsigned: int  # records after the last checkpoint
    failure: Failure | None = None
    recoveries: tuple[tuple[int, int], ...] = ()  # (seq, bytes of the torn line kept)
    removed: int = 0  # seqs 0 to removed - 1 were deleted by retention
    still_open: bool = False  # --live: no chain.closed at the end
    in_progress: int = 0  # --live: bytes of a last line not yet ended by its newline

    @property
    def ok(self) -> bool:
        return self.failure is None

    def lines(self) -> list[str]:
        name = f"origin {self.origin}"
        if self.failure is not None:
            return [
                f"FAIL: {name}: seq {self.failure.seq}: {self.failure.kind}: {self.failure.detail}"
            ]
        signed = "none" if self.last_signed_seq is None else str(self.last_signed_seq)
        out = [
            f"OK: {name}, {self.records} records, {self.checkpoints} checkpoints, "
            f"last signed seq {signed}"
        ]
        if self.unsigned:
            out.append(f"warning: {name}: {self.unsigned} records after the last checkpoint")
        if self.still_open:
            out.append(f"warning: {name}: chain still open (--live): no chain.closed yet")
        if self.in_progress:
            out.append(
                f"warning: {name}: a last line of {self.in_progress} bytes without its newline "
                "was not verified (--live: still being written?)"
            )
        for seq, kept in self.recoveries:
            out.append(
                f"note: {name}: recovery record at seq {seq} ({kept} bytes of a torn line kept)"
            )
        if self.removed:
            out.append(f"note: {name}: seqs 0 to {self.removed - 1} removed by retention")
        return out


def verify(
    dirs: Sequence[Path], keys: Sequence[Ed25519PublicKey], *, live: bool = False
) -> list[OriginReport]:
    """Every origin's chain in `dirs`, checked against the pinned `keys`."""
    if not keys:
        raise VerifyError("no pinned key: a log that names its own key proves nothing")
    pinned = {key_id(key): key for key in keys}
    chains = find_segments(dirs)
    return [_Walk(origin, chains[origin], _Trust(pinned), live).run() for origin in sorted(chains)]


# -- finding and reading segments ---------------------------------------------------------------


def find_segments(dirs: Sequence[Path]) -> dict[str, list[Segment]]:
    """Every `*.jsonl` segment in `dirs`, by origin, each origin's in first-seq order."""
    found: dict[str, Segment] = {}
    for directory in dirs:
        for path in _listing(directory):
            segment = _segment(path)
            other = found.setdefault(path.name, segment)
            if other.path.resolve() != path.resolve():
                raise VerifyError(f"{path.name} is in both {other.path.parent} and {directory}")
    if not found:
        raise VerifyError(f"no audit segments (*.jsonl) in {', '.join(map(str, dirs))}")
    chains: dict[str, list[Segment]] = {}
    for segment in sorted(found.values(), key=lambda s: (s.origin, s.first_seq)):
        chains.setdefault(segment.origin, []).append(segment)
    return chains


def _listing(directory: Path) -> list[Path]:
    if not directory.is_dir():
        problem = "not a directory" if directory.exists() else "no such directory"
        raise VerifyError(f"{directory}: {problem}")
    try:
        return sorted(path for path in directory.iterdir() if path.name.endswith(".jsonl"))
    except OSError as err:
        raise VerifyError(f"{directory}: cannot list: {err.strerror}") from None


def _segment(path: Path) -> Segment:
    match = _SEGMENT.fullmatch(path.name)
    if match is None:
        raise VerifyError(f"{path}: not a segment name (<origin>.<12-digit first seq>.jsonl)")
    if not path.is_file():  # a FIFO would hang the read, a directory fail it
        raise VerifyError(f"{path}: not a regular file")
    return Segment(path, match["origin"], int(match["seq"]))


@dataclass(frozen=True, slots=True)
class _Entry:
    """One line of a segment: its exact bytes, their hash, and the record, unless torn."""

    segment: Segment
    number: int  # the line's number in its file, from 1
    raw: bytes  # without the newline
    ended: bool  # the newline was there
    record: dict[str, Any] | None
    torn: str  # why it is not a record ("" when it is one)

    @property
    def hash(self) -> str:
        return digest(self.raw)

    @property
    def where(self) -> str:
        return f"{self.segment.path.name}:{self.number}"

    @property
    def seq(self) -> int | None:
        return None if self.record is None else int(self.record["seq"])

    def fits(self, seq: int, prev: str | None) -> bool:
        """Whether this record is seq `seq` linked to `prev` (None: a link nobody can check)."""
        record = self.record
        return record is not None and record["seq"] == seq and prev in (None, record["prev"])

    def follows(self, other: _Entry) -> bool:
        return self.record is not None and self.record["prev"] == other.hash


def _entries(segments: Sequence[Segment]) -> Generator[_Entry, None, None]:
    for segment in segments:
        try:
            with segment.path.open("rb") as file:
                for number, text in enumerate(file, 1):
                    yield _entry(segment, number, text)
        except OSError as err:
            raise VerifyError(f"{segment.path}: cannot read: {err.strerror}") from None


def _entry(segment: Segment, number: int, text: bytes) -> _Entry:
    ended = text.endswith(b"\n")
    raw = text[:-1] if ended else text
    record, torn = _parse(raw)
    if not ended:
        record, torn = None, "the file ends inside this line (no newline)"
    return _Entry(segment, number, raw, ended, record, torn)


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, "not a complete JSON line"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    for name, kind in _CHAIN_FIELDS.items():
        value = record.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return None, f"not a record: no valid {name!r}"
    return record, ""


class _Ahead:
    """An iterator of entries that can look at the next one."""

    def __init__(self, entries: Iterator[_Entry]) -> None:
        self._entries = entries
        self._buffer: deque[_Entry] = deque()

    def __iter__(self) -> Iterator[_Entry]:
        return self

    def __next__(self) -> _Entry:
        return self._buffer.popleft() if self._buffer else next(self._entries)

    def peek(self) -> _Entry | None:
        if not self._buffer:
            entry = next(self._entries, None)
            if entry is None:
                return None
            self._buffer.append(entry)
        return self._buffer[0]


def _removed_by_retention(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    """The seq ranges `retention.removed` records say were deleted (a quick first pass)."""
    ranges: list[tuple[int, int]] = []
    with closing(_entries(segments)) as entries:
        for entry in entries:
            record = entry.record or {}
            first, last = record.get("first_seq"), record.get("last_seq")
            if record.get("type") == "retention.removed" and isinstance(first, int):
                ranges.append((first, last if isinstance(last, int) else first))
    return ranges


def _covers(ranges: list[tuple[int, int]], end: int) -> bool:
    """Whether the ranges together hold every seq from 0 to end - 1."""
    reach = 0
    for first, last in sorted(ranges):
        if first > reach:
            break
        reach = max(reach, last + 1)
    return reach >= end


# -- keys --------------------------------------------------------------------------------------


def _named_key(record: Mapping[str, Any]) -> tuple[str, Ed25519PublicKey] | str:
    """The key a genesis, chain.reopened or key.rotated names, or what is wrong with it."""
    kid, public = record.get("key_id"), record.get("public_key")
    if not (isinstance(kid, str) and isinstance(public, str)):
        return "no key_id and public_key"
    try:
        key = Ed25519PublicKey.from_public_bytes(unb64(public))
    except ValueError:
        return f"public_key of key {kid!r} is not an Ed25519 key"
    # SECURITY: the id must be the key's own thumbprint, or a record could name a pinned
    # key's id beside a key of its author's.
    if key_id(key) != kid:
        return f"key_id {kid!r} is not the thumbprint of its public_key"
    return kid, key


def _signs(key: Ed25519PublicKey, record: Mapping[str, Any]) -> bool:
    sig = record.get("sig")
    if not isinstance(sig, str):
        return False
    try:
        key.verify(unb64(sig), signed_bytes(record))
    except (InvalidSignature, ValueError):
        return False
    return True


class _Trust:
    """Which key signs at this point of one chain: pinned keys and those rotated in."""

    def __init__(self, pinned: Mapping[str, Ed25519PublicKey]) -> None:
        self.pinned = dict(pinned)
        self.trusted = dict(pinned)
        self.current: str | None = None  # the chain's key; None while its start is unseen
        self.since = 0
        self.pending: tuple[int, str] | None = None  # a chain.reopened's new key, until rotated in

    def genesis(self, entry: _Entry, seq: int) -> Failure | None:
        named = _named_key(entry.record or {})
        if isinstance(named, str):
            return Failure(seq, "unknown key", f"{entry.where}: {named}")
        if named[0] not in self.pinned:
            return Failure(seq, "unknown key", f"genesis names key {named[0]!r}, not pinned")
        self._use(named[0], seq)
        return None

    def reopened(self, entry: _Entry, seq: int) -> Failure | None:
        named = _named_key(entry.record or {})
        if isinstance(named, str):
            return Failure(seq, "unknown key", f"{entry.where}: {named}")
        if named[0] in self.trusted:
            self._use(named[0], seq)
        else:  # trusted only if the next record, a key.rotated, brings it in
            self.pending = (seq, named[0])
        return None

    def rotated(self, entry: _Entry, seq: int) -> Failure | None:
        failure = self._rotation(entry, seq)
        if self.pending is not None and (failure is not None or self.current != self.pending[1]):
            at, kid = self.pending
            why = failure.detail if failure else f"the key.rotated at seq {seq} names another key"
            return Failure(
                at, "unknown key", f"chain.reopened names key {kid!r}, not pinned; {why}"
            )
        self.pending = None
        return failure

    def _rotation(self, entry: _Entry, seq: int) -> Failure | None:
        record = entry.record or {}
        named = _named_key(record)
        if isinstance(named, str):
            return Failure(seq, "unknown key", f"{entry.where}: {named}")
        kid, key = named
        by = record.get("previous_key_id")
        allowed = self.pinned if self.current is None else {self.current: None}
        if isinstance(by, str) and by in allowed and _signs(self.trusted[by], record):
            self.trusted[kid] = key
        elif kid not in self.pinned:
            if isinstance(by, str) and by in allowed:
                why = f"its sig does not verify with the previous key {by!r}"
                return Failure(seq, "bad signature", f"key.rotated to {kid!r}: {why}")
            why = f"not pinned, and not signed by the chain's key {self.current!r}"
            return Failure(seq, "unknown key", f"key.rotated to {kid!r}: {why}")
        self._use(kid, seq)
        return None

    def signer(self, kid: object, seq: int) -> Ed25519PublicKey | str:
        """The key a checkpoint's `key_id` names, if it may sign here, or why not."""
        if not isinstance(kid, str):
            return "names no key_id"
        if self.current is None and kid in self.pinned:  # the chain's start was removed
            self._use(kid, seq)
        if kid == self.current:
            return self.trusted[kid]
        if kid in self.trusted:
            return f"signed by {kid!r}; the chain's key is {self.current!r} since seq {self.since}"
        return f"signed by key {kid!r}, neither pinned nor brought in by a key.rotated"

    def _use(self, kid: str, seq: int) -> None:
        self.current, self.since = kid, seq


# -- walking one chain -------------------------------------------------------------------------


class _Walk:
    """One origin's chain, record by record; the first wrong record ends the walk."""

    def __init__(self, origin: str, segments: list[Segment], trust: _Trust, live: bool) -> None:
        self.origin, self.segments, self.trust, self.live = origin, segments, trust, live
        self.want = segments[0].first_seq  # the seq the next record must have
        self.want_prev: str | None = GENESIS_PREV if self.want == 0 else None
        self.last: _Entry | None = None
        self.records = self.checkpoints = self.in_progress = 0
        self.signed: int | None = None
        self.recoveries: list[tuple[int, int]] = []
        self.stage = "open"  # "closing" after chain.closed, "closed" after its checkpoint

    def run(self) -> OriginReport:
        failure = self._start()
        if failure is None:
            with closing(_entries(self.segments)) as entries:
                failure = self._walk(_Ahead(entries))
        last = self.want - 1
        return OriginReport(
            self.origin,
            self.records,
            self.checkpoints,
            self.signed,
            self.records if self.signed is None else last - self.signed,
            failure,
            tuple(self.recoveries),
            self.segments[0].first_seq,
            still_open=self.stage != "closed",
            in_progress=self.in_progress,
        )

    def _start(self) -> Failure | None:
        """A chain that does not start at seq 0 must say that retention removed the rest."""
        first = self.segments[0]
        if first.first_seq == 0 or _covers(_removed_by_retention(self.segments), first.first_seq):
            return None
        return Failure(
            0,
            "missing",
            f"the first segment is {first.path.name}, and no retention.removed record "
            f"accounts for seqs 0 to {first.first_seq - 1}",
        )

    def _walk(self, ahead: _Ahead) -> Failure | None:
        for entry in ahead:
            failure = self._step(entry, ahead)
            if failure is not None:
                return failure
        return self._end()

    def _step(self, entry: _Entry, ahead: _Ahead) -> Failure | None:
        if entry.record is None:
            return self._torn(entry, ahead)
        failure = (
            self._boundary(entry)
            or self._placed(entry, ahead)
            or self._in_turn(entry, entry.record)
            or self._signed(entry, entry.record)
        )
        if failure is None:
            self._accept(entry, entry.record)
        return failure

    def _torn(self, entry: _Entry, ahead: _Ahead) -> Failure | None:
        if self.live and not entry.ended and ahead.peek() is None:
            self.in_progress = len(entry.raw)  # the writer may be in the middle of this line
            return None
        return Failure(self.want, "torn record", f"{entry.where}: {entry.torn}")

    def _boundary(self, entry: _Entry) -> Failure | None:
        """A segment's first record must continue the previous segment and match its name."""
        named = entry.segment.first_seq
        if entry.number != 1 or self.last is None or named == self.want:
            return None
        name = entry.segment.path.name
        if entry.fits(self.want, self.want_prev):
            return Failure(
                self.want, "modified", f"{name} is named for seq {named}, not {self.want}"
            )
        if named > self.want:
            ends = f"{self.last.segment.path.name} ends at seq {self.want - 1}"
            return Failure(self.want, "gap between segments", f"{ends}, {name} starts at {named}")
        return None

    def _placed(self, entry: _Entry, ahead: _Ahead) -> Failure | None:
        """The record's origin, seq and prev; when they are wrong, the likeliest why."""
        record = entry.record or {}
        if record["origin"] != self.origin:
            after = ahead.peek()
            linked = after is not None and after.follows(entry)  # a whole foreign record
            where = f"{entry.where}: a record of origin {record['origin']!r}"
            return Failure(self.want, "inserted" if linked else "modified", where)
        if entry.fits(self.want, self.want_prev):
            return None
        return self._misplaced(entry, int(record["seq"]), str(record["prev"]), ahead)

    def _misplaced(self, entry: _Entry, seq: int, prev: str, ahead: _Ahead) -> Failure:
        want, after = self.want, ahead.peek()
        extra = after is not None and after.fits(want, self.want_prev)  # fine without this one
        if seq == want or prev == self.want_prev:
            return self._changed(entry, seq, extra)
        if seq == want - 1 and self.last is not None:  # one of the two is extra
            return Failure(seq, "inserted", f"seq {seq} twice: {self.last.where}, {entry.where}")
        if seq < want:
            return Failure(want, "inserted", f"{entry.where}: a second seq {seq}, after {want - 1}")
        return self._displaced(entry, seq, ahead, extra)

    def _changed(self, entry: _Entry, seq: int, extra: bool) -> Failure:
        """Its seq or its link is right, the other not: it is extra, or a record was edited."""
        want = self.want
        if extra:
            return Failure(want, "inserted", f"{entry.where} (seq {seq}) where seq {want} belongs")
        if seq != want:  # it links where seq `want` belongs: its own seq was edited
            return Failure(want, "modified", f"{entry.where}: seq {seq} links as seq {want}")
        if self.last is None:
            return Failure(want, "modified", f"{entry.where}: the genesis prev is not 64 zeros")
        link = f"seq {want - 1} ({self.last.where}) does not hash to the prev"
        return Failure(want - 1, "modified", f"{link} of seq {want} ({entry.where})")

    def _displaced(self, entry: _Entry, seq: int, ahead: _Ahead, extra: bool) -> Failure:
        """Seq `want` is not next: a swap (the seqs a permutation), a copy, or a hole."""
        want, top, whole = self.want, seq, False
        seen: set[int] = set()
        for other in itertools.chain([entry], itertools.islice(ahead, _WINDOW)):
            if other.seq is None:
                break
            if other.seq < want or other.seq in seen:
                return Failure(want, "inserted", f"{other.where}: seq {other.seq} a second time")
            if whole:
                break
            seen.add(other.seq)
            top = max(top, other.seq)
            whole = want in seen and len(seen) == top - want + 1
        if whole:
            return Failure(want, "reordered", f"{entry.where}: seq {seq} where seq {want} belongs")
        if extra:
            return Failure(want, "inserted", f"{entry.where} (seq {seq}) where seq {want} belongs")
        hole = f"seq {want}" if seq == want + 1 else f"seqs {want} to {seq - 1}"
        return Failure(want, "missing", f"{hole} absent: seq {seq} follows at {entry.where}")

    def _in_turn(self, entry: _Entry, record: dict[str, Any]) -> Failure | None:
        """Its version, and its place: a genesis first, after chain.closed its checkpoint."""
        seq, kind = int(record["seq"]), str(record["type"])
        if record["v"] != VERSION:
            return Failure(seq, "modified", f"{entry.where}: v is {record['v']}, not {VERSION}")
        if self.trust.pending is not None and kind != "key.rotated":
            at, kid = self.trust.pending
            return Failure(at, "unknown key", f"chain.reopened names key {kid!r}, not pinned")
        if seq == 0 and kind != "genesis":
            return Failure(0, "unknown key", f"{entry.where}: type {kind!r}, not a genesis")
        if seq != 0 and kind == "genesis":
            return Failure(seq, "inserted", f"{entry.where}: a second genesis")
        if self.stage == "closing" and kind != "checkpoint":
            why = "between chain.closed and its checkpoint"
            return Failure(seq, "inserted", f"{entry.where}: type {kind!r} {why}")
        if self.stage == "closed" and kind not in ("recovery", "key.rotated", "chain.reopened"):
            why = "after the chain was closed, without chain.reopened"
            return Failure(seq, "inserted", f"{entry.where}: type {kind!r} {why}")
        return None

    def _signed(self, entry: _Entry, record: dict[str, Any]) -> Failure | None:
        seq, kind = int(record["seq"]), record["type"]
        if kind == "genesis":
            return self.trust.genesis(entry, seq)
        if kind == "chain.reopened":
            return self.trust.reopened(entry, seq)
        if kind == "key.rotated":
            return self.trust.rotated(entry, seq)
        if kind == "checkpoint":
            return self._checkpoint(entry, record, seq)
        return None

    def _checkpoint(self, entry: _Entry, record: dict[str, Any], seq: int) -> Failure | None:
        key = self.trust.signer(record.get("key_id"), seq)
        if isinstance(key, str):
            return Failure(seq, "unknown key", f"checkpoint at {entry.where}: {key}")
        if not _signs(key, record):
            why = f"its sig does not verify with key {record['key_id']!r}"
            return Failure(seq, "bad signature", f"checkpoint at {entry.where}: {why}")
        # signed, and it must say what it signs: the record before it, and how many there are
        if record.get("head") != record["prev"] or record.get("count") != seq:
            return Failure(seq, "modified", f"checkpoint at {entry.where}: head or count is wrong")
        return None

    def _accept(self, entry: _Entry, record: dict[str, Any]) -> None:
        seq, kind = int(record["seq"]), record["type"]
        self.last, self.want, self.want_prev = entry, seq + 1, entry.hash
        self.records += 1
        if kind == "checkpoint":
            self.checkpoints += 1
            self.signed = seq
            self.stage = "closed" if self.stage == "closing" else self.stage
        elif kind == "chain.closed":
            self.stage = "closing"
        elif kind == "chain.reopened":
            self.stage = "open"
        elif kind == "recovery":
            self.recoveries.append((seq, _kept(record)))

    def _end(self) -> Failure | None:
        if self.records == 0:
            return Failure(self.want, "missing", "its segments hold no records")
        if self.trust.pending is not None:
            at, kid = self.trust.pending
            return Failure(at, "unknown key", f"chain.reopened names key {kid!r}, not pinned")
        if self.stage == "closed" or self.live:
            return None
        last = self.last
        what = f"seq {self.want - 1} ({last.where if last else '?'}) is the last record"
        if self.stage == "closing":
            what = f"chain.closed at seq {self.want - 1} has no final checkpoint"
        return Failure(self.want, "chain ended without chain.closed", f"{what}, no restart follows")


def _kept(record: Mapping[str, Any]) -> int:
    """How many bytes of the torn line a recovery record keeps."""
    kept = record.get("bytes")
    try:
        return len(unb64(kept)) if isinstance(kept, str) else 0
    except ValueError:
        length = record.get("length")
        return length if isinstance(length, int) else 0
