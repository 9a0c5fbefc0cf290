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

``--server minimal`` swaps in a server that validates and keeps nothing (it only
answers 201 with a versionId), so that the ratio shows the client's own overhead.
"""

from __future__ import annotations

import argparse
import json
import os
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


#: A minimal keep-alive server answering every write with 201 and a versionId: it does
#: no validation and keeps nothing, so the client side's own cost shows in the ratio.
MINIMAL_SERVER = """
import itertools, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
counter = itertools.count(1)
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *args): pass
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"data":{"versionId":"%d","lastModified":"2025-01-01T00:00:00.000Z"}}' % next(
            counter)
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("listening on http://127.0.0.1:%d/api/v1" % server.server_address[1], flush=True)
server.serve_forever()
"""

SERVER_KIND = "reference"


@contextmanager
def server_process() -> Iterator[str]:
    if SERVER_KIND == "minimal":
        command = [sys.executable, "-c", MINIMAL_SERVER]
    else:
        command = [sys.executable, "-m", "clinik_local.server", "--port", "0"]
    env = {**os.environ, "CLINIK_TOKEN": TOKEN}  # the server takes its token from the env
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
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
    parser.add_argument(
        "--server",
        choices=("reference", "minimal"),
        default="reference",
        help="the reference server, or a minimal one that only answers 201",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.count, args.repeat = 100, 1
    global SERVER_KIND
    SERVER_KIND = args.server
    print(f"server: {args.server}, own process; {args.count} changes, best of {args.repeat}")
    bares: list[float] = []
    drains: list[float] = []
    for _ in range(args.repeat):  # interleaved, so both see the same machine load
        bares.append(bare_loop(args.count))
        drains.append(sync_drain(args.count))
    bare, drain = max(bares), max(drains)
    print(f"bare httpx keep-alive loop : {bare:8.0f} requests/s")
    print(f"sync drain (flush)         : {drain:8.0f} changes/s")
    print(f"ratio drain / bare         : {drain / bare:8.2f}  (goal >= 0.70)")
    if args.server == "minimal":
        return
    modes = ("no sync", "sync configured", "sync running")
    runs: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode in modes:
            runs[mode].append(creates(args.count, mode))
    rates = {m: max(r) for m, r in runs.items()}
    for mode, rate in rates.items():
        print(f"create, {mode:<19}: {rate:8.0f} tasks/s  ({rate / rates['no sync']:.2f}x)")


if __name__ == "__main__":
    main()
