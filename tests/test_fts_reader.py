"""A pooled reader's view of the FTS5 index: integrity checks and text search stay true.

FTS5 keeps a copy of its index's structure record per connection. A statement that
opens a cursor on the table first compares the file's data version with the copy's and
reloads it when another connection has committed since; ``PRAGMA integrity_check``
(FTS5's ``xIntegrity``) opens no cursor and checks the index against the copy as it is.
On a store's per-thread reader, whose copy came from an earlier read, the check then
reported blobs the writer had merged away meanwhile: ``fts5: corruption found reading
blob ... task_text`` (or ``checksum mismatch``) on a sound file. Found by the test
engineer after a full store (refused writes, a check, the limit raised, a retry);
neither the full store nor the rolled-back writes are needed, any later writes that
merge FTS5 segments are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import apsw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local import StoreFullError, TaskStore

WORDS = ("cbc", "lipid", "panel", "urine", "culture", "glucose")


def _request(n: int, word: str = "cbc") -> dict[str, object]:
    return {
        "id": f"t_{n}",
        "status": "requested",
        "intent": "order",
        "patientId": f"pt_{n % 7}",
        "description": f"order {n} {word} " + "cmp " * 20,
        "input": [{"type": "lab-panel", "valueString": f"v{n}"}],
    }


def _fresh_check(path: Path) -> list[str]:
    """What a brand-new connection (no cached FTS5 state) says about the file."""
    conn = apsw.Connection(str(path))
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()
    return [] if rows == ["ok"] else rows


def test_integrity_check_after_the_writer_merged_fts_segments_reports_a_sound_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "clinic.db"
    with TaskStore.open(path) as store:
        store.tasks.create_many([_request(n) for n in range(8)])
        assert store.integrity_check() == []  # this thread's reader now holds FTS5 state
        for n in range(8, 16):  # one commit each: new segments, merged as they come
            store.tasks.create(_request(n))
        assert store.integrity_check() == []
        assert store.tasks.count(text="cbc").data == 16
    assert _fresh_check(path) == []


def test_integrity_check_after_another_connection_wrote_reports_a_sound_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "clinic.db"
    with TaskStore.open(path) as store, TaskStore.open(path) as other:
        store.tasks.create_many([_request(n) for n in range(8)])
        assert store.tasks.count(text="cbc").data == 8  # a search caches FTS5 state too
        # another store on the file, as another process would write
        other.tasks.create_many([_request(n) for n in range(8, 16)])
        assert store.integrity_check() == []
        assert other.integrity_check() == []
        assert store.tasks.count(text="cbc").data == 16


def _limit_pages(store: TaskStore, extra: int | None) -> None:
    with store._db.write() as conn:
        pages = int(conn.pragma("page_count"))
        conn.pragma("max_page_count", pages + extra if extra is not None else 1 << 30)


def test_integrity_check_after_a_full_store_recovered_reports_a_sound_file(
    tmp_path: Path,
) -> None:
    """The test engineer's sequence, as found."""
    path = tmp_path / "full.db"
    with TaskStore.open(path) as store:
        store.tasks.create_many([_request(n) for n in range(20)])
        _limit_pages(store, 3)
        for n in range(100, 200):
            try:
                store.tasks.create({**_request(n), "note": "x" * 9000})
            except StoreFullError:
                break
        else:
            raise AssertionError("the store never filled up")
        refused = 0
        for write in (
            lambda: store.tasks.update("t_1", {"note": "y" * 16_000}),
            lambda: store.tasks.create_many(
                [{**_request(n), "note": "z" * 9000} for n in range(300, 310)]
            ),
        ):
            try:
                write()
            except StoreFullError:
                refused += 1
        assert refused == 2
        assert store.integrity_check() == []
        _limit_pages(store, None)
        store.tasks.create_many([{**_request(n), "note": "z" * 9000} for n in range(300, 310)])
        store.tasks.create({**_request(500), "note": "x" * 9000})
        store.tasks.update("t_1", {"note": "y" * 16_000})
        assert store.integrity_check() == []
        assert store.integrity_check() == []
    assert _fresh_check(path) == []


operations = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.sampled_from(("store", "other")), st.sampled_from(WORDS)),
        st.tuples(st.just("many"), st.integers(1, 30), st.sampled_from(WORDS)),
        st.tuples(st.just("check")),
        st.tuples(st.just("search"), st.sampled_from(WORDS)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_reader_checks_and_text_searches_agree_with_a_model_whatever_the_writes(
    ops: list[tuple[object, ...]],
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clinic.db"
        model: dict[str, str] = {}
        with TaskStore.open(path) as store, TaskStore.open(path) as other:
            for op in ops:
                if op[0] == "create":
                    writer = store if op[1] == "store" else other
                    n = len(model)
                    writer.tasks.create(_request(n, str(op[2])))
                    model[f"t_{n}"] = str(op[2])
                elif op[0] == "many":
                    size, word = int(str(op[1])), str(op[2])
                    first = len(model)
                    other.tasks.create_many([_request(n, word) for n in range(first, first + size)])
                    model.update({f"t_{n}": word for n in range(first, first + size)})
                elif op[0] == "check":
                    assert store.integrity_check() == []
                else:
                    word = str(op[1])
                    expected = sorted(i for i, w in model.items() if w == word)
                    found = store.tasks.search(text=word, limit=1000).data
                    assert sorted(str(t.id) for t in found) == expected
                    assert store.tasks.count(text=word).data == len(expected)
            assert store.integrity_check() == []
        assert _fresh_check(path) == []


def test_a_damaged_fts5_structure_record_is_still_reported_as_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "clinic.db"
    with TaskStore.open(path) as store:
        store.tasks.create_many([_request(n) for n in range(8)])
    conn = apsw.Connection(str(path))
    conn.execute("UPDATE task_text_data SET block = x'00ff00ff00ff' WHERE id = 10")
    conn.close()
    with TaskStore.open(path) as store:
        problems = store.integrity_check()
    assert len(problems) == 1
    assert "corrupt structure record" in problems[0]
    assert "task_text" in problems[0]
