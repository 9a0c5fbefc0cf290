"""The pull half of sync: bootstrap a scope, then follow the change log.

No SQL here and no HTTP: pages come from a :class:`~clinik_local.remotes.base.PullRemote`
and are applied through :mod:`.rebase` and :mod:`clinik_local.storage.replica`. The
engine (:mod:`.engine`) decides when a pull runs; :meth:`Puller.run` reads pages until
the log is read to its end (or a failure, or the time budget while changes wait to be
pushed), each page in its own short write transaction, never with a transaction open
during a request:

1. **Which state.** :meth:`Puller.prepare` compares the service and scope recorded in
   the store with the config's. Another service: its versions are forgotten (no stale
   ``If-Match`` goes to the new one; the bodies stay as merge bases) and the store
   bootstraps; another scope: it bootstraps the new scope.
2. **Bootstrap** (no cursor). Listing pages of the scope, from the first one, whose
   ``changes_cursor`` is kept. Each page is applied in ONE transaction together with the
   bootstrap's progress (the next page's cursor and the saved ``changes_cursor``), so a
   process killed mid-bootstrap resumes after the last committed page. A task the
   listing shows is accepted like a pulled one (undelivered changes are rebased on it).
   The next page is read on a prefetch thread while one is applied (:class:`_Prefetch`).
   A large listing into a fresh store loads without the search indexes and builds them
   with its last page (``rows.restore_search_indexes``).
   When the last page is in, local tasks the listing did not show and with no
   undelivered change are removed (deleted on the server, or outside the scope), and the
   log is read from the saved ``changes_cursor``.
3. **The log.** Each page's items are applied, task by task
   (:func:`.rebase.apply_page`), and the cursor advanced in one transaction;
   applying a page twice changes nothing. ``410``
   (:class:`~clinik_local.remotes.base.CursorExpired`) starts a new bootstrap; pending
   local changes are kept (they are rebased on what the listing shows).

Before a page is applied, the transaction checks that this engine still holds the
file's sync lease (one engine per file, :mod:`.lease`) and that the cursor it was read
from is still the store's: a page read by a stale engine is dropped, never applied
twice.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import apsw
import attrs

from .. import timestamps
from ..remotes.base import (
    AuthFailed,
    ChangesPage,
    CursorExpired,
    ListedPage,
    ListOutcome,
    PullRemote,
    Refused,
    Scope,
    Transient,
    Unreachable,
)
from ..storage import outbox, replica, rows
from ..storage.database import Database
from . import rebase
from .config import SyncConfig

__all__ = ["PullFailure", "PullResult", "Puller", "monotonic_budget", "prepare"]

PullFailure = Refused | Transient | AuthFailed | Unreachable
#: How often a waiting prefetch thread or writer looks whether it should stop (seconds).
_POLL = 0.05


@attrs.define
class PullResult:
    """What one :meth:`Puller.run` did.

    ``at_end``: the log was read to its end. ``failure``: why it stopped early (None:
    it did not fail). ``tasks``: server tasks written. ``conflicts``: tasks a pulled
    version put in conflict (or whose conflict it changed). ``lost_lease``: it stopped
    because another engine holds the file's sync lease now (the page read was dropped).
    """

    at_end: bool = False
    failure: PullFailure | None = None
    tasks: int = 0
    conflicts: list[str] = attrs.field(factory=list)
    lost_lease: bool = False


def prepare(db: Database, config: SyncConfig) -> None:
    """Make the store's sync state the config's (one write, before the first push).

    Another service than the one recorded: the old one's versions are forgotten, so no
    stale ``If-Match`` goes to the new one (the bodies stay, as merge bases), and a
    pulling store bootstraps. Another scope (pulling stores): bootstrap it.
    """
    service = config.service_id()
    scope = config.scope_text()
    with db.write() as conn:
        state = replica.read_state(conn)
        if state.service != service:
            if state.service is not None:
                outbox.forget_all_server_versions(conn)
                replica.forget_versions(conn)
            replica.write_state(
                conn, service=service, cursor=None, bootstrap_next=None, bootstrap_changes=None
            )
        if config.pulls and state.scope != scope:
            replica.write_state(
                conn, scope=scope, cursor=None, bootstrap_next=None, bootstrap_changes=None
            )
        if not config.pulls:
            rows.restore_search_indexes(conn)  # a bootstrap left unfinished will not finish now


class Puller:
    """Bootstrap and change-log reading for one store and one remote."""

    def __init__(
        self,
        db: Database,
        remote: PullRemote,
        config: SyncConfig,
        *,
        held: Callable[[apsw.Connection], bool] = lambda conn: True,
    ) -> None:
        """``held(conn)``: whether this engine still holds the file's sync lease, asked
        in each page's write transaction; a page is applied only while it does."""
        self._db = db
        self._held = held
        self._remote = remote
        self._config = config
        self._scope = config.scope or {}

    def context(self, generation: int) -> rebase.Context:
        """The accepting context for the current bootstrap generation."""
        return rebase.Context(scope=self._config.scope, generation=generation, pulls=True)

    def run(self, stopping: Callable[[], bool], budget: Callable[[], bool]) -> PullResult:
        """Read and apply pages until the log's end, a failure, ``stopping()``, or
        ``budget()`` says to let the push side go first."""
        result = PullResult()
        while not stopping():
            with self._db.read() as conn:
                state = replica.read_state(conn)
            if state.cursor is None:
                failure = self._bootstrap(state, result, stopping, budget)
            else:
                failure = self._log_page(state, result)
            if failure is not None:
                result.failure = failure
                return result
            if result.lost_lease or result.at_end or budget():
                return result
        return result

    # --- bootstrap ------------------------------------------------------------------------

    def _bootstrap(
        self,
        state: replica.PullState,
        result: PullResult,
        stopping: Callable[[], bool],
        budget: Callable[[], bool],
    ) -> PullFailure | None:
        """Apply listing pages from where ``state`` says, while a :class:`_Prefetch`
        thread reads the next page: fetching and applying overlap, and no transaction
        is ever open during a request (the writer only waits on the queue between
        transactions). Returns at the listing's end (None), a failure, a page another
        engine applied first (None: the caller reads the state again), ``stopping()``
        or ``budget()``; the prefetch thread is stopped and joined before it returns."""
        first = state.bootstrap_changes is None
        prefetch = _Prefetch(
            self._remote,
            self._scope,
            None if first else state.bootstrap_next,
            self._config.pull_limit,
        )
        try:
            expected = state
            while True:
                page = prefetch.next(stopping)
                if not isinstance(page, ListedPage):
                    return page  # a failure, or None: stopping
                applied = self._apply_listing_page(expected, page, result)
                if applied is None or isinstance(applied, Transient):
                    return applied
                expected = applied
                if expected.cursor is not None or stopping() or budget():
                    return None
        finally:
            prefetch.close()

    def _apply_listing_page(
        self, state: replica.PullState, page: ListedPage, result: PullResult
    ) -> replica.PullState | Transient | None:
        """Apply one listing page read from where ``state`` says, in ONE transaction with
        the bootstrap's progress; returns the progress as committed (None: another
        engine moved on meanwhile, nothing applied)."""
        first = state.bootstrap_changes is None
        if first and page.changes_cursor is None:
            return Transient(error="the first listing page came without a changes cursor")
        now = timestamps.now()
        with self._db.write() as conn:
            if not self._held(conn):
                result.lost_lease = True
                return None
            again = replica.read_state(conn)
            if (again.cursor, again.bootstrap_changes, again.bootstrap_next) != (
                state.cursor,
                state.bootstrap_changes,
                state.bootstrap_next,
            ):
                return None  # another engine moved on meanwhile: read again
            generation = state.generation + 1 if first else state.generation
            changes_cursor = page.changes_cursor if first else state.bootstrap_changes
            if first:
                replica.clear_unseen(conn)
                replica.write_state(conn, generation=generation)
                if (
                    len(page.tasks) >= rows.BOOTSTRAP_BULK_MIN
                    and replica.dropped_indexes(conn) is None
                    and rows.has_no_tasks(conn)
                ):
                    # A large listing into a fresh store: load without the search
                    # indexes; the last page builds them (in its own transaction).
                    replica.keep_dropped_indexes(conn, rows.drop_search_indexes(conn))
            ctx = self.context(generation)
            accepted_all = rebase.apply_listing(self._db, conn, ctx, page.tasks, now)
            for task, accepted in zip(page.tasks, accepted_all, strict=True):
                if accepted.conflict:
                    result.conflicts.append(str(task["id"]))
            result.tasks += len(page.tasks)
            if page.next_cursor is None:
                self._finish_bootstrap(conn, generation, now)
                rows.restore_search_indexes(conn)
                replica.write_state(
                    conn, cursor=changes_cursor, bootstrap_next=None, bootstrap_changes=None
                )
            else:
                replica.write_state(
                    conn, bootstrap_next=page.next_cursor, bootstrap_changes=changes_cursor
                )
            replica.write_state(conn, pulled=again.pulled + len(page.tasks))
            return replica.read_state(conn)

    def _finish_bootstrap(self, conn: apsw.Connection, generation: int, now: str) -> None:
        """Remove what the listing did not show (and that has nothing to deliver)."""
        gone = replica.unlisted_tasks(conn, generation)
        for task_id in gone:
            rows.delete_server_copy(conn, task_id, now=now)
            replica.drop_base(conn, task_id)
            outbox.forget_server_version(conn, task_id)
        self._db.note_changes(gone, "pulled")
        replica.drop_unlisted_bases(conn, generation)

    # --- the log --------------------------------------------------------------------------

    def _log_page(self, state: replica.PullState, result: PullResult) -> PullFailure | None:
        assert state.cursor is not None
        page = self._remote.changes_page(self._scope, state.cursor, self._config.pull_limit)
        if isinstance(page, CursorExpired):
            with self._db.write() as conn:
                if not self._held(conn):
                    result.lost_lease = True
                elif replica.read_state(conn).cursor == state.cursor:
                    replica.write_state(
                        conn, cursor=None, bootstrap_next=None, bootstrap_changes=None
                    )
            return None
        if not isinstance(page, ChangesPage):
            return page
        now = timestamps.now()
        written = 0
        with self._db.write() as conn:
            if not self._held(conn):
                result.lost_lease = True
                return None
            again = replica.read_state(conn)
            if again.cursor != state.cursor:
                return None  # another engine applied this page: read again
            ctx = self.context(again.generation)
            applied = rebase.apply_page(self._db, conn, ctx, page.items, now)
            for task_id, accepted in applied.items():
                if accepted.conflict:
                    result.conflicts.append(task_id)
                if accepted.changed:
                    written += 1
            stalled = page.has_more and not page.items and page.next_cursor == state.cursor
            at_end = not page.has_more or stalled
            replica.write_state(conn, cursor=page.next_cursor, pulled=again.pulled + written)
            if at_end:
                replica.write_state(conn, last_pull_at=now)
        result.tasks += written
        result.at_end = at_end
        return None


