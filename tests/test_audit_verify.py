"""`gateway audit verify`: untouched logs pass; each kind of tampering is named, with its seq."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.record import GENESIS_PREV, b64, digest, line, signed_bytes
from gateway.audit.verify import OriginReport, VerifyError, verify
from gateway.cli import main
from gateway.keyfiles import generate, key_id, load_private_key, load_public_key

T0 = 1795694067.0  # 2026-11-26T11:54:27Z
TORN = b'{"v":1,"origin":"gw1","seq":'  # what a crash left of a line


@dataclass(frozen=True)
class Key:
    private: Ed25519PrivateKey
    public_file: Path

    @property
    def id(self) -> str:
        return key_id(self.private.public_key())

    @property
    def raw(self) -> str:
        public = self.private.public_key()
        return b64(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[Key]:
    """Three audit keys made by `gateway keys generate`'s code: old, new, and a stranger's."""
    made = []
    for n in range(3):
        directory = tmp_path_factory.mktemp(f"keys{n}")
        generate(directory)
        private = load_private_key(directory / "audit-ed25519.pem", "ed25519")
        made.append(Key(private, directory / "audit-ed25519.pub.pem"))
    return made


class Chain:
    """A test-only writer of one origin, from record.py's functions and docs/audit-log.md."""

    def __init__(self, directory: Path, origin: str, key: Key, every: int = 4) -> None:
        self.directory, self.origin, self.key, self.every = directory, origin, key, every
        self.seq, self.prev, self.ts, self.unsigned = 0, GENESIS_PREV, T0, 0
        self.types: dict[int, str] = {}
        self.checkpoints = 0
        self.segment = self.new_segment()
        self.write("genesis", key_id=key.id, public_key=key.raw)

    def new_segment(self) -> Path:
        self.segment = self.directory / f"{self.origin}.{self.seq:012d}.jsonl"
        return self.segment

    def make(self, type: str, **fields: Any) -> bytes:
        return line(fields, origin=self.origin, seq=self.seq, ts=self.ts, type=type, prev=self.prev)

    def append(self, data: bytes) -> int:
        with self.segment.open("ab") as file:
            file.write(data + b"\n")
        record = orjson.loads(data)
        self.types[self.seq] = record["type"]
        self.checkpoints += record["type"] == "checkpoint"
        self.unsigned = 0 if record["type"] == "checkpoint" else self.unsigned + 1
        self.seq, self.prev, self.ts = self.seq + 1, digest(data), self.ts + 0.25
        return self.seq - 1

    def write(self, type: str, **fields: Any) -> int:
        return self.append(self.make(type, **fields))

    def signed(self, type: str, by: Key, **fields: Any) -> int:
        sig = b64(by.private.sign(signed_bytes(orjson.loads(self.make(type, **fields)))))
        return self.write(type, **fields, sig=sig)

    def event(self, n: int = 1) -> None:
        """`n` access records, with a checkpoint every `every` records."""
        for _ in range(n):
            self.write("access", request_id=f"r{self.seq}", path=f"/page/{self.seq}")
            if self.unsigned >= self.every:
                self.checkpoint()

    def checkpoint(self, by: Key | None = None) -> int:
        by = by or self.key
        return self.signed("checkpoint", by, head=self.prev, count=self.seq, key_id=by.id)

    def close(self) -> None:
        self.write("chain.closed", records=self.seq)
        self.checkpoint()

    def reopen(self, after: str, key: Key | None = None) -> int:
        named = key or self.key
        return self.write("chain.reopened", key_id=named.id, public_key=named.raw, after=after)

    def rotate(self, new: Key, by: Key | None = None) -> int:
        by, old = by or self.key, self.key
        self.key = new
        fields = {"key_id": new.id, "public_key": new.raw, "previous_key_id": old.id}
        return self.signed("key.rotated", by, **fields)

    def crash(self, torn: bytes) -> None:
        """A process dies mid-line; the next one cuts the torn line off and says so."""
        with self.segment.open("ab") as file:
            file.write(torn)
        data = self.segment.read_bytes()
        offset = len(data) - len(torn)
        self.segment.write_bytes(data[:offset])
        fields = {"segment": self.segment.name, "offset": offset, "length": len(torn)}
        self.write("recovery", bytes=b64(torn), **fields)
        self.reopen("crash")


@dataclass
class Log:
    directory: Path
    main: Chain  # gw1: segments, a restart, a key rotation, a crash and its recovery
    worker: Chain  # gw1-w1: short and simple


