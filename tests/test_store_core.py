"""Issue 4: TaskStore on a real SQLite file: open/close, files, create/get/update/delete."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any

import apsw
import pytest
from hypothesis import HealthCheck, given, settings

from clinik_local import (
    ApiResponse,
    ClinikError,
    ForeignFileError,
    NewerSchemaError,
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
from clinik_local.storage.migrations import APPLICATION_ID, SCHEMA_VERSION
from tests.strategies import minimal_request, valid_requests

_BOOKKEEPING = ("versionId", "lastModified")

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
        assert file_store.tasks.history("reused_id").data[-1]["op"] == "create"


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
    assert [h["op"] for h in file_store.tasks.history(task.id).data] == ["create", "delete"]


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


# --- opening files ---------------------------------------------------------------------------


def test_new_store_file_is_created_0600_and_stamped(store_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen it
    try:
        store = TaskStore.open(store_path)
    finally:
        os.umask(old_umask)
    with store:
        store.tasks.create(minimal_request())
        assert store.schema_version() == SCHEMA_VERSION
    assert stat.S_IMODE(os.stat(store_path).st_mode) == 0o600
    conn = apsw.Connection(str(store_path))
    try:
        assert conn.pragma("application_id") == APPLICATION_ID
        assert conn.pragma("user_version") == SCHEMA_VERSION
        assert conn.pragma("journal_mode") == "wal"
    finally:
        conn.close()


def test_an_existing_empty_file_becomes_a_store(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    with TaskStore.open(path) as store:
        assert store.schema_version() == SCHEMA_VERSION


def test_newer_schema_file_is_refused_and_left_byte_for_byte(store_path: Path) -> None:
    with TaskStore.open(store_path) as store:
        store.tasks.create(SEED_LAB_ORDER)
    conn = apsw.Connection(str(store_path))
    conn.pragma("user_version", SCHEMA_VERSION + 1)
    conn.close()
    before = store_path.read_bytes()
    before_files = sorted(p.name for p in store_path.parent.iterdir())
    with pytest.raises(NewerSchemaError) as caught:
        TaskStore.open(store_path)
    assert "newer" in str(caught.value)
    assert "not changed" in str(caught.value)
    assert store_path.read_bytes() == before
    assert sorted(p.name for p in store_path.parent.iterdir()) == before_files


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_foreign_sqlite_file_is_refused_and_left_byte_for_byte(
    tmp_path: Path, journal: str
) -> None:
    path = tmp_path / "other.db"
    conn = apsw.Connection(str(path))
    conn.pragma("journal_mode", journal)
    conn.execute("CREATE TABLE patients(name TEXT); INSERT INTO patients VALUES ('x')")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(ForeignFileError) as caught:
        TaskStore.open(path)
    assert "another program" in str(caught.value)
    assert path.read_bytes() == before
    assert isinstance(caught.value, StorageError)


def test_a_file_with_another_application_id_is_foreign_even_when_empty(tmp_path: Path) -> None:
    path = tmp_path / "stamped.db"
    conn = apsw.Connection(str(path))
    conn.pragma("application_id", 0x12345678)
    conn.close()
    before = path.read_bytes()
    with pytest.raises(ForeignFileError):
        TaskStore.open(path)
    assert path.read_bytes() == before


def test_durability_full_is_an_option_and_bad_options_are_refused(tmp_path: Path) -> None:
    with TaskStore.open(tmp_path / "full.db", durability="full") as store:
        assert store.durability == "full"
        store.tasks.create(minimal_request())
        with store._db.write() as conn:
            assert conn.pragma("synchronous") == 2  # FULL
    with TaskStore.open(tmp_path / "normal.db") as store:
        assert store.durability == "normal"
        with store._db.write() as conn:
            assert conn.pragma("synchronous") == 1  # NORMAL
    bad: dict[str, Any]
    for bad in ({"durability": "fast"}, {"busy_timeout": -1}, {"busy_timeout": "5"}):
        with pytest.raises(ValidationError):
            TaskStore.open(tmp_path / "x.db", **bad)


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


def test_a_directory_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        TaskStore.open(tmp_path)


def test_memory_stores_are_independent() -> None:
    stores = [TaskStore.open(":memory:") for _ in range(50)]
    try:
        stores[0].tasks.create(minimal_request())
        assert stores[0].tasks.count().data == 1
        assert all(s.tasks.count().data == 0 for s in stores[1:])
    finally:
        for s in stores:
            s.close()


def test_history_of_unknown_task_is_not_found(file_store: TaskStore) -> None:
    with pytest.raises(NotFoundError):
        file_store.tasks.history("never_existed")
