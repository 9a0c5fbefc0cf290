"""What a fresh store per test costs, beside a plain dict, in the same run (issue 17).

Rows (microseconds per "test", best of ``--rounds``, alternating the variants):

* ``dict``: a dict fixture, one insert and one filtered look-up (the floor);
* ``store open+count``: ``TaskStore.open(":memory:")``, the first query, ``close()``;
* ``store open+create+search``: open, one ``create``, one ``search``, close;
* ``no pool open+count``: the same first query on a connection the pool never saw
  (a fresh copy of the schema image, as before the pool: SQLite parses the schema).

With ``--pytest N`` it also runs generated pytest modules of N and 2N tests in real
pytest subprocesses (``task_store`` vs a dict fixture, alternating, best of
``--pytest-rounds``), reporting two estimates of the store's extra cost per test:

* marginal: (time of 2N tests - time of N tests) / N, store minus dict (one-time costs,
  such as importing clinik_local and the first store, cancel out);
* median: the median duration of one test's whole run protocol (set-up, call,
  teardown, reporting), measured inside the session by a small plugin, store minus
  dict (robust to the other processes on a shared machine).

    python benchmarks/bench_fixture.py [--quick] [--rounds 5] [--pytest 1000]
"""

from __future__ import annotations

import argparse
import os
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


#: A plugin timing each test's run protocol; prints the median in microseconds.
TIMING_PLUGIN = """
import statistics, time
import pytest

_took = []

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.perf_counter()
    yield
    _took.append(time.perf_counter() - start)

def pytest_unconfigure(config):
    print(f"\\nMEDIAN_US {statistics.median(_took) * 1e6:.1f}")
"""


_PYTHONPATH = os.environ.get("PYTHONPATH", "")


def _pytest_run(body: str, n: int, python: str = sys.executable) -> tuple[float, float]:
    """Seconds for a whole pytest session of ``n`` generated tests (run by ``python``),
    and the median microseconds of one test's protocol inside it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test_generated.py"
        path.write_text(textwrap.dedent(body).replace("N_TESTS", str(n)), encoding="utf-8")
        (Path(tmp) / "bench_timing.py").write_text(TIMING_PLUGIN, encoding="utf-8")
        command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        start = time.perf_counter()
        done = subprocess.run(
            [*command, "-p", "bench_timing", str(path)],
            check=True,
            capture_output=True,
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (tmp, _PYTHONPATH)))},
            text=True,
        )
        took = time.perf_counter() - start
        median = float(done.stdout.rsplit("MEDIAN_US", 1)[1].split()[0])
        return took, median


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
    parser.add_argument("--pytest-rounds", type=int, default=2)
    parser.add_argument(
        "--baseline-python",
        help="also run the store sessions with this interpreter (another checkout's venv), "
        "alternating with this one: before/after in the same run",
    )
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
        sessions = [("dict", DICT_MODULE, sys.executable), ("store", STORE_MODULE, sys.executable)]
        if args.baseline_python:
            sessions.append(("baseline store", STORE_MODULE, args.baseline_python))
        best_run: dict[tuple[str, int], float] = {}
        medians: dict[str, float] = {}
        for _ in range(args.pytest_rounds):
            for size in (n, 2 * n):
                for name, body, python in sessions:
                    took, median = _pytest_run(body, size, python)
                    best_run[name, size] = min(best_run.get((name, size), took), took)
                    medians[name] = min(medians.get(name, median), median)
        # The marginal cost of one more test: one-time costs (imports, the first store,
        # session set-up) cancel out between the runs of n and 2n tests.
        plain = (best_run["dict", 2 * n] - best_run["dict", n]) / n * 1e3
        print(
            f"pytest, dict fixture: {plain:.3f} ms per test, "
            f"median protocol {medians['dict']:.1f} us"
        )
        for name, _, _ in sessions[1:]:
            store = (best_run[name, 2 * n] - best_run[name, n]) / n * 1e3
            once = best_run[name, n] - best_run["dict", n] - (store - plain) * n / 1e3
            print(
                f"pytest, {name}: {n} vs {2 * n} tests: {store:.3f} ms per test, extra "
                f"{store - plain:.3f} ms (+{once:.2f} s once: imports, the first store); "
                f"median protocol {medians[name]:.1f} us, extra "
                f"{medians[name] - medians['dict']:.1f} us per test"
            )


if __name__ == "__main__":
    main()
