"""All SQL on ``outbox``, ``task_sync`` and ``sync_conflicts``: the one owner of those tables.

``outbox``: one row per local change, written inside the change's own transaction by
:mod:`.rows` (:func:`enqueue`), so the task, its history row and its outbox row commit
together or not at all. Each row's ``change_id`` is the ``Idempotency-Key`` every
delivery attempt of that change carries. The sync engine moves rows through their
states (``pending`` -> ``in_flight`` -> deleted when delivered, or parked as ``dead`` /
``conflict``) with the ``record_*`` calls, each on the caller's open write transaction.

``task_sync``: the server's version of each task it acknowledged (sent as ``If-Match``).
A task with no ``task_sync`` row and no open change was never received by the server
(its create's dead letter was discarded, or the store moved to another service): its
state is ``local-only``, and its next local change goes as a create.
``sync_conflicts``: both sides of a change the server refused with 412.

Rows come out as typed attrs objects (:class:`OutboxRow`, :class:`DeadLetterRow`,
:class:`ConflictRow`), never as raw tuples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import apsw
import attrs

from ..ids import new_change_id
from .connection import fetch_all, ids_among, meta_value, set_meta

__all__ = [
    "PAYLOAD",
    "STATE_BY_RANK",
    "SYNC_RANK_SUBQUERY",
    "ConflictRow",
    "DeadLetterRow",
    "Op",
    "OpenChange",
    "OutboxRow",
    "TaskSyncState",
    "change_task",
    "clear_backoff",
    "conflict_count",
    "conflict_of",
    "conflicts",
    "counts_by_state",
    "dead_letters",
    "deliverable_count",
    "discard_dead",
    "drop_open_changes",
    "enqueue",
    "enqueue_many",
    "forget_all_server_versions",
    "forget_server_version",
    "has_open_changes",
    "last_success_at",
    "mark_in_flight",
    "oldest_change_at",
    "open_changes",
    "park_conflict",
    "parked_tasks",
    "record_conflict",
    "record_dead",
    "record_delivered",
    "record_transient",
    "record_unsent",
    "recover_in_flight",
    "replace_open_changes",
    "retry_dead",
    "select_sendable",
    "server_version_of",
    "set_last_success_at",
    "set_server_version",
    "set_server_versions",
    "still_in_flight",
    "sync_state_of",
    "tasks_with_open_changes",
]

Op = Literal["create", "update", "delete"]
#: One task's sync state, as ``meta["syncState"]`` reports it (not the engine's state).
TaskSyncState = Literal["pending", "synced", "conflict", "rejected", "local-only"]

#: The payload of the outbox row aliased ``o``. A local create or update written by
#: storage/rows.py stores NULL there (schema version 4): its body is the body of the
#: version the change wrote, ``ifnull(base_version, 0) + 1``, kept once, in its history
#: row (or in tasks.body while it is the current version; schema.sql), so a pending
#: change does not hold a second copy. A delete's payload is NULL; any other row
#: (a rebase's merged change, a row of an older file) carries its own.
PAYLOAD = (
    "CASE WHEN o.payload IS NOT NULL OR o.op = 'delete' THEN o.payload ELSE "
    "(SELECT coalesce(h.body, t.body) FROM task_history AS h "
    "LEFT JOIN tasks AS t ON t.id = h.task_id AND h.body IS NULL "
    "WHERE h.task_id = o.task_id AND h.version = ifnull(o.base_version, 0) + 1) END"
)

_INSERT_CHANGE = """
INSERT INTO outbox (change_id, task_id, op, payload, base_version, created_at, patch)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""

