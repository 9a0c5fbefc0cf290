"""A real child process syncing is SIGKILLed at random moments; nothing is lost or applied twice.

The reference server runs in the test process; each child opens a file store with sync
to it, writes tasks in a loop with the background worker running (some requests are
dropped, slowed or refused by the server), and is killed with SIGKILL at a random
moment (seeded, so a failure can be replayed). A fresh store on the same file then
flushes: the server must hold exactly the local tasks, every idempotency key applied
once. The child and the check are ``tests/sync_crash_child.py`` (``benchmarks/soak_sync.py``
runs the same for hundreds of kills).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from clinik_local.server import Faults, ReferenceServer
from tests.sync_crash_child import command, sync_problems

TRIALS = 20
SEED = int(os.environ.get("CLINIK_CRASH_SEED", "20250201"))


@pytest.mark.slow
def test_sigkilled_syncing_child_loses_nothing_and_applies_nothing_twice(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    faults = Faults(
        rate=0.2, kinds=("drop_before", "drop_after", "error_5xx", "slow"), slow_seconds=0.02
    )
    with ReferenceServer(token="crash-token", faults=faults) as server:
        path = tmp_path / "crash.db"
        for trial in range(TRIALS):
            child = subprocess.Popen(
                command(path, server.url, server.token, trial * 1000),
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
        problems, local = sync_problems(path, server, timeout=30)
        assert problems == []
        assert local > TRIALS  # the children did get work done before dying
