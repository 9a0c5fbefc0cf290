"""Bad-input fuzzing: arbitrary JSON-like values at every field of create, update and search.

Values include wrong types, huge strings, NUL, lone surrogates, deep nesting, NaN and
infinities, huge integers, booleans where integers go, and nested dicts and lists,
mixed with plausible valid values so both outcomes are exercised. The fields are every
wire path of a task (:data:`tests.wire.WIRE_PATHS`, derived from the model), so a field
added to the model is fuzzed without anyone listing it.

Every call either succeeds with valid data (the task reads back as written) or raises
:class:`ValidationError` naming the field; never any other exception (a status change
the lifecycle forbids is IllegalTransitionError, a missing task NotFoundError, a
drawn id the shared store already holds TaskExistsError: the library's documented
answers, not crashes), and a refused call writes nothing
(``store.table_counts()`` unchanged).

Examples per property: ``CLINIK_FUZZ_EXAMPLES`` (default 300: 4 properties x 300 =
1,200 in CI); the soak (``benchmarks/soak_fuzz.py``) sets 6,000 for more than 20,000
in all.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings
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
from tests.strategies import STATUSES, minimal_request, names_path, set_path, valid_requests
from tests.wire import WIRE_PATHS

_R = TypeVar("_R")
EXAMPLES = int(os.environ.get("CLINIK_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

#: Every wire path, and a value key no kind has (the input must name it or its object).
PATHS = [*WIRE_PATHS, "input[0].valueX"]
TOP_LEVEL = [p for p in PATHS if "[" not in p and "." not in p]
SEARCH_NAMES = [
    "ownerId",
    "patientId",
    "requesterId",
    "encounterId",
    "focusId",
    "code",
    "businessStatus",
    "priority",
    "intent",
    "status",
    "authoredOn",
    "lastModified",
    "periodStart",
    "periodEnd",
    "basedOn",
    "partOf",
    "input",
    "output",
    "dueBefore",
    "overdue",
    "text",
    "sort",
    "total",
    "limit",
    "cursor",
    "patient_id",
    "due_before",
]

_WIRE = {"patient_id": "patientId", "due_before": "dueBefore"}
TARGET = "fuzz_target"
#: Tasks the search property always finds in the store (beside whatever the others made).
SEARCHED = [
    minimal_request(id="fuzz_search_1", patientId="pt_1", description="CBC"),
    minimal_request(id="fuzz_search_2", priority="urgent"),
]


def _deep(depth: int) -> object:
    value: object = "leaf"
    for n in range(depth):
        value = [value] if n % 2 else {"k": value}
    return value


SPECIAL: list[object] = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "\U0010ffff",
    "x" * 100_000,
    "x" * 20_000,
    "é" * 20_000,
    "é" * 70,
    "' OR 1=1; --",
    '"; DROP TABLE tasks; --',
    "'; DROP TABLE tasks;--",
    '"quoted" OR 1=1',
    "%_%",
    "%_*",
    'NEAR(a b) OR "x"* AND -y ^z',
    "NEAR(a b)",
    "2025-02-30T08:00:00Z",
    "2025-02-01T08:00:00Z",
    "requested",
    "order",
    "urgent",
    "pt_1",
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    1e308,
    0,
    -1,
    2**31,
    -(2**31) - 1,
    2**63,
    2**64,
    10**30,
    10**400,
    True,
    False,
    None,
    [],
    {},
    [None],
    [[[]]],
    {"not": None},
    {"missing": True},
    {"": ""},
    b"bytes",
    _deep(60),
    _deep(300),
    list(range(1000)),
    ["a"] * 101,
    frozenset({"x"}),
    (1, 2),
    object(),
]
#: Valid-looking values of many fields, so that both outcomes are drawn often.
PLAUSIBLE: list[object] = [
    "lab-order",
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

#: Too deep to repr (hypothesis would fail to print it): tried in a plain parametrized test.
DEEP = _deep(3000)

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    st.text(),
    st.text(st.characters(codec="utf-8", categories=["Cs", "Cc", "Zs", "Lo", "So"])),
    st.text(st.characters(blacklist_categories=()), max_size=30),
    st.text(st.sampled_from("'\"%_*;-()\\:^~,|")),
    st.binary(max_size=8),
    st.sampled_from(SPECIAL),
    st.sampled_from(PLAUSIBLE),
)
json_like: st.SearchStrategy[Any] = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(
                st.text(max_size=8),
                st.sampled_from(PATHS),
                st.sampled_from(["type", "valueString", "start", "not"]),
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def store() -> Iterator[TaskStore]:
    with TaskStore.open(":memory:") as shared:
        yield shared


def _field(path: str) -> str:
    """The top-level wire field of a path (``input[0].type`` -> ``input``)."""
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def _names_one_of(error: ValidationError, names: tuple[str, ...]) -> bool:
    """Whether some path of the error is one of ``names`` or lies inside one."""
    return any(p.startswith(n) for p in error.paths for n in names)


def _assert_stored_as_returned(store: TaskStore, wire: dict[str, Any]) -> None:
    stored = encode_task(store.tasks.get(str(wire["id"])).data)
    assert stored == wire


def _attempt(call: Callable[[], _R]) -> tuple[_R | None, ClinikError | None]:
    """The call's result, or the library error it raised; any other exception fails."""
    try:
        return call(), None
    except ClinikError as exc:
        return None, exc
    except Exception as exc:  # the property: nothing else, ever
        pytest.fail(f"raised {type(exc).__name__}: {exc!r}")


