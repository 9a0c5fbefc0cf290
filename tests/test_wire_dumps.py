"""``wire.dumps`` (one shared encoder) writes exactly what ``json.dumps`` with the wire's
settings writes, for any JSON value, from any number of threads; ``wire.loads`` (json's
scanner, reached directly) reads exactly what ``json.loads`` reads, and refuses alike."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinik_local.wire import dumps, loads

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


def _json_loads_outcome(text: str) -> tuple[str, Any]:
    try:
        return "value", json.loads(text)
    except json.JSONDecodeError as exc:
        return "error", (exc.msg, exc.pos)


def _loads_outcome(text: str) -> tuple[str, Any]:
    try:
        return "value", loads(text)
    except json.JSONDecodeError as exc:
        return "error", (exc.msg, exc.pos)


_noise = st.sampled_from(["", " ", "\n\t ", "\ufeff", "x", ",", "]", "}", "1", '"', "{}"])


@settings(max_examples=300, deadline=None)
@given(json_values, _noise, _noise, st.integers(min_value=0, max_value=40))
def test_loads_reads_and_refuses_exactly_what_json_loads_does(
    value: Any, before: str, after: str, cut: int
) -> None:
    text = _reference(value)
    for candidate in (text, before + text + after, text[:cut], text[cut:]):
        assert repr(_loads_outcome(candidate)) == repr(_json_loads_outcome(candidate))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_loads_of_any_text_matches_json_loads(text: str) -> None:
    assert repr(_loads_outcome(text)) == repr(_json_loads_outcome(text))
