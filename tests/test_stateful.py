"""A hypothesis state machine drives a FILE store (create, update, delete, get, search,
close-and-reopen) beside a pure-Python model of it; they never diverge.

The model is a dict of task id -> wire form without the store-managed fields, plus the
version each task is at. Every step compares the store's answer with the model's
prediction (including the error: TaskExistsError, NotFoundError,
IllegalTransitionError), and invariants check that the whole store (every task, the
row counts of tasks, history and outbox) equals the model after every step.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from clinik_local import (
    IllegalTransitionError,
    NotFoundError,
    TaskExistsError,
    TaskStatus,
    TaskStore,
    can_transition,
    encode_task,
)
from tests.strategies import STATUSES, small_ids

_MANAGED = ("versionId", "lastModified")
#: Notes with quotes and SQL/FTS characters but no letter of the searched words
#: (text search also reads notes; the model's search looks at descriptions only).
NOTES = st.text(st.sampled_from("abdefgh '\"%_;-*()"), max_size=30)
IDS = st.sampled_from([f"t{n}" for n in range(12)])


def _strip(wire: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in wire.items() if k not in _MANAGED}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    request: dict[str, Any] = {
        "id": draw(IDS),
        "status": draw(st.sampled_from(["draft", "requested", "ready", "in-progress"])),
        "intent": "order",
        "authoredOn": f"2025-01-0{draw(st.integers(1, 3))}T00:00:00.000Z",
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "patientId": small_ids("pt", 3),
        "ownerId": small_ids("prac", 3),
        "priority": st.sampled_from(["routine", "urgent", "stat"]),
        "note": NOTES,
        "description": st.sampled_from(["order cbc", "refer cardio", "cbc and cmp"]),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            request[key] = draw(strategy)
    return request


CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(STATUSES),
        "note": st.none() | NOTES,
        "patientId": st.none() | small_ids("pt", 3),
        "priority": st.none() | st.sampled_from(["routine", "asap"]),
        "description": st.sampled_from(["order cbc", "new words"]),
    },
)


class StoreVersusModel(RuleBasedStateMachine):
    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="clinik-stateful-"))
        self.path = self.dir / "model.db"
        self.store = TaskStore.open(self.path)
        self.model: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, int] = {}
        self.used: set[str] = set()  # ids ever created (their history stays)
        self.changes = 0  # history rows == outbox rows (nothing syncs here)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir)

    @rule(target=tasks, request=requests())
    def create(self, request: dict[str, Any]) -> Any:
        task_id = request["id"]
        before = self.store.table_counts()
        if task_id in self.used:  # live, or deleted (its history keeps the id)
            with pytest.raises(TaskExistsError):
                self.store.tasks.create(request)
            assert self.store.table_counts() == before
            return multiple()
        created = self.store.tasks.create(request).data
        assert _strip(encode_task(created)) == request
        self.model[task_id] = dict(request)
        self.versions[task_id] = 1
        self.used.add(task_id)
        self.changes += 1
        return task_id

    @rule(task_id=tasks, changes=CHANGES)
    def update(self, task_id: str, changes: dict[str, Any]) -> None:
        if task_id not in self.model:
            with pytest.raises(NotFoundError):
                self.store.tasks.update(task_id, changes)
            return
        current = self.model[task_id]
        merged = dict(current)
        for key, value in changes.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        old, new = TaskStatus(current["status"]), TaskStatus(merged["status"])
        if not can_transition(old, new):
            with pytest.raises(IllegalTransitionError):
                self.store.tasks.update(task_id, changes)
            return
        updated = self.store.tasks.update(
            task_id, changes, if_match=str(self.versions[task_id])
        ).data
        assert _strip(encode_task(updated)) == merged
        if merged != current:
            self.versions[task_id] += 1
            self.changes += 1
        assert updated.version_id == str(self.versions[task_id])
        self.model[task_id] = merged

    @rule(task_id=consumes(tasks))
    def delete(self, task_id: str) -> None:
        if task_id not in self.model:
            with pytest.raises(NotFoundError):
                self.store.tasks.delete(task_id)
            return
        self.store.tasks.delete(task_id)
        del self.model[task_id]
        self.changes += 1

    @rule(task_id=IDS)
    def get(self, task_id: str) -> None:
        if task_id in self.model:
            assert _strip(encode_task(self.store.tasks.get(task_id).data)) == self.model[task_id]
        else:
            with pytest.raises(NotFoundError):
                self.store.tasks.get(task_id)

    @rule(
        patient=st.none() | small_ids("pt", 3),
        status=st.none() | st.sampled_from(STATUSES),
        text=st.none() | st.sampled_from(["cbc", "cardio", "words"]),
        limit=st.integers(1, 5),
    )
    def search(self, patient: str | None, status: str | None, text: str | None, limit: int) -> None:
        filters: dict[str, object] = {}
        if patient is not None:
            filters["patientId"] = patient
        if status is not None:
            filters["status"] = status
        if text is not None:
            filters["text"] = text
        expected = [
            t
            for t in self.model.values()
            if (patient is None or t.get("patientId") == patient)
            and (status is None or t["status"] == status)
            and (text is None or text in t.get("description", "").split())
        ]
        # Default sort: newest authoredOn first, ties by id in the same direction.
        expected.sort(key=lambda t: (t["authoredOn"], t["id"]), reverse=True)
        seen: list[str] = []
        cursor: object = None
        while True:
            page = self.store.tasks.search({**filters, "limit": limit, "cursor": cursor})
            seen.extend(str(t.id) for t in page.data)
            cursor = page.meta["nextCursor"]
            if cursor is None:
                break
        assert seen == [t["id"] for t in expected]
        assert self.store.tasks.count(filters).data == len(expected)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = TaskStore.open(self.path)

    @precondition(lambda self: bool(self.model))
    @invariant()
    def store_equals_model(self) -> None:
        stored = {
            str(t.id): _strip(encode_task(t)) for t in self.store.tasks.search(limit=1000).data
        }
        assert stored == self.model

    @invariant()
    def every_change_has_one_history_and_one_outbox_row(self) -> None:
        counts = self.store.table_counts()
        assert counts["tasks"] == len(self.model)
        assert counts["task_history"] == counts["outbox"] == self.changes


StoreVersusModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_never_diverges_from_the_model = StoreVersusModel.TestCase
