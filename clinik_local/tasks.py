"""``store.tasks``: create, get, update, delete, search and count, as the remote SDK has them.

Every call returns :class:`~clinik_local.model.ApiResponse`. Every mutation writes the
task row, its history row and exactly one outbox row in one ``BEGIN IMMEDIATE``
transaction; bad input raises before (or rolls back) anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import apsw
import attrs

from . import timestamps
from .codec import decode_task, encode_task, task_from_stored, tasks_from_bodies
from .errors import (
    FieldError,
    IllegalTransitionError,
    NotFoundError,
    TaskExistsError,
    ValidationError,
    VersionConflictError,
    _shorten,  # repr that survives values nested too deep for repr()
)
from .ids import ID_PATTERN, is_valid_id, new_task_id
from .lifecycle import transition_problem
from .model import ApiResponse, Task, TaskPriority
from .storage.outbox import STATE_BY_RANK, SYNC_RANK_SUBQUERY, enqueue, enqueue_many, sync_state_of
from .search import compile_search, next_cursor, normalise_filters, page_query
from .store import fetch_all

if TYPE_CHECKING:
    from .store import TaskStore

__all__ = ["TasksResource"]

_COLUMNS = (
    "id, version, status, intent, priority, priority_rank, code, patient_id, owner_id, "
    "requester_id, encounter_id, focus_id, business_status, authored_on, last_modified, "
    "period_start, period_end, body"
)
_INSERT_TASK = f"INSERT INTO tasks ({_COLUMNS}) VALUES ({', '.join('?' * 18)})"
_UPDATE_TASK = """
UPDATE tasks SET version = ?, status = ?, intent = ?, priority = ?, priority_rank = ?,
    code = ?, patient_id = ?, owner_id = ?, requester_id = ?, encounter_id = ?,
    focus_id = ?, business_status = ?, authored_on = ?, last_modified = ?,
    period_start = ?, period_end = ?, body = ?
WHERE id = ?
"""
_SELECT_CURRENT = "SELECT body, version FROM tasks WHERE id = ?"
_SELECT_WITH_STATE = f"SELECT body, {SYNC_RANK_SUBQUERY} FROM tasks WHERE id = ?"
_DELETE_TASK = "DELETE FROM tasks WHERE id = ?"
_INSERT_HISTORY = """
INSERT INTO task_history (task_id, version, op, body, changed_at, override_reason)
VALUES (?, ?, ?, ?, ?, ?)
"""
_SELECT_HISTORY = """
SELECT version, op, body, changed_at, override_reason FROM task_history
WHERE task_id = ? ORDER BY version
"""
_TASK_EXISTS = "SELECT 1 FROM tasks WHERE id = ?"

_READ_ONLY = {
    "versionId": "is managed by the store (use if_match= to guard an update)",
    "lastModified": "is managed by the store",
}
_NO_PRIORITY_RANK = 4
_MAX_BATCH = 1_000_000
_MAX_OVERRIDE_REASON = 1024
_OPTIMIZE_AFTER = 10_000


def _dumps(wire: Mapping[str, Any]) -> str:
    return json.dumps(wire, ensure_ascii=False, separators=(",", ":"))


_PRIORITY_RANK = {p: p.rank for p in TaskPriority}


def _row(task: Task, version: int, body: str) -> tuple[object, ...]:
    # Enum members are str subclasses: apsw binds them as their wire text.
    period = task.execution_period
    priority = task.priority
    return (
        task.id,
        version,
        task.status,
        task.intent,
        priority,
        _NO_PRIORITY_RANK if priority is None else _PRIORITY_RANK[priority],
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


def _check_task_id(task_id: object) -> str:
    if not isinstance(task_id, str) or not is_valid_id(task_id):
        raise ValidationError.single("id", "is not a well-formed task id", task_id, ID_PATTERN)
    return task_id


def _check_if_match(if_match: object) -> str | None:
    if if_match is None:
        return None
    if isinstance(if_match, bool) or not isinstance(if_match, (str, int)):
        raise ValidationError.single(
            "if_match", "expected the versionId string you last saw", if_match
        )
    return str(if_match).strip('"')


def _read_only_problems(request: Mapping[str, object], prefix: str = "") -> list[FieldError]:
    return [
        FieldError(prefix + key, message, _shorten(request[key]), "omit it")
        for key, message in _READ_ONLY.items()
        if key in request
    ]


def _decode_new(request: object, prefix: str = "") -> Task:
    """Decode a create request, with the create-only rules (no store-managed fields)."""
    if not isinstance(request, Mapping):
        raise ValidationError.single(
            prefix or "$",
            f"a task request must be a mapping, not {type(request).__name__}",
            request,
        )
    problems = _read_only_problems(request, prefix)
    try:
        task = decode_task(request)
    except ValidationError as exc:
        problems.extend(attrs.evolve(e, path=_join(prefix, e.path)) for e in exc.errors)
        raise ValidationError(problems) from None
    if problems:
        raise ValidationError(problems)
    return task


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


_set = object.__setattr__


def _stamp(task: Task, version: int, now: str) -> Task:
    """Set the bookkeeping fields of a task *this module just decoded*.

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


