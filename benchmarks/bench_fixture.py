"""What a fresh store per test costs, beside a plain dict, in the same run (issue 17).

Rows (microseconds per "test", best of ``--rounds``, alternating the variants):

* ``dict``: a dict fixture, one insert and one filtered look-up (the floor);
* ``store open+count``: ``TaskStore.open(":memory:")``, the first query, ``close()``;
* ``store open+create+search``: open, one ``create``, one ``search``, close;
* ``no pool open+count``: the same first query on a connection the pool never saw
  (a fresh copy of the schema image, as before the pool: SQLite parses the schema).

With ``--pytest N`` it also runs generated pytest modules of N and 2N tests in real
pytest subprocesses (``task_store`` vs a dict fixture), reporting the marginal extra
cost of one test (one-time costs cancel out) and the one-time cost.

    python benchmarks/bench_fixture.py [--quick] [--rounds 5] [--pytest 1000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from clinik_local import TaskStore
from clinik_local.storage.connection import MEMORY, ConnectionOptions, open_connection
from clinik_local.storage.database import _memory_template

REQUEST = {"status": "requested", "intent": "order", "patientId": "pt_1"}


def _dict_test() -> None:
    fixture: dict[str, dict[str, object]] = {}
    fixture["t1"] = dict(REQUEST)
    [v for v in fixture.values() if v.get("patientId") == "pt_1"]


def _store_count() -> None:
    store = TaskStore.open(":memory:")
    store.tasks.count()
    store.close()


def _store_create_search() -> None:
    store = TaskStore.open(":memory:")
    store.tasks.create(REQUEST)
    store.tasks.search(patientId="pt_1")
    store.close()


def _unpooled_count() -> None:
    options = ConnectionOptions()
    conn = open_connection(MEMORY, "writer", options, image=_memory_template(options))
    conn.execute("SELECT count(*) FROM tasks").fetchall()
    conn.close()


def _per_call(fn: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def _pytest_run(body: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test_generated.py"
        path.write_text(textwrap.dedent(body).replace("N_TESTS", str(n)), encoding="utf-8")
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
            check=True,
            capture_output=True,
            cwd=tmp,
        )
        return time.perf_counter() - start


STORE_MODULE = """
import pytest

@pytest.mark.parametrize("n", range(N_TESTS))
def test_one(task_store, n):
    task_store.tasks.create({"status": "requested", "intent": "order", "patientId": "pt_1"})
    assert len(task_store.tasks.search(patientId="pt_1").data) == 1
"""
DICT_MODULE = """
import pytest

@pytest.fixture
def plain():
    yield {}

@pytest.mark.parametrize("n", range(N_TESTS))
def test_one(plain, n):
    plain["t1"] = {"status": "requested", "intent": "order", "patientId": "pt_1"}
    assert len([v for v in plain.values() if v["patientId"] == "pt_1"]) == 1
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--pytest", type=int, default=0, help="also N tests in real pytest")
    args = parser.parse_args()
    rounds, calls = (1, 50) if args.quick else (args.rounds, args.calls)
    variants: dict[str, Callable[[], None]] = {
        "dict": _dict_test,
        "store open+count": _store_count,
        "store open+create+search": _store_create_search,
        "no pool open+count": _unpooled_count,
    }
    for fn in variants.values():
        _per_call(fn, 20)  # warm up: the template image, the pool, statement caches
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], _per_call(fn, calls))
    print(f"{'per test':<28}{'us':>10}{'over dict':>12}")
    for name, us in best.items():
        print(f"{name:<28}{us:>10.1f}{us - best['dict']:>12.1f}")
    if args.pytest and not args.quick:
        n = args.pytest
        best_run: dict[tuple[str, int], float] = {}
        for _ in range(2):
            for size in (n, 2 * n):
                for name, body in (("dict", DICT_MODULE), ("store", STORE_MODULE)):
                    took = _pytest_run(body, size)
                    best_run[name, size] = min(best_run.get((name, size), took), took)
        # The marginal cost of one more test: one-time costs (imports, the first store,
        # session set-up) cancel out between the runs of n and 2n tests.
        store = (best_run["store", 2 * n] - best_run["store", n]) / n * 1e3
        plain = (best_run["dict", 2 * n] - best_run["dict", n]) / n * 1e3
        once = best_run["store", n] - best_run["dict", n] - (store - plain) * n / 1e3
        print(
            f"pytest, {n} vs {2 * n} tests: per test task_store {store:.3f} ms, dict fixture "
            f"{plain:.3f} ms: extra {store - plain:.3f} ms per test (+{once:.2f} s once: "
            "importing clinik_local, the first store)"
        )


if __name__ == "__main__":
    main()