def build(directory: Path, keys: list[Key]) -> Log:
    directory.mkdir(exist_ok=True)
    gw1 = Chain(directory, "gw1", keys[0])
    gw1.event(9)
    gw1.new_segment()
    gw1.event(6)
    gw1.close()
    gw1.reopen("closed")
    gw1.event(2)
    gw1.rotate(keys[1])
    gw1.event(5)
    gw1.new_segment()
    gw1.event(3)
    gw1.crash(TORN)
    gw1.event(6)
    gw1.close()
    worker = Chain(directory, "gw1-w1", keys[0])
    worker.event(5)
    worker.close()
    return Log(directory, gw1, worker)


@pytest.fixture
def log(tmp_path: Path, keys: list[Key]) -> Log:
    return build(tmp_path / "audit", keys)


def run(
    capsys: pytest.CaptureFixture[str], directory: Path, *keys: Key, live: bool = False
) -> tuple[int, list[str]]:
    argv = ["audit", "verify", str(directory), "--key", *(str(k.public_file) for k in keys)]
    status = main([*argv, "--live"] if live else argv)
    out, err = capsys.readouterr()
    assert err == ""
    return status, out.splitlines()


def ok_line(chain: Chain) -> str:
    last = max(seq for seq, type in chain.types.items() if type == "checkpoint")
    records = f"{chain.seq} records, {chain.checkpoints} checkpoints"
    return f"OK: origin {chain.origin}, {records}, last signed seq {last}"


def only(reports: list[OriginReport], origin: str) -> OriginReport:
    return next(report for report in reports if report.origin == origin)


# -- editing a log as an attacker (or a crash) would ------------------------------------------


def find(log: Log, seq: int, origin: str = "gw1") -> tuple[Path, int]:
    """The segment and line index of a record."""
    for path in sorted(log.directory.glob(f"{origin}.*.jsonl")):
        for index, text in enumerate(path.read_bytes().splitlines()):
            if orjson.loads(text)["seq"] == seq:
                return path, index
    raise AssertionError(f"no seq {seq}")


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def save(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(item + b"\n" for item in lines))


def edit(log: Log, seq: int, change: Callable[[bytes], bytes]) -> None:
    path, index = find(log, seq)
    lines = lines_of(path)
    lines[index] = change(lines[index])
    save(path, lines)


def middle_access(log: Log, segment: int = 1) -> int:
    """An access record in the middle of gw1's `segment`, not next to a checkpoint."""
    path = sorted(log.directory.glob("gw1.*.jsonl"))[segment]
    seqs = [orjson.loads(text)["seq"] for text in lines_of(path)]
    types = log.main.types
    return next(
        seq
        for seq in seqs[2:-2]
        if {types[seq - 1], types[seq], types[seq + 1], types[seq + 2]} == {"access"}
    )


def first_of(log: Log, type: str, after: int = 0) -> int:
    return min(seq for seq, kind in log.main.types.items() if kind == type and seq > after)


# -- untouched ---------------------------------------------------------------------------------


