"""create_many's bulk path: a large batch into an empty (or small) store loads with the
search indexes dropped and builds them after, in the same transaction.

What must hold: it is all or nothing (a clash or a full disk leaves the store exactly
as it was, every index in place), the file it leaves has the schema of a new store
(same index text, so the same plans), and its derived search rows are those of the
stored bodies, so searches answer as they would after ordinary writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apsw
import pytest

from clinik_local import StoreFullError, TaskExistsError, TaskStore
from clinik_local.demo import generate_requests
from clinik_local.storage.rows import BULK_MIN

from .derived import derived_problems


def _schema(path: Path) -> set[tuple[object, ...]]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return set(
            conn.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'"
            )
        )
    finally:
        conn.close()


def _batch(count: int, seed: int = 5) -> list[dict[str, Any]]:
    requests = list(generate_requests(count, seed=seed))
    for n, request in enumerate(requests[::50]):
        request["partOf"] = [f"t_parent{n % 3}"]
        request["input"] = [{"type": "specimen", "valueString": f"tube {n % 4}"}]
    return requests


def test_a_bulk_import_leaves_the_schema_of_a_new_store_and_derived_rows_of_its_bodies(
    tmp_path: Path,
) -> None:
    TaskStore.open(tmp_path / "new.db").close()
    with TaskStore.open(tmp_path / "bulk.db") as store:
        statements: list[str] = []

        def trace(_cursor: apsw.Cursor, sql: str, _bindings: object) -> bool:
            statements.append(sql)
            return True

        store._db._conn.exec_trace = trace  # watch the writer's DDL
        store.tasks.create_many(_batch(BULK_MIN))
        store.tasks.create_many(_batch(BULK_MIN, seed=6))  # half the store: bulk again
        store.tasks.create_many(_batch(BULK_MIN // 4, seed=7))  # small: ordinary writes
        rebuilt = [s for s in statements if s.startswith("CREATE INDEX tasks_by_patient")]
        assert len(rebuilt) == 2
        assert store.tasks.count().data == 2 * BULK_MIN + BULK_MIN // 4
        parts = store.tasks.count(partOf="t_parent1").data
        assert parts == store.tasks.count(partOf=["t_parent1"]).data > 0
        assert store.tasks.count(input="specimen|tube 1").data > 0
        assert store.integrity_check() == []
    assert _schema(tmp_path / "bulk.db") == _schema(tmp_path / "new.db")
    assert derived_problems(tmp_path / "bulk.db") == []


def test_a_bulk_batch_that_clashes_writes_nothing_and_leaves_every_index(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bulk.db"
    with TaskStore.open(path) as store:
        gone = store.tasks.create({"status": "draft", "intent": "order"}).data
        store.tasks.delete(str(gone.id))  # the id stays taken by its history
        schema = _schema(path)
        counts = store.table_counts()
        batch = _batch(BULK_MIN)
        batch[-1] = dict(batch[-1], id=gone.id)
        with pytest.raises(TaskExistsError) as raised:
            store.tasks.create_many(batch)
        assert raised.value.task_id == gone.id
        assert store.table_counts() == counts
        assert _schema(path) == schema
        assert store.tasks.count().data == 0
        # Usable: the same batch without the clash lands whole, searchable.
        made = store.tasks.create_many(batch[:-1]).data
        assert store.tasks.count(status=str(made[0].status)).data > 0
    assert _schema(path) == schema
    assert derived_problems(path) == []


def test_a_bulk_batch_that_fills_the_disk_writes_nothing_and_leaves_every_index(
    tmp_path: Path,
) -> None:
    path = tmp_path / "full.db"
    with TaskStore.open(path) as store:
        schema = _schema(path)
        with store._db.write() as conn:
            conn.pragma("max_page_count", int(conn.pragma("page_count")) + 40)
        with pytest.raises(StoreFullError):
            store.tasks.create_many(_batch(BULK_MIN))
        assert store.tasks.count().data == 0
        assert store.table_counts()["task_history"] == 0
        assert _schema(path) == schema
        assert store.integrity_check() == []
        with store._db.write() as conn:
            conn.pragma("max_page_count", 1 << 30)
        store.tasks.create_many(_batch(BULK_MIN))
        assert store.tasks.count().data == BULK_MIN
    assert _schema(path) == schema
    assert derived_problems(path) == []
