"""Issue 4: a mutation writes its task, one history row and one outbox row together; a
rejected call writes nothing anywhere (the row count of every table is unchanged)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local import (
    ClinikError,
    IllegalTransitionError,
    NotFoundError,
    TaskExistsError,
    TaskStore,
    ValidationError,
    VersionConflictError,
    encode_task,
)
from clinik_local.demo import SEED_LAB_ORDER
from clinik_local.storage.outbox import PAYLOAD
from tests.strategies import invalid_requests, minimal_request, names_path, set_path
from tests.wire import BOOKKEEPING as _BOOKKEEPING

_ON_FILE = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def seeded(file_store: TaskStore) -> tuple[TaskStore, str]:
    """A file store holding the seed lab order (updated once, so at versionId 2)."""
    task = file_store.tasks.create(SEED_LAB_ORDER).data
    assert task.id is not None
    file_store.tasks.update(task.id, {"note": "second version"})
    return file_store, task.id


# --- rejected calls write nothing --------------------------------------------------------------


@given(case=invalid_requests())
@_ON_FILE
def test_a_create_with_one_bad_field_writes_nothing(
    seeded: tuple[TaskStore, str], case: tuple[dict[str, Any], str]
) -> None:
    store, _ = seeded
    request, path = case
    before = store.table_counts()
    with pytest.raises(ValidationError) as caught:
        store.tasks.create(request)
    assert names_path(caught.value.paths, path)
    with pytest.raises(ValidationError):
        store.tasks.create_many([minimal_request(), request])
    assert store.table_counts() == before


@given(case=invalid_requests())
@_ON_FILE
def test_an_update_with_one_bad_field_writes_nothing(
    seeded: tuple[TaskStore, str], case: tuple[dict[str, Any], str]
) -> None:
    store, task_id = seeded
    _, path = case
    bad_value = _corruption_of(case)
    current = encode_task(store.tasks.get(task_id).data)
    for key in _BOOKKEEPING:
        current.pop(key)
    corrupted = set_path(current, path, bad_value)
    root = path.split("[")[0].split(".")[0]
    before = store.table_counts()
    with pytest.raises(ValidationError) as caught:
        store.tasks.update(task_id, {root: corrupted.get(root)}, if_match="2")
    assert names_path(caught.value.paths, root)
    assert store.table_counts() == before
    assert store.tasks.get(task_id).data.version_id == "2"


def _corruption_of(case: tuple[dict[str, Any], str]) -> object:
    """The bad value the strategy put at the case's path."""
    request, path = case
    target: Any = request
    for part in path.replace("[", ".[").split("."):
        target = target[int(part[1:-1])] if part.startswith("[") else target[part]
    return target


def _rejections(store: TaskStore, task_id: str) -> list[tuple[str, Callable[[], object]]]:
    t = store.tasks
    return [
        ("create: existing id", lambda: t.create(minimal_request(id=task_id))),
        ("create: store-managed field", lambda: t.create(minimal_request(versionId="1"))),
        ("create: not a mapping", lambda: t.create(["status", "draft"])),  # type: ignore[arg-type]
        ("create_many: one bad", lambda: t.create_many([minimal_request(), {"status": "x"}])),
        ("create_many: existing id", lambda: t.create_many([minimal_request(id=task_id)])),
        ("create_many: repeated id", lambda: t.create_many([minimal_request(id="d")] * 2)),
        ("create_many: not a list", lambda: t.create_many(minimal_request())),  # type: ignore[arg-type]
        ("update: unknown task", lambda: t.update("task_missing", {"note": "x"})),
        ("update: stale if_match", lambda: t.update(task_id, {"note": "x"}, if_match="1")),
        ("update: illegal transition", lambda: t.update(task_id, {"status": "completed"})),
        ("update: change id", lambda: t.update(task_id, {"id": "other"})),
        ("update: clear required", lambda: t.update(task_id, {"status": None})),
        ("update: clear authoredOn", lambda: t.update(task_id, {"authoredOn": None})),
        ("update: unknown field", lambda: t.update(task_id, {"colour": "red"})),
        ("update: bad id", lambda: t.update("bad id", {"note": "x"})),
        ("update: not a mapping", lambda: t.update(task_id, "note=x")),  # type: ignore[arg-type]
        ("update: blank override", lambda: t.update(task_id, {"note": "x"}, admin_override="")),
        ("update: bad if_match", lambda: t.update(task_id, {"note": "x"}, if_match=[2])),  # type: ignore[arg-type]
        ("delete: unknown task", lambda: t.delete("task_missing")),
        ("delete: stale if_match", lambda: t.delete(task_id, if_match="1")),
        ("delete: bad id", lambda: t.delete("")),
        ("search: bad filter", lambda: t.search(colour="red")),
        ("search: bad limit", lambda: t.search(limit=0)),
        ("search: bad cursor", lambda: t.search(cursor="not-a-cursor")),
        ("get: unknown task", lambda: t.get("task_missing")),
        ("history: bad id", lambda: t.history("a b")),
    ]


