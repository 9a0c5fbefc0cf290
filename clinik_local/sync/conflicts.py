"""Dead-letter admin and conflict resolution: the engine's public calls for parked changes.

Through :mod:`clinik_local.storage.outbox` (the parked rows) and
:mod:`clinik_local.storage.rows` (the task, when a resolution changes it); no SQL here.
A resolution that keeps the server's version stores a *server copy*
(``rows.write_server_copy`` / ``rows.delete_server_copy``: no outbox row); one that
keeps the local version, or a merge, is a *local edit* (one new outbox row on the
server's version). Either way the server's task becomes the task's base.

A conflict shows three versions: the ``base`` (the last server copy the local changes
were made on), the ``server``'s task, and the **current** local task, read when
:func:`conflicts` is called, so every edit made after the conflict was found is in it
(the 412'd change alone is not what the user has now). ``local_version`` is that local
task's version: pass it to :func:`resolve` and a resolution decided on an older local
task is refused (VersionConflictError) instead of discarding an edit it did not show.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

from .. import merge, timestamps
from ..codec import decode_task, encode_task, task_from_stored
from ..errors import NotFoundError, ValidationError, VersionConflictError
from ..storage import outbox, replica, rows
from ..storage.database import Database
from ..wire import dumps, loads, loads_or_none, without_server_fields

__all__ = ["DeadLetter", "SyncConflict", "conflicts", "dead_letters", "discard", "resolve", "retry"]

#: The history's override reason for versions a conflict resolution wrote.
RESOLUTION_REASON = "sync conflict"


@attrs.frozen(kw_only=True)
class DeadLetter:
    """A change the server refused for good, parked until retried or discarded."""

    change_id: str
    task_id: str
    op: str
    payload: dict[str, Any] | None
    status: int | None
    body: str | None
    error: str | None
    attempts: int
    created_at: str
    parked_at: str | None


@attrs.frozen(kw_only=True)
class SyncConflict:
    """A task whose undelivered changes could not merge with the server's version.

    ``local``: the current local task (wire form; None when deleted here), including
    every edit made since the conflict was found; ``local_version`` its version (pass
    it to ``resolve``). ``server``: the server's task (None: the server deleted it).
    ``base``: the server copy the local changes were made on (None: the task was
    created here). ``reasons``: why they do not merge (``merge.ConflictReason``: the
    fields changed on both sides with the three values, update vs delete, lifecycle).
    ``change_id``: the parked change; ``detected_at``: when the conflict was found.
    """

    task_id: str
    change_id: str
    local: dict[str, Any] | None
    server: dict[str, Any] | None
    detected_at: str
    base: dict[str, Any] | None = None
    local_version: int | None = None
    reasons: tuple[merge.ConflictReason, ...] = ()


def dead_letters(db: Database) -> list[DeadLetter]:
    """Every parked change, oldest first, with the server's status and body."""
    with db.read() as conn:
        found = outbox.dead_letters(conn)
    return [
        DeadLetter(
            change_id=r.change_id,
            task_id=r.task_id,
            op=r.op,
            payload=loads_or_none(r.payload),
            status=r.status,
            body=r.body,
            error=r.error,
            attempts=r.attempts,
            created_at=r.created_at,
            parked_at=r.parked_at,
        )
        for r in found
    ]


def retry(db: Database, change_id: str) -> str:
    """Send a dead letter again under a new change id, which is returned
    (NotFoundError if there is no such dead letter)."""
    with db.write() as conn:
        fresh = outbox.retry_dead(conn, change_id)
        if fresh is None:
            raise NotFoundError(f"no dead letter with change_id {change_id!r}")
    return fresh


def _check_status(status: object) -> int | None:
    if status is None:
        return None
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValidationError.single("status", "expected an HTTP status code", status, "100-599")
    return status


