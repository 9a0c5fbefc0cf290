"""The compile cache of ``compile_search``: a repeated search is served from it, and it
changes nothing: the same SQL, parameters, rows and errors as a fresh compile."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinik_local import TaskStore
from clinik_local.errors import ValidationError
from clinik_local.search import (
    FILTERS,
    _compile_frozen,
    _compile_search,
    _shaped,
    compile_search,
)
from tests.test_search_properties import EQUALITY, filters, sort_param, sorts, task_requests


def _outcome(compile: Any, merged: dict[str, object]) -> object:
    """What a compile gives: its result, or the errors it raised."""
    try:
        return compile(merged)
    except ValidationError as exc:
        return ("refused", exc.errors)


search_inputs = st.builds(
    lambda chosen, sort, as_list, limit, total: {
        **chosen,
        **({} if sort is None else {"sort": sort_param(sort, as_list)}),
        **({} if limit is None else {"limit": limit}),
        **({} if total is None else {"total": total}),
    },
    filters(),
    sorts,
    st.booleans(),
    st.one_of(st.none(), st.integers(-1, 1001), st.sampled_from(["5", True, 2.0])),
    st.one_of(st.none(), st.booleans(), st.just("yes")),
)


@settings(max_examples=150, deadline=None)
@given(search_inputs)
def test_a_cached_compile_equals_a_fresh_one_and_errors_are_raised_every_time(
    merged: dict[str, object],
) -> None:
    merged.pop("overdue", None)  # binds the clock: never cached (tested below)
    fresh = _outcome(_compile_search, merged)
    assert _outcome(compile_search, merged) == fresh  # first call: a miss (or no caching)
    assert _outcome(compile_search, merged) == fresh  # second call: a hit when cacheable
    assert _outcome(compile_search, dict(merged)) == fresh  # an equal mapping: a hit


@settings(max_examples=25, deadline=None)
@given(st.lists(task_requests(), max_size=12), st.lists(search_inputs, min_size=1, max_size=4))
def test_a_cached_search_finds_the_same_rows_as_a_freshly_compiled_one(
    requests: list[dict[str, object]], searches: list[dict[str, object]]
) -> None:
    with TaskStore.open(":memory:") as store:
        store.tasks.create_many(requests)
        for merged in searches:
            merged = {k: v for k, v in merged.items() if k != "overdue"}
            _compile_frozen.cache_clear()
            fresh = _outcome(lambda m: store.tasks.search(m).data, merged)
            cached = [_outcome(lambda m: store.tasks.search(m).data, merged) for _ in range(2)]
            assert cached == [fresh, fresh]


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ({"patientId": "pt_1"}, {"patientId": "pt 1"}),
        ({"patientId": "pt_1"}, {"patientId": 1}),
        ({"limit": 1}, {"limit": True}),
        ({"limit": 5}, {"limit": "five"}),
        ({"status": ["ready"]}, {"status": [["ready"]]}),
        ({"status": "ready"}, {"status": {"not": "ready", "is": "x"}}),
        ({"total": True}, {"total": 1}),
        ({"ownerId": None}, {"status": None}),
        ({"text": "cbc"}, {"text": "***"}),
    ],
)
def test_bad_input_after_a_cached_good_input_is_refused_as_without_the_cache(
    good: dict[str, object], bad: dict[str, object]
) -> None:
    compile_search(good)
    assert compile_search(good) == _compile_search(good)
    with pytest.raises(ValidationError) as cached:
        compile_search(bad)
    with pytest.raises(ValidationError) as fresh:
        _compile_search(bad)
    assert cached.value.errors == fresh.value.errors


def test_values_of_other_types_and_self_containing_lists_bypass_the_cache() -> None:
    looped: list[object] = ["ready"]
    looped.append(looped)
    before = _compile_frozen.cache_info().currsize
    odd: list[dict[str, object]] = [{"status": looped}, {"status": {"ready"}}, {"limit": 2.0}]
    for merged in odd:
        assert _outcome(compile_search, merged) == _outcome(_compile_search, merged)
    assert _outcome(compile_search, {"status": looped})[0] == "refused"  # type: ignore[index]
    assert _compile_frozen.cache_info().currsize == before


def test_a_repeated_search_is_a_cache_hit_but_overdue_and_cursors_are_not_cached() -> None:
    merged: dict[str, object] = {"patientId": ["pt_cache"]}  # a list: cached exactly
    compile_search(merged)
    hits = _compile_frozen.cache_info().hits
    assert compile_search(merged) == _compile_search(merged)
    assert _compile_frozen.cache_info().hits == hits + 1
    size = _compile_frozen.cache_info().currsize
    compile_search({"overdue": True})
    with pytest.raises(ValidationError):
        compile_search({"cursor": "not-a-cursor"})
    assert _compile_frozen.cache_info().currsize == size


equality_values = st.one_of(
    st.sampled_from([v for values in EQUALITY.values() for v in values]),
    st.sampled_from(["pt_1", "a b", "", "x" * 65, "e\u0301", "\x00", "urgent", "draft"]),
    st.text(max_size=8),
)
shaped_inputs = st.builds(
    lambda eqs, extra, order: dict(
        sorted({**eqs, **extra}.items(), key=lambda kv: order.index(kv[0]))
    ),
    st.dictionaries(st.sampled_from(sorted(FILTERS)), equality_values, min_size=1, max_size=3),
    st.fixed_dictionaries(
        {},
        optional={
            "limit": st.sampled_from([1, 5, 1000, 0, 1001, "7", "x"]),
            "sort": st.sampled_from(["-priority,authoredOn", "due", "bogus", "-authoredOn"]),
            "total": st.sampled_from([True, False, "maybe"]),
        },
    ),
    st.permutations([*sorted(FILTERS), "limit", "sort", "total"]),
)


@settings(max_examples=300, deadline=None)
@given(shaped_inputs)
def test_a_search_of_a_cached_shape_compiles_and_refuses_as_a_fresh_compile(
    merged: dict[str, object],
) -> None:
    fresh = _outcome(_compile_search, merged)
    assert _outcome(compile_search, merged) == fresh
    assert _outcome(compile_search, merged) == fresh


def test_one_shape_serves_searches_with_other_values_and_their_cursors_page_on() -> None:
    with TaskStore.open(":memory:") as store:
        for patient in ("pt_a", "pt_b"):
            store.tasks.create_many(
                [{"status": "ready", "intent": "order", "patientId": patient}] * 3
            )
        _shaped.cache_clear()
        seen = {}
        cursors = {}
        for patient in ("pt_a", "pt_b"):
            first = store.tasks.search(patientId=patient, limit=2)
            cursors[patient] = first.meta["nextCursor"]
            rest = store.tasks.search(patientId=patient, limit=2, cursor=first.meta["nextCursor"])
            seen[patient] = [t.patient_id for t in [*first.data, *rest.data]]
        assert seen == {"pt_a": ["pt_a"] * 3, "pt_b": ["pt_b"] * 3}
        assert _shaped.cache_info().misses == 1
        assert _shaped.cache_info().hits == 1
        with pytest.raises(ValidationError) as info:  # a cursor is bound to its filters
            store.tasks.search(patientId="pt_b", limit=2, cursor=cursors["pt_a"])
        assert info.value.paths == ("cursor",)


# --- a search statement is planned once, not at every call ---------------------------
#
# SQLite re-plans a cached statement at its next step whenever a value is bound to a
# parameter the planner looked at (``LIMIT ?``, ``col = ? ... ORDER BY``) unless the
# connection has the planner stability guarantee (``connection.plan_once``). The
# authorizer is called only while SQLite compiles a statement, so counting its calls
# counts compilations.


def _compilations(conn: Any, run: Any) -> int:
    calls: list[int] = []

    def authorizer(*args: object) -> int:
        calls.append(1)
        return 0  # SQLITE_OK

    conn.authorizer = authorizer  # expires every statement: the next step recompiles
    try:
        run()  # compiled again once (the authorizer expired it)
        calls.clear()
        run()
        run()
        return len(calls)
    finally:
        conn.authorizer = None


@pytest.mark.parametrize(
    "filters",
    [
        {"patientId": "pt_1"},  # col = ? ... ORDER BY ... LIMIT ?
        {"status": "ready", "sort": "-priority,authoredOn"},
        {"ownerId": ["pr_1", "pr_2"]},
        {"lastModified": "lt2025-06"},  # a range: its bounds are literals in the SQL
        {"status": {"not": ["completed", "cancelled"]}},  # the complement: literals too
    ],
)
@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_repeated_search_runs_its_cached_statement_without_compiling_it_again(
    filters: dict[str, object], kind: str, tmp_path: Any
) -> None:
    store = TaskStore.open(":memory:" if kind == "memory" else tmp_path / "s.db")
    try:
        store.tasks.create({"status": "ready", "intent": "order", "patientId": "pt_1"})
        with store.read() as conn:  # the connection this thread's searches run on

            def search() -> None:
                store.tasks.search(filters)
                store.tasks.count(filters)

            assert _compilations(conn, search) == 0
    finally:
        store.close()


def test_every_connection_has_the_planner_stability_guarantee(tmp_path: Any) -> None:
    import apsw

    from clinik_local.storage.connection import ConnectionOptions, open_connection

    path = str(tmp_path / "s.db")
    for where, role in [(":memory:", "writer"), (path, "writer"), (path, "reader")]:
        conn = open_connection(where, role, ConnectionOptions())  # type: ignore[arg-type]
        try:
            assert conn.config(apsw.SQLITE_DBCONFIG_ENABLE_QPSG, -1) == 1, (where, role)
        finally:
            conn.close()
