"""Memory per live session, in Redis and in the process cache (issue 8: at most 4 KiB each).

100,000 sessions are created through `gateway.sessions.Sessions.create` in this process (no
HTTP), as a login creates them, each for another user: realistic claims, an ID token of the
usual shape (an RS256 JWT whose payload repeats the claims, groups included) and an opaque
refresh token, with 10 and with 200 groups of 20 characters. Then:

- in the store: on Redis (`redis://127.0.0.1:6379/14`, FLUSHDB before and after), the growth
  of `INFO memory` used_memory less the clients' buffers (mem_clients_normal), over the number
  of sessions (so the indexes the admin API and logout use are counted too); on SQLite, the
  growth of the file (with its WAL);
- in the process cache: a second `Sessions` on the same store (a fresh process's view) loads
  every session once, each by a cookie id it has not seen before (as from a request), and
  tracemalloc counts what stays allocated: the cached sessions and the cookie id -> store
  key map, over the number of sessions.

Each figure is the total over all the sessions; the spread beside it is the lowest and
highest of the same figure over each quarter of them (hash tables grow in steps). The
baseline is the session's own content: its fields as the JSON the store seals.

    .venv/bin/python bench/sessions_memory.py [--sessions 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # the harness: the machine and date line

from gateway.keyring import Keyring
from gateway.sessions import Limits, Sessions
from gateway.store import SessionStore, open_session_store

REDIS_URL = "redis://127.0.0.1:6379/14"
TARGET = 4096  # bytes per session with 10 groups
CONCURRENCY = 64  # creations and loads in flight at once
ISSUER = "https://idp.example.org/realms/corp"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(i: int, groups: list[str]) -> dict[str, object]:
    """What a login passes to Sessions.create for user i."""
    user, sub = f"user{i:06d}@example.org", f"{i:08d}-4f1c-4b8e-9a57-3c2d1e0f9a8b"
    sid = b64(os.urandom(16))
    now = time.time()
    payload = {
        "iss": ISSUER,
        "sub": sub,
        "aud": "gateway",
        "exp": int(now) + 300,
        "iat": int(now),
        "auth_time": int(now),
        "nonce": b64(os.urandom(32)),
        "sid": sid,
        "email": user,
        "email_verified": True,
        "groups": groups,
    }
    header = b64(b'{"alg":"RS256","kid":"k1","typ":"JWT"}')
    id_token = f"{header}.{b64(orjson.dumps(payload))}.{b64(os.urandom(256))}"
    return {
        "iss": ISSUER,
        "sub": sub,
        "user": user,
        "email": user,
        "email_verified": True,
        "groups": groups,
        "amr": ["pwd", "otp"],
        "sid": sid,
        "auth_time": now,
        "id_token": id_token,
        "refresh_token": b64(os.urandom(48)),
        "refresh_after": now + 225,
    }


async def in_batches(step: Callable[[int], Awaitable[object]], n: int) -> None:
    for start in range(0, n, CONCURRENCY):
        await asyncio.gather(*(step(i) for i in range(start, min(n, start + CONCURRENCY))))


def quarters(n: int) -> list[int]:
    return [n * q // 4 for q in range(5)]


def per_session(readings: Sequence[int], n: int) -> tuple[float, float, float]:
    """(total growth / n, lowest and highest quarter's growth per session)."""
    marks = quarters(n)
    steps = [(readings[q + 1] - readings[q]) / (marks[q + 1] - marks[q]) for q in range(4)]
    return (readings[-1] - readings[0]) / n, min(steps), max(steps)


def store_bytes(url: str, path: Path) -> int:
    if url.startswith("redis"):
        from redis import Redis

        with Redis.from_url(url) as client:  # clients' buffers are no session's cost
            memory = client.info("memory")
            return int(memory["used_memory"]) - int(memory["mem_clients_normal"])
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


async def create(
    url: str, path: Path, keyring: Keyring, groups: int, n: int
) -> tuple[list[bytes], list[int]]:
    """n sessions: their cookie ids, and the store's size at each quarter."""
    store = await open_session_store(url)
    sessions = Sessions(store, keyring, Limits(15 * 60.0, 12 * 3600.0))
    names = [f"team-{g:03d}-engineering" for g in range(groups)]
    ids: list[bytes] = [b""] * n

    async def one(i: int) -> None:
        cookie_id, _ = await sessions.create(**claims(i, names))  # type: ignore[arg-type]
        ids[i] = cookie_id.encode()

    marks, readings = quarters(n), []
    for q in range(4):
        readings.append(store_bytes(url, path))
        await in_batches(lambda i, base=marks[q]: one(base + i), marks[q + 1] - marks[q])
    await store.close()
    readings.append(store_bytes(url, path))
    return ids, readings


async def cache(url: str, keyring_key: bytes, ids: list[bytes]) -> list[int]:
    """In a fresh process: load every session once in a new Sessions; RSS at each quarter."""
    store: SessionStore = await open_session_store(url)
    sessions = Sessions(store, Keyring([keyring_key]), Limits(15 * 60.0, 12 * 3600.0))
    await sessions.start()
    await sessions.load(ids[0].decode())  # code paths warm; its entry is counted below
    sessions._cache.clear()
    sessions._key_of.clear()
    marks, readings = quarters(len(ids)), []
    for q in range(4):
        gc.collect()
        readings.append(rss())
        part = ids[marks[q] : marks[q + 1]]
        await in_batches(lambda i, part=part: sessions.load(part[i].decode()), len(part))
    gc.collect()
    readings.append(rss())
    assert len(sessions._cache) == len(ids)  # every session cached, none evicted
    await sessions.close()
    await store.close()
    return readings


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cache_in_child(url: str, keyring_key: bytes, ids: list[bytes], tmp: Path) -> list[int]:
    """`cache()` in a process of its own: RSS grows only with what it allocates."""
    (tmp / "ids").write_bytes(b"\n".join([keyring_key.hex().encode(), *ids]))
    argv = [sys.executable, __file__, "load", "--store", url, "--ids", str(tmp / "ids")]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=900)
    readings: list[int] = json.loads(done.stdout)
    return readings


