"""Where a subject's CPU goes under load: py-spy flame graphs in bench/profiles/ (issue 8).

Starts bench/run.py's upstream and the named subjects (default: `session-sqlite`, the full
protected path with the audit log, and `aiohttp-min`, the floor it is held against), loads
each with wrk as run.py does (`-c64`, wrk on the load CPU, the subject alone on its CPU) while
`py-spy record` samples the subject's process (`--nonblocking`: the subject is never paused,
so its own speed is what the samples show, at the cost of an occasional torn stack). Writes
per subject:

- `bench/profiles/NAME.svg`: the flame graph (open it in a browser; click to zoom);
- `bench/profiles/NAME.txt`: the collapsed stacks py-spy saw (`flamegraph.pl` input), and
  prints the share of samples per part of the request path (`PARTS` below: each sample is
  charged to the first part its innermost frames name, reading from the leaf), and the
  functions with the most samples of their own.

    .venv/bin/python bench/profile.py [--only session-sqlite,aiohttp-min] [--seconds 15]

py-spy is not a project dependency: `pip install py-spy` (it needs ptrace: root, or
`kernel.yama.ptrace_scope` 0).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness: upstream, subjects, login, wrk

PROFILES = Path(__file__).resolve().parent / "profiles"
RATE = 997  # samples/s: prime, so the sampler does not beat against a periodic timer

# Parts of the request path, by the file (or file:function) a frame is in. A sample goes to
# the innermost frame that names one; the rest is "other".
PARTS = [
    ("audit log", ("gateway/audit/",)),
    ("metrics", ("prometheus_client/", "gateway/metrics.py")),
    ("session lookup", ("gateway/sessions.py", "gateway/caller.py", "gateway/store/")),
    ("policy", ("gateway/policy.py", "gateway/access.py")),
    ("identity headers + assertion", ("gateway/identity_headers.py", "gateway/assertion.py")),
    ("directory", ("gateway/directory.py",)),
    ("forwarding (gateway)", ("gateway/proxy.py", "gateway/upstream.py")),
    ("aiohttp client", ("aiohttp/client", "aiohttp/connector.py", "aiohttp/streams.py")),
    # (aiohttp/http_writer.py is under "server": both sides write through it)
    ("aiohttp server", ("aiohttp/web_", "aiohttp/http_", "aiohttp/base_protocol.py")),
    ("gateway pipeline", ("gateway/",)),
    ("event loop", ("asyncio/", "uvloop/")),
]


def part_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, markers in PARTS:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def summary(name: str, collapsed: Path) -> list[str]:
    parts: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count, stack = int(count_text), stack_text.split(";")
        total += count
        parts[part_of(stack)] += count
        leaves[stack[-1]] += count
    if not total:
        return [f"## {name}: no samples"]
    lines = [f"## {name}: {total:,} samples", "", "| part | share |", "|---|---:|"]
    lines += [f"| {part} | {n / total:.1%} |" for part, n in parts.most_common()]
    lines += ["", "| function (own samples) | share |", "|---|---:|"]
    lines += [f"| `{leaf}` | {n / total:.1%} |" for leaf, n in leaves.most_common(25)]
    return lines


def record(env: run.Env, subject: run.Subject, seconds: float, py_spy: str) -> list[str]:
    pid = subject.pids()[-1]  # a gateway's own process (forward-auth: after nginx)
    PROFILES.mkdir(exist_ok=True)
    outputs = {"flamegraph": PROFILES / f"{subject.name}.svg", "raw": env.tmp / "raw.txt"}
    spy = [py_spy, "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking"]
    spies = [
        subprocess.Popen(
            [*spy, "--duration", f"{seconds:g}", "--format", fmt, "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for fmt, out in outputs.items()
    ]
    run.run_wrk(env, [subject], seconds)
    for spy in spies:
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.strip()}")
    text = PROFILES / f"{subject.name}.txt"
    shutil.copyfile(outputs["raw"], text)
    return summary(subject.name, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="session-sqlite,aiohttp-min")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    py_spy = run.find_tool("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    nginx, wrk = run.ensure_tools()
    subject_cpu, load_cpu = run.choose_cpus()
    env = run.Env(
        nginx, wrk, Path(tempfile.mkdtemp(prefix="profile-bench-")), subject_cpu, load_cpu
    )
    subjects = run.select(run.build_subjects(), args.only)
    lines = [f"Profiles (bench/profile.py; {run.stamp()}), py-spy {RATE}/s, wrk -c64:", ""]
    try:
        run.start_upstream(env)
        run.start_subjects(env, subjects)
        run.warm_up(env, subjects, 3)
        for subject in run.live(subjects):
            lines += [*record(env, subject, args.seconds, py_spy), ""]
    finally:
        env.stop_all()
        shutil.rmtree(env.tmp, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
