"""The search compiler: wire-form filters -> one parameterised, index-served SQL query.

Filter names: a mapping of filters uses the wire's camelCase names
(``{"patientId": ...}``), as every mapping the library takes does (create, update);
a snake_case key in it is refused naming its wire name. Keyword arguments are Python
and may use either spelling: ``patientId=`` or ``patient_id=``. Values arrive as they
would in the remote service's query string. Text values of equality and
input/output filters are compared in Unicode normal form C, the form the codec
stores every text in, so "é" typed as one character or as ``e`` + U+0301 finds the
same tasks. Column names in SQL come only from the allow-lists
below; every value is a bound parameter.

Equality filters (patientId, ownerId, requesterId, encounterId, focusId, status,
intent, priority, code, businessStatus):

* ``"a"``, ``"a,b"`` or ``["a", "b"]``: any of these values.
* ``None`` (or ``{"missing": True}``): tasks without a value (e.g. unassigned);
  ``{"missing": False}``: tasks with one. ``None`` may also sit in a list:
  ``ownerId=["me", None]`` is "mine or unassigned". Every field but status and
  intent (which every task has) accepts it.
* ``{"not": [...]}`` (list or comma string): anything except these values; tasks
  without a value count as "anything else", as in FHIR's ``:not``. Put ``None`` in the
  list to exclude those too. ``{"not": ..., "missing": ...}`` combine with AND.

Membership: ``basedOn="sr_1"`` / ``partOf="t_1,t_2"``: tasks listing any of these ids.

Inputs and outputs: ``input="lab-panel"`` (an input of that type) or
``input="lab-panel|CBC"`` (of that type with that value, compared as text: strings
and codes as they are, integers in decimal, booleans as ``true``/``false``). A list
or commas mean any of; ``{"type": "lab-panel", "value": "CBC"}`` is the mapping form.
``output=`` is the same over outputs.

Dates: ``authoredOn``, ``lastModified``, ``periodStart``, ``periodEnd``. A value is
a FHIR date search value: optional prefix (eq, ne, lt, gt, le, ge, sa, eb; default eq)
then a date or date-time of any precision: ``2025``, ``2025-02``, ``2025-02-01``,
``2025-02-01T08:00``, ``2025-02-01T08:00:00``, with fractions of a second and an offset
(UTC when none is given). A value stands for the whole range its precision implies:
``2025-02`` is [2025-02-01T00:00Z, 2025-03-01T00:00Z). A stored instant ``t`` matches:

* ``eq``: t inside the range; ``ne``: t outside it (before its start or at/after its end);
* ``lt``: t before the range starts; ``le``: t before the range ends;
* ``gt``: t at or after the range ends; ``ge``: t at or after the range starts;
* ``sa`` / ``eb`` (starts after / ends before): for an instant (a range of one
  millisecond) these equal ``gt`` / ``lt``, which is what FHIR's definitions give.

A comma string or list means any of; a mapping ``{"ge": "2025-01-01", "lt":
"2025-02-01"}`` means all of. Tasks without the date (periodStart/periodEnd) never
match a date filter.

Due: ``dueBefore="<date>"`` (executionPeriod.end before the start of that date's
range) and ``overdue=True`` (executionPeriod.end before now); both only match tasks
whose status is not terminal (completed, cancelled, failed, rejected).

Text: ``text="cbc"`` searches description, note, businessStatus, code and the
input/output values (FTS5). Every run of letters/digits in the text is a word; a task
matches when each word is the start of a word in it (``"cb"`` finds "CBC"),
case-insensitively. Words are quoted before they reach FTS5, so its query syntax in
user text is taken literally; text with no letters or digits is refused.

Sort: ``sort="-priority,authoredOn"`` (FHIR ``_sort``) or a list of keys; ``-`` is
descending. Keys: authoredOn, lastModified, priority (clinical rank: ``-priority``
is stat, asap, urgent, routine, then tasks without a priority; ``priority`` is the
reverse), status (text order), due (executionPeriod.end; tasks without one count as
due after every other task: last ascending, first with ``-due``). Ties are broken by
id in the direction of the last key. Default: ``-authoredOn`` (newest first).

Paging: ``limit`` (1-1000, default 20) and ``cursor`` (the ``nextCursor`` of the
previous page). A cursor holds the sort key of the last row seen, and the next page
is the rows strictly after it (a keyset predicate; no offsets), so a task that did not
change is seen exactly once however others are inserted, updated or deleted between
pages. Sort keys are never NULL in SQL (missing priority is rank 4, missing due is
``'~'``), so the keyset comparison needs no NULL cases. A cursor carries a
fingerprint of its filters and sort and is refused by any other search.
``total=True`` adds the number of matching tasks to the page's meta.

Plans: equality filters seek their index and, for the default sort (and for
``-priority,authoredOn`` with ownerId), read rows in order with no temp b-tree; any-of
lists become one UNION ALL arm per value, merged in order by SQLite. A temp b-tree is
used, over the matching rows only, where no index delivers the order: membership,
input/output and text filters (their matches come from side tables), date ranges on
another column than the sort's, sorts not listed in schema.sql, and mixed directions.
Those pages cost time in proportion to the number of matching tasks (each is looked up
to be sorted): well under a millisecond for a distinctive word or a task's children,
tens of milliseconds for a word found in a third of 100 000 tasks. A membership or
input/output filter that matches many tasks (a bounded count decides; see
:func:`page_query`) is served the other way round: the sort index is walked and each
task's membership is one index probe, so a common value costs about limit * n / matches
probes instead. Text does the same when every word is plain ASCII and its prefix
starts at most 64 vocabulary terms (task_text_terms): the probe is an FTS5 query of
those exact terms, which can seek a rowid (a prefix query cannot). A periodStart range
under the default sort walks tasks_by_authored, which carries period_start, and tests
the range on each index entry. :func:`count_query` gives a count bounded by ``at_most``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Hashable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs

from . import timestamps
from .codec import TEXT_LIMITS
from .errors import FieldError, ValidationError
from .errors import shorten as _shorten
from .ids import ID_PATTERN, is_valid_id
from .lifecycle import TERMINAL_STATUSES
from .model import NO_PRIORITY_RANK as _NO_PRIORITY
from .model import PRIORITY_RANKS as _PRIORITY_RANK
from .model import TaskIntent, TaskPriority, TaskStatus

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "TERMINAL_STATUSES",
    "CompiledSearch",
    "check_at_most",
    "compile_search",
    "count_query",
    "next_cursor",
    "normalise_filters",
    "page_query",
    "parse_date_range",
]

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
_MAX_VALUES = 100
_MAX_ARMS = 16
_MAX_TEXT = 256
_MAX_WORDS = 16

#: tasks_open_by_due's WHERE, spelt exactly as schema.sql spells it (the planner uses a
#: partial index only for a query holding its WHERE term): one NOT of an OR chain, not
#: a NOT IN, which builds a throwaway b-tree of the constants wherever it is evaluated.
_NOT_TERMINAL = "NOT (" + " OR ".join(f"status = '{s}'" for s in TERMINAL_STATUSES) + ")"
#: The due sort key and periodEnd filter column; matches the tasks_by_due index.
DUE_KEY = "ifnull(period_end, '~')"


@attrs.frozen
class _Field:
    column: str
    kind: str  # "id" | "enum" | "text" | "priority"
    allowed: tuple[str, ...] = ()
    nullable: bool = True


#: The kinds of equality filter with a finite domain. Their values are checked against
#: it, and written into the SQL as literals: they are few, and how many rows one
#: matches decides the plan (a common status walks the sort's index, a rare one seeks
#: its own).
_FINITE_KINDS = ("enum", "priority")

#: Equality filters: name -> column and value kind. Order = preference for the
#: UNION ALL expansion (most selective first).
FILTERS: Mapping[str, _Field] = {
    "ownerId": _Field("owner_id", "id"),
    "patientId": _Field("patient_id", "id"),
    "requesterId": _Field("requester_id", "id"),
    "encounterId": _Field("encounter_id", "id"),
    "focusId": _Field("focus_id", "id"),
    "code": _Field("code", "text"),
    "businessStatus": _Field("business_status", "text"),
    "priority": _Field("priority_rank", "priority", tuple(p.value for p in TaskPriority)),
    "intent": _Field("intent", "enum", tuple(i.value for i in TaskIntent), nullable=False),
    "status": _Field("status", "enum", tuple(s.value for s in TaskStatus), nullable=False),
}
#: Date filters: name -> SQL expression.
DATE_FILTERS: Mapping[str, str] = {
    "authoredOn": "authored_on",
    "lastModified": "last_modified",
    "periodStart": "period_start",
    "periodEnd": DUE_KEY,
}
_REFS = ("basedOn", "partOf")
_IO = ("input", "output")
_OTHER = ("dueBefore", "overdue", "text", "sort", "total", "limit", "cursor")
_ALL_NAMES = (*FILTERS, *DATE_FILTERS, *_REFS, *_IO, *_OTHER)
_ALIASES = {
    "patient_id": "patientId",
    "owner_id": "ownerId",
    "requester_id": "requesterId",
    "encounter_id": "encounterId",
    "focus_id": "focusId",
    "business_status": "businessStatus",
    "based_on": "basedOn",
    "part_of": "partOf",
    "authored_on": "authoredOn",
    "last_modified": "lastModified",
    "period_start": "periodStart",
    "period_end": "periodEnd",
    "due_before": "dueBefore",
}


@attrs.frozen
class _SortKey:
    expr: str
    is_int: bool = False
    inverted: bool = False  # ascending in the wire sense is descending in SQL


SORT_KEYS: Mapping[str, _SortKey] = {
    "authoredOn": _SortKey("authored_on"),
    "lastModified": _SortKey("last_modified"),
    "priority": _SortKey("priority_rank", is_int=True, inverted=True),
    "status": _SortKey("status"),
    "due": _SortKey(DUE_KEY),
}
#: Which equality columns have an index (column, *sort columns, id): the sort
#: columns (without id) -> columns. Drives the UNION ALL expansion.
_ORDERED_INDEXES: Mapping[tuple[str, ...], frozenset[str]] = {
    ("authored_on",): frozenset(f.column for f in FILTERS.values()),
    ("priority_rank", "authored_on"): frozenset({"owner_id"}),
}


@attrs.frozen
class CompiledSearch:
    """A page query, the count query over the same filters, and their parameters.

    Page rows are ``(body, *sort keys, id)``.
    """

    page_sql: str
    page_params: tuple[object, ...]
    count_sql: str
    count_params: tuple[object, ...]
    limit: int
    fingerprint: str
    total: bool = False
    key_count: int = 1
    #: (probe sql, probe params, page sql, page params) of the membership-probing
    #: variant, for a search with one basedOn/partOf/input/output filter.
    dense: tuple[str, tuple[object, ...], str, tuple[object, ...]] | None = None
    #: The count query with a ``LIMIT ?`` inside: counts at most that many matches.
    bounded_count_sql: str = ""
    #: The dense variant's threshold factor (see :func:`page_query`): a walk that tests
    #: a range on the index entry is far cheaper per task than a membership probe.
    dense_factor: int = 64


def count_query(compiled: CompiledSearch, at_most: int | None) -> tuple[str, tuple[object, ...]]:
    """The count SQL and parameters; with ``at_most``, a count that stops at that many.

    A count must read every match; where the caller only needs to know "how many, up
    to N" (a badge showing "99+"), the bounded form reads at most N of them.
    """
    if at_most is None:
        return compiled.count_sql, compiled.count_params
    check_at_most(at_most)
    return compiled.bounded_count_sql, (*compiled.count_params, at_most)


#: The largest integer SQLite binds (a bound beyond it is refused, not an OverflowError).
_INT64 = 2**63 - 1


def check_at_most(at_most: object) -> None:
    """ValidationError unless ``at_most`` is None or a positive integer (a count bound)."""
    if at_most is None:
        return
    if isinstance(at_most, bool) or not isinstance(at_most, int) or not 1 <= at_most <= _INT64:
        raise ValidationError.single(
            "at_most", "expected a positive integer", at_most, f"1..{_INT64}"
        )


def normalise_filters(
    filters: Mapping[str, object] | None, keywords: Mapping[str, object]
) -> dict[str, object]:
    """One mapping of wire names from a positional mapping plus keyword arguments.

    The mapping holds wire names only (a snake_case key is refused naming its wire
    name); keywords may also be spelt in snake_case.
    """
    merged: dict[str, object] = {}
    if filters is None:
        filters = {}
    if type(filters) is not dict and not isinstance(filters, Mapping):  # (dict: no ABC check)
        raise ValidationError.single(
            "filters", "expected a mapping of filter names to values", filters
        )
    for key, value in filters.items():
        if not isinstance(key, str):
            raise ValidationError.single(
                "filters", "filter names are strings", key, ", ".join(_ALL_NAMES)
            )
        wire = _ALIASES.get(key)
        if wire is not None:
            raise ValidationError(
                [
                    FieldError(
                        key,
                        f"is the Python spelling; a filter mapping uses the wire name {wire!r} "
                        f"(keywords may use either: {key}=...)",
                        None,
                        wire,
                    )
                ]
            )
        merged[key] = value
    for key, value in keywords.items():
        name = _ALIASES.get(key, key)
        if name in merged:
            raise ValidationError.single(name, "is given twice", value)
        merged[name] = value
    return merged


# --- value parsing ------------------------------------------------------------------


def _key_text(key: object) -> str:
    """A mapping key as it appears in an error (any key, printable or not)."""
    return key if isinstance(key, str) else _shorten(key)


def _split(name: str, raw: object, *, allow_none: bool) -> list[Any]:
    """A list of values from a string (commas), a list, or None."""
    if raw is None:
        if not allow_none:
            raise ValidationError.single(name, "every task has one; None matches nothing", raw)
        return [None]
    if isinstance(raw, str):
        values: list[Any] = raw.split(",")
    elif isinstance(raw, (list, tuple, set, frozenset)):
        values = list(raw)
    else:
        raise ValidationError.single(
            name, f"expected a string or a list of strings, not {type(raw).__name__}", raw
        )
    if not values:
        raise ValidationError.single(name, "an empty list matches nothing", raw, "1 or more values")
    if len(values) > _MAX_VALUES:
        raise ValidationError.single(
            name, f"has {len(values)} values", "[...]", f"at most {_MAX_VALUES}"
        )
    return values


def _check_text_value(name: str, value: object, limit: int) -> str:
    """A text filter value in NFC (the form every stored text is in), or ValidationError."""
    if not isinstance(value, str):
        raise ValidationError.single(name, f"expected a string, not {type(value).__name__}", value)
    if not value or len(value) > 4 * limit or "\x00" in value:
        raise ValidationError.single(
            name, "is not an acceptable value", value, f"1-{limit} characters, no NUL"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError.single(name, "is not valid Unicode", value) from None
        value = unicodedata.normalize("NFC", value)
    if len(value) > limit:
        raise ValidationError.single(
            name, "is not an acceptable value", value, f"1-{limit} characters, no NUL"
        )
    return value


def _check_value(name: str, spec: _Field, value: object) -> object:
    """A validated filter value in its SQL form (None stays None)."""
    if value is None:
        if not spec.nullable:
            raise ValidationError.single(name, "every task has one; None matches nothing", value)
        return _NO_PRIORITY if spec.kind == "priority" else None
    if not isinstance(value, str):
        raise ValidationError.single(name, f"expected a string, not {type(value).__name__}", value)
    if spec.kind == "id" and not is_valid_id(value):
        raise ValidationError.single(name, "is not a well-formed id", value, ID_PATTERN)
    if spec.kind in _FINITE_KINDS and value not in spec.allowed:
        raise ValidationError.single(
            name, "is not an allowed value", value, ", ".join(sorted(spec.allowed))
        )
    if spec.kind == "text":
        value = _check_text_value(name, value, TEXT_LIMITS.get(name, 1024))
    if spec.kind == "priority":
        return _PRIORITY_RANK[value]
    return value


def _sort_values(values: list[object]) -> list[object]:
    return sorted(set(values), key=lambda v: (v is not None, str(v)))


@attrs.frozen
class _Equality:
    """One equality filter, canonical: any-of values, excluded values, missing."""

    spec: _Field
    include: tuple[object, ...] | None
    exclude: tuple[object, ...]
    missing: bool | None
    #: Whether ``include`` is written into the SQL as literals: the values of a finite
    #: domain (status, intent, priority), whose plan depends on how many rows they
    #: match (see :func:`_date_term`).
    literal: bool = False


def _parse_equality(name: str, spec: _Field, raw: object) -> _Equality:
    include: list[object] | None = None
    exclude: list[object] = []
    missing: bool | None = None
    if isinstance(raw, Mapping):
        unknown = sorted(_key_text(k) for k in raw if k not in ("not", "missing"))
        if unknown or not raw:
            raise ValidationError.single(
                name, f"unknown operator {', '.join(unknown) or '(none)'}", raw, "not, missing"
            )
        if "not" in raw:
            exclude = [
                _check_value(name, spec, v)
                for v in _split(f"{name}.not", raw["not"], allow_none=spec.nullable)
            ]
        if "missing" in raw:
            flag = raw["missing"]
            if isinstance(flag, str) and flag in ("true", "false"):
                flag = flag == "true"
            if not isinstance(flag, bool):
                raise ValidationError.single(
                    f"{name}.missing", "expected true or false", flag, "true, false"
                )
            if not spec.nullable and flag:
                raise ValidationError.single(
                    f"{name}.missing", "every task has one; true matches nothing", flag
                )
            missing = flag
    else:
        include = [_check_value(name, spec, v) for v in _split(name, raw, allow_none=True)]
    if spec.kind in _FINITE_KINDS and exclude and missing is None:
        # A finite domain: "not these" is "any of the others", which seeks the index.
        domain: list[object] = (
            list(spec.allowed) if spec.kind == "enum" else list(range(_NO_PRIORITY + 1))
        )
        include = [v for v in domain if v not in exclude]
        exclude = []
        if not include:
            raise ValidationError.single(name, "excludes every value: matches nothing", raw)
    return _Equality(
        spec,
        None if include is None else tuple(_sort_values(include)),
        tuple(_sort_values(exclude)),
        missing,
        spec.kind in _FINITE_KINDS,
    )


def _equality_arms(eq: _Equality) -> list[tuple[str, list[object]]]:
    """The any-of part as alternative (sql, params) arms; [] when there is none."""
    if eq.include is None:
        return []
    col = eq.spec.column
    arms: list[tuple[str, list[object]]] = []
    for value in eq.include:
        if value is None:
            arms.append((f"{col} IS NULL", []))
        elif eq.literal:
            assert isinstance(value, str | int)
            arms.append((f"{col} = {sql_literal(value)}", []))
        else:
            arms.append((f"{col} = ?", [value]))
    return arms


def _equality_rest(eq: _Equality) -> list[tuple[str, list[object]]]:
    """The not/missing parts as AND-ed (sql, params) terms."""
    col = eq.spec.column
    is_priority = eq.spec.kind == "priority"
    null_test = f"{col} = {_NO_PRIORITY}" if is_priority else f"{col} IS NULL"
    not_null_test = f"{col} <> {_NO_PRIORITY}" if is_priority else f"{col} IS NOT NULL"
    terms: list[tuple[str, list[object]]] = []
    if eq.exclude:
        values = [v for v in eq.exclude if v is not None]
        excludes_null = len(values) < len(eq.exclude)
        if values:
            marks = ", ".join("?" * len(values))
            if eq.spec.nullable and not excludes_null and not is_priority:
                terms.append((f"({col} IS NULL OR {col} NOT IN ({marks}))", list(values)))
            else:
                terms.append((f"{col} NOT IN ({marks})", list(values)))
        if excludes_null and not is_priority:
            terms.append((not_null_test, []))
    if eq.missing is not None:
        terms.append((null_test if eq.missing else not_null_test, []))
    return terms


_DATE_RE = re.compile(
    r"(\d{4})(?:-(\d\d)(?:-(\d\d)(?:[Tt](\d\d):(\d\d)(?::(\d\d)(\.\d+)?)?"
    r"([Zz]|[+-]\d\d:\d\d)?)?)?)?",
    re.ASCII,  # \d is 0-9 only: int() would read "٢٠٢٥" as 2025
)
_PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb")
_END_OF_TIME = "~"


def _instant(value: datetime) -> str:
    return timestamps.format_instant(value)


def parse_date_range(name: str, text: str) -> tuple[str, str]:
    """The [start, end) range of a FHIR date search value, as stored-instant text."""
    m = _DATE_RE.fullmatch(text)
    if m is None:
        raise ValidationError.single(
            name,
            "is not a date or date-time",
            text,
            "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.sss]][Z|+hh:mm]",
        )
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    tz = UTC
    if zone and zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise ValidationError.single(name, "has an impossible offset", text)
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        start = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or ".0")[1:4].ljust(3, "0")) * 1000,
            tzinfo=tz,
        )
    except ValueError:
        raise ValidationError.single(name, "is not a real calendar date", text) from None
    try:
        if month is None:
            end = start.replace(year=start.year + 1)
        elif day is None:
            end = (
                start.replace(year=start.year + 1, month=1)
                if start.month == 12
                else start.replace(month=start.month + 1)
            )
        else:
            if hour is None:
                end = start + timedelta(days=1)
            elif second is None:
                end = start + timedelta(minutes=1)
            elif fraction is None:
                end = start + timedelta(seconds=1)
            else:
                end = start + timedelta(milliseconds=1)
        end_text = _instant(end)
    except (ValueError, OverflowError):
        end_text = _END_OF_TIME
    try:
        start_text = _instant(start)
    except (ValueError, OverflowError):
        raise ValidationError.single(name, "is out of range", text) from None
    return start_text, end_text


def _split_prefix(name: str, text: str) -> tuple[str, str]:
    if len(text) >= 2 and text[:2].isalpha():
        prefix = text[:2]
        if prefix not in _PREFIXES:
            raise ValidationError.single(
                name, f"has an unknown prefix {prefix!r}", text, ", ".join(_PREFIXES)
            )
        return prefix, text[2:]
    return "eq", text


def _date_term(column: str, prefix: str, lo: str, hi: str) -> tuple[str, list[object]]:
    """A date filter's term, its bounds written into the SQL as literals.

    Every connection plans a statement once, whatever is bound to it (the planner
    stability guarantee, ``storage.connection.plan_once``); a range's plan depends on
    how many rows it spans (seek the column's index, or walk the sort's index and
    test), so the planner must see the bounds. They are normalised instants
    (:func:`parse_date_range`), so the SQL stays safe, and a repeated range reuses its
    cached statement.
    """
    # NULL never compares true; only the due key turns a missing end into '~'.
    due_guard = "period_end IS NOT NULL AND " if column == DUE_KEY else ""
    lo, hi = sql_literal(lo), sql_literal(hi)
    if prefix == "eq":
        return f"({column} >= {lo} AND {column} < {hi})", []
    if prefix == "ne":
        return f"({due_guard}({column} < {lo} OR {column} >= {hi}))", []
    if prefix in ("lt", "eb"):
        return f"{column} < {lo}", []
    if prefix == "le":
        return f"{column} < {hi}", []
    if prefix in ("gt", "sa"):
        return f"({due_guard}{column} >= {hi})", []
    return f"({due_guard}{column} >= {lo})", []  # ge


def sql_literal(value: str | int) -> str:
    """``value`` as an SQL literal, for a value the planner must see (see
    :func:`_date_term`); only the library's own normalised values and enum members."""
    if isinstance(value, int):
        return str(int(value))
    return "'" + value.replace("'", "''") + "'"


