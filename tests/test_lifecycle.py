"""Issue 3: the FHIR Task state machine as data, and how the store applies it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clinik_local import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransitionError,
    TaskStatus,
    TaskStore,
    ValidationError,
    can_transition,
    transition_problem,
)
from tests.strategies import minimal_request

#: The issue's list, written out as plain strings so it is checked, not copied.
SPEC = {
    "draft": {"requested", "ready", "cancelled"},
    "requested": {"received", "accepted", "rejected", "cancelled"},
    "received": {"accepted", "rejected", "cancelled"},
    "accepted": {"in-progress", "cancelled"},
    "ready": {"in-progress", "cancelled"},
    "in-progress": {"on-hold", "completed", "failed", "ready", "cancelled"},
    "on-hold": {"in-progress", "cancelled"},
    "rejected": set(),
    "cancelled": set(),
    "completed": set(),
    "failed": set(),
}

statuses = st.sampled_from(list(TaskStatus))


def test_transition_table_matches_the_issue_list_exactly() -> None:
    assert {old.value: {n.value for n in new} for old, new in TRANSITIONS.items()} == SPEC
    assert {s.value for s in TERMINAL} == {"rejected", "cancelled", "completed", "failed"}


@given(statuses, statuses)
def test_a_change_is_allowed_exactly_when_listed_or_unchanged(
    old: TaskStatus, new: TaskStatus
) -> None:
    expected = old == new or new.value in SPEC[old.value]
    assert can_transition(old, new) is expected
    problem = transition_problem(old, new)
    assert (problem is None) is expected
    if problem is not None:
        assert old.value in problem  # says where from, and ...
        if old in TERMINAL:
            assert "terminal" in problem
        else:  # ... where it could have gone instead
            assert all(allowed in problem for allowed in SPEC[old.value])


@pytest.mark.parametrize("status", list(TaskStatus))
def test_same_status_is_always_allowed(status: TaskStatus) -> None:
    assert can_transition(status, status)


# --- in the store: updates are checked, creates are not --------------------------------------


def _path_to(target: str) -> list[str]:
    """A legal path of statuses from draft to ``target`` (breadth-first over SPEC)."""
    paths = {"draft": ["draft"]}
    queue = ["draft"]
    while queue:
        current = queue.pop(0)
        for nxt in sorted(SPEC[current]):
            if nxt not in paths:
                paths[nxt] = [*paths[current], nxt]
                queue.append(nxt)
    return paths[target]


@given(old=statuses, new=statuses)
def test_store_update_obeys_the_table_and_a_refusal_writes_nothing(
    old: TaskStatus, new: TaskStatus
) -> None:
    with TaskStore.open(":memory:") as store:
        task = store.tasks.create(minimal_request(status="draft")).data
        assert task.id is not None
        for step in _path_to(old.value)[1:]:
            store.tasks.update(task.id, {"status": step})
        before = store.table_counts()
        if new.value in SPEC[old.value]:
            assert store.tasks.update(task.id, {"status": new.value}).data.status == new
            assert store.table_counts()["outbox"] == before["outbox"] + 1
        elif new == old:
            unchanged = store.tasks.update(task.id, {"status": new.value}).data
            assert unchanged.status == old
            assert store.table_counts() == before  # a no-op writes nothing
        else:
            with pytest.raises(IllegalTransitionError) as caught:
                store.tasks.update(task.id, {"status": new.value})
            assert (caught.value.old, caught.value.new) == (old.value, new.value)
            assert caught.value.task_id == task.id
            assert store.table_counts() == before
            assert store.tasks.get(task.id).data.status == old


@pytest.mark.parametrize("status", list(TaskStatus))
def test_create_may_use_any_status_for_imported_records(status: TaskStatus) -> None:
    with TaskStore.open(":memory:") as store:
        assert store.tasks.create(minimal_request(status=status.value)).data.status == status


def test_same_status_update_is_a_no_op_that_writes_nothing() -> None:
    with TaskStore.open(":memory:") as store:
        task = store.tasks.create(minimal_request(status="completed")).data
        assert task.id is not None
        before = store.table_counts()
        again = store.tasks.update(task.id, {"status": "completed"}).data
        assert again == task
        assert again.version_id == "1"
        assert store.table_counts() == before


def test_admin_override_lets_a_correction_through_and_history_records_it() -> None:
    with TaskStore.open(":memory:") as store:
        task = store.tasks.create(minimal_request(status="cancelled")).data
        assert task.id is not None
        reason = "cancelled in error at the front desk; reopened by the clinic manager"
        reopened = store.tasks.update(
            task.id, {"status": "in-progress"}, admin_override=reason
        ).data
        assert reopened.status == TaskStatus.IN_PROGRESS
        assert reopened.version_id == "2"
        store.tasks.update(task.id, {"status": "completed"})  # a normal, checked change
        history = store.tasks.history(task.id).data
        assert [(h.op, h.override_reason) for h in history] == [
            ("create", None),
            ("update", reason),
            ("update", None),
        ]
        assert history[1].task.status == TaskStatus.IN_PROGRESS


@pytest.mark.parametrize("reason", ["", "   ", "x" * 1025])
def test_admin_override_must_give_a_reason(reason: str) -> None:
    with TaskStore.open(":memory:") as store:
        task = store.tasks.create(minimal_request(status="completed")).data
        assert task.id is not None
        before = store.table_counts()
        with pytest.raises(ValidationError) as caught:
            store.tasks.update(task.id, {"status": "ready"}, admin_override=reason)
        assert caught.value.paths == ("admin_override",)
        assert store.table_counts() == before
