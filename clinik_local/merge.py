"""Field-level three-way merge of local changes onto a newer server version (rebase).

Pure functions over wire-form task mappings (camelCase, as :mod:`clinik_local.codec`
writes them and as the server sends them); no I/O, imports only core modules. The
sync engine calls :func:`rebase` when a task with undelivered local changes meets a
newer server version: a pulled change-log item, or the ``data`` of a ``412`` answer.

Terms
-----
*base*
    The last server copy the local changes were made on (``None``: the task was created
    locally and the server has never acknowledged it; it counts as the empty task).
*server*
    The server's new version (``None``: the server deleted the task).
*change*
    One undelivered local change: a *patch* (``{wire field: new value}``, ``None`` for a
    cleared field; see :func:`patch_of`) or the :data:`DELETE` marker.

Granularity: top-level wire fields
----------------------------------
A patch names whole top-level wire fields (:data:`MERGE_FIELDS`): ``note``,
``ownerId``, ``status`` ... and also ``executionPeriod``, ``restriction``, ``input``,
``output``, ``basedOn`` and ``partOf`` as whole values. This is the predictable choice:
a conflict is always about one field a user sees as one thing, and no merge can build a
value neither side wrote. Going finer would buy little and cost correctness: a
``Period``'s ``start <= end`` spans its two ends (merging them separately can build a
period that neither side had and that is invalid), and list items have no identity to
merge by (two devices each appending an input is a conflict, shown, not a guess at an
order). ``id``, ``versionId`` and ``lastModified`` (:data:`SERVER_MANAGED`) are never
part of a patch: a merged task carries the server's. Fields this version of the library
does not know (a newer server's) are never patched either: they pass through from the
server's copy untouched, so a ``PUT`` of the merged task does not erase them.

Values are compared as JSON values: an absent field, ``null`` and an empty list are the
same (the codec omits all three); ``true`` is not ``1``; ``1`` and ``1.0`` are the same
number; object key order does not matter, list order does.

The rules, per field ``f``
-------------------------
The changes are replayed in order. For each field, its *history* on the device is the
base's value followed by the value each change set it to (a field a change names counts
as set, even to the value it had):

* no change set ``f``: the server's value;
* the server's value is in ``f``'s history: the device's last value. That covers "only
  the device changed it" (the server's value is the base's), "both changed it to the
  same value", and "the device reached the server's value and went on from there" (its
  later edits were made on the value the server has);
* otherwise: a ``"field"`` conflict (base, device's last and server values given).

So ``three_way`` is the classic rule (``l == b``: server's; ``s == b`` or ``s == l``:
``l``; else conflict), and replaying changes one at a time ends where replaying their
:func:`squash` does whenever the squash merges (a squash only forgets history).

The other reasons
-----------------
* ``"lifecycle"``: ``status`` is in conflict and the lifecycle does not allow the
  server's status -> the device's (server ``cancelled``, device ``in-progress``). It
  always comes with the ``status`` field conflict and tells a resolver that keeping the
  device's status would need an administrative override. A server status change under
  a device's edit of other fields merges (a note on a task the server cancelled is kept;
  the task stays cancelled): the device's transition was checked against the base, and
  it did not change the status;
* ``"update vs delete"``: the device set any field, the server deleted the task;
  ``"delete vs update"``: the device deleted the task, the server's version differs from
  the base (or there is no base). The device's side is named first. Both deleted:
  deleted, nothing to send;
* ``"invalid"``: a merged task that must be sent is validated with
  :func:`~clinik_local.codec.decode_task` (its known fields and ``id``; ``versionId`` and
  ``lastModified`` are the server's, re-stamped on the next write), and a failure is
  this conflict with the :class:`~clinik_local.errors.ValidationError`'s paths, never
  an exception. This is how a server value this version refuses (a text longer than its
  limits, a status it does not know) surfaces when a local change must go on top of it.
  A merge equal to the server's task is not validated: it is a server copy, stored as
  the server sent it.

Conflicts: the three sides come with every conflict (:class:`Conflict`), so a conflict
record loses nothing, and the reasons are a pure function of them:
``three_way(c.base, c.local, c.server).reasons == c.reasons`` for a conflict of
:func:`three_way` (so a conflict record need not store them: recompute them from its
three sides, also after a later local edit changed its local side).

Laws (tested): ``three_way(b, b, s)`` is ``s`` with nothing to send; ``three_way(b, l, b)``
is ``l`` (with the base's server-managed fields); rebasing the changes one at a time
(each onto the previous result), rebasing them together, and rebasing their squash end
in the same task whenever the one-at-a-time replay, or the squash, merges.

For the sync engine (design)
----------------------------
*Outbox rows record the fields they set.* Add a nullable ``patch`` column (JSON object,
``patch_of(previous local wire, new local wire)``) beside ``payload``: ``tasks.update``
has both bodies in hand at write time (patching the local bodies, not the server copy,
keeps unknown server fields out of patches). A create row's patch is its payload
(``patch_of(None, payload)``); a delete row (``op = 'delete'``) is :data:`DELETE`.
Rows written before the column existed: derive the patch from consecutive bodies
(``patch_of(task_history body at base_version, or the previous row's payload, payload)``).
Pass the rows' changes one per row, in ``seq`` order, not pre-squashed: the replay uses
every value a field had on the device. The invariant to test: on :data:`MERGE_FIELDS`,
the local task equals ``apply_patch(base, squash(pending changes))``.

*Base copies.* One row per task in a server-copy table (``task_id``, ``version_id``,
``body`` = the server's wire JSON exactly as sent, unknown fields included, or a
``deleted`` mark), replaced by every server copy the device accepts: a pulled item
(one of our own ``changeId`` too: it is our change, applied), the ``data`` of a
``200``/``201`` answer, the ``server`` of a :class:`Merged` rebase. No row:
``base=None``. Its ``version_id`` is the next ``If-Match`` (``task_sync`` today).
While a conflict is open the base stays where it was: the parked rows are patches on it.

*Feeding rebase.* A server version for a task with pending rows, none in flight (a row
in flight: wait for its answer; it will be a 2xx or a 412), comes from a pulled item
not of our own, the ``data`` of a ``412`` (the refused row and every later row of the
task are the changes; a 412 without a task in ``data`` is transient: ``GET /tasks/{id}``
instead), or ``None`` for a ``404`` on ``PUT``. Call
``rebase(base_copy, server_task, [each row's change])`` and, in one transaction:

* :class:`Merged` -> the server task becomes the base copy; the task's pending rows
  are replaced by one row for ``send`` (none when ``send is None``) under a NEW change
  id (the server may have stored its 412 under the old key and would replay it), with
  ``op`` and ``if_match`` from the result; ``task`` is written as the local task (the
  store stamps its local version as for any write; ``None``: delete it locally; history
  marks the write as a rebase). Build ``PUT`` bodies as ``task``, and for later rows
  ``apply_patch(base_copy, squash(pending))``, so unknown server fields survive a ``PUT``;
* :class:`Conflict` -> the rows are parked and a conflict record keeps ``base``,
  ``server`` and ``local`` (the task's current local copy, which ``result.local``
  equals on :data:`MERGE_FIELDS`). Later local edits append rows as usual and update
  the record's local side (recompute its reasons with :func:`three_way`). A newer server
  version runs ``rebase`` again from the same base and rows, replacing the record or
  merging it away. ``resolve`` writes its result as one new row on the record's server
  version, which becomes the base copy.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

import attrs

from .codec import decode_task, wire_name
from .errors import FieldError, ValidationError
from .lifecycle import transition_problem
from .model import Task, TaskStatus

__all__ = [
    "DELETE",
    "DELETE_VS_UPDATE",
    "FIELD",
    "INVALID",
    "LIFECYCLE",
    "MERGE_FIELDS",
    "SERVER_MANAGED",
    "UPDATE_VS_DELETE",
    "Change",
    "Conflict",
    "ConflictReason",
    "Merged",
    "Patch",
    "ReasonKind",
    "RebaseResult",
    "apply_patch",
    "patch_of",
    "rebase",
    "squash",
    "three_way",
]

#: Wire fields the server assigns; never part of a patch.
SERVER_MANAGED: frozenset[str] = frozenset({"id", "versionId", "lastModified"})
#: Every wire field a patch may set: the model's top-level wire fields, less SERVER_MANAGED.
MERGE_FIELDS: tuple[str, ...] = tuple(
    sorted(
        name
        for name in (wire_name(a.name) for a in attrs.fields(Task))
        if name not in SERVER_MANAGED
    )
)
_MERGE_FIELD_SET = frozenset(MERGE_FIELDS)
_VALIDATED_FIELDS = _MERGE_FIELD_SET | {"id"}


class _Delete(enum.Enum):
    DELETE = "delete"

    def __repr__(self) -> str:
        return "DELETE"


#: The marker for a local change that deleted the task.
DELETE: Literal[_Delete.DELETE] = _Delete.DELETE

Patch: TypeAlias = dict[str, Any]
"""Top-level wire field -> its new value; ``None`` means the field was cleared."""
Change: TypeAlias = Mapping[str, Any] | Literal[_Delete.DELETE]
"""One local change: a patch, or :data:`DELETE`."""

ReasonKind: TypeAlias = Literal[
    "field", "update vs delete", "delete vs update", "lifecycle", "invalid"
]
#: The same field changed on both sides to different values.
FIELD: ReasonKind = "field"
#: The local side updated the task; the server deleted it.
UPDATE_VS_DELETE: ReasonKind = "update vs delete"
#: The local side deleted the task; the server changed it since the base.
DELETE_VS_UPDATE: ReasonKind = "delete vs update"
#: Both changed ``status``, and the local status is not allowed from the server's.
LIFECYCLE: ReasonKind = "lifecycle"
#: The merged task does not validate (``paths`` says where).
INVALID: ReasonKind = "invalid"


@attrs.frozen(kw_only=True)
class ConflictReason:
    """Why a rebase could not merge, one reason per problem.

    ``field`` is the wire field for ``"field"`` and ``"lifecycle"`` reasons (``None``
    otherwise) and ``base``/``local``/``server`` its three values (``None`` = absent).
    ``paths`` are the ValidationError's wire paths for ``"invalid"``.
    """

    kind: ReasonKind
    message: str
    field: str | None = None
    base: Any = None
    local: Any = None
    server: Any = None
    paths: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Merged:
    """The changes merged. Store ``task``; send ``send`` (unless ``None``).

    ``task``: the merged wire task (the server's ``id``/``versionId``/``lastModified``
    and unknown fields); ``None`` when the task ends deleted.
    ``send``: what still has to reach the server, relative to its new version: a patch,
    :data:`DELETE`, or ``None`` when the merge equals the server's task.
    ``op``: the request that delivers ``send``: ``"create"`` (``POST`` the full task: the
    server has no version of it), ``"update"`` (``PUT`` ``task`` with ``If-Match:
    if_match``), ``"delete"`` (``DELETE`` with ``If-Match: if_match``), or ``None``.
    """

    task: dict[str, Any] | None
    send: Patch | Literal[_Delete.DELETE] | None
    op: Literal["create", "update", "delete"] | None
    if_match: str | None


@attrs.frozen(kw_only=True)
class Conflict:
    """The changes could not merge; nothing is lost.

    ``reasons`` (at least one); ``base`` and ``server`` as given (normalised: absent,
    ``null`` and empty-list fields dropped); ``local`` the current local task, i.e. the
    base with every change applied (``None`` when the local side deleted it).
    """

    reasons: tuple[ConflictReason, ...]
    base: dict[str, Any] | None
    server: dict[str, Any] | None
    local: dict[str, Any] | None

    @property
    def fields(self) -> tuple[str, ...]:
        """The wire fields in conflict (``"field"`` reasons), in field-name order."""
        return tuple(r.field for r in self.reasons if r.kind == FIELD and r.field is not None)


RebaseResult: TypeAlias = Merged | Conflict


# --- values ----------------------------------------------------------------------------


def _absent(value: object) -> bool:
    return value is None or (isinstance(value, list) and not value)


def _canon(value: object) -> object:
    """A form in which ``==`` is JSON-value equality (bools apart from numbers)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, Mapping):
        return {k: _canon(v) for k, v in value.items() if not _absent(v)}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    return value


