"""The outbox: one row per local change, written inside the change's own transaction.

Every mutation of ``store.tasks`` calls :func:`enqueue` on the connection of its open
``BEGIN IMMEDIATE`` transaction, so the task, its history row and its outbox row commit
together or not at all. Each row's ``change_id`` is the ``Idempotency-Key`` every
delivery attempt of that change carries (see ``sync.py``).
"""

from __future__ import annotations

from typing import Literal

import apsw

from ..ids import new_change_id

__all__ = ["Op", "SyncState", "enqueue", "enqueue_many", "sync_state_of"]

Op = Literal["create", "update", "delete"]
SyncState = Literal["pending", "synced", "conflict", "rejected"]

_INSERT_CHANGE = """
INSERT INTO outbox (change_id, task_id, op, payload, base_version, created_at)
VALUES (?, ?, ?, ?, ?, ?)
"""

# conflict outranks rejected outranks pending; no open change at all means synced.
_SYNC_STATE = """
SELECT min(CASE state WHEN 'conflict' THEN 0 WHEN 'dead' THEN 1 ELSE 2 END)
FROM outbox WHERE task_id = ?
"""
#: The same rank as a scalar subquery, for reads that fetch a task and its state at once.
SYNC_RANK_SUBQUERY = (
    "(SELECT min(CASE state WHEN 'conflict' THEN 0 WHEN 'dead' THEN 1 ELSE 2 END) "
    "FROM outbox WHERE outbox.task_id = tasks.id)"
)
STATE_BY_RANK: dict[int | None, SyncState] = {
    0: "conflict",
    1: "rejected",
    2: "pending",
    None: "synced",
}


def enqueue(
    conn: apsw.Connection,
    task_id: str,
    op: Op,
    payload: str | None,
    base_version: int | None,
    created_at: str,
) -> str:
    """Append one change to the outbox (caller holds the write transaction)."""
    change_id = new_change_id()
    conn.execute(_INSERT_CHANGE, (change_id, task_id, op, payload, base_version, created_at))
    return change_id


def enqueue_many(
    conn: apsw.Connection,
    changes: list[tuple[str, Op, str | None, int | None, str]],
) -> None:
    """Append many changes ``(task_id, op, payload, base_version, created_at)`` at once."""
    conn.executemany(_INSERT_CHANGE, [(new_change_id(), *change) for change in changes])


def sync_state_of(conn: apsw.Connection, task_id: str) -> SyncState:
    """pending | synced | conflict | rejected, derived from the task's open changes."""
    rank: int | None = conn.execute(_SYNC_STATE, (task_id,)).fetchall()[0][0]  # type: ignore[assignment]
    return STATE_BY_RANK[rank]