class TasksResource:
    """The Tasks resource of a :class:`~clinik_local.store.TaskStore`."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store

    # --- writes ------------------------------------------------------------------------

    def create(self, request: Mapping[str, object]) -> ApiResponse[Task]:
        """Create a task from a wire-form request; its id is generated unless given.

        Raises ValidationError (bad request) or TaskExistsError (id already in use).
        """
        task = _stamp(_decode_new(request), 1, timestamps.now())
        body = _dumps(encode_task(task))
        assert task.id is not None
        with self._store.write() as conn:
            try:
                conn.execute(_INSERT_TASK, _row(task, 1, body))
                # An id once used by a task that was deleted stays taken: its history (and
                # the server's copy of the id) still belong to that task.
                conn.execute(
                    _INSERT_HISTORY, (task.id, 1, "create", body, task.last_modified, None)
                )
            except apsw.ConstraintError:
                raise TaskExistsError(task.id) from None
            enqueue(conn, task.id, "create", body, None, task.last_modified or "")
        self._notify()
        return ApiResponse(task, {"syncState": "pending"})

    def create_many(self, requests: Iterable[Mapping[str, object]]) -> ApiResponse[list[Task]]:
        """Create many tasks in one transaction: all of them, or (on any error) none.

        Errors name the request by index (``[3].status``). Meant for bulk import.
        """
        if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Iterable):
            raise ValidationError.single(
                "requests", "expected a sequence of task requests", requests
            )
        now = timestamps.now()
        tasks: list[Task] = []
        problems: list[FieldError] = []
        seen: dict[str, int] = {}
        for index, request in enumerate(requests):
            if index >= _MAX_BATCH:
                raise ValidationError.single(
                    "requests", "too many requests in one batch", index, f"at most {_MAX_BATCH}"
                )
            try:
                task = _stamp(_decode_new(request, f"[{index}]"), 1, now)
            except ValidationError as exc:
                problems.extend(exc.errors)
                continue
            assert task.id is not None
            if task.id in seen:
                problems.append(
                    FieldError(
                        f"[{index}].id",
                        f"repeats the id of request [{seen[task.id]}]",
                        repr(task.id),
                    )
                )
            seen[task.id] = index
            tasks.append(task)
        if problems:
            raise ValidationError(problems)
        bodies = [_dumps(encode_task(t)) for t in tasks]
        rows = [_row(t, 1, b) for t, b in zip(tasks, bodies, strict=True)]
        with self._store.write() as conn:
            # A savepoint: on a clash, undo this batch's rows before looking. Explicit, not
            # `with conn:`: SQLITE_FULL rolls the whole transaction back, and the context
            # manager's RELEASE would then hide StoreFullError behind "no such savepoint".
            conn.execute("SAVEPOINT create_many")
            try:
                conn.executemany(_INSERT_TASK, rows)
                conn.execute("RELEASE create_many")
            except apsw.ConstraintError:
                conn.execute("ROLLBACK TO create_many")
                existing = next(t.id for t in tasks if fetch_all(conn, _TASK_EXISTS, (t.id,)))
                raise TaskExistsError(str(existing)) from None
            conn.executemany(
                _INSERT_HISTORY,
                [
                    (t.id, 1, "create", b, t.last_modified, None)
                    for t, b in zip(tasks, bodies, strict=True)
                ],
            )
            enqueue_many(
                conn,
                [(t.id or "", "create", b, None, now) for t, b in zip(tasks, bodies, strict=True)],
            )
        if len(tasks) >= _OPTIMIZE_AFTER:
            self._store.optimize()  # a bulk import shifts the statistics the planner uses
        if tasks:
            self._notify()
        return ApiResponse(tasks, {"syncState": "pending", "count": len(tasks)})

    def update(
        self,
        task_id: str,
        changes: Mapping[str, object],
        *,
        if_match: str | int | None = None,
        admin_override: str | None = None,
    ) -> ApiResponse[Task]:
        """Apply a partial update in wire form: given keys replace, ``None`` clears.

        Status changes are checked against the Task lifecycle
        (:mod:`clinik_local.lifecycle`) and refused with IllegalTransitionError;
        ``admin_override="why"`` lets an administrative correction through and records
        the reason in the task's history. ``if_match`` (the versionId you saw) makes
        the update conditional: VersionConflictError if the task changed meanwhile.
        An update that changes nothing writes nothing and returns the task as it is.
        """
        task_id = _check_task_id(task_id)
        expected = _check_if_match(if_match)
        if not isinstance(changes, Mapping):
            raise ValidationError.single(
                "changes",
                f"expected a mapping of wire fields, not {type(changes).__name__}",
                changes,
            )
        problems = _read_only_problems(changes)
        if "id" in changes and changes["id"] != task_id:
            problems.append(
                FieldError(
                    "id", "cannot be changed by an update", _shorten(changes["id"]), repr(task_id)
                )
            )
        if admin_override is not None and (
            not isinstance(admin_override, str)
            or not admin_override.strip()
            or len(admin_override) > _MAX_OVERRIDE_REASON
        ):
            problems.append(
                FieldError(
                    "admin_override",
                    "must say why the lifecycle is overridden",
                    _shorten(admin_override),
                    f"1-{_MAX_OVERRIDE_REASON} characters",
                )
            )
        if problems:
            raise ValidationError(problems)
        with self._store.write() as conn:
            rows = fetch_all(conn, _SELECT_CURRENT, (task_id,))
            if not rows:
                raise NotFoundError(f"no task with id {task_id!r}")
            body, version = rows[0]
            if expected is not None and expected != str(version):
                raise VersionConflictError(task_id, expected, str(version))
            current: dict[str, Any] = json.loads(body)
            merged = {k: v for k, v in current.items() if k not in _READ_ONLY}
            # None clears a field: decode treats null as absent, and still names unknown keys.
            merged.update(changes)
            if merged.get("authoredOn") is None:
                # Clearing authoredOn would silently re-stamp it with "now": refuse.
                raise ValidationError.single("authoredOn", "is required and cannot be cleared")
            new = decode_task(merged)
            old = task_from_stored(current)
            if admin_override is None:
                problem = transition_problem(old.status, new.status)
                if problem is not None:
                    raise IllegalTransitionError(
                        task_id, old.status.value, new.status.value, problem
                    )
            if attrs.evolve(new, version_id=old.version_id, last_modified=old.last_modified) == old:
                return ApiResponse(old, {"syncState": sync_state_of(conn, task_id)})
            new_version = int(version) + 1
            now = max(timestamps.now(), old.last_modified or "")
            new = _stamp(new, new_version, now)
            new_body = _dumps(encode_task(new))
            row = _row(new, new_version, new_body)
            conn.execute(_UPDATE_TASK, (*row[1:], task_id))
            conn.execute(
                _INSERT_HISTORY,
                (task_id, new_version, "update", new_body, new.last_modified, admin_override),
            )
            enqueue(conn, task_id, "update", new_body, int(version), new.last_modified or "")
        self._notify()
        return ApiResponse(new, {"syncState": "pending"})

    def delete(
        self, task_id: str, *, if_match: str | int | None = None
    ) -> ApiResponse[dict[str, object]]:
        """Delete a task (NotFoundError if there is none); queues the delete for sync."""
        task_id = _check_task_id(task_id)
        expected = _check_if_match(if_match)
        with self._store.write() as conn:
            rows = fetch_all(conn, _SELECT_CURRENT, (task_id,))
            if not rows:
                raise NotFoundError(f"no task with id {task_id!r}")
            body, version = rows[0]
            if expected is not None and expected != str(version):
                raise VersionConflictError(task_id, expected, str(version))
            now = timestamps.now()
            conn.execute(_DELETE_TASK, (task_id,))
            conn.execute(_INSERT_HISTORY, (task_id, int(version) + 1, "delete", body, now, None))
            enqueue(conn, task_id, "delete", None, int(version), now)
        self._notify()
        return ApiResponse({"id": task_id, "deleted": True}, {"syncState": "pending"})

    # --- reads -------------------------------------------------------------------------

    def get(self, task_id: str) -> ApiResponse[Task]:
        """The task with this id; NotFoundError if there is none."""
        task_id = _check_task_id(task_id)
        with self._store.read() as conn:
            rows = fetch_all(conn, _SELECT_WITH_STATE, (task_id,))
        if not rows:
            raise NotFoundError(f"no task with id {task_id!r}")
        body, rank = rows[0]
        return ApiResponse(task_from_stored(json.loads(body)), {"syncState": STATE_BY_RANK[rank]})

    def search(
        self,
        filters: Mapping[str, object] | None = None,
        /,
        **keywords: object,
    ) -> ApiResponse[list[Task]]:
        """One page of tasks matching every filter (a list, or commas, means any of).

        Filters, sort and their forms are listed in :mod:`clinik_local.search`
        (equality, any-of, ``{"not": ...}``, ``None`` for missing, dates with FHIR
        prefixes, ``dueBefore``/``overdue``, ``text``, ``basedOn``/``partOf``,
        ``input``/``output``). Paging: ``limit`` (1-1000, default 20) and ``cursor``
        (``meta["nextCursor"]`` of the previous page); ``sort`` (default
        ``-authoredOn``, ties by id); ``total=True`` adds ``meta["total"]``.
        """
        compiled, _ = compile_search(normalise_filters(filters, keywords))
        with self._store.read() as conn:
            sql, params = page_query(compiled, lambda s, p: int(fetch_all(conn, s, p)[0][0]))
            rows = fetch_all(conn, sql, params)
            total = (
                fetch_all(conn, compiled.count_sql, compiled.count_params)[0][0]
                if compiled.total
                else None
            )
        has_more = len(rows) > compiled.limit
        rows = rows[: compiled.limit]
        tasks = tasks_from_bodies([r[0] for r in rows])
        cursor = next_cursor(compiled, rows[-1]) if has_more else None
        meta: dict[str, object] = {"nextCursor": cursor, "hasMore": has_more}
        if total is not None:
            meta["total"] = int(total)
        return ApiResponse(tasks, meta)

    def count(
        self, filters: Mapping[str, object] | None = None, /, **keywords: object
    ) -> ApiResponse[int]:
        """How many tasks match the filters (same filters as :meth:`search`)."""
        merged = normalise_filters(filters, keywords)
        for paging in ("cursor", "limit", "sort", "total"):
            merged.pop(paging, None)
        compiled, _ = compile_search(merged)
        with self._store.read() as conn:
            total = fetch_all(conn, compiled.count_sql, compiled.count_params)[0][0]
        return ApiResponse(int(total), {})

    def history(self, task_id: str) -> ApiResponse[list[dict[str, object]]]:
        """Every recorded version of a task, oldest first (also after it was deleted).

        Each item: ``version``, ``op``, ``changedAt``, ``overrideReason`` and ``task``
        (the wire form of that version).
        """
        task_id = _check_task_id(task_id)
        with self._store.read() as conn:
            rows = fetch_all(conn, _SELECT_HISTORY, (task_id,))
        if not rows:
            raise NotFoundError(f"no history for task id {task_id!r}")
        items: list[dict[str, object]] = [
            {
                "version": v,
                "op": op,
                "changedAt": at,
                "overrideReason": reason,
                "task": json.loads(body),
            }
            for v, op, body, at, reason in rows
        ]
        return ApiResponse(items, {})

    def _notify(self) -> None:
        sync = self._store._sync
        if sync is not None:
            sync.notify_change()
