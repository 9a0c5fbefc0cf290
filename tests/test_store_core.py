"""Issue 4: TaskStore on a real SQLite file: CRUD, outbox atomicity, files, concurrency."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local import (
    ApiResponse,
    ForeignFileError,
    IllegalTransitionError,
    NewerSchemaError,
    NotFoundError,
    StorageError,
    TaskExistsError,
    TaskStore,
    ValidationError,
    VersionConflictError,
    encode_task,
)
from clinik_local.demo import SEED_LAB_ORDER
from clinik_local.migrations import APPLICATION_ID, SCHEMA_VERSION
from tests.strategies import CORRUPTIONS, set_path, valid_requests


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    with TaskStore.open(tmp_path / "clinic.db") as s:
        yield s


def _minimal(**extra: Any) -> dict[str, Any]:
    return {"status": "requested", "intent": "order", **extra}


# --- create / get / update / delete ----------------------------------------------------


def test_seed_lab_order_round_trips_through_create_and_get_on_a_file(tmp_path: Path) -> None:
    path = tmp_path / "clinic.db"
    with TaskStore.open(path) as store:
        created = store.tasks.create(SEED_LAB_ORDER)
        assert isinstance(created, ApiResponse)
        assert created.meta["syncState"] == "pending"
        task = created.data
        assert task.id is not None
        assert task.id.startswith("task_")
        assert task.version_id == "1"
        assert task.last_modified is not None
        assert task.last_modified >= task.authored_on
        assert store.tasks.get(task.id).data == task
    with TaskStore.open(path) as reopened:
        assert reopened.tasks.get(task.id).data == task


@given(request=valid_requests(with_id=True))
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_valid_request_is_stored_and_read_back_exactly(request: dict[str, Any]) -> None:
    with TaskStore.open(":memory:") as store:
        task = store.tasks.create(request).data
        wire = encode_task(task)
        assert {k: v for k, v in wire.items() if k not in ("versionId", "lastModified")} == request
        assert store.tasks.get(request["id"]).data == task


def test_each_mutation_writes_one_history_row_and_one_outbox_row(store: TaskStore) -> None:
    base = store.table_counts()
    task = store.tasks.create(_minimal()).data
    assert task.id is not None
    store.tasks.update(task.id, {"status": "accepted"})
    store.tasks.update(task.id, {"note": "called"})
    store.tasks.delete(task.id)
    after = store.table_counts()
    assert after["task_history"] - base["task_history"] == 4
    assert after["outbox"] - base["outbox"] == 4
    assert after["tasks"] == base["tasks"]
    with store.read() as conn:
        ops = [r[0] for r in conn.execute("SELECT op FROM outbox ORDER BY seq").fetchall()]
        keys = [r[0] for r in conn.execute("SELECT change_id FROM outbox").fetchall()]
    assert ops == ["create", "update", "update", "delete"]
    assert len(set(keys)) == 4
    history = store.tasks.history(task.id).data
    assert [h["op"] for h in history] == ["create", "update", "update", "delete"]


def test_update_replaces_given_keys_and_none_clears_optional_fields(store: TaskStore) -> None:
    task = store.tasks.create(_minimal(note="n", ownerId="prac_1", priority="stat")).data
    assert task.id is not None
    updated = store.tasks.update(task.id, {"note": None, "priority": "routine"}).data
    assert updated.note is None
    assert updated.priority is not None
    assert updated.priority.value == "routine"
    assert updated.owner_id == "prac_1"
    assert updated.version_id == "2"
    assert store.tasks.get(task.id).data == updated


def test_update_that_changes_nothing_writes_nothing(store: TaskStore) -> None:
    task = store.tasks.create(_minimal(note="same")).data
    assert task.id is not None
    before = store.table_counts()
    again = store.tasks.update(task.id, {"note": "same"}).data
    assert again == task
    assert store.table_counts() == before


def test_update_with_stale_if_match_raises_conflict_and_writes_nothing(store: TaskStore) -> None:
    task = store.tasks.create(_minimal()).data
    assert task.id is not None
    store.tasks.update(task.id, {"note": "first"}, if_match="1")
    before = store.table_counts()
    with pytest.raises(VersionConflictError) as caught:
        store.tasks.update(task.id, {"note": "second"}, if_match="1")
    assert caught.value.actual == "2"
    with pytest.raises(VersionConflictError):
        store.tasks.delete(task.id, if_match=1)
    assert store.table_counts() == before


def test_illegal_status_change_is_refused_and_admin_override_is_recorded(store: TaskStore) -> None:
    task = store.tasks.create(_minimal()).data
    assert task.id is not None
    before = store.table_counts()
    with pytest.raises(IllegalTransitionError) as caught:
        store.tasks.update(task.id, {"status": "completed"})
    assert "requested" in str(caught.value)
    assert "completed" in str(caught.value)
    assert store.table_counts() == before
    done = store.tasks.update(
        task.id, {"status": "completed"}, admin_override="entered on paper; correcting record"
    ).data
    assert done.status.value == "completed"
    history = store.tasks.history(task.id).data
    assert history[-1]["overrideReason"] == "entered on paper; correcting record"
    with pytest.raises(IllegalTransitionError):
        store.tasks.update(task.id, {"status": "in-progress"})  # completed is terminal


def test_create_may_use_any_status_for_imported_records(store: TaskStore) -> None:
    for status in ("completed", "failed", "on-hold"):
        assert store.tasks.create(_minimal(status=status)).data.status.value == status


def test_delete_then_get_is_not_found(store: TaskStore) -> None:
    task = store.tasks.create(_minimal()).data
    assert task.id is not None
    response = store.tasks.delete(task.id)
    assert response.data == {"id": task.id, "deleted": True}
    with pytest.raises(NotFoundError):
        store.tasks.get(task.id)
    with pytest.raises(NotFoundError):
        store.tasks.delete(task.id)
    with pytest.raises(LookupError):  # NotFoundError is a LookupError
        store.tasks.update(task.id, {"note": "x"})


def test_create_with_an_existing_id_is_refused_and_writes_nothing(store: TaskStore) -> None:
    store.tasks.create(_minimal(id="fixed_id"))
    before = store.table_counts()
    with pytest.raises(TaskExistsError):
        store.tasks.create(_minimal(id="fixed_id"))
    assert store.table_counts() == before


def test_store_managed_fields_are_refused_in_create_and_update(store: TaskStore) -> None:
    with pytest.raises(ValidationError) as caught:
        store.tasks.create(_minimal(versionId="9", lastModified="2030-01-01T00:00:00Z"))
    assert set(caught.value.paths) == {"versionId", "lastModified"}
    task = store.tasks.create(_minimal()).data
    assert task.id is not None
    with pytest.raises(ValidationError) as caught:
        store.tasks.update(task.id, {"id": "other"})
    assert caught.value.paths == ("id",)


# --- nothing written on bad input ---------------------------------------------------------


@pytest.mark.parametrize(("path", "bad"), CORRUPTIONS[:12], ids=[p for p, _ in CORRUPTIONS[:12]])
def test_rejected_create_and_update_leave_every_table_unchanged(
    store: TaskStore, path: str, bad: object
) -> None:
    task = store.tasks.create(SEED_LAB_ORDER).data
    assert task.id is not None
    before = store.table_counts()
    with pytest.raises(ValidationError) as caught:
        store.tasks.create(set_path(dict(SEED_LAB_ORDER), path, bad))
    assert any(p.startswith(path.split("[")[0].split(".")[0]) for p in caught.value.paths)
    if "." not in path and "[" not in path:
        with pytest.raises(ValidationError):
            store.tasks.update(task.id, {path: bad})
    assert store.table_counts() == before


def test_create_many_is_all_or_nothing_and_names_the_bad_request(store: TaskStore) -> None:
    before = store.table_counts()
    good = [_minimal(patientId=f"pt_{n}") for n in range(50)]
    bad = [*good[:10], _minimal(status="nope"), *good[10:], _minimal(priority=1)]
    with pytest.raises(ValidationError) as caught:
        store.tasks.create_many(bad)
    assert set(caught.value.paths) == {"[10].status", "[51].priority"}
    assert store.table_counts() == before
    created = store.tasks.create_many(good).data
    assert len(created) == 50
    assert store.tasks.count().data == 50
    with pytest.raises(TaskExistsError):
        store.tasks.create_many([_minimal(id="dup"), *[_minimal(id=t.id) for t in created[:1]]])
    assert store.tasks.count().data == 50


def test_bad_ids_and_arguments_are_validation_errors(store: TaskStore) -> None:
    for call in (
        lambda: store.tasks.get("has space"),
        lambda: store.tasks.get(""),
        lambda: store.tasks.delete("x" * 65),
        lambda: store.tasks.update("ok", "not a mapping"),  # type: ignore[arg-type]
        lambda: store.tasks.search(limit=0),
        lambda: store.tasks.search(limit=1001),
        lambda: store.tasks.search(cursor="garbage"),
        lambda: store.tasks.create_many("nope"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValidationError):
            call()


# --- search (the six filters) -------------------------------------------------------------

_FILTERS = ["patientId", "ownerId", "requesterId", "status", "priority", "code"]
_ABSENT = {
    "patientId": "pt_absent",
    "ownerId": "prac_absent",
    "requesterId": "req_absent",
    "status": "draft",
    "priority": "stat",
    "code": "absent-code",
}


def _matches(wire: dict[str, Any], filters: dict[str, list[str]]) -> bool:
    return all(wire.get(name) in values for name, values in filters.items())


@given(
    requests=st.lists(valid_requests(with_id=True), max_size=30, unique_by=lambda r: r["id"]),
    chosen=st.dictionaries(st.sampled_from(_FILTERS), st.integers(0, 4), min_size=1, max_size=2),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_six_filters_and_pairs_equal_a_pure_python_filter(
    requests: list[dict[str, Any]], chosen: dict[str, int], data: st.DataObject
) -> None:
    with TaskStore.open(":memory:") as store:
        tasks = store.tasks.create_many(requests).data
        wires = [encode_task(t) for t in tasks]
        filters: dict[str, list[str]] = {}
        for name in chosen:
            present = sorted({w[name] for w in wires if name in w}) or [_ABSENT[name]]
            filters[name] = data.draw(
                st.lists(st.sampled_from(present), min_size=1, max_size=2, unique=True)
            )
        expected = sorted(
            (w for w in wires if _matches(w, filters)),
            key=lambda w: (w["authoredOn"], w["id"]),
            reverse=True,
        )
        got = store.tasks.search(filters, limit=1000)
        assert [encode_task(t) for t in got.data] == expected
        assert store.tasks.count(filters).data == len(expected)


@given(
    count=st.integers(0, 60),
    page_size=st.integers(1, 25),
    inserts=st.lists(st.integers(0, 3), max_size=8),
)
@settings(max_examples=40, deadline=None)
def test_paging_visits_every_task_once_while_others_are_inserted(
    count: int, page_size: int, inserts: list[int]
) -> None:
    with TaskStore.open(":memory:") as store:
        original = {
            t.id or ""
            for t in store.tasks.create_many(
                [_minimal(authoredOn=f"2025-01-01T00:00:{n % 60:02d}.000Z") for n in range(count)]
            ).data
        }
        seen: list[str] = []
        cursor: str | None = None
        step = 0
        while True:
            page = store.tasks.search(limit=page_size, **({"cursor": cursor} if cursor else {}))
            seen.extend(t.id or "" for t in page.data)
            if step < len(inserts):  # new tasks, newer and older than the cursor
                for k in range(inserts[step]):
                    store.tasks.create(_minimal(authoredOn=f"202{4 + k % 3}-06-01T00:00:00Z"))
                step += 1
            if not page.meta["hasMore"]:
                break
            cursor = str(page.meta["nextCursor"])
        seen_original = [i for i in seen if i in original]
        assert sorted(seen_original) == sorted(original)
        assert len(seen) == len(set(seen))


# --- files ---------------------------------------------------------------------------------


def test_new_store_file_is_private_and_stamped(tmp_path: Path) -> None:
    path = tmp_path / "clinic.db"
    with TaskStore.open(path) as store:
        store.tasks.create(_minimal())
        assert store.schema_version() == SCHEMA_VERSION
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    conn = apsw.Connection(str(path))
    assert conn.pragma("application_id") == APPLICATION_ID
    assert conn.pragma("user_version") == SCHEMA_VERSION
    assert conn.pragma("journal_mode") == "wal"
    conn.close()


def test_newer_schema_file_is_refused_and_left_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    TaskStore.open(path).close()
    conn = apsw.Connection(str(path))
    conn.pragma("user_version", SCHEMA_VERSION + 1)
    conn.close()
    before = path.read_bytes()
    with pytest.raises(NewerSchemaError) as caught:
        TaskStore.open(path)
    assert "newer" in str(caught.value)
    assert path.read_bytes() == before


def test_foreign_sqlite_file_is_refused_and_left_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE patients(name TEXT); INSERT INTO patients VALUES ('x')")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(ForeignFileError):
        TaskStore.open(path)
    assert path.read_bytes() == before
    assert isinstance(ForeignFileError("x"), StorageError)


def test_durability_full_is_an_option_and_bad_options_are_refused(tmp_path: Path) -> None:
    with TaskStore.open(tmp_path / "full.db", durability="full") as store:
        with store.read() as conn:
            pass
        assert store.durability == "full"
        store.tasks.create(_minimal())
        assert store._conn.pragma("synchronous") == 2  # FULL
    with pytest.raises(ValidationError):
        TaskStore.open(tmp_path / "x.db", durability="fast")  # type: ignore[arg-type]
    del conn


def test_closed_store_refuses_calls_and_close_is_idempotent(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "c.db")
    store.close()
    store.close()
    assert store.closed
    with pytest.raises(StorageError):
        store.tasks.create(_minimal())


# --- concurrency ---------------------------------------------------------------------------


def test_eight_threads_writing_500_mixed_changes_each_on_one_store(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with TaskStore.open(tmp_path / "threads.db") as store:

        def work(n: int) -> None:
            try:
                mine: list[str] = []
                for i in range(500):
                    if i % 5 == 4 and mine:
                        store.tasks.update(mine[-1], {"note": f"t{n} i{i}"})
                    elif i % 7 == 6 and mine:
                        store.tasks.delete(mine.pop())
                    else:
                        task = store.tasks.create(_minimal(patientId=f"pt_{n}"))
                        mine.append(task.data.id or "")
                    if i % 50 == 0:
                        store.tasks.search(patientId=f"pt_{n}")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        counts = store.table_counts()
        assert counts["task_history"] == 8 * 500
        assert counts["outbox"] == 8 * 500
        assert store.integrity_check() == []


_CHILD = """
import sys
from clinik_local import TaskStore
with TaskStore.open(sys.argv[1]) as store:
    for i in range(1000):
        store.tasks.create({"status": "draft", "intent": "order", "patientId": f"pt_{sys.argv[2]}"})
print("done")
"""


def test_four_processes_creating_1000_tasks_each_on_one_file(tmp_path: Path) -> None:
    path = tmp_path / "procs.db"
    TaskStore.open(path).close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out.strip() == "done"
    with TaskStore.open(path) as store:
        for n in range(4):
            assert store.tasks.count(patientId=f"pt_{n}").data == 1000
        assert store.table_counts()["outbox"] == 4000
        assert store.integrity_check() == []


def test_memory_stores_are_independent_and_cheap_to_make() -> None:
    stores = [TaskStore.open(":memory:") for _ in range(200)]
    stores[0].tasks.create(_minimal())
    assert stores[0].tasks.count().data == 1
    assert all(s.tasks.count().data == 0 for s in stores[1:])
    for s in stores:
        s.close()


def test_history_of_unknown_task_is_not_found(store: TaskStore) -> None:
    with pytest.raises(NotFoundError):
        store.tasks.history("never_existed")
    json.dumps(store.table_counts())
