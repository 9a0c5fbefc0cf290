"""The field-level rebase (clinik_local.merge) against a brute-force reference.

The reference below is written from the rules alone: it walks every top-level wire field
of the model and decides each one from whole snapshots (base, local, server), where the
module works through patches, squashing and applying them. Random triples are valid
wire requests (tests/strategies.py) with random field edits on each side: the same
field, different fields, the same value, cleared fields, deletes, a task the server
never saw, values the server sends that this version refuses, fields it does not know.
"""

from __future__ import annotations

import ast
import copy
from itertools import pairwise
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from clinik_local import merge
from clinik_local.codec import decode_task, wire_name
from clinik_local.errors import ValidationError
from clinik_local.lifecycle import can_transition
from clinik_local.merge import (
    DELETE,
    Conflict,
    Merged,
    RebaseResult,
    apply_patch,
    patch_of,
    rebase,
    squash,
    three_way,
)
from clinik_local.model import Task, TaskStatus

from .strategies import STATUSES, small_ids, valid_requests, wire_field_values

SERVER_FIELDS = {"id", "versionId", "lastModified"}
#: Every wire field of the model a change may set, enumerated independently of merge.py.
FIELDS = sorted(
    name for name in (wire_name(a.name) for a in attrs.fields(Task)) if name not in SERVER_FIELDS
)
REQUIRED = {"status", "intent", "authoredOn"}
VALUES = wire_field_values()
#: lastModified after every instant the strategies draw, so no edit of authoredOn
#: breaks the lastModified >= authoredOn invariant by accident.
LATE = "2031-06-01T00:00:00.000Z"
#: Values a server may hold that this version refuses (longer than its limits, unknown).
SERVER_ONLY_VALUES: list[tuple[str, object]] = [
    ("note", "x" * 20_000),
    ("status", "entered-in-error"),
    ("code", 7),
    ("ownerId", "has space"),
    ("priority", "whenever"),
]
SETTINGS = settings(max_examples=40)
ORACLE = settings(max_examples=150)


# --- building triples ------------------------------------------------------------------


