"""The audit log's writer (SPEC §8, docs/audit-log.md): one per process, one chain per origin.

    AuditWriter.open(config, key, ...)   continue the origin's chain, or begin it: a torn
                                         last line becomes a `recovery` record, a new key
                                         a `key.rotated` one, then `chain.reopened`; or a
                                         `genesis` for a new origin
    .submit(type, fields, ...)           non-blocking, on the loop: a future resolved once
                                         the record is on disk; None when it was dropped
    .flush()                             on disk: everything submitted so far, due timers
    .close()                             chain.closed, a last checkpoint; idempotent
    .healthy, .stats, .add_listener(fn)
    origin_for(configured, worker)       the chain's name

    AuditUnavailable                     records cannot be written now (disk full, I/O
                                         error); the pipeline answers 503 audit-unavailable

Start: the origin's segments are locked (`.<origin>.lock` in audit.dir, so a second process
with the same origin is refused) and read from the end. The last good record gives seq and
prev; it being the checkpoint after a `chain.closed` makes `after: closed`, else `crash`. The
key in use is the `key_id` of the latest genesis, chain.reopened, key.rotated or checkpoint
(every one of them names the key then signing). Another key than ours means `key.rotated`,
signed by the old key when `previous_keys` has it, else unsigned: verifiers must then pin
the new key themselves.

Group commit: a background task takes everything queued, seals it in the writer's thread
(seq, prev, and one `ts` from the clock per batch), writes it with one write call (two when
it crosses into a new segment), fsyncs once, and only then resolves the futures and hands
the lines to the listeners. Submissions arriving meanwhile make the next batch.

When a write or fsync fails, the segment is cut back to its size before the batch (no
partial line stays), every future waiting on it fails with AuditUnavailable and `healthy`
turns False, but the sealed lines are kept and written again (backoff 0.1 s doubling to 2 s),
ahead of anything newer, until the disk takes them. So records whose future failed, which
describe requests that were refused with 503, may still appear in the log later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import settings
from gateway.audit import record
from gateway.audit.files import FileLayer, OsFiles, Segments, Tail
from gateway.keyfiles import key_id

log = logging.getLogger("gateway.audit")

_BATCH_MAX = 8192  # records sealed per batch at most; the rest make the next one
# Group commit: records nobody waits for gather this long before their batch is written, so
# a busy gateway seals, writes and fsyncs about 20 batches a second, not one per request
# (bench/: 10 ms cost 2.5% more CPU per request than 50 ms). A durable record (a sync
# method, a phi route), flush() and close() end the wait at once.
WINDOW = 0.05
_CLOSE = "\x00close"  # the item close() queues: chain.closed and the last checkpoint
_NO_FIELDS: Mapping[str, Any] = {}
# Written by the writer alone: a submitted event must not pass for one of these.
_CHAIN_TYPES = frozenset(
    {
        *("genesis", "chain.reopened", "chain.closed", "checkpoint"),
        *("key.rotated", "recovery", "retention.removed"),
    }
)

Listener = Callable[[Sequence[bytes]], None]
_Rejected = list[tuple["asyncio.Future[None] | None", Exception]]  # records JSON cannot hold
# (type, fields, future, signing key); type None is a flush() barrier
_Item = tuple[str | None, Mapping[str, Any], asyncio.Future[None] | None, Ed25519PrivateKey | None]


class AuditUnavailable(Exception):
    """Records cannot be written now (disk full, I/O error): callers refuse what needs them."""


@dataclass(frozen=True, slots=True)
class WriterConfig:
    dir: Path
    origin: str
    checkpoint_every: int
    checkpoint_interval: float
    heartbeat_interval: float
    segment_max_bytes: int
    retention: float
    queue_max: int = 100_000
    reserved: int = 10_000  # room kept for authenticated traffic
    retry_min: float = 0.1
    retry_max: float = 2.0
    retention_check: float = 3600.0

    @classmethod
    def from_settings(cls, audit: settings.Audit, origin: str) -> WriterConfig:
        return cls(
            dir=audit.dir,
            origin=origin,
            checkpoint_every=audit.checkpoint_every,
            checkpoint_interval=audit.checkpoint_interval,
            heartbeat_interval=audit.heartbeat_interval,
            segment_max_bytes=audit.segment_max_bytes,
            retention=audit.retention,
        )


def origin_for(configured: str | None, worker: int = 0) -> str:
    """The chain's name: audit.origin, else the host name; `-wN` for worker N > 0.

    The suffix is added to a configured origin too: workers sharing one chain would fork it."""
    base = configured or (
        re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-") or "gateway"
    )
    return f"{base}-w{worker}" if worker > 0 else base


class _Chain:
    """The chain's head (seq and prev of the next record) and the key that signs."""

    def __init__(self, origin: str, seq: int, prev: str, key: Ed25519PrivateKey) -> None:
        self.origin, self.seq, self.prev, self.key = origin, seq, prev, key
        public = key.public_key()
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id, self.public_key = key_id(public), record.b64(raw)

    def append(self, type: str, fields: Mapping[str, Any], ts: float) -> bytes:
        line = record.line(
            fields, origin=self.origin, seq=self.seq, ts=ts, type=type, prev=self.prev
        )
        self.prev = record.digest(line)
        self.seq += 1
        return line

    def signed(
        self, type: str, fields: Mapping[str, Any], ts: float, key: Ed25519PrivateKey
    ) -> bytes:
        """The record with `sig`: Ed25519 over its bytes without `sig`, as a verifier sees them."""
        unsigned = record.line(
            fields, origin=self.origin, seq=self.seq, ts=ts, type=type, prev=self.prev
        )
        sig = key.sign(record.signed_bytes(orjson.loads(unsigned)))
        return self.append(type, {**fields, "sig": record.b64(sig)}, ts)

    def checkpoint(self, ts: float) -> bytes:
        fields = {"head": self.prev, "count": self.seq, "key_id": self.key_id}
        return self.signed("checkpoint", fields, ts, self.key)


