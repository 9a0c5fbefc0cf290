"""The wire codec: camelCase request mappings <-> :class:`~clinik_local.model.Task`.

One cattrs converter, owned by this module (never the global one), renames fields
snake_case <-> camelCase, forbids unknown keys, and structures through strict leaf
hooks: no silent coercion (``"priority": 3`` is an error, not ``"3"``). All problems of
one request are collected (cattrs detailed validation) and reported together in one
:class:`~clinik_local.errors.ValidationError` whose items carry wire paths
(``executionPeriod.end``, ``input[1].valueString``).

Documented normalisation, so that ``encode(decode(request))`` equals the request
after it:

* date-times become UTC ``YYYY-MM-DDTHH:MM:SS.sssZ`` (sub-millisecond digits dropped);
* ``authoredOn`` is set to now when absent;
* absent optional fields, ``null`` fields and empty lists are omitted;
* ``restriction.recipient``, ``basedOn`` ... are lists on the wire, tuples in Python;
* every text (``note``, ``code``, ``businessStatus``, input/output ``type`` and
  ``valueString``/``valueCode`` ...) is stored in Unicode normal form C (NFC): "é"
  typed as ``e`` + U+0301 (macOS keyboards, some EHR exports) is the same text as the
  single character U+00E9, so it must be the same stored text, matched by the same
  equality filter (:mod:`clinik_local.search` normalises filter values alike), and
  an update that only respells a text is no change. NFC is canonically equivalent
  (renders and reads the same) and the form the W3C recommends for exchanged text.

Size limits (characters, items) are in :data:`TEXT_LIMITS` and :data:`MAX_LIST_ITEMS`;
a text's limit applies to its NFC form. The whole task is limited too: its wire form
(the compact UTF-8 JSON the sync engine sends) is at most :data:`MAX_WIRE_BYTES`, the
remote service's request cap, so the store never accepts a task it could never deliver.

Mapping keys are the wire (camelCase) names; a snake_case spelling of a field
(``patient_id``) is refused naming its wire name, as any unknown key is.
"""

from __future__ import annotations

import json
import math
import threading
import types
import unicodedata
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from .errors import FieldError, ValidationError
from .errors import shorten as _shorten
from .ids import ID_PATTERN, is_valid_id, new_task_id
from .model import (
    Period,
    Restriction,
    Task,
    TaskInputOutput,
    TaskIntent,
    TaskPriority,
    TaskStatus,
    ValueKind,
)
from .timestamps import InstantError, parse_instant
from .wire import loads

if TYPE_CHECKING:
    import cattrs

    #: The library's one cattrs converter (built on first use: see ``__getattr__``).
    converter: cattrs.Converter

__all__ = [
    "MAX_LIST_ITEMS",
    "MAX_WIRE_BYTES",
    "TEXT_LIMITS",
    "converter",
    "decode_task",
    "encode_task",
    "task_from_stored",
    "tasks_from_bodies",
    "wire_name",
    "wire_size",
]

#: Longest accepted text, in characters, per wire field.
TEXT_LIMITS: Mapping[str, int] = {
    "statusReason": 1024,
    "businessStatus": 1024,
    "code": 256,
    "description": 16384,
    "reasonCode": 1024,
    "note": 16384,
    "type": 256,
    "valueString": 16384,
    "valueCode": 256,
}
#: Most items accepted in any list field (basedOn, partOf, input, output, recipient).
MAX_LIST_ITEMS = 100
#: Largest wire form of one task, in bytes of compact UTF-8 JSON: the remote service's
#: request cap (1 MiB, sync-protocol "Size"; a larger body is answered 413).
MAX_WIRE_BYTES = 1_048_576
#: valueInteger is a FHIR integer: signed 32-bit.
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1

_T = TypeVar("_T")


class _Invalid(Exception):
    """Problems found by a leaf hook: (relative path, message, value, allowed) each."""

    def __init__(self, problems: list[tuple[str, str, object, str | None]]) -> None:
        super().__init__(problems)
        self.problems = problems


def _invalid(message: str, value: object, allowed: str | None = None) -> _Invalid:
    return _Invalid([("", message, value, allowed)])


def wire_name(attribute: str) -> str:
    """The camelCase wire name of a snake_case attribute."""
    head, *rest = attribute.split("_")
    return head + "".join(part.title() for part in rest)


# --- leaf checks (return the accepted value or raise _Invalid) -------------------------


