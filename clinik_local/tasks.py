"""``store.tasks``: create, get, update, delete, search and count, as the remote SDK has them.

Every call returns :class:`~clinik_local.model.ApiResponse`. This layer owns the
rules (validation, the lifecycle, if-match, what a no-op update is) and holds no SQL:
every mutation is one local edit of :mod:`clinik_local.storage.rows` (task row, history
row and exactly one outbox row) in one ``BEGIN IMMEDIATE`` transaction of the
:class:`~clinik_local.storage.database.Database`; bad input raises before (or rolls
back) anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from . import timestamps
from .codec import decode_task, encode_task, task_from_stored, tasks_from_bodies
from .errors import (
    FieldError,
    IllegalTransitionError,
    NotFoundError,
    ValidationError,
    VersionConflictError,
    shorten,
)
from .events import ChangeEvent
from .ids import ID_PATTERN, is_valid_id
from .lifecycle import transition_problem
from .merge import patch_of
from .model import ApiResponse, Task, TaskVersion
from .search import check_at_most, compile_search, next_cursor, normalise_filters
from .storage import outbox, rows
from .storage.database import Database
from .wire import SERVER_FIELDS, dumps, loads

__all__ = ["TasksResource"]

_READ_ONLY = dict(
    zip(
        SERVER_FIELDS,
        (
            "is managed by the store (use if_match= to guard an update)",
            "is managed by the store",
        ),
        strict=True,
    )
)
_MAX_BATCH = 1_000_000
_MAX_OVERRIDE_REASON = 1024
_OPTIMIZE_AFTER = 10_000


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
        FieldError(prefix + key, message, shorten(request[key]), "omit it")
        for key, message in _READ_ONLY.items()
        if key in request
    ]


def _decode_new(request: object, prefix: str = "") -> Task:
    """Decode a create request, with the create-only rules (no store-managed fields)."""
    if type(request) is not dict and not isinstance(request, Mapping):  # (dict: no ABC check)
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
    if path == "$":  # the whole request (e.g. its size): name the request itself
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


class TasksResource:
    """The Tasks resource of a :class:`~clinik_local.store.TaskStore` (``store.tasks``).

    Built by the store on its database; ``on_change`` is called after every committed
    local edit (the store wakes its sync worker with it).
    """

    def __init__(self, db: Database, *, on_change: Callable[[], None] | None = None) -> None:
        self._db = db
        self._on_change = on_change

    # --- writes ------------------------------------------------------------------------

    def create(self, request: Mapping[str, object]) -> ApiResponse[Task]:
        """Create a task from a wire-form request; its id is generated unless given.

        Raises ValidationError (bad request) or TaskExistsError (id already in use).
        """
        task = rows.stamp(_decode_new(request), 1, timestamps.now())
        wire = encode_task(task)
        body = dumps(wire)
        with self._db.write() as conn:
            rows.insert_local(conn, task, body, wire=wire)
            self._db.note_change(str(task.id), "local")
        self._notify()
        return ApiResponse(task, {"syncState": "pending"})

    def create_many(
        self, requests: Iterable[Mapping[str, object]], *, synced: bool = False
    ) -> ApiResponse[list[Task]]:
        """Create many tasks in one transaction: all of them, or (on any error) none.

        Errors name the request by index (``[3].status``). Meant for bulk import.
        ``synced=True`` restores tasks the server already holds (from an export of a
        synced store): no outbox rows, so nothing is created on the server again; a
        later change of one asks the server for its version first and is sent as a
        conditional write on it (see docs/offline-sync.md, "Restoring a device").
        """
        if not isinstance(synced, bool):
            raise ValidationError.single("synced", "expected True or False", synced)
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
                task = rows.stamp(_decode_new(request, f"[{index}]"), 1, now)
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
        wires = [encode_task(t) for t in tasks]
        bodies = [dumps(w) for w in wires]
        with self._db.write() as conn:
            rows.insert_local_many(conn, tasks, bodies, now, wires=wires, synced=synced)
            self._db.note_changes((str(t.id) for t in tasks), "local")
        if len(tasks) >= _OPTIMIZE_AFTER:
            self._db.optimize()  # a bulk import shifts the statistics the planner uses
        if tasks:
            self._notify()
        state = "synced" if synced else "pending"
        return ApiResponse(tasks, {"syncState": state, "count": len(tasks)})

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
                    "id", "cannot be changed by an update", shorten(changes["id"]), repr(task_id)
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
                    shorten(admin_override),
                    f"1-{_MAX_OVERRIDE_REASON} characters",
                )
            )
        if problems:
            raise ValidationError(problems)
        with self._db.write() as conn:
            found = rows.current(conn, task_id)
            if found is None:
                raise NotFoundError(f"no task with id {task_id!r}")
            body, version = found
            if expected is not None and expected != str(version):
                raise VersionConflictError(task_id, expected, str(version))
            current: dict[str, Any] = loads(body)
            # Fields this version does not know (a newer server's, kept in a server
            # copy) are carried through untouched, so the next push does not erase them.
            unknown = {k: v for k, v in current.items() if k not in rows.KNOWN_FIELDS}
            merged = {k: v for k, v in current.items() if k not in _READ_ONLY and k not in unknown}
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
                return ApiResponse(old, {"syncState": outbox.sync_state_of(conn, task_id)})
            now = max(timestamps.now(), old.last_modified or "")
            new = rows.stamp(new, version + 1, now)
            new_wire = encode_task(new)
            new_wire.update(unknown)
            rows.update_local(
                conn,
                new,
                dumps(new_wire),
                base_version=version,
                changed_at=new.last_modified or "",
                reason=admin_override,
                wire=new_wire,
                patch=dumps(patch_of(current, new_wire)),
            )
            self._db.note_change(task_id, "local")
        self._notify()
        return ApiResponse(new, {"syncState": "pending"})

    def delete(
        self, task_id: str, *, if_match: str | int | None = None
    ) -> ApiResponse[dict[str, object]]:
        """Delete a task (NotFoundError if there is none); queues the delete for sync."""
        task_id = _check_task_id(task_id)
        expected = _check_if_match(if_match)
        with self._db.write() as conn:
            found = rows.current(conn, task_id)
            if found is None:
                raise NotFoundError(f"no task with id {task_id!r}")
            body, version = found
            if expected is not None and expected != str(version):
                raise VersionConflictError(task_id, expected, str(version))
            rows.delete_local(conn, task_id, body, version, timestamps.now())
            self._db.note_change(task_id, "local")
        self._notify()
        return ApiResponse({"id": task_id, "deleted": True}, {"syncState": "pending"})

    # --- reads -------------------------------------------------------------------------

    def get(self, task_id: str) -> ApiResponse[Task]:
        """The task with this id; NotFoundError if there is none."""
        task_id = _check_task_id(task_id)
        with self._db.read() as conn:
            found = rows.get_with_state(conn, task_id)
        if found is None:
            raise NotFoundError(f"no task with id {task_id!r}")
        wire, state = found
        return ApiResponse(task_from_stored(wire), {"syncState": state})

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
        with self._db.read() as conn:
            found, total = rows.search_page(conn, compiled)
        has_more = len(found) > compiled.limit
        found = found[: compiled.limit]
        tasks = tasks_from_bodies([r[0] for r in found])
        cursor = next_cursor(compiled, found[-1]) if has_more else None
        meta: dict[str, object] = {"nextCursor": cursor, "hasMore": has_more}
        if total is not None:
            meta["total"] = int(total)
        return ApiResponse(tasks, meta)

    def count(
        self,
        filters: Mapping[str, object] | None = None,
        /,
        *,
        at_most: int | None = None,
        **keywords: object,
    ) -> ApiResponse[int]:
        """How many tasks match the filters (same filters as :meth:`search`).

        A count reads every match. ``at_most=N`` stops at N (a badge's "99+"): the
        answer is then ``min(matches, N)``, so ``data == N`` means "N or more", and
        ``meta["atMost"]`` is N. A positive integer, else ValidationError.
        """
        merged = normalise_filters(filters, keywords)
        for paging in ("cursor", "limit", "sort", "total"):
            merged.pop(paging, None)
        compiled, _ = compile_search(merged)
        check_at_most(at_most)  # before any read: bad input writes and reads nothing
        with self._db.read() as conn:
            total = rows.count_matching(conn, compiled, at_most=at_most)
        return ApiResponse(total, {} if at_most is None else {"atMost": at_most})

    def history(self, task_id: str) -> ApiResponse[list[TaskVersion]]:
        """Every recorded version of a task, oldest first (also after it was deleted).

        Each item is a :class:`~clinik_local.model.TaskVersion`; its ``task`` is a
        :class:`~clinik_local.model.Task`, like ``get()`` returns.
        """
        task_id = _check_task_id(task_id)
        with self._db.read() as conn:
            found = rows.history(conn, task_id)
        if not found:
            raise NotFoundError(f"no history for task id {task_id!r}")
        items = [
            TaskVersion(
                version=int(h.version),
                op=h.op,
                changed_at=h.changed_at,
                override_reason=h.override_reason,
                task=task_from_stored(loads(h.body)),
                origin=h.origin,
            )
            for h in found
        ]
        return ApiResponse(items, {})

    def watch(self, callback: Callable[[ChangeEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` after every commit that changes tasks; returns the
        unsubscribe callable.

        The :class:`~clinik_local.events.ChangeEvent` names the tasks that changed and
        whether the change was ``"local"`` (an edit through this store) or ``"pulled"``
        (written by sync from the server). Callbacks run on the store's notification
        thread, one at a time, in commit order, after the commit and never while a
        write lock or a sync pass is held: they may read, write and call ``store.sync``.
        An exception in a callback is logged (``clinik_local.events``) and ignored.
        """
        if not callable(callback):
            raise ValidationError.single(
                "callback", "must be a callable taking a ChangeEvent", type(callback)
            )
        return self._db.feed.subscribe(callback)

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change()
