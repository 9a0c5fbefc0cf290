"""SQLite's own query plans for the searches: every filter seeks an index, never scans
tasks, and the common sorts read an index in order instead of sorting in a temp b-tree.

The SQL comes from ``clinik_local.search.compile_search``, the compiler ``store.tasks.search``
uses, so these are the real queries, and the plan comes as data from apsw
(:func:`query_plan`, over ``apsw.ext.query_info``), never from parsing text.

Two stores: ``planned_store`` (the demo generator's tasks, on an empty and on a populated
file whose statistics are fresh from ``PRAGMA optimize``) checks the six main filters
alone (the count query: WHERE only), with the default sort (``ORDER BY authored_on DESC,
id DESC`` of a page), on a later page (keyset cursor), as an any-of list and in pairs;
``planned`` (a clinic-like spread of 4000 tasks, ``ANALYZE``d) checks every filter with
three sorts, the work list, overdue by due date, deep cursors and membership filters.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import apsw
import apsw.ext
import pytest

from clinik_local import TaskStore
from clinik_local.demo import generate_requests
from clinik_local.search import compile_search, normalise_filters, page_query


def query_plan(conn: apsw.Connection, sql: str, params: tuple[object, ...] = ()) -> list[str]:
    """The steps of SQLite's plan for ``sql``, as data: each step's detail, depth first
    (``SEARCH tasks USING INDEX ...``, ``USE TEMP B-TREE FOR ORDER BY``, ...)."""
    info = apsw.ext.query_info(conn, sql, params, explain_query_plan=True)
    steps: list[str] = []
    pending = list(info.query_plan.sub or []) if info.query_plan else []
    while pending:
        step = pending.pop(0)
        steps.append(step.detail)
        pending[0:0] = step.sub or []
    return steps


#: A value each of the six filters is searched with (the populated store holds them).
SIX = {
    "patientId": ["pt_000001", "pt_000002"],
    "ownerId": ["prac_001", "prac_002"],
    "requesterId": ["prac_003", "prac_004"],
    "status": ["ready", "in-progress"],
    "priority": ["stat", "routine"],
    "code": ["lab-order", "imaging-order"],
}


@pytest.fixture(scope="module", params=["empty", "populated"])
def planned_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TaskStore]:
    path: Path = tmp_path_factory.mktemp("plans") / f"{request.param}.db"
    with TaskStore.open(path) as store:
        if request.param == "populated":
            store.tasks.create_many(list(generate_requests(3000, seed=5)))
            store.optimize()
        yield store


def _plan(store: TaskStore, sql: str, params: tuple[object, ...]) -> list[str]:
    with store.read() as conn:
        return query_plan(conn, sql, params)


def _assert_indexed(plan: list[str]) -> None:
    text = "\n".join(plan)
    assert "TEMP B-TREE" not in text, text
    assert not any(line.startswith("SCAN") for line in plan), text
    assert any("tasks USING" in line and "INDEX" in line for line in plan), text


def _cursor(store: TaskStore, filters: dict[str, object]) -> str | None:
    page = store.tasks.search(filters, limit=1)
    return None if page.meta["nextCursor"] is None else str(page.meta["nextCursor"])


def _check(store: TaskStore, filters: dict[str, object]) -> None:
    compiled, _ = compile_search(normalise_filters(filters, {}))
    _assert_indexed(_plan(store, compiled.count_sql, compiled.count_params))  # alone
    _assert_indexed(_plan(store, compiled.page_sql, compiled.page_params))  # default sort
    assert "ORDER BY" in compiled.page_sql
    cursor = _cursor(store, filters)
    if cursor is not None:
        later, _ = compile_search(normalise_filters(filters, {"cursor": cursor}))
        _assert_indexed(_plan(store, later.page_sql, later.page_params))


@pytest.mark.parametrize("name", sorted(SIX))
def test_each_filter_alone_and_with_the_default_sort_uses_an_index(
    planned_store: TaskStore, name: str
) -> None:
    _check(planned_store, {name: SIX[name][0]})


@pytest.mark.parametrize("name", sorted(SIX))
def test_each_filter_as_an_any_of_list_uses_an_index(planned_store: TaskStore, name: str) -> None:
    _check(planned_store, {name: SIX[name]})


@pytest.mark.parametrize(("first", "second"), list(itertools.combinations(sorted(SIX), 2)))
def test_every_pair_of_filters_uses_an_index(
    planned_store: TaskStore, first: str, second: str
) -> None:
    _check(planned_store, {first: SIX[first][0], second: SIX[second][0]})


def test_the_default_sort_is_newest_authored_first_then_id() -> None:
    compiled, _ = compile_search(normalise_filters({"status": "ready"}, {}))
    assert "ORDER BY authored_on DESC, id DESC" in compiled.page_sql


def test_the_plan_check_itself_catches_a_scan_and_a_temp_b_tree(planned_store: TaskStore) -> None:
    with pytest.raises(AssertionError):
        _assert_indexed(_plan(planned_store, "SELECT body FROM tasks WHERE body = ?", ("x",)))
    with pytest.raises(AssertionError):
        _assert_indexed(
            _plan(
                planned_store,
                "SELECT body FROM tasks WHERE patient_id = ? ORDER BY last_modified",
                ("p",),
            )
        )


# --- every filter, the work list, cursors and membership (the clinic-like store) -----------


@pytest.fixture(scope="module")
def planned() -> Iterator[TaskStore]:
    """A store with a clinic-like spread of 4000 tasks and fresh statistics."""
    rng = random.Random(7)
    s = TaskStore.open(":memory:")
    requests: list[dict[str, object]] = []
    for _ in range(4000):
        r: dict[str, object] = {
            "status": rng.choice(["completed"] * 6 + ["cancelled", "requested", "ready"]),
            "intent": rng.choice(["order"] * 9 + ["plan"]),
            "authoredOn": f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T08:00:00Z",
            "description": rng.choice(["Order CBC", "Order CMP", "Referral", "Draw labs"]),
        }
        if rng.random() < 0.9:
            r["priority"] = rng.choice(["routine"] * 6 + ["urgent", "asap", "stat"])
        for name, n in [
            ("ownerId", 40),
            ("patientId", 800),
            ("requesterId", 60),
            ("encounterId", 1500),
            ("focusId", 1500),
            ("code", 30),
            ("businessStatus", 25),
        ]:
            if rng.random() < 0.85:
                r[name] = f"{name[:2].lower()}_{rng.randint(1, n)}"
        if rng.random() < 0.7:
            year = rng.choice([2025, 2026, 2027, 2028])
            r["executionPeriod"] = {
                "start": f"{year}-01-01T00:00:00Z",
                "end": f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T17:00:00Z",
            }
        if rng.random() < 0.05:
            r["partOf"] = [f"t_{rng.randint(1, 400)}"]
            r["basedOn"] = [f"sr_{rng.randint(1, 400)}"]
        if rng.random() < 0.3:
            r["input"] = [{"type": "lab-panel", "valueString": rng.choice(["CBC", "CMP"])}]
        requests.append(r)
    s.tasks.create_many(requests)
    with s._db.write() as conn:
        conn.execute("ANALYZE")
    yield s
    s.close()


ORDERED = {  # equality filters: default sort read straight off an index
    "ownerId": "ow_1",
    "patientId": "pa_1",
    "requesterId": "re_1",
    "encounterId": "en_1",
    "focusId": "fo_1",
    "code": "co_1",
    "businessStatus": "bu_1",
    "status": "ready",
    "intent": "plan",
    "priority": "stat",
    "authoredOn": "ge2025-12-20",
}
ANY_OF = {
    "ownerId": ["ow_1", None],
    "patientId": [None],
    "status": {"not": ["completed", "cancelled"]},
    "priority": "stat,asap",
    "code": ["co_1", "co_2"],
}
SORTED_ELSEWHERE = {  # index-served filter; matching rows sorted in a temp b-tree
    "lastModified": "lt2025-06",
    "periodStart": "ge2028-01-01",
    "periodEnd": "lt2025-01-15",
    "dueBefore": "2025-01-15",
    "overdue": True,
    "text": "referral",
    "partOf": "t_1",
    "basedOn": "sr_1",
    "input": "lab-panel|CBC",
    "output": "lab-panel",
}


def plan(store: TaskStore, filters: dict[str, object]) -> list[str]:
    """The plan of the page query a search with ``filters`` runs."""
    compiled, _ = compile_search(normalise_filters(filters, {}))
    return _plan(store, compiled.page_sql, compiled.page_params)


def assert_index_served(lines: list[str], what: object) -> None:
    assert not any(line.startswith("SCAN tasks") for line in lines), (what, lines)
    assert any(line.startswith("SEARCH tasks") for line in lines), (what, lines)


@pytest.mark.parametrize("sort", [None, "-authoredOn", "-priority,authoredOn"])
@pytest.mark.parametrize("filters", [*ORDERED.items(), *ANY_OF.items(), *SORTED_ELSEWHERE.items()])
def test_every_filter_seeks_an_index_and_never_scans_tasks(
    planned: TaskStore, filters: tuple[str, object], sort: str | None
) -> None:
    query = {filters[0]: filters[1]}
    if sort is not None:
        query["sort"] = sort
    assert_index_served(plan(planned, query), query)


@pytest.mark.parametrize("filters", [*ORDERED.items(), *ANY_OF.items()])
def test_default_sort_reads_equality_filters_in_index_order_without_a_temp_btree(
    planned: TaskStore, filters: tuple[str, object]
) -> None:
    lines = plan(planned, {filters[0]: filters[1]})
    assert not any("TEMP B-TREE" in line for line in lines), (filters, lines)


def test_work_list_query_is_an_ordered_merge_of_two_index_seeks(planned: TaskStore) -> None:
    lines = plan(
        planned,
        {
            "ownerId": ["ow_1", None],
            "status": {"not": ["completed", "cancelled"]},
            "sort": "-priority,authoredOn",
        },
    )
    assert "MERGE (UNION ALL)" in lines
    assert sum("USING INDEX tasks_worklist" in line for line in lines) == 2
    assert not any("TEMP B-TREE" in line for line in lines), lines


def test_overdue_sorted_by_due_walks_the_due_index_in_order(planned: TaskStore) -> None:
    lines = plan(planned, {"overdue": True, "sort": "due"})
    assert_index_served(lines, "overdue")
    assert not any("TEMP B-TREE" in line for line in lines), lines


def test_deep_cursor_page_is_one_index_seek(planned: TaskStore) -> None:
    query: dict[str, object] = {"ownerId": ["ow_1", None], "sort": "-priority,authoredOn"}
    page = planned.tasks.search(query, limit=5)
    lines = plan(planned, dict(query, cursor=page.meta["nextCursor"]))
    assert all("(priority_rank,authored_on,id)>" in line for line in lines if "SEARCH" in line)


def test_a_common_membership_filter_walks_the_sort_order_and_agrees(planned: TaskStore) -> None:
    for filters in ({"input": "lab-panel"}, {"input": "lab-panel|CBC", "sort": "due"}):
        compiled, _ = compile_search(normalise_filters(dict(filters, limit=1000), {}))
        assert compiled.dense is not None
        with planned.read() as conn:
            sql, params = page_query(
                compiled, lambda s, p: int(str(conn.execute(s, p).fetchall()[0][0]))
            )
            assert sql == compiled.dense[2]
            lines = query_plan(conn, sql, params)
            dense_rows = conn.execute(sql, params).fetchall()
            sparse_rows = conn.execute(compiled.page_sql, compiled.page_params).fetchall()
        assert not any("TEMP B-TREE" in line or "BLOOM" in line for line in lines), lines
        assert not any(line == "SCAN tasks" for line in lines), lines
        assert any("CORRELATED SCALAR SUBQUERY" in line for line in lines), lines
        assert dense_rows == sparse_rows


def test_a_rare_membership_filter_looks_up_its_few_matches(planned: TaskStore) -> None:
    compiled, _ = compile_search(normalise_filters({"partOf": "t_1"}, {}))
    with planned.read() as conn:
        sql, _ = page_query(compiled, lambda s, p: int(str(conn.execute(s, p).fetchall()[0][0])))
    assert sql == compiled.page_sql


def test_query_plan_gives_every_step_depth_first_as_sqlite_plans_it() -> None:
    conn = apsw.Connection(":memory:")
    conn.execute("CREATE TABLE t(a, b); CREATE INDEX t_a ON t(a)")
    try:
        assert query_plan(conn, "SELECT * FROM t WHERE a = ? ORDER BY b", (1,)) == [
            "SEARCH t USING INDEX t_a (a=?)",
            "USE TEMP B-TREE FOR ORDER BY",
        ]
        # Nested steps come right after their parent, in SQLite's order.
        assert query_plan(conn, "SELECT a FROM t WHERE a = 1 UNION ALL SELECT b FROM t") == [
            "COMPOUND QUERY",
            "LEFT-MOST SUBQUERY",
            "SEARCH t USING COVERING INDEX t_a (a=?)",
            "UNION ALL",
            "SCAN t",
        ]
    finally:
        conn.close()


def test_a_common_status_walks_the_sort_index_and_a_rare_one_seeks_its_own() -> None:
    """Enum values are literals in the SQL, so the planner (which never looks at a bound
    value: ``connection.plan_once``) still sees how many rows a status matches: with
    the priority sort, most tasks completed walks tasks_by_priority and stops at the
    page; a rare status seeks tasks_by_status. Bound, both took the seek and a temp
    b-tree sort of every completed task (200k store: the same as the benchmark's)."""
    store = TaskStore.open(":memory:")
    try:
        rng = random.Random(3)
        store.tasks.create_many(
            [
                {
                    "status": "completed" if i % 20 else "ready",
                    "intent": "order",
                    "priority": rng.choice(["routine", "urgent", "stat", "asap"]),
                    "authoredOn": f"2025-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
                }
                for i in range(3000)
            ]
        )
        with store._db.write() as conn:
            conn.execute("ANALYZE")
        common = plan(store, {"status": "completed", "sort": "-priority,authoredOn"})
        rare = plan(store, {"status": "ready", "sort": "-priority,authoredOn"})
        assert common == ["SCAN tasks USING INDEX tasks_by_priority"], common
        assert rare[0].startswith("SEARCH tasks USING INDEX tasks_by_status"), rare
    finally:
        store.close()


def test_the_values_a_plan_depends_on_are_literals_and_only_the_page_size_is_bound() -> None:
    """Overdue's now, dueBefore's and a date range's bounds, and enum values are written
    into the SQL (the planner never sees a bound value; bound, overdue in the default
    sort took tasks_open_by_due and a temp b-tree: 1 -> 85 ms at 200k tasks)."""
    for filters in (
        {"overdue": True},
        {"dueBefore": "2025-06-01"},
        {"lastModified": "lt2025-06"},
        {"status": "completed", "priority": "stat,asap", "intent": "order"},
    ):
        compiled, _ = compile_search(normalise_filters(filters, {}))
        assert compiled.page_params == (compiled.limit + 1,), filters
        assert compiled.count_params == (), filters
