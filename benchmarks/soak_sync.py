"""Soak: many SIGKILLed syncing children against a faulty server; nothing lost, nothing twice.

Run: ``python benchmarks/soak_sync.py [--trials 300] [--seed 1] [--fault-rate 0.25]``

The long form of ``tests/test_sync_crash.py``: each trial starts a child process that
writes tasks (create, update, some deletes) with the sync worker running, and kills it
with SIGKILL after a random, seeded delay. Every ``--check-every`` trials, and at the
end, a fresh store on the same file flushes with faults off and the script checks that
the server holds exactly the local tasks and applied every idempotency key once.
Exits non-zero on the first violation, printing the seed and trial to replay it.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from clinik_local import TaskStore
from clinik_local.codec import encode_task
from clinik_local.server import Faults, ReferenceServer
from clinik_local.sync import SyncConfig

CHILD = textwrap.dedent(
    """
    import sys
    from clinik_local import TaskStore
    from clinik_local.sync import SyncConfig

    path, url, token, start = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    config = SyncConfig(base_url=url, token_provider=lambda: token, backoff_base=0.001,
                        backoff_cap=0.02, timeout=0.5)
    store = TaskStore.open(path, sync=config)
    store.sync.start()
    print("ready", flush=True)
    n = start
    while True:
        task = store.tasks.create({"status": "requested", "intent": "order", "note": f"n{n}"})
        store.tasks.update(task.data.id, {"status": "accepted"})
        if n % 3 == 0:
            store.tasks.delete(task.data.id)
        n += 1
    """
)


def _strip(task: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in task.items() if k not in ("versionId", "lastModified")}


def check(path: Path, server: ReferenceServer) -> str:
    rate = server.faults.rate
    server.faults.rate = 0.0
    config = SyncConfig(
        base_url=server.url, token_provider=lambda: server.token, backoff_base=0.001
    )
    try:
        with TaskStore.open(path, sync=config) as store:
            if not store.sync.flush(timeout=120):
                return f"flush did not finish: {store.sync.status()}"
            local: dict[str, dict[str, Any]] = {}
            page = store.tasks.search(limit=1000)
            while True:
                local.update({str(t.id): _strip(encode_task(t)) for t in page.data})
                if not page.meta["nextCursor"]:
                    break
                page = store.tasks.search(limit=1000, cursor=page.meta["nextCursor"])
            history = store.table_counts()["task_history"]
            status = store.sync.status()
    finally:
        server.faults.rate = rate
    if (status.dead, status.conflicts) != (0, 0):
        return f"parked changes: {status}"
    if {k: _strip(v) for k, v in server.tasks().items()} != local:
        return "server tasks differ from local tasks"
    counts = server.applied_counts()
    twice = [k for k, n in counts.items() if n != 1]
    if twice:
        return f"keys applied more than once: {twice[:5]}"
    if len(counts) != history:
        return f"{history} local changes but {len(counts)} applied"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fault-rate", type=float, default=0.25)
    parser.add_argument("--max-delay", type=float, default=0.5)
    parser.add_argument("--check-every", type=int, default=50)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    faults = Faults(
        rate=args.fault_rate,
        kinds=("drop_before", "drop_after", "error_5xx", "rate_limit", "slow"),
        slow_seconds=0.02,
        seed=args.seed,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, ReferenceServer(faults=faults) as server:
        script = Path(tmp) / "child.py"
        script.write_text(CHILD)
        path = Path(tmp) / "soak.db"
        for trial in range(args.trials):
            child = subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    str(path),
                    server.url,
                    server.token,
                    str(trial * 10**6),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                print(f"trial {trial}: the child did not start")
                return 1
            time.sleep(rng.uniform(0, args.max_delay))
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            if (trial + 1) % args.check_every == 0 or trial + 1 == args.trials:
                problem = check(path, server)
                if problem:
                    print(f"FAILED after trial {trial} (seed {args.seed}): {problem}")
                    return 1
                print(
                    f"trial {trial + 1}: ok, {len(server.tasks())} tasks, "
                    f"{len(server.applied_counts())} keys applied once, "
                    f"faults {server.faults.injected}"
                )
    print(f"soak passed: {args.trials} kills in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