# conflict outranks rejected outranks pending; no open change at all means synced when
# the server acknowledged the task (a task_sync row), local-only when it never did.
_SYNC_STATE = """
SELECT coalesce(
    (SELECT min(CASE state WHEN 'conflict' THEN 0 WHEN 'dead' THEN 1 ELSE 2 END)
     FROM outbox WHERE task_id = ?1),
    (SELECT 3 WHERE NOT EXISTS (SELECT 1 FROM task_sync WHERE task_id = ?1)))
"""
#: The same rank as a scalar subquery, for reads that fetch a task and its state at once.
SYNC_RANK_SUBQUERY = (
    "coalesce((SELECT min(CASE state WHEN 'conflict' THEN 0 WHEN 'dead' THEN 1 ELSE 2 END) "
    "FROM outbox WHERE outbox.task_id = tasks.id), (SELECT 3 WHERE NOT EXISTS "
    "(SELECT 1 FROM task_sync WHERE task_sync.task_id = tasks.id)))"
)
STATE_BY_RANK: dict[int | None, TaskSyncState] = {
    0: "conflict",
    1: "rejected",
    2: "pending",
    3: "local-only",
    None: "synced",
}

_SELECT_SENDABLE = f"""
SELECT o.seq, o.change_id, o.task_id, o.op, {PAYLOAD}, o.attempts, o.next_attempt_at,
       s.server_version, s.task_id IS NOT NULL,
       CASE WHEN s.task_id IS NOT NULL AND s.server_version IS NULL THEN
           (SELECT h.body FROM task_history h
            WHERE h.task_id = o.task_id AND h.version = o.base_version) END
FROM outbox o LEFT JOIN task_sync s ON s.task_id = o.task_id
WHERE o.state IN ('pending', 'in_flight') AND o.seq > ?
ORDER BY o.seq LIMIT ?
"""
_PARKED_TASKS = "SELECT DISTINCT task_id FROM outbox WHERE state IN ('dead', 'conflict')"
_DELIVERABLE = """
SELECT count(*) FROM outbox o WHERE o.state IN ('pending', 'in_flight')
AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.task_id = o.task_id
                AND p.state IN ('dead', 'conflict') AND p.seq < o.seq)
"""
_UPSERT_SYNC = """
INSERT INTO task_sync (task_id, server_version, server_modified, synced_at) VALUES (?, ?, ?, ?)
ON CONFLICT (task_id) DO UPDATE SET server_version = excluded.server_version,
    server_modified = excluded.server_modified, synced_at = excluded.synced_at
"""


@attrs.frozen
class OutboxRow:
    """A change waiting to be sent, with the server's version of its task (if known)."""

    seq: int
    change_id: str
    task_id: str
    op: Op
    payload: str | None
    attempts: int
    next_attempt_at: str | None
    server_version: str | None
    #: The server holds this task (a task_sync row), even if its version is unknown.
    on_server: bool = False
    #: When its version is unknown (a restored task): the local version the change was
    #: made on, which is what this device believes the server holds.
    base_body: str | None = None


@attrs.frozen(kw_only=True)
class DeadLetterRow:
    """A parked (``dead``) change as stored; the engine turns it into a DeadLetter."""

    change_id: str
    task_id: str
    op: str
    payload: str | None
    status: int | None
    body: str | None
    error: str | None
    attempts: int
    created_at: str
    parked_at: str | None


@attrs.frozen(kw_only=True)
class ConflictRow:
    """A ``sync_conflicts`` row: the refused change and the server's task, as stored."""

    task_id: str
    change_id: str
    local_body: str | None
    server_body: str | None
    detected_at: str


# --- local changes ----------------------------------------------------------------------


def enqueue(
    conn: apsw.Connection,
    task_id: str,
    op: Op,
    payload: str | None,
    base_version: int | None,
    created_at: str,
    patch: str | None = None,
) -> str:
    """Append one change to the outbox (caller holds the write transaction).

    ``payload`` None for a delete, and for a local create or update whose body is the
    one its history row (version ``ifnull(base_version, 0) + 1``) keeps: reads get it
    from there (:data:`PAYLOAD`). ``patch``: the wire fields the change set, as JSON
    (``merge.patch_of``); None for a delete, and allowed for a create (its patch is its
    payload) or an update made on ``base_version`` (derived from the two bodies when
    needed).
    """
    change_id = new_change_id()
    conn.execute(_INSERT_CHANGE, (change_id, task_id, op, payload, base_version, created_at, patch))
    return change_id


