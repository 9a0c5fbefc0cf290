"""The derived search rows of a task, computed from its wire form in Python.

The store keeps three kinds of rows beside each task, for the searches that a column
of ``tasks`` cannot serve (schema.sql): ``task_refs`` (basedOn / partOf membership),
``task_io`` (one row per input / output with its value as text) and ``task_text``
(the full-text columns). Schema version 1 derived them in SQL triggers that
re-parsed the body with ``json_each``; this module computes exactly the same rows
from the wire mapping the writer already holds, and storage/rows.py binds them
beside every task row (schema version 2 has no triggers; benchmarks/lean_levers.py
measured the difference).

Pure core: no SQLite, no storage imports. The input is a *valid* task in wire form
(what ``codec.encode_task`` returns, or ``json.loads`` of a stored body); tests pin
that the result equals what the version-1 triggers (tests/data/schema_v1.sql)
produce for the same body, so version-1 files and new rows agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["DerivedRows", "derive_rows", "io_value_text"]

#: (kind, ref): one task_refs row, kind "basedOn" or "partOf".
RefRow = tuple[str, str]
#: (direction, type, value, pos): one task_io row, direction "input" or "output".
IoRow = tuple[str, str, str | None, int]
#: (description, note, business_status, code, io_values): the task_text columns.
TextRow = tuple[str | None, str | None, str | None, str | None, str | None]


@attrs.frozen
class DerivedRows:
    """The rows one task contributes to task_refs, task_io and task_text (no seq)."""

    refs: tuple[RefRow, ...]
    io: tuple[IoRow, ...]
    text: TextRow


def _real_text(value: float) -> str:
    """A float as SQLite's CAST(real AS TEXT) spells it, for ordinary decimals.

    Shortest round-trip digits, fixed notation for decimal exponents -4..16 (with
    ``.0`` when integral), else ``d.ddde+XX``. Where SQLite's own text-to-real check
    makes it print 17 digits (some values of 12+ digits, huge or tiny ones), this gives
    the same number spelt shortest; a clinical decimal rarely has that many digits.
    """
    if not math.isfinite(value):
        return "Inf" if value > 0 else "-Inf" if value < 0 else "NaN"
    if value == 0:
        return "0.0"
    sign = "-" if value < 0 else ""
    mantissa, _, exp = repr(abs(value)).partition("e")
    whole, _, frac = mantissa.partition(".")
    combined = whole + frac
    first = len(combined) - len(combined.lstrip("0"))
    exponent = len(whole) - 1 - first + int(exp or 0)
    digits = combined[first:].rstrip("0") or "0"
    if -4 <= exponent < 17:
        if exponent >= 0:
            head = digits[: exponent + 1].ljust(exponent + 1, "0")
            return f"{sign}{head}.{digits[exponent + 1 :] or '0'}"
        return f"{sign}0.{'0' * (-exponent - 1)}{digits}"
    mark = "+" if exponent >= 0 else "-"
    return f"{sign}{digits[0]}.{digits[1:] or '0'}e{mark}{abs(exponent):02d}"


def io_value_text(item: Mapping[str, Any]) -> str | None:
    """The text of an input/output's ``value[x]``, as task_io stores and searches it.

    Strings and codes as they are, integers in decimal, booleans ``true``/``false``,
    decimals as SQLite renders a real; the first key that starts with "value"
    (ASCII case-insensitively, as the trigger's ``LIKE 'value%'``) is the value.
    """
    for key, value in item.items():
        if key[:5].lower() != "value":
            continue
        if value is None:
            return None
        if value is True:
            return "true"
        if value is False:
            return "false"
        if isinstance(value, str):
            return value
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            return _real_text(value)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return None


def _text_or_none(value: object) -> str | None:
    # json_extract of a string is the string; of anything else in a valid task, its JSON.
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def derive_rows(wire: Mapping[str, Any]) -> DerivedRows:
    """The task_refs, task_io and task_text rows of one valid wire-form task.

    Refs are unique and sorted (the trigger's UNION). io rows are in list order per
    direction; io_values joins the non-NULL values in the order SQLite reads them
    back through task_io's (seq) index: by (direction, type, value, pos), NULL first.
    """
    g = wire.get
    if not (g("basedOn") or g("partOf") or g("input") or g("output")):
        # Most tasks: no refs, no io rows, text only (what the general path gives them,
        # without its sets and sorts: a tenth of a create with the CPU caches cold).
        return DerivedRows(
            (),
            (),
            (
                _text_or_none(g("description")),
                _text_or_none(g("note")),
                _text_or_none(g("businessStatus")),
                _text_or_none(g("code")),
                None,
            ),
        )
    refs = sorted(
        {("basedOn", str(r)) for r in wire.get("basedOn") or ()}
        | {("partOf", str(r)) for r in wire.get("partOf") or ()}
    )
    io: list[IoRow] = []
    for direction in ("input", "output"):
        for pos, item in enumerate(wire.get(direction) or ()):
            io.append((direction, str(item["type"]), io_value_text(item), pos))
    ordered = sorted(io, key=lambda r: (r[0], r[1], r[2] is not None, r[2] or "", r[3]))
    values = [r[2] for r in ordered if r[2] is not None]
    text: TextRow = (
        _text_or_none(wire.get("description")),
        _text_or_none(wire.get("note")),
        _text_or_none(wire.get("businessStatus")),
        _text_or_none(wire.get("code")),
        " ".join(values) if values else None,
    )
    return DerivedRows(tuple(refs), tuple(io), text)