def _parse_date(name: str, column: str, raw: object) -> tuple[str, list[object], object]:
    """(sql, params, canonical form) of one date filter."""
    if isinstance(raw, datetime):
        raw = _instant_of(name, raw)
    if isinstance(raw, Mapping):
        if not raw:
            raise ValidationError.single(name, "an empty mapping matches everything", raw)
        parts: list[str] = []
        params: list[object] = []
        canonical: list[list[str]] = []
        for prefix, value in raw.items():
            if prefix not in _PREFIXES:
                raise ValidationError.single(
                    name, f"has an unknown prefix {prefix!r}", raw, ", ".join(_PREFIXES)
                )
            if isinstance(value, datetime):
                value = _instant_of(name, value)
            if not isinstance(value, str):
                raise ValidationError.single(
                    f"{name}.{prefix}", "expected a date string", value, "e.g. 2025-02-01"
                )
            lo, hi = parse_date_range(f"{name}.{prefix}", value)
            sql, p = _date_term(column, prefix, lo, hi)
            parts.append(sql)
            params.extend(p)
            canonical.append([prefix, lo, hi])
        return " AND ".join(parts), params, sorted(canonical)
    alternatives: list[tuple[str, list[object]]] = []
    canonical = []
    for item in _split(name, raw, allow_none=False):
        if isinstance(item, datetime):
            item = _instant_of(name, item)
        if not isinstance(item, str):
            raise ValidationError.single(
                name, f"expected a date string, not {type(item).__name__}", item
            )
        prefix, text = _split_prefix(name, item.strip())
        lo, hi = parse_date_range(name, text)
        alternatives.append(_date_term(column, prefix, lo, hi))
        canonical.append([prefix, lo, hi])
    if len(alternatives) == 1:
        return alternatives[0][0], alternatives[0][1], canonical
    sql = "(" + " OR ".join(a for a, _ in alternatives) + ")"
    return sql, [p for _, ps in alternatives for p in ps], sorted(canonical)