def enqueue_many(
    conn: apsw.Connection,
    changes: list[tuple[str, Op, str | None, int | None, str]],
) -> None:
    """Append many changes ``(task_id, op, payload, base_version, created_at)`` at once."""
    conn.executemany(_INSERT_CHANGE, [(new_change_id(), *change, None) for change in changes])


def sync_state_of(conn: apsw.Connection, task_id: str) -> TaskSyncState:
    """pending | synced | conflict | rejected, derived from the task's open changes."""
    rank: int | None = fetch_all(conn, _SYNC_STATE, (task_id,))[0][0]
    return STATE_BY_RANK[rank]


# --- what to send -------------------------------------------------------------------------


def select_sendable(conn: apsw.Connection, after: int, limit: int) -> list[OutboxRow]:
    """Up to ``limit`` pending or in-flight changes after ``seq``, in order."""
    return [
        OutboxRow(
            int(seq),
            str(cid),
            str(tid),
            op,
            payload,
            int(attempts),
            next_at,
            version,
            bool(known),
            base,
        )
        for seq, cid, tid, op, payload, attempts, next_at, version, known, base in fetch_all(
            conn, _SELECT_SENDABLE, (after, limit)
        )
    ]


def parked_tasks(conn: apsw.Connection) -> set[str]:
    """Tasks with a dead or conflicted change: their later changes wait."""
    return {str(r[0]) for r in fetch_all(conn, _PARKED_TASKS)}


def deliverable_count(conn: apsw.Connection) -> int:
    """Changes still to deliver, not counting those held back behind a parked one."""
    return int(fetch_all(conn, _DELIVERABLE)[0][0])


def counts_by_state(conn: apsw.Connection) -> dict[str, int]:
    """Outbox rows per state (``pending``, ``in_flight``, ``dead``, ``conflict``)."""
    return {
        str(state): int(n)
        for state, n in fetch_all(conn, "SELECT state, count(*) FROM outbox GROUP BY state")
    }


def conflict_count(conn: apsw.Connection) -> int:
    """How many tasks are in conflict."""
    return int(fetch_all(conn, "SELECT count(*) FROM sync_conflicts")[0][0])


def oldest_change_at(conn: apsw.Connection) -> str | None:
    """When the oldest change still in the outbox was made, or None if it is empty."""
    oldest: str | None = fetch_all(conn, "SELECT min(created_at) FROM outbox")[0][0]
    return oldest


# --- the engine's bookkeeping (each on the caller's write transaction) -----------------


def recover_in_flight(conn: apsw.Connection) -> None:
    """Rows a dead process left ``in_flight`` go back to ``pending`` (sent again, same key)."""
    conn.execute("UPDATE outbox SET state = 'pending' WHERE state = 'in_flight'")


def clear_backoff(conn: apsw.Connection) -> None:
    """Every pending change is due now (the network is back)."""
    conn.execute(
        "UPDATE outbox SET next_attempt_at = NULL WHERE state = 'pending' "
        "AND next_attempt_at IS NOT NULL"
    )


def mark_in_flight(conn: apsw.Connection, seqs: Iterable[int]) -> None:
    """These pending rows are about to be sent."""
    conn.executemany(
        "UPDATE outbox SET state = 'in_flight' WHERE seq = ? AND state = 'pending'",
        [(seq,) for seq in seqs],
    )


def record_delivered(
    conn: apsw.Connection,
    seq: int,
    task_id: str,
    *,
    version: str | None,
    modified: str | None,
    gone: bool,
    now: str,
) -> None:
    """The server applied the change: drop the row, remember the server's version."""
    conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
    if gone:
        forget_server_version(conn, task_id)
    else:
        set_server_version(conn, task_id, version, modified, now)


def still_in_flight(conn: apsw.Connection, seqs: Iterable[int]) -> set[int]:
    """Which of these rows are still ``in_flight``: only their answers may be recorded
    (an answer for a row that no longer is, because another engine took it over or a
    resolution replaced it, is stale; recording it could write an older version back)."""
    wanted = list(seqs)
    found: set[int] = set()
    for start in range(0, len(wanted), 500):
        part = wanted[start : start + 500]
        marks = ",".join("?" * len(part))
        found.update(
            int(r[0])
            for r in fetch_all(
                conn,
                f"SELECT seq FROM outbox WHERE state = 'in_flight' AND seq IN ({marks})",
                tuple(part),
            )
        )
    return found


