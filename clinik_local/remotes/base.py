"""The Remote protocol: what the sync engine needs from a service it syncs with.

The engine (:mod:`clinik_local.sync`) never speaks HTTP: it hands one
:class:`Change` at a time to a :class:`Remote` and gets back one typed outcome, which
it records. Today's remote is :class:`~clinik_local.remotes.clinik.ClinikRemote` (the
clinik contract, ``sync-protocol.md``); a FHIR R4 server is the next, behind the same
protocol; tests inject their own through ``SyncConfig(remote=...)``.

Outcomes of a push, and what the engine does with each:

- :class:`Delivered`: applied (or, for a delete, already gone); the row is done and
  the server's ``version``/``modified`` go to ``task_sync`` for the next ``If-Match``.
- :class:`Conflict`: the server has another version (``server_task``); both are kept
  for :meth:`SyncEngine.resolve`.
- :class:`Refused`: refused for good (a dead letter, with the server's ``body``).
- :class:`Transient`: worth retrying (after ``retry_after`` seconds, if the server said).
- :class:`AuthFailed`: the credentials were refused (also fresh ones): sync pauses.
- :class:`Unreachable`: the service cannot be reached at all: the engine backs off.

The pull side (two-way sync) is :class:`PullRemote`: a :class:`Remote` that can also
list the tasks of a scope a page at a time (:meth:`PullRemote.list_page`, used by a
bootstrap) and read the change log a page at a time (:meth:`PullRemote.changes_page`).
It is defined by what the engine needs, not by one wire:

- a **scope** is a mapping of the contract's filter names (:data:`SCOPE_FILTERS`:
  ``patientId``, ``ownerId``, ``requesterId``, ``status``, ``priority``, ``code``) to
  a tuple of allowed values (AND across names, any of the values); ``{}`` is every task.
  A remote maps it to its own query (the clinik contract: ``?ownerId=a,b``; a FHIR
  server: its search parameters);
- **cursors are opaque strings** the remote made: the engine stores them and hands them
  back, never parses them (the clinik contract's ``nextCursor``; a FHIR remote may
  encode a ``_lastUpdated`` watermark and a page link in one);
- a **listing** (:class:`ListedPage`) is a page of current server tasks; the first page
  (``cursor=None``) also carries ``changes_cursor``, the change-log position at the
  moment the listing began, from which the engine then reads the log;
- a **change-log page** (:class:`ChangesPage`) holds :class:`LogItem` s in the order the
  server committed them, each with the task as that write left it (``None`` for a
  delete), the ``version`` it produced (the next ``If-Match``) and the ``change_id``
  (the ``Idempotency-Key`` of the write, None if it had none), so the engine knows its
  own writes. ``next_cursor`` is where the next page starts (``since`` itself when
  nothing is new) and ``has_more`` whether to read on now. A log that no longer
  reaches back to ``since`` answers :class:`CursorExpired` (the engine bootstraps
  again). A remote whose server has no log (FHIR ``_lastUpdated`` polling) may return
  an item per task changed since the cursor with ``change_id=None``: items must come in
  commit order per task, and a task that left the scope must come as an item too
  (a delete, or the task as it is now: the engine removes tasks out of its scope);
- failures are the push outcomes: :class:`Transient` (retried with backoff),
  :class:`Unreachable` (the engine goes offline), :class:`AuthFailed` (sync pauses with
  ``auth_required``) and :class:`Refused` (a 4xx that will not change by itself: the
  engine reports ``error`` and retries with backoff). Like ``push``, these never raise
  for anything the network or the server did.

The engine calls ``list_page`` / ``changes_page`` from its worker thread only, one at a
time, never inside a database transaction. A remote with ``push`` and ``close`` only is
a push-only remote: a store using it syncs one way (``SyncConfig(pull=...)`` is then
ignored, and a ``scope`` refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

import attrs

__all__ = [
    "SCOPE_FILTERS",
    "AuthFailed",
    "Change",
    "ChangesOutcome",
    "ChangesPage",
    "Conflict",
    "CursorExpired",
    "Delivered",
    "ListOutcome",
    "ListedPage",
    "LogItem",
    "PullRemote",
    "PushOutcome",
    "Refused",
    "Remote",
    "Scope",
    "Transient",
    "Unreachable",
    "is_pull_remote",
]

#: The contract's filter names, which a scope may use.
SCOPE_FILTERS: tuple[str, ...] = (
    "patientId",
    "ownerId",
    "requesterId",
    "status",
    "priority",
    "code",
)
Scope: TypeAlias = Mapping[str, tuple[str, ...]]
"""Filter name (one of :data:`SCOPE_FILTERS`) -> the allowed values; ``{}``: every task."""


@attrs.frozen(kw_only=True)
class Change:
    """One local change to deliver.

    ``change_id`` is the idempotency key every attempt carries. ``body`` is the wire
    task without server-managed fields (None for a delete). ``server_version`` is the
    server's version of the task as last acknowledged (``If-Match``), None if the
    server never acknowledged this task (so an update goes as a create).
    """

    change_id: str
    task_id: str
    op: Literal["create", "update", "delete"]
    body: dict[str, Any] | None
    server_version: str | None
    #: The server is known to hold the task although its version is not known here (a
    #: store restored from an export): ask the server for its version, don't create.
    known_on_server: bool = False
    #: With ``known_on_server``: the task as this device believes the server holds it;
    #: a server task that differs from it is a conflict, never overwritten.
    base: dict[str, Any] | None = None


@attrs.frozen(kw_only=True)
class Delivered:
    """Applied; ``task`` is the server's copy when it sent one; ``gone`` for a delete."""

    version: str | None = None
    modified: str | None = None
    task: dict[str, Any] | None = None
    gone: bool = False
    #: For a delete (``gone``): True when the server applied it just now, so its change
    #: log will show it after every earlier write of the task; False when nothing was
    #: written (the server never had the task); None when the remote cannot tell (the
    #: task was gone already, or its log may not show deletes).
    applied: bool | None = None


