"""What the metrics cost on the request path: one `Metrics.served` call per request.

That is one counter increment (a cached label child) and one histogram observation, in
the process's default registry (one worker) or in prometheus-client's memory-mapped files
(PROMETHEUS_MULTIPROC_DIR set, as the parent of server.workers > 1 does).

    .venv/bin/python bench/metrics_cost.py plain
    .venv/bin/python bench/metrics_cost.py multiprocess
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import timeit

N = 200_000


def main(mode: str) -> None:
    if mode == "multiprocess":  # before prometheus_client is imported: it decides then
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-metrics-")
    from gateway.metrics import Metrics

    metrics = Metrics()
    started = time.monotonic()
    metrics.served("app", "allow", 200, "-", started)  # the label child and the file, once
    spent = timeit.timeit(lambda: metrics.served("app", "allow", 200, "-", started), number=N)
    empty = timeit.timeit(lambda: None, number=N)
    print(f"{mode}: {(spent - empty) / N * 1e6:.2f} µs per request")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "plain")
