"""Dense text matches and periodStart ranges walk the sort order; bounded counts.

When a text word or a periodStart range matches many tasks, ``page_query`` picks the
variant that walks the sort index and tests each task (an FTS5 probe on the word's
exact terms; the range on tasks_by_authored's own entries) instead of looking up and
sorting every match. Both variants must return exactly the same pages.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinik_local import TaskStore
from clinik_local.errors import ValidationError
from clinik_local.search import (
    _MAX_TERMS,
    CompiledSearch,
    compile_search,
    count_query,
    normalise_filters,
    page_query,
)

WORDS = ["lipid", "lipids", "panel", "referral", "draw", "cbc", "naïve", "x9"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskStore]:
    path: Path = tmp_path_factory.mktemp("dense") / "dense.db"
    rng = random.Random(16)
    requests = []
    for n in range(3000):
        month = rng.randint(1, 12)
        request: dict[str, object] = {
            "status": rng.choice(["ready", "completed", "requested"]),
            "intent": "order",
            # Few distinct instants: ties on authoredOn are broken by id in both variants.
            "authoredOn": f"2025-{month:02d}-{rng.randint(1, 3):02d}T08:00:00Z",
            "description": " ".join(rng.sample(WORDS, 3)) + f" for name{n}",
            "ownerId": rng.choice(["ow_1", "ow_2", "ow_3"]),
        }
        if rng.random() < 0.8:
            year = rng.choice([2025, 2026, 2027])
            request["executionPeriod"] = {"start": f"{year}-{month:02d}-01T08:00:00Z"}
        requests.append(request)
    with TaskStore.open(path) as s:
        s.tasks.create_many(requests)
        with s._db.write() as conn:
            conn.execute("ANALYZE")
        yield s


def _run(store: TaskStore, filters: dict[str, object]) -> tuple[bool, list[str], list[object]]:
    """(dense variant picked, its plan, its rows); asserts the rows equal the sparse plan's."""
    compiled, _ = compile_search(normalise_filters(filters, {}))
    with store.read() as conn:
        sql, params = page_query(
            compiled, lambda s, p: int(str(conn.execute(s, p).fetchall()[0][0]))
        )
        plan = [str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
        rows = conn.execute(sql, params).fetchall()
        sparse = conn.execute(compiled.page_sql, compiled.page_params).fetchall()
    assert rows == sparse, filters
    return compiled.dense is not None and sql == compiled.dense[2], plan, list(rows)


def _assert_walks(plan: list[str]) -> None:
    assert not any("TEMP B-TREE" in line or "BLOOM" in line for line in plan), plan
    assert not any(line == "SCAN tasks" for line in plan), plan


@pytest.mark.parametrize(
    "filters",
    [
        {"text": "lipid"},
        {"text": "LIP"},
        {"text": "panel referral"},
        {"text": "draw", "sort": "lastModified"},
        {"text": "draw", "status": "ready"},
        {"text": "cbc", "ownerId": ["ow_1", "ow_2"]},
        {"text": "lipid", "limit": 1000},
    ],
)
def test_a_common_word_walks_the_sort_order_and_returns_the_same_page(
    store: TaskStore, filters: dict[str, object]
) -> None:
    dense, plan, rows = _run(store, filters)
    assert dense, plan
    assert rows
    _assert_walks(plan)


def test_every_page_of_a_dense_text_search_agrees_with_the_sparse_plan(store: TaskStore) -> None:
    cursor: object = None
    seen: list[str] = []
    while True:
        query: dict[str, object] = {"text": "lipid", "limit": 97}
        if cursor is not None:
            query["cursor"] = cursor
        dense, _, _ = _run(store, query)
        assert dense
        page = store.tasks.search(query)
        seen.extend(str(t.id) for t in page.data)
        cursor = page.meta["nextCursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == store.tasks.count(text="lipid").data


@pytest.mark.parametrize("filters", [{"text": "name42"}, {"text": "naïve"}, {"text": "name"}])
def test_a_rare_word_a_non_ascii_word_or_a_prefix_of_too_many_terms_keeps_the_sparse_plan(
    store: TaskStore, filters: dict[str, object]
) -> None:
    dense, _, _ = _run(store, filters)
    assert not dense


@pytest.mark.parametrize(
    "filters",
    [
        {"periodStart": "ge2026"},
        {"periodStart": "lt2026-06"},
        {"periodStart": {"ge": "2025-03", "lt": "2027-04"}, "ownerId": "ow_2"},
    ],
)
def test_a_wide_period_start_range_walks_the_default_sort(
    store: TaskStore, filters: dict[str, object]
) -> None:
    dense, plan, rows = _run(store, filters)
    assert dense, plan
    assert rows
    _assert_walks(plan)


def test_a_narrow_period_start_range_looks_up_its_few_matches(store: TaskStore) -> None:
    dense, _, rows = _run(store, {"periodStart": "2026-02-01T08:00"})
    assert not dense
    assert rows


def test_a_bounded_count_stops_at_most_at_the_bound(store: TaskStore) -> None:
    compiled, _ = compile_search(normalise_filters({"text": "panel"}, {}))
    full = store.tasks.count(text="panel").data
    assert full > 100
    with store.read() as conn:
        for at_most in (1, 100, full, full + 5):
            sql, params = count_query(compiled, at_most)
            assert conn.execute(sql, params).fetchall()[0][0] == min(full, at_most)
        assert count_query(compiled, None) == (compiled.count_sql, compiled.count_params)
    for bad in (0, -1, True, "5"):
        with pytest.raises(ValidationError, match="at_most"):
            count_query(compiled, bad)  # type: ignore[arg-type]


def test_store_count_at_most_is_the_smaller_of_the_matches_and_the_bound(
    store: TaskStore,
) -> None:
    full = store.tasks.count(text="panel").data
    assert full > 100
    for at_most in (1, 100, full, full + 5):
        bounded = store.tasks.count({"text": "panel"}, at_most=at_most)
        assert bounded.data == min(full, at_most)
        assert bounded.meta == {"atMost": at_most}
    assert store.tasks.count(text="panel").meta == {}
    for bad in (0, -1, True, "5", 2.5):
        with pytest.raises(ValidationError, match="at_most"):
            store.tasks.count(text="panel", at_most=bad)  # type: ignore[arg-type]


def test_the_vocabulary_view_exists_and_sees_the_indexed_terms(store: TaskStore) -> None:
    with store.read() as conn:
        terms = conn.execute(
            "SELECT term FROM task_text_terms WHERE term >= 'lipid' AND term < 'lipie'"
        ).fetchall()
    assert [t[0] for t in terms] == ["lipid", "lipids"]
    assert isinstance(apsw.sqlite_lib_version(), str)


def _old_estimate(conn: apsw.Connection, words: list[str]) -> int:
    """The density estimate as first defined, straight from the vocabulary: per word
    the sum of its exact terms' documents (0 past _MAX_TERMS terms), the fewest of any."""
    estimates = []
    for word in words:
        hi = word[:-1] + chr(ord(word[-1]) + 1)
        docs = [
            int(str(d))
            for (d,) in conn.execute(
                "SELECT doc FROM task_text_terms WHERE term >= ? AND term < ?", (word, hi)
            )
        ]
        estimates.append(0 if len(docs) > _MAX_TERMS else sum(docs))
    return min(estimates)


def _probe(conn: apsw.Connection, compiled: CompiledSearch, threshold: int) -> int:
    assert compiled.dense is not None
    probe_sql, probe_params, _, _ = compiled.dense
    return int(str(conn.execute(probe_sql, (*probe_params, threshold)).fetchall()[0][0]))


TERMS = ["ab", "abc", "abcd", "abd", "b", "ba", "bab", "c9", "c90"]


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.lists(st.sampled_from(TERMS), min_size=1, max_size=3), max_size=30),
    deleted=st.sets(st.integers(0, 29)),
    query=st.lists(
        st.sampled_from(["a", "ab", "abc", "abcde", "b", "ba", "c", "c9", "d"]),
        min_size=1,
        max_size=2,
    ),
    threshold=st.integers(1, 40),
)
def test_the_text_probe_estimates_as_the_vocabulary_and_both_plans_agree(
    texts: list[list[str]], deleted: set[int], query: list[str], threshold: int
) -> None:
    """The probe counts a word's own documents with a bounded FTS5 query and only its
    longer terms through fts5vocab; its verdict at any threshold is the vocabulary's,
    and the dense page (word OR its longer terms) is the sparse prefix query's page."""
    with tempfile.TemporaryDirectory() as tmp, TaskStore.open(Path(tmp) / "p.db") as s:
        created = s.tasks.create_many(
            [{"status": "ready", "intent": "order", "description": " ".join(t)} for t in texts]
        ).data
        for i in sorted(deleted):
            if i < len(created):
                s.tasks.delete(str(created[i].id))
        compiled, _ = compile_search(
            normalise_filters({"text": " ".join(query), "limit": 1000}, {})
        )
        assert compiled.dense is not None
        with s.read() as conn:
            got = _probe(conn, compiled, threshold)
            assert got == min(_old_estimate(conn, query), threshold)
            dense = conn.execute(compiled.dense[2], compiled.dense[3]).fetchall()
            sparse = conn.execute(compiled.page_sql, compiled.page_params).fetchall()
        assert dense == sparse


def test_a_word_past_the_term_limit_counting_itself_keeps_the_sparse_plan(
    tmp_path: Path,
) -> None:
    """``zq`` starting 64 longer terms may walk; once ``zq`` is a term too, it has 65."""
    with TaskStore.open(tmp_path / "t.db") as s:
        s.tasks.create_many(
            [{"status": "ready", "intent": "order", "description": f"zq{n:02d}"} for n in range(64)]
        )
        compiled, _ = compile_search(normalise_filters({"text": "zq"}, {}))
        with s.read() as conn:
            assert _probe(conn, compiled, 1000) == 64
        s.tasks.create({"status": "ready", "intent": "order", "description": "zq"})
        with s.read() as conn:
            assert _probe(conn, compiled, 1000) == 0
