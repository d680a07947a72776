"""`gateway audit tail`: reading every origin's segments, following them, checking the chain."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import orjson
import pytest

from gateway.audit import record
from gateway.audit.tail import Filter, Reader, human, inert, wants_colour
from gateway.cli import main

REPO = Path(__file__).resolve().parent.parent
T0 = 1795694067.0  # 2026-11-26T11:54:27Z


class Chain:
    """A test-only writer: one origin's segments, lines by record.line(), prev by digest()."""

    def __init__(self, directory: Path, origin: str, ts: float = T0) -> None:
        self.directory, self.origin = directory, origin
        self.seq, self.prev, self.ts = 0, record.GENESIS_PREV, ts
        self.path = self.rotate()
        self.write("genesis", key_id="k1", public_key="pk")

    def rotate(self) -> Path:
        self.path = self.directory / f"{self.origin}.{self.seq:012d}.jsonl"
        self.path.touch()
        return self.path

    def write(self, type: str, **fields: Any) -> bytes:
        chain = {"origin": self.origin, "seq": self.seq, "ts": self.ts, "prev": self.prev}
        return self.append(record.line(fields, type=type, **chain))

    def write_unescaped(self, type: str, **fields: Any) -> bytes:
        """A line a correct writer never makes: strings as they came, C1 and bidi included."""
        chain = {"origin": self.origin, "seq": self.seq, "ts": record.timestamp(self.ts)}
        return self.append(record.canonical({**fields, **chain, "type": type, "prev": self.prev}))

    def append(self, line: bytes) -> bytes:
        write(self.path, line + b"\n")
        self.seq, self.prev, self.ts = self.seq + 1, record.digest(line), self.ts + 1.0
        return line


def access(chain: Chain, user: str | None, decision: str = "allow", **fields: Any) -> bytes:
    values = {"request_id": f"r{chain.seq}", "route": "app", "method": "GET", "path": "/"}
    values.update(user=user, decision=decision, reason="ok")
    values.update(fields)
    return chain.write("access", **values)