def _instant_of(name: str, value: datetime) -> str:
    try:
        return timestamps.format_instant(value)
    except ValueError as exc:
        raise ValidationError.single(name, str(exc), value) from None


def _parse_refs(name: str, raw: object) -> tuple[tuple[str, str], list[object], list[str]]:
    values: list[str] = []
    for v in _split(name, raw, allow_none=False):
        if not isinstance(v, str) or not is_valid_id(v):
            raise ValidationError.single(name, "is not a well-formed id", v, ID_PATTERN)
        values.append(v)
    values = sorted(set(values))
    marks = ", ".join("?" * len(values))
    return ("task_refs", f"kind = '{name}' AND ref IN ({marks})"), list(values), values


def _parse_io(
    name: str, raw: object
) -> tuple[tuple[str, str], list[object], list[list[str | None]]]:
    items: list[Any] = [raw] if isinstance(raw, Mapping) else _split(name, raw, allow_none=False)
    pairs: set[tuple[str, str | None]] = set()
    for item in items:
        if isinstance(item, Mapping):
            unknown = sorted(_key_text(k) for k in item if k not in ("type", "value"))
            if unknown or "type" not in item:
                raise ValidationError.single(
                    name, "expected {'type': ..., 'value': ...}", item, "type, value"
                )
            kind, value = item["type"], item.get("value")
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, int):
                if abs(value) > 2**53:  # beyond every valueInteger and exact valueDecimal
                    raise ValidationError.single(
                        f"{name}.value",
                        "is larger than any stored value",
                        value,
                        "|value| <= 2**53",
                    )
                value = str(value)
        elif isinstance(item, str):
            kind, sep, rest = item.partition("|")
            value = rest if sep else None
        else:
            raise ValidationError.single(
                name, f"expected 'type' or 'type|value', not {type(item).__name__}", item
            )
        kind = _check_text_value(f"{name}.type", kind, TEXT_LIMITS["type"])
        if value is not None:
            value = _check_text_value(f"{name}.value", value, TEXT_LIMITS["valueString"])
        pairs.add((kind, value))
    ordered = sorted(pairs, key=lambda p: (p[0], p[1] is not None, p[1] or ""))
    alternatives: list[str] = []
    params: list[object] = []
    for kind, value in ordered:
        if value is None:
            alternatives.append("type = ?")
            params.append(kind)
        else:
            alternatives.append("(type = ? AND value = ?)")
            params.extend((kind, value))
    where = f"direction = '{name}' AND ({' OR '.join(alternatives)})"
    return ("task_io", where), params, [[k, v] for k, v in ordered]


