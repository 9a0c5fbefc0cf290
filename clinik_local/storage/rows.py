"""All SQL on ``tasks`` and ``task_history``: the one owner of those two tables.

Two families of writes, kept apart on purpose (the Android FHIR engine's
``insert`` / ``insertRemote``):

**Local edits** (:func:`insert_local`, :func:`insert_local_many`, :func:`update_local`,
:func:`delete_local`) change a task because the user did: each writes the task row,
its history row and exactly one outbox row (through :mod:`.outbox`), on the
connection of the caller's open ``BEGIN IMMEDIATE`` transaction, so the three commit
together or not at all.

**Server copies** (:func:`write_server_copy`, :func:`delete_server_copy`,
:func:`write_server_copies`) store what the server said: the task row and a history
row marked ``origin = 'server'`` (or ``'merge'`` for a rebase's merged task), and *no*
outbox row, since there is nothing to send back. Pulled and listed tasks, 412 rebases
and conflict resolution ("keep the server's version") land through them. A server copy
is always storable: fields this version does not know are kept in the body as sent (and
so go back to the server with the next local edit), and a copy that does not validate
here (a text over the local limits) is stored as sent and read leniently; only a copy
that cannot be read as a Task at all (no status this version knows, say) is kept out of
``tasks`` (its base still has it) and reported by returning None.

Reads: a task's body and version (:func:`current`), with its sync state
(:func:`get_with_state`), its history (:func:`history`), and the execution of a
compiled search (:func:`search_page`, :func:`count_matching`).

**Derived search rows** (``task_refs``, ``task_io``, ``task_text``) are written here,
beside every task row, from the wire form the writer already holds
(:func:`clinik_local.derive.derive_rows`), not by triggers re-parsing the body: every
write of a task row goes through :func:`_write_task_rows` or :func:`_delete_task_row`,
the only SQL that touches ``tasks`` and the derived tables (issue 16).

**History** keeps every version; the body of a live task's current version is kept
once, in ``tasks.body`` (its history row holds NULL until a later version or the
deletion supersedes it, when the writer moves the old body there), and a local
change's outbox row points at that version instead of copying it (payload NULL:
:data:`.outbox.PAYLOAD` reads it back), so a create writes the body once.
:func:`history` reads them back.

**Bulk imports**: :func:`insert_local_many` with a batch at least a quarter the size of
the store drops the search indexes of tasks and the derived tables, loads, and builds
them again, all inside the caller's transaction (all or nothing, like any write).

**Bootstraps** into a fresh store may load their server copies over many transactions
without the search indexes (:func:`drop_search_indexes`, :func:`build_search_indexes`;
the caller keeps what was dropped in the same transactions).

Every function takes the connection it runs on and does no I/O but SQLite; the
caller (:class:`~clinik_local.storage.database.Database`) owns the transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apsw
import attrs

from .. import timestamps
from ..codec import decode_task, encode_task, task_from_stored
from ..derive import DerivedRows, derive_rows
from ..errors import TaskExistsError, ValidationError
from ..ids import new_task_id
from ..merge import MERGE_FIELDS, SERVER_MANAGED
from ..model import NO_PRIORITY_RANK, Task
from ..search import CompiledSearch, count_query, page_query
from ..wire import dumps, loads, without_server_fields
from . import outbox, replica
from .connection import fetch_all, fetch_among, ids_among

__all__ = [
    "BOOTSTRAP_BULK_MIN",
    "BULK_MIN",
    "FTS_OPTIMIZE_AFTER",
    "INSERT_HISTORY",
    "INSERT_TASK",
    "HistoryRow",
    "build_search_indexes",
    "count_matching",
    "current",
    "delete_local",
    "delete_server_copy",
    "drop_search_indexes",
    "get_with_state",
    "has_no_tasks",
    "history",
    "insert_local",
    "insert_local_many",
    "known_ids",
    "restore_search_indexes",
    "search_page",
    "stamp",
    "storable",
    "task_row",
    "top_version",
    "update_local",
    "write_server_copies",
    "write_server_copy",
]

_COLUMNS = (
    "id, version, status, intent, priority, priority_rank, code, patient_id, owner_id, "
    "requester_id, encounter_id, focus_id, business_status, authored_on, last_modified, "
    "period_start, period_end, body"
)
#: Insert one task row; parameters as :func:`task_row` builds them.
INSERT_TASK = f"INSERT INTO tasks ({_COLUMNS}) VALUES ({', '.join('?' * 18)})"
#: Insert one history row: (task_id, version, op, body, changed_at, override_reason);
#: body None for the task's current version (its body is in tasks).
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
# The current version's body is in tasks (task_history.body is NULL there: schema.sql).
_SELECT_HISTORY = """
SELECT h.version, h.op, coalesce(h.body, t.body), h.changed_at, h.override_reason, h.origin
FROM task_history AS h LEFT JOIN tasks AS t ON t.id = h.task_id AND h.body IS NULL
WHERE h.task_id = ? ORDER BY h.version
"""
#: The superseded version's body moves into its history row (it was NULL: current).
_KEEP_SUPERSEDED = "UPDATE task_history SET body = ? WHERE task_id = ? AND body IS NULL"
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


# --- the one writer of task rows and their derived rows --------------------------------

_INSERT_TASK_AT = f"INSERT INTO tasks (seq, {_COLUMNS}) VALUES ({', '.join('?' * 19)})"
_NEXT_SEQ = "SELECT coalesce(max(seq), 0) + 1 FROM tasks"
#: The row a replacement replaces: its seq, then the columns of :data:`INSERT_TASK`.
_SELECT_OLD_ROW = f"SELECT seq, {_COLUMNS} FROM tasks WHERE id = ?"
_COLUMN_NAMES = tuple(c.strip() for c in _COLUMNS.split(","))
_DELETE_TASK_RETURNING = "DELETE FROM tasks WHERE id = ? RETURNING seq, body"
_INSERT_REF = "INSERT INTO task_refs (kind, ref, seq) VALUES (?, ?, ?)"
_INSERT_IO = "INSERT INTO task_io (direction, type, value, seq, pos) VALUES (?, ?, ?, ?, ?)"
_INSERT_TEXT = (
    "INSERT INTO task_text (rowid, description, note, business_status, code, io_values) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_DELETE_DERIVED = (
    "DELETE FROM task_refs WHERE seq = ?",
    "DELETE FROM task_io WHERE seq = ?",
    "DELETE FROM task_text WHERE rowid = ?",
)
#: The search indexes a bulk import drops and builds again (their own CREATE text);
#: the primary keys and UNIQUE(id) stay, so a clash is still caught row by row.
_BULK_INDEXES = (
    "SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL "
    "AND tbl_name IN ('tasks', 'task_refs', 'task_io') ORDER BY name"
)
#: A batch takes the bulk path from this size, and when it is at least a quarter of the
#: tasks already stored (building an index anew costs about four incremental inserts).
BULK_MIN = 2_000
#: After an import of this many tasks, task_text is merged into one segment (FTS5
#: 'optimize'): a rowid probe costs one seek per segment (dense text searches).
FTS_OPTIMIZE_AFTER = 10_000


def _insert_derived(conn: apsw.Connection, items: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
    """task_refs, task_io and task_text rows of each (seq, wire task), as derive_rows says."""
    _insert_rows(conn, [(seq, derive_rows(wire)) for seq, wire in items])


def _insert_rows(
    conn: apsw.Connection, items: Sequence[tuple[int, DerivedRows]], *, text: bool = True
) -> None:
    """Bind derived rows (each (seq, rows)); ``text=False``: not their task_text rows.

    A task with no text at all (no description, note, businessStatus, code or io
    value) gets no task_text row: no text filter can match it, and an empty row still
    costs FTS5 a docsize row, its totals and, in a store per test, the reload after
    the rollback: a third of a text-less create. Deleting a rowid task_text does not
    hold is a no-op for a contentless_delete table (totals and segments untouched), so
    the delete paths need not know; files written before keep their empty rows, which
    read and delete the same.
    """
    refs = [(kind, ref, seq) for seq, d in items for kind, ref in d.refs]
    io = [(dr, t, v, seq, pos) for seq, d in items for dr, t, v, pos in d.io]
    if refs:
        conn.executemany(_INSERT_REF, refs)
    if io:
        conn.executemany(_INSERT_IO, io)
    texts = [(seq, *d.text) for seq, d in items if any(d.text)] if text else []
    if len(texts) == 1:
        conn.execute(_INSERT_TEXT, texts[0])
    elif texts:
        conn.executemany(_INSERT_TEXT, texts)


def _rewrite_derived(
    conn: apsw.Connection, items: Sequence[tuple[int, Mapping[str, Any], str]]
) -> None:
    """Bring the derived rows of replaced task rows (each (seq, new wire, old body)) in
    step, table by table: only a table whose rows differ from the old body's is
    rewritten. The old rows are what derive_rows made of the old body (the one writer
    wrote them so), and a task_text row is the costliest to replace (an FTS5 delete
    reads the row's doclists back): a pulled status or owner change leaves it be."""
    refs: list[tuple[int, DerivedRows]] = []
    io: list[tuple[int, DerivedRows]] = []
    text: list[tuple[int, DerivedRows]] = []
    for seq, wire, old_body in items:
        new, old = derive_rows(wire), derive_rows(loads(old_body))
        if new.refs != old.refs:
            refs.append((seq, new))
        if new.io != old.io:
            io.append((seq, new))
        if new.text != old.text:
            text.append((seq, new))
    for sql, part in zip(_DELETE_DERIVED, (refs, io, text), strict=True):
        if part:
            conn.executemany(sql, [(seq,) for seq, _ in part])
    _insert_rows(conn, [(seq, attrs.evolve(d, io=())) for seq, d in refs], text=False)
    _insert_rows(conn, [(seq, attrs.evolve(d, refs=())) for seq, d in io], text=False)
    if text:
        _insert_rows(conn, [(seq, attrs.evolve(d, refs=(), io=())) for seq, d in text])


def _write_task_rows(
    conn: apsw.Connection,
    tasks: Sequence[Task],
    bodies: Sequence[str],
    wires: Sequence[Mapping[str, Any]] | None,
    *,
    exists: bool,
    olds: Sequence[tuple[Any, ...]] | None = None,
) -> None:
    """Write task rows (new ones, or ``exists``: replacing the row of the same id) and
    keep their derived rows in step: the one place task rows are written.

    New rows get explicit seqs, max + 1 onwards (the caller holds the write lock), so a
    batch is one executemany and its derived rows know their seqs; a single new row
    takes SQLite's own max + 1 (``last_insert_rowid``: one statement fewer). A replaced
    row keeps its seq, and only its changed columns are set (:func:`_update_changed`),
    only its changed derived rows rewritten (:func:`_rewrite_derived`). ``olds``: the
    rows replaced, as :data:`_SELECT_OLD_ROW` reads them, when the caller has read them
    already (else read here); a batch of replacements is one executemany per statement.
    ``wires`` are the wire forms of ``bodies`` when the caller has them (else parsed
    from the body).
    """
    wire_list = list(wires) if wires is not None else [loads(b) for b in bodies]
    if not exists and len(tasks) == 1:
        # One row: SQLite picks max + 1 itself, and says which, without a SELECT.
        conn.execute(INSERT_TASK, task_row(tasks[0], _version_of(tasks[0]), bodies[0]))
        _insert_derived(conn, [(conn.last_insert_rowid(), wire_list[0])])
        return
    if not exists:
        first = int(fetch_all(conn, _NEXT_SEQ)[0][0])
        conn.executemany(
            _INSERT_TASK_AT,
            [
                (first + n, *task_row(t, _version_of(t), b))
                for n, (t, b) in enumerate(zip(tasks, bodies, strict=True))
            ],
        )
        _insert_derived(conn, enumerate(wire_list, first))
        return
    if olds is None:
        olds = [fetch_all(conn, _SELECT_OLD_ROW, (t.id,))[0] for t in tasks]
    conn.executemany(_KEEP_SUPERSEDED, [(o[-1], t.id) for t, o in zip(tasks, olds, strict=True)])
    _update_changed(
        conn, [task_row(t, _version_of(t), b) for t, b in zip(tasks, bodies, strict=True)], olds
    )
    _rewrite_derived(
        conn,
        [
            (int(old[0]), wire, str(old[-1]))
            for old, body, wire in zip(olds, bodies, wire_list, strict=True)
            if old[-1] != body
        ],
    )


def _update_changed(
    conn: apsw.Connection, new_rows: Sequence[tuple[object, ...]], olds: Sequence[tuple[Any, ...]]
) -> None:
    """Replace task rows (``new_rows`` as :func:`task_row` builds them) setting only the
    columns whose value changed, one executemany per set of changed columns.

    SQLite rewrites the entry of every index on a column an UPDATE sets, equal value or
    not: a full-row UPDATE of a pulled version that changed its note and lastModified
    rewrote all 17 index entries of the task, and cost ten times one that sets version,
    last_modified and body (benchmarks/bench_store.py, pulled updates). ``olds``: the
    rows replaced, as :data:`_SELECT_OLD_ROW` reads them (seq first).
    """
    groups: dict[tuple[int, ...], list[tuple[object, ...]]] = {}
    for new, old in zip(new_rows, olds, strict=True):
        # new[0] / old[1] is the id, the same on both; old[0] is the seq
        changed = tuple(i for i in range(1, len(new)) if new[i] != old[i + 1])
        if changed:
            groups.setdefault(changed, []).append((*(new[i] for i in changed), old[0]))
    for changed, params in groups.items():
        sets = ", ".join(f"{_COLUMN_NAMES[i]} = ?" for i in changed)  # names from _COLUMNS
        conn.executemany(f"UPDATE tasks SET {sets} WHERE seq = ?", params)


def _delete_task_row(conn: apsw.Connection, task_id: str) -> bool:
    """Delete a task row and its derived rows, its body kept in its history row; False
    if there was no such row."""
    found = fetch_all(conn, _DELETE_TASK_RETURNING, (task_id,))
    for seq, body in found:
        conn.execute(_KEEP_SUPERSEDED, (body, task_id))
        for sql in _DELETE_DERIVED:
            conn.execute(sql, (seq,))
    return bool(found)


@attrs.frozen
class _DroppedIndexes:
    """What a bulk import dropped: each index's CREATE text and its planner statistics."""

    indexes: list[tuple[str, str]]
    stats: list[tuple[object, ...]]


_HAS_STAT1 = "SELECT count(*) FROM sqlite_schema WHERE name = 'sqlite_stat1'"
_SELECT_STATS = "SELECT tbl, idx, stat FROM sqlite_stat1"
_INSERT_STATS = "INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)"


def _drop_for_bulk(
    conn: apsw.Connection, count: int, *, force: bool = False
) -> _DroppedIndexes | None:
    """For a large batch: drop the search indexes (to build again after the load); None
    for an ordinary batch, which writes through them. ``force``: drop them anyway."""
    if not force and (count < BULK_MIN or count * 4 < int(fetch_all(conn, _NEXT_SEQ)[0][0]) - 1):
        return None
    indexes = [(str(n), str(sql)) for n, sql in fetch_all(conn, _BULK_INDEXES)]
    stats: list[tuple[object, ...]] = []
    if fetch_all(conn, _HAS_STAT1)[0][0]:
        names = {n for n, _ in indexes}
        stats = [r for r in fetch_all(conn, _SELECT_STATS) if r[1] in names]
    for name, _sql in indexes:
        conn.execute(f'DROP INDEX "{name}"')  # names from sqlite_schema, not from input
    return _DroppedIndexes(indexes, stats)


def _build_again(conn: apsw.Connection, dropped: _DroppedIndexes) -> None:
    """Create the dropped indexes from their own text and restore their statistics."""
    for _name, sql in dropped.indexes:
        conn.execute(sql)
    if dropped.stats:
        conn.executemany(_INSERT_STATS, dropped.stats)


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
    return loads(body), outbox.STATE_BY_RANK[rank]


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


def count_matching(
    conn: apsw.Connection, compiled: CompiledSearch, *, at_most: int | None = None
) -> int:
    """How many tasks the compiled search matches (with ``at_most``: up to that many)."""
    sql, params = count_query(compiled, at_most)
    return int(fetch_all(conn, sql, params)[0][0])


# --- local edits: task row + history row + exactly one outbox row ---------------------


def insert_local(
    conn: apsw.Connection, task: Task, body: str, *, wire: Mapping[str, Any] | None = None
) -> None:
    """A new task created here (stamped at version 1). TaskExistsError if the id is taken.

    An id once used by a task that was deleted stays taken: its history (and the
    server's copy of the id) still belong to that task. ``wire``: the task's wire form,
    when the caller has it (``body`` is its JSON), saves parsing the body again.
    """
    assert task.id is not None
    try:
        _write_task_rows(conn, [task], [body], None if wire is None else [wire], exists=False)
        conn.execute(INSERT_HISTORY, (task.id, 1, "create", None, task.last_modified, None))
    except apsw.ConstraintError:
        raise TaskExistsError(task.id) from None
    outbox.enqueue(conn, task.id, "create", None, None, task.last_modified or "")


def insert_local_many(
    conn: apsw.Connection,
    tasks: Sequence[Task],
    bodies: Sequence[str],
    now: str,
    *,
    wires: Sequence[Mapping[str, Any]] | None = None,
    synced: bool = False,
) -> None:
    """Many new tasks at once: all of them, or (TaskExistsError naming one taken id) none.

    ``synced``: the tasks are restored copies of what the server already holds (a
    restore from an export): no outbox rows, and the tasks are marked known on the
    server (their server version unknown until the next exchange).

    A large batch (:data:`BULK_MIN` tasks, and at least a quarter of the store) loads
    with the search indexes dropped and builds them after, in the same savepoint. An
    import of :data:`FTS_OPTIMIZE_AFTER` tasks or more ends by merging task_text.
    """
    # A savepoint: on a clash, undo this batch's rows (and any dropped index) before
    # looking. Explicit, not `with conn:`: SQLITE_FULL rolls the whole transaction
    # back, and the context manager's RELEASE would then hide StoreFullError behind
    # "no such savepoint".
    conn.execute("SAVEPOINT create_many")
    try:
        dropped = _drop_for_bulk(conn, len(tasks))
        _write_task_rows(conn, tasks, bodies, wires, exists=False)
        # Inside the savepoint too: the id of a deleted task clashes here, on its history.
        conn.executemany(
            INSERT_HISTORY,
            [(t.id, 1, "create", None, t.last_modified, None) for t in tasks],
        )
        if dropped is not None:
            _build_again(conn, dropped)
        if len(tasks) >= FTS_OPTIMIZE_AFTER:
            conn.execute("INSERT INTO task_text (task_text) VALUES ('optimize')")
        conn.execute("RELEASE create_many")
    except apsw.ConstraintError:
        conn.execute("ROLLBACK TO create_many")
        taken = next(t.id for t in tasks if fetch_all(conn, _ID_TAKEN, (t.id,))[0][0])
        raise TaskExistsError(str(taken)) from None
    if synced:
        outbox.mark_known_on_server(conn, [t.id or "" for t in tasks], now)
        return
    outbox.enqueue_many(conn, [(t.id or "", "create", None, None, now) for t in tasks])


def update_local(
    conn: apsw.Connection,
    task: Task,
    body: str,
    *,
    base_version: int,
    changed_at: str,
    reason: str | None = None,
    exists: bool = True,
    wire: Mapping[str, Any] | None = None,
    patch: str | None = None,
) -> None:
    """A local edit producing ``task`` (stamped at its new version) from ``base_version``.

    ``exists=False`` writes the row anew (a task deleted here that the server still
    has, brought back by a conflict resolution); its history calls that a create.
    ``wire``: the task's wire form, when the caller has it. ``patch``: the wire fields
    the edit set (JSON), recorded on its outbox row.
    """
    assert task.id is not None
    _write_task_rows(conn, [task], [body], None if wire is None else [wire], exists=exists)
    op = "update" if exists else "create"
    conn.execute(INSERT_HISTORY, (task.id, _version_of(task), op, None, changed_at, reason))
    assert _version_of(task) == base_version + 1, "the outbox reads the body it wrote"
    outbox.enqueue(conn, task.id, "update", None, base_version, changed_at, patch)


def delete_local(conn: apsw.Connection, task_id: str, body: str, version: int, now: str) -> None:
    """Delete a task here (``version``/``body``: what it was); history keeps the last body."""
    _delete_task_row(conn, task_id)
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
            derive_rows(known)  # and its search rows derived
        except Exception:  # not a task this version can read at all
            return None
        body = dict(known)
    body.update(unknown)
    return task, body


def _stamped(
    task: Task, body_map: dict[str, Any], task_id: str, version: int, modified: str
) -> str:
    _set(task, "id", task_id)
    _set(task, "version_id", str(version))
    _set(task, "last_modified", max(modified, str(task.authored_on)))
    body_map["versionId"] = task.version_id
    body_map["lastModified"] = task.last_modified
    return dumps(body_map)


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
    olds = fetch_all(conn, _SELECT_OLD_ROW, (task_id,))  # read once, for the update too
    made = storable(task_id, wire_task)
    if made is None:
        if olds:
            _remove(conn, task_id, str(olds[0][-1]), now, origin)
        return None
    task, body_map = made
    version = top_version(conn, task_id) + 1
    modified = _server_instant(wire_task.get("lastModified"), now)
    body = _stamped(task, body_map, task_id, version, modified)
    _write_task_rows(conn, [task], [body], [body_map], exists=bool(olds), olds=olds or None)
    op = "update" if olds else "create"
    conn.execute(_INSERT_HISTORY_FROM, (task_id, version, op, None, now, reason, origin))
    return task


def known_ids(conn: apsw.Connection, task_ids: Sequence[str]) -> set[str]:
    """Which of these ids have a task or any history here (one query)."""
    return ids_among(
        conn,
        "SELECT id FROM tasks WHERE id IN ({ids}) "
        "UNION SELECT task_id FROM task_history WHERE task_id IN ({ids})",
        task_ids,
    )


_CURRENT_AMONG = f"SELECT seq, {_COLUMNS} FROM tasks WHERE id IN ({{ids}})"
_TOP_AMONG = (
    "SELECT task_id, max(version) FROM task_history WHERE task_id IN ({ids}) GROUP BY task_id"
)


def write_server_copies(
    conn: apsw.Connection, copies: Sequence[tuple[str, Mapping[str, Any]]], *, now: str
) -> list[str]:
    """:func:`write_server_copy` (origin ``'server'``, no reason) for many tasks of
    distinct ids, new here or not, in a few statements: what a pull page or a listing
    page applies. Each copy lands exactly as :func:`write_server_copy` would land it
    (the next local version, the same rows); the local rows and top versions of all of
    them are read in two queries, and the new rows, the replaced rows and the history
    rows are each written by one executemany. Returns the ids written (a copy that
    cannot be read as a Task here is left out, its local task removed)."""
    ids = [task_id for task_id, _ in copies]
    found = {str(r[1]): r for r in fetch_among(conn, _CURRENT_AMONG, ids)}
    tops = {str(r[0]): int(r[1]) for r in fetch_among(conn, _TOP_AMONG, ids)}
    new: tuple[list[Task], list[str], list[dict[str, Any]]] = ([], [], [])
    known: tuple[list[Task], list[str], list[dict[str, Any]]] = ([], [], [])
    olds: list[tuple[Any, ...]] = []
    history: list[tuple[object, ...]] = []
    for task_id, wire_task in copies:
        old = found.get(task_id)
        made = storable(task_id, wire_task)
        if made is None:
            if old is not None:
                _remove(conn, task_id, str(old[-1]), now, "server")
            continue
        task, body_map = made
        version = tops.get(task_id, 0) + 1
        modified = _server_instant(wire_task.get("lastModified"), now)
        body = _stamped(task, body_map, task_id, version, modified)
        into = new if old is None else known
        into[0].append(task)
        into[1].append(body)
        into[2].append(body_map)
        if old is not None:
            olds.append(old)
        op = "update" if old is not None else "create"
        history.append((task_id, version, op, None, now, None, "server"))
    if new[0]:
        _write_task_rows(conn, *new, exists=False)
    if known[0]:
        _write_task_rows(conn, *known, exists=True, olds=olds)
    if history:
        conn.executemany(_INSERT_HISTORY_FROM, history)
    return [str(row[0]) for row in history]


#: A bootstrap into an empty store whose first listing page has at least this many tasks
#: loads without the search indexes (:func:`drop_search_indexes`) and builds them when its
#: last page is applied: inserting 100,000 tasks through them costs about twice as much.
BOOTSTRAP_BULK_MIN = 1000


def has_no_tasks(conn: apsw.Connection) -> bool:
    """Whether the store holds no task and no history (a fresh store)."""
    return not fetch_all(
        conn,
        "SELECT EXISTS (SELECT 1 FROM tasks) OR EXISTS (SELECT 1 FROM task_history)",
    )[0][0]


def drop_search_indexes(conn: apsw.Connection) -> str:
    """Drop the search indexes for a bulk load spanning several transactions (a
    bootstrap); returns their CREATE texts and statistics as JSON, for the caller to keep
    in the same transaction and hand to :func:`build_search_indexes` at the end. The
    primary keys and UNIQUE(id) stay: searches still answer, from scans."""
    dropped = _drop_for_bulk(conn, BULK_MIN, force=True)
    assert dropped is not None
    return json.dumps({"indexes": dropped.indexes, "stats": dropped.stats})


def build_search_indexes(conn: apsw.Connection, saved: str) -> None:
    """Create again what :func:`drop_search_indexes` dropped (an index that exists
    already is left as it is), restore its statistics, and merge task_text."""
    kept = json.loads(saved)
    present = {str(r[0]) for r in fetch_all(conn, "SELECT name FROM sqlite_schema")}
    indexes = [(str(n), str(sql)) for n, sql in kept["indexes"] if n not in present]
    names = {n for n, _ in indexes}
    stats = [tuple(r) for r in kept["stats"] if r[1] in names]
    if stats and fetch_all(conn, _HAS_STAT1)[0][0]:
        conn.executemany(
            "DELETE FROM sqlite_stat1 WHERE tbl = ? AND idx = ?", [r[:2] for r in stats]
        )
    else:
        stats = []
    _build_again(conn, _DroppedIndexes(indexes, stats))
    conn.execute("INSERT INTO task_text (task_text) VALUES ('optimize')")


def restore_search_indexes(conn: apsw.Connection) -> None:
    """Build the search indexes a bootstrap dropped, if it did, and forget that it did
    (on the caller's write): the one way back for the bootstrap's last page, a store
    that stops pulling, and a store reopened without sync."""
    saved = replica.dropped_indexes(conn)
    if saved is not None:
        build_search_indexes(conn, saved)
        replica.keep_dropped_indexes(conn, None)


def _remove(conn: apsw.Connection, task_id: str, body: str, now: str, origin: str) -> None:
    _delete_task_row(conn, task_id)
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
