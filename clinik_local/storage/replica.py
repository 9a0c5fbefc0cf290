"""All SQL on ``sync_bases`` and on the ``sync.*`` keys of ``meta``: the pull side's state.

``sync_bases`` holds, per task, the last server copy this device accepted (the *base*
of every merge): the server's wire JSON exactly as it was sent (unknown fields and
over-long texts included), its ``versionId``, and two marks:

- ``unseen``: a ``versionId`` learnt outside the change log (the ``data`` of a 2xx or a
  ``412`` answer) that the log has not shown yet. The log is in commit order, so the
  task's log items before that version are older than what this device knows, and are
  skipped (no flicker back to an older version); the item with that version clears it.
  :data:`DELETED_HERE` in its place marks a *tombstone*: the server applied this
  device's delete of the task, which the log has not shown yet; every item of the task
  before its first delete item is older than that, and is skipped.
- ``listed``: the bootstrap generation that last saw the task (a listing page, or any
  server copy accepted while that bootstrap was current). When a bootstrap ends, local
  tasks it did not see and with no undelivered change are removed: the server no longer
  has them in the scope.

The ``sync.*`` keys of ``meta`` (:class:`PullState`) say which service and scope the
sync state belongs to, where the change log was read to (``sync.cursor``), and how far
a bootstrap got (``sync.bootstrap.next``, ``sync.bootstrap.changes``); each is written
in the same transaction as the data it describes, so a crash resumes exactly there.

``task_sync.server_version`` (:mod:`.outbox`) stays the ``If-Match`` of the next push;
the sync layer writes it together with the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import apsw
import attrs

from .connection import fetch_all, fetch_among, ids_among, meta_value, meta_values, set_meta

__all__ = [
    "DELETED_HERE",
    "Base",
    "PullState",
    "base_of",
    "based_ids",
    "clear_unseen",
    "drop_base",
    "drop_unlisted_bases",
    "dropped_indexes",
    "forget_versions",
    "keep_dropped_indexes",
    "mark_deleted",
    "read_state",
    "set_base",
    "set_bases_many",
    "set_unseen",
    "unlisted_tasks",
    "versions_among",
    "write_state",
]

_KEYS = {
    "service": "sync.service",
    "scope": "sync.scope",
    "cursor": "sync.cursor",
    "bootstrap_next": "sync.bootstrap.next",
    "bootstrap_changes": "sync.bootstrap.changes",
    "generation": "sync.generation",
    "pulled": "sync.pulled",
    "last_pull_at": "sync.last_pull_at",
}
#: The search indexes a bootstrap dropped (rows.drop_search_indexes), until it builds them.
_DROPPED_INDEXES = "sync.bootstrap.indexes"
_UNSET = object()

#: The ``unseen`` mark of a tombstone (see the module docstring): spaces and angle
#: brackets are in no ``versionId`` (FHIR's are ``[A-Za-z0-9.-]``; ours are numbers).
DELETED_HERE = "<deleted here>"


@attrs.frozen(kw_only=True)
class Base:
    """A task's last accepted server copy (``body`` as the server sent it)."""

    task_id: str
    version_id: str | None
    body: str
    unseen: str | None
    listed: int


@attrs.frozen(kw_only=True)
class PullState:
    """The pull side's progress, as ``meta`` holds it.

    ``service``/``scope``: what the state belongs to (None: never synced). ``cursor``:
    the change log position read to (None: a bootstrap is needed). A bootstrap is under
    way when ``bootstrap_changes`` (the first page's ``changesCursor``) is set;
    ``bootstrap_next`` is the listing cursor of its next page (None: not started, or
    the listing is done). ``generation`` counts bootstraps; ``pulled`` counts every
    server task written here; ``last_pull_at`` is when the log was last read to its end.
    """

    service: str | None = None
    scope: str | None = None
    cursor: str | None = None
    bootstrap_next: str | None = None
    bootstrap_changes: str | None = None
    generation: int = 0
    pulled: int = 0
    last_pull_at: str | None = None

    @property
    def bootstrapping(self) -> bool:
        """Whether a bootstrap is under way (or needed: no cursor yet)."""
        return self.cursor is None


def read_state(conn: apsw.Connection) -> PullState:
    """The pull state (defaults for keys never written)."""
    found = meta_values(conn, "sync.")
    values: dict[str, object] = {}
    for name, key in _KEYS.items():
        if key in found:
            value = str(found[key])
            values[name] = int(value) if name in ("generation", "pulled") else value
    return PullState(**values)  # type: ignore[arg-type]


def write_state(
    conn: apsw.Connection,
    *,
    service: object = _UNSET,
    scope: object = _UNSET,
    cursor: object = _UNSET,
    bootstrap_next: object = _UNSET,
    bootstrap_changes: object = _UNSET,
    generation: object = _UNSET,
    pulled: object = _UNSET,
    last_pull_at: object = _UNSET,
) -> None:
    """Set the given keys (None removes one) on the caller's write transaction."""
    given = {
        "service": service,
        "scope": scope,
        "cursor": cursor,
        "bootstrap_next": bootstrap_next,
        "bootstrap_changes": bootstrap_changes,
        "generation": generation,
        "pulled": pulled,
        "last_pull_at": last_pull_at,
    }
    for name, value in given.items():
        if value is _UNSET:
            continue
        set_meta(conn, _KEYS[name], None if value is None else str(value))


