"""Dead-letter admin and conflict resolution: the engine's public calls for parked changes.

Through :mod:`clinik_local.storage.outbox` (the parked rows) and
:mod:`clinik_local.storage.rows` (the task, when a resolution changes it); no SQL here.
A resolution that keeps the server's version stores a *server copy*
(``rows.write_server_copy`` / ``rows.delete_server_copy``: no outbox row); one that
keeps the local version, or a merge, is a *local edit* (one new outbox row on the
server's version). The conflict policy is these functions; a three-way merge (next)
plugs in as another ``keep=`` value computed from the history and both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from .. import timestamps
from ..codec import decode_task, encode_task
from ..errors import NotFoundError, ValidationError
from ..storage import outbox, rows
from ..storage.database import Database
from ..wire import dumps, loads_or_none, without_server_fields

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
    """A task whose change the server refused with 412: both versions, kept."""

    task_id: str
    change_id: str
    local: dict[str, Any] | None
    server: dict[str, Any] | None
    detected_at: str


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


def conflicts(db: Database) -> list[SyncConflict]:
    """Every task in conflict, with the local change and the server's current task."""
    with db.read() as conn:
        found = outbox.conflicts(conn)
    return [
        SyncConflict(
            task_id=r.task_id,
            change_id=r.change_id,
            local=loads_or_none(r.local_body),
            server=loads_or_none(r.server_body),
            detected_at=r.detected_at,
        )
        for r in found
    ]


def resolve(
    db: Database, task_id: str, keep: Literal["local", "remote"] | Mapping[str, object]
) -> None:
    """Settle a conflict (see :meth:`clinik_local.sync.SyncEngine.resolve`)."""
    merged: Any = None
    if isinstance(keep, Mapping):
        request = without_server_fields(keep)
        if request.get("id", task_id) != task_id:
            raise ValidationError.single("id", "must be the conflicted task's id", keep["id"])
        request["id"] = task_id
        merged = decode_task(request)
    elif keep not in ("local", "remote"):
        raise ValidationError.single(
            "keep", "is not an allowed value", keep, "local, remote, or a merged request"
        )
    with db.write() as conn:
        conflict = outbox.conflict_of(conn, task_id)
        if conflict is None:
            raise NotFoundError(f"task {task_id!r} has no sync conflict")
        server = loads_or_none(conflict.server_body)
        current = rows.current(conn, task_id)
        top = rows.top_version(conn, task_id)
        now = timestamps.now()
        outbox.drop_open_changes(conn, task_id)
        if server is None:
            outbox.forget_server_version(conn, task_id)
        else:
            outbox.set_server_version(
                conn, task_id, server.get("versionId"), server.get("lastModified"), now
            )
        if keep == "local":
            if current is not None:
                outbox.enqueue(conn, task_id, "update", current[0], current[1], now)
            elif server is not None:
                outbox.enqueue(conn, task_id, "delete", None, top, now)
        elif keep == "remote":
            if server is None:
                rows.delete_server_copy(conn, task_id, now=now)
            else:
                rows.write_server_copy(conn, task_id, server, now=now, reason=RESOLUTION_REASON)
        else:
            task = rows.stamp(merged, top + 1, now)
            rows.update_local(
                conn,
                task,
                dumps(encode_task(task)),
                base_version=top,
                changed_at=now,
                reason=RESOLUTION_REASON,
                exists=current is not None,
            )
