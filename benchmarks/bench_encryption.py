"""Encrypted vs plaintext TaskStore, in the same run, samples alternated (issue 14).

    python benchmarks/bench_encryption.py                 # 20,000 tasks, the store's cipher
    python benchmarks/bench_encryption.py --ciphers all   # also the alternatives below
    python benchmarks/bench_encryption.py --quick         # CI smoke run

Measures, for a plaintext store and an encrypted one side by side (each sample taken
on one, then the other): bulk create (create_many, tasks/s), single create p50/p99,
get by id p50, one search page (50 tasks, status filter) p50, and open time (open,
first read, close) p50. Prints the encrypted/plain ratio of each against the goals
(reads <= 1.5x, writes <= 2x, open <= 50 ms).

Cipher alternatives (``--ciphers``), each in its own child process so that the
process-wide SQLite3MC settings stay one per process; each child measures its own
plaintext baseline again:

``aegis``           the store's setting: AEGIS-256, Argon2id (2 passes, 19 MiB)
``chacha20``        SQLite3MC's default: ChaCha20-Poly1305, PBKDF2-SHA256 64,007 iterations
``chacha20-kdf1``   the same with kdf_iter=1: a raw, high-entropy key, no KDF to speak of
``aes256cbc``       AES-256-CBC, no per-page authentication (a flipped byte is not caught)
``aes128cbc``       AES-128-CBC, no per-page authentication

"get p50" reads right after a write (every write makes SQLite drop a reader's page
cache, so the pages are read and decrypted again: the worst case); "get warm" reads in
a row, from the cache. "open" is ``TaskStore.open`` (the writer: one key derivation);
"open + 1st read" adds the first read, on the thread's own reader (a second one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from clinik_local import TaskStore
from clinik_local.demo import SEED_LAB_ORDER, generate_requests
from clinik_local.storage import encryption

CIPHERS: dict[str, tuple[tuple[str, str], ...]] = {
    "aegis": encryption.CIPHER,
    "chacha20": (("cipher", "'chacha20'"), ("kdf_iter", "64007")),
    "chacha20-kdf1": (("cipher", "'chacha20'"), ("kdf_iter", "1")),
    "aes256cbc": (("cipher", "'aes256cbc'"),),
    "aes128cbc": (("cipher", "'aes128cbc'"),),
}
GOALS = {"read": 1.5, "write": 2.0}
KEY = "bench-passphrase-0123456789"


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(tasks: int, samples: int, directory: Path) -> dict[str, dict[str, float]]:
    """The metrics for "plain" and "encrypted", samples alternating between the two."""
    paths = {"plain": directory / "plain.db", "encrypted": directory / "encrypted.db"}
    keys = {"plain": None, "encrypted": lambda: KEY}
    stores = {name: TaskStore.open(paths[name], key=keys[name]) for name in paths}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in stores}

    def add(name: str, metric: str, value: float) -> None:
        results[name].setdefault(metric, []).append(value)

    requests = list(generate_requests(tasks, seed=11))
    chunk = max(1, min(1000, tasks // 10))
    for start in range(0, tasks, chunk):
        part = requests[start : start + chunk]
        for name, store in stores.items():
            fresh = [{k: v for k, v in r.items() if k != "id"} for r in part]
            add(name, "bulk", len(part) / _timed(partial(store.tasks.create_many, fresh)))
    ids = {name: [str(t.id) for t in s.tasks.search(limit=200).data] for name, s in stores.items()}
    for i in range(samples):
        for name, store in stores.items():
            add(name, "create", _timed(partial(store.tasks.create, SEED_LAB_ORDER)))
            task_id = ids[name][i % len(ids[name])]
            add(name, "get", _timed(partial(store.tasks.get, task_id)))
            add(name, "search", _timed(partial(store.tasks.search, status="requested", limit=50)))
    for i in range(samples):
        for name, store in stores.items():
            task_id = ids[name][i % len(ids[name])]
            add(name, "get_warm", _timed(partial(store.tasks.get, task_id)))
    for store in stores.values():
        store.close()
    for _ in range(max(5, samples // 20)):
        for name in stores:

            def open_read_close(n: str = name) -> None:
                with TaskStore.open(paths[n], key=keys[n]) as s:
                    s.tasks.count()

            add(name, "open_read", _timed(open_read_close))

            def open_close(n: str = name) -> None:
                TaskStore.open(paths[n], key=keys[n]).close()

            add(name, "open", _timed(open_close))
    summary: dict[str, dict[str, float]] = {}
    for name, metrics in results.items():
        summary[name] = {
            "bulk": statistics.median(metrics["bulk"]),
            "create_p50": _p(metrics["create"], 0.5),
            "create_p99": _p(metrics["create"], 0.99),
            "get_p50": _p(metrics["get"], 0.5),
            "get_warm": _p(metrics["get_warm"], 0.5),
            "search_p50": _p(metrics["search"], 0.5),
            "open_p50": _p(metrics["open"], 0.5),
            "open_read_p50": _p(metrics["open_read"], 0.5),
        }
    return summary


def report(cipher: str, summary: dict[str, dict[str, float]]) -> list[str]:
    plain, enc = summary["plain"], summary["encrypted"]

    def us(metric: str) -> str:
        return f"{enc[metric] * 1e6:,.0f} us (plain {plain[metric] * 1e6:,.0f} us)"

    rows = [
        ("bulk create", "write", plain["bulk"] / enc["bulk"], f"{enc['bulk']:,.0f} tasks/s"),
        ("create p50", "write", enc["create_p50"] / plain["create_p50"], us("create_p50")),
        ("create p99", "write", enc["create_p99"] / plain["create_p99"], us("create_p99")),
        ("get p50", "read", enc["get_p50"] / plain["get_p50"], us("get_p50")),
        ("get warm p50", "read", enc["get_warm"] / plain["get_warm"], us("get_warm")),
        ("search page p50", "read", enc["search_p50"] / plain["search_p50"], us("search_p50")),
    ]
    lines = [f"cipher {cipher}"]
    for label, kind, ratio, extra in rows:
        verdict = "ok" if ratio <= GOALS[kind] else f"MISSES the {GOALS[kind]}x goal"
        lines.append(f"  {label:<16} {ratio:5.2f}x plain  {verdict}  {extra}".rstrip())
    for label, metric in (("open", "open_p50"), ("open + 1st read", "open_read_p50")):
        open_ms = enc[metric] * 1000
        verdict = "ok" if open_ms <= 50 else "MISSES the 50 ms goal"
        lines.append(
            f"  {label:<16} {open_ms:5.1f} ms (plain {plain[metric] * 1000:.1f} ms)  {verdict}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    parser.add_argument(
        "--ciphers",
        default="aegis",
        help=f"comma-separated, or 'all' ({', '.join(CIPHERS)}); default: the store's",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: measure this cipher
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.samples = 500, 60
    if args.one:
        encryption.CIPHER = CIPHERS[args.one]
        with tempfile.TemporaryDirectory() as tmp:
            print("\n".join(report(args.one, measure(args.tasks, args.samples, Path(tmp)))))
        return
    names = list(CIPHERS) if args.ciphers == "all" else args.ciphers.split(",")
    unknown = [n for n in names if n not in CIPHERS]
    if unknown:
        parser.error(f"unknown cipher(s) {unknown}; known: {', '.join(CIPHERS)}")
    print(f"encrypted vs plaintext store, {args.tasks:,} tasks, {args.samples} samples each")
    for name in names:
        child = [sys.executable, __file__, "--one", name]
        child += ["--tasks", str(args.tasks), "--samples", str(args.samples)]
        subprocess.run(child, check=True, env=os.environ)


if __name__ == "__main__":
    main()
