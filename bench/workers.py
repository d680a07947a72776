"""Throughput of `server.workers: 2` against 1 (issue 8: the gateway scales with processes).

Two gateways, identical but for `server.workers`, both on the full protected path (logged
in, the audit log on) with what workers > 1 requires of either: sessions in Redis
(`redis://127.0.0.1:6379/12`, FLUSHDB before and after), records in PostgreSQL (a schema of
their own in `postgresql://postgres@127.0.0.1:5432/test`, created and dropped here), the
assertion key in a file. bench/run.py's setup (upstream nginx, dev IdP, login) is imported.
wrk keeps 128 connections open, so the kernel (SO_REUSEPORT) hands each worker its share.

On a 2-core machine there is no honest "N cores for the gateway, more for the load": wrk and
the upstream nginx need CPU too. So two layouts, each measured in interleaved rounds:

- `pinned`: every gateway process on CPU 0, wrk (1 thread) and the upstream on CPU 1, as in
  run.py. Two workers cannot go faster than one core: this shows what the second process
  costs (CPU µs per request of the whole process tree, supervisor included).
- `unpinned`: nothing pinned, wrk with 2 threads; the gateway's processes, wrk and the
  upstream share both cores as the scheduler likes. This is the scaling the machine allows:
  one worker can use at most one core; two can use what wrk and the upstream leave.

    .venv/bin/python bench/workers.py [--rounds 2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness: upstream, login, wrk, CPU accounting

REDIS_URL = "redis://127.0.0.1:6379/12"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
CONNECTIONS = 128


class WorkersSubject(run.LoggedInSubject):
    """run.py's session subject with Redis sessions, PostgreSQL records and N workers."""

    def __init__(self, workers: int, schema: str) -> None:
        super().__init__(f"workers-{workers}", f"server.workers: {workers}", REDIS_URL)
        self.workers = workers
        self.records = f"{POSTGRES}?search_path={schema}"

    def server_extra(self) -> str:
        return f", workers: {self.workers}"

    def wait_ready(self) -> None:
        super().wait_ready()
        deadline = time.monotonic() + 60
        assert self.server is not None
        while "server.started" not in self.server.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise run.StartError(f"no server.started in the log:\n{self.log_tail()}")
            time.sleep(0.1)


def postgres(sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    async def execute() -> None:
        conn = await asyncpg.connect(POSTGRES)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute())


def flush_redis() -> None:
    from redis import Redis

    with Redis.from_url(REDIS_URL) as client:
        client.flushdb()


def pin(roots: list[int], cpus: str) -> None:
    """Move every thread of these process trees to `cpus` (e.g. "0" or "0,1")."""
    for pid in run.process_tree(roots):
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True)


def machine_busy() -> float:
    """Seconds the machine's cores were not idle, interrupts included (loopback is softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return (user + nice + system + irq + softirq + steal) / run.CLK_TCK


def measure(env: run.Env, subject: run.Subject, load_cpus: str, threads: int, s: float) -> dict:
    headers = [a for k, v in subject.headers.items() for a in ("-H", f"{k}: {v}")]
    load = [f"-t{threads}", f"-c{CONNECTIONS}", f"-d{s:g}s", "--latency"]
    argv = ["taskset", "-c", load_cpus, env.wrk, *load, *headers, subject.url]
    cpu, busy, wall = run.cpu_seconds(subject.pids()), machine_busy(), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=s + 60)
    wall = time.monotonic() - wall
    wrk = run.parse_wrk(done.stdout)
    cpu = run.cpu_seconds(subject.pids()) - cpu
    return {
        "rps": wrk.rps,
        "cpu_us": cpu / wrk.requests * 1e6,
        "cores": cpu / wall,  # the gateway's processes, in cores
        "machine": (machine_busy() - busy) / wall / (os.cpu_count() or 1),
        "p99": wrk.p99_ms,
        "errors": wrk.errors,
    }


def rows(layout: str, runs: dict[str, list[dict]]) -> list[str]:
    one = runs["workers-1"]
    lines = []
    for name, got in runs.items():
        ratio = [g["rps"] / o["rps"] for g, o in zip(got, one, strict=True)]
        cells = [
            run.spread([g["rps"] for g in got], ",.0f"),
            run.spread(ratio, ".2f"),
            run.spread([g["cpu_us"] for g in got], ".1f"),
            run.spread([g["cores"] for g in got], ".2f"),
            run.spread([g["machine"] * 100 for g in got], ".0f"),
            run.spread([g["p99"] for g in got], ".2f"),
            str(sum(g["errors"] for g in got)),
        ]
        lines.append(f"| {layout} | {name.split('-')[1]} | " + " | ".join(cells) + " |")
    return lines


def bench(env: run.Env, args: argparse.Namespace, schema: str) -> list[str]:
    subjects = [WorkersSubject(1, f"{schema}_1"), WorkersSubject(2, f"{schema}_2")]
    run.start_upstream(env)
    run.start_subjects(env, subjects)
    failed = [s for s in subjects if s.error]
    if failed:
        return [f"server.workers: not measured ({failed[0].name}: {failed[0].error})"]
    every = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    layouts = {
        "pinned": (str(env.subject_cpu), str(env.load_cpu), 1),
        "unpinned": (every, every, 2),
    }
    gateways = [pid for s in subjects for pid in s.pids()]
    table = []
    for layout, (gateway_cpus, load_cpus, threads) in layouts.items():
        pin(gateways, gateway_cpus)
        pin([s.pid for s in env.servers if s.pid not in gateways], load_cpus)  # upstream, IdPs
        runs: dict[str, list[dict]] = {s.name: [] for s in subjects}
        for subject in subjects:
            measure(env, subject, load_cpus, threads, 2.0)  # warm-up, discarded
        for index in range(args.rounds):
            for subject in subjects:
                got = measure(env, subject, load_cpus, threads, args.seconds)
                run.log(f"# {layout} round {index + 1} {subject.name}: {got}")
                runs[subject.name].append(got)
        table += rows(layout, runs)
    return [
        f"`server.workers: 2` against 1 (bench/workers.py; {run.stamp()}): the protected path "
        f"with Redis sessions and PostgreSQL records, `wrk -c{CONNECTIONS}`, {args.rounds} "
        f"interleaved round(s) of {args.seconds:g} s per layout; median (min-max). *pinned*: "
        f"the gateway on CPU 0, wrk and the upstream on CPU {env.load_cpu}. *unpinned*: all "
        "share both cores; the ceiling is what wrk and the upstream leave.",
        "",
        "| layout | workers | requests/s | ÷ 1 worker | gateway CPU µs/request "
        "| gateway cores busy | machine busy % | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *table,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    nginx, wrk = run.ensure_tools()
    subject_cpu, load_cpu = run.choose_cpus()
    env = run.Env(
        nginx, wrk, Path(tempfile.mkdtemp(prefix="workers-bench-")), subject_cpu, load_cpu
    )
    schema = f"bench_workers_{os.getpid()}"
    flush_redis()
    postgres(f"CREATE SCHEMA {schema}_1; CREATE SCHEMA {schema}_2")
    try:
        lines = bench(env, args, schema)
    finally:
        env.stop_all()
        postgres(f"DROP SCHEMA {schema}_1 CASCADE; DROP SCHEMA {schema}_2 CASCADE")
        flush_redis()
        shutil.rmtree(env.tmp, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
