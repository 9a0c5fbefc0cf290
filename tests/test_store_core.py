"""Issue 4: TaskStore on a real SQLite file: create/get/update/delete, reopen and close.

(Opening, creating, damaged and foreign files: ``tests/test_files.py``.)
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from clinik_local import (
    ApiResponse,
    ClinikError,
    NotFoundError,
    StorageError,
    TaskExistsError,
    TaskStatus,
    TaskStore,
    ValidationError,
    VersionConflictError,
    encode_task,
)
from clinik_local.demo import SEED_LAB_ORDER
from tests.strategies import minimal_request, valid_requests
from tests.wire import BOOKKEEPING as _BOOKKEEPING

# --- create / get, and reopening ----------------------------------------------------------


def test_seed_lab_order_round_trips_through_create_and_get_on_a_file(store_path: Path) -> None:
    with TaskStore.open(store_path) as store:
        created = store.tasks.create(SEED_LAB_ORDER)
        assert isinstance(created, ApiResponse)
        assert created.meta["syncState"] == "pending"
        task = created.data
        assert task.id is not None
        assert task.id.startswith("task_")
        assert task.version_id == "1"
        assert task.last_modified is not None
        assert task.last_modified >= task.authored_on
        fetched = store.tasks.get(task.id)
        assert fetched.data == task
        assert fetched.meta["syncState"] == "pending"
        wire = encode_task(fetched.data)
        assert {k: v for k, v in wire.items() if k not in ("id", "authoredOn", *_BOOKKEEPING)} == {
            **SEED_LAB_ORDER,
            "executionPeriod": {
                "start": "2025-02-01T08:00:00.000Z",
                "end": "2025-02-01T17:00:00.000Z",
            },
        }
    with TaskStore.open(store_path) as reopened:
        assert reopened.tasks.get(task.id).data == task


@given(request=valid_requests(with_id=True))
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_valid_request_is_stored_and_read_back_exactly(
    tmp_path: Path, request: dict[str, Any]
) -> None:
    with TaskStore.open(tmp_path / f"{uuid.uuid4().hex}.db") as store:
        created = store.tasks.create(request).data
        wire = encode_task(created)
        assert {k: v for k, v in wire.items() if k not in _BOOKKEEPING} == request
        assert store.tasks.get(request["id"]).data == created


def test_recreating_a_deleted_id_never_leaks_a_raw_sqlite_error(file_store: TaskStore) -> None:
    file_store.tasks.create(minimal_request(id="reused_id", note="first life"))
    file_store.tasks.delete("reused_id")
    before = file_store.table_counts()
    try:
        again = file_store.tasks.create(minimal_request(id="reused_id", note="second life"))
    except ClinikError:
        assert file_store.table_counts() == before  # refused: nothing written
    else:
        assert file_store.tasks.get("reused_id").data == again.data
        assert file_store.tasks.history("reused_id").data[-1].op == "create"


def test_everything_written_persists_across_reopen(store_path: Path) -> None:
    with TaskStore.open(store_path) as store:
        kept = store.tasks.create(minimal_request(note="v1")).data
        assert kept.id is not None
        updated = store.tasks.update(kept.id, {"note": "v2"}).data
        gone = store.tasks.create(minimal_request()).data
        assert gone.id is not None
        store.tasks.delete(gone.id)
        many = store.tasks.create_many([minimal_request(code=f"c{n}") for n in range(20)]).data
        counts = store.table_counts()
    with TaskStore.open(store_path) as store:
        assert store.tasks.get(kept.id).data == updated
        with pytest.raises(NotFoundError):
            store.tasks.get(gone.id)
        assert [store.tasks.get(t.id or "").data for t in many] == many
        assert store.table_counts() == counts
        assert store.integrity_check() == []


# --- update / delete ---------------------------------------------------------------------------


def test_update_replaces_given_keys_and_none_clears_optional_fields(file_store: TaskStore) -> None:
    task = file_store.tasks.create(
        minimal_request(note="n", ownerId="prac_1", priority="stat", basedOn=["sr_1"])
    ).data
    assert task.id is not None
    updated = file_store.tasks.update(
        task.id, {"note": None, "basedOn": None, "priority": "routine"}
    ).data
    assert updated.note is None
    assert updated.based_on == ()
    assert updated.priority is not None
    assert updated.priority.value == "routine"
    assert updated.owner_id == "prac_1"  # not given: kept
    assert updated.version_id == "2"
    assert updated.last_modified is not None
    assert task.last_modified is not None
    assert updated.last_modified >= task.last_modified
    assert file_store.tasks.get(task.id).data == updated
    assert "note" not in encode_task(updated)


def test_update_clearing_an_unknown_field_is_refused_not_ignored(file_store: TaskStore) -> None:
    task = file_store.tasks.create(minimal_request(patientId="pt_1")).data
    assert task.id is not None
    before = file_store.table_counts()
    with pytest.raises(ValidationError) as caught:
        file_store.tasks.update(task.id, {"patient_id": None, "colour": None})
    assert set(caught.value.paths) == {"patient_id", "colour"}
    assert file_store.table_counts() == before
    assert file_store.tasks.get(task.id).data.patient_id == "pt_1"


def test_update_that_changes_nothing_writes_nothing(file_store: TaskStore) -> None:
    task = file_store.tasks.create(minimal_request(note="same")).data
    assert task.id is not None
    before = file_store.table_counts()
    again = file_store.tasks.update(task.id, {"note": "same"}).data
    assert again == task
    assert file_store.table_counts() == before


def test_if_match_guards_update_and_delete(file_store: TaskStore) -> None:
    task = file_store.tasks.create(minimal_request()).data
    assert task.id is not None
    assert file_store.tasks.update(task.id, {"note": "a"}, if_match="1").data.version_id == "2"
    before = file_store.table_counts()
    with pytest.raises(VersionConflictError) as caught:
        file_store.tasks.update(task.id, {"note": "b"}, if_match="1")
    assert (caught.value.expected, caught.value.actual) == ("1", "2")
    assert "get it again" in str(caught.value)
    with pytest.raises(VersionConflictError):
        file_store.tasks.delete(task.id, if_match="1")
    assert file_store.table_counts() == before
    assert file_store.tasks.get(task.id).data.note == "a"
    file_store.tasks.update(task.id, {"note": "c"}, if_match="2")
    file_store.tasks.delete(task.id, if_match="3")
    with pytest.raises(NotFoundError):
        file_store.tasks.get(task.id)


def test_delete_then_get_is_not_found(file_store: TaskStore) -> None:
    task = file_store.tasks.create(minimal_request()).data
    assert task.id is not None
    response = file_store.tasks.delete(task.id)
    assert response.data == {"id": task.id, "deleted": True}
    assert response.meta["syncState"] == "pending"
    with pytest.raises(NotFoundError):
        file_store.tasks.get(task.id)
    with pytest.raises(NotFoundError):
        file_store.tasks.delete(task.id)
    with pytest.raises(LookupError):
        file_store.tasks.update(task.id, {"note": "x"})
    assert [h.op for h in file_store.tasks.history(task.id).data] == ["create", "delete"]


def test_create_with_a_given_id_keeps_it_and_a_second_create_is_refused(
    file_store: TaskStore,
) -> None:
    assert file_store.tasks.create(minimal_request(id="fixed_id")).data.id == "fixed_id"
    before = file_store.table_counts()
    with pytest.raises(TaskExistsError) as caught:
        file_store.tasks.create(minimal_request(id="fixed_id", note="other"))
    assert caught.value.task_id == "fixed_id"
    assert file_store.table_counts() == before


def test_create_many_is_all_or_nothing_and_names_the_bad_request(file_store: TaskStore) -> None:
    before = file_store.table_counts()
    good = [minimal_request(patientId=f"pt_{n}") for n in range(50)]
    bad = [*good[:10], minimal_request(status="nope"), *good[10:], minimal_request(priority=1)]
    with pytest.raises(ValidationError) as caught:
        file_store.tasks.create_many(bad)
    assert set(caught.value.paths) == {"[10].status", "[51].priority"}
    assert file_store.table_counts() == before
    created = file_store.tasks.create_many(good)
    assert created.meta["count"] == 50
    assert [t.patient_id for t in created.data] == [f"pt_{n}" for n in range(50)]
    assert file_store.tasks.count().data == 50
    after_good = file_store.table_counts()
    taken = created.data[7].id
    with pytest.raises(TaskExistsError) as exists:
        file_store.tasks.create_many([minimal_request(id="fresh"), minimal_request(id=taken)])
    assert exists.value.task_id == taken
    with pytest.raises(ValidationError) as dup:
        file_store.tasks.create_many([minimal_request(id="twice"), minimal_request(id="twice")])
    assert dup.value.paths == ("[1].id",)
    assert file_store.table_counts() == after_good


def test_create_many_of_nothing_is_fine(file_store: TaskStore) -> None:
    before = file_store.table_counts()
    assert file_store.tasks.create_many([]).data == []
    assert file_store.table_counts() == before


def test_store_managed_fields_are_refused_in_create_and_update(file_store: TaskStore) -> None:
    with pytest.raises(ValidationError) as caught:
        file_store.tasks.create(minimal_request(versionId="9", lastModified="2030-01-01T00:00:00Z"))
    assert set(caught.value.paths) == {"versionId", "lastModified"}
    task = file_store.tasks.create(minimal_request()).data
    assert task.id is not None
    with pytest.raises(ValidationError) as changed:
        file_store.tasks.update(task.id, {"id": "other", "versionId": "7"})
    assert set(changed.value.paths) == {"id", "versionId"}


def test_status_enums_come_back_as_enums_after_a_file_round_trip(file_store: TaskStore) -> None:
    task = file_store.tasks.create(minimal_request(status="on-hold")).data
    assert file_store.tasks.get(task.id or "").data.status is TaskStatus.ON_HOLD


# --- closing ---------------------------------------------------------------------------------
# (Creating and opening files, and damaged or foreign ones: tests/test_files.py.)


def test_context_manager_closes_and_close_is_idempotent(store_path: Path) -> None:
    with TaskStore.open(store_path) as store:
        assert not store.closed
        assert "open" in repr(store)
    assert store.closed
    store.close()
    assert "closed" in repr(store)
    with pytest.raises(StorageError):
        store.tasks.create(minimal_request())
    with pytest.raises(StorageError):
        store.tasks.get("task_x")


def test_history_of_unknown_task_is_not_found(file_store: TaskStore) -> None:
    with pytest.raises(NotFoundError):
        file_store.tasks.history("never_existed")


def test_a_memory_store_read_translates_sqlite_errors_and_always_releases_its_lock() -> None:
    store = TaskStore.open(":memory:")
    db = store._db
    with pytest.raises(StorageError), db.read() as conn:
        conn.execute("SELECT * FROM no_such_table")
    with pytest.raises(KeyError), db.read():
        raise KeyError("not an SQLite error: passes through as it is")
    # The lock was released each time: another thread can read (a held lock would block).
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(store.tasks.count().data))
    reader.start()
    reader.join(timeout=10)
    assert seen == [0]
    store.close()
    with pytest.raises(ClinikError), db.read():
        pass  # a closed store refuses the read
    # ... and did not keep its lock (an RLock: asked from another thread).
    free: list[bool] = []

    def try_lock() -> None:
        got = db._lock.acquire(blocking=False)
        free.append(got)
        if got:
            db._lock.release()

    other = threading.Thread(target=try_lock)
    other.start()
    other.join(timeout=10)
    assert free == [True]
