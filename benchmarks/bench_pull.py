"""Pull throughput and latency: a bootstrap against its two baselines, and write-to-watch.

Run: ``python benchmarks/bench_pull.py [--tasks 100000] [--repeat 3] [--writes 50]``
(``--quick``: 2,000 tasks, one sample, a few writes, as CI runs it).

The reference server runs in its own process (``python -m clinik_local.server``) on
127.0.0.1, on a database file seeded directly beforehand (``ReferenceServer.put_tasks``
in this process, one transaction, not over HTTP), so the server never shares an
interpreter with the client. Samples alternate (bootstrap, bare loop, create_many; then
again), so a burst of load from a neighbour lands on all three:

1. **bootstrap**: ``store.sync.pull()`` into a fresh file store: every ``GET /tasks``
   page of the scope (every task), then the (empty) change log, each page committed with
   the bootstrap's progress;
2. **(a) bare loop**: one keep-alive ``httpx.Client`` reading the same pages (same
   endpoint, same page size), ``json``-decoding each, and nothing else: the ceiling for
   fetching;
3. **(b) create_many**: ``store.tasks.create_many`` of the same tasks into a fresh file
   store, timed two ways: one call of all of them (its bulk path: search indexes built
   after the load) and chunks of 5,000 (as ``bench_store.py`` and issue 16 measure it);
   (b) is the faster of the two: the ceiling for writing.

Reported: tasks/s of each (best of ``--repeat``) and ratio = bootstrap / min(a, b)
(goal >= 0.7: fetching and applying overlap).

Then **write-to-watch latency**: two file stores, each with a running engine against a
fresh server; a task created on device A, timed until device B's
``store.tasks.watch`` callback names it (origin ``pulled``): p50/p99 over ``--writes``
writes at the default ``pull_interval``, and the same with a short interval (0.05 s).
Writes are spaced by a random pause of up to one pull interval, so they fall at random
points of B's pull timer.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from clinik_local import TaskStore
from clinik_local.demo import generate_requests
from clinik_local.events import ChangeEvent
from clinik_local.sync import SyncConfig
from clinik_local.testing.server import ReferenceServer

TOKEN = "bench-token"
CHUNK = 5000
EXTRA: dict[str, Any] = {}


def requests(count: int) -> list[dict[str, Any]]:
    """``count`` valid tasks with ids (the same ones on the server and in create_many)."""
    return [
        {**request, "id": f"task_pull_{n:07d}"}
        for n, request in enumerate(generate_requests(count, seed=13))
    ]


def seed_server(path: Path, tasks: list[dict[str, Any]]) -> None:
    """Write the tasks straight into a server database file (no HTTP)."""
    server = ReferenceServer(db=str(path), token=TOKEN, log_retention=None)
    try:
        for i in range(0, len(tasks), 20_000):
            server.put_tasks(tasks[i : i + 20_000])
    finally:
        server.stop()


@contextmanager
def server_process(db: Path | None = None) -> Iterator[str]:
    """The reference server in its own process; yields its base URL."""
    command = [sys.executable, "-m", "clinik_local.server", "--port", "0"]
    if db is not None:
        command += ["--db", str(db)]
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


def config(url: str, **extra: Any) -> SyncConfig:
    extra = {**EXTRA, **extra}
    return SyncConfig(base_url=url, token_provider=lambda: TOKEN, **extra)


def bootstrap(url: str, tmp: Path, count: int) -> float:
    """Tasks/s of a whole bootstrap into a fresh file store."""
    path = tmp / "bootstrap.db"
    with TaskStore.open(path, sync=config(url)) as store:
        started = time.perf_counter()
        status = store.sync.pull()
        elapsed = time.perf_counter() - started
        assert not status.bootstrapping, status
        assert status.tasks_pulled == count, status
    remove_store(path)
    return count / elapsed


def pull_interval(interval: float | None) -> float:
    """The pull interval a device runs with (``None``: the default)."""
    if interval is not None:
        return interval
    return SyncConfig(
        base_url="http://127.0.0.1:1/api/v1", token_provider=lambda: TOKEN
    ).pull_interval


def page_size() -> int:
    """The page size a bootstrap asks for (the engine's listing page)."""
    cfg = SyncConfig(base_url="http://127.0.0.1:1/api/v1", token_provider=lambda: TOKEN)
    return cfg.pull_limit


def bare_loop(url: str, count: int, limit: int) -> float:
    """Tasks/s of reading every listing page with a bare keep-alive httpx client."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    seen = 0
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        started = time.perf_counter()
        cursor: str | None = None
        while True:
            params = {"limit": str(limit)}
            if cursor is not None:
                params["cursor"] = cursor
            answer = client.get("/tasks", params=params)
            page = answer.json()
            seen += len(page["data"])
            cursor = page["meta"]["nextCursor"]
            if not page["meta"]["hasMore"]:
                break
        elapsed = time.perf_counter() - started
    assert seen == count, seen
    return count / elapsed


def create_many(tasks: list[dict[str, Any]], tmp: Path, chunk: int) -> float:
    """Tasks/s of ``create_many`` of the tasks into a fresh file store, ``chunk`` a call."""
    path = tmp / "create_many.db"
    with TaskStore.open(path) as store:
        started = time.perf_counter()
        for i in range(0, len(tasks), chunk):
            store.tasks.create_many(tasks[i : i + chunk])
        elapsed = time.perf_counter() - started
    remove_store(path)
    return len(tasks) / elapsed


def remove_store(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def watch_latency(url: str, tmp: Path, writes: int, interval: float | None) -> list[float]:
    """Seconds from a create on device A to device B's watch callback naming it."""
    extra: dict[str, Any] = {} if interval is None else {"pull_interval": interval}
    label = "default" if interval is None else f"{interval}"
    seen: dict[str, float] = {}
    arrived = threading.Condition()

    def on_change(event: ChangeEvent) -> None:
        if event.origin != "pulled":
            return
        at = time.perf_counter()
        with arrived:
            for task_id in event.task_ids:
                seen.setdefault(task_id, at)
            arrived.notify_all()

    rng = random.Random(5)
    latencies: list[float] = []
    seeds = list(generate_requests(writes, seed=17))
    with (
        TaskStore.open(tmp / f"a-{label}.db", sync=config(url, **extra)) as device_a,
        TaskStore.open(tmp / f"b-{label}.db", sync=config(url, **extra)) as device_b,
    ):
        for device in (device_a, device_b):
            assert device.sync.flush(timeout=60)  # bootstrapped, at the log's end
        device_b.tasks.watch(on_change)
        device_a.sync.start()
        device_b.sync.start()
        period = pull_interval(interval)
        for n, request in enumerate(seeds):
            time.sleep(rng.uniform(0, period))  # a random point of B's pull timer
            task_id = f"task_watch_{label}_{n:04d}"
            started = time.perf_counter()
            device_a.tasks.create({**request, "id": task_id})

            def landed(wanted: str = task_id) -> bool:
                return wanted in seen

            with arrived:
                assert arrived.wait_for(landed, timeout=60), task_id
            latencies.append(seen[task_id] - started)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--writes", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.repeat, args.writes = 2000, 1, 3
    limit = page_size()
    tasks = requests(args.tasks)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server_db = tmp / "server.db"
        t0 = time.perf_counter()
        seed_server(server_db, tasks)
        print(
            f"{args.tasks:,} tasks seeded in {time.perf_counter() - t0:.1f} s; "
            f"page size {limit}; server in its own process; best of {args.repeat}"
        )
        boots: list[float] = []
        bares: list[float] = []
        singles: list[float] = []
        chunked: list[float] = []
        with server_process(server_db) as url:
            for _ in range(args.repeat):  # alternating, so all of them see the same load
                boots.append(bootstrap(url, tmp, args.tasks))
                bares.append(bare_loop(url, args.tasks, limit))
                singles.append(create_many(tasks, tmp, len(tasks)))
                chunked.append(create_many(tasks, tmp, CHUNK))
        boot, bare = max(boots), max(bares)
        single, chunk = max(singles), max(chunked)
        bulk = max(single, chunk)  # (b): create_many called the faster way
        floor = min(bare, bulk)
        print(f"bootstrap (store.sync.pull)         : {boot:8,.0f} tasks/s")
        print(f"(a) bare httpx loop, same pages     : {bare:8,.0f} tasks/s")
        print(f"(b) create_many, one call of all    : {single:8,.0f} tasks/s")
        print(f"    create_many, chunks of 5,000    : {chunk:8,.0f} tasks/s")
        met = "yes" if boot / floor >= 0.7 else "NO"
        print(f"ratio bootstrap / min(a, b)         : {boot / floor:8.2f}  (goal >= 0.70: {met})")
        print(f"ratio bootstrap / chunked create    : {boot / chunk:8.2f}")
        del tasks
        runs: list[tuple[str, float | None, int]] = [
            ("default pull_interval", None, max(args.writes, 1)),
            ("pull_interval 0.05 s", 0.05, max(args.writes, 1)),
        ]
        with server_process() as url:
            for name, interval, writes in runs:
                if args.quick and interval is None:
                    writes = 1  # a smoke run of the default interval: a few seconds
                lat = watch_latency(url, tmp, writes, interval)
                print(
                    f"write -> watch on another device, {name:<22}: "
                    f"p50 {percentile(lat, 0.5) * 1000:7.0f} ms, "
                    f"p99 {percentile(lat, 0.99) * 1000:7.0f} ms  ({writes} writes)"
                )


if __name__ == "__main__":
    main()
