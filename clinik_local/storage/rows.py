"""All SQL on ``tasks`` and ``task_history``: the one owner of those two tables.

Two families of writes, kept apart on purpose (the Android FHIR engine's
``insert`` / ``insertRemote``):

**Local edits** (:func:`insert_local`, :func:`insert_local_many`, :func:`update_local`,
:func:`delete_local`) change a task because the user did: each writes the task row,
its history row and exactly one outbox row (through :mod:`.outbox`), on the
connection of the caller's open ``BEGIN IMMEDIATE`` transaction, so the three commit
together or not at all.

**Server copies** (:func:`write_server_copy`, :func:`delete_server_copy`) store what
the server said: the task row and a history row marked ``origin = 'server'`` (or
``'merge'`` for a rebase's merged task), and *no* outbox row, since there is nothing to
send back. Pulled and listed tasks, 412 rebases and conflict resolution ("keep the
server's version") land through them. A server copy is always storable: fields this
version does not know are kept in the body as sent (and so go back to the server with
the next local edit), and a copy that does not validate here (a text over the local
limits) is stored as sent and read leniently; only a copy that cannot be read as a Task
at all (no status this version knows, say) is kept out of ``tasks`` (its base still has
it) and reported by returning None.

Reads: a task's body and version (:func:`current`), with its sync state
(:func:`get_with_state`), its history (:func:`history`), and the execution of a
compiled search (:func:`search_page`, :func:`count_matching`).

Every function takes the connection it runs on and does no I/O but SQLite; the
caller (:class:`~clinik_local.storage.database.Database`) owns the transaction. This
is the write path a leaner implementation would replace, one function at a time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import apsw
import attrs

from .. import timestamps
from ..codec import decode_task, encode_task, task_from_stored
from ..errors import TaskExistsError, ValidationError
from ..ids import new_task_id
from ..merge import MERGE_FIELDS, SERVER_MANAGED
from ..model import NO_PRIORITY_RANK, Task
from ..search import CompiledSearch, page_query
from ..wire import dumps, without_server_fields
from . import outbox
from .connection import fetch_all

__all__ = [
    "INSERT_HISTORY",
    "INSERT_TASK",
    "UPDATE_TASK",
    "HistoryRow",
    "count_matching",
    "current",
    "delete_local",
    "delete_server_copy",
    "get_with_state",
    "history",
    "insert_local",
    "insert_local_many",
    "known_ids",
    "search_page",
    "stamp",
    "storable",
    "task_row",
    "top_version",
    "update_local",
    "write_new_server_copies",
    "write_server_copy",
]

_COLUMNS = (
    "id, version, status, intent, priority, priority_rank, code, patient_id, owner_id, "
    "requester_id, encounter_id, focus_id, business_status, authored_on, last_modified, "
    "period_start, period_end, body"
)
#: Insert one task row; parameters as :func:`task_row` builds them.
INSERT_TASK = f"INSERT INTO tasks ({_COLUMNS}) VALUES ({', '.join('?' * 18)})"
#: Replace a task row; parameters: :func:`task_row` without the id, then the id.
UPDATE_TASK = """
UPDATE tasks SET version = ?, status = ?, intent = ?, priority = ?, priority_rank = ?,
    code = ?, patient_id = ?, owner_id = ?, requester_id = ?, encounter_id = ?,
    focus_id = ?, business_status = ?, authored_on = ?, last_modified = ?,
    period_start = ?, period_end = ?, body = ?
WHERE id = ?
"""
#: Insert one history row: (task_id, version, op, body, changed_at, override_reason).
INSERT_HISTORY = """
INSERT INTO task_history (task_id, version, op, body, changed_at, override_reason)
VALUES (?, ?, ?, ?, ?, ?)
"""
#: Insert one history row with its origin ('local', 'server' or 'merge').
_INSERT_HISTORY_FROM = """
INSERT INTO task_history (task_id, version, op, body, changed_at, override_reason, origin)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
#: The top-level wire fields this version knows; any other is kept as the server sent it.
KNOWN_FIELDS = frozenset(MERGE_FIELDS) | SERVER_MANAGED
_SELECT_CURRENT = "SELECT body, version FROM tasks WHERE id = ?"
_SELECT_WITH_STATE = f"SELECT body, {outbox.SYNC_RANK_SUBQUERY} FROM tasks WHERE id = ?"
_DELETE_TASK = "DELETE FROM tasks WHERE id = ?"
_SELECT_HISTORY = """
SELECT version, op, body, changed_at, override_reason, origin FROM task_history
WHERE task_id = ? ORDER BY version
"""
_TOP_VERSION = "SELECT coalesce(max(version), 0) FROM task_history WHERE task_id = ?"
# An id is taken while a task has it, and for good once it had history (a deleted task).
_ID_TAKEN = (
    "SELECT EXISTS (SELECT 1 FROM tasks WHERE id = ?1) "
    "OR EXISTS (SELECT 1 FROM task_history WHERE task_id = ?1)"
)