def edit(task: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``task`` with ``changes`` made (``None`` clears the field)."""
    out = copy.deepcopy(task)
    for name, value in changes.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = copy.deepcopy(value)
    return out


@st.composite
def edits(draw: st.DrawFn, pool: list[str] | None = None, max_size: int = 3) -> dict[str, Any]:
    """Up to ``max_size`` valid field edits from ``pool``; optional fields may be cleared."""
    names = draw(st.lists(st.sampled_from(pool or FIELDS), max_size=max_size, unique=True))
    out: dict[str, Any] = {}
    for name in names:
        if name not in REQUIRED and draw(st.integers(0, 3)) == 0:
            out[name] = None
        else:
            out[name] = draw(VALUES[name])
    return out


def stored(request: dict[str, Any], version: str) -> dict[str, Any]:
    return {**request, "versionId": version, "lastModified": LATE}


@st.composite
def bases(draw: st.DrawFn) -> dict[str, Any]:
    """A stored server copy: a full ``valid_requests()`` draw one time in four, else a
    lighter one (required fields and a few others) that is four times cheaper to draw."""
    if draw(st.integers(0, 3)) == 0:
        request = draw(valid_requests(with_id=True))
    else:
        request = {"id": draw(small_ids("task"))}
        for name in ["status", "intent", "authoredOn"]:
            request[name] = draw(VALUES[name])
        optional = [f for f in FIELDS if f not in REQUIRED]
        for name in draw(st.lists(st.sampled_from(optional), max_size=5, unique=True)):
            request[name] = draw(VALUES[name])
    return stored(request, "1")


Triple = tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]
#: The base (None: never on the server), the task after each local change (the last one
#: None when the device deleted it), and the server's new version (None: deleted).
History = tuple[list[dict[str, Any] | None], dict[str, Any] | None]


@st.composite
def histories(
    draw: st.DrawFn, max_steps: int = 4, *, deletes: bool = True, no_base: bool = True
) -> History:
    """Local edits in steps and a server version, all edits of one base, drawn from a
    small shared pool of fields so both sides often touch the same one; the server
    sometimes takes a value the device set at some step, sometimes holds a value or a
    field only it knows; either side sometimes deletes; sometimes no base."""
    base = draw(bases())
    pool = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True))
    steps = draw(st.lists(edits(pool), min_size=1, max_size=max_steps))
    server_edits = draw(edits(pool))
    for step in steps:
        shared: list[str] = (
            draw(st.lists(st.sampled_from(sorted(step)), unique=True)) if step else []
        )
        for name in shared:
            server_edits[name] = step[name]
    changed = {**edit(base, server_edits), "versionId": "2"}
    if draw(st.integers(0, 7)) == 0:
        name, refused = draw(st.sampled_from(SERVER_ONLY_VALUES))
        changed[name] = refused
    if draw(st.integers(0, 7)) == 0:
        changed["futureField"] = {"from": "a newer server"}
    server: dict[str, Any] | None = changed
    snapshots: list[dict[str, Any] | None] = [base]
    for number, step in enumerate(steps):
        previous = snapshots[-1]
        assert previous is not None
        snapshots.append({**edit(previous, step), "versionId": f"L{number}"})
    if deletes and draw(st.integers(0, 9)) == 0:
        snapshots[-1] = None
    if deletes and draw(st.integers(0, 9)) == 0:
        server = None
    if no_base and draw(st.integers(0, 9)) == 0:
        snapshots.insert(0, None)  # created on this device; the server may have it
    return snapshots, server


def triples(*, no_base: bool = True) -> st.SearchStrategy[Triple]:
    """(base, local, server): one local snapshot, for three_way."""
    return histories(max_steps=1, no_base=no_base).map(lambda h: (h[0][0], h[0][-1], h[1]))


def changes_of(snapshots: list[dict[str, Any] | None]) -> list[merge.Change]:
    return [
        DELETE if after is None else patch_of(before, after)
        for before, after in pairwise(snapshots)
    ]


# --- the brute-force reference ---------------------------------------------------------

#: ("merged", task, send, op) or ("conflict", reason kinds, conflicting fields).
Outcome = tuple[Any, ...]


def value(task: dict[str, Any], name: str) -> Any:
    got = task.get(name)
    return None if got is None or got == [] else got


def valid(task: dict[str, Any]) -> bool:
    try:
        decode_task({k: v for k, v in task.items() if k in FIELDS or k == "id"})
    except ValidationError:
        return False
    return True


def reference(snapshots: list[dict[str, Any] | None], server: Any) -> Outcome:
    """The outcome by the rules, decided field by field over every model field from the
    device's successive snapshots (``snapshots[0]`` the base) and the server's task."""
    base, local = snapshots[0], snapshots[-1]
    before = base or {}
    if local is None:
        if server is None:
            return ("merged", None, None, None)
        if base is not None and all(value(before, f) == value(server, f) for f in FIELDS):
            return ("merged", None, "DELETE", "delete")
        return ("conflict", {"delete vs update"}, set())
    shots = [before, *(s for s in snapshots[1:] if s is not None)]
    touched = [f for f in FIELDS if any(value(a, f) != value(b, f) for a, b in pairwise(shots))]
    if server is None:
        if base is not None:
            return (
                ("conflict", {"update vs delete"}, set())
                if touched
                else ("merged", None, None, None)
            )
        created = {f: value(local, f) for f in FIELDS if value(local, f) is not None}
        if not created:
            return ("merged", None, None, None)
        if not valid(created):
            return ("conflict", {"invalid"}, set())
        return ("merged", created, created, "create")
    merged = {k: v for k, v in server.items() if v is not None and v != []}
    kinds: set[str] = set()
    fields: set[str] = set()
    for f in touched:
        mine, theirs = value(local, f), value(server, f)
        if theirs in [value(shot, f) for shot in shots]:
            if mine is None:
                merged.pop(f, None)
            else:
                merged[f] = mine
            continue
        kinds.add("field")
        fields.add(f)
        statuses = f == "status" and theirs in STATUSES and mine in STATUSES
        if statuses and not can_transition(TaskStatus(theirs), TaskStatus(mine)):
            kinds.add("lifecycle")
    if kinds:
        return ("conflict", kinds, fields)
    send = {f: value(merged, f) for f in FIELDS if value(merged, f) != value(server, f)}
    if not send:
        return ("merged", merged, None, None)
    if not valid(merged):
        return ("conflict", {"invalid"}, set())
    return ("merged", merged, send, "update")


def outcome(result: RebaseResult) -> Outcome:
    if isinstance(result, Merged):
        send = "DELETE" if result.send is DELETE else result.send
        return ("merged", result.task, send, result.op)
    return ("conflict", {r.kind for r in result.reasons}, set(result.fields))


def merged(result: RebaseResult) -> Merged:
    assert isinstance(result, Merged), result
    return result


def conflicted(result: RebaseResult) -> Conflict:
    assert isinstance(result, Conflict), result
    return result


def fields_of(task: dict[str, Any] | None) -> dict[str, Any] | None:
    if task is None:
        return None
    return {f: value(task, f) for f in FIELDS if value(task, f) is not None}


# --- the oracle --------------------------------------------------------------------------


@ORACLE
@given(triples())
def test_three_way_agrees_with_the_brute_force_reference_and_its_conflicts_recompute(
    triple: Triple,
) -> None:
    base, local, server = triple
    result = three_way(base, local, server)
    event(type(result).__name__)
    assert outcome(result) == reference([base, local], server)
    if isinstance(result, Merged) and result.task is not None and server is not None:
        assert result.if_match == "2"
    if isinstance(result, Conflict):  # the three sides, nothing lost
        assert fields_of(result.local) == fields_of(local)
        assert result.server == (
            None if server is None else {k: v for k, v in server.items() if v not in (None, [])}
        )
        assert fields_of(result.base) == fields_of(base)
        # The reasons follow from the three sides it keeps: no need to store them.
        again = three_way(result.base, result.local, result.server)
        assert isinstance(again, Conflict)
        assert again.reasons == result.reasons


@ORACLE
@given(histories())
def test_rebase_of_a_change_sequence_agrees_with_the_brute_force_reference(
    history: History,
) -> None:
    snapshots, server = history
    result = rebase(snapshots[0], server, changes_of(snapshots))
    event(type(result).__name__)
    assert outcome(result) == reference(snapshots, server)
    if isinstance(result, Conflict):  # the current local task, every change in it
        assert fields_of(result.local) == fields_of(snapshots[-1])


@SETTINGS
@given(bases(), st.data())
def test_changes_to_different_fields_all_survive(base: dict[str, Any], data: st.DataObject) -> None:
    local_edits = data.draw(edits())
    rest = [f for f in FIELDS if f not in local_edits]
    server_edits = data.draw(edits(rest))
    local = {**edit(base, local_edits), "versionId": "9"}
    server = {**edit(base, server_edits), "versionId": "2"}
    result = merged(three_way(base, local, server))
    assert result.task is not None
    for name, new in {**local_edits, **server_edits}.items():
        assert value(result.task, name) == new, name
    untouched = [f for f in rest if f not in server_edits]
    for name in untouched:
        assert value(result.task, name) == value(base, name)
    assert result.send == (patch_of(server, result.task) or None)


@SETTINGS
@given(bases(), st.sampled_from(FIELDS), st.data())
def test_the_same_field_changed_on_both_sides_to_different_values_is_a_conflict(
    base: dict[str, Any], name: str, data: st.DataObject
) -> None:
    was, mine, theirs = data.draw(st.lists(VALUES[name], min_size=3, max_size=3, unique_by=repr))
    assume(was != mine and mine != theirs and theirs != was)  # -0.0 and 0.0: same number
    base = {**base, name: was}
    local = edit(base, {name: mine})
    server = edit(base, {name: theirs, "versionId": "2"})
    result = conflicted(three_way(base, local, server))
    assert result.fields == (name,)
    reason = result.reasons[0]
    assert (reason.base, reason.local, reason.server) == (was, mine, theirs)


@SETTINGS
@given(bases(), st.data())
def test_identical_changes_on_both_sides_merge_with_nothing_to_send(
    base: dict[str, Any], data: st.DataObject
) -> None:
    changes = data.draw(edits(max_size=5))
    local = edit(base, changes)
    server = {**edit(base, changes), "versionId": "2"}
    result = merged(three_way(base, local, server))
    assert result.task == server
    assert result.send is None
    assert result.op is None


@SETTINGS
@given(bases(), st.data())
def test_server_changed_the_owner_and_the_device_the_note_ends_with_both(
    base: dict[str, Any], data: st.DataObject
) -> None:
    owner = data.draw(VALUES["ownerId"].filter(lambda v: v != base.get("ownerId")))
    note = data.draw(
        VALUES["note"].map(lambda v: f"device: {v}").filter(lambda v: v != base.get("note"))
    )
    local = {**edit(base, {"note": note}), "versionId": "9"}
    server = {**edit(base, {"ownerId": owner}), "versionId": "2"}
    result = merged(three_way(base, local, server))
    assert result.task is not None
    assert (result.task["ownerId"], result.task["note"]) == (owner, note)
    assert result.send == {"note": note}
    assert (result.op, result.if_match) == ("update", "2")
    assert result.task["versionId"] == "2"


@SETTINGS
@given(histories(deletes=False))
def test_rebasing_changes_one_at_a_time_equals_rebasing_them_together_and_their_squash(
    history: History,
) -> None:
    snapshots, server = history
    assert server is not None
    changes = changes_of(snapshots)
    current: dict[str, Any] | None = server
    for before, change in zip(snapshots, changes, strict=False):
        step = rebase(before, current, [change])
        if isinstance(step, Conflict):
            current = None
            break
        current = step.task
    together = rebase(snapshots[0], server, changes)
    squashed = rebase(snapshots[0], server, [squash(changes)])
    event(f"one at a time merges: {current is not None}")
    event(f"squash merges: {isinstance(squashed, Merged)}")
    if current is not None:
        assert merged(together).task == current
    if isinstance(squashed, Merged):
        assert merged(together).task == squashed.task
        assert together == squashed
    if isinstance(together, Merged):
        assert together.send == (
            None if together.task is None else patch_of(server, together.task) or None
        )


@SETTINGS
@given(triples(no_base=False))
def test_merging_an_unchanged_local_task_gives_the_server_task(triple: Triple) -> None:
    base, _, server = triple
    assert base is not None
    result = merged(three_way(base, base, server))
    assert result.task == (None if server is None else dict(server.items()))
    assert result.send is None


@SETTINGS
@given(triples(no_base=False))
def test_merging_onto_an_unchanged_server_gives_the_local_task(triple: Triple) -> None:
    base, local, _ = triple
    assert base is not None
    result = merged(three_way(base, local, base))
    if local is None:
        assert (result.task, result.send, result.op) == (None, DELETE, "delete")
    else:
        assert fields_of(result.task) == fields_of(local)
        assert result.send == (patch_of(base, local) or None)


@SETTINGS
@given(bases(), st.lists(st.sampled_from(STATUSES), min_size=3, max_size=3, unique=True))
def test_both_sides_moving_status_is_a_conflict_and_a_lifecycle_one_when_not_allowed(
    base: dict[str, Any], statuses: list[str]
) -> None:
    was, mine, theirs = statuses
    base = {**base, "status": was}
    local = {**base, "status": mine, "note": "seen on the device"}
    server = {**base, "status": theirs, "versionId": "2"}
    result = conflicted(three_way(base, local, server))
    kinds = [r.kind for r in result.reasons]
    allowed = can_transition(TaskStatus(theirs), TaskStatus(mine))
    assert kinds == (["field"] if allowed else ["field", "lifecycle"])
    assert result.fields == ("status",)
    assert result.local is not None
    assert result.local["note"] == "seen on the device"


@SETTINGS
@given(bases(), st.sampled_from(SERVER_ONLY_VALUES), st.data())
def test_a_merge_the_codec_refuses_is_an_invalid_conflict_naming_the_field(
    base: dict[str, Any], bad: tuple[str, object], data: st.DataObject
) -> None:
    name, refused = bad
    local_edits = data.draw(edits([f for f in FIELDS if f not in (name, "description")]))
    local_edits["description"] = f"edited: {base.get('description')}"
    local = edit(base, local_edits)
    server = {**base, name: refused, "versionId": "2"}
    result = conflicted(three_way(base, local, server))
    assert [r.kind for r in result.reasons] == ["invalid"]
    assert name in result.reasons[0].paths
    # With nothing of its own to send, the device takes the server's task as it is.
    assert merged(three_way(base, base, server)).task == server


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


@settings(max_examples=60)
@given(triples(), st.dictionaries(st.sampled_from([*FIELDS, "futureField"]), JSON, max_size=4))
def test_any_server_body_gives_a_result_never_an_exception(
    triple: Triple, junk: dict[str, Any]
) -> None:
    base, local, server = triple
    server = {**(server or {}), **junk}
    result = three_way(base, local, server)
    assert isinstance(result, (Merged, Conflict))


@settings(max_examples=60)
@given(st.one_of(st.none(), bases()), bases())
def test_apply_patch_of_a_patch_gives_the_after_task(
    before: dict[str, Any] | None, after: dict[str, Any]
) -> None:
    patch = patch_of(before, after)
    assert set(patch) <= set(FIELDS)
    assert fields_of(apply_patch(before, patch)) == fields_of(after)
    assert patch_of(after, after) == {}


# --- one test per reason and rule --------------------------------------------------------

BASE: dict[str, Any] = {
    "id": "task_1",
    "versionId": "1",
    "lastModified": "2025-01-02T00:00:00.000Z",
    "status": "accepted",
    "intent": "order",
    "authoredOn": "2025-01-01T00:00:00.000Z",
    "ownerId": "prac_1",
    "note": "draw blood",
}


def server_with(**changes: Any) -> dict[str, Any]:
    return {**BASE, "versionId": "2", **changes}


def test_field_reason_names_the_field_and_its_three_values() -> None:
    result = conflicted(three_way(BASE, {**BASE, "note": "mine"}, server_with(note="theirs")))
    (reason,) = result.reasons
    assert (reason.kind, reason.field) == ("field", "note")
    assert (reason.base, reason.local, reason.server) == ("draw blood", "mine", "theirs")


def test_a_field_cleared_on_one_side_and_changed_on_the_other_is_a_conflict() -> None:
    local = {k: v for k, v in BASE.items() if k != "note"}
    result = conflicted(three_way(BASE, local, server_with(note="theirs")))
    assert result.reasons[0].local is None
    assert result.fields == ("note",)


def test_a_field_cleared_on_one_side_only_is_cleared_in_the_merge() -> None:
    local = {k: v for k, v in BASE.items() if k != "note"}
    result = merged(three_way(BASE, local, server_with(ownerId="prac_2")))
    assert result.task is not None
    assert "note" not in result.task
    assert result.send == {"note": None}


def test_update_vs_delete_when_the_server_deleted_a_task_this_device_changed() -> None:
    result = conflicted(three_way(BASE, {**BASE, "note": "mine"}, None))
    assert [r.kind for r in result.reasons] == ["update vs delete"]
    assert result.local is not None
    assert result.local["note"] == "mine"
    assert result.server is None


def test_delete_vs_update_when_this_device_deleted_a_task_the_server_changed() -> None:
    result = conflicted(three_way(BASE, None, server_with(ownerId="prac_2")))
    assert [r.kind for r in result.reasons] == ["delete vs update"]
    assert result.local is None
    assert result.server is not None
    assert result.server["ownerId"] == "prac_2"


def test_lifecycle_reason_when_the_server_cancelled_and_the_device_started_work() -> None:
    local = {**BASE, "status": "in-progress"}
    result = conflicted(three_way(BASE, local, server_with(status="cancelled")))
    assert [r.kind for r in result.reasons] == ["field", "lifecycle"]
    assert "terminal" in result.reasons[1].message


def test_a_server_cancel_under_a_device_note_merges_and_stays_cancelled() -> None:
    result = merged(three_way(BASE, {**BASE, "note": "mine"}, server_with(status="cancelled")))
    assert result.task is not None
    assert (result.task["status"], result.task["note"]) == ("cancelled", "mine")


def test_invalid_reason_carries_the_validation_errors_paths() -> None:
    result = conflicted(
        three_way(BASE, {**BASE, "ownerId": "prac_2"}, server_with(note="x" * 20_000))
    )
    (reason,) = result.reasons
    assert (reason.kind, reason.paths) == ("invalid", ("note",))


def test_both_deleted_is_deleted_with_nothing_to_send() -> None:
    assert merged(three_way(BASE, None, None)) == Merged(
        task=None, send=None, op=None, if_match=None
    )


def test_a_local_delete_onto_an_unchanged_server_task_is_sent_with_its_version() -> None:
    result = merged(three_way(BASE, None, server_with()))
    assert (result.task, result.send, result.op, result.if_match) == (None, DELETE, "delete", "2")


def test_changes_undone_on_the_device_still_meet_the_servers_delete_as_a_conflict() -> None:
    result = conflicted(rebase(BASE, None, [{"note": "oops"}, {"note": "draw blood"}]))
    assert [r.kind for r in result.reasons] == ["update vs delete"]
    assert merged(three_way(BASE, BASE, None)) == Merged(
        task=None, send=None, op=None, if_match=None
    )


def test_a_device_that_went_through_the_servers_value_keeps_its_last_value() -> None:
    changes = [{"ownerId": "prac_2"}, {"ownerId": "prac_3"}]
    result = merged(rebase(BASE, server_with(ownerId="prac_2"), changes))
    assert result.task is not None
    assert result.task["ownerId"] == "prac_3"
    assert result.send == {"ownerId": "prac_3"}


def test_a_field_set_back_to_its_base_value_counts_as_set() -> None:
    changes = [{"note": "x"}, {"note": "draw blood"}]
    result = conflicted(rebase(BASE, server_with(note="theirs"), changes))
    assert result.fields == ("note",)
    assert result.local is not None
    assert result.local["note"] == "draw blood"


def test_a_task_created_on_the_device_is_sent_as_a_create() -> None:
    created = {k: v for k, v in BASE.items() if k not in SERVER_FIELDS}
    result = merged(rebase(None, None, [patch_of(None, created)]))
    assert (result.task, result.send, result.op, result.if_match) == (
        created,
        created,
        "create",
        None,
    )


def test_a_create_the_server_already_holds_has_nothing_to_send() -> None:
    created = {k: v for k, v in BASE.items() if k not in SERVER_FIELDS}
    result = merged(rebase(None, server_with(), [patch_of(None, created)]))
    assert (result.task, result.send) == (server_with(), None)


def test_a_conflict_keeps_every_later_local_change() -> None:
    changes = [{"note": "first"}, {"ownerId": "prac_9"}, {"description": "later edit"}]
    result = conflicted(rebase(BASE, server_with(note="theirs"), changes))
    assert result.local is not None
    assert (result.local["note"], result.local["ownerId"], result.local["description"]) == (
        "first",
        "prac_9",
        "later edit",
    )


def test_fields_this_version_does_not_know_pass_through_and_are_never_patched() -> None:
    base = {**BASE, "futureField": {"x": 1}}
    local = dict(BASE.items())  # the local store could not keep futureField
    local["note"] = "mine"
    assert patch_of(base, local) == {"note": "mine"}
    result = merged(three_way(base, local, {**base, "versionId": "2", "futureField": {"x": 2}}))
    assert result.task is not None
    assert result.task["futureField"] == {"x": 2}
    assert result.send == {"note": "mine"}


def test_null_and_empty_list_are_the_same_as_absent() -> None:
    assert patch_of(BASE, {**BASE, "basedOn": [], "code": None}) == {}
    result = merged(three_way(BASE, BASE, server_with(basedOn=[], code=None)))
    assert result.send is None


def test_a_boolean_is_not_the_number_one() -> None:
    before = {**BASE, "input": [{"type": "t", "valueDecimal": 1}]}
    after = {**BASE, "input": [{"type": "t", "valueDecimal": True}]}
    assert patch_of(before, after) == {"input": after["input"]}
    same = {**BASE, "input": [{"type": "t", "valueDecimal": 1.0}]}
    assert patch_of(before, same) == {}


def test_patches_never_carry_server_managed_fields() -> None:
    assert patch_of(BASE, {**BASE, "id": "x", "versionId": "7", "lastModified": "z"}) == {}


def test_squash_takes_the_last_value_of_each_field_and_delete_wins() -> None:
    assert squash([{"note": "a", "code": "c"}, {"note": None}]) == {"note": None, "code": "c"}
    assert squash([{"note": "a"}, DELETE]) is DELETE
    assert squash([]) == {}


def test_a_change_after_a_delete_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError) as caught:
        rebase(BASE, server_with(), [DELETE, {"note": "x"}])
    assert caught.value.paths == ("changes[1]",)


def test_a_patch_setting_a_field_no_change_may_set_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError) as caught:
        rebase(BASE, server_with(), [{"note": "x"}, {"versionId": "8", "bogus": 1}])
    assert caught.value.paths == ("changes[1].bogus", "changes[1].versionId")
    with pytest.raises(ValidationError):
        apply_patch(BASE, {"id": "other"})


def test_a_task_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ValidationError):
        three_way(BASE, BASE, ["not", "a", "task"])  # type: ignore[arg-type]


def test_merge_imports_only_core_modules() -> None:
    tree = ast.parse(Path(merge.__file__).read_text(encoding="utf-8"))
    relative: set[str] = set()
    absolute: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            (relative if node.level else absolute).add(node.module)
        elif isinstance(node, ast.Import):
            absolute.update(alias.name for alias in node.names)
    assert relative <= {"codec", "errors", "lifecycle", "model"}
    assert absolute <= {"__future__", "attrs", "collections.abc", "enum", "typing"}
