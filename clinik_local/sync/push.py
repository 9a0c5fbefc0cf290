"""The push half of sync: outbox rows through a Remote, and their outcomes recorded.

No SQL here and no HTTP: rows are read and recorded through
:mod:`clinik_local.storage.outbox`, and sent through a
:class:`~clinik_local.remotes.base.Remote`. The engine (:mod:`.engine`) decides when
a pass runs and what a stop means; this module does one batch:

1. :func:`sendable` picks the rows of a chunk that may go now (not behind a parked
   change of their task, not waiting for a retry);
2. :func:`send_lane` sends rows in order over one lane; a task whose change fails
   holds back its own later rows only; an :class:`~.base.Unreachable` or
   :class:`~.base.AuthFailed` outcome stops the whole batch (the rest stays unsent);
3. :func:`record` writes every answer of the batch in one short transaction: a
   delivered change's server task becomes the task's base (and, when it left the
   scope and nothing else is pending, the local copy is removed); a ``412`` with the
   server's task rebases the task's open changes on it (:func:`.rebase.accept`).

The pull half is :mod:`.pull`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import apsw
import attrs

from ..remotes.base import (
    AuthFailed,
    Change,
    Conflict,
    Delivered,
    PushOutcome,
    Refused,
    Remote,
    Transient,
    Unreachable,
)
from ..storage import outbox, rows
from ..storage.database import Database
from ..storage.outbox import OutboxRow
from ..wire import dumps, loads_or_none, without_server_fields
from . import rebase

__all__ = ["Recorded", "Sent", "record", "send_lane", "sendable", "to_change"]


@attrs.frozen
class Sent:
    """One row of a batch and what became of it (``None``: not sent after all)."""

    row: OutboxRow
    outcome: PushOutcome | None


def sendable(
    rows: list[OutboxRow], blocked: set[str], now: str, note_due: Callable[[str], None]
) -> list[OutboxRow]:
    """The rows that may go now. A row waiting for its retry time blocks its task's
    later rows for this pass (per-task order); ``note_due`` hears of each such time."""
    batch: list[OutboxRow] = []
    for row in rows:
        if row.task_id in blocked:
            continue
        if row.next_attempt_at is not None and row.next_attempt_at > now:
            blocked.add(row.task_id)
            note_due(row.next_attempt_at)
            continue
        batch.append(row)
    return batch


def to_change(row: OutboxRow, server_version: str | None) -> Change:
    """The Remote's view of an outbox row."""
    body: dict[str, Any] | None = None
    if row.op != "delete":
        stored = loads_or_none(row.payload)
        body = without_server_fields(stored if isinstance(stored, dict) else {})
    return Change(
        change_id=row.change_id,
        task_id=row.task_id,
        op=row.op,
        body=body,
        server_version=server_version,
        known_on_server=row.on_server and server_version is None,
        base=_base_of(row) if row.on_server and server_version is None else None,
    )


def _base_of(row: OutboxRow) -> dict[str, Any] | None:
    stored = loads_or_none(row.base_body)
    return without_server_fields(stored) if isinstance(stored, dict) else None


def _push(remote: Remote, row: OutboxRow, version: str | None, lane: int) -> PushOutcome:
    if row.op == "delete" and version is None and not row.on_server:
        # The server never acknowledged this task: there is nothing to delete there.
        return Delivered(gone=True, applied=False)
    return remote.push(to_change(row, version), lane=lane)


def send_lane(
    remote: Remote,
    rows: list[OutboxRow],
    blocked: set[str],
    halt: threading.Event,
    lane: int,
    stopping: Callable[[], bool],
) -> tuple[list[Sent], list[AuthFailed | Unreachable]]:
    """Send rows in order; a task that fails stops its later rows (not others').

    Returns what became of each row, and the outcomes that stopped the batch (after
    which this and every other lane leave their remaining rows unsent).
    """
    sent: list[Sent] = []
    stops: list[AuthFailed | Unreachable] = []
    versions: dict[str, str | None] = {}
    for index, row in enumerate(rows):
        if row.task_id in blocked:
            sent.append(Sent(row, None))
            continue
        if stopping() or halt.is_set():
            halt.set()
            sent.extend(Sent(r, None) for r in rows[index:])
            break
        outcome = _push(remote, row, versions.get(row.task_id, row.server_version), lane)
        if isinstance(outcome, (AuthFailed, Unreachable)):
            halt.set()
            stops.append(outcome)
            sent.extend(Sent(r, None) for r in rows[index:])
            break
        sent.append(Sent(row, outcome))
        if isinstance(outcome, Delivered):
            versions[row.task_id] = outcome.version
        else:
            blocked.add(row.task_id)
    return sent, stops