def _is_word_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LNM" or unicodedata.category(ch) == "Co"


def text_words(text: str) -> list[str]:
    """The words of a text search: runs of letters, digits and marks."""
    words: list[str] = []
    current: list[str] = []
    for ch in text:
        if _is_word_char(ch):
            current.append(ch)
        elif current:
            words.append("".join(current))
            current = []
    if current:
        words.append("".join(current))
    return words


def _parse_text(raw: object) -> tuple[str, list[object], list[str]]:
    text = _check_text_value("text", raw, _MAX_TEXT)
    words = text_words(text)
    if not words:
        raise ValidationError.single(
            "text", "has no letters or digits to search for", text, "one or more words"
        )
    if len(words) > _MAX_WORDS:
        raise ValidationError.single(
            "text", f"has {len(words)} words", text, f"at most {_MAX_WORDS}"
        )
    # Each word becomes a quoted prefix phrase: FTS5 syntax in user text is literal.
    query = " ".join('"' + w.replace('"', '""') + '"*' for w in words)
    sql = "seq IN (SELECT rowid FROM task_text WHERE task_text MATCH ?)"
    return sql, [query], [w.casefold() for w in words]


def _parse_flag(name: str, raw: object) -> bool:
    if isinstance(raw, str) and raw in ("true", "false"):
        raw = raw == "true"
    if not isinstance(raw, bool):
        raise ValidationError.single(name, "expected true or false", raw, "true, false")
    return raw


