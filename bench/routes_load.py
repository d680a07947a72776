"""How long a 10,000-route config takes to load (issue 8: under 1 s), against 10 routes.

What `gateway run` does at start and on every reload before it serves with a config:
`gateway.settings.load_settings(path)` (YAML parsed, validated by pydantic, cross-checked)
then `gateway.runtime.Runtime.build(settings)` (route table, upstreams, compiled policies).
Timed in this process (imports and one load done first, so this is a reload's cost; a start
adds the interpreter and imports), wall and CPU time, over the same configs as bench/run.py's
subjects: public routes (`gateway-10-routes`, `gateway-10k-routes`: the target's) and
protected routes of ten allow rules each (`policy-10-routes`, `policy-1000-routes`; 10,000 of
those, 100,000 rules, take about 40 s to load, too long to repeat here). The configs are
loaded in turn, `--rounds` times; each cell is the median (min-max).

The per-request cost of 10,000 routes against 10 is bench/run.py's `gateway-10k-routes ÷
gateway-10-routes` ratio (and `policy-1000-routes ÷ policy-10-routes`), not measured here.

    .venv/bin/python bench/routes_load.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness: the subjects' configs, the machine and date line

from gateway.runtime import Runtime
from gateway.settings import load_settings

TARGET_S = 1.0
BASELINE = "10 public routes"


def configs(tmp: Path) -> dict[str, Path]:
    """The YAML files of run.py's route subjects, at 10 and 10,000 routes."""
    env = run.Env(nginx="", wrk="", tmp=tmp, subject_cpu=0, load_cpu=0, upstream_port=8081)
    subjects: dict[str, run.GatewaySubject] = {
        BASELINE: run.GatewaySubject("public-10", "", routes=10),
        "10,000 public routes": run.GatewaySubject("public-10k", "", routes=10_000),
        "10 protected routes of 10 rules": run.PolicySubject("p-10", "", "memory://", routes=10),
        "1,000 protected routes of 10 rules": run.PolicySubject(
            "p-1000", "", "memory://", routes=1000
        ),
    }
    paths = {}
    for label, subject in subjects.items():
        subject.port = 8080
        if isinstance(subject, run.LoggedInSubject):
            subject.gateway_port, subject.idp_port = 8080, 8082
        path = paths[label] = tmp / subject.name / "gateway.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(subject.config(env))
    return paths


def load(path: Path) -> tuple[float, float]:
    """(wall s, CPU s) of load_settings + Runtime.build."""
    gc.collect()  # the previous load's garbage is not this one's cost
    wall, cpu = time.perf_counter(), time.process_time()
    Runtime.build(load_settings(path))
    return time.perf_counter() - wall, time.process_time() - cpu


def cold(path: Path) -> float:
    """Wall s of a whole `gateway check-config` process: interpreter, imports, load, summary."""
    start = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).with_name("gateway")), "check-config", "-c", str(path)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="routes-bench-") as tmp:
        paths = configs(Path(tmp))
        load(paths[BASELINE])  # imports and first-use caches: not any config's cost
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in paths}
        starts: dict[str, list[float]] = {label: [] for label in paths}
        for _ in range(args.rounds):
            for label, path in paths.items():
                times[label].append(load(path))
                starts[label].append(cold(path))
        sizes = {label: path.stat().st_size for label, path in paths.items()}
    base = statistics.median(wall for wall, _ in times[BASELINE])
    lines = [
        f"Config load time (bench/routes_load.py; {run.stamp()}): `load_settings` + "
        f"`Runtime.build`, in one process after a first load, {args.rounds} rounds over the "
        "configs in turn; seconds, median (min-max). *Whole command* is the wall time of a "
        "separate `gateway check-config` process (interpreter and imports included: what a "
        "start adds). The per-request cost of 10,000 routes "
        "against 10 is the `gateway-10k-routes ÷ gateway-10-routes` ratio above.",
        "",
        "| config | YAML bytes | wall s | CPU s | ÷ 10 public routes | whole command s "
        "| target | result |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        target = verdict = "-"
        if label == "10,000 public routes":
            target, verdict = f"< {TARGET_S:g} s", "PASS" if wall < TARGET_S else "FAIL"
        lines.append(
            f"| {label} | {sizes[label]:,} | {spread([w for w, _ in runs])} "
            f"| {spread([c for _, c in runs])} | {wall / base:.1f} | {spread(starts[label])} "
            f"| {target} | {verdict} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
