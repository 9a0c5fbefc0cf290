"""Issue 3: the Task model, the wire codec, validation, lifecycle and errors."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clinik_local
from clinik_local import (
    TERMINAL,
    TRANSITIONS,
    ClinikError,
    ConflictError,
    CorruptStoreError,
    IllegalTransitionError,
    NotFoundError,
    StorageError,
    StoreLockedError,
    Task,
    TaskStatus,
    ValidationError,
    can_transition,
    decode_task,
    encode_task,
    new_task_id,
    transition_problem,
)
from clinik_local.demo import SEED_LAB_ORDER
from tests.strategies import CORRUPTIONS, set_path, valid_requests

# --- round trips -------------------------------------------------------------------------


@given(valid_requests(with_id=True))
@settings(max_examples=300)
def test_any_valid_request_round_trips_to_the_same_wire_mapping(request: dict[str, Any]) -> None:
    assert encode_task(decode_task(request)) == request


@given(valid_requests())
def test_decode_builds_tuples_and_enums_not_lists_and_strings(request: dict[str, Any]) -> None:
    task = decode_task(request)
    assert isinstance(task.based_on, tuple)
    assert isinstance(task.input, tuple)
    assert isinstance(task.status, TaskStatus)
    assert task.status.value == request["status"]


def test_seed_lab_order_validates_and_round_trips_after_normalisation() -> None:
    task = decode_task(SEED_LAB_ORDER)
    assert task.patient_id == "pt_abc123"
    assert task.execution_period is not None
    assert task.execution_period.start == "2025-02-01T08:00:00.000Z"
    assert [(i.type, i.value) for i in task.input] == [("lab-panel", "CBC"), ("lab-panel", "CMP")]
    wire = encode_task(task)
    expected = {
        **SEED_LAB_ORDER,
        "executionPeriod": {"start": "2025-02-01T08:00:00.000Z", "end": "2025-02-01T17:00:00.000Z"},
        "authoredOn": wire["authoredOn"],
    }
    assert wire == expected
    assert decode_task(wire) == task


def test_task_model_is_frozen_slotted_and_snake_case() -> None:
    task = decode_task(SEED_LAB_ORDER)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        task.status = TaskStatus.READY  # type: ignore[misc]
    assert not hasattr(task, "__dict__")
    names = {f.name for f in attrs.fields(Task)}
    assert {"patient_id", "version_id", "last_modified", "execution_period"} <= names


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "bad"), CORRUPTIONS, ids=[f"{p}={b!r}"[:40] for p, b in CORRUPTIONS]
)
@given(base=valid_requests())
@settings(max_examples=15)
def test_one_invalid_field_fails_naming_that_field(
    path: str, bad: object, base: dict[str, Any]
) -> None:
    request = set_path(base, path, bad)
    with pytest.raises(ValidationError) as caught:
        decode_task(request)
    paths = caught.value.paths
    assert any(p == path or p.startswith(path) or path.startswith(p) for p in paths), paths


def test_all_problems_of_one_request_are_reported_together() -> None:
    request = {
        "status": "done",
        "priority": 3,
        "executionPeriod": {"start": "2025-02-02T00:00:00Z", "end": "2025-02-01T00:00:00Z"},
        "input": [{"type": "a", "valueString": "x", "valueInteger": 1}],
        "colour": "red",
    }
    with pytest.raises(ValidationError) as caught:
        decode_task(request)
    assert set(caught.value.paths) == {
        "status",
        "intent",
        "priority",
        "executionPeriod.end",
        "input[0]",
        "colour",
    }
    message = str(caught.value)
    assert "draft, requested" in message  # allowed values are named
    assert "colour" in message


def test_priority_as_a_number_is_refused_not_coerced() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task({"status": "draft", "intent": "order", "priority": 3})
    (error,) = caught.value.errors
    assert error.path == "priority"
    assert error.allowed == "routine, urgent, asap, stat"


def test_unknown_keys_are_named() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task({"status": "draft", "intent": "order", "patient_id": "p", "Status": "x"})
    assert set(caught.value.paths) == {"patient_id", "Status"}


def test_naive_date_time_is_refused_saying_why() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task({"status": "draft", "intent": "order", "authoredOn": "2025-02-01T08:00:00"})
    assert "timezone" in str(caught.value)
    with pytest.raises(ValidationError):
        decode_task({"status": "draft", "intent": "order", "authoredOn": datetime(2025, 2, 1, 8)})


@given(
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)),
    st.integers(-14 * 60, 14 * 60),
)
def test_aware_date_times_normalise_to_utc_milliseconds(moment: datetime, offset: int) -> None:
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset)))
    expected = aware.astimezone(UTC)
    for given_value in (aware, aware.isoformat()):
        task = decode_task({"status": "draft", "intent": "order", "authoredOn": given_value})
        assert task.authored_on == expected.strftime("%Y-%m-%dT%H:%M:%S.") + (
            f"{expected.microsecond // 1000:03d}Z"
        )


def test_authored_on_defaults_to_now() -> None:
    before = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    task = decode_task({"status": "draft", "intent": "order"})
    assert task.authored_on >= before
    assert task.authored_on.endswith("Z")


@pytest.mark.parametrize("good", ["a", "x" * 64, "pt_abc-1.2", "A_B_C"])
def test_ids_accept_the_remote_alphabet_including_underscore(good: str) -> None:
    assert decode_task({"status": "draft", "intent": "order", "patientId": good}).patient_id == good


@pytest.mark.parametrize("bad", ["", "x" * 65, "a b", "a/b", "é", "a\x00"])
def test_ids_outside_the_alphabet_or_length_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task({"status": "draft", "intent": "order", "ownerId": bad})
    assert caught.value.paths == ("ownerId",)


def test_invariants_task_not_part_of_itself_and_last_modified_after_authored() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(
            {
                "id": "t1",
                "status": "draft",
                "intent": "order",
                "partOf": ["p", "t1"],
                "authoredOn": "2025-02-02T00:00:00Z",
                "lastModified": "2025-02-01T00:00:00Z",
            }
        )
    assert set(caught.value.paths) == {"partOf[1]", "lastModified"}


def test_text_fields_have_documented_maximum_sizes() -> None:
    limit = clinik_local.TEXT_LIMITS["description"]
    ok = decode_task({"status": "draft", "intent": "order", "description": "x" * limit})
    assert ok.description is not None
    assert len(ok.description) == limit
    with pytest.raises(ValidationError):
        decode_task({"status": "draft", "intent": "order", "description": "x" * (limit + 1)})
    too_many = ["a"] * (clinik_local.MAX_LIST_ITEMS + 1)
    with pytest.raises(ValidationError) as caught:
        decode_task({"status": "draft", "intent": "order", "basedOn": too_many})
    assert caught.value.paths == ("basedOn",)


def test_each_input_needs_exactly_one_value() -> None:
    for item in ({"type": "t"}, {"type": "t", "valueString": "a", "valueCode": "b"}):
        with pytest.raises(ValidationError) as caught:
            decode_task({"status": "draft", "intent": "order", "input": [item]})
        assert caught.value.paths == ("input[0]",)


# --- ids ---------------------------------------------------------------------------------


def test_generated_ids_are_prefixed_time_ordered_and_unique() -> None:
    ids = [new_task_id() for _ in range(20_000)]
    assert all(i.startswith("task_") and len(i) == 31 for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_generated_ids_do_not_collide_across_processes() -> None:
    code = (
        "from clinik_local import new_task_id\n"
        "print('\\n'.join(new_task_id() for _ in range(5000)))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    ids: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        ids.extend(out.split())
    ids.extend(new_task_id() for _ in range(5000))
    assert len(ids) == 20_000
    assert len(set(ids)) == len(ids)


# --- lifecycle ---------------------------------------------------------------------------

_SPEC = {
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


def test_lifecycle_table_matches_the_fhir_state_machine_exactly() -> None:
    assert {old.value: {n.value for n in new} for old, new in TRANSITIONS.items()} == _SPEC
    assert {s.value for s in TERMINAL} == {"rejected", "cancelled", "completed", "failed"}


@given(st.sampled_from(list(TaskStatus)), st.sampled_from(list(TaskStatus)))
def test_transition_allowed_exactly_when_in_the_table_or_unchanged(
    old: TaskStatus, new: TaskStatus
) -> None:
    expected = old == new or new.value in _SPEC[old.value]
    assert can_transition(old, new) is expected
    problem = transition_problem(old, new)
    assert (problem is None) is expected
    if problem is not None:
        assert old.value in problem


# --- errors and the public surface -------------------------------------------------------


def test_error_classes_inherit_the_builtins_they_resemble() -> None:
    assert issubclass(ValidationError, ValueError)
    assert issubclass(NotFoundError, LookupError)
    assert issubclass(IllegalTransitionError, ConflictError)
    assert issubclass(IllegalTransitionError, ValueError)
    assert issubclass(StorageError, OSError)
    assert issubclass(StoreLockedError, TimeoutError)
    assert issubclass(CorruptStoreError, StorageError)
    for name in clinik_local.__all__:
        obj = getattr(clinik_local, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ClinikError), name


def test_validation_error_items_carry_path_value_and_allowed() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task({"status": "draft", "intent": "order", "priority": "x" * 500})
    (error,) = caught.value.errors
    assert error.path == "priority"
    assert error.value is not None
    assert len(error.value) <= 80
    assert error.allowed == "routine, urgent, asap, stat"


def test_non_mapping_request_is_a_validation_error() -> None:
    bad: object
    for bad in (None, [], "status=draft", 3):
        with pytest.raises(ValidationError):
            decode_task(bad)  # type: ignore[arg-type]
