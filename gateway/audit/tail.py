"""`gateway audit tail`: the audit log as it is written, every origin merged, its chain checked.

    Reader(dir).read()      each origin's new lines, in order, as Entry(origin, seq, line,
                            record, problem): the chain is checked as it is read
    Filter / Selector       which records to show (an access.done follows its access record)
    human(origin, record)   one aligned line, every field made inert; broken(entry) the loud one
    tail(options, out, err) the command: the last N records of each origin, then (-f) follow

The reader polls. Each read lists the directory first, then reads every origin's current
segment from where it stopped, taking only lines that end in `\\n` (a record being written is
taken on the next read). A later segment of the same origin means the current one is finished
(the writer starts a segment only after its last write to the one before, and the listing came
before the read), so the reader moves on with nothing missed or repeated; bytes after a
finished segment's last newline are a torn record. The writer cuts a failed write off the
segment and writes those records again; so each read first checks that the last line taken is
still there byte for byte, and if not steps back to the last line that is, and says so (a note,
not an alarm: a record that was really changed breaks the chain when the next one is read).

Chain checks, not signatures (that is `gateway audit verify`): a record's `prev` is the hash of
the line before it (`record.digest`), its seq is one more, a segment's first seq is the one in
its name. When reading starts in the middle of a chain, its first `prev` is taken on trust.
"""

from __future__ import annotations

import heapq
import os
import re
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.audit.record import CHAIN_FIELDS, GENESIS_PREV, digest

SEGMENT_NAME = re.compile(r"(?P<origin>.+)\.(?P<seq>[0-9]{12})\.jsonl")
POLL_INTERVAL = 0.2  # seconds: a record is shown well within a second of being written
_CHUNK = 1 << 20
_REMEMBERED = 10_000  # request ids of shown access records, to show their access.done
_MARKS = 10_000  # line ends remembered in the current segment: more than a write batch holds


@dataclass(frozen=True, slots=True)
class Segment:
    origin: str
    first_seq: int
    path: Path


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of an origin's chain as read, and what breaks the chain there (if anything)."""

    origin: str
    seq: int | None  # the record's seq, or where it should have been
    line: bytes  # as stored, without the newline
    record: dict[str, Any] | None  # None: not a JSON object (a modified or torn line)
    problem: str | None = None
    note: str | None = None  # something to know that breaks nothing


def segments(directory: Path) -> dict[str, list[Segment]]:
    """Every origin's segments, by first seq."""
    found: dict[str, list[Segment]] = {}
    for name in os.listdir(directory):
        if match := SEGMENT_NAME.fullmatch(name):
            segment = Segment(match["origin"], int(match["seq"]), directory / name)
            found.setdefault(segment.origin, []).append(segment)
    for listed in found.values():
        listed.sort(key=lambda segment: segment.first_seq)
    return found


StartAt = Callable[[Sequence[Segment]], int]  # which of an origin's segments to read first


_Mark = tuple[int, int | None, str | None]  # a line end in the segment: offset, next seq, prev


@dataclass(slots=True)
class _Chain:
    origin: str
    segment: Segment
    offset: int = 0  # just after the last complete line taken from the segment
    seq: int | None = None  # what the next record must carry
    prev: str | None = None
    marks: deque[_Mark] = field(default_factory=lambda: deque([(0, None, None)], maxlen=_MARKS))

    def mark(self) -> None:
        self.marks.append((self.offset, self.seq, self.prev))

    def intact(self, file: IO[bytes]) -> bool:
        """Whether the last line taken is still in the file, byte for byte."""
        if len(self.marks) < 2:
            return os.fstat(file.fileno()).st_size >= self.offset
        (start, _, _), (end, _, line_hash) = self.marks[-2], self.marks[-1]
        file.seek(start)
        data = file.read(end - start)
        return data.endswith(b"\n") and digest(data[:-1]) == line_hash

    def rewind(self, file: IO[bytes]) -> int:
        """Back to the last line still intact; how many lines were taken back."""
        taken = 0
        while len(self.marks) > 1 and not self.intact(file):
            self.marks.pop()
            taken += 1
        self.offset, self.seq, self.prev = self.marks[-1]
        return taken


