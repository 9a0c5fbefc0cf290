"""decode_task's plain path (the request has no problem: cattrs' detailed validation is
skipped) gives exactly what the detailed path gives, and leaves every refusal to it."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinik_local.codec import (
    _get_codec,
    _structure_detailed,
    _structure_plain,
    decode_task,
    encode_task,
    task_from_stored,
)
from clinik_local.errors import ValidationError
from clinik_local.model import Task
from clinik_local.storage import rows
from clinik_local.wire import dumps
from tests.strategies import invalid_requests, minimal_request, valid_requests


def _comparable(task: Task, request: dict[str, Any]) -> Task:
    # A request without authoredOn gets "now" from each structuring: set one apart.
    return task if "authoredOn" in request else attrs.evolve(task, authored_on="")


@settings(max_examples=150, deadline=None)
@given(valid_requests())
def test_the_plain_path_builds_the_same_task_as_cattrs_detailed_validation(
    request: dict[str, Any],
) -> None:
    codec = _get_codec()
    plain = _structure_plain(codec, request)
    assert plain is not None
    detailed = _structure_detailed(codec, request)
    assert _comparable(plain, request) == _comparable(detailed, request)
    assert _comparable(decode_task(request), request) == _comparable(detailed, request)


@settings(max_examples=150, deadline=None)
@given(invalid_requests())
def test_a_request_with_a_problem_is_left_to_the_detailed_path_and_refused_the_same(
    case: tuple[dict[str, Any], str],
) -> None:
    request, _ = case
    codec = _get_codec()
    assert _structure_plain(codec, request) is None
    with pytest.raises(ValidationError) as detailed:
        _structure_detailed(codec, request)
    with pytest.raises(ValidationError) as decoded:
        decode_task(request)
    assert decoded.value.errors == detailed.value.errors


class _Odd(dict[str, object]):
    """A dict subclass whose lookups differ from its items (the plain path never sees it)."""

    def items(self) -> Any:
        return [("status", "bogus")]


_PROBLEMS: list[dict[Any, object]] = [
    {"intent": "order"},  # status missing
    {**minimal_request(), "unknown": 1},
    {**minimal_request(), 3: "x"},
    {**minimal_request(), "patientId": "a b"},
]


@pytest.mark.parametrize("request_", _PROBLEMS)
def test_requests_with_problems_report_them_as_cattrs_does(request_: dict[Any, object]) -> None:
    codec = _get_codec()
    assert _structure_plain(codec, request_) is None
    with pytest.raises(ValidationError) as decoded:
        decode_task(request_)
    with pytest.raises(ValidationError) as detailed:
        _structure_detailed(codec, request_)
    assert decoded.value.errors == detailed.value.errors


def test_cross_field_invariants_are_checked_after_the_plain_path_too() -> None:
    request = minimal_request(
        lastModified="2020-01-01T00:00:00Z", authoredOn="2021-01-01T00:00:00Z"
    )
    assert _structure_plain(_get_codec(), request) is not None
    with pytest.raises(ValidationError) as decoded:
        decode_task(request)
    assert decoded.value.paths == ("lastModified",)


def test_a_dict_subclass_takes_the_detailed_path() -> None:
    # authoredOn given: two decodes a millisecond apart would each default it to now.
    odd = _Odd({**minimal_request(), "authoredOn": "2025-01-01T00:00:00Z"})
    assert decode_task(odd) == _structure_detailed(_get_codec(), odd)


@settings(max_examples=150, deadline=None)
@given(valid_requests(with_id=True), st.integers(1, 50))
def test_a_stored_body_rebuilds_the_task_its_init_builds_equal_hashed_and_frozen(
    request: dict[str, Any], version: int
) -> None:
    # task_from_stored fills the slots itself (no __init__): the Task must be the one
    # Task(...) builds from the same values, attribute by attribute, and as frozen.
    task = rows.stamp(decode_task(request), version, "2030-01-01T00:00:00.000Z")
    stored = task_from_stored(json.loads(dumps(encode_task(task))))
    built = Task(**{a.name: getattr(task, a.name) for a in attrs.fields(Task)})
    assert type(stored) is Task
    for a in attrs.fields(Task):
        mine, theirs = getattr(stored, a.name), getattr(built, a.name)
        assert mine == theirs, a.name
        assert type(mine) is type(theirs), a.name
    assert stored == built == task
    assert hash(stored) == hash(built)
    assert repr(stored) == repr(built)
    assert attrs.evolve(stored) == built
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stored.note = "changed"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        stored.not_a_field = 1  # type: ignore[attr-defined]
