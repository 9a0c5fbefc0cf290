"""The wire paths of a Task, derived from the model: one list for every test to share.

The paths come from the attrs fields of :class:`clinik_local.Task` (and of the classes
it nests) renamed by the codec's :func:`clinik_local.codec.wire_name`; a list or tuple
field gives ``name`` and ``name[0]``, a nested class gives ``name.field``, and the
typed value of an input/output gives one ``value<Kind>`` key per
:class:`clinik_local.ValueKind`. A field added to the model shows up here (and so in
the fuzz suite) without anyone writing it down; ``tests/test_model.py`` pins the
top-level names against the fields of seed-api.md.
"""

from __future__ import annotations

import typing
from typing import Any

import attrs

from clinik_local import Task, ValueKind
from clinik_local.codec import wire_name

#: Store-managed fields: the store sets them, a create or update may not.
BOOKKEEPING = ("versionId", "lastModified")


def _attrs_class(annotation: Any) -> type | None:
    """The attrs class inside ``X``, ``X | None`` or ``tuple[X, ...]``, if any."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and attrs.has(candidate):
            return candidate
    return None


def _is_sequence(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (tuple, list)


def _paths(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    carries_kind = any(hints[f.name] is ValueKind for f in attrs.fields(cls))
    for field in attrs.fields(cls):
        annotation = hints[field.name]
        if annotation is ValueKind:
            continue  # says which value<Kind> key the value travels under; no key itself
        if carries_kind and field.name == "value":
            out.extend(prefix + kind.wire_key for kind in ValueKind)
            continue
        path = prefix + wire_name(field.name)
        out.append(path)
        item = path
        if _is_sequence(annotation):
            item = f"{path}[0]"
            out.append(item)
            annotation = typing.get_args(annotation)[0]
        nested = _attrs_class(annotation)
        if nested is not None:
            out.extend(_paths(nested, f"{item}."))
    return out


#: Every wire path of a task, top-level fields, list items and nested fields alike
#: (``id``, ``input``, ``input[0]``, ``input[0].type``, ``input[0].valueString``, ...).
WIRE_PATHS: tuple[str, ...] = tuple(_paths(Task, ""))

#: The top-level wire fields of a task, in model order.
WIRE_FIELDS: tuple[str, ...] = tuple(p for p in WIRE_PATHS if "." not in p and "[" not in p)

#: What a create request may carry: every path but the store-managed ones.
REQUEST_PATHS: tuple[str, ...] = tuple(p for p in WIRE_PATHS if p not in BOOKKEEPING)