@attrs.frozen
class HistoryRow:
    """One recorded version of a task."""

    version: int
    op: str
    body: str
    changed_at: str
    override_reason: str | None
    origin: str = "local"


_set = object.__setattr__


def stamp(task: Task, version: int, now: str) -> Task:
    """Set the bookkeeping fields of a task *the caller just decoded*; returns it.

    lastModified never precedes authoredOn, even for a task authored "in the future"
    (a device with a fast clock), so the invariant lastModified >= authoredOn holds.
    The task is fresh from decode_task and not yet shared, so it is completed in place,
    as attrs' own __init__ does for frozen classes; attrs.evolve would copy every field
    and cost more than the rest of the stamping together.
    """
    _set(task, "id", task.id or new_task_id())
    _set(task, "version_id", str(version))
    _set(task, "last_modified", max(now, task.authored_on))
    return task


def task_row(task: Task, version: int, body: str) -> tuple[object, ...]:
    """The parameters of :data:`INSERT_TASK` for a task at ``version`` with its body."""
    # Enum members are str subclasses: apsw binds them as their wire text.
    period = task.execution_period
    priority = task.priority
    return (
        task.id,
        version,
        task.status,
        task.intent,
        priority,
        NO_PRIORITY_RANK if priority is None else priority.rank,
        task.code,
        task.patient_id,
        task.owner_id,
        task.requester_id,
        task.encounter_id,
        task.focus_id,
        task.business_status,
        task.authored_on,
        task.last_modified,
        None if period is None else period.start,
        None if period is None else period.end,
        body,
    )


def _version_of(task: Task) -> int:
    assert task.version_id is not None, "stamp() the task first"
    return int(task.version_id)


def _write_row(conn: apsw.Connection, task: Task, body: str, *, exists: bool) -> None:
    row = task_row(task, _version_of(task), body)
    if exists:
        conn.execute(UPDATE_TASK, (*row[1:], task.id))
    else:
        conn.execute(INSERT_TASK, row)


# --- reads ----------------------------------------------------------------------------


def current(conn: apsw.Connection, task_id: str) -> tuple[str, int] | None:
    """The task's stored body and local version, or None if there is no such task."""
    rows = fetch_all(conn, _SELECT_CURRENT, (task_id,))
    if not rows:
        return None
    body, version = rows[0]
    return str(body), int(version)


def get_with_state(
    conn: apsw.Connection, task_id: str
) -> tuple[dict[str, Any], outbox.TaskSyncState] | None:
    """The stored wire task and its sync state in one read, or None."""
    rows = fetch_all(conn, _SELECT_WITH_STATE, (task_id,))
    if not rows:
        return None
    body, rank = rows[0]
    return json.loads(body), outbox.STATE_BY_RANK[rank]


def top_version(conn: apsw.Connection, task_id: str) -> int:
    """The highest version the task's history records (0 for an unknown id)."""
    return int(fetch_all(conn, _TOP_VERSION, (task_id,))[0][0])


def history(conn: apsw.Connection, task_id: str) -> list[HistoryRow]:
    """Every recorded version of a task, oldest first (also after it was deleted)."""
    return [
        HistoryRow(int(v), str(op), str(body), str(at), reason, str(origin))
        for v, op, body, at, reason, origin in fetch_all(conn, _SELECT_HISTORY, (task_id,))
    ]


def search_page(conn: apsw.Connection, compiled: CompiledSearch) -> tuple[list[Any], int | None]:
    """The rows of one page (``limit + 1`` of them when there are more; each row as
    :mod:`clinik_local.search` lays it out, body first) and the total if asked for."""
    sql, params = page_query(compiled, lambda s, p: int(fetch_all(conn, s, p)[0][0]))
    rows = fetch_all(conn, sql, params)
    total = count_matching(conn, compiled) if compiled.total else None
    return rows, total


def count_matching(conn: apsw.Connection, compiled: CompiledSearch) -> int:
    """How many tasks the compiled search matches."""
    return int(fetch_all(conn, compiled.count_sql, compiled.count_params)[0][0])