@dataclass(slots=True)
class _Outcome:
    """What one attempt did: lines now on disk, records sealed, records refused, the error."""

    durable: list[bytes]
    sealed: int
    rejected: _Rejected
    error: Exception | None


def _fail(future: asyncio.Future[None], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
        # Nobody awaits a non-durable record's future; `healthy` and `stats` report the failure,
        # so it must not be logged again as "exception was never retrieved".
        future.exception()


class AuditWriter:
    def __init__(
        self,
        config: WriterConfig,
        chain: _Chain,
        segments: Segments,
        clock: Callable[[], float],
        executor: ThreadPoolExecutor,
    ) -> None:
        self._config, self._chain, self._segments = config, chain, segments
        self._clock, self._executor = clock, executor
        self._loop = asyncio.get_running_loop()
        self._anonymous_max = config.queue_max - config.reserved
        # the loop's side
        self._pending: list[_Item] = []
        self._waiting: list[asyncio.Future[None]] = []  # futures of sealed, unwritten records
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # someone waits for the next batch: no gathering
        self._listeners: list[Listener] = []
        self._healthy = True
        self._closing = False
        self._finished = False
        self._closer: asyncio.Task[None] | None = None
        self._queued = self._unsettled = 0
        self._written = self._dropped = self._failures = self._batches = 0
        # the thread's side (read by the loop only between attempts)
        self._backlog: list[bytes] = []  # sealed lines not yet on disk, from seq _backlog_seq
        self._backlog_seq = chain.seq
        self._since = 0  # records since the last checkpoint
        self._last_checkpoint = clock()
        self._retention_due = float("-inf")  # checked at start, then every retention_check
        self._close_sealed = False
        self._task = self._loop.create_task(self._run(), name=f"audit:writer {config.origin}")

    @classmethod
    async def open(
        cls,
        config: WriterConfig,
        key: Ed25519PrivateKey,
        *,
        previous_keys: Sequence[Ed25519PrivateKey] = (),
        clock: Callable[[], float] = time.time,
        files: FileLayer | None = None,
        listeners: Sequence[Listener] = (),
    ) -> AuditWriter:
        """Continue the origin's chain (or begin it) and start writing; `listeners` hear
        every line from the first (a sink re-verifying the chain needs its genesis).

        Raises AuditUnavailable when the chain cannot be read or repaired (the directory,
        its lock, a damaged last record). When the first records cannot be written, the
        writer is returned unhealthy and keeps trying."""
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="audit-writer")
        segments = Segments(files or OsFiles(), config.dir, config.origin, config.segment_max_bytes)
        try:
            tail = await loop.run_in_executor(executor, segments.open)
        except (OSError, ValueError) as err:
            executor.submit(segments.close)
            executor.shutdown(wait=False)
            raise AuditUnavailable(f"audit log {config.dir}: {err}") from err
        last = tail.last
        chain = _Chain(
            config.origin,
            int(last["seq"]) + 1 if last is not None else 0,
            record.digest(tail.last_line) if last is not None else record.GENESIS_PREV,
            key,
        )
        writer = cls(config, chain, segments, clock, executor)
        for listener in listeners:
            writer.add_listener(listener)
        first = writer._start_items(tail, previous_keys)
        writer._pending += first
        writer._queued += len(first)  # counted like submitted records until written
        try:
            await writer.flush()
        except AuditUnavailable as err:
            log.error("audit: %s; the first records are kept and written once possible", err)
        return writer

    def _start_items(self, tail: Tail, previous: Sequence[Ed25519PrivateKey]) -> list[_Item]:
        chain, items = self._chain, []
        keys = {"key_id": chain.key_id, "public_key": chain.public_key}
        if tail.last is None:
            items.append(_internal("genesis", keys))
        if tail.torn is not None:
            torn = tail.torn
            fields = {"segment": torn.segment, "offset": torn.offset, "length": len(torn.data)}
            items.append(_internal("recovery", {**fields, "bytes": record.b64(torn.data)}))
            log.warning(
                "audit: cut a torn last line (%d bytes) off %s", len(torn.data), torn.segment
            )
        if tail.last is None:
            return items
        if tail.key_id is not None and tail.key_id != chain.key_id:
            items.append(self._rotation(tail.key_id, previous))
        after = "closed" if tail.closed else "crash"
        items.append(_internal("chain.reopened", {**keys, "after": after}))
        return items

    def _rotation(self, old: str, previous: Sequence[Ed25519PrivateKey]) -> _Item:
        """key.rotated, signed by the previous key when it is at hand."""
        chain = self._chain
        fields = {"key_id": chain.key_id, "public_key": chain.public_key, "previous_key_id": old}
        signer = next((k for k in previous if key_id(k.public_key()) == old), None)
        if signer is None:
            log.warning(
                "audit: the chain was signed by key %s, which is not among "
                "audit.previous_signing_key_files; key.rotated is unsigned, so verifiers "
                "must pin the new key %s",
                old,
                chain.key_id,
            )
        return ("key.rotated", fields, None, signer)

    # -- the loop's side -------------------------------------------------------------------

    def submit(
        self,
        type: str,
        fields: Mapping[str, Any],
        *,
        durable: bool = False,
        anonymous: bool = False,
    ) -> asyncio.Future[None] | None:
        """Queue a record; the future is resolved once it is on disk.

        `fields` is handed over: it is serialized later, in the writer's thread (which adds
        the chain fields to a dict in place), and must not be touched again by the caller.
        An anonymous record is dropped (None) while the queue holds queue_max - reserved
        records; others are refused (a failed future) only when it is full. While unhealthy,
        a durable record's future fails at once, but the record stays queued and is written
        once the disk takes records again."""
        if type in _CHAIN_TYPES:
            raise ValueError(f"{type!r} records are written by the audit writer itself")
        queued = self._queued
        if anonymous and queued >= self._anonymous_max:
            # SECURITY: an anonymous flood cannot crowd out the records of signed-in users.
            self._dropped += 1
            return None
        future: asyncio.Future[None] = self._loop.create_future()
        if self._closing or queued >= self._config.queue_max:
            self._dropped += 1
            _fail(future, AuditUnavailable("closed" if self._closing else "audit queue full"))
            return future
        self._pending.append((type, fields, future, None))
        self._queued = queued + 1
        self._wake.set()
        if durable:
            self._urgent.set()
        if durable and not self._healthy:
            _fail(future, AuditUnavailable("the audit log cannot be written now"))
        return future

    def post(self, type: str, fields: Mapping[str, Any], *, anonymous: bool = False) -> bool:
        """`submit()` for a record nobody waits for (most of them): no future to make and
        settle. False when it was dropped (see submit)."""
        if type in _CHAIN_TYPES:
            raise ValueError(f"{type!r} records are written by the audit writer itself")
        queued = self._queued
        full = self._closing or queued >= self._config.queue_max
        if full or (anonymous and queued >= self._anonymous_max):
            self._dropped += 1
            return False
        self._pending.append((type, fields, None, None))
        self._queued = queued + 1
        self._wake.set()
        return True

    @property
    def origin(self) -> str:
        return self._config.origin

    @property
    def healthy(self) -> bool:
        """False from a failed write until a later write succeeds."""
        return self._healthy

    def add_listener(self, fn: Listener) -> None:
        """`fn(lines)` on the loop after each batch is on disk: its lines, without newlines."""
        self._listeners.append(fn)

    @property
    def stats(self) -> dict[str, int | str]:
        return {
            "queued": self._queued,
            "written": self._written,
            "dropped": self._dropped,
            "failures": self._failures,
            "batches": self._batches,
            "segment": self._segments.current,
        }

    async def flush(self) -> None:
        """Return once everything submitted before is on disk, with the checkpoints,
        heartbeats and retention due by the clock; AuditUnavailable if that write failed."""
        if self._closing:
            await self.close()
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending.append((None, _NO_FIELDS, future, None))
        self._wake.set()
        self._urgent.set()
        await future

    async def close(self, give_up_after: float | None = None) -> None:
        """Drain, write chain.closed and a last checkpoint, stop. After `give_up_after` seconds
        of failing writes it gives up on what is still queued (logged)."""
        if self._closer is None:
            self._closing = True
            self._pending.append((_CLOSE, _NO_FIELDS, None, None))
            self._wake.set()
            self._urgent.set()
            name = f"audit:close {self._config.origin}"
            self._closer = self._loop.create_task(self._shutdown(give_up_after), name=name)
        await asyncio.shield(self._closer)

    async def _shutdown(self, give_up_after: float | None) -> None:
        done, _ = await asyncio.wait({self._task}, timeout=give_up_after)
        if not done:
            self._task.cancel()
            log.error("audit: closing with %d records unwritten", self._queued)
            futures = self._waiting + [item[2] for item in self._pending if item[2] is not None]
            for future in futures:
                _fail(future, AuditUnavailable("closed before the record was written"))
        elif not self._task.cancelled() and (error := self._task.exception()) is not None:
            log.error("audit: the writer stopped: %r", error)
        # After the attempt still running, if any; not forever if the disk hangs.
        closed = asyncio.wrap_future(self._executor.submit(self._segments.close))
        await asyncio.wait({closed}, timeout=None if done else 5.0)
        self._executor.shutdown(wait=False)

    async def _run(self) -> None:
        retry = self._config.retry_min
        while not self._finished:
            if self._healthy:
                await self._idle()
                retry = self._config.retry_min
            else:
                await asyncio.sleep(retry)
                retry = min(retry * 2, self._config.retry_max)
            items = self._take()
            idle = not items and not self._backlog and self._next_timer() > self._clock()
            if idle and self._healthy:
                continue
            self._waiting += [item[2] for item in items if item[2] is not None]
            try:
                outcome = await self._loop.run_in_executor(self._executor, self._attempt, items)
            except Exception as err:
                log.exception("audit: the writer failed")
                outcome = _Outcome([], 0, [], err)
            self._settle(outcome)

    async def _idle(self) -> None:
        """Wait for records, or until the next timer is due (re-read at least every second);
        then let records nobody waits for gather for the group-commit WINDOW."""
        if not self._pending:
            await self._quiet()
        if self._pending and not self._urgent.is_set() and len(self._pending) < _BATCH_MAX:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WINDOW):
                    await self._urgent.wait()
        self._urgent.clear()

    async def _quiet(self) -> None:
        self._wake.clear()
        delay = self._next_timer() - self._clock()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(max(delay, 0.001), 1.0)):
                    await self._wake.wait()

    def _next_timer(self) -> float:
        return min(self._checkpoint_due(), self._retention_due)

    def _checkpoint_due(self) -> float:
        """checkpoint_interval after the last one while records come, else heartbeat_interval."""
        config = self._config
        every = config.checkpoint_interval if self._since else config.heartbeat_interval
        return self._last_checkpoint + every

    def _take(self) -> list[_Item]:
        items = self._pending
        if len(items) <= _BATCH_MAX:
            self._pending = []
            return items
        self._pending = items[_BATCH_MAX:]
        return items[:_BATCH_MAX]

    def _settle(self, outcome: _Outcome) -> None:
        """Back on the loop: acknowledge (or fail) the futures, then tell the listeners."""
        self._batches += 1
        self._written += len(outcome.durable)
        self._unsettled += outcome.sealed
        for future, error in outcome.rejected:
            self._queued -= 1
            log.error("audit: a record was refused: %s", error)
            if future is not None:
                _fail(future, error)
        waiting, self._waiting = self._waiting, []
        if outcome.error is None:
            self._succeeded(waiting)
        else:
            self._failed(waiting, outcome.error)
        if outcome.durable:
            self._tell(outcome.durable)

    def _succeeded(self, waiting: list[asyncio.Future[None]]) -> None:
        if not self._healthy:
            log.warning("audit: writing again after %d failed attempts", self._failures)
        self._healthy = True
        self._queued -= self._unsettled
        self._unsettled = 0
        for future in waiting:
            if not future.done():
                future.set_result(None)
        self._finished = self._close_sealed

    def _failed(self, waiting: list[asyncio.Future[None]], error: Exception) -> None:
        if self._healthy:
            log.error("audit: cannot write %s: %s; retrying", self._segments.current, error)
        self._healthy = False
        self._failures += 1
        for future in waiting:
            _fail(future, AuditUnavailable(f"the audit log cannot be written: {error}"))

    def _tell(self, lines: list[bytes]) -> None:
        for fn in self._listeners:
            try:
                fn(lines)
            except Exception:
                log.exception("audit: listener %r failed", fn)

    # -- the writer thread's side ----------------------------------------------------------

    def _attempt(self, items: list[_Item]) -> _Outcome:
        """Seal the items after the backlog, then write the backlog out, segment by segment."""
        sealed, rejected = self._seal(items)
        durable: list[bytes] = []
        try:
            while self._backlog:
                n = self._segments.append(self._backlog, self._backlog_seq)
                if n == len(self._backlog):
                    written, self._backlog = self._backlog, []
                else:
                    written = self._backlog[:n]
                    del self._backlog[:n]
                durable = written if not durable else durable + written
                self._backlog_seq += n
        except OSError as err:
            return _Outcome(durable, sealed, rejected, err)
        return _Outcome(durable, sealed, rejected, None)

    def _seal(self, items: list[_Item]) -> tuple[int, _Rejected]:
        """Make the lines of `items` (checkpoints included) at one `ts`, into the backlog."""
        now = self._clock()
        chain, lines, every = self._chain, self._backlog, self._config.checkpoint_every
        if not lines:
            self._backlog_seq = chain.seq
        sealed, rejected = 0, _Rejected()
        for type, fields, future, signer in items:
            if type is None:
                continue
            if type == _CLOSE:
                self._close(now)
                continue
            try:
                if signer is None:
                    lines.append(chain.append(type, fields, now))
                else:
                    lines.append(chain.signed(type, fields, now, signer))
            except Exception as err:  # a value JSON cannot hold: that record fails alone
                rejected.append((future, err))
                continue
            sealed += 1  # every record sealed leaves the queue count once written
            self._since += 1
            if self._since >= every:
                lines.append(self._checkpoint(now))
        self._timers(now)
        return sealed, rejected

    def _close(self, now: float) -> None:
        self._backlog.append(self._chain.append("chain.closed", {"records": self._chain.seq}, now))
        self._backlog.append(self._checkpoint(now))
        self._close_sealed = True

    def _timers(self, now: float) -> None:
        config = self._config
        if self._close_sealed:
            return  # nothing after the last checkpoint
        if now >= self._retention_due:
            self._retention_due = now + config.retention_check
            for segment, first, last in self._segments.expire(now, config.retention):
                fields = {"segment": segment, "first_seq": first, "last_seq": last}
                self._backlog.append(self._chain.append("retention.removed", fields, now))
                self._since += 1
        if now >= self._checkpoint_due():
            self._backlog.append(self._checkpoint(now))

    def _checkpoint(self, now: float) -> bytes:
        self._since, self._last_checkpoint = 0, now
        return self._chain.checkpoint(now)


def _internal(type: str, fields: Mapping[str, Any]) -> _Item:
    return (type, fields, None, None)
