"""The state machine of the store: a hypothesis RuleBasedStateMachine drives a FILE store
(create, update with and without If-Match, delete, get, searches by patient, status,
priority and text with paging, close-and-reopen) beside a pure-Python model of it; they
never diverge.

The model is a dict of task id -> wire form without the store-managed fields, plus the
version each task is at. Every step compares the store's answer with the model's
prediction (including the error: TaskExistsError, NotFoundError,
IllegalTransitionError), and invariants check after every step that every task ``get``
returns matches the model (fields and version), deleted ids are not found, a full
search equals the model, and ``count`` and the row counts of tasks, history and outbox
follow the mutations (one history and one outbox row per create, changing update and
delete), and the derived search rows are exactly those of the stored bodies. (The
sync state machine is ``tests/test_sync_stateful.py``.)
"""

from __future__ import annotations

import shutil
import tempfile
import unicodedata
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
from tests.derived import derived_problems
from tests.strategies import PRIORITIES, STATUSES, small_ids, texts
from tests.wire import BOOKKEEPING

#: The words the search rule looks for (in descriptions only: see NOTES).
SEARCHED_WORDS = ("cbc", "cardio", "words")


def _holds_a_searched_word(text: str) -> bool:
    """Whether FTS5 (unicode61, diacritics removed, case-folded) could match a searched
    word (or a prefix of one) in ``text``."""
    folded = unicodedata.normalize("NFKD", text)
    folded = "".join(c for c in folded if not unicodedata.combining(c)).casefold()
    return any(word in folded for word in SEARCHED_WORDS)


#: Notes with quotes, SQL and FTS characters and any printable text, but none of the
#: searched words (text search also reads notes; the model's search looks at
#: descriptions only).
NOTES = st.text(st.sampled_from("abdefgh '\"%_;-*()"), max_size=30) | texts(max_size=30).filter(
    lambda t: not _holds_a_searched_word(t)
)
IDS = st.sampled_from([f"t{n}" for n in range(16)])


def _strip(wire: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in wire.items() if k not in BOOKKEEPING}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    request: dict[str, Any] = {
        "id": draw(IDS),
        "status": draw(st.sampled_from(STATUSES)),
        "intent": "order",
        "authoredOn": f"2025-01-0{draw(st.integers(1, 3))}T00:00:00.000Z",
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "patientId": small_ids("pt", 3),
        "ownerId": small_ids("prac", 3),
        "priority": st.sampled_from(PRIORITIES),
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
        "priority": st.none() | st.sampled_from(PRIORITIES),
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
        self.deleted: set[str] = set()
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
        self.deleted.discard(task_id)
        self.changes += 1
        return task_id

    @rule(task_id=tasks, changes=CHANGES, guarded=st.booleans())
    def update(self, task_id: str, changes: dict[str, Any], guarded: bool) -> None:
        """An update, with If-Match of the model's version or without it."""
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
        before = self.store.table_counts()
        if not can_transition(old, new):
            with pytest.raises(IllegalTransitionError):
                self.store.tasks.update(task_id, changes)
            assert self.store.table_counts() == before
            return
        if_match = str(self.versions[task_id]) if guarded else None
        updated = self.store.tasks.update(task_id, changes, if_match=if_match).data
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
        self.deleted.add(task_id)
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
        priority=st.none() | st.sampled_from(PRIORITIES),
        text=st.none() | st.sampled_from(SEARCHED_WORDS),
        limit=st.integers(1, 5) | st.just(1000),
    )
    def search(
        self,
        patient: str | None,
        status: str | None,
        priority: str | None,
        text: str | None,
        limit: int,
    ) -> None:
        """Every page of a search (small pages, or one page of 1000) and its count."""
        filters: dict[str, object] = {}
        if patient is not None:
            filters["patientId"] = patient
        if status is not None:
            filters["status"] = status
        if priority is not None:
            filters["priority"] = priority
        if text is not None:
            filters["text"] = text
        expected = [
            t
            for t in self.model.values()
            if (patient is None or t.get("patientId") == patient)
            and (status is None or t["status"] == status)
            and (priority is None or t.get("priority") == priority)
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
    def every_task_matches_the_model_with_its_version(self) -> None:
        for task_id, expected in self.model.items():
            task = self.store.tasks.get(task_id).data
            assert _strip(encode_task(task)) == expected
            assert task.version_id == str(self.versions[task_id])

    @invariant()
    def deleted_ids_are_not_found(self) -> None:
        for task_id in self.deleted:
            with pytest.raises(NotFoundError):
                self.store.tasks.get(task_id)

    @invariant()
    def every_change_has_one_history_and_one_outbox_row(self) -> None:
        assert self.store.tasks.count().data == len(self.model)
        counts = self.store.table_counts()
        assert counts["tasks"] == len(self.model)
        assert counts["task_history"] == counts["outbox"] == self.changes

    @invariant()
    def derived_search_rows_are_those_of_the_stored_bodies(self) -> None:
        assert derived_problems(self.path) == []


StoreVersusModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_never_diverges_from_the_model = StoreVersusModel.TestCase