def retry_all(db: Database, status: int | None = None) -> int:
    """Send every dead letter again (only those answered ``status``, if given), each
    under a new change id; returns how many."""
    wanted = _check_status(status)
    with db.write() as conn:
        return outbox.retry_dead_all(conn, wanted)


def discard_all(db: Database, status: int | None = None) -> int:
    """Drop every dead letter (only those answered ``status``, if given); how many."""
    wanted = _check_status(status)
    with db.write() as conn:
        return outbox.discard_dead_all(conn, wanted)


def discard(db: Database, change_id: str) -> None:
    """Drop a dead letter for good (NotFoundError if there is no such dead letter)."""
    with db.write() as conn:
        if not outbox.discard_dead(conn, change_id):
            raise NotFoundError(f"no dead letter with change_id {change_id!r}")


def _object(text: str | None) -> dict[str, Any] | None:
    value = loads_or_none(text)
    return value if isinstance(value, dict) else None


def conflicts(db: Database, task_id: str | None = None) -> list[SyncConflict]:
    """Every task in conflict (or just ``task_id``'s), with base, server and the
    current local task, all read in one transaction."""
    out: list[SyncConflict] = []
    with db.read() as conn:
        if task_id is None:
            found = outbox.conflicts(conn)
        else:
            one = outbox.conflict_of(conn, task_id)
            found = [] if one is None else [one]
        for r in found:
            current = rows.current(conn, r.task_id)
            base = replica.base_of(conn, r.task_id)
            local = None if current is None else _object(current[0])
            server = _object(r.server_body)
            base_body = None if base is None else _object(base.body)
            reasons: tuple[merge.ConflictReason, ...] = ()
            try:
                result = merge.three_way(base_body, local, server)
            except ValidationError:
                result = None
            if isinstance(result, merge.Conflict):
                reasons = result.reasons
            out.append(
                SyncConflict(
                    task_id=r.task_id,
                    change_id=r.change_id,
                    local=local,
                    server=server,
                    detected_at=r.detected_at,
                    base=base_body,
                    local_version=None if current is None else current[1],
                    reasons=reasons,
                )
            )
    return out


def _resolution_body(
    server: dict[str, Any] | None, local: dict[str, Any]
) -> tuple[dict[str, Any], merge.Patch]:
    """The local task's known fields over the server's task (its unknown fields kept),
    and the patch that makes the server's task that."""
    if server is None:
        return dict(local), merge.patch_of(None, local)
    patch = merge.patch_of(server, local)
    body = without_server_fields(merge.apply_patch(server, patch))
    return body, patch


