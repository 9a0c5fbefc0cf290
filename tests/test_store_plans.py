"""Issue 4: SQLite's own query plans for the six filters never scan tasks or sort in a temp b-tree.

The SQL comes from ``clinik_local.search.compile_search``, the compiler ``store.tasks.search``
uses, so these are the real queries. Each filter is checked alone (the count query: WHERE
only), with the default sort (``ORDER BY authored_on DESC, id DESC`` of a page), on a later
page (keyset cursor), as an any-of list, and in pairs; on an empty store and on a populated
store whose planner statistics are fresh (``PRAGMA optimize``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from clinik_local import TaskStore
from clinik_local.demo import generate_requests
from clinik_local.search import compile_search, normalise_filters

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
        return [str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


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
