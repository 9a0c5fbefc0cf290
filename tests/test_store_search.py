"""Issue 4: search on a real file equals a pure-Python filter; paging sees every task once."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local import TaskStore, encode_task
from tests.strategies import minimal_request, searchable_requests, small_ids

SIX = ["patientId", "ownerId", "requesterId", "status", "priority", "code"]
#: A value of each filter that no generated task has (so empty results are tried too).
ABSENT = {
    "patientId": "pt_absent",
    "ownerId": "prac_absent",
    "requesterId": "req_absent",
    "status": "draft",
    "priority": "stat",
    "code": "absent-code",
}


def _file_settings(max_examples: int) -> settings:
    """Hypothesis settings for tests that open a real file per example."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def _new_store(tmp_path: Path) -> TaskStore:
    """A fresh file store per hypothesis example (the fixture's tmp_path is shared)."""
    return TaskStore.open(tmp_path / f"{uuid.uuid4().hex}.db")


def _matches(wire: dict[str, Any], filters: dict[str, list[str]]) -> bool:
    return all(wire.get(name) in values for name, values in filters.items())


def _newest_first(wires: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(wires, key=lambda w: (w["authoredOn"], w["id"]), reverse=True)


@given(
    requests=st.lists(searchable_requests(), max_size=40, unique_by=lambda r: r["id"]),
    chosen=st.lists(st.sampled_from(SIX), min_size=1, max_size=2, unique=True),
    as_keywords=st.booleans(),
    data=st.data(),
)
@_file_settings(60)
def test_each_filter_and_pair_returns_exactly_what_a_python_filter_returns(
    tmp_path: Path,
    requests: list[dict[str, Any]],
    chosen: list[str],
    as_keywords: bool,
    data: st.DataObject,
) -> None:
    with _new_store(tmp_path) as store:
        wires = [encode_task(t) for t in store.tasks.create_many(requests).data]
        filters: dict[str, list[str]] = {}
        for name in chosen:
            present = [*sorted({w[name] for w in wires if name in w}), ABSENT[name]]
            filters[name] = data.draw(
                st.lists(st.sampled_from(present), min_size=1, max_size=3, unique=True),
                label=name,
            )
        expected = _newest_first([w for w in wires if _matches(w, filters)])
        single = {k: v[0] if len(v) == 1 else v for k, v in filters.items()}
        got = (
            store.tasks.search(limit=1000, **single)
            if as_keywords
            else store.tasks.search(single, limit=1000)
        )
        assert [encode_task(t) for t in got.data] == expected
        assert got.meta["hasMore"] is False
        assert store.tasks.count(single).data == len(expected)


@given(
    count=st.integers(0, 60),
    page_size=st.integers(1, 25),
    status_filter=st.sampled_from([None, "requested", "ready"]),
    inserts=st.lists(st.integers(0, 4), max_size=8),
)
@_file_settings(40)
def test_paging_visits_every_matching_task_exactly_once_while_others_are_inserted(
    tmp_path: Path,
    count: int,
    page_size: int,
    status_filter: str | None,
    inserts: list[int],
) -> None:
    filters = {} if status_filter is None else {"status": status_filter}
    with _new_store(tmp_path) as store:
        # Many ties on authoredOn, so the id tie-breaker is exercised.
        requests = [
            minimal_request(
                status=["requested", "ready"][n % 2],
                authoredOn=f"2025-01-01T00:00:{n % 7:02d}.000Z",
            )
            for n in range(count)
        ]
        original = [encode_task(t) for t in store.tasks.create_many(requests).data]
        matching = {w["id"] for w in original if _matches(w, {k: [v] for k, v in filters.items()})}
        seen: list[str] = []
        cursor: str | None = None
        for step in range(count + len(inserts) * 4 + 2):  # bounded: every page moves on
            page = store.tasks.search(filters, limit=page_size, cursor=cursor)
            assert len(page.data) <= page_size
            seen.extend(t.id or "" for t in page.data)
            if step < len(inserts):  # newer, older and tied with the pages already seen
                for k in range(inserts[step]):
                    when = ["2026-06-01T00:00:00Z", "2024-06-01T00:00:00Z", "2025-01-01T00:00:03Z"]
                    store.tasks.create(
                        minimal_request(
                            status=["requested", "ready"][k % 2], authoredOn=when[k % 3]
                        )
                    )
            if not page.meta["hasMore"]:
                assert page.meta["nextCursor"] is None
                break
            cursor = str(page.meta["nextCursor"])
        else:
            raise AssertionError("paging did not finish")
        assert len(seen) == len(set(seen))  # nothing twice
        assert matching <= set(seen)  # every task present from the start was seen
        if not inserts:
            expected = _newest_first([w for w in original if w["id"] in matching])
            assert seen == [w["id"] for w in expected]


@given(page_size=st.integers(1, 7), owner=small_ids("prac"))
@_file_settings(20)
def test_pages_concatenate_to_the_single_big_page(
    tmp_path: Path, page_size: int, owner: str
) -> None:
    with _new_store(tmp_path) as store:
        store.tasks.create_many(
            [minimal_request(ownerId=f"prac_{n % 5}", priority="stat") for n in range(40)]
        )
        whole = [t.id for t in store.tasks.search(ownerId=owner, limit=1000).data]
        pieces: list[str | None] = []
        cursor: str | None = None
        while True:
            page = store.tasks.search(ownerId=owner, limit=page_size, cursor=cursor)
            pieces.extend(t.id for t in page.data)
            if not page.meta["hasMore"]:
                break
            cursor = str(page.meta["nextCursor"])
        assert pieces == whole
        assert len(whole) == 8


def test_a_task_without_text_has_no_text_row_and_gains_and_loses_one_as_its_text_changes(
    tmp_path: Path,
) -> None:
    """No text, no task_text row (nothing to match, and an empty FTS5 row costs a third
    of a create); text added later is found, text removed is not, and deleting a task
    with or without a row leaves the file sound and its derived rows exact."""
    from tests.derived import derived_problems

    path = tmp_path / "text.db"
    with TaskStore.open(path) as store:
        bare = store.tasks.create({"status": "requested", "intent": "order"}).data
        worded = store.tasks.create(
            {"status": "requested", "intent": "order", "description": "Fasting glucose"}
        ).data
        assert bare.id is not None
        assert worded.id is not None

        def text_rows() -> int:
            return store.table_counts()["task_text_docsize"]

        assert text_rows() == 1
        assert [t.id for t in store.tasks.search(text="fasting").data] == [worded.id]

        store.tasks.update(bare.id, {"note": "fasting since midnight"})
        assert text_rows() == 2
        found = {t.id for t in store.tasks.search(text="fasting").data}
        assert found == {bare.id, worded.id}

        store.tasks.update(bare.id, {"note": None})
        assert text_rows() == 1
        assert [t.id for t in store.tasks.search(text="fasting").data] == [worded.id]

        store.tasks.delete(bare.id)
        store.tasks.delete(worded.id)
        assert text_rows() == 0
        assert store.tasks.search(text="fasting").data == []
        assert store.integrity_check() == []
    assert derived_problems(path) == []