def resolve(
    db: Database,
    task_id: str,
    keep: Literal["local", "remote"] | Mapping[str, object],
    *,
    local_version: int | None = None,
    in_scope: Callable[[Mapping[str, Any]], bool] | None = None,
) -> None:
    """Settle a conflict (see :meth:`clinik_local.sync.SyncEngine.resolve`).

    ``in_scope``: a pulling store's scope test; a task that ends outside it with
    nothing to send is removed locally (as a pulled one would be).
    """
    merged: Any = None
    if isinstance(keep, Mapping):
        request = without_server_fields(keep)
        if request.get("id", task_id) != task_id:
            raise ValidationError.single("id", "must be the conflicted task's id", keep["id"])
        request["id"] = task_id
        known = {k: v for k, v in request.items() if k in rows.KNOWN_FIELDS}
        merged = decode_task(known)
    elif keep not in ("local", "remote"):
        raise ValidationError.single(
            "keep", "is not an allowed value", keep, "local, remote, or a merged request"
        )
    if local_version is not None and (
        isinstance(local_version, bool) or not isinstance(local_version, int)
    ):
        raise ValidationError.single(
            "local_version", "expected the SyncConflict's local_version", local_version
        )
    with db.write() as conn:
        conflict = outbox.conflict_of(conn, task_id)
        if conflict is None:
            raise NotFoundError(f"task {task_id!r} has no sync conflict")
        current = rows.current(conn, task_id)
        if local_version is not None and (current is None or current[1] != local_version):
            raise VersionConflictError(
                task_id, str(local_version), "deleted" if current is None else str(current[1])
            )
        server = _object(conflict.server_body)
        base = replica.base_of(conn, task_id)
        base_body = None if base is None else _object(base.body)
        top = rows.top_version(conn, task_id)
        now = timestamps.now()
        generation = replica.read_state(conn).generation
        outbox.drop_open_changes(conn, task_id)
        if server is None:
            outbox.forget_server_version(conn, task_id)
            replica.drop_base(conn, task_id)
        else:
            version = server.get("versionId")
            version_text = None if version is None else str(version)
            outbox.set_server_version(conn, task_id, version_text, server.get("lastModified"), now)
            assert conflict.server_body is not None
            replica.set_base(conn, task_id, version_text, conflict.server_body, listed=generation)
        origin: Literal["local", "pulled"] = "local"
        if keep == "remote":
            origin = "pulled"
            if server is None:
                rows.delete_server_copy(conn, task_id, now=now)
            elif in_scope is not None and not in_scope(server):
                rows.delete_server_copy(conn, task_id, now=now)
                replica.drop_base(conn, task_id)
                outbox.forget_server_version(conn, task_id)
            else:
                rows.write_server_copy(conn, task_id, server, now=now, reason=RESOLUTION_REASON)
        elif keep == "local":
            if current is None:
                if server is not None:
                    outbox.enqueue(conn, task_id, "delete", None, top, now)
            else:
                local = _local_side(base_body, server, loads(current[0]))
                _write_local(conn, task_id, server, local, top, now, exists=True)
        else:
            task = rows.stamp(merged, top + 1, now)
            local = encode_task(task)
            if server is not None:  # fields this version does not know: the server's
                local.update({k: v for k, v in server.items() if k not in rows.KNOWN_FIELDS})
            _write_local(conn, task_id, server, local, top, now, exists=current is not None)
        if (
            keep != "remote"
            and server is not None
            and in_scope is not None
            and not in_scope(server)
            and not outbox.has_open_changes(conn, task_id)
        ):
            # The resolution is the server's task (nothing to send) and it is outside the
            # scope: removed, as a pulled one would be (it would stay here forever).
            rows.delete_server_copy(conn, task_id, now=now)
            replica.drop_base(conn, task_id)
            outbox.forget_server_version(conn, task_id)
        db.note_change(task_id, origin)


def _local_side(
    base: dict[str, Any] | None, server: dict[str, Any] | None, local: dict[str, Any]
) -> dict[str, Any]:
    """What ``keep="local"`` keeps: every field this device changed since the base, with
    its local value, on top of the server's task. A field only the server changed stays
    the server's: the whole local snapshot is never squashed onto the server's version
    (that would revert edits the conflict did not show). No base (a task created here)
    or no server task: the local task as it is."""
    if base is None or server is None:
        return local
    return {**merge.apply_patch(server, merge.patch_of(base, local)), "id": local["id"]}


def _write_local(
    conn: Any,
    task_id: str,
    server: dict[str, Any] | None,
    local: dict[str, Any],
    top: int,
    now: str,
    *,
    exists: bool,
) -> None:
    """The resolved local task, as one local change on the server's version (or, when
    it equals the server's task, as a server copy with nothing to send)."""
    body, patch = _resolution_body(server, local)
    if server is not None and not patch:
        rows.write_server_copy(conn, task_id, server, now=now, reason=RESOLUTION_REASON)
        return
    task = task_from_stored({**body, "id": task_id})
    task = rows.stamp(task, top + 1, now)
    body["id"] = task_id
    body["versionId"] = task.version_id
    body["lastModified"] = task.last_modified
    rows.update_local(
        conn,
        task,
        dumps(body),
        base_version=top,
        changed_at=now,
        reason=RESOLUTION_REASON,
        exists=exists,
        patch=dumps(patch),
    )
