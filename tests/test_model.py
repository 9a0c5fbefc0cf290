"""Issue 3: the Task model (attrs, frozen, slotted, tuples, wire-valued enums) and task ids."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import warnings

import attrs
import pytest

from clinik_local import (
    ApiResponse,
    Period,
    Restriction,
    Task,
    TaskInputOutput,
    TaskIntent,
    TaskPriority,
    TaskStatus,
    ValueKind,
    decode_task,
    new_task_id,
)
from clinik_local.codec import wire_name
from clinik_local.demo import SEED_LAB_ORDER
from tests.wire import BOOKKEEPING as WIRE_BOOKKEEPING
from tests.wire import WIRE_FIELDS, WIRE_PATHS

#: The fields of ../shared/seed-api.md, and the three bookkeeping fields.
SEED_FIELDS = {
    "status",
    "intent",
    "statusReason",
    "businessStatus",
    "priority",
    "code",
    "description",
    "focusId",
    "patientId",
    "encounterId",
    "executionPeriod",
    "authoredOn",
    "requesterId",
    "ownerId",
    "reasonCode",
    "note",
    "basedOn",
    "partOf",
    "input",
    "output",
    "restriction",
}
BOOKKEEPING = {"id", "versionId", "lastModified"}


def test_task_has_every_seed_field_plus_bookkeeping_and_nothing_else() -> None:
    wire_names = {wire_name(a.name) for a in attrs.fields(Task)}
    assert wire_names == SEED_FIELDS | BOOKKEEPING


def test_the_wire_paths_derived_for_the_tests_are_the_seed_fields_and_their_parts() -> None:
    assert set(WIRE_FIELDS) == SEED_FIELDS | BOOKKEEPING
    assert set(BOOKKEEPING) - {"id"} == set(WIRE_BOOKKEEPING)
    nested = {p for p in WIRE_PATHS if p not in WIRE_FIELDS}
    assert {"executionPeriod.start", "input[0]", "input[0].valueString"} <= nested
    assert {"output[0].valueReference", "restriction.period.end"} <= nested
    assert {"restriction.recipient[0]", "basedOn[0]", "partOf[0]"} <= nested
    assert not any(p.endswith((".value", ".kind")) for p in WIRE_PATHS)  # value[x] keys only


def test_python_attributes_are_snake_case() -> None:
    names = {a.name for a in attrs.fields(Task)}
    assert {"patient_id", "version_id", "last_modified", "execution_period"} <= names
    assert all(name == name.lower() for name in names)


@pytest.mark.parametrize("cls", [Task, Period, TaskInputOutput, Restriction, ApiResponse])
def test_model_classes_are_frozen_and_slotted_attrs_classes(cls: type) -> None:
    assert attrs.has(cls)
    assert "__slots__" in cls.__dict__
    assert cls.__setattr__ is not object.__setattr__  # attrs' frozen guard


def test_a_task_cannot_be_changed_in_place() -> None:
    task = decode_task(SEED_LAB_ORDER)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        task.status = TaskStatus.READY  # type: ignore[misc]
    assert not hasattr(task, "__dict__")
    assert hash(task) == hash(decode_task({**SEED_LAB_ORDER, "authoredOn": task.authored_on}))


def test_task_keyword_only_and_repeated_fields_default_to_empty_tuples() -> None:
    with pytest.raises(TypeError):
        Task(TaskStatus.DRAFT, TaskIntent.ORDER)  # type: ignore[call-arg]
    task = Task(status=TaskStatus.DRAFT, intent=TaskIntent.ORDER)
    for repeated in (task.based_on, task.part_of, task.input, task.output):
        assert repeated == ()
    assert task.id is None
    assert task.authored_on.endswith("Z")


@pytest.mark.parametrize(
    ("enum", "values"),
    [
        (
            TaskStatus,
            "draft requested received accepted rejected ready cancelled in-progress on-hold "
            "failed completed",
        ),
        (
            TaskIntent,
            "unknown proposal plan order original-order reflex-order filler-order "
            "instance-order option",
        ),
        (TaskPriority, "routine urgent asap stat"),
    ],
)
def test_enum_values_are_exactly_the_wire_strings(enum: type[TaskStatus], values: str) -> None:
    assert [m.value for m in enum] == values.split()
    assert all(isinstance(m, str) and m == m.value for m in enum)


def test_value_kinds_name_the_seven_value_keys() -> None:
    assert {k.wire_key for k in ValueKind} == {
        "valueString",
        "valueBoolean",
        "valueInteger",
        "valueDecimal",
        "valueDateTime",
        "valueCode",
        "valueReference",
    }


def test_priority_rank_orders_stat_first() -> None:
    assert sorted(TaskPriority, key=lambda p: p.rank) == [
        TaskPriority.STAT,
        TaskPriority.ASAP,
        TaskPriority.URGENT,
        TaskPriority.ROUTINE,
    ]


# --- generated task ids ------------------------------------------------------------------------

_GENERATED = re.compile(r"task_[0-9A-HJKMNP-TV-Z]{26}")


def test_generated_ids_are_prefixed_well_formed_time_ordered_and_unique() -> None:
    ids = [new_task_id() for _ in range(20_000)]
    assert all(_GENERATED.fullmatch(i) for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert decode_task({"status": "draft", "intent": "order", "id": ids[0]}).id == ids[0]


def test_generated_ids_from_many_threads_are_unique() -> None:
    out: list[list[str]] = [[] for _ in range(4)]

    def work(n: int) -> None:
        out[n].extend(new_task_id() for _ in range(5000))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for chunk in out for i in chunk]
    assert len(set(ids)) == len(ids) == 20_000
    assert all(chunk == sorted(chunk) for chunk in out)


_CHILD = (
    "from clinik_local import new_task_id\nprint('\\n'.join(new_task_id() for _ in range(5000)))"
)


def test_generated_ids_do_not_collide_across_processes_and_follow_the_clock() -> None:
    before = new_task_id()
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    ids: list[str] = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        ids.extend(out.split())
    ids.extend(new_task_id() for _ in range(5000))
    after = new_task_id()
    assert len(ids) == 20_000
    assert len(set(ids)) == len(ids)
    assert all(_GENERATED.fullmatch(i) for i in ids)
    # Every child's ids were made after `before` and before `after`: time order holds
    # across processes at millisecond grain.
    assert all(before[:15] <= i[:15] <= after[:15] for i in ids)


def test_forked_children_do_not_repeat_the_parents_id_sequence() -> None:
    import multiprocessing

    parent_ids = [new_task_id() for _ in range(3)]  # the generator has state now
    ctx = multiprocessing.get_context("fork")
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() in a process with threads; none here matter.
        warnings.simplefilter("ignore", DeprecationWarning)
        with ctx.Pool(2) as pool:
            child_ids = pool.map(_make_ids, [2000, 2000])
    ids = parent_ids + [i for chunk in child_ids for i in chunk]
    assert len(set(ids)) == len(ids)


def _make_ids(n: int) -> list[str]:
    return [new_task_id() for _ in range(n)]
