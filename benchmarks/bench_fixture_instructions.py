"""Instructions (and simulated cache misses) per phase of a fixture store's test, by valgrind.

On a machine shared with other work, wall-clock timings of a few hundred microseconds
move by tens of percent from run to run (``bench_fixture.py``, ``bench_cold_phases.py``).
Counting instead of timing is not moved by the neighbours: this runs a loop of
``TaskStore.open(":memory:")`` [+ one ``create`` [+ one ``search``]] + ``close()``
under ``valgrind --tool=cachegrind`` with 100 and 400 iterations, and reports the
difference per iteration (start-up, imports and the template cancel out), so each phase
is: ``open+close``, ``create`` and ``search``. ``--baseline-python`` runs the same with
another checkout's interpreter, for a before/after ratio:

    python benchmarks/bench_fixture_instructions.py --baseline-python ../main/.venv/bin/python

Instructions are not time (a cache miss costs far more than an instruction), so the
I1/D1 misses of a 32 KiB L1 are shown beside them. Needs ``valgrind`` on the PATH.

``--pytest`` counts inside real pytest sessions instead: bench_fixture.py's generated
modules (one ``create`` and one ``search`` on ``task_store``, against the same on a dict
in a no-op fixture) of 100 and 300 tests, and prints what one more test costs, store
minus dict: the deterministic twin of bench_fixture.py's timed ``--pytest`` (which a
busy neighbour moves by half), pytest's own work slowed by the store's included. About
five minutes: valgrind runs pytest some 50 times slower.

    python benchmarks/bench_fixture_instructions.py --pytest [--baseline-python ...]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from bench_fixture import DICT_MODULE, STORE_MODULE

#: The measured loop (run as ``python -c LOOP MODE N GC``); the warm-up builds the
#: template. The cyclic GC is off (GC ``off``): a collection falls in one run's count
#: and not in the other's, and one gen-2 collection outweighs hundreds of iterations.
#: (So a reference cycle's cost is not counted here; ``bench_fixture.py`` sees it.)
LOOP = """
import gc, sys
from clinik_local import TaskStore
if sys.argv[3] == "off":
    gc.disable()
REQUEST = {"status": "requested", "intent": "order", "patientId": "pt_1"}
mode, n = sys.argv[1], int(sys.argv[2])
for _ in range(20):
    with TaskStore.open(":memory:") as store:
        store.tasks.create(REQUEST)
        store.tasks.search(patientId="pt_1")
for _ in range(n):
    store = TaskStore.open(":memory:")
    if mode != "open+close":
        store.tasks.create(REQUEST)
    if mode == "full":
        store.tasks.search(patientId="pt_1")
    store.close()
"""
MODES = ("open+close", "create", "full")
#: Where and with what environment every run of :data:`LOOP` runs, counted or not: not
#: a checkout (``-c`` puts the cwd first on sys.path), a fixed hash seed, no PYTHON*.
_RUN_IN: dict[str, Any] = {
    "cwd": tempfile.gettempdir(),
    "env": {"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"},
}
COUNTS = {"instr": "I   refs", "I1 miss": "I1  misses", "D1 miss": "D1  misses"}


def _counts(python: str, mode: str, n: int, gc: str = "off") -> dict[str, int]:
    """Cachegrind's totals for :data:`LOOP` in ``mode`` with ``n`` iterations."""
    return _valgrind(python, ["-c", LOOP, mode, str(n), gc])


def _valgrind(python: str, argv: list[str]) -> dict[str, int]:
    """Cachegrind's totals (:data:`COUNTS`) for ``python argv...`` (paths in ``argv``
    absolute: it runs where :data:`_RUN_IN` says)."""
    done = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=yes",
            "--I1=32768,8,64",
            "--D1=32768,8,64",
            "--LL=2097152,16,64",
            "--cachegrind-out-file=/dev/null",
            python,
            *argv,
        ],
        capture_output=True,
        text=True,
        check=True,
        **_RUN_IN,
    )
    found: dict[str, int] = {}
    for name, label in COUNTS.items():
        match = re.search(re.escape(label) + r":\s+([\d,]+)", done.stderr)
        if match is None:
            raise SystemExit(f"no {label!r} in valgrind's output:\n{done.stderr[-800:]}")
        found[name] = int(match.group(1).replace(",", ""))
    return found


