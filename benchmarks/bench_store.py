"""TaskStore vs raw apsw on the same schema, in the same run (issue 4).

    python benchmarks/bench_store.py                  # 100,000 tasks
    python benchmarks/bench_store.py --tasks 1000000  # 1M
    python benchmarks/bench_store.py --quick          # CI smoke run

Raw apsw writes the same rows into a file made from the same schema.sql (so the
same indexes and triggers), with prepared rows and no validation: the gap is what
the library adds (validation, encoding, ids, history/outbox bookkeeping, decoding
into Task objects). Reads compare against raw fetch + json.loads of the body.
Ratios are the point: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw

from clinik_local import TaskStore, encode_task
from clinik_local.codec import decode_task
from clinik_local.demo import SEED_LAB_ORDER, generate_requests
from clinik_local.ids import new_change_id, new_task_id
from clinik_local.tasks import _INSERT_HISTORY, _INSERT_TASK, _row

_INSERT_OUTBOX = (
    "INSERT INTO outbox (change_id, task_id, op, payload, base_version, created_at) "
    "VALUES (?, ?, 'create', ?, NULL, ?)"
)
_FILTERS = [
    ("patientId", "patient_id", "pt_000042"),
    ("ownerId", "owner_id", "prac_007"),
    ("requesterId", "requester_id", "prac_123"),
    ("status", "status", "in-progress"),
    ("priority", "priority_rank", "stat"),  # the priority index is on the clinical rank
    ("code", "code", "lab-order"),
]


def timings(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.99))]


def prepared_rows(requests: list[dict[str, Any]]) -> list[tuple[tuple[object, ...], str]]:
    """Rows exactly as the store would write them, built before timing starts."""
    out = []
    for request in requests:
        task = decode_task(request)
        object.__setattr__(task, "id", new_task_id())
        object.__setattr__(task, "version_id", "1")
        object.__setattr__(task, "last_modified", task.authored_on)
        body = json.dumps(encode_task(task), separators=(",", ":"))
        out.append((_row(task, 1, body), body))
    return out


def raw_bulk(conn: apsw.Connection, rows: list[tuple[tuple[object, ...], str]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(_INSERT_TASK, [r for r, _ in rows])
    conn.executemany(_INSERT_HISTORY, [(r[0], 1, "create", b, r[14], None) for r, b in rows])
    conn.executemany(_INSERT_OUTBOX, [(new_change_id(), r[0], b, r[14]) for r, b in rows])
    conn.execute("COMMIT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    args = parser.parse_args()
    count, samples = (2000, 100) if args.quick else (args.tasks, args.samples)
    results: list[tuple[str, str, str, str]] = []

    with tempfile.TemporaryDirectory() as tmp:
        ours_path = Path(tmp) / "ours.db"
        raw_path = Path(tmp) / "raw.db"
        TaskStore.open(raw_path).close()  # same schema.sql, same indexes and triggers
        raw = apsw.Connection(str(raw_path))
        raw.pragma("synchronous", "NORMAL")
        store = TaskStore.open(ours_path)

        # --- bulk create ----------------------------------------------------------
        requests = list(generate_requests(count, seed=11))
        chunk = 5000
        t0 = time.perf_counter()
        for i in range(0, count, chunk):
            store.tasks.create_many(requests[i : i + chunk])
        ours_bulk = count / (time.perf_counter() - t0)
        rows = prepared_rows(requests)
        t0 = time.perf_counter()
        for i in range(0, count, chunk):
            raw_bulk(raw, rows[i : i + chunk])
        raw_rate = count / (time.perf_counter() - t0)
        results.append(
            (
                "bulk create (create_many vs executemany)",
                f"{ours_bulk:,.0f}/s",
                f"{raw_rate:,.0f}/s",
                f"{ours_bulk / raw_rate:.2f}x rate (goal >= 0.6)",
            )
        )
        del rows

        # --- single create with its outbox row ------------------------------------
        ours_single = timings(lambda: store.tasks.create(SEED_LAB_ORDER), samples)
        single_rows = prepared_rows([SEED_LAB_ORDER] * samples)
        it = iter(single_rows)

        def raw_single() -> None:
            row, body = next(it)
            raw.execute("BEGIN IMMEDIATE")
            raw.execute(_INSERT_TASK, row)
            raw.execute(_INSERT_OUTBOX, (new_change_id(), row[0], body, row[14]))
            raw.execute("COMMIT")

        raw_single_t = timings(raw_single, samples)
        results.append(
            (
                "single create + outbox, p50",
                f"{p50(ours_single):.0f} µs",
                f"{p50(raw_single_t):.0f} µs",
                f"{p50(ours_single) / p50(raw_single_t):.2f}x (goal <= 2)",
            )
        )
        results.append(
            (
                "single create + outbox, p99",
                f"{p99(ours_single):.0f} µs",
                f"{p99(raw_single_t):.0f} µs",
                f"goal p99 <= 2000 µs: {p99(ours_single) <= 2000}",
            )
        )

        # --- get by id ---------------------------------------------------------------
        ids = [r[0] for r in raw.execute("SELECT id FROM tasks ORDER BY random() LIMIT 500")]
        ours_ids = [
            r[0]
            for r in apsw.Connection(str(ours_path)).execute(
                "SELECT id FROM tasks ORDER BY random() LIMIT 500"
            )
        ]
        k = 0

        def ours_get() -> None:
            nonlocal k
            store.tasks.get(ours_ids[k % len(ours_ids)])
            k += 1

        def raw_get() -> None:
            nonlocal k
            (body,) = raw.execute(
                "SELECT body FROM tasks WHERE id = ?", (ids[k % len(ids)],)
            ).fetchall()[0]
            json.loads(str(body))
            k += 1

        g_ours, g_raw = timings(ours_get, samples), timings(raw_get, samples)
        results.append(
            (
                "get by id (vs fetch + json.loads)",
                f"{p50(g_ours):.1f} µs",
                f"{p50(g_raw):.1f} µs",
                f"{p50(g_ours) / p50(g_raw):.2f}x (goal <= 2)",
            )
        )

        # --- first page of 50 per filter ------------------------------------------------
        n_pages = max(samples // 10, 20)
        for name, column, value in _FILTERS:
            ours_t = timings(
                functools.partial(store.tasks.search, {name: value}, limit=50), n_pages
            )
            sql = (
                f"SELECT body FROM tasks WHERE {column} = ? "
                "ORDER BY authored_on DESC, id DESC LIMIT 51"
            )

            bound: object = 0 if column == "priority_rank" else value  # stat's rank is 0

            def raw_page(s: str = sql, v: object = bound) -> None:
                [json.loads(str(r[0])) for r in raw.execute(s, (v,)).fetchall()]

            raw_t = timings(raw_page, n_pages)
            results.append(
                (
                    f"first page of 50, {name}",
                    f"{p50(ours_t):.0f} µs",
                    f"{p50(raw_t):.0f} µs",
                    f"{p50(ours_t) / p50(raw_t):.2f}x (goal <= 2)",
                )
            )

        # --- a page at depth vs the first page -------------------------------------------
        cursor: str | None = None
        seen = 0
        depth = max(count - 100, 0)
        while seen < depth:
            page = store.tasks.search(
                limit=min(1000, depth - seen), **({"cursor": cursor} if cursor else {})
            )
            seen += len(page.data)
            cursor = str(page.meta["nextCursor"])
        first = timings(lambda: store.tasks.search(limit=50), n_pages)
        deep = timings(lambda: store.tasks.search(limit=50, cursor=cursor), n_pages)
        results.append(
            (
                f"page of 50 at depth {depth:,}",
                f"{p50(deep):.0f} µs",
                f"first {p50(first):.0f} µs",
                f"{p50(deep) / p50(first):.2f}x first page (goal <= 1.5)",
            )
        )

        # --- fresh :memory: store -----------------------------------------------------------
        TaskStore.open(":memory:").close()
        mem = timings(lambda: TaskStore.open(":memory:").close(), samples)
        bare = timings(lambda: apsw.Connection(":memory:").close(), samples)
        results.append(
            (
                "fresh :memory: store open+close, p50",
                f"{p50(mem):.0f} µs",
                f"bare apsw {p50(bare):.0f} µs",
                f"goal <= 100 µs: {p50(mem) <= 100}",
            )
        )
        store.close()
        raw.close()
        size = os.path.getsize(ours_path)

    print(f"clinik-local store benchmark: {count:,} tasks, {samples} samples, ", end="")
    print(f"file {size / 1e6:.0f} MB\n")
    widths = [max(len(r[i]) for r in results) for i in range(4)]
    header = ("measurement", "clinik-local", "raw apsw", "ratio")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in results:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