def tail(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    status = main(["audit", "tail", *args])
    out, err = capsys.readouterr()
    return status, [line for line in out.splitlines() if not line.startswith("-- ")], err


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def write(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)


# -- the reader ------------------------------------------------------------------------------


def test_reader_reads_each_origin_in_order_across_segments(tmp_path: Path) -> None:
    a, b = Chain(tmp_path, "gw1"), Chain(tmp_path, "gw2")
    access(a, "alice")
    a.rotate()
    access(a, "bob")
    access(b, "carol")
    entries = list(Reader(tmp_path).read())
    expected = [("gw1", 0), ("gw1", 1), ("gw1", 2), ("gw2", 0), ("gw2", 1)]
    assert [(e.origin, e.seq) for e in entries] == expected
    assert all(e.problem is None and e.record is not None for e in entries)
    first = tmp_path / "gw1.000000000000.jsonl"
    assert [e.line for e in entries if e.origin == "gw1"] == lines_of(first) + lines_of(a.path)


def test_reader_takes_a_line_only_once_it_is_complete(tmp_path: Path) -> None:
    chain = Chain(tmp_path, "gw1")
    reader = Reader(tmp_path)
    assert len(list(reader.read())) == 1
    line = record.line({}, origin="gw1", seq=1, ts=T0, type="auth.login", prev=chain.prev)
    write(chain.path, line[:10])
    assert list(reader.read()) == []
    write(chain.path, line[10:] + b"\n")
    assert [(e.line, e.problem) for e in reader.read()] == [(line, None)]
    assert list(reader.read()) == []


def test_reader_moves_to_a_new_segment_without_missing_or_repeating(tmp_path: Path) -> None:
    chain = Chain(tmp_path, "gw1")
    reader = Reader(tmp_path)
    seen = [e.line for e in reader.read()]
    written = [access(chain, "alice")]
    line = record.line({}, origin="gw1", seq=2, ts=T0, type="auth.login", prev=chain.prev)
    write(chain.path, line[:10])
    seen += [e.line for e in reader.read()]
    write(chain.path, line[10:] + b"\n")
    chain.seq, chain.prev = 3, record.digest(line)
    written.append(line)
    chain.rotate()
    written += [access(chain, "carol"), access(chain, "dave")]
    entries = list(reader.read())
    assert all(e.problem is None for e in entries)
    assert seen[1:] + [e.line for e in entries] == written


def test_a_torn_line_cut_off_by_the_writer_is_never_seen(tmp_path: Path) -> None:
    chain = Chain(tmp_path, "gw1")
    access(chain, "alice")
    reader = Reader(tmp_path)
    assert len(list(reader.read())) == 2
    size = chain.path.stat().st_size
    write(chain.path, b'{"v":1,"origin":"gw1","se')  # the process died here
    assert list(reader.read()) == []
    with chain.path.open("r+b") as file:  # the next start cuts it off, then goes on
        file.truncate(size)
    recovery = chain.write("recovery", segment=chain.path.name, offset=size, length=26)
    assert [(e.line, e.problem) for e in reader.read()] == [(recovery, None)]


@pytest.mark.parametrize("rewritten", [False, True], ids=["cut", "cut-and-rewritten"])
def test_a_rolled_back_write_is_a_note_and_its_records_follow(
    tmp_path: Path, rewritten: bool
) -> None:
    chain = Chain(tmp_path, "gw1")
    access(chain, "alice")
    reader = Reader(tmp_path)
    assert len(list(reader.read())) == 2
    size, seq, prev = chain.path.stat().st_size, chain.seq, chain.prev
    access(chain, "bob")
    access(chain, "carol")
    assert [e.problem for e in reader.read()] == [None, None]
    with chain.path.open("r+b") as file:  # the fsync failed: the writer cuts the batch off
        file.truncate(size)
    chain.seq, chain.prev = seq, prev
    entries = list(reader.read()) if not rewritten else []
    again = [access(chain, "bob"), access(chain, "carol")]  # and writes it again
    entries += list(reader.read())
    assert [e.note for e in entries] == [
        "the last 2 record(s) read from gw1.000000000000.jsonl were cut off or rewritten "
        "(the writer does this to a failed write, then writes them again)",
        None,
        None,
    ]
    assert [(e.line, e.problem) for e in entries[1:]] == [(line, None) for line in again]


def test_a_record_changed_while_tailing_still_breaks_the_chain(tmp_path: Path) -> None:
    chain = Chain(tmp_path, "gw1")
    access(chain, "alice", path="/a")
    reader = Reader(tmp_path)
    assert len(list(reader.read())) == 2
    chain.path.write_bytes(chain.path.read_bytes().replace(b'"/a"', b'"/b"'))
    access(chain, "bob")
    entries = list(reader.read())
    assert entries[0].note is not None and entries[1].line.count(b'"/b"') == 1
    assert entries[2].problem == (
        "prev is not the hash of the line before it (modified, inserted or removed)"
    )


def test_a_torn_line_in_a_finished_segment_is_reported(tmp_path: Path) -> None:
    chain = Chain(tmp_path, "gw1")
    last = access(chain, "alice")
    write(chain.path, b'{"v":1,"orig')
    chain.rotate()
    access(chain, "bob")
    entries = list(Reader(tmp_path).read())
    assert [e.problem for e in entries[:2]] == [None, None]
    assert entries[2].seq == 2 and entries[2].line == b'{"v":1,"orig'
    assert entries[2].problem == "torn record at the end of gw1.000000000000.jsonl (12 bytes)"
    assert entries[3].problem is None and entries[3].record is not None  # prev: the last whole line
    assert entries[3].record["prev"] == record.digest(last)


def test_an_empty_segment_dropped_by_the_writer_is_stepped_over(tmp_path: Path) -> None:
    chain = Chain(tmp_path, "gw1")
    reader = Reader(tmp_path)
    assert len(list(reader.read())) == 1
    wrong = tmp_path / "gw1.000000000007.jsonl"
    wrong.touch()
    assert list(reader.read()) == []  # now reading the empty one
    wrong.unlink()  # a restart drops it and begins the segment of the next seq
    chain.rotate()
    written = access(chain, "alice")
    assert [(e.line, e.problem) for e in reader.read()] == [(written, None)]


def test_reader_starts_where_it_is_told_and_new_origins_from_their_start(tmp_path: Path) -> None:
    chain = Chain(tmp_path, "gw1")
    chain.rotate()
    access(chain, "alice")
    reader = Reader(tmp_path, start=lambda listed: len(listed) - 1)
    assert [e.seq for e in reader.read()] == [1]
    other = Chain(tmp_path, "gw2")
    other.rotate()
    access(other, "bob")
    assert [(e.origin, e.seq) for e in reader.read()] == [("gw2", 0), ("gw2", 1)]


# -- the chain -------------------------------------------------------------------------------


def test_a_modified_line_prints_chain_broken_and_the_tail_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path, "gw1")
    for user in ("alice", "bob", "carol", "dave"):
        access(chain, user, path=f"/{user}")
    chain.path.write_bytes(chain.path.read_bytes().replace(b'"/bob"', b'"/eve"'))
    status, out, _ = tail(capsys, str(tmp_path))
    assert status == 1
    broken = [line for line in out if line.startswith("!!")]
    assert broken == [
        "!! CHAIN BROKEN: origin gw1 at seq 3: prev is not the hash of the line before it "
        "(modified, inserted or removed)"
    ]
    assert out.index(broken[0]) == 3  # in place: after seq 2 (the modified one), before seq 3
    assert sum("/dave" in line for line in out) == 1