def load_main(args: argparse.Namespace) -> None:
    key, *ids = Path(args.ids).read_bytes().split(b"\n")
    print(json.dumps(uvloop.run(cache(args.store, bytes.fromhex(key.decode()), ids))))


def redis_kinds(n: int) -> str:
    """Redis bytes per session by kind of key: MEMORY USAGE of sampled keys, and encodings."""
    from redis import Redis

    every = "gw:i:all-sessions:all"  # one key for all sessions: measured whole
    used: dict[str, int] = defaultdict(int)
    encodings: dict[str, set[str]] = defaultdict(set)
    with Redis.from_url(REDIS_URL) as client:
        keys = (k for k in client.scan_iter(count=1000) if k.decode() != every)
        sample = list(itertools.islice(keys, 3000))
        for key in sample:
            kind = ":".join(key.decode().split(":")[1:3])  # v:session, i:user-names, ...
            used[kind] += client.memory_usage(key, samples=0) or 0
            encodings[kind].add(client.object("encoding", key).decode())
        scale = (client.dbsize() - 1) / len(sample) / n
        used["i:all-sessions"] = int((client.memory_usage(every, samples=0) or 0) / n / scale)
        encodings["i:all-sessions"].add(client.object("encoding", every).decode())
    ranked = sorted(used.items(), key=lambda kv: -kv[1])
    return "; ".join(f"{k} {b * scale:,.0f} ({', '.join(encodings[k])})" for k, b in ranked)


async def measure(kind: str, groups: int, n: int, tmp: Path) -> tuple[str, str]:
    path = tmp / f"sessions-{groups}.db"
    url = REDIS_URL if kind == "redis" else f"sqlite:///{path}"
    key = os.urandom(32)
    if kind == "redis":
        from redis import Redis

        with Redis.from_url(REDIS_URL) as client:
            client.flushdb()
    try:
        ids, readings = await create(url, path, Keyring([key]), groups, n)
        in_store = per_session(readings, n)
        in_cache = per_session(cache_in_child(url, key, ids, tmp), n)
        kinds = redis_kinds(n) if kind == "redis" else ""
    finally:
        if kind == "redis":
            with Redis.from_url(REDIS_URL) as client:
                client.flushdb()
    names = [f"team-{g:03d}-engineering" for g in range(groups)]
    content = len(orjson.dumps({**claims(0, names), "key": "k" * 64, "handle": "h" * 16}))
    figures = [in_store, in_cache] if kind == "redis" else [in_cache]
    verdict = "-"
    if groups == 10:
        verdict = "PASS" if all(f[0] <= TARGET for f in figures) else "FAIL"
    goal = "≤ 4,096 (10 groups)" if groups == 10 else "-"
    row = f"| {kind} | {groups} | {n:,} | {content:,} | {_cell(in_store)} | {_cell(in_cache)} "
    return row + f"| {goal} | {verdict} |", kinds and f"- Redis, {groups} groups: {kinds}"


def _cell(figure: tuple[float, float, float]) -> str:
    total, low, high = figure
    return f"{total:,.0f} ({low:,.0f}-{high:,.0f})"


def main() -> None:
    logging.getLogger("gateway").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    sub = parser.add_subparsers(dest="command")
    load = sub.add_parser("load", help="the process cache's part, in a fresh process")
    load.add_argument("--store", required=True)
    load.add_argument("--ids", required=True, help="a file: the state key (hex), then cookie ids")
    args = parser.parse_args()
    if args.command == "load":
        load_main(args)
        return
    lines = [
        f"Memory per live session (bench/sessions_memory.py; {run.stamp()}): {args.sessions:,} "
        "sessions made by `Sessions.create`, one per user, ID token and refresh token "
        "included; bytes per session over all of them (lowest-highest quarter).",
        "",
        "| store | groups | sessions | session JSON bytes (baseline) "
        "| in the store (Redis used_memory; SQLite file) | in the process cache (RSS) "
        "| target | result |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = [
        "",
        "Bytes per session in Redis by kind of key (MEMORY USAGE of 3,000 sampled keys, which "
        "leaves out Redis's own per-key overhead; the keys' encodings):",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="sessions-bench-") as tmp:
        for kind in ("redis", "sqlite"):
            for groups in (10, 200):
                row, note = uvloop.run(measure(kind, groups, args.sessions, Path(tmp)))
                lines.append(row)
                notes += [note] if note else []
                run.log(row)
    print("\n".join(lines + notes))


if __name__ == "__main__":
    main()
