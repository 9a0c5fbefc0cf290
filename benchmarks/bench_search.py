"""Search benchmark: first page of 50 through store.tasks.search vs raw apsw.

Builds (or reuses) a store file with a clinic-like spread of tasks, refreshes the
planner statistics, then times, for each query: ``store.tasks.search(..., limit=50)``
(Task objects and a cursor), the *same SQL* the compiler produced run on a plain apsw
connection (fetch + ``json.loads`` of each body; for a membership filter, the variant
``page_query`` picks, its probe not timed), and a *hand-written* SQL query a
developer would write for the same question (fetch + ``json.loads``). Prints p50 and
p99 in milliseconds.

    python benchmarks/bench_search.py                 # 100 000 tasks
    python benchmarks/bench_search.py --tasks 1000000
    python benchmarks/bench_search.py --quick         # CI smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import apsw

from clinik_local import TaskStore
from clinik_local.search import compile_search, count_query, normalise_filters, page_query

ME = "ow_7"
TERMINAL = "('cancelled', 'completed', 'failed', 'rejected')"
DEFAULT_ORDER = "ORDER BY authored_on DESC, id DESC LIMIT 51"
WORDS = ["Order", "CBC", "CMP", "lipid", "panel", "follow-up", "referral", "draw", "labs"]
NAMES = [f"name{i}" for i in range(5000)]


def task_request(rng: random.Random, i: int) -> dict[str, object]:
    """One clinic-like task: most finished, a few dozen owners, many patients."""
    month = rng.randint(1, 12)
    request: dict[str, object] = {
        "status": rng.choice(
            ["completed"] * 12 + ["cancelled"] * 2 + ["requested", "ready", "in-progress"] * 2
        ),
        "intent": rng.choice(["order"] * 9 + ["plan"]),
        "authoredOn": f"2025-{month:02d}-{rng.randint(1, 28):02d}T"
        f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
        "description": " ".join(rng.sample(WORDS, 3)) + f" for {rng.choice(NAMES)}",
        "code": f"co_{rng.randint(1, 40)}",
    }
    if rng.random() < 0.9:
        request["priority"] = rng.choice(["routine"] * 12 + ["urgent"] * 4 + ["asap", "stat"])
    if rng.random() < 0.85:
        request["ownerId"] = f"ow_{rng.randint(1, 60)}"
    request["patientId"] = f"pa_{rng.randint(1, 20000)}"
    request["requesterId"] = f"re_{rng.randint(1, 200)}"
    request["encounterId"] = f"en_{rng.randint(1, 50000)}"
    if rng.random() < 0.5:
        request["focusId"] = f"fo_{rng.randint(1, 50000)}"
    if rng.random() < 0.6:
        request["businessStatus"] = rng.choice(["Specimen collected", "Awaiting", "Resulted"])
    if rng.random() < 0.8:
        year = rng.choice([2025, 2025, 2026, 2027])
        request["executionPeriod"] = {
            "start": f"{year}-{month:02d}-01T08:00:00Z",
            "end": f"{year}-{month:02d}-{rng.randint(2, 28):02d}T17:00:00Z",
        }
    if rng.random() < 0.05:
        request["partOf"] = [f"t_parent{rng.randint(1, 2000)}"]
    if rng.random() < 0.1:
        request["basedOn"] = [f"sr_{rng.randint(1, 5000)}"]
    if rng.random() < 0.4:
        request["input"] = [{"type": "lab-panel", "valueString": rng.choice(["CBC", "CMP", "BMP"])}]
    if rng.random() < 0.1:
        request["output"] = [{"type": "result", "valueString": "normal"}]
    return request


def build(path: Path, count: int) -> None:
    rng = random.Random(2025)
    with TaskStore.open(path) as store:
        have = store.tasks.count().data
        batch = 50_000
        done = have
        while done < count:
            n = min(batch, count - done)
            store.tasks.create_many([task_request(rng, done + i) for i in range(n)])
            done += n
            print(f"  built {done} tasks", flush=True)
        store.optimize()
        with store._db.write() as conn:
            conn.execute("ANALYZE")


#: name -> (filters for store.tasks.search, hand-written SQL, its parameters)
QUERIES: list[tuple[str, dict[str, object], str, tuple[object, ...]]] = [
    (
        "work list (mine+unassigned, open, -priority)",
        {
            "ownerId": [ME, None],
            "status": {"not": ["completed", "cancelled"]},
            "sort": "-priority,authoredOn",
        },
        "SELECT body FROM tasks WHERE (owner_id = ? OR owner_id IS NULL) AND status NOT IN "
        "('completed', 'cancelled') ORDER BY priority_rank, authored_on, id LIMIT 51",
        (ME,),
    ),
    (
        "overdue (default sort)",
        {"overdue": True},
        f"SELECT body FROM tasks WHERE period_end < ? AND status NOT IN {TERMINAL} "
        + DEFAULT_ORDER,
        ("NOW",),
    ),
    (
        "overdue, sort=due",
        {"overdue": True, "sort": "due"},
        f"SELECT body FROM tasks WHERE period_end < ? AND status NOT IN {TERMINAL} "
        "ORDER BY period_end, id LIMIT 51",
        ("NOW",),
    ),
    (
        "text 'name4242' (rare)",
        {"text": "name4242"},
        "SELECT body FROM tasks WHERE seq IN (SELECT rowid FROM task_text WHERE task_text "
        "MATCH ?) " + DEFAULT_ORDER,
        ('"name4242"*',),
    ),
    (
        "text 'lipid' (common)",
        {"text": "lipid"},
        "SELECT body FROM tasks WHERE seq IN (SELECT rowid FROM task_text WHERE task_text "
        "MATCH ?) " + DEFAULT_ORDER,
        ('"lipid"*',),
    ),
    *[
        (
            f"{name}={value}",
            dict[str, object]({name: value}),
            f"SELECT body FROM tasks WHERE {column} = ? " + DEFAULT_ORDER,
            tuple[object, ...]((value,)),
        )
        for name, column, value in [
            ("ownerId", "owner_id", ME),
            ("patientId", "patient_id", "pa_42"),
            ("requesterId", "requester_id", "re_42"),
            ("encounterId", "encounter_id", "en_42"),
            ("focusId", "focus_id", "fo_42"),
            ("code", "code", "co_7"),
            ("businessStatus", "business_status", "Awaiting"),
            ("status", "status", "ready"),
            ("intent", "intent", "plan"),
        ]
    ],
    (
        "priority=stat",
        {"priority": "stat"},
        "SELECT body FROM tasks WHERE priority_rank = ? " + DEFAULT_ORDER,
        (0,),
    ),
    (
        "ownerId=None (unassigned)",
        {"ownerId": None},
        "SELECT body FROM tasks WHERE owner_id IS NULL " + DEFAULT_ORDER,
        (),
    ),
    (
        "status not completed/cancelled",
        {"status": {"not": ["completed", "cancelled"]}},
        "SELECT body FROM tasks WHERE status NOT IN ('completed', 'cancelled') " + DEFAULT_ORDER,
        (),
    ),
    (
        "authoredOn=2025-03",
        {"authoredOn": "2025-03"},
        "SELECT body FROM tasks WHERE authored_on >= ? AND authored_on < ? " + DEFAULT_ORDER,
        ("2025-03-01T00:00:00.000Z", "2025-04-01T00:00:00.000Z"),
    ),
    (
        "periodStart=ge2027-12",
        {"periodStart": "ge2027-12"},
        "SELECT body FROM tasks WHERE period_start >= ? " + DEFAULT_ORDER,
        ("2027-12-01T00:00:00.000Z",),
    ),
    (
        "periodEnd=lt2025-01-05",
        {"periodEnd": "lt2025-01-05"},
        "SELECT body FROM tasks WHERE period_end < ? " + DEFAULT_ORDER,
        ("2025-01-05T00:00:00.000Z",),
    ),
    (
        "partOf=t_parent42",
        {"partOf": "t_parent42"},
        "SELECT body FROM tasks WHERE seq IN (SELECT seq FROM task_refs WHERE kind = 'partOf' "
        "AND ref = ?) " + DEFAULT_ORDER,
        ("t_parent42",),
    ),
    (
        "basedOn=sr_42",
        {"basedOn": "sr_42"},
        "SELECT body FROM tasks WHERE seq IN (SELECT seq FROM task_refs WHERE kind = 'basedOn' "
        "AND ref = ?) " + DEFAULT_ORDER,
        ("sr_42",),
    ),
    (
        "input=lab-panel|BMP",
        {"input": "lab-panel|BMP"},
        "SELECT body FROM tasks WHERE seq IN (SELECT seq FROM task_io WHERE direction = 'input' "
        "AND type = ? AND value = ?) " + DEFAULT_ORDER,
        ("lab-panel", "BMP"),
    ),
    (
        "output=result",
        {"output": "result"},
        "SELECT body FROM tasks WHERE seq IN (SELECT seq FROM task_io WHERE direction = "
        "'output' AND type = ?) " + DEFAULT_ORDER,
        ("result",),
    ),
]


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    fn()  # warm the statement cache and pages
    samples = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def run(path: Path, reps: int) -> None:
    store = TaskStore.open(path)
    raw = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())

    def raw_fetch(sql: str, params: tuple[object, ...]) -> Callable[[], object]:
        def go() -> object:
            return [json.loads(row[0]) for row in raw.execute(sql, params)]

        return go

    header = (
        f"{'query (first page of 50)':<46} {'rows':>5} {'lib p50':>8} {'lib p99':>8} "
        f"{'same p50':>9} {'same p99':>9} {'hand p50':>9} {'hand p99':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, filters, hand_sql, hand_params in QUERIES:
        query = dict(filters, limit=50)
        compiled, _ = compile_search(normalise_filters(query, {}))
        rows = len(store.tasks.search(query).data)
        lib = timed(lambda q=query: store.tasks.search(q), reps)  # type: ignore[misc]
        same_sql, same_params = page_query(
            compiled, lambda sql, params: int(str(raw.execute(sql, params).fetchall()[0][0]))
        )
        same = timed(raw_fetch(same_sql, same_params), reps)
        params = tuple(now if p == "NOW" else p for p in hand_params)
        hand = timed(raw_fetch(hand_sql, params), reps)
        print(
            f"{name:<46} {rows:>5} {lib[0]:>8.3f} {lib[1]:>8.3f} {same[0]:>9.3f} "
            f"{same[1]:>9.3f} {hand[0]:>9.3f} {hand[1]:>9.3f}"
        )
    # Constant cost at depth: page 1 vs page 40 of the work list.
    worklist = dict(QUERIES[0][1], limit=50)
    cursor: object = None
    for _ in range(39):
        page = store.tasks.search(dict(worklist, cursor=cursor) if cursor else worklist)
        cursor = page.meta["nextCursor"]
        if cursor is None:
            break
    if cursor is not None:
        deep = timed(lambda: store.tasks.search(dict(worklist, cursor=cursor)), reps)
        print(f"{'work list, page 40 (keyset cursor)':<46} {50:>5} {deep[0]:>8.3f} {deep[1]:>8.3f}")
    count = timed(lambda: store.tasks.count(ownerId=[ME, None], overdue=True), reps)
    print(f"{'count(mine+unassigned, overdue)':<46} {'':>5} {count[0]:>8.3f} {count[1]:>8.3f}")
    # The bounded count (search.count_query, at_most=100), on the raw connection: what a
    # "99+" badge needs; store.tasks.count(..., at_most=) is to call the same SQL.
    overdue, _ = compile_search(normalise_filters({"ownerId": [ME, None], "overdue": True}, {}))
    bounded_sql, bounded_params = count_query(overdue, 100)
    bounded = timed(lambda: raw.execute(bounded_sql, bounded_params).fetchall(), reps)
    print(
        f"{'count(mine+unassigned, overdue, at_most=100)':<46} {'':>5} {'':>8} {'':>8} "
        f"{bounded[0]:>9.3f} {bounded[1]:>9.3f}"
    )
    raw.close()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks in the store")
    parser.add_argument("--reps", type=int, default=200, help="timed runs per query")
    parser.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    parser.add_argument("--db", type=Path, help="store file to build or reuse")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.reps = 3000, 20
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or Path(tmp) / "bench.db"
        start = time.perf_counter()
        build(path, args.tasks)
        size = os.path.getsize(path) / 1e6
        took = time.perf_counter() - start
        print(f"store: {args.tasks} tasks, {size:.0f} MB, ready in {took:.1f} s")
        run(path, args.reps)


if __name__ == "__main__":
    main()