@attrs.frozen(kw_only=True)
class Conflict:
    """The server holds another version (``server_task``; None if it has none)."""

    server_task: dict[str, Any] | None
    status: int
    body: str | None


@attrs.frozen(kw_only=True)
class Refused:
    """Refused for good: the status, the server's body, a short error.

    ``status`` is None when the remote refused the change before sending it (a FHIR
    remote that cannot map a reference to an id the server knows).
    """

    status: int | None
    body: str | None
    error: str


@attrs.frozen(kw_only=True)
class Transient:
    """Failed in a way worth retrying; ``retry_after`` seconds if the server asked."""

    error: str
    status: int | None = None
    retry_after: float | None = None


@attrs.frozen(kw_only=True)
class AuthFailed:
    """The service refused the credentials (after asking for fresh ones once)."""

    message: str


@attrs.frozen(kw_only=True)
class Unreachable:
    """The service could not be reached at all (refused, unreachable, DNS, TLS)."""

    message: str


PushOutcome = Delivered | Conflict | Refused | Transient | AuthFailed | Unreachable


class Remote(Protocol):
    """A service the outbox is delivered to.

    ``push`` may be called from up to ``lanes`` threads at once, each with its own
    ``lane`` index (``0 <= lane < lanes``), one call at a time per lane; it returns an
    outcome and never raises for anything the network or the server did. ``close``
    releases connections; the remote stays usable (it reconnects on the next push).
    """

    def push(self, change: Change, *, lane: int) -> PushOutcome:
        """Deliver one change and classify the answer."""
        ...

    def close(self) -> None:
        """Release connections (idempotent; a later push reconnects)."""
        ...


@attrs.frozen(kw_only=True)
class ListedPage:
    """One page of the current tasks of a scope (a bootstrap reads them all).

    ``tasks``: server tasks in wire form exactly as sent (each with its ``id`` and
    ``versionId``). ``next_cursor``: the cursor of the next page, None on the last.
    ``changes_cursor``: on the first page only, the change-log position at the moment
    the listing began.
    """

    tasks: tuple[dict[str, Any], ...]
    next_cursor: str | None
    changes_cursor: str | None = None


@attrs.frozen(kw_only=True)
class LogItem:
    """One accepted write from the change log.

    ``task`` is the task as the write left it (wire form, as sent), None when
    ``deleted``. ``version``: the ``versionId`` the write produced. ``change_id``: the
    ``Idempotency-Key`` the write came with (None: it had none). ``modified``: when
    the server made the write, for a deletion (whose ``task`` is None) where the log
    knows it (a FHIR history entry's ``lastModified``); a task's own is in ``task``.
    """

    task_id: str
    deleted: bool
    task: dict[str, Any] | None
    version: str | None
    change_id: str | None
    modified: str | None = None


@attrs.frozen(kw_only=True)
class ChangesPage:
    """One page of the change log after a cursor, oldest first.

    ``next_cursor``: where the next page starts (``since`` itself when nothing is new);
    ``has_more``: more items are already there (read on now).
    """

    items: tuple[LogItem, ...]
    next_cursor: str
    has_more: bool


@attrs.frozen(kw_only=True)
class CursorExpired:
    """The change log no longer reaches back to ``since``: bootstrap again."""

    message: str


ListOutcome = ListedPage | Refused | Transient | AuthFailed | Unreachable
ChangesOutcome = ChangesPage | CursorExpired | Refused | Transient | AuthFailed | Unreachable


@runtime_checkable
class PullRemote(Remote, Protocol):
    """A :class:`Remote` the engine can also pull from (see the module docstring)."""

    def list_page(self, scope: Scope, cursor: str | None, limit: int) -> ListOutcome:
        """One page of the scope's current tasks (``cursor=None``: the first page)."""
        ...

    def changes_page(self, scope: Scope, since: str, limit: int) -> ChangesOutcome:
        """One page of the scope's change log after ``since``."""
        ...


def is_pull_remote(remote: object) -> bool:
    """Whether ``remote`` has the pull methods (else it is push-only)."""
    return callable(getattr(remote, "list_page", None)) and callable(
        getattr(remote, "changes_page", None)
    )