def _parse_sort(raw: object) -> list[tuple[str, bool]]:
    """[(wire key, descending)] from "-a,b" or ["-a", "b"]."""
    if isinstance(raw, str):
        items: list[Any] = raw.split(",")
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        raise ValidationError.single(
            "sort", "expected 'key,-key' or a list of keys", raw, ", ".join(SORT_KEYS)
        )
    keys: list[tuple[str, bool]] = []
    for item in items:
        if not isinstance(item, str):
            raise ValidationError.single("sort", "expected a sort key string", item)
        item = item.strip()
        descending = item.startswith("-")
        key = item[1:] if descending else item
        if key not in SORT_KEYS:
            raise ValidationError.single(
                "sort", f"unknown sort key {key!r}", raw, ", ".join(SORT_KEYS)
            )
        if any(k == key for k, _ in keys):
            raise ValidationError.single("sort", f"sort key {key!r} is given twice", raw)
        keys.append((key, descending))
    if not keys:
        raise ValidationError.single("sort", "is empty", raw, ", ".join(SORT_KEYS))
    return keys


_ASCII_DIGITS = re.compile(r"[0-9]{1,18}", re.ASCII)


def _limit(raw: object) -> int:
    """``limit`` as an int, also from query-string text of ASCII digits.

    ``str.isdigit()`` is no test for that: it is true for "²" and "٣", which int()
    refuses or reads as another number.
    """
    if isinstance(raw, bool) or not isinstance(raw, int):
        if isinstance(raw, str) and _ASCII_DIGITS.fullmatch(raw):
            raw = int(raw)
        else:
            raise ValidationError.single(
                "limit", "expected an integer (ASCII digits)", raw, f"1..{MAX_LIMIT}"
            )
    assert isinstance(raw, int)
    if not 1 <= raw <= MAX_LIMIT:
        raise ValidationError.single("limit", "is out of range", raw, f"1..{MAX_LIMIT}")
    return raw


# --- cursors ------------------------------------------------------------------------