def _same(a: object, b: object) -> bool:
    if _absent(a) or _absent(b):
        return _absent(a) and _absent(b)
    return _canon(a) == _canon(b)


def _normalised(wire: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if wire is None:
        return None
    if not isinstance(wire, Mapping):
        raise ValidationError.single("$", "a wire task must be a mapping", wire)
    return {k: v for k, v in wire.items() if not _absent(v)}


# --- patches ---------------------------------------------------------------------------


def patch_of(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> Patch:
    """The top-level wire fields ``after`` sets differently from ``before``.

    A field ``after`` lacks (or has as ``null`` / ``[]``) maps to ``None``. Only
    :data:`MERGE_FIELDS` count: server-managed fields and fields this version does not
    know are ignored. ``before=None`` is the empty task, so the patch of a create is
    every field it sets. ``apply_patch(before, patch_of(before, after))`` equals
    ``after`` on :data:`MERGE_FIELDS`.
    """
    old = _normalised(before) or {}
    new = _normalised(after) or {}
    patch: Patch = {}
    for name in MERGE_FIELDS:
        if not _same(old.get(name), new.get(name)):
            patch[name] = new.get(name)
    return patch


def _check_patch(change: Mapping[str, Any], where: str) -> None:
    unknown = sorted(k for k in change if k not in _MERGE_FIELD_SET)
    if unknown:
        raise ValidationError(
            [
                FieldError(
                    f"{where}.{key}",
                    "is not a field a change may set",
                    None,
                    ", ".join(MERGE_FIELDS),
                )
                for key in unknown
            ]
        )


def apply_patch(wire: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> dict[str, Any]:
    """``wire`` (``None``: the empty task) with ``patch`` applied; ``None`` values clear.

    Refuses (ValidationError) a patch key outside :data:`MERGE_FIELDS`.
    """
    _check_patch(patch, "patch")
    out = _normalised(wire) or {}
    for name, value in patch.items():
        if _absent(value):
            out.pop(name, None)
        else:
            out[name] = value
    return out


def squash(changes: Sequence[Change]) -> Patch | Literal[_Delete.DELETE]:
    """The net effect of ``changes`` in order: one patch, or :data:`DELETE`.

    Later patches win field by field; a :data:`DELETE` must be the last change (a deleted
    task's id is never used again), anything after it is a ValidationError.
    """
    net: Patch = {}
    for index, change in enumerate(changes):
        if change is DELETE:
            if index != len(changes) - 1:
                raise ValidationError.single(
                    f"changes[{index + 1}]", "a change after a delete", allowed="DELETE last"
                )
            return DELETE
        if not isinstance(change, Mapping):
            raise ValidationError.single(
                f"changes[{index}]", "is neither a patch nor DELETE", change
            )
        _check_patch(change, f"changes[{index}]")
        net.update(change)
    return net


# --- rebase ----------------------------------------------------------------------------


def rebase(
    base: Mapping[str, Any] | None,
    server: Mapping[str, Any] | None,
    changes: Sequence[Change],
) -> RebaseResult:
    """Replay the undelivered local ``changes`` (made on ``base``, in order) onto ``server``.

    See the module docstring for the rules and for how the sync engine uses the result.
    Raises only :class:`~clinik_local.errors.ValidationError`, for malformed arguments (a
    non-mapping task, a patch key outside :data:`MERGE_FIELDS`, a change after
    :data:`DELETE`); every problem of the merge itself is a :class:`Conflict`.
    """
    base_n = _normalised(base)
    server_n = _normalised(server)
    net = squash(changes)
    local = None if net is DELETE else apply_patch(base_n, net)
    # Every value each touched field had on the device: the base's, then each change's.
    before: dict[str, Any] = base_n if base_n is not None else {}
    history: dict[str, list[Any]] = {}
    for change in changes:
        if change is not DELETE:
            for name, value in change.items():
                history.setdefault(name, [before.get(name)]).append(
                    None if _absent(value) else value
                )
    return _merge(base_n, local, server_n, history)


def three_way(
    base: Mapping[str, Any] | None,
    local: Mapping[str, Any] | None,
    server: Mapping[str, Any] | None,
) -> RebaseResult:
    """Merge whole snapshots: ``local`` (``None``: deleted locally) made on ``base``.

    The same as ``rebase(base, server, [patch_of(base, local)])`` (or ``[DELETE]``).
    """
    change: Change = DELETE if local is None else patch_of(base, local)
    return rebase(base, server, [change])


def _merge(
    base: dict[str, Any] | None,
    local: dict[str, Any] | None,
    server: dict[str, Any] | None,
    history: dict[str, list[Any]],
) -> RebaseResult:
    empty: dict[str, Any] = {}
    before = base if base is not None else empty
    if_match = None if server is None else _version(server)

    def conflict(*reasons: ConflictReason) -> Conflict:
        return Conflict(reasons=reasons, base=base, server=server, local=local)

    if local is None:  # the local side deleted the task
        if server is None:
            return Merged(task=None, send=None, op=None, if_match=None)
        if base is not None and not patch_of(base, server):
            return Merged(task=None, send=DELETE, op="delete", if_match=if_match)
        return conflict(
            ConflictReason(
                kind=DELETE_VS_UPDATE,
                message="this device deleted the task; the server changed it since",
            )
        )

    if server is None:
        if base is not None:  # the server deleted the task
            if not history:
                return Merged(task=None, send=None, op=None, if_match=None)
            return conflict(
                ConflictReason(
                    kind=UPDATE_VS_DELETE,
                    message="this device changed "
                    + ", ".join(sorted(history))
                    + "; the server deleted the task",
                )
            )
        created = patch_of(None, local)
        if not created:  # never existed anywhere
            return Merged(task=None, send=None, op=None, if_match=None)
        problem = _invalid(local)
        if problem is not None:
            return conflict(problem)
        return Merged(task=local, send=created, op="create", if_match=None)

    merged = dict(server)
    reasons: list[ConflictReason] = []
    for name in sorted(history):
        theirs = server.get(name)
        mine = local.get(name)
        if any(_same(theirs, seen) for seen in history[name]):
            # The device had the server's value at some point (the base's: only the device
            # changed it); everything it set from there on was made on that value.
            if mine is None:
                merged.pop(name, None)
            else:
                merged[name] = mine
            continue
        reasons.append(
            ConflictReason(
                kind=FIELD,
                message=f"{name} was changed on this device and on the server, differently",
                field=name,
                base=before.get(name),
                local=mine,
                server=theirs,
            )
        )
        if name == "status":
            why = _lifecycle_problem(theirs, mine)
            if why is not None:
                reasons.append(
                    ConflictReason(
                        kind=LIFECYCLE,
                        message=f"the server's status {theirs!r} cannot move to this "
                        f"device's {mine!r}: {why}",
                        field=name,
                        base=before.get(name),
                        local=mine,
                        server=theirs,
                    )
                )
    if reasons:
        return conflict(*reasons)
    send = patch_of(server, merged)
    if not send:
        return Merged(task=merged, send=None, op=None, if_match=if_match)
    problem = _invalid(merged)
    if problem is not None:
        return conflict(problem)
    return Merged(task=merged, send=send, op="update", if_match=if_match)


def _invalid(merged: Mapping[str, Any]) -> ConflictReason | None:
    """An ``"invalid"`` reason when the merged task fails the codec, else ``None``."""
    try:
        decode_task({k: v for k, v in merged.items() if k in _VALIDATED_FIELDS})
    except ValidationError as exc:
        return ConflictReason(
            kind=INVALID, message=f"the merged task is not valid: {exc}", paths=exc.paths
        )
    return None


def _version(server: Mapping[str, Any]) -> str | None:
    version = server.get("versionId")
    return version if isinstance(version, str) else None


def _lifecycle_problem(server_status: object, local_status: object) -> str | None:
    if not isinstance(server_status, str) or not isinstance(local_status, str):
        return None
    try:
        old = TaskStatus(server_status)
        new = TaskStatus(local_status)
    except ValueError:  # a status this version does not know: the field conflict says it
        return None
    return transition_problem(old, new)