class _Prefetch:
    """Reads listing pages ahead, one at a time, on its own thread.

    The thread asks for the page at ``cursor``, hands it over (a queue of one: at most
    one page waits, so memory stays bounded), and goes on with that page's next cursor
    while the writer applies it. It ends after the last page, after a failure (which
    is handed over like a page: the writer applies every page before it first), or
    when :meth:`close` is called. An exception raised by the remote is handed over
    too and raised again on the writer's thread, as if the request had been made
    there. Only this thread calls the remote while it runs.
    """

    def __init__(self, remote: PullRemote, scope: Scope, cursor: str | None, limit: int) -> None:
        self._remote = remote
        self._scope = scope
        self._limit = limit
        self._queue: queue.Queue[ListOutcome | BaseException] = queue.Queue(maxsize=1)
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(cursor,), name="clinik-local-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, cursor: str | None) -> None:
        while not self._closing.is_set():
            try:
                page: ListOutcome | BaseException = self._remote.list_page(
                    self._scope, cursor, self._limit
                )
            except BaseException as exc:  # handed to the writer, raised there
                page = exc
            if not self._hand_over(page):
                return
            if not isinstance(page, ListedPage) or page.next_cursor is None:
                return
            cursor = page.next_cursor

    def _hand_over(self, page: ListOutcome | BaseException) -> bool:
        while not self._closing.is_set():
            try:
                self._queue.put(page, timeout=_POLL)
            except queue.Full:
                continue
            return True
        return False

    def next(self, stopping: Callable[[], bool]) -> ListOutcome | None:
        """The next page (or why there is none), waiting for it if need be; None once
        ``stopping()`` says so."""
        while True:
            try:
                page = self._queue.get(timeout=_POLL)
            except queue.Empty:
                if stopping():
                    return None
                if self._thread.is_alive() or not self._queue.empty():
                    continue
                return Transient(error="the listing prefetch ended without a page")
            if isinstance(page, BaseException):
                raise page
            return page

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (a request under way finishes,
        bounded by the remote's timeout; its page is dropped)."""
        self._closing.set()
        self._thread.join()


def monotonic_budget(seconds: float, waiting: Callable[[], bool]) -> Callable[[], bool]:
    """A budget: True once ``seconds`` passed and ``waiting()`` (changes to push)."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() >= deadline and waiting()