def _encode_cursor(fingerprint: str, key: list[object]) -> str:
    raw = json.dumps({"q": fingerprint, "k": key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: object, fingerprint: str, kinds: list[bool]) -> list[object]:
    """The key of the last row seen; ``kinds`` says which parts are ints (then the id)."""
    if not isinstance(cursor, str) or len(cursor) > 4096:
        raise ValidationError.single("cursor", "is not a cursor from this search", cursor)
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(data, dict):
            raise ValueError("bad cursor shape")
        fp, key = data["q"], data["k"]
    except (ValueError, KeyError, TypeError, RecursionError):
        # RecursionError: "[[[[..." nests deeper than json.loads can follow (~2,900
        # brackets fit in the 4,096-character cap).
        raise ValidationError.single(
            "cursor", "is not a cursor issued by this store", cursor
        ) from None
    if fp != fingerprint:
        raise ValidationError.single(
            "cursor",
            "belongs to a different search (other filters or sort)",
            cursor,
            "the nextCursor of a page of this same search",
        )
    expected = [*kinds, False]
    if not (
        isinstance(key, list)
        and len(key) == len(expected)
        and all(_is_key_part(k, is_int) for k, is_int in zip(key, expected, strict=True))
        and isinstance(key[-1], str)
        and is_valid_id(key[-1])
    ):
        raise ValidationError.single("cursor", "is not a cursor issued by this store", cursor)
    return list(key)


def _is_key_part(part: object, is_int: bool) -> bool:
    """Whether ``part`` is a sort key value a row can have (and SQLite can bind).

    The only integer key is the priority rank, 0-4; text keys are instants, statuses,
    the due key's ``'~'`` or an id: short, valid Unicode, no NUL.
    """
    if is_int:
        return type(part) is int and 0 <= part <= _NO_PRIORITY
    if not isinstance(part, str) or len(part) > 64 or "\x00" in part:
        return False
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _keyset(exprs: list[str], sql_desc: list[bool], key: list[object]) -> tuple[str, list[object]]:
    """Rows strictly after ``key`` in the order (exprs, directions)."""
    if all(sql_desc) or not any(sql_desc):
        op = "<" if sql_desc[0] else ">"
        marks = ", ".join("?" * len(exprs))
        return f"({', '.join(exprs)}) {op} ({marks})", list(key)
    # Mixed directions: a leading bound the index can seek, then the exact predicate.
    ors: list[str] = []
    params: list[object] = []
    for i, expr in enumerate(exprs):
        eqs = [f"{e} = ?" for e in exprs[:i]]
        op = "<" if sql_desc[i] else ">"
        ors.append("(" + " AND ".join([*eqs, f"{expr} {op} ?"]) + ")")
        params.extend(key[: i + 1])
    lead = "<=" if sql_desc[0] else ">="
    return f"{exprs[0]} {lead} ? AND ({' OR '.join(ors)})", [key[0], *params]


# --- compiler -----------------------------------------------------------------------


def _record(
    canonical: dict[str, object], name: str, parsed: tuple[str, list[object], object]
) -> tuple[str, list[object]]:
    canonical[name] = parsed[2]
    return parsed[0], parsed[1]


class _Uncachable(Exception):
    """A filter value the compile cache does not key on (see :func:`_frozen`)."""


def _frozen(value: object, depth: int = 0) -> Hashable:
    """A hashable stand-in for a filter value that equals another's only when the two
    compile alike: every level carries its exact type (``True``, ``1`` and ``"1"``, a
    list and a tuple, stay apart) and mappings keep their order. Values of any other
    type (sets, whose order may differ between equal sets; floats; datetimes; str
    subclasses) raise :class:`_Uncachable`, as does nesting deeper than any filter's
    (a mapping of lists of mappings) so that a self-containing list is no problem.
    """
    if depth > 3:
        raise _Uncachable
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return (kind, value)
    if kind is list or kind is tuple:
        return (kind, tuple([_frozen(v, depth + 1) for v in value]))  # type: ignore[attr-defined]
    if kind is dict:
        items = value.items()  # type: ignore[attr-defined]
        return (kind, tuple([(_frozen(k, depth + 1), _frozen(v, depth + 1)) for k, v in items]))
    raise _Uncachable


def _thawed(frozen: Hashable) -> object:
    """The value :func:`_frozen` stands for (an equal copy of the same types)."""
    kind: type
    value: Any
    kind, value = frozen  # type: ignore[misc]
    if kind is list or kind is tuple:
        return kind(_thawed(v) for v in value)
    if kind is dict:
        return {_thawed(k): _thawed(v) for k, v in value}
    return value


#: How many compiled searches the cache keeps (the least recently used go first).
COMPILE_CACHE_SIZE = 256


@functools.lru_cache(maxsize=COMPILE_CACHE_SIZE)
def _compile_frozen(
    key: tuple[tuple[Hashable, Hashable], ...],
) -> tuple[CompiledSearch, str | None]:
    merged: dict[str, object] = {_thawed(k): _thawed(v) for k, v in key}  # type: ignore[misc]
    shape = _shape_of(key)
    if shape is not None:
        return _compile_shaped(shape, merged), None
    return _compile_search(merged)


def compile_search(merged: Mapping[str, object]) -> tuple[CompiledSearch, str | None]:
    """Compile wire-form filters (plus sort, paging and total) into SQL.

    Returns the compiled query and the cursor to resume after (``None`` on page one).
    Unknown names and bad values raise :class:`ValidationError` naming them.

    Compiling is pure (the same filters give the same SQL and parameters), so a search
    that repeats (a test suite's, an app's list screen) is served from a small LRU
    cache keyed on the exact filters; only successful compiles are kept, so bad input
    is checked, and refused, on every call exactly as without the cache. A miss whose
    filters are all single-value equality filters (``patientId="pt_7"``) reuses the
    SQL compiled for its shape (see :func:`_shape_of`) and binds its values.
    """
    # Never cached: ``overdue`` holds the current time, and a cursor is used once
    # (caching each page's would only evict the entries that repeat).
    if "overdue" in merged or "cursor" in merged:
        return _compile_search(merged)
    try:
        key = tuple([(_frozen(name), _frozen(raw)) for name, raw in merged.items()])
    except _Uncachable:
        return _compile_search(merged)
    return _compile_frozen(key)


def _shape_of(key: tuple[tuple[Hashable, Hashable], ...]) -> tuple[Hashable, ...] | None:
    """The shape of a search whose filters are all equality filters with one text value
    each (``patientId="pt_1"``), beside any limit, sort and total: the filter names in
    order, with the values of limit/sort/total (they shape the SQL). None for any other
    search (those are cached on their exact filters), and for a filter whose value is a
    literal in the SQL (:data:`_FINITE_KINDS`): its SQL differs from value to value."""
    shape: list[Hashable] = []
    for name_key, value_key in key:
        name = name_key[1]  # type: ignore[index]
        if name in FILTERS:
            kind: type
            value: Any
            kind, value = value_key  # type: ignore[misc]
            if kind is not str or "," in value or FILTERS[name].kind in _FINITE_KINDS:
                return None
            shape.append(name)
        elif name in ("limit", "sort", "total"):
            shape.append((name, value_key))
        else:
            return None
    return tuple(shape)


@attrs.frozen
class _Shaped:
    """A compiled search of one shape (see :func:`_shape_of`) and how to rebind it."""

    template: CompiledSearch
    #: The equality filters' specs, in the order their values are bound (FILTERS order).
    bound: tuple[tuple[str, _Field], ...]
    #: The canonical JSON text :func:`_fingerprint` hashes, around the values: a str is
    #: text, an int the index in ``bound`` of the value that goes there.
    canonical: tuple[str | int, ...]


def _canonical_text(parts: tuple[str | int, ...], values: tuple[object, ...]) -> str:
    """The canonical JSON of a shaped search's values (what ``json.dumps`` would write)."""
    return "".join(p if isinstance(p, str) else json.dumps(values[p]) for p in parts)


#: Placeholder values of each kind of equality filter, to compile a shape's template.
_PLACEHOLDER = {"id": "x", "text": "x"}


@functools.lru_cache(maxsize=COMPILE_CACHE_SIZE)
def _shaped(shape: tuple[Hashable, ...]) -> _Shaped | None:
    """The template of ``shape``, compiled on placeholder values; None when its SQL does
    not bind exactly the equality values in FILTERS order then the page size (it
    always does today: the check keeps a later change of the compiler honest)."""
    merged: dict[str, object] = {}
    for part in shape:
        if isinstance(part, str):
            spec = FILTERS[part]
            merged[part] = _PLACEHOLDER[spec.kind]
        else:
            name: str
            frozen: Hashable
            name, frozen = part  # type: ignore[misc]
            merged[name] = _thawed(frozen)
    template, _ = _compile_search(merged)
    bound = tuple((name, FILTERS[name]) for name in FILTERS if name in merged)
    values = tuple(_check_value(name, spec, merged[name]) for name, spec in bound)
    if (
        template.page_params != (*values, template.limit + 1)
        or template.count_params != values
        or template.dense is not None
    ):
        return None
    sort = _parse_sort(merged["sort"]) if "sort" in merged else [("authoredOn", True)]
    canonical_sort = [[k, d] for k, d in sort]
    index = {name: i for i, (name, _) in enumerate(bound)}
    parts: list[str | int] = ["{"]
    for n, key in enumerate(sorted([*index, "sort"])):
        parts.append(", " if n else "")
        if key == "sort":
            parts.append(f'"sort": {json.dumps(canonical_sort)}')
        else:
            parts.extend([f"{json.dumps(key)}: [[", index[key], "], [], null]"])
    parts.append("}")
    canonical: dict[str, object] = {
        name: [(v,), (), None] for (name, _), v in zip(bound, values, strict=True)
    }
    canonical["sort"] = canonical_sort
    if _canonical_text(tuple(parts), values) != json.dumps(canonical, sort_keys=True, default=str):
        return None
    return _Shaped(template, bound, tuple(parts))


def _compile_shaped(shape: tuple[Hashable, ...], merged: Mapping[str, object]) -> CompiledSearch:
    """Compile a search of a cacheable shape: its template with these values bound.

    The values are checked by the same function, in the same order (the filters'
    order), as a full compile checks them, so a bad one raises the same error; the rest
    of the search (limit, sort, total) is part of the shape, which compiled once (a
    shape that does not compile is left to a full compile, which refuses it).
    """
    try:
        shaped = _shaped(shape)
    except ValidationError:
        shaped = None  # a bad limit, sort or total: refused below, exactly as ever
    if shaped is None:
        return _compile_search(merged)[0]
    # The rest of the search compiled: the first bad value in order is the error.
    checked = {}
    for name, raw in merged.items():
        spec = FILTERS.get(name)
        if spec is not None:
            checked[name] = _check_value(name, spec, raw)
    values = tuple(checked[name] for name, _ in shaped.bound)
    text = _canonical_text(shaped.canonical, values)
    t = shaped.template
    return CompiledSearch(
        t.page_sql,
        (*values, t.limit + 1),
        t.count_sql,
        values,
        t.limit,
        hashlib.sha256(text.encode()).hexdigest()[:16],
        t.total,
        t.key_count,
        t.dense,
        t.bounded_count_sql,
        t.dense_factor,
    )


def _fingerprint(canonical: Mapping[str, object]) -> str:
    """The fingerprint a cursor carries: of the canonical filters and sort."""
    text = json.dumps(canonical, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compile_search(merged: Mapping[str, object]) -> tuple[CompiledSearch, str | None]:
    """:func:`compile_search` without the cache."""
    terms: list[tuple[str, list[object]]] = []
    equalities: dict[str, _Equality] = {}
    canonical: dict[str, object] = {}
    limit = DEFAULT_LIMIT
    cursor: object = None
    total = False
    sort = [("authoredOn", True)]
    side: list[tuple[int, str, str, list[object]]] = []  # membership terms
    date_walk: tuple[int, str, list[object]] | None = None  # periodStart, walkable
    text_at = -1  # index of the text term in terms
    for name, raw in merged.items():
        if name == "limit":
            limit = _limit(raw)
        elif name == "cursor":
            cursor = raw
        elif name == "total":
            total = _parse_flag("total", raw)
        elif name == "sort":
            sort = _parse_sort(raw)
        elif name in FILTERS:
            eq = _parse_equality(name, FILTERS[name], raw)
            equalities[name] = eq
            canonical[name] = [eq.include, eq.exclude, eq.missing]
        elif name in DATE_FILTERS:
            if name == "periodStart":
                # The same term on +period_start, which no index can seek: the dense
                # variant walks tasks_by_authored and tests the range on its entries.
                walked = _parse_date(name, "+period_start", raw)
                date_walk = (len(terms), walked[0], walked[1])
            terms.append(_record(canonical, name, _parse_date(name, DATE_FILTERS[name], raw)))
        elif name in _REFS or name in _IO:
            (table, side_where), side_params, canon = (
                _parse_refs(name, raw) if name in _REFS else _parse_io(name, raw)
            )
            canonical[name] = canon
            side.append((len(terms), table, side_where, side_params))
            terms.append((f"seq IN (SELECT seq FROM {table} WHERE {side_where})", side_params))
        elif name == "text":
            text_at = len(terms)
            terms.append(_record(canonical, name, _parse_text(raw)))
        elif name == "dueBefore":
            if isinstance(raw, datetime):
                raw = _instant_of(name, raw)
            if not isinstance(raw, str):
                raise ValidationError.single(name, "expected a date or date-time", raw)
            lo, _ = parse_date_range(name, raw)
            terms.append((f"{DUE_KEY} < {sql_literal(lo)} AND {_NOT_TERMINAL}", []))
            canonical[name] = lo
        elif name == "overdue":
            if not _parse_flag(name, raw):
                raise ValidationError.single(
                    name, "only overdue=true is a filter", raw, "true (or leave it out)"
                )
            # A literal, as a date range's bounds are (see _date_term): bound, the
            # planner took tasks_open_by_due and a temp b-tree for the default sort.
            terms.append((f"{DUE_KEY} < {sql_literal(timestamps.now())} AND {_NOT_TERMINAL}", []))
            canonical[name] = True
        else:
            raise ValidationError.single(name, "is not a search filter", raw, ", ".join(_ALL_NAMES))

    # Sort: SQL expressions and directions, then the id tie-breaker.
    exprs = [SORT_KEYS[k].expr for k, _ in sort]
    sql_desc = [desc != SORT_KEYS[k].inverted for k, desc in sort]
    kinds = [SORT_KEYS[k].is_int for k, _ in sort]
    exprs.append("id")
    sql_desc.append(sort[-1][1])  # ties by id, in the wire direction of the last key
    canonical["sort"] = [[k, d] for k, d in sort]
    fingerprint = _fingerprint(canonical)

    # Equality filters: one any-of may become UNION ALL arms (ordered index merge).
    uniform = all(sql_desc) or not any(sql_desc)
    served = _ORDERED_INDEXES.get(tuple(exprs[:-1]), frozenset()) if uniform else frozenset()
    expand: str | None = None
    for name, eq in equalities.items():
        arms = _equality_arms(eq)
        if expand is None and len(arms) > 1 and len(arms) <= _MAX_ARMS and eq.spec.column in served:
            expand = name
    for name in FILTERS:  # a fixed order: the same filters give the same SQL
        eq_or_none = equalities.get(name)
        if eq_or_none is None:
            continue
        terms.extend(_equality_rest(eq_or_none))
        if name == expand:
            continue
        arms = _equality_arms(eq_or_none)
        if len(arms) == 1:
            terms.append(arms[0])
        elif arms:
            include = eq_or_none.include or ()
            non_null = [v for v in include if v is not None]
            col = eq_or_none.spec.column
            parts = []
            if eq_or_none.literal:  # a finite domain's values: never NULL
                literals = ", ".join(sql_literal(v) for v in non_null)  # type: ignore[arg-type]
                parts.append(f"{col} IN ({literals})")
                non_null = []
            elif non_null:
                parts.append(f"{col} IN ({', '.join('?' * len(non_null))})")
            if None in include:
                parts.append(f"{col} IS NULL")
            terms.append(("(" + " OR ".join(parts) + ")", non_null))
    arm_list: list[tuple[str, list[object]]] = (
        _equality_arms(equalities[expand]) if expand is not None else []
    )

    where = [t for t, _ in terms]
    params: list[object] = [p for _, ps in terms for p in ps]
    count_where = list(where)
    count_params = list(params)
    if arm_list:
        count_where.append("(" + " OR ".join(a for a, _ in arm_list) + ")")
        count_params.extend(p for _, ps in arm_list for p in ps)
    count_sql = f"SELECT count(*) FROM tasks WHERE {' AND '.join(count_where) or '1'}"
    bounded_count_sql = (
        f"SELECT count(*) FROM (SELECT 1 FROM tasks WHERE {' AND '.join(count_where) or '1'} "
        "LIMIT ?)"
    )

    after: str | None = None
    if cursor is not None:
        key = _decode_cursor(cursor, fingerprint, kinds)
        keyset_sql, keyset_params = _keyset(exprs, sql_desc, key)
        where.append(keyset_sql)
        params.extend(keyset_params)
        after = str(key[-1])

    def assemble(where: list[str], params: list[object]) -> tuple[str, tuple[object, ...]]:
        columns = ", ".join(["body", *exprs])
        if not arm_list:
            order = ", ".join(
                f"{e} {'DESC' if d else 'ASC'}" for e, d in zip(exprs, sql_desc, strict=True)
            )
            sql = (
                f"SELECT {columns} FROM tasks WHERE {' AND '.join(where) or '1'} "
                f"ORDER BY {order} LIMIT ?"
            )
            return sql, (*params, limit + 1)
        selects = []
        page_params: list[object] = []
        for arm_sql, arm_params in arm_list:
            selects.append(f"SELECT {columns} FROM tasks WHERE {' AND '.join([arm_sql, *where])}")
            page_params.extend([*arm_params, *params])
        order = ", ".join(f"{i + 2} {'DESC' if d else 'ASC'}" for i, d in enumerate(sql_desc))
        return f"{' UNION ALL '.join(selects)} ORDER BY {order} LIMIT ?", (*page_params, limit + 1)

    page_sql, page_params = assemble(where, params)
    dense: tuple[str, tuple[object, ...], str, tuple[object, ...]] | None = None
    if len(side) == 1 and "text" not in canonical:
        # When many tasks match, walking the sort order and probing membership per
        # task beats looking up and sorting every match: page_query() picks.
        index, table, side_where, side_params = side[0]
        dense_where = list(where)
        # A scalar subquery, not EXISTS: SQLite would turn EXISTS into a join with a
        # Bloom filter built over every match, which is the cost this avoids.
        dense_where[index] = (
            f"(SELECT 1 FROM {table} AS m WHERE m.seq = tasks.seq AND {side_where} "
            "LIMIT 1) IS NOT NULL"
        )
        probe = f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {side_where} LIMIT ?)"
        dense = (probe, tuple(side_params), *assemble(dense_where, params))
    elif (
        text_at >= 0
        and not side
        and uniform
        and tuple(exprs[:-1]) in _WALKABLE_SORTS
        and all(_ASCII_WORD.fullmatch(w) for w in canonical["text"])  # type: ignore[attr-defined]
    ):
        # A common word: walk the sort order and probe each task's text (exact terms).
        words: list[str] = list(canonical["text"])  # type: ignore[call-overload]
        probe, probe_params, match_sql, match_params = _dense_text(words)
        dense_where = list(where)
        dense_where[text_at] = (
            f"(SELECT 1 FROM task_text WHERE task_text MATCH {match_sql} "
            "AND rowid = tasks.seq) IS NOT NULL"
        )
        # The MATCH expression's parameters come first in the text term's place.
        before = sum(len(p) for _, p in terms[:text_at])
        dense_params = [*params[:before], *match_params, *params[before + 1 :]]
        dense = (probe, probe_params, *assemble(dense_where, dense_params))
    elif (
        date_walk is not None
        and not side
        and not arm_list
        and "text" not in canonical
        and exprs == ["authored_on", "id"]
    ):
        # A periodStart range matching many tasks under the default sort: walk
        # tasks_by_authored (which carries period_start) instead of sorting every match.
        index, walked_sql, _walked_params = date_walk
        original_sql, original_params = terms[index]
        dense_where = list(where)
        dense_where[index] = walked_sql
        probe = f"SELECT count(*) FROM (SELECT 1 FROM tasks WHERE {original_sql} LIMIT ?)"
        dense = (probe, tuple(original_params), *assemble(dense_where, params))
    compiled = CompiledSearch(
        page_sql,
        page_params,
        count_sql,
        tuple(count_params),
        limit,
        fingerprint,
        total,
        len(exprs),
        dense,
        bounded_count_sql,
        DENSE_FACTOR if date_walk is None or text_at >= 0 or side else DATE_WALK_FACTOR,
    )
    return compiled, after


#: Sorts an index delivers in order, for the dense text walk (a walk under any other
#: sort would probe every task before sorting).
_WALKABLE_SORTS = {("authored_on",), ("last_modified",), (DUE_KEY,)}
_ASCII_WORD = re.compile(r"[a-z0-9]+")
#: A text word whose prefix is the start of more vocabulary terms than this is left to
#: the sparse plan (one FTS5 OR-query of that many exact terms per probe is too many).
_MAX_TERMS = 64
#: The exact index terms a word is the prefix of, as an FTS5 OR-query: the word itself
#: (which matches nothing when it is no term) OR every longer term it starts. A prefix
#: query ("lipid"*) cannot seek a rowid, its exact terms can. task_text_terms is the
#: fts5vocab view of task_text; it reads the whole doclist of every term it yields, so
#: the range starts just after the word (``word || char(0)``: no term holds a NUL) and
#: the word's own doclist, a third of all tasks for a common word, is never read there.
_TERMS_OR = (
    "(SELECT '(\"' || ? || '\"' || ifnull(group_concat(' OR \"' || replace(term, '\"', "
    "'\"\"') || '\"', ''), '') || ')' FROM task_text_terms WHERE term >= ? AND term < ?)"
)
#: A word's estimated documents: those of its longer terms (fts5vocab's doc counts) plus
#: those of the word itself, counted by a bounded FTS5 query of the exact term (it stops
#: at the threshold, ``?{t}``); 0 when the word starts more than _MAX_TERMS terms.
_TERM_DOCS = (
    "(SELECT CASE WHEN n + (e > 0) > {limit} THEN 0 ELSE s + e END FROM (SELECT count(*) AS n, "
    "ifnull(sum(doc), 0) AS s, (SELECT count(*) FROM (SELECT 1 FROM task_text WHERE task_text "
    "MATCH ?{m} LIMIT ?{t})) AS e FROM (SELECT doc FROM task_text_terms WHERE term >= ?{lo} "
    "AND term < ?{hi} LIMIT {over})))"
)


def _dense_text(words: list[str]) -> tuple[str, tuple[object, ...], str, list[object]]:
    """(probe sql, its params, MATCH expression sql, its params) for lowercase ASCII words.

    The probe estimates the matches: the fewest documents of any word (the sum over its
    exact terms; 0 when it has too many terms), capped at the threshold page_query
    binds last (the probe numbers its parameters, as the threshold is used per word).
    The MATCH expression ANDs, per word, the OR of its exact terms.
    """
    # (word, just after it, just after every term it starts): [lo, hi) are its longer terms.
    ranges = [(w, w + "\x00", w[:-1] + chr(ord(w[-1]) + 1)) for w in words]
    threshold = 3 * len(words) + 1
    docs = [
        _TERM_DOCS.format(
            limit=_MAX_TERMS,
            over=_MAX_TERMS + 1,
            m=3 * i + 1,
            lo=3 * i + 2,
            hi=3 * i + 3,
            t=threshold,
        )
        for i in range(len(words))
    ]
    probe = f"SELECT min({', '.join(docs)}, ?{threshold})"
    probe_params = tuple(p for w, lo, hi in ranges for p in (f'"{w}"', lo, hi))
    match_sql = "(" + " || ' AND ' || ".join([_TERMS_OR] * len(words)) + ")"
    match_params: list[object] = [p for w_lo_hi in ranges for p in w_lo_hi]
    return probe, probe_params, match_sql, match_params


#: A membership filter matching at least max(DENSE_MIN_MATCHES, isqrt(DENSE_FACTOR * n))
#: of n tasks is served by walking the sort order (about limit * n / matches probes)
#: rather than by sorting every match.
DENSE_MIN_MATCHES = 256
DENSE_FACTOR = 64
#: The factor for a periodStart walk (an index entry compared per task, no probe):
#: measured at 200k tasks, the walk beats sorting the matches from ~1,000 of them.
DATE_WALK_FACTOR = 4


def page_query(
    compiled: CompiledSearch, scalar: Callable[[str, tuple[object, ...]], int]
) -> tuple[str, tuple[object, ...]]:
    """The page SQL and parameters to run; ``scalar`` runs a one-number query."""
    if compiled.dense is None:
        return compiled.page_sql, compiled.page_params
    probe_sql, probe_params, dense_sql, dense_params = compiled.dense
    size = scalar("SELECT ifnull(max(seq), 0) FROM tasks", ())
    threshold = max(DENSE_MIN_MATCHES, math.isqrt(compiled.dense_factor * size))
    if scalar(probe_sql, (*probe_params, threshold)) >= threshold:
        return dense_sql, dense_params
    return compiled.page_sql, compiled.page_params


def next_cursor(compiled: CompiledSearch, last_row: tuple[Any, ...]) -> str:
    """The opaque cursor that resumes ``compiled`` after ``last_row``."""
    return _encode_cursor(compiled.fingerprint, list(last_row[1 : 1 + compiled.key_count]))
