"""The audit log's segment files (docs/audit-log.md "Files"): the only code that touches them.

    FileLayer               the system calls the writer needs, as a Protocol; tests wrap
                            OsFiles to see the order of calls and to inject ENOSPC
    OsFiles                 the real one: O_APPEND files of mode 0600 in a 0700 directory
    Segments(files, ...)    one origin's segments, `<origin>.<first seq, 12 digits>.jsonl`:
        .open() -> Tail         lock the origin, find its segments, cut a torn last line off,
                                and say how the chain ended
        .append(lines, seq)     as many lines as fit in the current segment (rotating first
                                when none fits), written and fsynced, or rolled back
        .expire(now, age)       remove the oldest segments whose last record is older
        .close()

Only whole lines stay in a file: a failed write or fsync is truncated back to the size the
segment had before it, and a line a crash tore is cut off at the next start (its bytes go
into the `recovery` record the writer writes). Everything here is blocking I/O: the writer
runs it in its own thread (STYLE 16).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

log = logging.getLogger("gateway.audit")

_CHUNK = 1 << 16  # bytes read at a time when reading a segment backwards
_KEY_TYPES = frozenset({"genesis", "chain.reopened", "key.rotated", "checkpoint"})


class FileLayer(Protocol):
    def make_dir(self, path: Path) -> None: ...
    def list_dir(self, path: Path) -> list[str]: ...
    def lock(self, path: Path) -> int: ...  # exclusive, non-blocking: OSError when held
    def open_append(self, path: Path) -> int: ...
    def write(self, fd: int, data: bytes) -> int: ...
    def fsync(self, fd: int) -> None: ...
    def size(self, fd: int) -> int: ...
    def truncate(self, fd: int, size: int) -> None: ...
    def close(self, fd: int) -> None: ...
    def file_size(self, path: Path) -> int: ...
    def read(self, path: Path, offset: int, length: int) -> bytes: ...
    def remove(self, path: Path) -> None: ...
    def sync_dir(self, path: Path) -> None: ...


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class OsFiles:
    """The file layer of a real file system (POSIX)."""

    def make_dir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def list_dir(self, path: Path) -> list[str]:
        return os.listdir(path)

    def lock(self, path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return fd

    def open_append(self, path: Path) -> int:
        # SECURITY: 0600 and O_NOFOLLOW: nobody else reads the log, and a symlink planted in
        # the directory cannot send the records into another file.
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o600)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fdatasync(fd)  # the data and the size; the rest of the inode is not needed

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def file_size(self, path: Path) -> int:
        return os.lstat(path).st_size

    def read(self, path: Path, offset: int, length: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        try:
            parts, end = [], offset + length
            while offset < end and (part := os.pread(fd, end - offset, offset)):
                parts.append(part)
                offset += len(part)
            return b"".join(parts)
        finally:
            os.close(fd)

    def remove(self, path: Path) -> None:
        os.unlink(path)

    def sync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def segment_name(origin: str, first_seq: int) -> str:
    return f"{origin}.{first_seq:012d}.jsonl"


@dataclass(frozen=True, slots=True)
class Torn:
    """A last line a crash left unfinished, cut off at `offset` of `segment`."""

    segment: str
    offset: int
    data: bytes


@dataclass(slots=True)
class Tail:
    """How a chain ended: its last good record (and the one before), the key last named."""

    last: dict[str, Any] | None = None
    last_line: bytes = b""
    before: dict[str, Any] | None = None
    key_id: str | None = None
    torn: Torn | None = None

    @property
    def closed(self) -> bool:
        """Stopped cleanly: chain.closed, then its checkpoint, and nothing torn after."""
        return (
            self.torn is None
            and self.last is not None
            and self.last.get("type") == "checkpoint"
            and self.before is not None
            and self.before.get("type") == "chain.closed"
        )


class Segments:
    def __init__(self, files: FileLayer, directory: Path, origin: str, max_bytes: int) -> None:
        self._files, self._dir, self._origin, self._max = files, directory, origin, max_bytes
        self._pattern = re.compile(rf"{re.escape(origin)}\.(\d{{12,}})\.jsonl")
        self._firsts: list[int] = []  # first seq of each segment, oldest first
        self._fd: int | None = None
        self._lock: int | None = None
        self._size = 0
        self._dirty = False  # a failed write may have left bytes past _size

    @property
    def current(self) -> str:
        return segment_name(self._origin, self._firsts[-1]) if self._firsts else ""

    def _path(self, first_seq: int) -> Path:
        return self._dir / segment_name(self._origin, first_seq)

    # -- start -----------------------------------------------------------------------------

    def open(self) -> Tail:
        """Lock the origin, read how its chain ended, cut a torn last line off."""
        self._files.make_dir(self._dir)
        try:
            # One writer per origin: two processes appending to one chain would fork it.
            self._lock = self._files.lock(self._dir / f".{self._origin}.lock")
        except BlockingIOError:
            raise OSError(
                errno.EBUSY, f"origin {self._origin!r} is being written by another process"
            ) from None
        names = self._files.list_dir(self._dir)
        found = (self._pattern.fullmatch(name) for name in names)
        self._firsts = sorted(int(m[1]) for m in found if m)
        tail = self._scan()
        self._open_current(tail)
        return tail

    def _scan(self) -> Tail:
        tail = Tail()
        for newest, first in enumerate(reversed(self._firsts)):
            pieces = _read_back(self._files, self._path(first))
            offset, unterminated = next(pieces)
            if newest == 0 and unterminated:
                tail.torn = Torn(segment_name(self._origin, first), offset, unterminated)
            for offset, line in pieces:
                record = _parse(line)
                if newest == 0 and tail.last is None and tail.torn is None and record is None:
                    tail.torn = Torn(segment_name(self._origin, first), offset, line + b"\n")
                    continue
                if self._take(tail, line, record, first):
                    return tail
        return tail

    def _take(self, tail: Tail, line: bytes, record: dict[str, Any] | None, first: int) -> bool:
        """Note one record read backwards; True when nothing more is needed."""
        if tail.last is None:
            if record is None:
                name = segment_name(self._origin, first)
                raise ValueError(f"{name}: the last record is damaged; not continuing the chain")
            if record.get("origin") != self._origin:
                raise ValueError(f"{segment_name(self._origin, first)}: not origin {self._origin}")
            tail.last, tail.last_line = record, line
        elif tail.before is None:
            tail.before = record or {}
        if tail.key_id is None and b'"key_id"' in line:
            keyed = record if record is not None else _parse(line)
            if keyed is not None and keyed.get("type") in _KEY_TYPES:
                tail.key_id = str(keyed.get("key_id"))
        return tail.before is not None and tail.key_id is not None

    def _open_current(self, tail: Tail) -> None:
        next_seq = int(tail.last["seq"]) + 1 if tail.last is not None else 0
        if self._firsts:
            fd = self._files.open_append(self._path(self._firsts[-1]))
            if tail.torn is not None:
                self._files.truncate(fd, tail.torn.offset)
                self._files.fsync(fd)
            self._fd, self._size = fd, self._files.size(fd)
            if self._size == 0 and self._firsts[-1] != next_seq:
                # An empty newest segment named for another seq than the next: drop it.
                self._files.close(fd)
                self._files.remove(self._path(self._firsts.pop()))
                self._fd = None
        if self._fd is None:
            self._create(next_seq)

    def _create(self, first_seq: int) -> None:
        self._fd = self._files.open_append(self._path(first_seq))
        self._files.sync_dir(self._dir)  # the new name survives a crash too
        self._firsts.append(first_seq)
        self._size = 0

    # -- appending -------------------------------------------------------------------------

    def append(self, lines: Sequence[bytes], first_seq: int) -> int:
        """Write the longest run of `lines` that fits the current segment; return its length.

        Raises OSError with the segment as it was before (the write rolled back)."""
        if self._size > 0 and self._size + len(lines[0]) + 1 > self._max:
            self._rotate(first_seq)
        room, n = self._max - self._size, 0
        for line in lines:
            room -= len(line) + 1
            if room < 0 and n > 0:
                break
            n += 1
        self._write(b"\n".join(lines[:n]) + b"\n")
        return n

    def _rotate(self, first_seq: int) -> None:
        if self._fd is not None:
            self._files.close(self._fd)
            self._fd = None
        self._create(first_seq)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        fd, before, total = self._fd, self._size, len(data)
        try:
            if self._dirty and self._files.size(fd) != before:
                self._files.truncate(fd, before)
            self._dirty = True
            written = self._files.write(fd, data)
            while written < total:  # a short write: rare, but only whole lines may stay
                step = self._files.write(fd, data[written:])
                if step <= 0:
                    raise OSError(errno.EIO, "the write made no progress")
                written += step
            self._files.fsync(fd)
        except OSError:
            # After a failed fsync the page cache may hold data that never reaches the disk:
            # cut back to the last fsynced size and write the batch again later.
            try:
                self._files.truncate(fd, before)
            except OSError:
                log.warning("audit: cannot truncate %s back to %d bytes", self.current, before)
            raise
        self._dirty = False
        self._size = before + total

    # -- retention -------------------------------------------------------------------------

    def expire(self, now: float, age: float) -> list[tuple[str, int, int]]:
        """Remove the oldest segments (never the current one) whose last record is older
        than `age` seconds; return (segment, first seq, last seq) of each removed."""
        removed: list[tuple[str, int, int]] = []
        while len(self._firsts) > 1:
            first, following = self._firsts[0], self._firsts[1]
            last = self._last_ts(first)
            if last is None or now - last <= age:
                break
            try:
                self._files.remove(self._path(first))
                self._files.sync_dir(self._dir)
            except OSError as err:
                log.warning("audit: cannot remove %s: %s", segment_name(self._origin, first), err)
                break
            del self._firsts[0]
            removed.append((segment_name(self._origin, first), first, following - 1))
        return removed

    def _last_ts(self, first: int) -> float | None:
        try:
            pieces = _read_back(self._files, self._path(first))
            next(pieces)
            for _, line in pieces:
                record = _parse(line)
                if record is not None:
                    ts = datetime.strptime(str(record["ts"]), "%Y-%m-%dT%H:%M:%S.%fZ")
                    return ts.replace(tzinfo=UTC).timestamp()
        except (OSError, KeyError, ValueError) as err:
            log.warning("audit: cannot read %s: %s", segment_name(self._origin, first), err)
        return None

    def close(self) -> None:
        for fd in (self._fd, self._lock):
            if fd is not None:
                self._files.close(fd)
        self._fd = self._lock = None


def _parse(line: bytes) -> dict[str, Any] | None:
    """A record, or None for bytes that are not one (torn, damaged)."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
        return None
    return record


def _read_back(files: FileLayer, path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of a file's lines, last first, without their newlines.

    The first item is what follows the last newline: b"" for a file of whole lines."""
    pos = files.file_size(path)
    rest = b""
    while pos > 0:
        n = min(_CHUNK, pos)
        pos -= n
        parts = (files.read(path, pos, n) + rest).split(b"\n")
        end = pos + sum(map(len, parts)) + len(parts) - 1
        for part in reversed(parts[1:]):
            end -= len(part)
            yield end, part
            end -= 1
        rest = parts[0]
    yield 0, rest
