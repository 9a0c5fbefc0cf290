"""clinik_local.derive computes exactly the rows the version-1 triggers derived in SQL.

The reference is the real trigger text of schema version 1 (tests/data/schema_v1.sql,
as released: every version-1 file holds rows it wrote, and schema version 2 derives
in Python instead), run on a scratch in-memory database whose task_text is a plain
table (a contentless FTS5 table cannot be read back): for any valid task,
derive_rows(wire) must equal what the trigger wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local.codec import decode_task, encode_task
from clinik_local.derive import derive_rows, io_value_text

from .strategies import valid_requests

V1_SCHEMA = (Path(__file__).parent / "data" / "schema_v1.sql").read_text(encoding="utf-8")


def _trigger_db() -> apsw.Connection:
    """tasks, task_refs, task_io of version 1; task_text as a plain table; the trigger."""
    sql = V1_SCHEMA
    conn = apsw.Connection(":memory:")
    for name in ("tasks", "task_refs", "task_io"):
        conn.execute(re.search(rf"CREATE TABLE {name} \(.*?\n\)[^;]*;", sql, re.S)[0])  # type: ignore[index]
    conn.execute(
        "CREATE TABLE task_text (rowid INTEGER PRIMARY KEY, description, note, "
        "business_status, code, io_values)"
    )
    trigger = re.search(r"CREATE TRIGGER tasks_derive_insert .*?\nEND;", sql, re.S)
    assert trigger is not None
    conn.execute(trigger[0])
    return conn


_CONN = _trigger_db()


def _triggered(wire: dict[str, Any]) -> tuple[list[Any], list[Any], tuple[Any, ...]]:
    conn = _CONN
    conn.execute("BEGIN")
    try:
        conn.execute(
            "INSERT INTO tasks (seq, id, version, status, intent, priority_rank, "
            "authored_on, last_modified, body) VALUES (1, 'x', 1, 's', 'i', 4, 'a', 'a', ?)",
            (json.dumps(wire, ensure_ascii=False, separators=(",", ":")),),
        )
        refs = conn.execute("SELECT kind, ref FROM task_refs ORDER BY kind, ref").fetchall()
        io = conn.execute(
            "SELECT direction, type, value, pos FROM task_io ORDER BY direction, pos"
        ).fetchall()
        text = conn.execute(
            "SELECT description, note, business_status, code, io_values FROM task_text"
        ).fetchall()
    finally:
        conn.execute("ROLLBACK")
    return list(refs), list(io), tuple(text[0])


def _exact(value: float) -> bool:
    """Whether SQLite's spelling of this real is pinned: <= 6 digits, 1e-4 <= |v| < 1e15.

    Beyond that SQLite decides between 15 and 17 digits with its own text-to-real
    conversion, which can print e.g. 137438953472.109 as 137438953472.10901; derive
    then spells the same number shortest (the property test pins the number itself).
    """
    return float(f"{value:.6g}") == value and (value == 0 or 1e-4 <= abs(value) < 1e15)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(valid_requests(with_id=True))
def test_derived_rows_equal_what_the_triggers_write_for_any_valid_task(
    request: dict[str, Any],
) -> None:
    wire = encode_task(decode_task(request))
    refs, io, text = _triggered(wire)
    derived = derive_rows(wire)
    decimals = [i for d in ("input", "output") for i in wire.get(d, ()) if "valueDecimal" in i]
    assert list(derived.refs) == refs
    if all(_exact(i["valueDecimal"]) for i in decimals):
        assert sorted(derived.io, key=lambda r: (r[0], r[3])) == io
        assert derived.text == text
    else:  # see test_a_decimal_value_is_spelled_as_sqlite_casts_a_real
        assert [r[:2] + r[3:] for r in sorted(derived.io, key=lambda r: (r[0], r[3]))] == [
            r[:2] + r[3:] for r in io
        ]
        assert derived.text[:4] == text[:4]


@settings(max_examples=200)
@given(st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_a_decimal_value_is_spelled_as_sqlite_casts_a_real(value: float) -> None:
    wire = {"input": [{"type": "t", "valueDecimal": value}]}
    _, io, _ = _triggered(wire)
    text = io_value_text(wire["input"][0])
    assert text is not None
    assert float(text) == value
    assert float(str(io[0][2])) == value  # SQLite's spelling is the same number
    if _exact(value):
        assert text == io[0][2]


@pytest.mark.parametrize(
    ("value", "text"),
    [(1.5, "1.5"), (98.6, "98.6"), (100.0, "100.0"), (0.0001, "0.0001"), (1e-05, "1.0e-05"),
     (1e20, "1.0e+20"), (-2.25, "-2.25"), (7081335556969050.0, "7081335556969050.0")],
)  # fmt: skip
def test_clinical_decimals_are_spelled_exactly_as_sqlite_spells_them(
    value: float, text: str
) -> None:
    assert io_value_text({"type": "t", "valueDecimal": value}) == text
    assert _triggered({"input": [{"type": "t", "valueDecimal": value}]})[1][0][2] == text


def test_booleans_integers_and_strings_render_as_the_search_compares_them() -> None:
    rows = derive_rows(
        {
            "input": [
                {"type": "flag", "valueBoolean": False},
                {"type": "n", "valueInteger": -7},
                {"type": "lab-panel", "valueString": "CBC"},
            ],
            "output": [{"type": "flag", "valueBoolean": True}],
            "basedOn": ["sr_2", "sr_1", "sr_2"],
            "partOf": ["t_1"],
        }
    )
    assert rows.io == (
        ("input", "flag", "false", 0),
        ("input", "n", "-7", 1),
        ("input", "lab-panel", "CBC", 2),
        ("output", "flag", "true", 0),
    )
    assert rows.refs == (("basedOn", "sr_1"), ("basedOn", "sr_2"), ("partOf", "t_1"))
    # io_values in the order of task_io's index: (direction, type, value, pos)
    assert rows.text == (None, None, None, None, "false CBC -7 true")


def test_a_task_without_inputs_has_no_io_rows_and_no_io_text() -> None:
    rows = derive_rows({"description": "Draw labs", "code": "lab-order"})
    assert rows.io == ()
    assert rows.refs == ()
    assert rows.text == ("Draw labs", None, None, "lab-order", None)


def test_a_task_without_refs_or_io_derives_text_only_as_the_triggers_do() -> None:
    # The shortcut for the usual task (no basedOn/partOf/input/output, or empty lists).
    extras: list[dict[str, Any]] = [{}, {"basedOn": [], "input": []}]
    for extra in extras:
        wire = encode_task(
            decode_task(
                {"status": "requested", "intent": "order", "code": "lab-order", "note": "é"}
            )
        )
        wire.update(extra)
        derived = derive_rows(wire)
        refs, io, text = _triggered(wire)
        assert derived.refs == ()
        assert derived.io == ()
        assert list(derived.refs) == refs
        assert list(derived.io) == io
        assert derived.text == text == (None, "é", None, "lab-order", None)
