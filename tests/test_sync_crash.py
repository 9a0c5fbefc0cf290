"""A real child process syncing is SIGKILLed at random moments; nothing is lost or applied twice.

The reference server runs in the test process; each child opens a file store with sync
to it, writes tasks in a loop with the background worker running (some requests are
dropped, slowed or refused by the server), and is killed with SIGKILL at a random
moment (seeded, so a failure can be replayed). A fresh store on the same file then
flushes: the server must hold exactly the local tasks, every idempotency key applied
once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

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
                        backoff_cap=0.01, timeout=0.5)
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

TRIALS = 20
SEED = int(os.environ.get("CLINIK_CRASH_SEED", "20250201"))


def _strip(task: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in task.items() if k not in ("versionId", "lastModified")}


def _local(store: TaskStore) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    page = store.tasks.search(limit=1000)
    while True:
        for task in page.data:
            out[str(task.id)] = _strip(encode_task(task))
        cursor = page.meta["nextCursor"]
        if not cursor:
            return out
        page = store.tasks.search(limit=1000, cursor=cursor)


@pytest.mark.slow
def test_sigkilled_syncing_child_loses_nothing_and_applies_nothing_twice(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    faults = Faults(
        rate=0.2, kinds=("drop_before", "drop_after", "error_5xx", "slow"), slow_seconds=0.02
    )
    with ReferenceServer(token="crash-token", faults=faults) as server:
        path = tmp_path / "crash.db"
        for trial in range(TRIALS):
            child = subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    str(path),
                    server.url,
                    server.token,
                    str(trial * 1000),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready", child.stderr
            time.sleep(rng.uniform(0.0, 0.25))  # the random moment of the crash
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            child.stdout.close()
            assert child.stderr is not None
            child.stderr.close()
            assert child.returncode == -signal.SIGKILL
        server.faults.rate = 0.0
        config = SyncConfig(
            base_url=server.url,
            token_provider=lambda: server.token,
            backoff_base=0.001,
            backoff_cap=0.01,
        )
        with TaskStore.open(path, sync=config) as store:
            assert store.sync.flush(timeout=30)
            local = _local(store)
            history = store.table_counts()["task_history"]
            status = store.sync.status()
        assert (status.pending, status.in_flight, status.dead, status.conflicts) == (0, 0, 0, 0)
        assert {k: _strip(v) for k, v in server.tasks().items()} == local
        counts = server.applied_counts()
        assert set(counts.values()) == {1}
        assert len(counts) == history  # every local change applied, exactly once
        assert len(local) > TRIALS  # the children did get work done before dying