class Reader:
    """Every origin's chain in a directory, read on from where the last read stopped."""

    def __init__(self, directory: Path, start: StartAt | None = None) -> None:
        self.directory = directory
        self._start = start  # for the origins present at the first read; later ones: from 0
        self._chains: dict[str, _Chain] = {}
        self._read_before = False

    def read(self) -> Iterator[Entry]:
        """Everything written since the last read: each origin's complete lines, in order."""
        listed = segments(self.directory)  # before reading: see the module docstring
        for origin in sorted(listed):
            chain = self._chains.get(origin)
            if chain is None:
                first = self._first_segment(listed[origin])
                chain = self._chains[origin] = _Chain(origin, first)
            yield from self._drain(chain, listed[origin])
        self._read_before = True

    def _first_segment(self, listed: Sequence[Segment]) -> Segment:
        if self._start is None or self._read_before:
            return listed[0]
        return listed[max(0, min(self._start(listed), len(listed) - 1))]

    def _drain(self, chain: _Chain, listed: Sequence[Segment]) -> Iterator[Entry]:
        while True:
            torn = yield from self._lines(chain)
            following = _following(chain, listed)
            if following is None:
                return
            if torn:
                what = f"torn record at the end of {chain.segment.path.name} ({len(torn)} bytes)"
                yield Entry(chain.origin, chain.seq, torn, None, what)
            chain.segment, chain.offset = following, 0
            chain.marks.clear()
            chain.mark()

    def _lines(self, chain: _Chain) -> Generator[Entry, None, bytes]:
        """The complete lines after the offset; returns the bytes after the last newline."""
        try:
            file = chain.segment.path.open("rb")
        except FileNotFoundError:
            return b""  # removed (retention) before it was read: the next seq tells
        with file:
            if not chain.intact(file):
                yield _rewound(chain, file)
            file.seek(chain.offset)
            rest = b""
            while chunk := file.read(_CHUNK):
                *lines, rest = (rest + chunk).split(b"\n")
                for raw in lines:
                    at_start = chain.offset == 0
                    chain.offset += len(raw) + 1
                    entry = _check(chain, raw, at_start)
                    chain.mark()
                    yield entry
            return rest


def _following(chain: _Chain, listed: Sequence[Segment]) -> Segment | None:
    """The segment after the current one; if the current one is gone (the writer drops an
    empty newest segment named for the wrong seq), the one holding the next seq."""
    floor = chain.segment.first_seq + 1
    if chain.segment not in listed and chain.seq is not None:
        floor = min(floor, chain.seq)
    return next((s for s in listed if s.first_seq >= floor and s != chain.segment), None)


def _rewound(chain: _Chain, file: IO[bytes]) -> Entry:
    name = chain.segment.path.name
    taken = chain.rewind(file)
    size = os.fstat(file.fileno()).st_size
    if size < chain.offset:  # cut back further than the lines remembered
        chain.offset, chain.seq, chain.prev = size, None, None
        return Entry(chain.origin, None, b"", None, f"{name} was cut back to {size} bytes")
    note = (
        f"the last {taken} record(s) read from {name} were cut off or rewritten "
        "(the writer does this to a failed write, then writes them again)"
    )
    return Entry(chain.origin, chain.seq, b"", None, note=note)