@attrs.define
class Recorded:
    """What recording a batch did: any change delivered; tasks now in conflict."""

    delivered: bool = False
    conflicts: list[str] = attrs.field(factory=list)


def _delivered(
    db: Database,
    conn: apsw.Connection,
    ctx: rebase.Context,
    row: OutboxRow,
    outcome: Delivered,
    now: str,
) -> None:
    """The server's answer becomes the base; a task that left the scope goes."""
    if outcome.gone:
        rows_left = outbox.has_open_changes(conn, row.task_id)
        if not rows_left:
            rebase.record_delivered_delete(conn, ctx, row.task_id, applied=outcome.applied)
        return
    task = outcome.task
    if task is None:  # no body in the answer: the server holds what was sent
        sent = loads_or_none(row.payload)
        if not isinstance(sent, dict):
            return
        task = {**without_server_fields(sent), "versionId": outcome.version}
        if outcome.modified is not None:
            task["lastModified"] = outcome.modified
    rebase.record_delivered_base(conn, ctx, row.task_id, task, outcome.version, now)
    if not outbox.has_open_changes(conn, row.task_id) and not rebase.scope_matches(ctx.scope, task):
        if rows.delete_server_copy(conn, row.task_id, now=now):
            db.note_change(row.task_id, "pulled")
        rebase.replica_forget(conn, row.task_id)
        outbox.forget_server_version(conn, row.task_id)


def record(
    db: Database,
    conn: apsw.Connection,
    ctx: rebase.Context,
    sent: list[Sent],
    now: str,
    retry_delay: Callable[[OutboxRow, Transient], float],
    instant_in: Callable[[float], str],
) -> Recorded:
    """Write the answers of one batch (on the caller's write transaction).

    ``retry_delay`` says how long a transient failure waits. Only rows still
    ``in_flight`` are recorded: a late answer for a row another engine took over, or a
    resolution replaced, changes nothing. Returns whether any change was delivered and
    which tasks are now in conflict.
    """
    done = Recorded()
    live = outbox.still_in_flight(conn, (item.row.seq for item in sent))
    for item in sent:
        row, outcome = item.row, item.outcome
        if row.seq not in live:
            continue  # no longer in flight (taken over, or replaced): a stale answer
        if outcome is None:
            outbox.record_unsent(conn, row.seq)
        elif isinstance(outcome, Delivered):
            done.delivered = True
            outbox.record_delivered(
                conn,
                row.seq,
                row.task_id,
                version=outcome.version,
                modified=outcome.modified,
                gone=outcome.gone,
                now=now,
            )
            _delivered(db, conn, ctx, row, outcome, now)
        elif isinstance(outcome, Transient):
            delay = retry_delay(row, outcome)
            outbox.record_transient(
                conn,
                row.seq,
                retry_at=instant_in(delay),
                error=outcome.error,
                status=outcome.status,
            )
        elif (
            isinstance(outcome, Refused)
            and outcome.status == 404
            and row.op == "update"
            and (row.server_version is not None)
        ):
            # A PUT of a task the server no longer has: the server deleted it. Like a
            # pulled delete, the task's changes are rebased on "no task" (an update
            # against a delete is a conflict, kept; nothing changed here is dropped).
            accepted = rebase.accept(db, conn, ctx, row.task_id, None, None, now)
            if accepted.conflict:
                done.conflicts.append(row.task_id)
        elif isinstance(outcome, Refused):
            outbox.record_dead(
                conn,
                row.seq,
                now=now,
                error=outcome.error,
                status=outcome.status,
                body=outcome.body,
            )
        elif isinstance(outcome, Conflict):
            server = outcome.server_task
            if server is None:  # no server task to merge with: both sides are kept
                outbox.record_conflict(conn, row, body=outcome.body, server_body=None, now=now)
                done.conflicts.append(row.task_id)
                continue
            version = server.get("versionId")
            accepted = rebase.accept(
                db,
                conn,
                ctx,
                row.task_id,
                server,
                None if version is None else str(version),
                now,
                raw=dumps(server),
                unseen=True,
            )
            if accepted.conflict:
                done.conflicts.append(row.task_id)
        else:  # AuthFailed / Unreachable never reach here: they stop the batch unsent
            raise AssertionError(f"unexpected outcome {outcome!r}")
    return done