def record_unsent(conn: apsw.Connection, seq: int) -> None:
    """The row was not sent after all (the pass stopped): back to pending."""
    conn.execute(
        "UPDATE outbox SET state = 'pending' WHERE seq = ? AND state = 'in_flight'", (seq,)
    )


def record_transient(
    conn: apsw.Connection, seq: int, *, retry_at: str, error: str | None, status: int | None
) -> None:
    """A failure worth retrying: pending again, due at ``retry_at``."""
    conn.execute(
        "UPDATE outbox SET state = 'pending', attempts = attempts + 1, "
        "next_attempt_at = ?, last_error = ?, last_status = ? WHERE seq = ?",
        (retry_at, error, status, seq),
    )


def record_dead(
    conn: apsw.Connection, seq: int, *, now: str, error: str, status: int | None, body: str | None
) -> None:
    """The server refused the change for good: park it as a dead letter."""
    conn.execute(
        "UPDATE outbox SET state = 'dead', attempts = attempts + 1, "
        "next_attempt_at = ?, last_error = ?, last_status = ?, last_body = ? "
        "WHERE seq = ?",
        (now, error, status, body, seq),
    )


def record_conflict(
    conn: apsw.Connection, row: OutboxRow, *, body: str | None, server_body: str | None, now: str
) -> None:
    """The server refused the change with 412: park it and keep both versions."""
    conn.execute(
        "UPDATE outbox SET state = 'conflict', attempts = attempts + 1, "
        "last_error = 'version conflict (412)', last_status = 412, "
        "last_body = ? WHERE seq = ?",
        (body, row.seq),
    )
    conn.execute(
        "INSERT OR REPLACE INTO sync_conflicts "
        "(task_id, change_id, local_body, server_body, detected_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (row.task_id, row.change_id, row.payload, server_body, now),
    )


def set_server_version(
    conn: apsw.Connection, task_id: str, version: object, modified: object, now: str
) -> None:
    """The server holds ``task_id`` at ``version`` (the next change's ``If-Match``)."""
    conn.execute(_UPSERT_SYNC, (task_id, version, modified, now))


def mark_known_on_server(conn: apsw.Connection, task_ids: Sequence[str], now: str) -> None:
    """The server holds these tasks at a version not known here (a restore): a later
    change of one asks the server for its version instead of creating it again."""
    conn.executemany(
        "INSERT INTO task_sync (task_id, server_version, server_modified, synced_at) "
        "VALUES (?, NULL, NULL, ?) ON CONFLICT (task_id) DO NOTHING",
        [(task_id, now) for task_id in task_ids],
    )


def server_version_of(conn: apsw.Connection, task_id: str) -> str | None:
    """The server's version of the task as last acknowledged (the next ``If-Match``)."""
    found = fetch_all(conn, "SELECT server_version FROM task_sync WHERE task_id = ?", (task_id,))
    return None if not found or found[0][0] is None else str(found[0][0])


def forget_server_version(conn: apsw.Connection, task_id: str) -> None:
    """The server has no such task (any more): the next change of it is a create."""
    conn.execute("DELETE FROM task_sync WHERE task_id = ?", (task_id,))


# --- the changes of one task, for a rebase (pull side) ---------------------------------


@attrs.frozen(kw_only=True)
class OpenChange:
    """One undelivered change of a task (any state), with what a rebase needs.

    ``patch`` as stored (None: derive it); ``previous_body``: the local body the change
    was made on (the history row at ``base_version``), to derive a missing patch.
    """

    seq: int
    change_id: str
    op: Op
    payload: str | None
    patch: str | None
    state: str
    base_version: int | None
    previous_body: str | None