def test_missing_and_unreadable_records_are_named(tmp_path: Path) -> None:
    chain = Chain(tmp_path, "gw1")
    for user in ("alice", "bob", "carol"):
        access(chain, user)
    lines = lines_of(chain.path)
    chain.path.write_bytes(b"\n".join([lines[0], lines[1], lines[3], b"{not json"]) + b"\n")
    problems = [(e.seq, e.problem) for e in Reader(tmp_path).read() if e.problem]
    assert problems == [
        (
            3,
            "seq jumps from 1 to 3: 1 record(s) missing; prev is not the hash of the line "
            "before it (modified, inserted or removed)",
        ),
        (4, "not a JSON record (modified or torn)"),
    ]


def test_a_segment_whose_name_does_not_match_its_first_seq_is_named(tmp_path: Path) -> None:
    chain = Chain(tmp_path, "gw1")
    access(chain, "alice")
    chain.path.rename(tmp_path / "gw1.000000000005.jsonl")
    problems = [e.problem for e in Reader(tmp_path).read() if e.problem]
    assert problems == ["gw1.000000000005.jsonl starts at seq 0, not 5"]


# -- what is printed -------------------------------------------------------------------------


def test_records_of_every_origin_are_merged_by_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = Chain(tmp_path, "gw1", ts=T0), Chain(tmp_path, "gw2", ts=T0 + 0.5)
    for user in ("a1", "a2"):
        access(a, user)
    for user in ("b1", "b2"):
        access(b, user)
    status, out, err = tail(capsys, str(tmp_path))
    assert status == 0 and err == ""
    users = [line.split()[2] for line in out]
    assert users == ["-", "-", "a1", "b1", "a2", "b2"]
    assert [line.split()[1] for line in out] == ["gw1", "gw2", "gw1", "gw2", "gw1", "gw2"]


def test_human_lines_are_aligned_and_name_what_happened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path, "gw1")
    access(
        chain,
        "alice@example.com",
        decision="would-deny",
        reason="not-in-group",
        client_ip="10.0.0.7",
    )
    chain.write(
        "access.done", request_id="r1", status=200, bytes_in=0, bytes_out=512, duration_ms=8.4
    )
    chain.write("session.ended", user="bob", actor="ops-token", reason="admin revoke", session="h1")
    _, out, _ = tail(capsys, str(tmp_path))
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} gw1 {8}- {20}genesis +key_id=k1", out[0])
    assert out[1].endswith(
        "gw1        alice@example.com    would-deny   GET /  "
        "route=app reason=not-in-group client_ip=10.0.0.7 request_id=r1"
    )
    assert out[2].endswith(
        "gw1        -                    access.done  "
        "status=200 bytes_in=0 bytes_out=512 duration_ms=8.4 request_id=r1"
    )
    assert out[3].endswith(
        'bob                  session.ended actor=ops-token reason="admin revoke" session=h1'
    )
    assert len({line.index(" gw1 ") for line in out}) == 1


