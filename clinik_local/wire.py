"""The wire's JSON text, and the fields only the server sets: spelled once, used everywhere.

:mod:`.codec` maps wire dicts to :class:`~clinik_local.model.Task` and back; this module
turns wire dicts into text (the store's ``body`` column, request bodies, the reference
server's answers), always the same compact UTF-8 way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["SERVER_FIELDS", "dumps", "loads", "loads_or_none", "without_server_fields"]

#: The Task fields the server (or the local store, for its own versions) manages: a
#: client never sends them, and a request that carries them has them ignored or refused.
SERVER_FIELDS: tuple[str, ...] = ("versionId", "lastModified")


#: ``json.dumps(value, ensure_ascii=False, separators=(",", ":"))`` builds this encoder
#: on every call; it holds no state between calls, so one serves every thread.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


#: The C encoder ``_ENCODER.encode`` builds (through ``iterencode``) on every call, and
#: the settings it builds it with after the circular-reference table.
_C_MAKE_ENCODER: Callable[..., Callable[[object, int], Sequence[str]]] | None = getattr(
    json.encoder, "c_make_encoder", None
)
_C_ENCODER_SETTINGS = (
    _ENCODER.default,
    json.encoder.encode_basestring,  # ensure_ascii=False
    None,  # no indent
    _ENCODER.key_separator,
    _ENCODER.item_separator,
    _ENCODER.sort_keys,
    _ENCODER.skipkeys,
    _ENCODER.allow_nan,
)


def dumps(value: object) -> str:
    """Compact JSON text, non-ASCII kept as is (the one way wire JSON is written).

    What ``_ENCODER.encode`` does, less its Python layers: the same C encoder, built
    with a fresh circular-reference table per call as theirs is, so no state is shared
    between calls or threads (a third less with the CPU caches cold).
    """
    make = _C_MAKE_ENCODER
    if make is None:  # pragma: no cover - CPython always has the C accelerator
        return _ENCODER.encode(value)
    return "".join(make({}, *_C_ENCODER_SETTINGS)(value, 0))


def without_server_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a wire task without :data:`SERVER_FIELDS`."""
    return {k: v for k, v in body.items() if k not in SERVER_FIELDS}


#: The C scanner ``json.loads`` reaches through three Python layers (``loads``, ``decode``
#: and ``raw_decode``, with a whitespace regex before and after). Under the GIL it is
#: what every ``json.loads`` call in the process shares already.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def loads(text: str) -> Any:
    """``json.loads(text)``: the same value, or the same JSONDecodeError.

    A stored body (this library's own compact JSON, no surrounding whitespace) goes
    straight to json's C scanner, about half of ``json.loads``' cost: every search
    and get parses its bodies. Anything else the scanner does not take whole (a
    leading BOM or whitespace, trailing text, bad JSON) goes to ``json.loads``, which
    returns it or raises exactly as it always does.
    """
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    return value


def loads_or_none(text: str | None) -> Any:
    """The JSON value in ``text``, or None when it is empty or not JSON (a server's
    answer body, a stored payload): callers check the shape they need."""
    if not text:
        return None
    try:
        return loads(text)
    except ValueError:
        return None