# --- local edits: task row + history row + exactly one outbox row ---------------------


def insert_local(conn: apsw.Connection, task: Task, body: str) -> None:
    """A new task created here (stamped at version 1). TaskExistsError if the id is taken.

    An id once used by a task that was deleted stays taken: its history (and the
    server's copy of the id) still belong to that task.
    """
    assert task.id is not None
    try:
        conn.execute(INSERT_TASK, task_row(task, 1, body))
        conn.execute(INSERT_HISTORY, (task.id, 1, "create", body, task.last_modified, None))
    except apsw.ConstraintError:
        raise TaskExistsError(task.id) from None
    outbox.enqueue(conn, task.id, "create", body, None, task.last_modified or "")


def insert_local_many(
    conn: apsw.Connection,
    tasks: Sequence[Task],
    bodies: Sequence[str],
    now: str,
    *,
    synced: bool = False,
) -> None:
    """Many new tasks at once: all of them, or (TaskExistsError naming one taken id) none.

    ``synced``: the tasks are restored copies of what the server already holds (a
    restore from an export): no outbox rows, and the tasks are marked known on the
    server (their server version unknown until the next exchange).
    """
    rows = [task_row(t, 1, b) for t, b in zip(tasks, bodies, strict=True)]
    # A savepoint: on a clash, undo this batch's rows before looking. Explicit, not
    # `with conn:`: SQLITE_FULL rolls the whole transaction back, and the context
    # manager's RELEASE would then hide StoreFullError behind "no such savepoint".
    conn.execute("SAVEPOINT create_many")
    try:
        conn.executemany(INSERT_TASK, rows)
        # Inside the savepoint too: the id of a deleted task clashes here, on its history.
        conn.executemany(
            INSERT_HISTORY,
            [
                (t.id, 1, "create", b, t.last_modified, None)
                for t, b in zip(tasks, bodies, strict=True)
            ],
        )
        conn.execute("RELEASE create_many")
    except apsw.ConstraintError:
        conn.execute("ROLLBACK TO create_many")
        taken = next(t.id for t in tasks if fetch_all(conn, _ID_TAKEN, (t.id,))[0][0])
        raise TaskExistsError(str(taken)) from None
    if synced:
        outbox.mark_known_on_server(conn, [t.id or "" for t in tasks], now)
        return
    outbox.enqueue_many(
        conn,
        [(t.id or "", "create", b, None, now) for t, b in zip(tasks, bodies, strict=True)],
    )


def update_local(
    conn: apsw.Connection,
    task: Task,
    body: str,
    *,
    base_version: int,
    changed_at: str,
    reason: str | None = None,
    exists: bool = True,
    patch: str | None = None,
) -> None:
    """A local edit producing ``task`` (stamped at its new version) from ``base_version``.

    ``exists=False`` writes the row anew (a task deleted here that the server still
    has, brought back by a conflict resolution); its history calls that a create.
    ``patch``: the wire fields the edit set (JSON), recorded on its outbox row.
    """
    assert task.id is not None
    _write_row(conn, task, body, exists=exists)
    op = "update" if exists else "create"
    conn.execute(INSERT_HISTORY, (task.id, _version_of(task), op, body, changed_at, reason))
    outbox.enqueue(conn, task.id, "update", body, base_version, changed_at, patch)


def delete_local(conn: apsw.Connection, task_id: str, body: str, version: int, now: str) -> None:
    """Delete a task here (``version``/``body``: what it was); history keeps the last body."""
    conn.execute(_DELETE_TASK, (task_id,))
    conn.execute(INSERT_HISTORY, (task_id, version + 1, "delete", body, now, None))
    outbox.enqueue(conn, task_id, "delete", None, version, now)


# --- server copies: task row + history row, no outbox row -----------------------------


def _server_instant(value: object, fallback: str) -> str:
    if isinstance(value, str):
        try:
            return timestamps.parse_instant(value)
        except ValidationError:
            pass
    return fallback


