"""Per-phase cost of a fixture store's test with the CPU caches cold, as inside pytest.

Between two pytest tests, pytest's own work evicts the CPU caches, so the store's calls
run slower than in a plain loop. This loop touches 2 MiB between iterations to get the
same effect, and prints the median microseconds of each phase of one test: ``open``
(``TaskStore.open(":memory:")``), ``create`` (one task), ``search`` (one filter) and
``close``. Compare two checkouts by alternating their interpreters in one shell loop:

    for i in 1 2 3; do A/.venv/bin/python benchmarks/bench_cold_phases.py
                       B/.venv/bin/python benchmarks/bench_cold_phases.py; done
"""

from __future__ import annotations

import argparse
import statistics
import time

from clinik_local import TaskStore

REQUEST = {"status": "requested", "intent": "order", "patientId": "pt_1"}
_EVICT = bytearray(2 << 20)


def _evict_caches() -> None:
    for i in range(0, len(_EVICT), 64):  # one write per cache line
        _EVICT[i] = (_EVICT[i] + 1) & 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 iterations")
    args = parser.parse_args()
    if args.quick:
        args.iterations = 20
    for _ in range(50):  # warm up: the template image, the pool, statement caches
        with TaskStore.open(":memory:") as store:
            store.tasks.create(REQUEST)
            store.tasks.search(patientId="pt_1")
    phases: dict[str, list[float]] = {k: [] for k in ("open", "create", "search", "close")}
    clock = time.perf_counter
    for _ in range(args.iterations):
        _evict_caches()
        t0 = clock()
        store = TaskStore.open(":memory:")
        t1 = clock()
        store.tasks.create(REQUEST)
        t2 = clock()
        store.tasks.search(patientId="pt_1")
        t3 = clock()
        store.close()
        t4 = clock()
        for name, took in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[name].append(took)
    medians = {name: statistics.median(took) * 1e6 for name, took in phases.items()}
    print(" ".join(f"{name}={us:.0f}" for name, us in medians.items()), end=" ")
    print(f"total={sum(medians.values()):.0f} (median us, caches cold)")


if __name__ == "__main__":
    main()