def _check(chain: _Chain, raw: bytes, at_start: bool) -> Entry:
    record = _parse(raw)
    seq = record.get("seq") if record is not None else None
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    problems = list(_breaks(chain, record, seq, at_start))
    where = seq if seq is not None else chain.seq
    chain.seq = where + 1 if where is not None else None
    chain.prev = digest(raw)
    return Entry(chain.origin, where, raw, record, "; ".join(problems) or None)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _breaks(
    chain: _Chain, record: Mapping[str, Any] | None, seq: int | None, at_start: bool
) -> Iterator[str]:
    if record is None:
        yield "not a JSON record (modified or torn)"
        return
    if record.get("origin") != chain.origin:
        yield f"its origin field is {record.get('origin')!r}"
    if seq is None:
        yield f"no valid seq ({record.get('seq')!r})"
    elif chain.seq is not None and seq > chain.seq:
        yield f"seq jumps from {chain.seq - 1} to {seq}: {seq - chain.seq} record(s) missing"
    elif chain.seq is not None and seq < chain.seq:
        yield f"seq {seq} comes after seq {chain.seq - 1}: repeated or reordered"
    if at_start and seq != chain.segment.first_seq:
        yield f"{chain.segment.path.name} starts at seq {seq}, not {chain.segment.first_seq}"
    if chain.prev is not None and record.get("prev") != chain.prev:
        yield "prev is not the hash of the line before it (modified, inserted or removed)"
    elif chain.prev is None and seq == 0 and record.get("prev") != GENESIS_PREV:
        yield "the first record's prev is not 64 zeros"


def last_records(n: int, wanted: Filter) -> StartAt:
    """Start where an origin's last n records that pass the filter begin (at least the last
    segment), so a short tail of a years-long log reads one segment or a few, not all."""

    def start(listed: Sequence[Segment]) -> int:
        index, found = len(listed) - 1, 0
        while index > 0 and n > 0:
            found += _matching(listed[index].path, wanted)
            if found >= n:
                break
            index -= 1
        return index

    return start


def _matching(path: Path, wanted: Filter) -> int:
    try:
        with path.open("rb") as file:
            if wanted == Filter():
                return sum(1 for _ in file)
            return sum(1 for raw in file if (r := _parse(raw)) is not None and wanted.matches(r))
    except FileNotFoundError:
        return 0


# -- which records ---------------------------------------------------------------------------

_USER_FIELDS = ("user", "subject", "actor")


@dataclass(frozen=True, slots=True)
class Filter:
    """--user (exact; any case when it is an email), --route, --decision, --type (`auth.*`)."""

    user: str | None = None
    route: str | None = None
    decision: str | None = None
    type: str | None = None

    def matches(self, record: Mapping[str, Any]) -> bool:
        kind = record.get("type")
        return (
            self.type_matches(kind)
            and (
                self.decision is None or (kind, record.get("decision")) == ("access", self.decision)
            )
            and (self.route is None or record.get("route") == self.route)
            and (self.user is None or any(self._is_user(record.get(k)) for k in _USER_FIELDS))
        )

    def type_matches(self, kind: object) -> bool:
        if self.type is None:
            return True
        if not isinstance(kind, str):
            return False
        return kind.startswith(self.type[:-1]) if self.type.endswith("*") else kind == self.type

    def _is_user(self, value: object) -> bool:
        if not isinstance(value, str) or self.user is None:
            return False
        return value.casefold() == self.user.casefold() if "@" in self.user else value == self.user


class Selector:
    """The filter, plus the access.done of each access record it let through (by request id)."""

    def __init__(self, wanted: Filter) -> None:
        self.wanted = wanted
        self._joins = wanted != Filter()
        self._shown: OrderedDict[object, None] = OrderedDict()

    def __call__(self, record: Mapping[str, Any]) -> bool:
        request_id = record.get("request_id")
        if self.wanted.matches(record):
            if self._joins and record.get("type") == "access" and isinstance(request_id, str):
                self._shown[request_id] = None
                if len(self._shown) > _REMEMBERED:
                    self._shown.popitem(last=False)
            return True
        if record.get("type") != "access.done" or not self.wanted.type_matches("access.done"):
            return False
        if isinstance(request_id, str) and request_id in self._shown:
            del self._shown[request_id]
            return True
        return False