def storable(task_id: str, wire_task: Mapping[str, Any]) -> tuple[Task, dict[str, Any]] | None:
    """The local view of a server copy: (Task, body without the local stamps), or None.

    Fields this version does not know are kept in the body as sent. A copy that does
    not validate here (a text over the local limits, say) is read leniently, as stored
    bodies are; None when it cannot be read as a Task at all.
    """
    request = without_server_fields(wire_task)
    request["id"] = task_id
    known = {k: v for k, v in request.items() if k in KNOWN_FIELDS}
    unknown = {k: v for k, v in request.items() if k not in KNOWN_FIELDS}
    try:
        task = decode_task(known)
        body = encode_task(task)
    except ValidationError:
        if not isinstance(known.get("authoredOn"), str):  # as decode_task would default it
            known["authoredOn"] = _server_instant(wire_task.get("lastModified"), timestamps.now())
        try:
            task = task_from_stored(known)
            task_row(task, 1, "")  # every column can be bound
        except Exception:  # not a task this version can read at all
            return None
        body = dict(known)
    body.update(unknown)
    return task, body


def write_server_copy(
    conn: apsw.Connection,
    task_id: str,
    wire_task: Mapping[str, Any],
    *,
    now: str,
    reason: str | None = None,
    origin: str = "server",
) -> Task | None:
    """Make the local task what the server said (``wire_task``, its wire form).

    Stored as the next local version, with the server's ``lastModified`` (the local
    ``versionId`` counts local versions; :func:`outbox.set_server_version` keeps the
    server's). No outbox row: nothing goes back to the server. ``origin='merge'`` for
    a rebase's merged task. Returns the task as stored, or None when the copy cannot
    be read as a Task here (then the local task, if any, is removed: the base keeps it).
    """
    found = current(conn, task_id)
    made = storable(task_id, wire_task)
    if made is None:
        if found is not None:
            _remove(conn, task_id, found[0], now, origin)
        return None
    task, body_map = made
    version = top_version(conn, task_id) + 1
    _set(task, "id", task_id)
    _set(task, "version_id", str(version))
    modified = _server_instant(wire_task.get("lastModified"), now)
    _set(task, "last_modified", max(modified, str(task.authored_on)))
    body_map["versionId"] = task.version_id
    body_map["lastModified"] = task.last_modified
    body = dumps(body_map)
    _write_row(conn, task, body, exists=found is not None)
    op = "update" if found is not None else "create"
    conn.execute(_INSERT_HISTORY_FROM, (task_id, version, op, body, now, reason, origin))
    return task


def known_ids(conn: apsw.Connection, task_ids: Sequence[str]) -> set[str]:
    """Which of these ids have a task or any history here (one query)."""
    if not task_ids:
        return set()
    marks = ",".join("?" * len(task_ids))
    return {
        str(r[0])
        for r in fetch_all(
            conn,
            f"SELECT id FROM tasks WHERE id IN ({marks}) "
            f"UNION SELECT task_id FROM task_history WHERE task_id IN ({marks})",
            (*task_ids, *task_ids),
        )
    }


def write_new_server_copies(
    conn: apsw.Connection, copies: Sequence[tuple[str, Mapping[str, Any]]], *, now: str
) -> list[str]:
    """Server copies of tasks this store has never had (:func:`known_ids` says none of
    them), written in bulk: what a bootstrap lists into an empty store. Returns the ids
    written (a copy that cannot be read as a Task here is left out, as in
    :func:`write_server_copy`)."""
    task_rows: list[tuple[object, ...]] = []
    history_rows: list[tuple[object, ...]] = []
    written: list[str] = []
    for task_id, wire_task in copies:
        made = storable(task_id, wire_task)
        if made is None:
            continue
        task, body_map = made
        _set(task, "id", task_id)
        _set(task, "version_id", "1")
        modified = _server_instant(wire_task.get("lastModified"), now)
        _set(task, "last_modified", max(modified, str(task.authored_on)))
        body_map["versionId"] = "1"
        body_map["lastModified"] = task.last_modified
        body = dumps(body_map)
        task_rows.append(task_row(task, 1, body))
        history_rows.append((task_id, 1, "create", body, now, None, "server"))
        written.append(task_id)
    conn.executemany(INSERT_TASK, task_rows)
    conn.executemany(_INSERT_HISTORY_FROM, history_rows)
    return written


def _remove(conn: apsw.Connection, task_id: str, body: str, now: str, origin: str) -> None:
    conn.execute(_DELETE_TASK, (task_id,))
    top = top_version(conn, task_id)
    conn.execute(_INSERT_HISTORY_FROM, (task_id, top + 1, "delete", body, now, None, origin))


def delete_server_copy(
    conn: apsw.Connection, task_id: str, *, now: str, origin: str = "server"
) -> bool:
    """The server has no such task (for this device): delete the local one (if any),
    no outbox row. False if there was none."""
    found = current(conn, task_id)
    if found is None:
        return False
    _remove(conn, task_id, found[0], now, origin)
    return True
