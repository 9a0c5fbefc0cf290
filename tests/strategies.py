"""Hypothesis strategies for clinik-local tests: valid wire-form task requests, and
single-field corruptions of them with the wire path the error must name.

``valid_requests()`` draws requests already in normalised form (canonical UTC
instants, no empty lists, NFC text), so ``encode_task(decode_task(r)) == r`` holds exactly.

The API, for every test module to share:

* ``valid_requests(with_id=False)``: valid wire-form create requests.
* ``searchable_requests()``: light valid requests (id, six search fields) for search.
* ``invalid_requests()``: ``(request, path)`` with exactly one field made invalid.
* ``CORRUPTIONS`` / ``set_path(request, path, value)``: the corruptions, and the helper
  that puts a value at a wire path (``input[1].valueString``).
* ``names_path(paths, path)``: whether a ValidationError's paths name ``path``.
* ``task_ids()``, ``small_ids(prefix)``, ``instants()``, ``texts()``, ``periods()``,
  ``input_outputs()``: the building blocks.
* ``minimal_request(**extra)``: the smallest valid request.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from clinik_local import TaskIntent, TaskPriority, TaskStatus

ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"

STATUSES = [s.value for s in TaskStatus]
INTENTS = [i.value for i in TaskIntent]
PRIORITIES = [p.value for p in TaskPriority]


def task_ids() -> st.SearchStrategy[str]:
    """Well-formed remote-service ids: 1-64 characters of [A-Za-z0-9_.-]."""
    return st.text(ID_ALPHABET, min_size=1, max_size=64)


def small_ids(prefix: str, count: int = 5) -> st.SearchStrategy[str]:
    """One of a few ids (``pt_0`` .. ``pt_4``), so filters and pairs hit often."""
    return st.sampled_from([f"{prefix}_{n}" for n in range(count)])


def instants() -> st.SearchStrategy[str]:
    """Canonical UTC instants between 2020 and 2030."""
    return st.datetimes(
        min_value=datetime(2020, 1, 1),
        max_value=datetime(2030, 12, 31),
        timezones=st.just(UTC),
    ).map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z")


def texts(max_size: int = 40) -> st.SearchStrategy[str]:
    """Printable text, including quotes, SQL and FTS metacharacters and non-ASCII.

    In Unicode normal form C, the form the codec stores (a decoded request equals the
    request only then); tests/test_hostile_input.py covers text in other forms.
    """
    return st.text(
        st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("'\"%_*;-()"),
        max_size=max_size,
    ).map(lambda text: unicodedata.normalize("NFC", text))


@st.composite
def periods(draw: st.DrawFn) -> dict[str, str]:
    """An executionPeriod with start <= end; either end may be absent."""
    first, second = sorted([draw(instants()), draw(instants())])
    shape = draw(st.sampled_from(["both", "start", "end"]))
    if shape == "start":
        return {"start": first}
    if shape == "end":
        return {"end": second}
    return {"start": first, "end": second}


def input_outputs() -> st.SearchStrategy[dict[str, Any]]:
    """A TaskInputOutput in wire form with exactly one value[x]."""
    value = st.one_of(
        texts().map(lambda v: ("valueString", v)),
        st.booleans().map(lambda v: ("valueBoolean", v)),
        st.integers(-(2**31), 2**31 - 1).map(lambda v: ("valueInteger", v)),
        st.floats(allow_nan=False, allow_infinity=False, width=64).map(
            lambda v: ("valueDecimal", v)
        ),
        instants().map(lambda v: ("valueDateTime", v)),
        st.text(ID_ALPHABET, min_size=1, max_size=20).map(lambda v: ("valueCode", v)),
        task_ids().map(lambda v: ("valueReference", v)),
    )
    return st.tuples(st.text(ID_ALPHABET, min_size=1, max_size=20), value).map(
        lambda t: {"type": t[0], t[1][0]: t[1][1]}
    )


@st.composite
def valid_requests(draw: st.DrawFn, *, with_id: bool = False) -> dict[str, Any]:
    """A valid wire-form create request in normalised form (round-trips exactly)."""
    request: dict[str, Any] = {
        "status": draw(st.sampled_from(STATUSES)),
        "intent": draw(st.sampled_from(INTENTS)),
        "authoredOn": draw(instants()),
    }
    if with_id:
        request["id"] = draw(task_ids())
    optional: dict[str, st.SearchStrategy[Any]] = {
        "priority": st.sampled_from(PRIORITIES),
        "code": st.sampled_from(["lab-order", "referral", "imaging", "x'; DROP TABLE tasks;--"]),
        "statusReason": texts(),
        "businessStatus": texts(),
        "description": texts(),
        "note": texts(),
        "reasonCode": texts(),
        "patientId": small_ids("pt"),
        "ownerId": small_ids("prac"),
        "requesterId": small_ids("req"),
        "encounterId": small_ids("enc"),
        "focusId": task_ids(),
        "executionPeriod": periods(),
        "basedOn": st.lists(task_ids(), min_size=1, max_size=3),
        "partOf": st.lists(small_ids("parent"), min_size=1, max_size=2),
        "input": st.lists(input_outputs(), min_size=1, max_size=3),
        "output": st.lists(input_outputs(), min_size=1, max_size=2),
        "restriction": st.fixed_dictionaries(
            {},
            optional={
                "repetitions": st.integers(1, 1000),
                "period": periods(),
                "recipient": st.lists(task_ids(), min_size=1, max_size=3),
            },
        ),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            request[key] = draw(strategy)
    if request.get("restriction") == {}:
        del request["restriction"]
    if "id" in request and request["id"] in request.get("partOf", []):
        request["partOf"] = [p for p in request["partOf"] if p != request["id"]] or ["parent_x"]
    return request


@st.composite
def searchable_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A light valid request with an id, authoredOn, and each of the six search fields
    present or absent, drawn from few values so filters and pairs match often (cheaper
    to draw than ``valid_requests()``; for search properties over many tasks)."""
    request: dict[str, Any] = {
        "id": draw(st.text(ID_ALPHABET, min_size=1, max_size=12)),
        "status": draw(st.sampled_from(STATUSES)),
        "intent": "order",
        # Few distinct instants: ties on authoredOn exercise the id tie-breaker.
        "authoredOn": f"2025-01-0{draw(st.integers(1, 3))}T00:00:00.000Z",
    }
    optional: dict[str, st.SearchStrategy[str]] = {
        "patientId": small_ids("pt"),
        "ownerId": small_ids("prac"),
        "requesterId": small_ids("req"),
        "priority": st.sampled_from(PRIORITIES),
        "code": st.sampled_from(["lab-order", "referral", "x'; DROP TABLE tasks;--"]),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            request[key] = draw(strategy)
    return request


#: (wire path, bad value) pairs: putting the value at the path must fail naming it.
CORRUPTIONS: list[tuple[str, object]] = [
    ("status", "done"),
    ("status", None),
    ("intent", None),
    ("status", 3),
    ("intent", "maybe"),
    ("priority", 3),
    ("priority", "URGENT"),
    ("patientId", "has space"),
    ("ownerId", "x" * 65),
    ("requesterId", ""),
    ("encounterId", 42),
    ("focusId", "bad/slash"),
    ("code", 7),
    ("description", "x" * 20_000),
    ("note", "nul\x00inside"),
    ("statusReason", "\ud800"),
    ("authoredOn", "2025-02-01T08:00:00"),
    ("authoredOn", "yesterday"),
    ("executionPeriod", "2025-02-01"),
    ("executionPeriod.start", "2025-02-30T08:00:00Z"),
    ("executionPeriod.end", 12),
    ("executionPeriod.start", "0001-01-01T00:00:00+01:00"),
    ("input[0].valueDateTime", "9999-12-31T23:59:59-01:00"),
    ("basedOn", "not-a-list"),
    ("basedOn[0]", "bad id"),
    ("partOf[0]", 5),
    ("input[0].valueString", 5),
    ("input[0].valueInteger", 2**40),
    ("input[0].valueDecimal", float("nan")),
    ("input[0].valueBoolean", "true"),
    ("input[0].type", None),
    ("input[0].valueDateTime", "2025-02-01T08:00:00"),
    ("output[0].valueCode", ""),
    ("output[0].valueReference", "a b"),
    ("restriction.repetitions", 0),
    ("restriction.repetitions", True),
    ("restriction.period.end", "tomorrow"),
    ("restriction.recipient[0]", "no spaces allowed"),
]


def invalid_requests(
    corruptions: list[tuple[str, object]] | None = None,
) -> st.SearchStrategy[tuple[dict[str, Any], str]]:
    """``(request, path)``: a valid request with exactly ONE field made invalid.

    The corruption is drawn from ``corruptions`` (default :data:`CORRUPTIONS`); ``path``
    is the wire path the resulting ValidationError must name.
    """
    pool = CORRUPTIONS if corruptions is None else corruptions
    return st.tuples(valid_requests(), st.sampled_from(pool)).map(
        lambda t: (set_path(t[0], t[1][0], t[1][1]), t[1][0])
    )


def names_path(paths: tuple[str, ...] | list[str], path: str) -> bool:
    """Whether an error's ``paths`` name ``path`` (or a path inside/above it).

    ``input[0].valueString`` counts as named by ``input[0]`` (the object holding it),
    and ``executionPeriod`` by ``executionPeriod.start``.
    """
    return any(p == path or p.startswith(path) or path.startswith(p) for p in paths)


def minimal_request(**extra: Any) -> dict[str, Any]:
    """The smallest valid create request (status requested, intent order) plus ``extra``."""
    return {"status": "requested", "intent": "order", **extra}


def set_path(request: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A deep copy of ``request`` with ``value`` put at the wire ``path``.

    Intermediate objects and lists are created as needed with valid neighbours, so the
    only problem in the result is the one at ``path``.
    """
    import copy
    import re

    out = copy.deepcopy(request)
    parts = re.findall(r"[A-Za-z]+|\[\d+\]", path)
    target: Any = out
    for index, part in enumerate(parts[:-1]):
        following = parts[index + 1]
        if part.startswith("["):
            key: Any = int(part[1:-1])
        else:
            key = part
        if following.startswith("["):
            default: Any = (
                [{"type": "t", "valueString": "v"}] if part in ("input", "output") else ["ok"]
            )
        else:
            default = {"type": "t", "valueString": "v"} if part.startswith("[") else {}
        if isinstance(target, dict):
            if not isinstance(target.get(key), (dict, list)):
                target[key] = default
        elif key >= len(target):
            target.append(default)
        target = target[key]
    last = parts[-1]
    if last.startswith("["):
        target[int(last[1:-1])] = value
    else:
        if isinstance(target, dict) and last.startswith("value"):
            for existing in [k for k in target if k.startswith("value")]:
                del target[existing]
        target[last] = value
    return out


def wire_field_values() -> dict[str, st.SearchStrategy[Any]]:
    """A strategy per top-level wire field a local change may set (every field of the
    model but ``id``, ``versionId`` and ``lastModified``), each drawing valid values in
    normalised form; ids and codes come from few values, so two sides often coincide.
    For merge properties: random field edits of ``valid_requests()``."""
    return {
        "status": st.sampled_from(STATUSES),
        "intent": st.sampled_from(INTENTS),
        "authoredOn": instants(),
        "priority": st.sampled_from(PRIORITIES),
        "code": st.sampled_from(["lab-order", "referral", "imaging"]),
        "statusReason": texts(10),
        "businessStatus": texts(10),
        "description": texts(10),
        "note": texts(10),
        "reasonCode": texts(10),
        "patientId": small_ids("pt"),
        "ownerId": small_ids("prac"),
        "requesterId": small_ids("req"),
        "encounterId": small_ids("enc"),
        "focusId": small_ids("focus"),
        "executionPeriod": periods(),
        "basedOn": st.lists(small_ids("order"), min_size=1, max_size=2),
        "partOf": st.lists(small_ids("parent"), min_size=1, max_size=2),
        "input": st.lists(input_outputs(), min_size=1, max_size=2),
        "output": st.lists(input_outputs(), min_size=1, max_size=2),
        "restriction": st.fixed_dictionaries(
            {"repetitions": st.integers(1, 5)}, optional={"period": periods()}
        ),
    }
