"""Soak: many SIGKILLed syncing children against a faulty server; nothing lost, nothing twice.

Run: ``python benchmarks/soak_sync.py [--trials 300] [--seed 1] [--fault-rate 0.25]``

The long form of ``tests/test_sync_crash.py``, with the same child and the same check
(``tests/sync_crash_child.py``): each trial starts a child process that
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clinik_local.server import Faults, ReferenceServer
from tests.sync_crash_child import command, sync_problems


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
        path = Path(tmp) / "soak.db"
        for trial in range(args.trials):
            child = subprocess.Popen(
                command(path, server.url, server.token, trial * 10**6, backoff_cap=0.02),
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
                problems, _ = sync_problems(path, server)
                if problems:
                    print(f"FAILED after trial {trial} (seed {args.seed}): {problems}")
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