#: NFC can shrink a text to a third (or less) of its length; longer input is refused
#: before it is normalised, so no one makes the codec normalise megabytes.
_NFC_SHRINK = 4


def _check_text(value: object, limit: int) -> str:
    """The text in NFC, or _Invalid: not a string, too long (in NFC), NUL, lone surrogate."""
    if type(value) is not str:
        if not isinstance(value, str):
            raise _invalid(f"expected a string, not {type(value).__name__}", value, "text")
        value = str.__str__(value)
    if len(value) > limit and (value.isascii() or len(value) > _NFC_SHRINK * limit):
        raise _invalid(f"is {len(value)} characters long", value, f"at most {limit} characters")
    if "\x00" in value:
        raise _invalid("contains a NUL character", value, "text without NUL")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _invalid(
                "is not valid Unicode (lone surrogate)", value, "valid Unicode"
            ) from None
        if not unicodedata.is_normalized("NFC", value):
            value = unicodedata.normalize("NFC", value)
        if len(value) > limit:
            raise _invalid(
                f"is {len(value)} characters long in Unicode normal form C (NFC)",
                value,
                f"at most {limit} characters",
            )
    return value


def _check_id(value: object) -> str:
    if type(value) is not str:
        if not isinstance(value, str):
            raise _invalid(f"expected an id string, not {type(value).__name__}", value, ID_PATTERN)
        value = str.__str__(value)
    if not is_valid_id(value):
        raise _invalid("is not a well-formed id", value, ID_PATTERN)
    return value


def _check_instant(value: object) -> str:
    try:
        return parse_instant(value)
    except InstantError as exc:
        raise _invalid(str(exc), value, "ISO-8601 date-time with timezone") from None


def _check_enum(enum_type: type[_T], choices: str) -> Callable[[object, Any], _T]:
    members: dict[str, _T] = {m.value: m for m in enum_type}  # type: ignore[attr-defined]

    def check(value: object, _: Any) -> _T:
        if isinstance(value, str):
            member = members.get(value)
            if member is not None:
                return member
            raise _invalid("is not an allowed value", value, choices)
        raise _invalid(f"expected a string, not {type(value).__name__}", value, choices)

    return check


def _optional(check: Callable[[object], _T]) -> Callable[[object, Any], _T | None]:
    def hook(value: object, _: Any) -> _T | None:
        return None if value is None else check(value)

    return hook


def _required(check: Callable[[object], _T]) -> Callable[[object, Any], _T]:
    def hook(value: object, _: Any) -> _T:
        if value is None:
            raise _invalid("is required and cannot be null", value)
        return check(value)

    return hook


