"""The wire's JSON text, and the fields only the server sets: spelled once, used everywhere.

:mod:`.codec` maps wire dicts to :class:`~clinik_local.model.Task` and back; this module
turns wire dicts into text (the store's ``body`` column, request bodies, the reference
server's answers), always the same compact UTF-8 way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["SERVER_FIELDS", "dumps", "loads_or_none", "without_server_fields"]

#: The Task fields the server (or the local store, for its own versions) manages: a
#: client never sends them, and a request that carries them has them ignored or refused.
SERVER_FIELDS: tuple[str, ...] = ("versionId", "lastModified")


#: ``json.dumps(value, ensure_ascii=False, separators=(",", ":"))`` builds this encoder
#: on every call; it holds no state between calls, so one serves every thread.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(value: object) -> str:
    """Compact JSON text, non-ASCII kept as is (the one way wire JSON is written)."""
    return _ENCODER.encode(value)


def without_server_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a wire task without :data:`SERVER_FIELDS`."""
    return {k: v for k, v in body.items() if k not in SERVER_FIELDS}


def loads_or_none(text: str | None) -> Any:
    """The JSON value in ``text``, or None when it is empty or not JSON (a server's
    answer body, a stored payload): callers check the shape they need."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