# -- how they look -------------------------------------------------------------------------

_COLOURS = {"allow": "32", "deny": "31", "would-deny": "33", "broken": "1;31"}
_HIDDEN = {*CHAIN_FIELDS, "user", "sig", "public_key", "bytes", "head"}
_FIRST = ("status", "actor", "subject", "reason")
_PLAIN = re.compile(r"[^\s=\"]+")


def inert(text: str) -> str:
    """The text with every control or invisible character shown as an escape (`\\x1b`)."""
    # SECURITY: a path, user agent or claim is attacker-chosen; printed raw, ESC or CSI
    # (U+009B) sequences would recolour, move the cursor or rewrite what the operator sees, and
    # bidi overrides, line separators or zero-width characters would reorder or hide text.
    # Python's "printable" excludes all of them (Cc, Cf, Zl, Zp, Cs, and spaces but ' ').
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(ord(c)) for c in text)


def _escaped(code: int) -> str:
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _text(value: object) -> str:
    return "-" if value is None else inert(value if isinstance(value, str) else repr(value))


def _value(value: object) -> str:
    if not isinstance(value, str):
        try:
            return inert(orjson.dumps(value).decode())
        except orjson.JSONEncodeError:  # nested deeper than orjson writes: only a modified line
            return inert(repr(value))
    shown = inert(value)
    return shown if _PLAIN.fullmatch(shown) else '"' + shown.replace('"', '\\"') + '"'


def _paint(text: str, colour: str | None, on: bool) -> str:
    return f"\x1b[{colour}m{text}\x1b[0m" if on and colour else text


def local_time(ts: object) -> datetime | None:
    try:
        return datetime.fromisoformat(ts).astimezone() if isinstance(ts, str) else None
    except ValueError:
        return None


def human(origin: str, record: Mapping[str, Any], colour: bool = False) -> str:
    """One line: time, origin, user, decision or type, then what the record is about."""
    when = local_time(record.get("ts"))
    clock = when.strftime("%H:%M:%S.%f")[:-3] if when else _text(record.get("ts"))
    kind = _text(record.get("type"))
    if kind == "access":
        user = _who(record)
        decision = _text(record.get("decision"))
        label = _paint(f"{decision:<12}", _COLOURS.get(decision), colour)
        details = f"{_text(record.get('method'))} {_text(record.get('path'))}  " + _fields(
            record, ("status", "route", "reason", "client_ip", "request_id")
        )
    else:
        user, label = record.get("user"), f"{kind:<12}"
        details = _fields(record, (*_FIRST, *sorted(set(record) - _HIDDEN - set(_FIRST))))
    return f"{clock:<12} {inert(origin):<10} {_text(user):<20} {label} {details}".rstrip()


def _who(record: Mapping[str, Any]) -> object:
    client = record.get("client")
    if record.get("user") is None and isinstance(client, str):
        return f"client:{client}"
    return record.get("user")


def _fields(record: Mapping[str, Any], names: Iterable[str]) -> str:
    shown = (f"{inert(name)}={_value(record[name])}" for name in names if name in record)
    return " ".join(text for text in shown if not text.endswith("=null"))


def broken(entry: Entry, colour: bool = False) -> str:
    where = "?" if entry.seq is None else str(entry.seq)
    what = inert(entry.problem or "")
    text = f"!! CHAIN BROKEN: origin {inert(entry.origin)} at seq {where}: {what}"
    return _paint(text, _COLOURS["broken"], colour)


# -- the command ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    directory: Path
    follow: bool = False
    json: bool = False
    last: int = 20  # records per origin shown before following
    wanted: Filter = field(default_factory=Filter)
    interval: float = POLL_INTERVAL


@dataclass(frozen=True, slots=True)
class _Item:
    ts: str
    entry: Entry
    shown: bool  # the record is shown (else only its chain break)


