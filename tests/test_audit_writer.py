"""The audit writer against real files: a valid chain per docs/audit-log.md, group commit,
failures and recovery, restarts, key rotation, segments, checkpoints, retention, crashes."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.audit import record
from gateway.audit.files import OsFiles
from gateway.audit.writer import AuditUnavailable, AuditWriter, WriterConfig, origin_for
from gateway.keyfiles import key_id
from gateway.settings import Audit

REPO = Path(__file__).resolve().parent.parent
T0 = 1_790_000_000.0
SEGMENT = re.compile(r"(?P<origin>.+)\.(?P<first>\d{12,})\.jsonl")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingFiles(OsFiles):
    """Real files; logs writes (with the `n` of their records), fsyncs and truncates in
    order, can fail writes (after writing half) or fsyncs with ENOSPC, and can hold writes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, frozenset[int]]] = []
        self.fail: str | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()

    def write(self, fd: int, data: bytes) -> int:
        self.writing.set()
        assert self.gate.wait(10)
        if self.fail == "write":
            super().write(fd, data[: len(data) // 2])
            self.calls.append(("write-failed", frozenset()))
            raise OSError(errno.ENOSPC, "No space left on device")
        n = super().write(fd, data)
        self.calls.append(("write", _numbers(data[:n])))
        return n

    def fsync(self, fd: int) -> None:
        if self.fail == "fsync":
            self.calls.append(("fsync-failed", frozenset()))
            raise OSError(errno.ENOSPC, "No space left on device")
        super().fsync(fd)
        self.calls.append(("fsync", frozenset()))

    def truncate(self, fd: int, size: int) -> None:
        super().truncate(fd, size)
        self.calls.append(("truncate", frozenset()))

    def count(self, kind: str) -> int:
        return sum(1 for call, _ in self.calls if call == kind)


def _numbers(data: bytes) -> frozenset[int]:
    lines = (orjson.loads(line) for line in data.split(b"\n") if line)
    return frozenset(r["n"] for r in lines if "n" in r)


def config(tmp_path: Path, **changes: Any) -> WriterConfig:
    base = WriterConfig(
        dir=tmp_path / "audit",
        origin="gw1",
        checkpoint_every=1000,
        checkpoint_interval=1.0,
        heartbeat_interval=60.0,
        segment_max_bytes=1 << 20,
        retention=365 * 86400.0,
        retry_min=0.01,
        retry_max=0.05,
    )
    return replace(base, **changes)


def public(key: Ed25519PrivateKey) -> Ed25519PublicKey:
    return key.public_key()


def raw(key: Ed25519PublicKey) -> str:
    return record.b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def segments(directory: Path, origin: str = "gw1") -> list[Path]:
    found = [(SEGMENT.fullmatch(p.name), p) for p in directory.iterdir()]
    return [p for m, p in sorted(found, key=lambda x: int(x[0]["first"]) if x[0] else -1) if m]


def verify(
    directory: Path, keys: Mapping[str, Ed25519PublicKey], origin: str = "gw1"
) -> list[dict[str, Any]]:
    """What an auditor checks: whole lines, names, seq, links, key announcements, signatures."""
    records: list[dict[str, Any]] = []
    head: str | None = None
    signer: str | None = None
    for path in segments(directory, origin):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name}: a torn last line"
        for i, line in enumerate(data.split(b"\n")[:-1]):
            rec = orjson.loads(line)
            assert line == record.canonical(rec), "not canonical JSON"
            if i == 0:
                assert path.name == f"{origin}.{rec['seq']:012d}.jsonl"
            if head is None:  # the chain's start, or the first record retention kept
                assert rec["type"] == "genesis" or not records
                if rec["type"] == "genesis":
                    assert rec["seq"] == 0 and rec["prev"] == record.GENESIS_PREV
            else:
                assert rec["prev"] == head, f"seq {rec['seq']}: broken link"
                assert rec["seq"] == records[-1]["seq"] + 1, f"seq {rec['seq']}: a gap"
            assert rec["v"] == 1 and rec["origin"] == origin
            signer = _check_keys(rec, keys, signer, head)
            head = record.digest(line)
            records.append(rec)
    return records


def _check_keys(
    rec: dict[str, Any], keys: Mapping[str, Ed25519PublicKey], signer: str | None, head: str | None
) -> str | None:
    kind = rec["type"]
    if kind in ("genesis", "chain.reopened", "key.rotated"):
        assert rec["public_key"] == raw(keys[rec["key_id"]])
    if kind == "key.rotated" and "sig" in rec:
        sig = record.unb64(rec["sig"])
        keys[rec["previous_key_id"]].verify(sig, record.signed_bytes(rec))
    if kind == "checkpoint":
        assert rec["key_id"] == (signer or rec["key_id"])  # known after retention removed some
        assert rec["head"] == rec["prev"] == (head or rec["prev"])
        assert rec["count"] == rec["seq"]
        keys[rec["key_id"]].verify(record.unb64(rec["sig"]), record.signed_bytes(rec))
    return str(rec["key_id"]) if kind in ("genesis", "chain.reopened", "key.rotated") else signer


def types(records: list[dict[str, Any]]) -> list[str]:
    return [r["type"] for r in records]


async def put(writer: AuditWriter, fields: Mapping[str, Any]) -> None:
    future = writer.submit("access", fields)
    assert future is not None
    await future


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def keys(key: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    return {key_id(public(key)): public(key)}


# -- the file ----------------------------------------------------------------------------------


async def test_a_new_chain_is_valid_per_the_format(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    writer = await AuditWriter.open(config(tmp_path), key, clock=Clock())
    futures = [writer.submit("access", {"n": n, "path": "/a\x1b[2J\u009b"}) for n in range(20)]
    await asyncio.gather(*[f for f in futures if f is not None])
    await writer.close()

    records = verify(tmp_path / "audit", keys)
    assert types(records) == ["genesis"] + ["access"] * 20 + ["chain.closed", "checkpoint"]
    assert records[0]["key_id"] == key_id(public(key))
    assert records[0]["ts"] == "2026-09-21T14:13:20.000000Z"
    assert records[1]["path"] == "/a\x1b[2J\\u009b"  # C1 made visible; ESC escaped by JSON
    assert records[-2]["records"] == records[-2]["seq"] == 21
    assert (tmp_path / "audit").stat().st_mode & 0o777 == 0o700
    assert segments(tmp_path / "audit")[0].stat().st_mode & 0o777 == 0o600


async def test_chain_fields_cannot_be_overridden_and_writer_types_are_refused(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    writer = await AuditWriter.open(config(tmp_path), key)
    await put(writer, {"seq": 99, "prev": "x", "origin": "evil", "type": "genesis"})
    for kind in ("checkpoint", "genesis", "chain.closed", "key.rotated", "recovery"):
        with pytest.raises(ValueError):
            writer.submit(kind, {})
    await writer.close()
    records = verify(tmp_path / "audit", keys)
    assert records[1]["seq"] == 1 and records[1]["type"] == "access"


async def test_a_record_json_cannot_hold_fails_alone(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    writer = await AuditWriter.open(config(tmp_path), key)
    bad = writer.submit("access", {"n": 0, "x": object()})
    good = writer.submit("access", {"n": 1})
    assert bad is not None and good is not None
    with pytest.raises(TypeError):
        await bad
    await good
    assert writer.healthy and writer.stats["queued"] == 0
    await writer.close()
    assert [r.get("n") for r in verify(tmp_path / "audit", keys)] == [None, 1, None, None]


# -- group commit ------------------------------------------------------------------------------


async def test_group_commit_writes_then_fsyncs_then_acknowledges(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    files = RecordingFiles()
    writer = await AuditWriter.open(config(tmp_path), key, files=files)
    files.calls.clear()
    futures = []

    def acknowledged(n: int) -> Callable[[object], None]:
        return lambda _: files.calls.append(("ack", frozenset({n})))

    for n in range(300):
        future = writer.submit("access", {"n": n}, durable=True)
        assert future is not None
        future.add_done_callback(acknowledged(n))
        futures.append(future)
        if n % 50 == 0:
            await asyncio.sleep(0)  # let batches go while records keep coming
    await asyncio.gather(*futures)

    assert 1 <= files.count("write") < 300 and files.count("fsync") < 300
    calls = files.calls
    acks = [(i, n) for i, (kind, numbers) in enumerate(calls) if kind == "ack" for n in numbers]
    assert len(acks) == 300
    for i, n in acks:
        wrote = [j for j in range(i) if calls[j][0] == "write" and n in calls[j][1]]
        assert len(wrote) == 1, f"record {n} written {len(wrote)} times before its ack"
        assert any(calls[k][0] == "fsync" for k in range(wrote[0] + 1, i)), f"{n}: no fsync"
    await writer.close()
    assert len([r for r in verify(tmp_path / "audit", keys) if r["type"] == "access"]) == 300


async def test_listeners_get_each_batch_as_written(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    seen: list[bytes] = []
    writer = await AuditWriter.open(config(tmp_path, checkpoint_every=5), key)
    writer.add_listener(lambda lines: seen.extend(lines))

    def failing(lines: Sequence[bytes]) -> None:
        raise RuntimeError("a failing sink harms nobody")

    writer.add_listener(failing)
    for n in range(12):
        writer.submit("access", {"n": n})
    await writer.close()
    data = b"".join(p.read_bytes() for p in segments(tmp_path / "audit"))
    lines = data.split(b"\n")[:-1]
    assert seen == lines[1:]  # all but the genesis, which came before the listener
    assert b'"type":"checkpoint"' in b"".join(seen)


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["write", "fsync"])
async def test_enospc_fails_futures_keeps_records_and_recovers(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey], failing: str
) -> None:
    files = RecordingFiles()
    writer = await AuditWriter.open(config(tmp_path), key, files=files)
    await put(writer, {"n": 0})
    files.fail = failing
    refused = [writer.submit("access", {"n": n}, durable=True) for n in range(1, 21)]
    for future in refused:
        assert future is not None
        with pytest.raises(AuditUnavailable):
            await future
    assert not writer.healthy
    await until(lambda: files.count(f"{failing}-failed") >= 3)  # it keeps retrying
    fast = writer.submit("access", {"n": 21}, durable=True)
    assert fast is not None and fast.done()  # while unhealthy: 503 at once, record kept
    files.writing.clear()
    files.gate.clear()  # hold the next attempt before it writes: the last one is over
    await until(files.writing.is_set)
    for path in segments(tmp_path / "audit"):  # nothing half-written stayed
        data = path.read_bytes()
        assert data.endswith(b"\n") and all(orjson.loads(x) for x in data.split(b"\n")[:-1])
    assert files.count("truncate") >= 3

    files.fail = None
    files.gate.set()
    await until(lambda: writer.healthy)
    last = writer.submit("access", {"n": 22}, durable=True)
    assert last is not None
    await last
    assert writer.stats["queued"] == 0 and int(writer.stats["failures"]) >= 3
    await writer.close()
    records = verify(tmp_path / "audit", keys)
    assert sorted(r["n"] for r in records if "n" in r) == list(range(23))


async def test_a_writer_that_cannot_write_its_first_record_starts_unhealthy(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    files = RecordingFiles()
    files.fail = "write"
    writer = await AuditWriter.open(config(tmp_path), key, files=files)
    assert not writer.healthy
    files.fail = None
    await until(lambda: writer.healthy)
    await writer.close()
    assert types(verify(tmp_path / "audit", keys)) == ["genesis", "chain.closed", "checkpoint"]


async def test_close_gives_up_when_the_disk_never_comes_back(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    files = RecordingFiles()
    writer = await AuditWriter.open(config(tmp_path), key, files=files)
    files.fail = "fsync"
    lost = writer.submit("access", {"n": 1})
    await writer.close(give_up_after=0.2)
    assert lost is not None and lost.done()  # nobody waits forever
    again = await AuditWriter.open(config(tmp_path), key)  # the lock was released
    await again.close()


# -- restarts ----------------------------------------------------------------------------------


async def test_restart_after_a_clean_stop_continues_the_chain(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    for n in range(3):
        writer = await AuditWriter.open(config(tmp_path), key)
        await put(writer, {"n": n})
        await writer.close()
    records = verify(tmp_path / "audit", keys)
    reopened = [r for r in records if r["type"] == "chain.reopened"]
    assert [r["after"] for r in reopened] == ["closed", "closed"]
    assert [r["seq"] for r in records] == list(range(len(records)))


async def test_restart_after_a_crash_says_so(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    writer = await AuditWriter.open(config(tmp_path), key)
    await put(writer, {"n": 0})
    shutil.copytree(tmp_path / "audit", tmp_path / "crashed")  # what a crash would leave
    await writer.close()

    crashed = config(tmp_path, dir=tmp_path / "crashed")
    writer = await AuditWriter.open(crashed, key)
    await writer.close()
    records = verify(tmp_path / "crashed", keys)
    assert types(records) == [
        "genesis", "access", "chain.reopened", "chain.closed", "checkpoint",
    ]  # fmt: skip
    assert records[2]["after"] == "crash"


@pytest.mark.parametrize("torn", [b'{"n":7,"origin":"gw1","prev":"ab', b"\x00" * 300 + b"\n"])
async def test_a_torn_last_line_is_cut_off_into_a_recovery_record(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey], torn: bytes
) -> None:
    writer = await AuditWriter.open(config(tmp_path), key)
    await put(writer, {"n": 0})
    await writer.close()
    segment = segments(tmp_path / "audit")[-1]
    size = segment.stat().st_size
    with segment.open("ab") as file:
        file.write(torn)

    writer = await AuditWriter.open(config(tmp_path), key)
    await writer.close()
    records = verify(tmp_path / "audit", keys)
    assert types(records)[-5:] == [
        "checkpoint", "recovery", "chain.reopened", "chain.closed", "checkpoint",
    ]  # fmt: skip
    recovery = records[-4]
    assert recovery["segment"] == segment.name and recovery["offset"] == size
    assert record.unb64(recovery["bytes"]) == torn and recovery["length"] == len(torn)
    assert records[-3]["after"] == "crash"


@pytest.mark.parametrize("offset", [0, 5])
async def test_an_empty_newest_segment_left_by_a_crash(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey], offset: int
) -> None:
    writer = await AuditWriter.open(config(tmp_path), key)
    await writer.close()
    following = len(verify(tmp_path / "audit", keys)) + offset  # right, or a wrong name
    empty = tmp_path / "audit" / f"gw1.{following:012d}.jsonl"
    empty.touch()
    writer = await AuditWriter.open(config(tmp_path), key)
    await writer.close()
    records = verify(tmp_path / "audit", keys)
    assert types(records)[-3:] == ["chain.reopened", "chain.closed", "checkpoint"]
    assert empty.exists() == (offset == 0)


async def test_a_torn_first_line_of_a_new_chain(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    (tmp_path / "audit").mkdir(mode=0o700)
    (tmp_path / "audit" / "gw1.000000000000.jsonl").write_bytes(b'{"key_id":"abc')
    writer = await AuditWriter.open(config(tmp_path), key)
    await writer.close()
    records = verify(tmp_path / "audit", keys)
    assert types(records) == ["genesis", "recovery", "chain.closed", "checkpoint"]
    assert record.unb64(records[1]["bytes"]) == b'{"key_id":"abc' and records[1]["offset"] == 0


async def test_a_second_writer_for_one_origin_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    writer = await AuditWriter.open(config(tmp_path), key)
    with pytest.raises(AuditUnavailable, match="another process"):
        await AuditWriter.open(config(tmp_path), key)
    other = await AuditWriter.open(config(tmp_path, origin="gw1-w1"), key)
    await other.close()
    await writer.close()


# -- keys --------------------------------------------------------------------------------------


async def test_a_new_key_is_announced_signed_by_the_previous_one(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    new, newer = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    for current, previous in ((key, []), (new, [Ed25519PrivateKey.generate(), key]), (new, [])):
        writer = await AuditWriter.open(config(tmp_path), current, previous_keys=previous)
        await writer.close()
    keys[key_id(public(new))] = public(new)
    records = verify(tmp_path / "audit", keys)
    rotated = [r for r in records if r["type"] == "key.rotated"]
    assert len(rotated) == 1  # not again when the key stays
    assert rotated[0]["previous_key_id"] == key_id(public(key))
    assert rotated[0]["key_id"] == key_id(public(new))
    assert types(records)[records.index(rotated[0]) + 1] == "chain.reopened"

    # Without the previous key at hand: announced unsigned; verifiers pin the new key.
    writer = await AuditWriter.open(config(tmp_path), newer)
    await writer.close()
    keys[key_id(public(newer))] = public(newer)
    last = [r for r in verify(tmp_path / "audit", keys) if r["type"] == "key.rotated"][-1]
    assert "sig" not in last and last["previous_key_id"] == key_id(public(new))


# -- segments, checkpoints, retention ----------------------------------------------------------


async def test_segments_rotate_at_the_size_limit(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    writer = await AuditWriter.open(config(tmp_path, segment_max_bytes=2000), key)
    for n in range(40):
        writer.submit("access", {"n": n, "pad": "x" * 100})
        if n % 7 == 0:
            await writer.flush()
    await writer.close()
    files = segments(tmp_path / "audit")
    assert len(files) > 3
    assert files[0].name == "gw1.000000000000.jsonl"
    assert all(path.stat().st_size <= 2000 for path in files)
    assert writer.stats["segment"] == files[-1].name
    records = verify(tmp_path / "audit", keys)  # names, seq and links across the files
    assert sorted(r["n"] for r in records if "n" in r) == list(range(40))


async def test_checkpoint_every_n_records(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    writer = await AuditWriter.open(config(tmp_path, checkpoint_every=10), key, clock=Clock())
    for n in range(35):
        writer.submit("access", {"n": n})
    await writer.flush()
    await writer.close()
    records = verify(tmp_path / "audit", keys)
    checkpoints = [i for i, r in enumerate(records) if r["type"] == "checkpoint"]
    assert checkpoints[:3] == [10, 21, 32]  # genesis + 9 records, then 10 each


async def test_checkpoint_interval_while_busy_and_heartbeat_when_idle(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    clock = Clock()
    writer = await AuditWriter.open(config(tmp_path), key, clock=clock)

    def checkpoints() -> int:  # whole lines only: the writer may be appending right now
        data = b"".join(path.read_bytes() for path in segments(tmp_path / "audit"))
        return sum(b'"type":"checkpoint"' in line for line in data.split(b"\n")[:-1])

    writer.submit("access", {"n": 0})
    await writer.flush()
    assert checkpoints() == 0
    clock.advance(1.0)  # checkpoint_interval, with records since the last checkpoint
    await writer.flush()
    assert checkpoints() == 1
    clock.advance(59.0)
    await writer.flush()
    assert checkpoints() == 1  # idle, the heartbeat is not due yet
    clock.advance(1.0)
    await until(lambda: checkpoints() == 2)  # the heartbeat, by the writer's own timer
    clock.advance(60.0)
    await writer.flush()
    assert checkpoints() == 3
    await writer.close()
    heartbeats = [r for r in verify(tmp_path / "audit", keys) if r["type"] == "checkpoint"]
    assert [r["ts"][11:19] for r in heartbeats[:3]] == ["14:13:21", "14:14:21", "14:15:21"]


async def test_retention_removes_old_segments_after_listeners_saw_them(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    clock = Clock()
    settings = config(tmp_path, segment_max_bytes=1500, retention=86400.0)
    writer = await AuditWriter.open(settings, key, clock=clock)
    seen: set[int] = set()
    writer.add_listener(lambda lines: seen.update(orjson.loads(x)["seq"] for x in lines))
    for n in range(30):
        writer.submit("access", {"n": n, "pad": "x" * 100})
        await writer.flush()
    old = segments(tmp_path / "audit")[:-1]
    assert len(old) >= 3
    clock.advance(3600.0)  # the hourly check: nothing is old enough
    await writer.flush()
    assert segments(tmp_path / "audit")[:-1] == old
    clock.advance(86400.0 + 1)
    await writer.flush()
    kept = segments(tmp_path / "audit")
    assert not set(old) & set(kept)
    await writer.close()

    records = verify(tmp_path / "audit", keys)
    removed = [r for r in records if r["type"] == "retention.removed"]
    assert [r["segment"] for r in removed][: len(old)] == [p.name for p in old]
    assert removed[0]["first_seq"] == 0
    for a, b in itertools.pairwise(removed):
        assert b["first_seq"] == a["last_seq"] + 1
    assert set(range(1, removed[-1]["last_seq"] + 1)) <= seen  # handed on before removal


async def test_retention_runs_at_start(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    clock = Clock()
    settings = config(tmp_path, segment_max_bytes=1000, retention=86400.0)
    writer = await AuditWriter.open(settings, key, clock=clock)
    for n in range(10):
        writer.submit("access", {"n": n, "pad": "x" * 100})
        await writer.flush()
    await writer.close()
    clock.advance(2 * 86400.0)
    writer = await AuditWriter.open(settings, key, clock=clock)
    await writer.close()
    records = verify(tmp_path / "audit", keys)
    removed = [r for r in records if r["type"] == "retention.removed"]
    assert removed and removed[0]["first_seq"] == 0
    assert records[0]["seq"] == removed[-1]["last_seq"] + 1  # all before it were old
    assert types(records)[-len(removed) - 3 :] == [
        "chain.reopened", *["retention.removed"] * len(removed), "chain.closed", "checkpoint",
    ]  # fmt: skip


# -- the queue ---------------------------------------------------------------------------------


async def test_anonymous_records_are_dropped_first_near_full(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    files = RecordingFiles()
    settings = config(tmp_path, queue_max=100, reserved=20)
    writer = await AuditWriter.open(settings, key, files=files)
    files.gate.clear()
    files.writing.clear()
    try:
        held = writer.submit("access", {"n": 0})  # its batch waits in write()
        await until(files.writing.is_set)
        accepted = [writer.submit("access", {"n": n}, anonymous=True) for n in range(1, 80)]
        assert all(f is not None for f in accepted) and writer.stats["queued"] == 80
        assert writer.submit("access", {"n": -1}, anonymous=True) is None
        signed_in = [writer.submit("access", {"n": n}) for n in range(80, 100)]
        assert all(f is not None and not f.done() for f in signed_in)
        refused = writer.submit("access", {"n": -2})
        assert refused is not None and refused.done()
        with pytest.raises(AuditUnavailable):
            await refused
        assert writer.stats["dropped"] == 2
    finally:
        files.gate.set()
    assert held is not None
    await asyncio.gather(held, *[f for f in accepted + signed_in if f is not None])
    await writer.close()
    assert writer.stats["queued"] == 0
    records = verify(tmp_path / "audit", keys)
    assert sorted(r["n"] for r in records if "n" in r) == list(range(100))


async def test_close_is_idempotent_and_refuses_later_records(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    writer = await AuditWriter.open(config(tmp_path), key)
    writer.submit("access", {"n": 0})
    await asyncio.gather(writer.close(), writer.close())
    await writer.close()
    late = writer.submit("access", {"n": 1})
    assert late is not None
    with pytest.raises(AuditUnavailable):
        await late
    assert types(verify(tmp_path / "audit", keys))[-3:] == ["access", "chain.closed", "checkpoint"]


# -- origin ------------------------------------------------------------------------------------


def test_origin_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert origin_for("gw1") == "gw1"
    assert origin_for("gw1", 2) == "gw1-w2"
    monkeypatch.setattr(socket, "gethostname", lambda: "..web 01!.example")
    assert origin_for(None) == "web-01-.example"
    assert origin_for(None, 1) == "web-01-.example-w1"
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert origin_for(None) == "gateway"


def test_config_from_settings(tmp_path: Path) -> None:
    audit = Audit(dir=tmp_path, checkpoint_every=5, segment_max_bytes=4096)
    made = WriterConfig.from_settings(audit, "gw9")
    assert (made.dir, made.origin, made.checkpoint_every) == (tmp_path, "gw9", 5)
    assert made.segment_max_bytes == 4096 and made.retention == audit.retention


# -- a real crash ------------------------------------------------------------------------------

CHILD = """
import asyncio, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gateway.audit.writer import AuditWriter, WriterConfig

async def main():
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(sys.argv[2]))
    config = WriterConfig(Path(sys.argv[1]), "child", 50, 0.01, 60.0, 512 * 1024, 1e9)
    writer = await AuditWriter.open(config, key)
    print("ready", flush=True)
    n, pad = 0, "x" * 30000
    while True:
        futures = [writer.submit("access", {"n": n + i, "pad": pad}) for i in range(40)]
        n += 40
        await futures[-1]

asyncio.run(main())
"""


async def test_sigkill_mid_stream_then_the_chain_continues(
    tmp_path: Path, key: Ed25519PrivateKey, keys: dict[str, Ed25519PublicKey]
) -> None:
    directory = tmp_path / "audit"
    secret = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), secret.hex()],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert await asyncio.to_thread(child.stdout.readline) == b"ready\n"

        def written() -> int:
            return sum(p.stat().st_size for p in directory.glob("child.*.jsonl"))

        await until(lambda: written() > 3 * 2**20, seconds=60)
    finally:
        child.send_signal(signal.SIGKILL)
        await asyncio.to_thread(child.wait)
        assert child.stdout is not None
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    config_ = WriterConfig(directory, "child", 50, 0.01, 60.0, 512 * 1024, 1e9)
    writer = await AuditWriter.open(config_, key)
    await put(writer, {"n": -1})
    await writer.close()
    records = verify(directory, keys, origin="child")
    kinds = types(records)
    assert kinds.count("chain.reopened") == 1 and kinds[-2:] == ["chain.closed", "checkpoint"]
    reopened = kinds.index("chain.reopened")
    # the record written after the restart (a timed checkpoint may come between)
    assert [k for k in kinds[reopened + 1 : -2] if k != "checkpoint"] == ["access"]
    assert records[reopened]["after"] == "crash"
    if kinds[reopened - 1] == "recovery":  # the kill tore a line
        recovery = records[reopened - 1]
        assert len(record.unb64(recovery["bytes"])) == recovery["length"] > 0
    numbers = [r["n"] for r in records[:reopened] if "n" in r]
    assert numbers == list(range(len(numbers))) and len(numbers) > 40