def _check_list(value: object, item: Callable[[object], _T], what: str) -> tuple[_T, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise _invalid(f"expected a list, not {type(value).__name__}", value, f"a list of {what}")
    if len(value) > MAX_LIST_ITEMS:
        raise _invalid(f"has {len(value)} items", "[...]", f"at most {MAX_LIST_ITEMS} items")
    out: list[_T] = []
    problems: list[tuple[str, str, object, str | None]] = []
    for index, element in enumerate(value):
        try:
            out.append(item(element))
        except _Invalid as exc:
            problems.extend((f"[{index}]{p}", m, v, a) for p, m, v, a in exc.problems)
    if problems:
        raise _Invalid(problems)
    return tuple(out)


def _id_list(value: object, _: Any) -> tuple[str, ...]:
    return _check_list(value, _check_id, "ids")


_PERIOD_KEYS = frozenset({"start", "end"})


def _check_period(value: object) -> Period:
    if type(value) is dict and value.keys() <= _PERIOD_KEYS:
        # Fast path for the common shape; on any problem the full check below reports it.
        start, end = value.get("start"), value.get("end")
        try:
            start = None if start is None else parse_instant(start)
            end = None if end is None else parse_instant(end)
        except InstantError:
            pass
        else:
            if start is None or end is None or start <= end:
                return Period(start, end)
    if not isinstance(value, Mapping):
        raise _invalid(f"expected an object, not {type(value).__name__}", value, "{start?, end?}")
    problems: list[tuple[str, str, object, str | None]] = []
    got: dict[str, str | None] = {"start": None, "end": None}
    for key, raw in value.items():
        if key not in got:
            problems.append((f".{key}", "unknown field", raw, "start, end"))
            continue
        if raw is None:
            continue
        try:
            got[key] = _check_instant(raw)
        except _Invalid as exc:
            problems.extend((f".{key}{p}", m, v, a) for p, m, v, a in exc.problems)
    start, end = got["start"], got["end"]
    if start is not None and end is not None and start > end:
        problems.append((".end", "is before start", end, f"an instant at or after {start}"))
    if problems:
        raise _Invalid(problems)
    return Period(start, end)


_TYPE_LIMIT = TEXT_LIMITS["type"]
_VALUE_KEYS = {kind.wire_key: kind for kind in ValueKind}
_VALUE_KEYS_TEXT = ", ".join(_VALUE_KEYS)


def _check_value(kind: ValueKind, value: object) -> str | bool | int | float:
    if kind is ValueKind.STRING:
        return _check_text(value, TEXT_LIMITS["valueString"])
    if kind is ValueKind.CODE:
        code = _check_text(value, TEXT_LIMITS["valueCode"])
        if not code.strip():
            raise _invalid("is blank", value, "a non-empty code")
        return code
    if kind is ValueKind.REFERENCE:
        return _check_id(value)
    if kind is ValueKind.DATETIME:
        return _check_instant(value)
    if kind is ValueKind.BOOLEAN:
        if type(value) is not bool:
            raise _invalid(f"expected true or false, not {type(value).__name__}", value, "boolean")
        return value
    if kind is ValueKind.INTEGER:
        if type(value) is not int:
            raise _invalid(f"expected an integer, not {type(value).__name__}", value, "integer")
        if not _INT_MIN <= value <= _INT_MAX:
            raise _invalid("is out of range", value, f"{_INT_MIN}..{_INT_MAX}")
        return value
    # DECIMAL: a JSON number, kept as given (int or float); never bool, NaN or infinity.
    if type(value) not in (int, float):
        raise _invalid(f"expected a number, not {type(value).__name__}", value, "decimal number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid("is not a finite number", value, "finite decimal number")
    if isinstance(value, int) and abs(value) > 2**53:
        raise _invalid("is too large to keep exactly", value, "|value| <= 2**53")
    return value  # type: ignore[return-value]


def _check_input_output(value: object) -> TaskInputOutput:
    if type(value) is dict and len(value) == 2 and "type" in value:
        # Fast path for the common, well-formed shape; any problem falls through to the
        # full check below, which reports every error with its path.
        for key, raw in value.items():
            kind = _VALUE_KEYS.get(key)
            if kind is not None:
                try:
                    return TaskInputOutput(
                        _check_text(value["type"], _TYPE_LIMIT), _check_value(kind, raw), kind
                    )
                except _Invalid:
                    break
    if not isinstance(value, Mapping):
        raise _invalid(f"expected an object, not {type(value).__name__}", value, "{type, value[x]}")
    problems: list[tuple[str, str, object, str | None]] = []
    type_: str | None = None
    found: list[tuple[ValueKind, object]] = []
    for key, raw in value.items():
        if key == "type":
            try:
                if raw is None:
                    raise _invalid("is required and cannot be null", raw)
                type_ = _check_text(raw, _TYPE_LIMIT)
            except _Invalid as exc:
                problems.extend((".type" + p, m, v, a) for p, m, v, a in exc.problems)
        elif key in _VALUE_KEYS:
            found.append((_VALUE_KEYS[key], raw))
        else:
            problems.append((f".{key}", "unknown field", raw, "type, " + _VALUE_KEYS_TEXT))
    if "type" not in value:
        problems.append((".type", "is required", None, "a type code"))
    result: str | bool | int | float | None = None
    kind = ValueKind.STRING
    if len(found) != 1:
        given = ", ".join(k.wire_key for k, _ in found) or "none"
        problems.append(("", f"needs exactly one value[x], found {given}", None, _VALUE_KEYS_TEXT))
    else:
        kind, raw = found[0]
        try:
            result = _check_value(kind, raw)
        except _Invalid as exc:
            problems.extend(("." + kind.wire_key + p, m, v, a) for p, m, v, a in exc.problems)
    if problems:
        raise _Invalid(problems)
    assert type_ is not None
    assert result is not None
    return TaskInputOutput(type_, result, kind)


def _io_list(value: object, _: Any) -> tuple[TaskInputOutput, ...]:
    return _check_list(value, _check_input_output, "{type, value[x]} objects")


def _check_restriction(value: object) -> Restriction:
    if not isinstance(value, Mapping):
        raise _invalid(
            f"expected an object, not {type(value).__name__}",
            value,
            "{repetitions?, period?, recipient?}",
        )
    problems: list[tuple[str, str, object, str | None]] = []
    repetitions: int | None = None
    period: Period | None = None
    recipient: tuple[str, ...] = ()
    for key, raw in value.items():
        try:
            if key == "repetitions":
                if raw is not None:
                    if type(raw) is not int:
                        raise _invalid(
                            f"expected an integer, not {type(raw).__name__}", raw, "integer >= 1"
                        )
                    if not 1 <= raw <= _INT_MAX:
                        raise _invalid("must be at least 1", raw, f"1..{_INT_MAX}")
                    repetitions = raw
            elif key == "period":
                period = None if raw is None else _check_period(raw)
            elif key == "recipient":
                recipient = _id_list(raw, None)
            else:
                raise _Invalid([("", "unknown field", raw, "repetitions, period, recipient")])
        except _Invalid as exc:
            problems.extend((f".{key}{p}", m, v, a) for p, m, v, a in exc.problems)
    if problems:
        raise _Invalid(problems)
    return Restriction(repetitions, period, recipient)


# --- the converter ---------------------------------------------------------------------

# cattrs (its import and the generated structure/unstructure functions) costs tens of
# milliseconds: built on the first decode or encode, not on `import clinik_local`.

_ID_FIELDS = ("id", "focus_id", "patient_id", "encounter_id", "requester_id", "owner_id")
_TEXT_FIELDS = ("status_reason", "business_status", "code", "description", "reason_code", "note")
_INSTANT_FIELDS = ("last_modified",)


def _text_hook(name: str) -> Callable[[object, Any], str | None]:
    limit = TEXT_LIMITS[wire_name(name)]

    def hook(value: object, _: Any) -> str | None:
        return None if value is None else _check_text(value, limit)

    return hook


def _version_hook(value: object, _: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 64:
        raise _invalid("expected a version string", value, "1-64 characters")
    return value


_STATUS_CHOICES = ", ".join(s.value for s in TaskStatus)
_INTENT_CHOICES = ", ".join(s.value for s in TaskIntent)
_PRIORITY_CHOICES = ", ".join(s.value for s in TaskPriority)
_status_hook = _check_enum(TaskStatus, _STATUS_CHOICES)
_intent_hook = _check_enum(TaskIntent, _INTENT_CHOICES)
_priority_enum_hook = _check_enum(TaskPriority, _PRIORITY_CHOICES)


def _required_enum(hook: Callable[[object, Any], _T]) -> Callable[[object, Any], _T]:
    def check(value: object, t: Any) -> _T:
        if value is None:
            raise _invalid("is required and cannot be null", value)
        return hook(value, t)

    return check


def _optional_enum(hook: Callable[[object, Any], _T]) -> Callable[[object, Any], _T | None]:
    def check(value: object, t: Any) -> _T | None:
        return None if value is None else hook(value, t)

    return check


def _structure_overrides() -> dict[str, Any]:
    from cattrs.gen import override

    overrides: dict[str, Any] = {
        "status": override(rename="status", struct_hook=_required_enum(_status_hook)),
        "intent": override(rename="intent", struct_hook=_required_enum(_intent_hook)),
        "priority": override(struct_hook=_optional_enum(_priority_enum_hook)),
        "authored_on": override(
            rename="authoredOn", struct_hook=_required(_check_instant), omit_if_default=False
        ),
        "version_id": override(rename="versionId", struct_hook=_version_hook),
        "execution_period": override(
            rename="executionPeriod", struct_hook=_optional(_check_period)
        ),
        "based_on": override(rename="basedOn", struct_hook=_id_list),
        "part_of": override(rename="partOf", struct_hook=_id_list),
        "input": override(struct_hook=_io_list),
        "output": override(struct_hook=_io_list),
        "restriction": override(struct_hook=_optional(_check_restriction)),
    }
    for _name in _ID_FIELDS:
        overrides[_name] = override(rename=wire_name(_name), struct_hook=_optional(_check_id))
    for _name in _TEXT_FIELDS:
        overrides[_name] = override(rename=wire_name(_name), struct_hook=_text_hook(_name))
    for _name in _INSTANT_FIELDS:
        overrides[_name] = override(rename=wire_name(_name), struct_hook=_optional(_check_instant))
    return overrides


def _unstructure_io(io: TaskInputOutput) -> dict[str, object]:
    return {"type": io.type, io.kind.wire_key: io.value}


def _unstructure_period(period: Period) -> dict[str, object]:
    out: dict[str, object] = {}
    if period.start is not None:
        out["start"] = period.start
    if period.end is not None:
        out["end"] = period.end
    return out


def _unstructure_restriction(r: Restriction) -> dict[str, object]:
    out: dict[str, object] = {}
    if r.repetitions is not None:
        out["repetitions"] = r.repetitions
    if r.period is not None:
        out["period"] = _unstructure_period(r.period)
    if r.recipient:
        out["recipient"] = list(r.recipient)
    return out


def _unstructure_ios(items: tuple[TaskInputOutput, ...]) -> list[dict[str, object]]:
    return [_unstructure_io(i) for i in items]


def _enum_value(member: TaskStatus | TaskIntent | TaskPriority) -> str:
    value: str = member._value_  # the plain wire string (faster than the .value property)
    return value


_unstruct_hooks: dict[str, Callable[[Any], Any]] = {
    "status": _enum_value,
    "intent": _enum_value,
    "priority": _enum_value,
    "based_on": list,
    "part_of": list,
    "input": _unstructure_ios,
    "output": _unstructure_ios,
}


@attrs.frozen
class _Codec:
    """The converter and the two generated functions the entry points call."""

    converter: cattrs.Converter
    structure: Callable[[Mapping[str, object], type[Task]], Task]
    unstructure: Callable[[Task], dict[str, Any]]
    class_validation_error: type[Exception]
    #: wire key -> (attribute, structure hook): the same hooks ``structure`` calls, for
    #: :func:`_structure_plain` (a request with no problem, checked at a fraction of
    #: the cost of cattrs' detailed validation).
    hooks: Mapping[str, tuple[str, Callable[[object, Any], object]]]
    #: The attributes a request must carry (no default).
    required: frozenset[str]


_codec: _Codec | None = None
_codec_lock = threading.Lock()


def _get_codec() -> _Codec:
    """The codec, built once (thread-safe) on first use."""
    codec = _codec
    return codec if codec is not None else _build_codec()


def _build_codec() -> _Codec:
    global _codec
    with _codec_lock:
        if _codec is not None:
            return _codec
        import cattrs
        from cattrs.errors import ClassValidationError
        from cattrs.fns import identity
        from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

        converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
        overrides = _structure_overrides()
        structure = make_dict_structure_fn(Task, converter, **overrides)
        converter.register_unstructure_hook(TaskInputOutput, _unstructure_io)
        converter.register_unstructure_hook(Period, _unstructure_period)
        converter.register_unstructure_hook(Restriction, _unstructure_restriction)
        # A ``str | None`` field is written as it is (None is the default, so omitted):
        # cattrs inlines an identity hook as a plain attribute read, where its own
        # optional hook would be two calls per field present.
        attrs.resolve_types(Task)
        plain = {a.name for a in attrs.fields(Task) if a.type == str | None}
        unstructure_overrides: dict[str, Any] = {
            name: override(
                rename=ov.rename,
                omit_if_default=ov.omit_if_default,
                unstruct_hook=identity if name in plain else _unstruct_hooks.get(name),
            )
            for name, ov in overrides.items()
        }
        unstructure = make_dict_unstructure_fn(
            Task, converter, _cattrs_omit_if_default=True, **unstructure_overrides
        )
        converter.register_unstructure_hook(Task, unstructure)
        hooks = {(ov.rename or name): (name, ov.struct_hook) for name, ov in overrides.items()}
        assert set(overrides) == {a.name for a in attrs.fields(Task)}  # a hook for each
        required = frozenset(a.name for a in attrs.fields(Task) if a.default is attrs.NOTHING)
        _codec = _Codec(converter, structure, unstructure, ClassValidationError, hooks, required)
        return _codec


def __getattr__(name: str) -> object:
    if name == "converter":  # the library's one cattrs converter; prefer decode/encode_task
        return _get_codec().converter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- errors: cattrs' exception tree -> FieldErrors with wire paths ------------------------


def _collect(exc: BaseException, path: str, out: list[FieldError]) -> None:
    from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

    if isinstance(exc, ClassValidationError):
        for sub in exc.exceptions:
            notes = [n for n in getattr(sub, "__notes__", []) if hasattr(n, "name")]
            if notes:
                _collect(sub, _join(path, wire_name(notes[-1].name)), out)
            else:
                _collect(sub, path, out)
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(map(_key_text, exc.extra_fields)):
            wire = _WIRE_OF_ATTRIBUTE.get(key) if not path else None
            if wire is not None:
                message = f"is the Python attribute name; the wire name is {wire!r}"
                out.append(FieldError(_join(path, key), message, None, wire))
            else:
                out.append(FieldError(_join(path, key), "unknown field", None, _TOP_FIELDS))
    elif isinstance(exc, _Invalid):
        for rel, message, value, allowed in exc.problems:
            shown = None if value is None else _shorten(value)
            out.append(FieldError(path + rel, message, shown, allowed))
    elif isinstance(exc, KeyError):
        out.append(FieldError(path, "is required", None, _REQUIRED_ALLOWED.get(path)))
    else:
        out.append(FieldError(path or "$", f"is invalid: {exc}", None, None))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _key_text(key: object) -> str:
    """A mapping key as it appears in an error path (any key, printable or not)."""
    return key if isinstance(key, str) else _shorten(key)


_TOP_FIELDS = ", ".join(sorted(wire_name(a.name) for a in attrs.fields(Task)))
#: snake_case attribute -> its wire name, for the attributes whose spellings differ.
_WIRE_OF_ATTRIBUTE = {
    a.name: wire_name(a.name) for a in attrs.fields(Task) if wire_name(a.name) != a.name
}
_REQUIRED_ALLOWED = {"status": _STATUS_CHOICES, "intent": _INTENT_CHOICES}


# --- public entry points -----------------------------------------------------------------


def decode_task(request: Mapping[str, object]) -> Task:
    """Validate a wire-form request mapping and return the Task it describes.

    Raises :class:`ValidationError` listing every problem (wire paths), including the
    invariants that span fields: a task is not ``partOf`` itself and ``lastModified``
    is not before ``authoredOn``; and a task whose wire form is over
    :data:`MAX_WIRE_BYTES` (path ``$``), which the service could never accept. Texts
    come back in NFC (see the module docstring).
    """
    if type(request) is not dict and not isinstance(request, Mapping):  # (dict: no ABC check)
        raise ValidationError.single(
            "$", f"a task request must be a mapping, not {type(request).__name__}", request
        )
    codec = _get_codec()
    task = _structure_plain(codec, request) if type(request) is dict else None
    if task is None:
        task = _structure_detailed(codec, request)
    problems = _invariant_problems(task)
    if problems:
        raise ValidationError(problems)
    size = _oversize(task)
    if size is not None:
        raise ValidationError(
            [
                FieldError(
                    "$",
                    f"the task's wire form is {size:,} bytes",
                    None,
                    f"at most {MAX_WIRE_BYTES:,} bytes (the service's request limit)",
                )
            ]
        )
    return task


def _structure_plain(codec: _Codec, request: dict[Any, object]) -> Task | None:
    """The Task of a request with no problem, or None when anything is wrong with it.

    The same leaf hooks as cattrs' generated function, called for the keys present
    only, without its per-attribute error bookkeeping. On any problem (an unknown key,
    a required field missing, a hook or the class refusing a value) the caller runs
    :func:`_structure_detailed`, which reports every problem as it always has: the
    hooks are pure, so they refuse the same values again.
    """
    hooks = codec.hooks
    values: dict[str, object] = {}
    try:
        for key, value in request.items():
            entry = hooks.get(key)
            if entry is None:
                return None
            values[entry[0]] = entry[1](value, None)
        if not codec.required.issubset(values):
            return None
        return Task(**values)  # type: ignore[arg-type]
    except Exception:
        return None


def _structure_detailed(codec: _Codec, request: Mapping[str, object]) -> Task:
    """Structure with cattrs' detailed validation: every problem, with its wire path."""
    try:
        task: Task = codec.structure(request, Task)
    except (codec.class_validation_error, _Invalid) as exc:
        problems: list[FieldError] = []
        _collect(exc, "", problems)
        raise ValidationError(problems) from None
    return task


#: Bytes of a store-generated ``"id":"task_..."`` member, for a task decoded without one.
_GENERATED_ID_BYTES = len(json.dumps({"id": new_task_id()}, separators=(",", ":"))) - 2
#: Server-managed fields, which the sync engine leaves out of the body it sends.
_NOT_SENT = ("versionId", "lastModified")


def _size_bound(task: Task) -> int:
    """An upper bound of :func:`wire_size`, from character counts alone (no JSON).

    JSON with ``ensure_ascii=False`` spends at most 6 bytes on a character (a control
    character escaped as ``\\u00XX``; UTF-8 itself needs at most 4). Everything that is
    not free text is bounded by the field's size limit: ids and instants by 64
    characters, numbers by 24, member names and punctuation by 40 per member.
    """
    chars = 0
    for text in (
        task.status_reason,
        task.business_status,
        task.code,
        task.description,
        task.reason_code,
        task.note,
    ):
        if text is not None:
            chars += len(text)
    items = 0
    for io in (*task.input, *task.output):
        chars += len(io.type)
        if isinstance(io.value, str):
            chars += len(io.value)
        items += 1
    refs = len(task.based_on) + len(task.part_of)
    if task.restriction is not None:
        refs += len(task.restriction.recipient)
    return 6 * chars + 110 * items + 70 * refs + 4096


def wire_size(task: Task) -> int:
    """Bytes of the body the sync engine sends for ``task``: compact UTF-8 JSON.

    That is the wire form without the server-managed ``versionId``/``lastModified``,
    with an id (a task without one yet is counted with the id the store will generate,
    which has a fixed length).
    """
    wire = encode_task(task)
    for key in _NOT_SENT:
        wire.pop(key, None)
    size = len(json.dumps(wire, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return size if task.id is not None else size + 1 + _GENERATED_ID_BYTES


def _oversize(task: Task) -> int | None:
    """The task's :func:`wire_size` when it is over :data:`MAX_WIRE_BYTES`, else None.

    Cheap for ordinary tasks: the bound from character counts settles almost every
    task, and only one near the limit is serialised.
    """
    if _size_bound(task) <= MAX_WIRE_BYTES:
        return None
    size = wire_size(task)
    return size if size > MAX_WIRE_BYTES else None


def _invariant_problems(task: Task) -> list[FieldError]:
    problems: list[FieldError] = []
    if task.id is not None and task.id in task.part_of:
        index = task.part_of.index(task.id)
        problems.append(
            FieldError(f"partOf[{index}]", "a task cannot be part of itself", _shorten(task.id))
        )
    if task.last_modified is not None and task.last_modified < task.authored_on:
        problems.append(
            FieldError(
                "lastModified",
                "is before authoredOn",
                _shorten(task.last_modified),
                f"an instant at or after {task.authored_on}",
            )
        )
    return problems


def encode_task(task: Task) -> dict[str, Any]:
    """The wire (camelCase) mapping of a task; absent and empty fields are omitted."""
    out: dict[str, Any] = _get_codec().unstructure(task)
    return out


_STATUS_BY_VALUE = {m.value: m for m in TaskStatus}
_INTENT_BY_VALUE = {m.value: m for m in TaskIntent}
_PRIORITY_BY_VALUE = {m.value: m for m in TaskPriority}


def _io_from_stored(item: dict[str, Any]) -> TaskInputOutput:
    for key, value in item.items():
        if key != "type":
            return TaskInputOutput(item["type"], value, _VALUE_KEYS[key])
    raise AssertionError("stored input/output without a value")  # pragma: no cover


def _period_from_stored(d: dict[str, Any] | None) -> Period | None:
    return None if d is None else Period(d.get("start"), d.get("end"))


_EMPTY: tuple[Any, ...] = ()


def _slot_setters(cls: type) -> dict[str, Callable[[object, object], None]]:
    """Each attribute's slot setter (``member.__set__``) of a slotted attrs class.

    The same store into the slot that attrs' generated ``__init__`` makes (through
    ``object.__setattr__``, which the frozen ``__setattr__`` cannot stop), without
    looking the name up on the type for every field: about 40% of the cost of building
    a Task with caches cold. Only for classes whose ``__init__`` does nothing else (no
    validators, converters, post-init, or cached hash): checked here, once.
    """
    plain = not any(hasattr(cls, h) for h in ("__attrs_post_init__", "__attrs_pre_init__"))
    plain = plain and "__attrs_cached_hash" not in getattr(cls, "__slots__", ())
    setters: dict[str, Callable[[object, object], None]] = {}
    for a in attrs.fields(cls):
        member = cls.__dict__.get(a.name)
        if not plain or not isinstance(member, types.MemberDescriptorType):
            raise TypeError(f"{cls.__name__}.{a.name} is not a plain slot")
        if a.validator is not None or a.converter is not None or a.on_setattr is not None:
            raise TypeError(f"{cls.__name__}.{a.name} has a validator, converter or on_setattr")
        setters[a.name] = member.__set__
    return setters


_TASK_SLOTS = _slot_setters(Task)
_new_task = Task.__new__
_set_status = _TASK_SLOTS["status"]
_set_intent = _TASK_SLOTS["intent"]
_set_authored_on = _TASK_SLOTS["authored_on"]
_set_id = _TASK_SLOTS["id"]
_set_version_id = _TASK_SLOTS["version_id"]
_set_last_modified = _TASK_SLOTS["last_modified"]
_set_status_reason = _TASK_SLOTS["status_reason"]
_set_business_status = _TASK_SLOTS["business_status"]
_set_priority = _TASK_SLOTS["priority"]
_set_code = _TASK_SLOTS["code"]
_set_description = _TASK_SLOTS["description"]
_set_focus_id = _TASK_SLOTS["focus_id"]
_set_patient_id = _TASK_SLOTS["patient_id"]
_set_encounter_id = _TASK_SLOTS["encounter_id"]
_set_execution_period = _TASK_SLOTS["execution_period"]
_set_requester_id = _TASK_SLOTS["requester_id"]
_set_owner_id = _TASK_SLOTS["owner_id"]
_set_reason_code = _TASK_SLOTS["reason_code"]
_set_note = _TASK_SLOTS["note"]
_set_based_on = _TASK_SLOTS["based_on"]
_set_part_of = _TASK_SLOTS["part_of"]
_set_input = _TASK_SLOTS["input"]
_set_output = _TASK_SLOTS["output"]
_set_restriction = _TASK_SLOTS["restriction"]
if len(_TASK_SLOTS) != 24:  # pragma: no cover
    raise TypeError("task_from_stored sets 24 Task attributes: set the new one there too")


def task_from_stored(d: dict[str, Any]) -> Task:
    """Rebuild a Task from wire JSON that this library validated and stored itself.

    Skips validation: every stored body went through :func:`decode_task` on its way
    in, and checking it again would double the cost of every read. The Task is built
    as its ``__init__`` would (every attribute set, in its slot; see
    :func:`_slot_setters`), which is equal, hashes alike and is as frozen as one
    built by ``Task(...)``.
    """
    g = d.get
    priority = g("priority")
    period = g("executionPeriod")
    based_on = g("basedOn")
    part_of = g("partOf")
    inputs = g("input")
    outputs = g("output")
    restriction = g("restriction")
    task = _new_task(Task)
    _set_status(task, _STATUS_BY_VALUE[d["status"]])
    _set_intent(task, _INTENT_BY_VALUE[d["intent"]])
    _set_authored_on(task, d["authoredOn"])
    _set_id(task, g("id"))
    _set_version_id(task, g("versionId"))
    _set_last_modified(task, g("lastModified"))
    _set_status_reason(task, g("statusReason"))
    _set_business_status(task, g("businessStatus"))
    _set_priority(task, None if priority is None else _PRIORITY_BY_VALUE[priority])
    _set_code(task, g("code"))
    _set_description(task, g("description"))
    _set_focus_id(task, g("focusId"))
    _set_patient_id(task, g("patientId"))
    _set_encounter_id(task, g("encounterId"))
    _set_execution_period(
        task, None if period is None else Period(period.get("start"), period.get("end"))
    )
    _set_requester_id(task, g("requesterId"))
    _set_owner_id(task, g("ownerId"))
    _set_reason_code(task, g("reasonCode"))
    _set_note(task, g("note"))
    _set_based_on(task, tuple(based_on) if based_on else _EMPTY)
    _set_part_of(task, tuple(part_of) if part_of else _EMPTY)
    _set_input(task, tuple([_io_from_stored(i) for i in inputs]) if inputs else _EMPTY)
    _set_output(task, tuple([_io_from_stored(i) for i in outputs]) if outputs else _EMPTY)
    _set_restriction(
        task,
        None
        if restriction is None
        else Restriction(
            restriction.get("repetitions"),
            _period_from_stored(restriction.get("period")),
            tuple(restriction.get("recipient", ())),
        ),
    )
    return task


def tasks_from_bodies(bodies: list[str]) -> list[Task]:
    """Tasks from many stored wire-JSON bodies, parsed in one call (:func:`.wire.loads`)."""
    if not bodies:
        return []
    return [task_from_stored(d) for d in loads("[" + ",".join(bodies) + "]")]