def dropped_indexes(conn: apsw.Connection) -> str | None:
    """What a bootstrap under way dropped to load faster (None: nothing is dropped)."""
    return meta_value(conn, _DROPPED_INDEXES)


def keep_dropped_indexes(conn: apsw.Connection, saved: str | None) -> None:
    """Record (None: forget) what a bootstrap dropped, in its page's transaction."""
    set_meta(conn, _DROPPED_INDEXES, saved)


# --- bases ---------------------------------------------------------------------------------


def base_of(conn: apsw.Connection, task_id: str) -> Base | None:
    """The task's base, or None (the server never gave this device a copy of it)."""
    found = fetch_all(
        conn,
        "SELECT version_id, body, unseen, listed FROM sync_bases WHERE task_id = ?",
        (task_id,),
    )
    if not found:
        return None
    version, body, unseen, listed = found[0]
    return Base(task_id=task_id, version_id=version, body=str(body), unseen=unseen, listed=listed)


def set_base(
    conn: apsw.Connection,
    task_id: str,
    version_id: str | None,
    body: str,
    *,
    listed: int,
    unseen: str | None = None,
) -> None:
    """Make ``body`` (the server's JSON as sent) the task's base."""
    conn.execute(
        "INSERT INTO sync_bases (task_id, version_id, body, unseen, listed) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET "
        "version_id = excluded.version_id, body = excluded.body, unseen = excluded.unseen, "
        "listed = max(listed, excluded.listed)",
        (task_id, version_id, body, unseen, listed),
    )


def set_bases_many(
    conn: apsw.Connection, bases: Sequence[tuple[str, str | None, str]], *, listed: int
) -> None:
    """Many :func:`set_base` at once: ``(task_id, version_id, body)``, none unseen."""
    conn.executemany(
        "INSERT INTO sync_bases (task_id, version_id, body, unseen, listed) "
        "VALUES (?, ?, ?, NULL, ?) ON CONFLICT (task_id) DO UPDATE SET "
        "version_id = excluded.version_id, body = excluded.body, unseen = NULL, "
        "listed = max(listed, excluded.listed)",
        [(task_id, version, body, listed) for task_id, version, body in bases],
    )


def versions_among(
    conn: apsw.Connection, task_ids: Sequence[str]
) -> dict[str, tuple[str | None, str | None]]:
    """The ``(version_id, unseen)`` of the bases of these tasks (one query; bodies are not
    read): what a page needs to know of each task's base before it applies the task."""
    sql = "SELECT task_id, version_id, unseen FROM sync_bases WHERE task_id IN ({ids})"
    return {str(r[0]): (r[1], r[2]) for r in fetch_among(conn, sql, task_ids)}


def based_ids(conn: apsw.Connection, task_ids: Sequence[str]) -> set[str]:
    """Which of these tasks have a base (one query)."""
    return ids_among(conn, "SELECT task_id FROM sync_bases WHERE task_id IN ({ids})", task_ids)


def set_unseen(conn: apsw.Connection, task_id: str, version_id: str | None) -> None:
    """Mark (or, with None, unmark) a version the log has not shown yet; the base stays."""
    conn.execute("UPDATE sync_bases SET unseen = ? WHERE task_id = ?", (version_id, task_id))


def mark_deleted(conn: apsw.Connection, task_id: str, *, listed: int) -> None:
    """Make the task's base a tombstone (:data:`DELETED_HERE`), adding one if it has none
    (a store from before schema 3 had no bases): the server applied this device's
    delete, and the log will show it."""
    conn.execute(
        "INSERT INTO sync_bases (task_id, version_id, body, unseen, listed) "
        "VALUES (?, NULL, 'null', ?, ?) ON CONFLICT (task_id) DO UPDATE SET "
        "unseen = excluded.unseen, listed = max(listed, excluded.listed)",
        (task_id, DELETED_HERE, listed),
    )


def drop_base(conn: apsw.Connection, task_id: str) -> None:
    """The server has no copy of the task (any more) for this device."""
    conn.execute("DELETE FROM sync_bases WHERE task_id = ?", (task_id,))


def clear_unseen(conn: apsw.Connection) -> None:
    """A bootstrap starts: its listing is newer than every version learnt before it."""
    conn.execute("UPDATE sync_bases SET unseen = NULL WHERE unseen IS NOT NULL")


def forget_versions(conn: apsw.Connection) -> None:
    """Another service: its versions are not this one's (the bodies stay, as bases)."""
    conn.execute("UPDATE sync_bases SET version_id = NULL, unseen = NULL")


def unlisted_tasks(conn: apsw.Connection, generation: int) -> list[str]:
    """Local tasks the bootstrap ``generation`` did not see and with no open change."""
    return [
        str(r[0])
        for r in fetch_all(
            conn,
            "SELECT t.id FROM tasks t LEFT JOIN sync_bases b ON b.task_id = t.id "
            "WHERE (b.task_id IS NULL OR b.listed < ?) "
            "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.task_id = t.id)",
            (generation,),
        )
    ]


def drop_unlisted_bases(conn: apsw.Connection, generation: int) -> None:
    """Bases of tasks the bootstrap ``generation`` did not see, that are not local and
    have no open change (the local task was removed, or never readable here)."""
    conn.execute(
        "DELETE FROM sync_bases WHERE listed < ? "
        "AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = sync_bases.task_id) "
        "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.task_id = sync_bases.task_id)",
        (generation,),
    )