def test_decisions_are_coloured_only_when_asked() -> None:
    line = {"type": "access", "decision": "deny", "user": "\x1b[32mmallory", "ts": "x"}
    painted = human("gw1", line, colour=True)
    assert "\x1b[31mdeny        \x1b[0m" in painted
    assert "\x1b" not in human("gw1", line, colour=False)
    assert re.sub(r"\x1b\[(31|0)m", "", painted) == human("gw1", line, colour=False)


def test_colour_needs_a_terminal_and_no_NO_COLOR(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert wants_colour(Terminal())  # type: ignore[arg-type]
    monkeypatch.setenv("NO_COLOR", "1")
    assert not wants_colour(Terminal())  # type: ignore[arg-type]


def test_control_characters_are_printed_inert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = Chain(tmp_path, "gw1")
    evil = "/a\x1b[31mred\u009b2J\u202eexe.txt\u2028\x7f"
    chain.write_unescaped("access", user="eve\x1b]0;pwned\x07", path=evil, decision="deny")
    chain.write_unescaped("auth.login_failed", user_agent=evil, reason="bad-state")
    status, out, _ = tail(capsys, str(tmp_path))
    assert status == 0
    text = "\n".join(out)
    for raw in ("\x1b", "\u009b", "\u202e", "\u2028", "\x7f", "\x07"):
        assert raw not in text
    shown = "/a\\x1b[31mred\\u009b2J\\u202eexe.txt\\u2028\\x7f"
    assert out[1].endswith(f"eve\\x1b]0;pwned\\x07  deny         - {shown}")
    assert f"user_agent={shown}" in out[2]


def test_inert_escapes_every_invisible_or_controlling_character() -> None:
    assert inert("/plain/path?x=1 ok") == "/plain/path?x=1 ok"
    assert inert("a\tb\nc\x00\x9b\u200b\u2066\u2069\ufeff") == (
        "a\\x09b\\x0ac\\x00\\u009b\\u200b\\u2066\\u2069\\ufeff"
    )
    assert inert("héllo wörld 日本") == "héllo wörld 日本"


def test_last_n_records_of_each_origin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = Chain(tmp_path, "gw1"), Chain(tmp_path, "gw2")
    for n in range(5):
        access(a, f"a{n}")
        access(b, f"b{n}")
        if n == 2:
            a.rotate()
    _, out, _ = tail(capsys, str(tmp_path), "-n", "2")
    assert sorted(line.split()[2] for line in out) == ["a3", "a4", "b3", "b4"]
    _, out, _ = tail(capsys, str(tmp_path), "-n", "0")
    assert out == []


# -- filters ---------------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    chain = Chain(tmp_path, "gw1")
    access(chain, "Alice@Example.com", route="grafana")
    chain.write("access.done", request_id="r1", status=200, bytes_in=0, bytes_out=1, duration_ms=1)
    access(chain, "bob", decision="deny", route="admin")
    chain.write("access.done", request_id="r3", status=403, bytes_in=0, bytes_out=1, duration_ms=1)
    access(chain, "alice", decision="would-deny", route="admin")
    chain.write("auth.login", user="bob", session="h1")
    chain.write("admin.revoke", actor="ops", subject="alice@example.com", reason="left")
    return tmp_path


def shown(capsys: pytest.CaptureFixture[str], directory: Path, *args: str) -> list[str]:
    status, out, err = tail(capsys, str(directory), *args)
    assert status == 0 and err == ""
    return [f"{line.split()[2]} {line.split()[3]}" for line in out]


def test_filters(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert shown(capsys, mixed, "--user", "alice@EXAMPLE.com") == [
        "Alice@Example.com allow",
        "- access.done",  # its access record was shown
        "- admin.revoke",  # the subject
    ]
    assert shown(capsys, mixed, "--user", "alice") == ["alice would-deny"]
    assert shown(capsys, mixed, "--user", "Bob") == []  # not an email: exact
    assert shown(capsys, mixed, "--route", "admin") == [
        "bob deny",
        "- access.done",
        "alice would-deny",
    ]
    assert shown(capsys, mixed, "--decision", "deny") == ["bob deny", "- access.done"]
    assert shown(capsys, mixed, "--type", "access") == [
        "Alice@Example.com allow",
        "bob deny",
        "alice would-deny",
    ]
    assert shown(capsys, mixed, "--type", "access*") == [
        "Alice@Example.com allow",
        "- access.done",
        "bob deny",
        "- access.done",
        "alice would-deny",
    ]
    assert shown(capsys, mixed, "--type", "auth.*") == ["bob auth.login"]
    assert shown(capsys, mixed, "--user", "bob", "--type", "auth.*") == ["bob auth.login"]


def test_filter_type_prefix() -> None:
    assert Filter(type="auth.*").matches({"type": "auth.login"})
    assert not Filter(type="auth.*").matches({"type": "authz"})
    assert Filter(type="access").matches({"type": "access"})
    assert not Filter(type="access").matches({"type": "access.done"})


def test_bad_decision_or_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["audit", "tail", str(tmp_path), "--decision", "maybe"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["audit", "tail", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"gateway: {tmp_path / 'nowhere'}: not a directory\n"


# -- --json ----------------------------------------------------------------------------------


def test_json_passes_the_stored_bytes_through(
    mixed: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["audit", "tail", str(mixed), "--json"]) == 0
    out = capsysbinary.readouterr().out
    assert out == (mixed / "gw1.000000000000.jsonl").read_bytes()
    assert main(["audit", "tail", str(mixed), "--json", "--decision", "deny"]) == 0
    lines = capsysbinary.readouterr().out.splitlines()
    assert [orjson.loads(line)["type"] for line in lines] == ["access", "access.done"]


def test_json_reports_a_broken_chain_on_stderr(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    chain = Chain(tmp_path, "gw1")
    access(chain, "alice")
    access(chain, "bob")
    chain.path.write_bytes(chain.path.read_bytes().replace(b"alice", b"mallory"))
    assert main(["audit", "tail", str(tmp_path), "--json"]) == 1
    captured = capsysbinary.readouterr()
    assert len(captured.out.splitlines()) == 3
    assert captured.err.startswith(b"!! CHAIN BROKEN: origin gw1 at seq 2: prev is not")


# -- -f: a real process ----------------------------------------------------------------------


class Follower:
    """`gateway audit tail -f` as a process; its stdout lines arrive on a queue."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "gateway", "audit", "tail", *args]
        self.proc = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        assert self.proc.stdout is not None
        self._pump = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._pump.start()

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            self.lines.put(line.rstrip(b"\n"))

    def next(self, within: float) -> bytes:
        try:
            return self.lines.get(timeout=within)
        except queue.Empty:
            raise AssertionError(f"no line within {within} s") from None

    def stop(self) -> tuple[list[bytes], bytes]:
        """Ends the process; what it printed that was not taken yet, and its stderr."""
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._pump.join(timeout=10)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get_nowait())
        return rest, err


def test_follow_shows_each_record_within_a_second_across_rotation_and_new_origins(
    tmp_path: Path,
) -> None:
    chain = Chain(tmp_path, "gw1")
    first = access(chain, "alice")
    follower = Follower(str(tmp_path), "-f", "--json")
    try:
        assert follower.next(within=20) == lines_of(chain.path)[0]  # the process has started
        assert follower.next(within=1) == first
        for user in ("bob", "carol"):
            written = access(chain, user)
            started = time.monotonic()
            assert follower.next(within=1) == written
            assert time.monotonic() - started < 1
        burst = [access(chain, "dave"), access(chain, "erin")]
        chain.rotate()  # written together with the old segment's last lines: one poll sees all
        burst += [access(chain, "frank"), access(chain, "grace")]
        assert [follower.next(within=1) for _ in burst] == burst
        chain.rotate()
        for user in ("heidi", "ivan"):
            written = access(chain, user)
            assert follower.next(within=1) == written
        other = Chain(tmp_path, "gw2")
        assert follower.next(within=1) == lines_of(other.path)[0]
        written = access(other, "judy")
        assert follower.next(within=1) == written
    finally:
        rest, err = follower.stop()
    assert rest == [] and err == b""