def _pytest_counts(python: str, module: str, n: int, *, counted: bool = True) -> dict[str, int]:
    """Cachegrind's totals for a whole pytest session of ``module`` with ``n`` tests
    (``counted=False``: the same session outside valgrind, for its side effects only:
    the ``.pyc`` of a module edited since its last import is written then; no totals)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test_generated.py"
        path.write_text(textwrap.dedent(module).replace("N_TESTS", str(n)), encoding="utf-8")
        argv = ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)]
        if not counted:
            subprocess.run([python, *argv], check=True, capture_output=True, **_RUN_IN)
            return {}
        return _valgrind(python, argv)


def _per_pytest_test(python: str, module: str, low: int, high: int) -> dict[str, float]:
    _pytest_counts(python, module, 2, counted=False)
    a, b = _pytest_counts(python, module, low), _pytest_counts(python, module, high)
    return {k: (b[k] - a[k]) / (high - low) for k in COUNTS}


def _pytest_main(args: argparse.Namespace) -> None:
    low, high = 100, 300
    runs = [("this", sys.executable)]
    if args.baseline_python:
        runs.insert(0, ("baseline", args.baseline_python))
    plain = _per_pytest_test(sys.executable, DICT_MODULE, low, high)
    print(f"{'per pytest test':<28}" + "".join(f"{k:>14}" for k in COUNTS))
    print(f"{'dict fixture':<28}" + "".join(f"{plain[k]:>14,.0f}" for k in COUNTS))
    for name, python in runs:
        store = _per_pytest_test(python, STORE_MODULE, low, high)
        cells = "".join(f"{store[k] - plain[k]:>14,.0f}" for k in COUNTS)
        print(f"{name + ' task_store, extra':<28}{cells}")


def _warm(python: str) -> None:
    """Run the loop once outside valgrind: a module edited since its last import is
    compiled (and its ``.pyc`` written) here, not inside the first counted run only."""
    subprocess.run(
        [python, "-c", LOOP, "full", "1", "off"],
        check=True,
        capture_output=True,
        **_RUN_IN,
    )


def _per_phase(python: str, low: int, high: int) -> dict[str, dict[str, float]]:
    _warm(python)
    per_iteration: dict[str, dict[str, float]] = {}
    for mode in MODES:
        a, b = _counts(python, mode, low), _counts(python, mode, high)
        per_iteration[mode] = {k: (b[k] - a[k]) / (high - low) for k in COUNTS}
    return {
        "open+close": per_iteration["open+close"],
        "create": {k: per_iteration["create"][k] - per_iteration["open+close"][k] for k in COUNTS},
        "search": {k: per_iteration["full"][k] - per_iteration["create"][k] for k in COUNTS},
        "whole test": per_iteration["full"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run (CI): one short loop, counted"
    )
    parser.add_argument("--baseline-python", help="another checkout's interpreter: before")
    parser.add_argument(
        "--pytest", action="store_true", help="count inside pytest sessions (about 5 minutes)"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing measured")
        return
    if args.pytest and not args.quick:
        _pytest_main(args)
        return
    if args.quick:
        whole = _counts(sys.executable, "full", 2)
        print("smoke run, 22 stores in all:", ", ".join(f"{k} {v:,}" for k, v in whole.items()))
        return
    low, high = 100, 400
    runs = [("this", sys.executable)]
    if args.baseline_python:
        runs.insert(0, ("baseline", args.baseline_python))
    results = {name: _per_phase(python, low, high) for name, python in runs}
    print(f"{'per test':<12}" + "".join(f"{n + ' ' + k:>20}" for n, _ in runs for k in COUNTS))
    for phase in results["this"]:
        cells = [results[n][phase][k] for n, _ in runs for k in COUNTS]
        print(f"{phase:<12}" + "".join(f"{c:>20,.0f}" for c in cells))
    if args.baseline_python:
        for phase in results["this"]:
            ratios = " ".join(
                f"{k} {results['this'][phase][k] / results['baseline'][phase][k]:.2f}"
                for k in COUNTS
                if results["baseline"][phase][k] > 0
            )
            print(f"{phase:<12} this/baseline: {ratios}")


if __name__ == "__main__":
    main()