def open_changes(conn: apsw.Connection, task_id: str) -> list[OpenChange]:
    """Every change of the task still in the outbox, oldest first."""
    return [
        OpenChange(
            seq=int(r[0]),
            change_id=str(r[1]),
            op=r[2],
            payload=r[3],
            patch=r[4],
            state=str(r[5]),
            base_version=None if r[6] is None else int(r[6]),
            previous_body=r[7],
        )
        for r in fetch_all(
            conn,
            f"SELECT o.seq, o.change_id, o.op, {PAYLOAD}, o.patch, o.state, o.base_version, "
            "(SELECT coalesce(h.body, t.body) FROM task_history h "
            " LEFT JOIN tasks t ON t.id = h.task_id AND h.body IS NULL "
            " WHERE h.task_id = o.task_id AND h.version = o.base_version) "
            "FROM outbox o WHERE o.task_id = ? ORDER BY o.seq",
            (task_id,),
        )
    ]


def tasks_with_open_changes(conn: apsw.Connection, task_ids: Sequence[str]) -> set[str]:
    """Which of these tasks have a change still in the outbox (one query)."""
    return ids_among(conn, "SELECT DISTINCT task_id FROM outbox WHERE task_id IN ({ids})", task_ids)


def set_server_versions(
    conn: apsw.Connection, versions: Sequence[tuple[str, object, object]], now: str
) -> None:
    """Many :func:`set_server_version` at once: ``(task_id, version, modified)``."""
    conn.executemany(_UPSERT_SYNC, [(t, v, m, now) for t, v, m in versions])


def has_open_changes(conn: apsw.Connection, task_id: str) -> bool:
    """Whether the task has any change still in the outbox (undelivered)."""
    return bool(fetch_all(conn, "SELECT 1 FROM outbox WHERE task_id = ? LIMIT 1", (task_id,)))


def change_task(conn: apsw.Connection, change_id: str) -> str | None:
    """The task of an open change with this id (one of this store's own), or None."""
    found = fetch_all(conn, "SELECT task_id FROM outbox WHERE change_id = ?", (change_id,))
    return str(found[0][0]) if found else None


def replace_open_changes(
    conn: apsw.Connection,
    task_id: str,
    op: Op | None,
    payload: str | None,
    patch: str | None,
    base_version: int | None,
    now: str,
) -> str | None:
    """A rebase merged: the task's open changes (and conflict) become one new change
    under a NEW change id (returned), or none when ``op`` is None."""
    drop_open_changes(conn, task_id)
    if op is None:
        return None
    return enqueue(conn, task_id, op, payload, base_version, now, patch)


def park_conflict(
    conn: apsw.Connection, task_id: str, server_body: str | None, now: str
) -> str | None:
    """A rebase could not merge: the task's first open change is parked as ``conflict``
    (its later ones wait behind it) and the server's task is kept. Returns the parked
    change id (None if the task has no open change). A conflict already open keeps its
    change and time; only its server side is replaced."""
    first = fetch_all(
        conn,
        f"SELECT o.seq, o.change_id, {PAYLOAD} FROM outbox AS o WHERE o.task_id = ? "
        "ORDER BY o.seq LIMIT 1",
        (task_id,),
    )
    if not first:
        return None
    seq, change_id, payload = first[0]
    conn.execute(
        "UPDATE outbox SET state = 'conflict', last_error = 'version conflict', "
        "last_status = 412 WHERE seq = ? AND state != 'conflict'",
        (seq,),
    )
    conn.execute(
        "INSERT INTO sync_conflicts (task_id, change_id, local_body, server_body, detected_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET "
        "server_body = excluded.server_body",
        (task_id, str(change_id), payload, server_body, now),
    )
    return str(change_id)


def forget_all_server_versions(conn: apsw.Connection) -> None:
    """Another service: no version of the old one may go out as ``If-Match``."""
    conn.execute("DELETE FROM task_sync")


# --- dead letters and conflicts ---------------------------------------------------------


def dead_letters(conn: apsw.Connection) -> list[DeadLetterRow]:
    """Every dead letter, oldest first."""
    return [
        DeadLetterRow(
            change_id=str(r[0]),
            task_id=str(r[1]),
            op=str(r[2]),
            payload=r[3],
            status=None if r[4] is None else int(r[4]),
            body=r[5],
            error=r[6],
            attempts=int(r[7]),
            created_at=str(r[8]),
            parked_at=r[9],
        )
        for r in fetch_all(
            conn,
            f"SELECT o.change_id, o.task_id, o.op, {PAYLOAD}, o.last_status, o.last_body, "
            "o.last_error, o.attempts, o.created_at, o.next_attempt_at FROM outbox AS o "
            "WHERE o.state = 'dead' ORDER BY o.seq",
        )
    ]


