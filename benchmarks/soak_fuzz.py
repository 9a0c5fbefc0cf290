"""Fuzz soak: tests/test_fuzz.py with many more hypothesis examples.

The four property tests there each draw ``CLINIK_FUZZ_EXAMPLES`` examples (300 in CI);
this sets it to ``--examples`` (default 6,000: more than 20,000 in all) and runs them
with pytest, printing hypothesis' statistics. Exits with pytest's status.

    python benchmarks/soak_fuzz.py --examples 6000
    # the same by hand:
    CLINIK_FUZZ_EXAMPLES=6000 python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=6000, help="examples per property")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed")
    args = parser.parse_args(argv)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_fuzz.py",
        "--hypothesis-show-statistics",
    ]
    if args.seed is not None:
        command.append(f"--hypothesis-seed={args.seed}")
    env = {**os.environ, "CLINIK_FUZZ_EXAMPLES": str(args.examples)}
    started = time.perf_counter()
    status = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    print(
        f"fuzz soak: {args.examples} examples x 4 properties = {4 * args.examples} "
        f"examples; pytest exit {status}; {time.perf_counter() - started:.0f} s"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
