"""Hostile input fuzzing: arbitrary JSON-like values at every field of create, update
and search.

Values include wrong types, huge strings, NUL, lone surrogates, deep nesting, NaN and
infinities, huge integers, booleans where integers go, and nested dicts and lists,
mixed with plausible valid values so both outcomes are exercised. Every call either
succeeds with valid data (``get`` then returns exactly what was written) or raises
:class:`clinik_local.ValidationError` whose ``paths`` name the field; never another
exception, and on error ``store.table_counts()`` is unchanged (nothing written).

Example counts: about 1,200 examples in total by default (CI). For a soak, set
``CLINIK_FUZZ_EXAMPLES`` to the total wanted, e.g.
``CLINIK_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz_inputs.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clinik_local import TaskStore, ValidationError
from clinik_local.errors import ClinikError, IllegalTransitionError
from tests.strategies import STATUSES, minimal_request, set_path

T = TypeVar("T")

TOTAL_EXAMPLES = int(os.environ.get("CLINIK_FUZZ_EXAMPLES", "1200"))
FUZZ = settings(
    max_examples=max(1, TOTAL_EXAMPLES * 2 // 5),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SMALL = settings(FUZZ, max_examples=max(1, TOTAL_EXAMPLES * 3 // 10))

#: Every wire field of a create request, and paths inside the nested ones.
CREATE_PATHS = [
    "id",
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
    "executionPeriod.start",
    "executionPeriod.end",
    "authoredOn",
    "requesterId",
    "ownerId",
    "reasonCode",
    "note",
    "basedOn",
    "basedOn[0]",
    "partOf",
    "partOf[0]",
    "input",
    "input[0]",
    "input[0].type",
    "input[0].valueString",
    "input[0].valueInteger",
    "input[0].valueBoolean",
    "input[0].valueDecimal",
    "input[0].valueCode",
    "input[0].valueDateTime",
    "input[0].valueReference",
    "input[0].valueX",
    "output",
    "output[0]",
    "output[0].valueString",
    "restriction",
    "restriction.repetitions",
    "restriction.period",
    "restriction.period.start",
    "restriction.recipient",
    "restriction.recipient[0]",
]
#: Update changes: every create field but id (changing the id is its own case).
UPDATE_PATHS = [p for p in CREATE_PATHS if p != "id"]
SEARCH_FILTERS = [
    "patientId",
    "ownerId",
    "requesterId",
    "encounterId",
    "focusId",
    "status",
    "intent",
    "priority",
    "code",
    "businessStatus",
    "basedOn",
    "partOf",
    "input",
    "output",
    "authoredOn",
    "lastModified",
    "periodStart",
    "periodEnd",
    "dueBefore",
    "overdue",
    "text",
    "sort",
    "limit",
    "cursor",
    "total",
]


def _deep(depth: int) -> object:
    value: object = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


SPECIAL_VALUES: list[object] = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "x" * 20_000,
    "é" * 70,
    "'; DROP TABLE tasks;--",
    '"quoted" OR 1=1',
    "%_*",
    "NEAR(a b)",
    float("nan"),
    float("inf"),
    float("-inf"),
    -0.0,
    1e308,
    2**31,
    -(2**31) - 1,
    2**64,
    10**30,
    True,
    False,
    0,
    -1,
    _deep(300),
    [],
    {},
    [None],
    {"not": None},
    {"missing": True},
]
PLAUSIBLE_VALUES: list[object] = [
    "requested",
    "order",
    "urgent",
    "lab-order",
    "pt_1",
    "2025-02-01T08:00:00Z",
    "2025-02-01",
    "ge2025",
    "-priority,authoredOn",
    "cbc",
    5,
    ["pt_1", "pt_2"],
    {"start": "2025-02-01T08:00:00Z"},
    {"type": "lab-panel", "valueString": "CBC"},
    [{"type": "lab-panel", "valueString": "CBC"}],
    {"repetitions": 2},
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(blacklist_categories=()), max_size=30),
    st.sampled_from(SPECIAL_VALUES),
    st.sampled_from(PLAUSIBLE_VALUES),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["type", "valueString", "start", "not"]),
            children,
            max_size=4,
        ),
    ),
    max_leaves=8,
)


def _field(path: str) -> str:
    """The top-level wire field of a path (``input[0].type`` -> ``input``)."""
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def _names_field(error: ValidationError, field: str) -> bool:
    return bool(error.paths) and any(p.startswith(field) for p in error.paths)


def _attempt(call: Callable[[], T]) -> T | ClinikError:
    """The call's result, or the library error it raised (anything else propagates)."""
    try:
        return call()
    except (ValidationError, IllegalTransitionError) as exc:
        return exc


@FUZZ
@given(path=st.sampled_from(CREATE_PATHS), value=json_values)
def test_create_with_any_value_at_any_field_stores_valid_data_or_names_the_field(
    path: str, value: object
) -> None:
    request = set_path(minimal_request(), path, value)
    with TaskStore.open(":memory:") as store:
        before = store.table_counts()
        outcome = _attempt(lambda: store.tasks.create(request).data)
        event(f"create: {type(outcome).__name__}")
        if isinstance(outcome, ClinikError):
            assert isinstance(outcome, ValidationError), repr(outcome)
            assert _names_field(outcome, _field(path)), (path, outcome.paths)
            assert store.table_counts() == before
        else:
            assert outcome.id is not None
            assert store.tasks.get(outcome.id).data == outcome
            assert store.table_counts() != before


@FUZZ_SMALL
@given(path=st.sampled_from(UPDATE_PATHS), value=json_values)
def test_update_with_any_value_at_any_field_stores_valid_data_or_names_the_field(
    path: str, value: object
) -> None:
    changes = set_path({}, path, value)
    with TaskStore.open(":memory:") as store:
        task = store.tasks.create(minimal_request(id="t_1", code="lab-order")).data
        before = store.table_counts()
        outcome = _attempt(lambda: store.tasks.update("t_1", changes).data)
        event(f"update: {type(outcome).__name__}")
        if isinstance(outcome, IllegalTransitionError):
            # A valid status the lifecycle forbids from "requested": refused, unwritten.
            assert path == "status"
            assert value in STATUSES
        if isinstance(outcome, ClinikError):
            if isinstance(outcome, ValidationError):
                assert _names_field(outcome, _field(path)), (path, outcome.paths)
            assert store.table_counts() == before
            assert store.tasks.get("t_1").data == task
        else:
            assert store.tasks.get("t_1").data == outcome


@FUZZ_SMALL
@given(name=st.sampled_from(SEARCH_FILTERS), value=json_values)
def test_search_with_any_filter_value_returns_tasks_or_names_the_filter(
    name: str, value: object
) -> None:
    with TaskStore.open(":memory:") as store:
        store.tasks.create(minimal_request(id="t_1", patientId="pt_1", description="CBC"))
        store.tasks.create(minimal_request(id="t_2", priority="urgent"))
        before = store.table_counts()
        page = _attempt(lambda: store.tasks.search({name: value}).data)
        event(f"search: {type(page).__name__}")
        if isinstance(page, ClinikError):
            assert isinstance(page, ValidationError), repr(page)
            assert _names_field(page, name), (name, page.paths)
        else:
            assert {t.id for t in page} <= {"t_1", "t_2"}
        total = _attempt(lambda: store.tasks.count({name: value}).data)
        if isinstance(total, ClinikError):
            assert isinstance(total, ValidationError), repr(total)
            assert _names_field(total, name), (name, total.paths)
        else:
            assert 0 <= total <= 2
        assert store.table_counts() == before