@FUZZ
@given(
    request=st.one_of(valid_requests(), st.just(minimal_request())),
    path=st.sampled_from(PATHS),
    value=json_like,
)
def test_create_with_any_value_at_any_field_succeeds_or_names_the_field(
    store: TaskStore, request: dict[str, Any], path: str, value: object
) -> None:
    bad = set_path(request, path, value)
    before = store.table_counts()
    response, error = _attempt(lambda: store.tasks.create(bad))
    event(f"create: {type(error or response).__name__}")
    if response is not None:
        assert response.data.id is not None
        _assert_stored_as_returned(store, encode_task(response.data))
        assert store.tasks.get(response.data.id).data == response.data
        assert store.table_counts()["tasks"] == before["tasks"] + 1
    elif isinstance(error, TaskExistsError):  # a drawn id the shared store already holds
        assert error.task_id == bad["id"]
        assert store.table_counts() == before
    else:
        assert isinstance(error, ValidationError), error
        assert names_path(error.paths, path), (error.paths, path)
        assert _names_one_of(error, (_field(path),)), (error.paths, path)
        assert store.table_counts() == before


@FUZZ
@given(request=json_like)
def test_create_with_an_arbitrary_request_succeeds_or_raises_validation_error(
    store: TaskStore, request: Any
) -> None:
    before = store.table_counts()
    response, error = _attempt(lambda: store.tasks.create(request))
    if response is None:
        if isinstance(error, TaskExistsError):  # a valid request with a used id
            assert error.task_id == request["id"]
        else:
            assert isinstance(error, ValidationError), error
            assert error.paths
        assert store.table_counts() == before


@FUZZ
@given(
    path=st.sampled_from(PATHS),
    value=json_like,
    task_id=st.one_of(st.just(TARGET), json_like),
    if_match=st.one_of(st.none(), st.just("1"), json_like),
)
def test_update_with_any_value_at_any_field_succeeds_or_names_the_field(
    store: TaskStore, path: str, value: object, task_id: Any, if_match: Any
) -> None:
    target, _ = _attempt(lambda: store.tasks.get(TARGET))
    if target is None:
        target = store.tasks.create(minimal_request(id=TARGET, code="lab-order"))
    changes = set_path({}, path, value)
    before = store.table_counts()
    response, error = _attempt(lambda: store.tasks.update(task_id, changes, if_match=if_match))
    event(f"update: {type(error or response).__name__}")
    if response is not None:
        assert response.data.id == task_id
        _assert_stored_as_returned(store, encode_task(response.data))
        return
    assert store.table_counts() == before
    assert store.tasks.get(TARGET).data == target.data  # refused: the task is as it was
    field = _field(path)
    if isinstance(error, ValidationError):
        assert _names_one_of(error, (field, "id", "if_match")), (path, error.paths)
        assert any(names_path(error.paths, n) for n in (field, "id", "if_match")), error.paths
    elif isinstance(error, IllegalTransitionError):
        # A valid status the lifecycle forbids from the task's current one.
        assert field == "status"
        assert value in STATUSES
    elif isinstance(error, NotFoundError):
        assert task_id != TARGET
    else:
        assert isinstance(error, VersionConflictError), error
        assert if_match is not None