_EXPECTED = {
    "create: existing id": TaskExistsError,
    "create_many: existing id": TaskExistsError,
    "update: unknown task": NotFoundError,
    "update: stale if_match": VersionConflictError,
    "update: illegal transition": IllegalTransitionError,
    "delete: unknown task": NotFoundError,
    "delete: stale if_match": VersionConflictError,
    "get: unknown task": NotFoundError,
}


def test_every_kind_of_rejected_call_raises_its_error_and_writes_nothing(
    seeded: tuple[TaskStore, str],
) -> None:
    store, task_id = seeded
    before = store.table_counts()
    assert before["tasks"] == 1
    assert before["outbox"] == before["task_history"] == 2
    rejections = _rejections(store, task_id)
    for name, call in rejections:
        with pytest.raises(ClinikError) as caught:
            call()
        assert isinstance(caught.value, _EXPECTED.get(name, ValidationError)), name
        assert store.table_counts() == before, name
    assert len(rejections) == 26


# --- every mutation: exactly one history row and one outbox row --------------------------------

_op = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(["draft", "requested", "ready"])),
    st.tuples(st.just("create_many"), st.integers(0, 4)),
    st.tuples(st.just("update"), st.sampled_from(["note", "in-progress", "cancelled", "same"])),
    st.tuples(st.just("delete"), st.just(0)),
)


@given(ops=st.lists(_op, min_size=1, max_size=25), pick=st.randoms(use_true_random=False))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_every_mutation_writes_one_history_row_and_one_outbox_row(
    tmp_path: Path, ops: list[tuple[str, object]], pick: Any
) -> None:
    import uuid

    with TaskStore.open(tmp_path / f"{uuid.uuid4().hex}.db") as store:
        live: list[str] = []
        for op, arg in ops:
            before = store.table_counts()
            seq_before = _max_outbox_seq(store)
            tasks_delta, changes = 0, 0
            if op == "create":
                live.append(store.tasks.create(minimal_request(status=arg)).data.id or "")
                tasks_delta, changes = 1, 1
            elif op == "create_many":
                assert isinstance(arg, int)
                made = store.tasks.create_many([minimal_request()] * arg).data
                live.extend(t.id or "" for t in made)
                tasks_delta, changes = arg, arg
            elif live and op == "update":
                task_id = pick.choice(live)
                old = store.tasks.get(task_id).data
                change: dict[str, object] = (
                    {"note": f"n{seq_before}"}
                    if arg == "note"
                    else {"status": old.status.value}
                    if arg == "same"
                    else {"status": arg}
                )
                try:
                    new = store.tasks.update(task_id, change).data
                except IllegalTransitionError:
                    changes = 0
                else:
                    changes = 0 if new == old else 1
            elif live and op == "delete":
                store.tasks.delete(live.pop(pick.randrange(len(live))))
                tasks_delta, changes = -1, 1
            after = store.table_counts()
            assert after["tasks"] - before["tasks"] == tasks_delta
            assert after["task_history"] - before["task_history"] == changes
            assert after["outbox"] - before["outbox"] == changes
            _check_outbox_rows_match_history(store, seq_before)
        assert store.table_counts()["tasks"] == len(live)


def _max_outbox_seq(store: TaskStore) -> int:
    with store.read() as conn:
        rows: list[tuple[Any, ...]] = conn.execute(
            "SELECT ifnull(max(seq), 0) FROM outbox"
        ).fetchall()
    return int(rows[0][0])


def _check_outbox_rows_match_history(store: TaskStore, after_seq: int) -> None:
    """Each new outbox row pairs with the history row of the same change."""
    with store.read() as conn:
        rows: list[tuple[Any, ...]] = conn.execute(
            f"SELECT o.task_id, o.op, {PAYLOAD}, o.base_version, h.version, h.op, "
            "coalesce(h.body, t.body) FROM outbox AS o LEFT JOIN task_history AS h "
            "ON h.task_id = o.task_id AND h.version = ifnull(o.base_version, 0) + 1 "
            "LEFT JOIN tasks AS t ON t.id = h.task_id AND h.body IS NULL "
            "WHERE o.seq > ?",
            (after_seq,),
        ).fetchall()
    for task_id, op, payload, base_version, version, history_op, body in rows:
        assert history_op == op, task_id
        assert version == (1 if op == "create" else int(base_version) + 1)
        if op == "delete":
            assert payload is None
        else:
            assert json.loads(str(payload)) == json.loads(str(body))
            assert json.loads(str(payload))["versionId"] == str(version)
