"""Decode+validate and encode of the seed lab order, beside a bare Task(...) in the same run.

    python benchmarks/bench_codec.py            # 20,000 rounds, best of 7
    python benchmarks/bench_codec.py --quick    # CI smoke run

Goal (issue 3): decode+validate <= 4x a bare Task(...) construction. Ratios, not
wall-clock, because the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable

from clinik_local import Period, Task, TaskInputOutput, TaskIntent, TaskPriority, TaskStatus
from clinik_local.codec import decode_task, encode_task, task_from_stored
from clinik_local.demo import SEED_LAB_ORDER


def bare() -> Task:
    return Task(
        status=TaskStatus.REQUESTED,
        intent=TaskIntent.ORDER,
        priority=TaskPriority.URGENT,
        code="lab-order",
        description="Order CBC and CMP for pre-operative assessment",
        patient_id="pt_abc123",
        encounter_id="enc_xyz789",
        requester_id="prac_def456",
        owner_id="prac_lab_tech",
        execution_period=Period("2025-02-01T08:00:00.000Z", "2025-02-01T17:00:00.000Z"),
        input=(TaskInputOutput("lab-panel", "CBC"), TaskInputOutput("lab-panel", "CMP")),
        note="Patient is NPO after midnight. Draw labs before 10am.",
        authored_on="2025-01-31T09:00:00.000Z",
    )


def best_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    args = parser.parse_args()
    number, repeat = (500, 2) if args.quick else (args.number, args.repeat)

    task = decode_task(SEED_LAB_ORDER)
    stored = json.dumps(encode_task(task))
    rows = [
        ("bare Task(...) construction", best_us(bare, number, repeat)),
        (
            "decode+validate seed request",
            best_us(lambda: decode_task(SEED_LAB_ORDER), number, repeat),
        ),
        ("encode Task -> wire dict", best_us(lambda: encode_task(task), number, repeat)),
        (
            "read stored body (loads+build)",
            best_us(lambda: task_from_stored(json.loads(stored)), number, repeat),
        ),
    ]
    base = rows[0][1]
    print(f"{'step':<34} {'µs/task':>9} {'x bare':>8}")
    for name, us in rows:
        print(f"{name:<34} {us:>9.2f} {us / base:>8.2f}")
    ratio = rows[1][1] / base
    print(f"\ndecode+validate / bare = {ratio:.2f} (goal <= 4)")


if __name__ == "__main__":
    main()