def retry_dead(conn: apsw.Connection, change_id: str) -> str | None:
    """Make a dead letter pending again, as new, under a NEW change id (returned).

    A refused change was not applied, and a server may store its refusal under the
    key and replay it (the contract, "Writes"), so a retry is sent under a fresh key.
    None if there is no such dead letter.
    """
    fresh = new_change_id()
    conn.execute(
        "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = NULL, "
        "last_error = NULL, last_status = NULL, last_body = NULL, change_id = ? "
        "WHERE change_id = ? AND state = 'dead'",
        (fresh, change_id),
    )
    return fresh if conn.changes() else None


def _dead_ids(conn: apsw.Connection, status: int | None) -> list[str]:
    rows = conn.execute(
        "SELECT change_id FROM outbox WHERE state = 'dead' AND (? IS NULL OR last_status = ?) "
        "ORDER BY seq",
        (status, status),
    ).fetchall()
    return [str(r[0]) for r in rows]


def retry_dead_all(conn: apsw.Connection, status: int | None = None) -> int:
    """Retry every dead letter (those the server answered ``status``, if given)."""
    ids = _dead_ids(conn, status)
    for change_id in ids:
        retry_dead(conn, change_id)
    return len(ids)


def discard_dead(conn: apsw.Connection, change_id: str) -> bool:
    """Drop a dead letter; False if there is no such dead letter."""
    conn.execute("DELETE FROM outbox WHERE change_id = ? AND state = 'dead'", (change_id,))
    return bool(conn.changes())


def discard_dead_all(conn: apsw.Connection, status: int | None = None) -> int:
    """Drop every dead letter (those the server answered ``status``, if given)."""
    conn.execute(
        "DELETE FROM outbox WHERE state = 'dead' AND (? IS NULL OR last_status = ?)",
        (status, status),
    )
    return int(conn.changes())


# --- the engine's facts in meta ---------------------------------------------------------

_LAST_SUCCESS = "sync_last_success_at"


def last_success_at(conn: apsw.Connection) -> str | None:
    """When a change was last delivered (kept in the file across reopening), or None."""
    return meta_value(conn, _LAST_SUCCESS)


def set_last_success_at(conn: apsw.Connection, when: str) -> None:
    """Record a delivery's time (on the caller's write transaction)."""
    set_meta(conn, _LAST_SUCCESS, when)


def _conflict(r: tuple[object, ...]) -> ConflictRow:
    return ConflictRow(
        task_id=str(r[0]),
        change_id=str(r[1]),
        local_body=None if r[2] is None else str(r[2]),
        server_body=None if r[3] is None else str(r[3]),
        detected_at=str(r[4]),
    )


_SELECT_CONFLICTS = (
    "SELECT task_id, change_id, local_body, server_body, detected_at FROM sync_conflicts"
)


def conflicts(conn: apsw.Connection) -> list[ConflictRow]:
    """Every conflict, oldest first."""
    return [
        _conflict(r) for r in fetch_all(conn, _SELECT_CONFLICTS + " ORDER BY detected_at, task_id")
    ]


def conflict_of(conn: apsw.Connection, task_id: str) -> ConflictRow | None:
    """The task's conflict, or None."""
    rows = fetch_all(conn, _SELECT_CONFLICTS + " WHERE task_id = ?", (task_id,))
    return _conflict(rows[0]) if rows else None


def drop_open_changes(conn: apsw.Connection, task_id: str) -> None:
    """Delete every open change of a task and its conflict (a resolution replaces them)."""
    conn.execute(
        "DELETE FROM outbox WHERE task_id = ? "
        "AND state IN ('pending', 'in_flight', 'dead', 'conflict')",
        (task_id,),
    )
    conn.execute("DELETE FROM sync_conflicts WHERE task_id = ?", (task_id,))