def select(entries: Iterable[Entry], keep: Selector, last: int | None) -> list[_Item]:
    """The last `last` shown records of each origin, and every chain break (its record shown
    only within that window), merged by time with each origin's own order kept."""
    shown: dict[str, deque[tuple[int, _Item]]] = {}
    breaks: dict[str, dict[int, _Item]] = {}
    when: dict[str, str] = {}
    for index, entry in enumerate(entries):
        ts = (entry.record or {}).get("ts")
        when[entry.origin] = ts if isinstance(ts, str) else when.get(entry.origin, "")
        item = _Item(when[entry.origin], entry, entry.record is not None and keep(entry.record))
        if item.shown:
            shown.setdefault(entry.origin, deque(maxlen=last)).append((index, item))
        if entry.problem or entry.note:
            breaks.setdefault(entry.origin, {})[index] = replace(item, shown=False)
    chains = [_in_order(breaks.get(o, {}), shown.get(o, ())) for o in sorted({*breaks, *shown})]
    return list(heapq.merge(*chains, key=lambda item: item.ts))


def _in_order(breaks: Mapping[int, _Item], shown: Iterable[tuple[int, _Item]]) -> list[_Item]:
    items = {**breaks, **dict(shown)}
    return [items[index] for index in sorted(items)]


class Printer:
    def __init__(self, out: IO[bytes], err: IO[str], json: bool) -> None:
        self.out, self.err, self.json = out, err, json
        self.colour = wants_colour(out)
        self.err_colour = wants_colour(err)
        self.broken = 0
        self._day = ""

    def show(self, items: Iterable[_Item]) -> None:
        for item in items:
            if item.entry.note:
                self._note(item.entry)
            if item.entry.problem:
                self._broken(item.entry)
            if item.shown and item.entry.record is not None:
                self._record(item.entry, item.entry.record)
        self.out.flush()

    def _record(self, entry: Entry, record: Mapping[str, Any]) -> None:
        if self.json:
            self.out.write(entry.line + b"\n")  # the stored bytes, unchanged
            return
        when = local_time(record.get("ts"))
        day = when.strftime("%Y-%m-%d (UTC%z)") if when else self._day
        if day != self._day:
            self._day = day
            self.out.write(f"-- {day} --\n".encode())
        self.out.write(human(entry.origin, record, self.colour).encode() + b"\n")

    def _note(self, entry: Entry) -> None:
        text = f"-- origin {inert(entry.origin)}: {inert(entry.note or '')} --"
        if self.json:
            self.out.flush()
            print(text, file=self.err, flush=True)
        else:
            self.out.write(text.encode() + b"\n")

    def _broken(self, entry: Entry) -> None:
        self.broken += 1
        if self.json:  # stdout stays JSON lines; what came before it is printed first
            self.out.flush()
            print(broken(entry, self.err_colour), file=self.err, flush=True)
        else:
            self.out.write(broken(entry, self.colour).encode() + b"\n")


def wants_colour(stream: IO[Any]) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def tail(options: Options, out: IO[bytes], err: IO[str]) -> int:
    """Prints the last records, then follows with -f (until interrupted). Exit status 1 when
    the chain was broken somewhere, 0 when not."""
    reader = Reader(options.directory, last_records(options.last, options.wanted))
    keep = Selector(options.wanted)
    printer = Printer(out, err, options.json)
    printer.show(select(reader.read(), keep, options.last))
    while options.follow:
        time.sleep(options.interval)
        printer.show(select(reader.read(), keep, None))
    return 1 if printer.broken else 0


def command(options: Options) -> int:
    """`gateway audit tail`: the streams, Ctrl-C and a closed pipe handled; one-line errors."""
    if not options.directory.is_dir():
        print(f"gateway: {options.directory}: not a directory", file=sys.stderr)
        return 2
    try:
        return tail(options, sys.stdout.buffer, sys.stderr)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `| head`: stop quietly, and let nothing flush to the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        print(f"gateway: cannot read the audit log: {err}", file=sys.stderr)
        return 1
