"""``wire.dumps`` (one shared encoder) writes exactly what ``json.dumps`` with the wire's
settings writes, for any JSON value, from any number of threads."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinik_local.wire import dumps

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _reference(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_dumps_writes_what_json_dumps_with_the_wire_settings_writes(value: Any) -> None:
    assert dumps(value) == _reference(value)


def test_dumps_is_the_same_from_many_threads_at_once() -> None:
    values = [{"id": f"task_{i}", "note": "é" * i, "n": [i, {"k": None}]} for i in range(200)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(dumps, values)) == [_reference(v) for v in values]


def test_dumps_refuses_what_json_dumps_refuses_and_keeps_no_state_after_a_refusal() -> None:
    loop: list[Any] = []
    loop.append(loop)
    shared = {"k": [1, 2]}
    for bad, error in (([1, loop], ValueError), ({"x": object()}, TypeError)):
        with pytest.raises(error) as mine:
            dumps(bad)
        with pytest.raises(error) as theirs:
            _reference(bad)
        assert str(mine.value) == str(theirs.value)
        # A value seen inside the refused one is not taken for a loop next time.
        assert dumps([shared, shared]) == _reference([shared, shared])