def test_untouched_log_with_rotation_restart_recovery_and_two_origins_is_ok(
    log: Log, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run(capsys, log.directory, keys[0])
    recovery = first_of(log, "recovery")
    assert status == 0, out
    assert out == [
        ok_line(log.main),
        f"note: origin gw1: recovery record at seq {recovery} ({len(TORN)} bytes of a torn line "
        "kept)",
        ok_line(log.worker),
    ]
    assert len(list(log.directory.glob("gw1.*.jsonl"))) == 3


def test_the_core_reports_each_origin_as_data(log: Log, keys: list[Key]) -> None:
    reports = verify([log.directory], [load_public_key(keys[0].public_file, "ed25519")])
    assert [report.origin for report in reports] == ["gw1", "gw1-w1"]
    gw1 = reports[0]
    assert gw1.ok and gw1.records == log.main.seq and gw1.checkpoints == log.main.checkpoints
    assert gw1.last_signed_seq == log.main.seq - 1 and gw1.unsigned == 0
    assert gw1.recoveries == ((first_of(log, "recovery"), len(TORN)),)


def test_origins_may_be_in_several_directories(
    tmp_path: Path, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    chains = [Chain(one, "a", keys[0]), Chain(two, "b", keys[0])]
    for chain in chains:
        chain.event(3)
        chain.close()
    status = main(["audit", "verify", str(one), str(two), "--key", str(keys[0].public_file)])
    out, _ = capsys.readouterr()
    assert status == 0
    assert out.splitlines() == [ok_line(chain) for chain in chains]


def test_both_keys_pinned_is_ok_too(
    log: Log, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run(capsys, log.directory, keys[0], keys[1])
    assert status == 0 and out[0] == ok_line(log.main)


# -- tampering: one parametrized table ---------------------------------------------------------


def change_a_byte(log: Log) -> tuple[int, str]:
    seq = middle_access(log)
    edit(log, seq, lambda text: text.replace(b"/page/", b"/pagE/"))
    return seq, "modified"


def change_the_record_before_a_checkpoint(log: Log) -> tuple[int, str]:
    seq = first_of(log, "checkpoint", after=2) - 1
    edit(log, seq, lambda text: text.replace(b"/page/", b"/pagE/"))
    return seq, "modified"


def delete_a_record(log: Log) -> tuple[int, str]:
    seq = middle_access(log)
    path, index = find(log, seq)
    save(path, [text for n, text in enumerate(lines_of(path)) if n != index])
    return seq, "missing"


def insert_a_record(log: Log) -> tuple[int, str]:
    """A forged record that links to the one before it and takes its place's seq."""
    seq = middle_access(log)
    path, index = find(log, seq)
    lines = lines_of(path)
    forged = line(
        {"request_id": "forged", "path": "/nothing-to-see"},
        origin="gw1",
        seq=seq,
        ts=T0,
        type="access",
        prev=digest(lines[index - 1]),
    )
    save(path, [*lines[:index], forged, *lines[index:]])
    return seq, "inserted"


def copy_a_record(log: Log) -> tuple[int, str]:
    """An old record's line again, further on."""
    seq = middle_access(log)
    old, old_index = find(log, 3)
    path, index = find(log, seq)
    lines = lines_of(path)
    save(path, [*lines[:index], lines_of(old)[old_index], *lines[index:]])
    return seq, "inserted"


def swap_two_records(log: Log) -> tuple[int, str]:
    seq = middle_access(log)
    path, index = find(log, seq)
    lines = lines_of(path)
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    save(path, lines)
    return seq, "reordered"


def move_a_record_later(log: Log) -> tuple[int, str]:
    seq = middle_access(log)
    path, index = find(log, seq)
    lines = lines_of(path)
    moved = lines.pop(index)
    lines.insert(index + 2, moved)
    save(path, lines)
    return seq, "reordered"


def tear_the_last_line(log: Log) -> tuple[int, str]:
    path = sorted(log.directory.glob("gw1.*.jsonl"))[-1]
    data = path.read_bytes()
    last = data[:-1].rindex(b"\n") + 1
    path.write_bytes(data[: last + (len(data) - last) // 2])
    return log.main.seq - 1, "torn record"


def garble_a_middle_line(log: Log) -> tuple[int, str]:
    seq = middle_access(log)
    edit(log, seq, lambda text: text[: len(text) // 2])
    return seq, "torn record"


def delete_a_middle_segment(log: Log) -> tuple[int, str]:
    middle = sorted(log.directory.glob("gw1.*.jsonl"))[1]
    middle.unlink()
    return int(middle.name.split(".")[1]), "gap between segments"


def resign_a_checkpoint_with_a_stranger_key(log: Log, stranger: Key) -> tuple[int, str]:
    seq = first_of(log, "checkpoint", after=5)

    def resign(text: bytes) -> bytes:
        record = orjson.loads(text)
        record["key_id"] = stranger.id
        record["sig"] = b64(stranger.private.sign(signed_bytes(record)))
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)

    edit(log, seq, resign)
    return seq, "unknown key"


def corrupt_a_checkpoint_sig(log: Log) -> tuple[int, str]:
    seq = first_of(log, "checkpoint", after=5)

    def corrupt(text: bytes) -> bytes:
        record = orjson.loads(text)
        sig = record["sig"]
        record["sig"] = ("B" if sig[0] == "A" else "A") + sig[1:]
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)

    edit(log, seq, corrupt)
    return seq, "bad signature"


def cut_the_chain_before_chain_closed(log: Log) -> tuple[int, str]:
    path = sorted(log.directory.glob("gw1.*.jsonl"))[-1]
    save(path, lines_of(path)[:-2])
    return log.main.seq - 2, "chain ended without chain.closed"


def cut_the_final_checkpoint(log: Log) -> tuple[int, str]:
    path = sorted(log.directory.glob("gw1.*.jsonl"))[-1]
    save(path, lines_of(path)[:-1])
    return log.main.seq - 1, "chain ended without chain.closed"


def delete_the_first_segment(log: Log) -> tuple[int, str]:
    sorted(log.directory.glob("gw1.*.jsonl"))[0].unlink()
    return 0, "missing"


def append_after_chain_closed(log: Log) -> tuple[int, str]:
    """Records linked after the final checkpoint, without a restart."""
    log.main.event(1)
    return log.main.seq - 1, "inserted"


TAMPERING: list[Callable[..., tuple[int, str]]] = [
    change_a_byte,
    change_the_record_before_a_checkpoint,
    delete_a_record,
    insert_a_record,
    copy_a_record,
    swap_two_records,
    move_a_record_later,
    tear_the_last_line,
    garble_a_middle_line,
    delete_a_middle_segment,
    resign_a_checkpoint_with_a_stranger_key,
    corrupt_a_checkpoint_sig,
    cut_the_chain_before_chain_closed,
    cut_the_final_checkpoint,
    delete_the_first_segment,
    append_after_chain_closed,
]


@pytest.mark.parametrize("tamper", TAMPERING, ids=[t.__name__ for t in TAMPERING])
def test_tampering_fails_naming_the_origin_the_first_bad_seq_and_what(
    tamper: Callable[..., tuple[int, str]],
    log: Log,
    keys: list[Key],
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = (log, keys[2]) if tamper is resign_a_checkpoint_with_a_stranger_key else (log,)
    seq, kind = tamper(*args)
    status, out = run(capsys, log.directory, keys[0])
    assert status == 1
    assert out[0].startswith(f"FAIL: origin gw1: seq {seq}: {kind}: "), out
    assert out[1:] == [ok_line(log.worker)]  # the other origin is still judged on its own


# -- keys --------------------------------------------------------------------------------------


def test_a_log_signed_by_a_key_not_pinned_fails_at_its_genesis(
    log: Log, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run(capsys, log.directory, keys[2])
    assert status == 1
    assert out[0].startswith("FAIL: origin gw1: seq 0: unknown key: genesis names key ")
    assert out[1].startswith("FAIL: origin gw1-w1: seq 0: unknown key: ")


def test_a_rotation_not_signed_by_the_old_key_needs_the_new_key_pinned(
    tmp_path: Path, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path, "gw1", keys[0])
    chain.event(2)
    rotated = chain.rotate(keys[1], by=keys[2])  # announced, but signed by a stranger
    chain.event(3)
    chain.close()
    status, out = run(capsys, tmp_path, keys[0])
    assert status == 1
    assert out == [f"FAIL: origin gw1: seq {rotated}: bad signature: " + out[0].split(": ", 4)[4]]
    assert "does not verify with the previous key" in out[0]
    status, out = run(capsys, tmp_path, keys[0], keys[1])
    assert (status, out) == (0, [ok_line(chain)])


def test_a_checkpoint_by_the_old_key_after_a_rotation_is_refused(
    tmp_path: Path, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path, "gw1", keys[0])
    chain.event(2)
    chain.rotate(keys[1])
    chain.event(1)
    stale = chain.checkpoint(by=keys[0])  # pinned, but no longer the chain's key
    chain.close()
    status, out = run(capsys, tmp_path, keys[0])
    assert status == 1
    assert out[0].startswith(f"FAIL: origin gw1: seq {stale}: unknown key: checkpoint at ")


def test_a_restart_with_a_new_key_rotated_in_by_the_old_one_is_ok(
    tmp_path: Path, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path, "gw1", keys[0])
    chain.event(3)
    chain.close()
    chain.reopen("closed", key=keys[1])  # names the new key first, then rotates to it
    chain.rotate(keys[1])
    chain.event(3)
    chain.close()
    assert run(capsys, tmp_path, keys[0]) == (0, [ok_line(chain)])


def test_a_restart_naming_a_key_nobody_vouches_for_is_an_unknown_key(
    tmp_path: Path, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path, "gw1", keys[0])
    chain.event(3)
    chain.close()
    reopened = chain.reopen("closed", key=keys[2])
    chain.key = keys[2]
    chain.event(3)
    chain.close()
    status, out = run(capsys, tmp_path, keys[0])
    assert status == 1
    assert out[0].startswith(f"FAIL: origin gw1: seq {reopened}: unknown key: chain.reopened")


# -- live logs, unsigned records, retention ----------------------------------------------------


def test_live_accepts_an_open_chain_and_a_half_written_line_with_warnings(
    tmp_path: Path, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path, "gw1", keys[0])
    chain.event(6)  # genesis and 3 access records, a checkpoint (seq 4), 3 more
    with chain.segment.open("ab") as file:
        file.write(b'{"v":1,"origin":"gw1"')
    status, out = run(capsys, tmp_path, keys[0], live=True)
    assert status == 0
    assert out == [
        "OK: origin gw1, 8 records, 1 checkpoints, last signed seq 4",
        "warning: origin gw1: 3 records after the last checkpoint",
        "warning: origin gw1: chain still open (--live): no chain.closed yet",
        "warning: origin gw1: a last line of 21 bytes without its newline was not verified "
        "(--live: still being written?)",
    ]
    status, out = run(capsys, tmp_path, keys[0])
    assert status == 1 and out[0].startswith("FAIL: origin gw1: seq 8: torn record: ")


def test_a_changed_last_record_counts_as_after_the_last_checkpoint(
    tmp_path: Path, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path, "gw1", keys[0])
    chain.event(6)
    lines = lines_of(chain.segment)
    lines[-1] = lines[-1].replace(b"/page/", b"/pagE/")
    save(chain.segment, lines)  # nothing links to it, and no checkpoint signs it
    status, out = run(capsys, tmp_path, keys[0], live=True)
    assert status == 0
    assert out[1] == "warning: origin gw1: 3 records after the last checkpoint"


def test_segments_removed_by_retention_are_accounted_for(
    log: Log, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    first = sorted(log.directory.glob("gw1.*.jsonl"))[0]
    second = sorted(log.directory.glob("gw1.*.jsonl"))[1]
    start = int(second.name.split(".")[1])
    first.unlink()
    log.main.reopen("closed")
    log.main.write("retention.removed", segment=first.name, first_seq=0, last_seq=start - 1)
    log.main.close()
    status, out = run(capsys, log.directory, keys[0])
    assert status == 0, out
    removed = log.main.seq - start
    assert out[0].startswith(f"OK: origin gw1, {removed} records, ")
    assert f"note: origin gw1: seqs 0 to {start - 1} removed by retention" in out


def test_a_renamed_segment_of_another_origin_is_inserted(
    log: Log, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    (log.directory / "gw1-w1.000000000000.jsonl").rename(log.directory / "gw2.000000000000.jsonl")
    status, out = run(capsys, log.directory, keys[0])
    assert status == 1
    assert out[-1].startswith("FAIL: origin gw2: seq 0: inserted: ")
    assert "a record of origin 'gw1-w1'" in out[-1]


def test_log_text_cannot_reach_the_terminal(
    log: Log, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    def hostile(text: bytes) -> bytes:
        record = orjson.loads(text)
        record["origin"] = "gw1\x1b[2J\u009b31m"
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)

    edit(log, 3, hostile)
    status, out = run(capsys, log.directory, keys[0])
    assert status == 1 and "FAIL: origin gw1: seq 3: modified: " in out[0]
    assert "\x1b" not in out[0] and "\u009b" not in out[0]


# -- usage errors ------------------------------------------------------------------------------


def usage(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["audit", "verify", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("gateway: ") and err.count("\n") == 1, err
    return err


def test_without_a_pinned_key_it_refuses_to_verify(
    log: Log, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "a log that names its own key proves nothing" in usage(capsys, str(log.directory))


def test_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, log: Log, keys: list[Key], capsys: pytest.CaptureFixture[str]
) -> None:
    key = str(keys[0].public_file)
    assert "no such directory" in usage(capsys, str(tmp_path / "nowhere"), "--key", key)
    (tmp_path / "empty").mkdir()
    assert "no audit segments" in usage(capsys, str(tmp_path / "empty"), "--key", key)
    assert "no such key file" in usage(capsys, str(log.directory), "--key", str(tmp_path / "k"))
    es256 = keys[0].public_file.parent / "assertion-es256.pub.pem"
    assert "not an Ed25519 key" in usage(capsys, str(log.directory), "--key", str(es256))
    (log.directory / "notes.jsonl").write_text("{}\n")
    assert "not a segment name" in usage(capsys, str(log.directory), "--key", key)
    assert "needs DIR... before --key" in usage(capsys, "--key", key, str(log.directory))
    for argv in (["audit"], ["audit", "frobnicate"], ["audit", "verify", "--frobnicate"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_core_refuses_no_keys_and_names_a_stray_file(log: Log) -> None:
    with pytest.raises(VerifyError, match="proves nothing"):
        verify([log.directory], [])
    (log.directory / "gw1.7.jsonl").write_text("")
    with pytest.raises(VerifyError, match="not a segment name"):
        verify([log.directory], [Ed25519PrivateKey.generate().public_key()])