@FUZZ
@given(
    filters=st.dictionaries(
        st.one_of(st.sampled_from(SEARCH_NAMES), st.text(max_size=6)), json_like, max_size=3
    )
)
def test_search_and_count_with_any_filter_value_succeed_or_name_the_filter(
    store: TaskStore, filters: dict[str, object]
) -> None:
    for request in SEARCHED:
        if _attempt(lambda: store.tasks.get(request["id"]))[0] is None:  # noqa: B023
            store.tasks.create(request)
    before = store.table_counts()
    held = store.tasks.count().data
    named = set(filters) | {_WIRE.get(n, n) for n in filters} | {"filters", "cursor"}
    page, error = _attempt(lambda: store.tasks.search(filters))
    event(f"search: {type(error or page).__name__}")
    if page is None:
        assert isinstance(error, ValidationError), error
        assert any(names_path(error.paths, n) for n in named), (error.paths, filters)
    else:
        for task in page.data:  # only stored tasks, exactly as stored
            assert store.tasks.get(str(task.id)).data == task
    total, error = _attempt(lambda: store.tasks.count(filters))
    if total is None:
        assert isinstance(error, ValidationError), error
        assert any(names_path(error.paths, n) for n in named), (error.paths, filters)
    else:
        assert 0 <= total.data <= held
    assert store.table_counts() == before


@pytest.mark.parametrize("index", range(len(SPECIAL) + 1))
@pytest.mark.parametrize("path", ["note", "input[0].valueString", "executionPeriod.end", "basedOn"])
def test_each_special_value_at_a_field_is_stored_exactly_or_refused_by_name(
    store: TaskStore, path: str, index: int
) -> None:
    value = [*SPECIAL, DEEP][index]  # by index: pytest plugins would repr DEEP and fail
    bad = set_path({"status": "draft", "intent": "order"}, path, value)
    before = store.table_counts()
    response, error = _attempt(lambda: store.tasks.create(bad))
    if response is not None:
        _assert_stored_as_returned(store, encode_task(response.data))
    else:
        assert isinstance(error, ValidationError), error
        assert names_path(error.paths, path), error.paths
        assert store.table_counts() == before


def test_values_too_deep_to_repr_are_refused_by_name_in_every_argument(store: TaskStore) -> None:
    store.tasks.create({"id": "deep_target", "status": "draft", "intent": "order"})
    before = store.table_counts()
    calls: list[tuple[str, Callable[[], object]]] = [
        (
            "versionId",
            lambda: store.tasks.create({"status": "draft", "intent": "order", "versionId": DEEP}),
        ),
        ("id", lambda: store.tasks.update("deep_target", {"id": DEEP})),
        ("admin_override", lambda: store.tasks.update("deep_target", {}, admin_override=DEEP)),  # type: ignore[arg-type]
        ("id", lambda: store.tasks.get(DEEP)),  # type: ignore[arg-type]
        ("if_match", lambda: store.tasks.delete("deep_target", if_match=DEEP)),  # type: ignore[arg-type]
        ("patientId", lambda: store.tasks.search(patientId=DEEP)),
    ]
    for path, call in calls:
        response, error = _attempt(call)
        assert response is None
        assert isinstance(error, ValidationError), (path, error)
        assert path in error.paths
    assert store.table_counts() == before
