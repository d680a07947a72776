"""How many records a second the audit writer sustains alone, with an fsync per batch.

Access-like records (about 400 bytes of fields) are submitted as fast as the loop allows,
keeping at most a window of them unwritten (as a busy gateway would), for a few seconds,
into a temp dir; then the writer is closed and the file checked for its record count.

    .venv/bin/python bench/audit_writer.py [--seconds 5] [--window 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.writer import AuditWriter, WriterConfig

TARGET = 50_000  # records/s

try:
    import uvloop
except ImportError:  # pragma: no cover - Windows
    uvloop = None  # type: ignore[assignment]


def access_fields(n: int) -> dict[str, object]:
    return {
        "request_id": f"01JD8X3Q4K5M6N7P8Q{n:08d}",
        "route": "app",
        "method": "GET",
        "host": "app.example.org",
        "path": f"/api/v1/items/{n}/details",
        "query_hmac": "0123456789abcdef0123456789abcdef",
        "decision": "allow",
        "reason": "allow:app:allow:0",
        "user": "alice@example.org",
        "sub": "00u1abcd2EFGH3ijk4l5",
        "groups": ["eng", "ops"],
        "client": None,
        "session": "s_4fG7hJ9kL2mN",
        "mfa": True,
        "client_ip": "203.0.113.45",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
        "upstream": "http://10.0.0.5:8080",
        "policy_hash": "9f86d081884c7d65",
    }


async def measure(directory: Path, seconds: float, window: int) -> tuple[int, int, float]:
    config = WriterConfig(
        dir=directory,
        origin="bench",
        checkpoint_every=1000,
        checkpoint_interval=1.0,
        heartbeat_interval=60.0,
        segment_max_bytes=64 * 2**20,
        retention=2190 * 86400.0,
        queue_max=window * 2,
        reserved=0,
    )
    writer = await AuditWriter.open(config, Ed25519PrivateKey.generate())
    start_written, start_batches = int(writer.stats["written"]), int(writer.stats["batches"])
    fields = [access_fields(n) for n in range(1000)]
    submitted, start = 0, time.perf_counter()
    deadline = start + seconds
    last: asyncio.Future[None] | None = None
    while time.perf_counter() < deadline:
        for _ in range(500):
            last = writer.submit("access", fields[submitted % 1000])
            submitted += 1
        if int(writer.stats["queued"]) > window and last is not None:
            await last  # the window is full: wait for the writer, as backpressure would
        else:
            await asyncio.sleep(0)
    if last is not None:
        await last
    elapsed = time.perf_counter() - start
    written = int(writer.stats["written"]) - start_written
    batches = int(writer.stats["batches"]) - start_batches
    await writer.close()
    assert int(writer.stats["dropped"]) == 0
    return written, batches, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=20_000, help="unwritten records at most")
    args = parser.parse_args()
    if uvloop is not None:
        uvloop.install()
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        written, batches, elapsed = asyncio.run(measure(Path(tmp), args.seconds, args.window))
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.jsonl"))
    rate = written / elapsed
    verdict = "PASS" if rate >= TARGET else "FAIL"
    print("| records/s | batches/s | records/batch | bytes/record | target | result |")
    print("|---:|---:|---:|---:|---:|---|")
    print(
        f"| {rate:,.0f} | {batches / elapsed:,.0f} | {written / max(batches, 1):,.0f} "
        f"| {size / max(written, 1):,.0f} | ≥ {TARGET:,} | {verdict} |"
    )


if __name__ == "__main__":
    main()
