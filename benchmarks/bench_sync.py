"""Sync throughput: the outbox drain rate against a bare keep-alive httpx loop.

Run: ``python benchmarks/bench_sync.py [--count 3000] [--repeat 3]``

Each measurement gets a fresh reference server in its own process
(``python -m clinik_local.server --port 0``), so the server never shares an interpreter
with the client. Reported (best of ``--repeat``):

1. bare loop: one ``httpx.Client`` posting the same wire bodies, one after another,
   with keep-alive, each with its own ``Idempotency-Key`` (the ceiling for a sequential
   client);
2. sync drain: ``store.sync.flush()`` of an outbox holding those creates;
3. the ratio drain / bare (goal >= 0.7);
4. single ``store.tasks.create`` calls per second on a file store without sync, with
   sync configured (worker stopped), and with the worker running against the server.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from clinik_local import TaskStore
from clinik_local.codec import encode_task
from clinik_local.demo import generate_requests
from clinik_local.sync import SyncConfig

TOKEN = "bench-token"


@contextmanager
def server_process() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinik_local.server", "--port", "0", "--token", TOKEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        yield words[2]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def requests(count: int, prefix: str) -> list[dict[str, Any]]:
    out = []
    for n, request in enumerate(generate_requests(count, seed=3)):
        out.append({**request, "id": f"task_{prefix}_{n:07d}"})
    return out


def bare_loop(count: int) -> float:
    bodies = []
    with TaskStore.open(":memory:") as store:
        for task in store.tasks.create_many(requests(count, "bare")).data:
            body = encode_task(task)
            body.pop("versionId", None)
            body.pop("lastModified", None)
            bodies.append(json.dumps(body, separators=(",", ":")).encode())
    with server_process() as url:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
            started = time.perf_counter()
            for n, raw in enumerate(bodies):
                answer = client.post("/tasks", content=raw, headers={"Idempotency-Key": f"k{n}"})
                assert answer.status_code == 201, answer.text
            elapsed = time.perf_counter() - started
    return count / elapsed


def sync_drain(count: int) -> float:
    with tempfile.TemporaryDirectory() as tmp, server_process() as url:
        config = SyncConfig(base_url=url, token_provider=lambda: TOKEN)
        with TaskStore.open(Path(tmp) / "drain.db", sync=config) as store:
            store.tasks.create_many(requests(count, "sync"))
            started = time.perf_counter()
            assert store.sync.flush(timeout=600)
            elapsed = time.perf_counter() - started
            assert store.sync.status().pending == 0
    return count / elapsed


def creates(count: int, mode: str) -> float:
    reqs = list(generate_requests(count, seed=5))
    with tempfile.TemporaryDirectory() as tmp, server_process() as url:
        config = (
            None if mode == "no sync" else SyncConfig(base_url=url, token_provider=lambda: TOKEN)
        )
        with TaskStore.open(Path(tmp) / "c.db", sync=config) as store:
            if mode == "sync running":
                store.sync.start()
            started = time.perf_counter()
            for request in reqs:
                store.tasks.create(request)
            elapsed = time.perf_counter() - started
            if config is not None:
                store.sync.stop()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    bare = max(bare_loop(args.count) for _ in range(args.repeat))
    drain = max(sync_drain(args.count) for _ in range(args.repeat))
    print(f"bare httpx keep-alive loop : {bare:8.0f} requests/s")
    print(f"sync drain (flush)         : {drain:8.0f} changes/s")
    print(f"ratio drain / bare         : {drain / bare:8.2f}  (goal >= 0.70)")
    rates = {
        m: max(creates(args.count, m) for _ in range(args.repeat))
        for m in ("no sync", "sync configured", "sync running")
    }
    for mode, rate in rates.items():
        print(f"create, {mode:<19}: {rate:8.0f} tasks/s  ({rate / rates['no sync']:.2f}x)")


if __name__ == "__main__":
    main()
