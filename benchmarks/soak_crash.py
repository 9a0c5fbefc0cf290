"""Crash soak: many SIGKILL trials of the crash harness (tests/crash_child.py).

Each trial starts a real child process writing a seeded random mix of creates, updates,
deletes and batches to a fresh store file, kills it with SIGKILL after a seeded number
of reported writes, reopens the file and checks it (integrity_check; every reported
write present exactly; no half-written task; history and outbox one row per change;
the store writable again). Prints one line per failing trial and a summary; exits 1
on any failure. Replay one trial with ``--trials 1 --seed <its seed>``.

    python benchmarks/soak_crash.py --trials 500 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.crash_child import run_trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-writes", type=int, default=300)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    failures = writes = in_flight = 0
    durability: dict[str, int] = {}
    for n in range(args.trials):
        seed = args.seed + n
        with tempfile.TemporaryDirectory(prefix="clinik-crash-") as tmp:
            result = run_trial(Path(tmp) / "crash.db", seed, max_writes=args.max_writes)
        writes += result.writes
        in_flight += result.killed_in_flight
        durability[result.durability] = durability.get(result.durability, 0) + 1
        if result.problems:
            failures += 1
            print(f"FAIL seed={seed}: {result.problems[:5]}", flush=True)
    elapsed = time.perf_counter() - started
    print(
        f"{args.trials} trials (seeds {args.seed}..{args.seed + args.trials - 1}), "
        f"{failures} failed; {writes} reported writes checked; "
        f"{in_flight} kills with a write under way; durability {durability}; "
        f"{elapsed:.1f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
