"""The search compiler: wire-form filters -> one parameterised, index-served SQL query.

Filter names are the wire's camelCase names (``patientId=``), with snake_case
spellings accepted beside them (``patient_id=``). Values arrive as they would in the
remote service's query string: a string, a comma-separated string or a list meaning
"any of". Column names in SQL come only from the allow-list below; every value is a
bound parameter.

Results are ordered newest ``authoredOn`` first, then by id (descending), and paged
with keyset cursors: the cursor holds the (authoredOn, id) of the last row seen, so a
page at any depth is one index seek, and tasks added between pages neither repeat nor
push others out. A cursor carries a fingerprint of its query and is refused by any other.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import attrs

from .codec import TEXT_LIMITS
from .errors import ValidationError
from .ids import ID_PATTERN, is_valid_id
from .model import TaskPriority, TaskStatus

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "CompiledSearch", "compile_search", "normalise_filters"]

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
_MAX_VALUES = 100

_STATUS_VALUES = frozenset(s.value for s in TaskStatus)
_PRIORITY_VALUES = frozenset(p.value for p in TaskPriority)


@attrs.frozen
class _Field:
    column: str
    kind: str  # "id" | "enum" | "text"
    allowed: frozenset[str] = frozenset()


#: Filter name (wire) -> column and value kind. The only column names dynamic SQL uses.
FILTERS: Mapping[str, _Field] = {
    "patientId": _Field("patient_id", "id"),
    "ownerId": _Field("owner_id", "id"),
    "requesterId": _Field("requester_id", "id"),
    "status": _Field("status", "enum", _STATUS_VALUES),
    "priority": _Field("priority", "enum", _PRIORITY_VALUES),
    "code": _Field("code", "text"),
}
_ALIASES = {"patient_id": "patientId", "owner_id": "ownerId", "requester_id": "requesterId"}
_PAGING_KEYS = ("limit", "cursor")


@attrs.frozen
class CompiledSearch:
    """A page query, the count query over the same filters, and their parameters."""

    page_sql: str
    page_params: tuple[object, ...]
    count_sql: str
    count_params: tuple[object, ...]
    limit: int
    fingerprint: str


def normalise_filters(
    filters: Mapping[str, object] | None, keywords: Mapping[str, object]
) -> dict[str, object]:
    """One mapping of wire names from a positional mapping plus keyword arguments."""
    merged: dict[str, object] = {}
    for source in (filters or {}, keywords):
        if not isinstance(source, Mapping):
            raise ValidationError.single(
                "filters", "expected a mapping of filter names to values", source
            )
        for key, value in source.items():
            name = _ALIASES.get(key, key)
            if name in merged:
                raise ValidationError.single(name, "is given twice", value)
            merged[name] = value
    return merged


def _values(name: str, spec: _Field, raw: object) -> list[str]:
    if isinstance(raw, str):
        values = raw.split(",")
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
    out: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ValidationError.single(
                name, f"expected a string, not {type(value).__name__}", value
            )
        if spec.kind == "id" and not is_valid_id(value):
            raise ValidationError.single(name, "is not a well-formed id", value, ID_PATTERN)
        if spec.kind == "enum" and value not in spec.allowed:
            raise ValidationError.single(
                name, "is not an allowed value", value, ", ".join(sorted(spec.allowed))
            )
        if spec.kind == "text":
            if not value or len(value) > TEXT_LIMITS.get(name, 1024) or "\x00" in value:
                raise ValidationError.single(
                    name, "is not an acceptable value", value, "1-256 characters, no NUL"
                )
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValidationError.single(name, "is not valid Unicode", value) from None
        out.append(value)
    return sorted(set(out))


def _limit(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        if isinstance(raw, str) and raw.isdigit():
            raw = int(raw)
        else:
            raise ValidationError.single("limit", "expected an integer", raw, f"1..{MAX_LIMIT}")
    assert isinstance(raw, int)
    if not 1 <= raw <= MAX_LIMIT:
        raise ValidationError.single("limit", "is out of range", raw, f"1..{MAX_LIMIT}")
    return raw


def _encode_cursor(fingerprint: str, key: tuple[str, str]) -> str:
    raw = json.dumps({"q": fingerprint, "k": list(key)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: object, fingerprint: str) -> tuple[str, str]:
    if not isinstance(cursor, str) or len(cursor) > 512:
        raise ValidationError.single("cursor", "is not a cursor from this search", cursor)
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        key = data["k"]
        if not (
            isinstance(data, dict)
            and isinstance(key, list)
            and len(key) == 2
            and all(isinstance(k, str) for k in key)
        ):
            raise ValueError("bad cursor shape")
    except (ValueError, KeyError, TypeError):
        raise ValidationError.single(
            "cursor", "is not a cursor issued by this store", cursor
        ) from None
    if data.get("q") != fingerprint:
        raise ValidationError.single(
            "cursor",
            "belongs to a different search (other filters or sort)",
            cursor,
            "the nextCursor of a page of this same search",
        )
    return key[0], key[1]


def compile_search(merged: Mapping[str, object]) -> tuple[CompiledSearch, str | None]:
    """Compile wire-form filters (plus ``limit`` and ``cursor``) into SQL.

    Returns the compiled query and the cursor to resume after (``None`` on page one).
    Unknown names and bad values raise :class:`ValidationError` naming them.
    """
    where: list[str] = []
    params: list[object] = []
    canonical: dict[str, list[str]] = {}
    limit = DEFAULT_LIMIT
    cursor: object = None
    for name, raw in merged.items():
        if name == "limit":
            limit = _limit(raw)
            continue
        if name == "cursor":
            cursor = raw
            continue
        spec = FILTERS.get(name)
        if spec is None:
            raise ValidationError.single(
                name,
                "is not a search filter",
                raw,
                ", ".join([*FILTERS, *_PAGING_KEYS]),
            )
        values = _values(name, spec, raw)
        canonical[name] = values
        if len(values) == 1:
            where.append(f"{spec.column} = ?")
        else:
            where.append(f"{spec.column} IN ({', '.join('?' * len(values))})")
        params.extend(values)

    fingerprint = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]
    count_where = " AND ".join(where) if where else "1"
    count_sql = f"SELECT count(*) FROM tasks WHERE {count_where}"
    count_params = tuple(params)
    after: str | None = None
    if cursor is not None:
        authored_on, task_id = _decode_cursor(cursor, fingerprint)
        where.append("(authored_on, id) < (?, ?)")
        params.extend((authored_on, task_id))
        after = task_id
    page_where = " AND ".join(where) if where else "1"
    page_sql = (
        f"SELECT body, authored_on, id FROM tasks WHERE {page_where} "
        "ORDER BY authored_on DESC, id DESC LIMIT ?"
    )
    params.append(limit + 1)
    compiled = CompiledSearch(page_sql, tuple(params), count_sql, count_params, limit, fingerprint)
    return compiled, after


def next_cursor(compiled: CompiledSearch, last_row: tuple[Any, ...]) -> str:
    """The opaque cursor that resumes ``compiled`` after ``last_row``."""
    return _encode_cursor(compiled.fingerprint, (last_row[1], last_row[2]))
