"""Latency at a fixed request rate, open loop (issue 8: p99 at most 5 ms at 50% of the maximum).

wrk is a closed loop: the next request waits for an answer, so a stall delays the requests
behind it and they never count as slow ("coordinated omission"). This client has requests
fall due on a fixed schedule, one every 1/rate s, whatever the answers; a due request goes
out on an idle keep-alive connection (64, HTTP/1.1, a raw asyncio protocol on uvloop) or
waits for one, and its latency runs from the moment it fell due. Its timers tick in
milliseconds (it never spins: the load CPU is the upstream's too), so the requests due since
the last tick leave together; how late that is against the exact schedule is its lag. It
checks itself: a row where it fell short (under 99% of the rate, lag p99 over three ticks,
or its core 90% busy) shows no figure. It runs in a process of its own on the load CPU; the
subjects are on the subject CPU, set up by bench/run.py's code.

Each subject's maximum rate is measured first, closed loop (wrk -c64, as run.py does). Then,
in interleaved rounds of 2 s discarded and `--seconds` measured per row: `session-sqlite`
(the full protected path with the audit log, SQLite sessions) at 50% of its maximum;
`aiohttp-min` (bench/minimal_proxy.py) at 50% of its own and at the gateway's rate; and the
upstream nginx alone (on the load CPU, with the client): the measuring system's floor.

    .venv/bin/python bench/latency.py [--rounds 2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness: upstream, subjects, login, wrk

TARGET_MS = 5.0
CONNECTIONS = 64
WARMUP_S = 2.0
TICK = 0.001  # s: the client's timer resolution (libuv's)
LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)")


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, client: OpenLoop) -> None:
        self.client, self.buffer, self.released = client, bytearray(), 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, released: float) -> None:
        assert self.transport is not None
        self.released = released
        self.transport.write(self.client.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = LENGTH.search(head)
        if length:
            complete = len(self.buffer) >= end + 4 + int(length.group(1))
        else:  # chunked: our bodies never hold the last-chunk sequence
            complete = self.buffer.find(b"\r\n0\r\n\r\n", end + 2) >= 0
        if complete:
            self.buffer.clear()
            self.client.answered(self, int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class OpenLoop:
    """Requests due every 1/rate s; latency from the tick at which each fell due."""

    def __init__(self, request: bytes, rate: float, seconds: float) -> None:
        self.request, self.rate, self.seconds = request, rate, seconds
        self.idle: deque[Connection] = deque()
        self.waiting: deque[float] = deque()  # released, waiting for an idle connection
        self.latencies: list[float] = []
        self.lags: list[float] = []  # how late the client itself dispatched each request
        self.in_flight = self.errors = 0
        self.measure_from = float("inf")
        self.drained = asyncio.Event()  # set once every request was sent and answered
        self.sending = True

    def dispatch(self, released: float) -> None:
        self.in_flight += 1
        if self.idle:
            self.idle.pop().send(released)
        else:
            self.waiting.append(released)

    def answered(self, conn: Connection, status: int) -> None:
        if conn.released >= self.measure_from:
            self.latencies.append(time.perf_counter() - conn.released)
            self.errors += status != 200
        self.in_flight -= 1
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)
            if not self.sending and self.in_flight == 0:
                self.drained.set()

    def lost(self, conn: Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        else:  # its request is never answered: counted as an error in stats()
            self.in_flight -= 1

    async def run(self, host: str, port: int) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        for _ in range(CONNECTIONS):
            _, conn = await loop.create_connection(lambda: Connection(self), host, port)
            self.idle.append(conn)
        cpu, interval = time.process_time(), 1.0 / self.rate
        total = int(self.rate * (WARMUP_S + self.seconds))
        start = time.perf_counter()
        self.measure_from = start + WARMUP_S
        sent = 0
        while sent < total:
            now = time.perf_counter()
            for i in range(sent, min(total, int((now - start) / interval) + 1)):
                if now >= self.measure_from:  # as answered() counts
                    self.lags.append(now - (start + i * interval))
                self.dispatch(now)
                sent = i + 1
            # Never spin: the load CPU is the upstream's too. Timers tick in milliseconds.
            await asyncio.sleep(max(TICK, start + sent * interval - time.perf_counter()))
        window = time.perf_counter() - self.measure_from
        self.sending = False
        if self.in_flight == 0:
            self.drained.set()
        with contextlib.suppress(TimeoutError):  # what is still unanswered counts as errors
            await asyncio.wait_for(self.drained.wait(), 10.0)
        return self.stats(window, (time.process_time() - cpu) / (time.perf_counter() - start))

    def stats(self, window: float, busy: float) -> dict[str, float]:
        lat, lag = sorted(self.latencies), sorted(self.lags)
        return {
            "asked": self.rate,
            "achieved": len(self.lags) / window,
            "p50": _pct(lat, 0.50) * 1e3,
            "p99": _pct(lat, 0.99) * 1e3,
            "p999": _pct(lat, 0.999) * 1e3,
            "max": lat[-1] * 1e3 if lat else float("nan"),
            "lag_p99": _pct(lag, 0.99) * 1e3,
            "errors": self.errors + len(self.lags) - len(lat),  # not 200, or never answered
            "client_cpu": busy,
        }


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return values[max(0, min(len(values) - 1, round(q * len(values)) - 1))] if values else 0.0


def client_main(args: argparse.Namespace) -> None:
    gc.disable()  # no collector pauses in the client: its lists hold only floats
    head = "".join(f"{h}\r\n" for h in args.header)
    request = f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n{head}\r\n".encode()
    stats = uvloop.run(OpenLoop(request, args.rate, args.seconds).run("127.0.0.1", args.port))
    print(json.dumps(stats))


def open_loop(env: run.Env, subject: run.Subject, rate: float, seconds: float) -> dict[str, float]:
    """The client at `rate` against `subject`, in its own process on the load CPU."""
    headers = [arg for k, v in subject.headers.items() for arg in ("--header", f"{k}: {v}")]
    argv = ["taskset", "-c", str(env.load_cpu), sys.executable, __file__, "client"]
    argv += ["--port", str(subject.port), "--path", subject.path, *headers]
    argv += ["--rate", f"{rate:.1f}", "--seconds", f"{seconds:g}"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
    stats: dict[str, float] = json.loads(done.stdout)
    return stats


def sustained(stats: dict[str, float]) -> bool:
    """The client kept to the schedule: the rate achieved, dispatched on time, not saturated."""
    on_time = stats["achieved"] >= 0.99 * stats["asked"] and stats["lag_p99"] <= 3 * TICK * 1e3
    return on_time and stats["client_cpu"] < 0.9


def row(label: str, runs: list[dict[str, float]], target: bool) -> str:
    good = [r for r in runs if sustained(r)]
    rate = run.spread([r["asked"] for r in runs], ",.0f")
    achieved = run.spread([r["achieved"] for r in runs], ",.0f")
    if len(good) < len(runs):
        cpu = max(r["client_cpu"] for r in runs)
        return (
            f"| {label} | {rate} | {achieved} | the client could not sustain the rate "
            f"(client CPU up to {cpu:.0%}): no figure | | | | | | | |"
        )
    cells = [run.spread([r[k] for r in runs], ".2f") for k in ("p50", "p99", "p999", "max")]
    lag = run.spread([r["lag_p99"] for r in runs], ".2f")
    errors = int(sum(r["errors"] for r in runs))
    p99 = statistics.median(r["p99"] for r in runs)
    verdict = ("PASS" if p99 <= TARGET_MS else "FAIL") if target else "-"
    goal = f"p99 ≤ {TARGET_MS:g} ms" if target else "-"
    figures = " | ".join([*cells, lag, str(errors), goal, verdict])
    return f"| {label} | {rate} | {achieved} | {figures} |"


def measure(env: run.Env, args: argparse.Namespace) -> list[str]:
    gateway = run.LoggedInSubject(
        "session-sqlite", "protected route, SQLite sessions", "sqlite:///{tmp}/state.db"
    )
    floor = run.MinimalProxySubject("aiohttp-min", "bench/minimal_proxy.py")
    direct = run.DirectSubject("direct", "the upstream nginx")
    subjects: list[run.Subject] = [gateway, floor, direct]
    run.start_upstream(env)
    run.start_subjects(env, subjects)
    if any(s.error for s in subjects):
        return [f"Latency: not measured ({next(s.error for s in subjects if s.error)})"]
    run.warm_up(env, subjects, WARMUP_S)
    top = {s.name: run.run_wrk(env, [s], args.max_seconds)[0].rps for s in (gateway, floor)}
    plan = [
        ("session-sqlite at 50% of its maximum", gateway, top[gateway.name] / 2, True),
        ("aiohttp-min at 50% of its maximum", floor, top[floor.name] / 2, False),
        ("aiohttp-min at the gateway's rate", floor, top[gateway.name] / 2, False),
        ("direct: upstream nginx on the load CPU", direct, max(top.values()) / 2, False),
    ]
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in plan}
    for index in range(args.rounds):
        for label, subject, rate, _ in plan:
            result = open_loop(env, subject, rate, args.seconds)
            run.log(f"# round {index + 1} {label}: {json.dumps(result)}")
            runs[label].append(result)
    maxima = ", ".join(f"`{name}` {rps:,.0f}" for name, rps in top.items())
    return [
        f"Latency at a fixed rate (bench/latency.py; {run.stamp()}): an open-loop client "
        f"({CONNECTIONS} keep-alive connections, on the load CPU) sends on a schedule and "
        "counts each latency from the moment the request fell due. Maximum rates, closed loop "
        f"(`wrk -c64`, {args.max_seconds:g} s): {maxima} requests/s. {args.rounds} interleaved "
        f"round(s) of {args.seconds:g} s per row after {WARMUP_S:g} s discarded; median (min-max).",
        "",
        "| row | asked requests/s | achieved | p50 ms | p99 ms | p99.9 ms | max ms "
        "| client lag p99 ms | errors | target | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *[row(label, runs[label], target) for label, _, _, target in plan],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    client = sub.add_parser("client", help="the open-loop client alone (prints JSON)")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--path", default="/")
    client.add_argument("--header", action="append", default=[])
    client.add_argument("--rate", type=float, required=True)
    client.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per row")
    parser.add_argument("--max-seconds", type=float, default=5.0, help="closed-loop wrk run")
    args = parser.parse_args()
    if args.command == "client":
        client_main(args)
        return
    nginx, wrk = run.ensure_tools()
    subject_cpu, load_cpu = run.choose_cpus()
    env = run.Env(
        nginx, wrk, Path(tempfile.mkdtemp(prefix="latency-bench-")), subject_cpu, load_cpu
    )
    try:
        lines = measure(env, args)
    finally:
        env.stop_all()
        shutil.rmtree(env.tmp, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
