"""Stateful model test: creates, updates, deletes, searches and reopens of a file store,
checked after every step against a pure-Python dict model.

Invariants: every task ``get`` returns matches the model (fields and version); ``count``
equals the model's size; ``search(status=X)`` returns exactly the model's ids with that
status; deleted ids raise NotFoundError; table row counts follow the mutations (one
history row and one outbox row per create, changing update and delete).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from clinik_local import TaskStore
from clinik_local.errors import IllegalTransitionError, NotFoundError
from clinik_local.lifecycle import can_transition
from clinik_local.model import TaskStatus
from tests.strategies import PRIORITIES, STATUSES, texts

NOTES = st.none() | texts(max_size=30)
PRIORITY_VALUES = st.none() | st.sampled_from(PRIORITIES)


class StoreMachine(RuleBasedStateMachine):
    """The store and a dict model ``id -> {status, priority, note, version}``."""

    ids = Bundle("ids")

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="clinik-sm-"))
        self.path = self.directory / "clinic.db"
        self.store = TaskStore.open(self.path)
        self.model: dict[str, dict[str, Any]] = {}
        self.deleted: set[str] = set()
        self.mutations = 0
        self.serial = 0

    @rule(
        target=ids,
        status=st.sampled_from(STATUSES),
        priority=PRIORITY_VALUES,
        note=NOTES,
    )
    def create(self, status: str, priority: str | None, note: str | None) -> str:
        self.serial += 1
        task_id = f"t_{self.serial}"
        request: dict[str, object] = {"id": task_id, "status": status, "intent": "order"}
        if priority is not None:
            request["priority"] = priority
        if note is not None:
            request["note"] = note
        self.store.tasks.create(request)
        self.model[task_id] = {"status": status, "priority": priority, "note": note, "version": 1}
        self.mutations += 1
        return task_id

    @rule(
        task_id=ids,
        status=st.none() | st.sampled_from(STATUSES),
        priority=st.none() | st.sampled_from(PRIORITIES),
        note=NOTES,
    )
    def update(
        self, task_id: str, status: str | None, priority: str | None, note: str | None
    ) -> None:
        changes: dict[str, object] = {"note": note}
        if status is not None:
            changes["status"] = status
        if priority is not None:
            changes["priority"] = priority
        if task_id not in self.model:
            try:
                self.store.tasks.update(task_id, changes)
            except NotFoundError:
                return
            raise AssertionError(f"update of deleted {task_id} did not raise NotFoundError")
        expected = dict(self.model[task_id])
        old = TaskStatus(expected["status"])
        if status is not None and not can_transition(old, TaskStatus(status)):
            try:
                self.store.tasks.update(task_id, changes)
            except IllegalTransitionError:
                return
            raise AssertionError(f"{old} -> {status} was not refused")
        self.store.tasks.update(task_id, changes)
        expected["note"] = note
        if status is not None:
            expected["status"] = status
        if priority is not None:
            expected["priority"] = priority
        if {k: v for k, v in expected.items() if k != "version"} != {
            k: v for k, v in self.model[task_id].items() if k != "version"
        }:
            expected["version"] += 1
            self.mutations += 1
        self.model[task_id] = expected

    @rule(task_id=consumes(ids))
    def delete(self, task_id: str) -> None:
        self.store.tasks.delete(task_id)
        del self.model[task_id]
        self.deleted.add(task_id)
        self.mutations += 1

    @rule(status=st.sampled_from(STATUSES))
    def search_by_status(self, status: str) -> None:
        found = {t.id for t in self.store.tasks.search(status=status, limit=1000).data}
        assert found == {i for i, t in self.model.items() if t["status"] == status}

    @rule(priority=st.sampled_from(PRIORITIES))
    def search_by_priority(self, priority: str) -> None:
        found = {t.id for t in self.store.tasks.search(priority=priority, limit=1000).data}
        assert found == {i for i, t in self.model.items() if t["priority"] == priority}

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = TaskStore.open(self.path)

    @invariant()
    def every_task_matches_the_model(self) -> None:
        for task_id, expected in self.model.items():
            task = self.store.tasks.get(task_id).data
            assert task.status.value == expected["status"]
            assert (task.priority.value if task.priority else None) == expected["priority"]
            assert task.note == expected["note"]
            assert str(task.version_id) == str(expected["version"])

    @invariant()
    def deleted_ids_are_not_found(self) -> None:
        for task_id in self.deleted:
            try:
                self.store.tasks.get(task_id)
            except NotFoundError:
                continue
            raise AssertionError(f"deleted task {task_id} is still returned")

    @invariant()
    def counts_follow_the_model(self) -> None:
        assert self.store.tasks.count().data == len(self.model)
        counts = self.store.table_counts()
        assert counts["tasks"] == len(self.model)
        assert counts["outbox"] == self.mutations
        assert counts["task_history"] == self.mutations

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory)


StoreMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_matches_a_dict_model_across_creates_updates_deletes_searches_and_reopens = (
    StoreMachine.TestCase
)
