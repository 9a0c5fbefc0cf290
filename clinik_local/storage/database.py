"""``Database``: one store file (or memory) as one writer, query-only readers and a checkpointer.

Datasette's shape: writes go through the one writer connection in ``BEGIN IMMEDIATE``
transactions, serialised by a lock (:meth:`Database.write`); side effects queued with
:meth:`Database.after_commit` run only after the commit succeeded, outside the lock.
Reads on a file store use one ``query_only`` connection per thread (:meth:`Database.read`),
so in WAL mode they never wait for a writer, in this process or another. An in-memory
store has one connection: reads share it under the lock.

Every connection is made by :func:`~clinik_local.storage.connection.open_connection`,
including the checkpointer's, so a set-up step added there reaches all of them.
Nothing above this layer sees ``apsw`` errors: they come out as StorageError subclasses.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import apsw
import attrs

from ..errors import (
    CorruptStoreError,
    ReadOnlyStoreError,
    StorageError,
    StoreLockedError,
    ValidationError,
)
from ..events import ChangeFeed, ChangeOrigin
from .connection import (
    MEMORY,
    ConnectionOptions,
    fetch_all,
    open_connection,
    stamp_memory_store,
    storage_error,
    translated,
)
from .encryption import KeyProvider, fsync_directory, rekey_connection

__all__ = ["Database", "WriteAbandonedError", "writes_only_if"]

_log = logging.getLogger("clinik_local.storage")

#: The "still wanted?" check of the current context (see :func:`writes_only_if`).
_still_wanted: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "clinik_local_still_wanted", default=None
)


class WriteAbandonedError(StorageError):
    """A write was not started because its caller no longer wanted it; nothing written."""


@contextlib.contextmanager
def writes_only_if(still_wanted: Callable[[], bool]) -> Iterator[None]:
    """Within the block (in this context), every :meth:`Database.write` asks first.

    ``still_wanted()`` is called once the writer's lock and SQLite's write lock are
    held, just before the block's statements run; ``False`` rolls back and raises
    :class:`WriteAbandonedError`, so nothing is written. ``True`` means the write has
    started: it runs to its commit (or error) whatever happens to the caller.
    ``AsyncTaskStore`` uses this so that a cancelled call that never started never writes.
    """
    token = _still_wanted.set(still_wanted)
    try:
        yield
    finally:
        _still_wanted.reset(token)


def _rekey_copy_path(path: str) -> str:
    return path + ".rekey-tmp"


def _remove_rekey_copy(path: str) -> None:
    for suffix in ("", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(_rekey_copy_path(path) + suffix)


def rekey_file(
    writer: apsw.Connection, path: str, old: ConnectionOptions, new: ConnectionOptions
) -> apsw.Connection:
    """Re-encrypt the store at ``path`` by copy, rekey, verify and rename; the new writer.

    ``writer`` is the store's writer connection (keyed with ``old``); on success it is
    closed and a new writer keyed with ``new`` is returned. On failure before the
    rename, ``writer`` is left working on the unchanged file (back in WAL mode).
    """
    copy = _rekey_copy_path(path)
    with translated(path):
        try:
            writer.pragma("journal_mode", "delete")  # refused while anyone else has it open
        except (apsw.BusyError, apsw.LockedError):
            raise StoreLockedError(
                f"rekey needs the store to itself, but another connection (another process?) "
                f"has {path} open; close it and retry. Nothing changed."
            ) from None
    renamed = False
    old_inode = -1
    try:
        with translated(path):
            writer.execute("BEGIN EXCLUSIVE")  # nobody opens the file until we are done
            writer.execute("SELECT count(*) FROM sqlite_schema").fetchall()
        # One descriptor, kept open to the end: closing any descriptor of the file would
        # drop this process's POSIX locks on it (SQLite's exclusive lock included).
        old_inode = os.open(path, os.O_RDWR)
        _remove_rekey_copy(path)
        _copy_file(old_inode, copy, os.fstat(old_inode).st_mode & 0o777)
        target = open_connection(copy, "backup", old)
        try:
            with translated(copy):
                target.pragma("synchronous", "FULL")
                rekey_connection(target, new.key)
        finally:
            target.close()
        check = open_connection(copy, "backup", new)  # proves the new key on the copy
        try:
            with translated(copy):
                problems = [str(row[0]) for row in check.execute("PRAGMA quick_check")]
        finally:
            check.close()
        if problems != ["ok"]:
            raise CorruptStoreError(f"the re-encrypted copy failed its check: {problems[:3]}")
        os.replace(copy, path)
        renamed = True
        fsync_directory(path)
        # A process that opened the store meanwhile (now waiting for our lock) holds the
        # old inode: wipe its header, so such a process fails loudly instead of writing
        # to a file nobody will read again.
        with contextlib.suppress(OSError):
            os.pwrite(old_inode, bytes(24), 0)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"rekey of {path} failed: {exc.strerror or exc}") from exc
    finally:
        if not renamed:
            _remove_rekey_copy(path)
            with contextlib.suppress(apsw.Error):
                if not writer.get_autocommit():
                    writer.execute("ROLLBACK")
                writer.pragma("journal_mode", "wal")
        if old_inode >= 0:
            os.close(old_inode)
    with contextlib.suppress(apsw.Error):
        writer.close()
    return open_connection(path, "writer", new)


def _copy_file(source_fd: int, target: str, mode: int) -> None:
    """Copy the whole file behind ``source_fd`` into a new file ``target``, synced."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, mode | 0o600)
        offset = 0
        while chunk := os.pread(source_fd, 1 << 20, offset):
            out.write(chunk)
            offset += len(chunk)
        out.flush()
        os.fsync(fd)


def _create_private_file(path: Path) -> None:
    """Create the store file with mode 0600 (patient data) unless it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class _Checkpointer:
    """Runs WAL checkpoints on a background thread, off the commit path.

    SQLite's automatic checkpoint runs inside whichever commit crosses the threshold,
    and (with synchronous=NORMAL) syncs the file: that one commit then takes
    milliseconds instead of microseconds. A WAL hook on the writer connection
    (which replaces the automatic checkpoint) wakes this thread instead; its PASSIVE
    checkpoint blocks neither writers nor readers. Should the WAL still grow far past
    the threshold (a reader pinning old pages), the writer checkpoints itself, so the
    file stays bounded. A failed checkpoint (disk full, say) is logged as a warning and
    retried at the next wake-up (committed data is safe in the WAL meanwhile); one that
    finds another connection checkpointing (busy) is expected and only logged at debug.
    """

    THRESHOLD_PAGES = 1000
    WRITER_FALLBACK_PAGES = 20 * THRESHOLD_PAGES

    def __init__(self, path: str, options: ConnectionOptions) -> None:
        self._path = path
        self._options = options
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def wal_hook(self, conn: apsw.Connection, name: str, pages: int) -> int:
        if pages >= self.WRITER_FALLBACK_PAGES:
            try:
                conn.wal_checkpoint(name, apsw.SQLITE_CHECKPOINT_PASSIVE)
            except (apsw.BusyError, apsw.LockedError):
                pass  # another connection is checkpointing: the WAL gets bounded anyway
            except apsw.Error as exc:
                _log.warning("writer's fallback WAL checkpoint failed: %s", storage_error(exc))
        elif pages >= self.THRESHOLD_PAGES:
            self._ensure_thread()
            self._wake.set()
        return int(apsw.SQLITE_OK)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stopping:
                    self._thread = threading.Thread(
                        target=self._run, name="clinik-local-checkpoint", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        try:
            conn = open_connection(self._path, "checkpointer", self._options)
        except StorageError as exc:
            _log.warning("cannot open the checkpoint connection: %s", exc)
            return
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    conn.wal_checkpoint(None, apsw.SQLITE_CHECKPOINT_PASSIVE)
                except (apsw.BusyError, apsw.LockedError) as exc:
                    # Expected: another process's checkpoint (or writer) holds the lock.
                    _log.debug("WAL checkpoint skipped, busy: %s", exc)
                except apsw.Error as exc:
                    _log.warning("WAL checkpoint failed (retried later): %s", storage_error(exc))
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_USING_FTS5 = re.compile(r"\bUSING\s+fts5\s*\(", re.IGNORECASE)


def _fts5_tables(conn: apsw.Connection) -> list[str]:
    """The FTS5 tables of the store (not its fts5vocab tables), from ``sqlite_schema``."""
    return [
        str(name)
        for name, sql in fetch_all(
            conn, "SELECT name, sql FROM sqlite_schema WHERE type = 'table' ORDER BY name"
        )
        if _USING_FTS5.search(str(sql or ""))
    ]


# --- in-memory stores: a prepared image, and a pool of parsed connections -------------
#
# A new in-memory store starts from a serialised empty store (the image), not from
# schema.sql. Even so, the first statement on a fresh copy makes SQLite parse the whole
# schema: most of what a store per test costs. So in-memory connections come from a
# per-process pool of parsed copies, and each store runs inside one transaction opened
# when it got its connection: its own writes are savepoints in it, and closing the store
# rolls it back, which puts every page back exactly as the image has it (rows, FTS
# index, AUTOINCREMENT counters, meta) whatever the schema holds. Nothing here names a
# table. Measured: a few microseconds, against tens for deleting the rows.


#: A pooled store's writes: savepoints inside the store's transaction. A COMMIT makes
#: FTS5 write its pending terms to its tables; a RELEASE does not, but opening a
#: savepoint does: so the shadow tables after each write are what a COMMIT leaves
#: (``store.table_counts()`` counts them). The flushing savepoint is opened inside the
#: write's and released with it: two statements, not three.
_SAVEPOINT = "SAVEPOINT clinik_write"
_RELEASE = "SAVEPOINT clinik_flush; RELEASE clinik_write"
_ROLLBACK_TO = "ROLLBACK TO clinik_write; RELEASE clinik_write"
#: What a connection must still show after the rollback to be pooled again: no TEMP
#: object, and foreign keys enforced as on a fresh copy (a connection setting, read
#: without compiling a statement). Pages, the schema, ``defer_foreign_keys`` and
#: everything else transactional the rollback restores. What it does not restore is
#: seen as it happens: a commit (after which pages and schema are no longer the
#: image's, whatever a rollback does) by the connection's :class:`_CommitWatch`, and a
#: connection setting changed by SQL (``PRAGMA ignore_check_constraints = ON``, or any
#: other PRAGMA given a value) by its :class:`_PragmaWatch`.
#: ``TaskStore.read`` never hands out a pooled connection (see Database.lend).
_STATE_SQL = "SELECT count(*) FROM temp.sqlite_schema"
_ROLLBACK_AND_STATE_SQL = "ROLLBACK; " + _STATE_SQL


def _pool_state(conn: apsw.Connection, cursor: apsw.Cursor, sql: str) -> tuple[object, ...]:
    """``sql``'s rows (:data:`_STATE_SQL`, after a ROLLBACK if it starts with one) and
    whether foreign keys are enforced: what :meth:`_MemoryPool.release` compares."""
    rows = cursor.execute(sql).fetchall()
    return (*rows, conn.config(apsw.SQLITE_DBCONFIG_ENABLE_FKEY, -1))


class _CommitWatch:
    """A pooled connection's commit hook: notes that the connection committed (a store's
    transaction ended behind the pool's back: its pages are no longer the image's) and
    lets the commit go ahead. Never called while the connection serves stores as the
    pool means it to: their writes are savepoints inside one transaction."""

    __slots__ = ("committed",)

    def __init__(self) -> None:
        self.committed = False

    def __call__(self) -> bool:
        self.committed = True
        return False  # go ahead: lend() commits on purpose (and the pool then closes it)


class _PragmaWatch:
    """A pooled connection's authorizer: notes a PRAGMA given a value or an argument
    (``PRAGMA query_only = 1``, ``PRAGMA cache_size(7)``), which may change a setting
    of the connection that no rollback undoes, and allows everything.

    SQLite asks an authorizer when it compiles a statement, never when it runs one
    compiled before; a PRAGMA is compiled at every run. So a store's own statements,
    compiled once per connection and reused, cost nothing here, and the pool need not
    read each setting back at every close (each PRAGMA read costs a compile). Reading
    pragmas (``PRAGMA user_version``, ``PRAGMA optimize``) change nothing and pass.
    """

    __slots__ = ("changed",)

    def __init__(self) -> None:
        self.changed = False

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, via: str | None
    ) -> int:
        if action == apsw.SQLITE_PRAGMA and arg2 is not None:
            self.changed = True
        return apsw.SQLITE_OK


class _Pooled:
    """A connection that serves pooled stores, with what the pool keeps beside it: its
    :class:`_CommitWatch` and :class:`_PragmaWatch`, and the cursor its stores' own
    transaction statements run on (``BEGIN``, each write's savepoint, the rollback and
    the state read at close): one cursor reused, not one made and freed per statement,
    about 0.7 µs each. Used only under the store's lock or the pool's, so never by two
    threads at once."""

    __slots__ = ("conn", "cursor", "pid", "pragmas", "watch")

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn
        #: The process it belongs to: a forked child never touches it.
        self.pid = os.getpid()
        self.cursor = conn.cursor()
        self.watch = _CommitWatch()
        conn.set_commit_hook(self.watch)
        self.pragmas = _PragmaWatch()
        conn.authorizer = self.pragmas


#: A deferred foreign key is checked at COMMIT, never at a savepoint's RELEASE: a store
#: whose schema has one could commit in the pool what a new store refuses.
_DEFERRED_FK = re.compile(r"\bDEFERRABLE\s+INITIALLY\s+DEFERRED\b", re.IGNORECASE)


class _MemoryTemplate:
    """An empty store, prepared once per process, and what a reusable copy must show.

    ``image``: the serialised empty store every in-memory connection deserialises.
    ``state``: :data:`_STATE_SQL`'s answer on a fresh copy. ``poolable``: whether the
    schema allows the transaction-per-store pool (no deferred foreign keys); if not,
    every in-memory store gets a fresh copy. ``first``: the fresh copy probed here,
    pooled for the first store.
    """

    def __init__(self, options: ConnectionOptions) -> None:
        conn = open_connection(MEMORY, "writer", options)
        try:
            self.image = bytes(conn.serialize("main"))
        finally:
            conn.close()
        self.first = open_connection(MEMORY, "writer", options, image=self.image)
        with translated(MEMORY):
            self.state = _pool_state(self.first, self.first.cursor(), _STATE_SQL)
            ddl = fetch_all(self.first, "SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL")
        self.poolable = not any(_DEFERRED_FK.search(str(sql)) for (sql,) in ddl)


class _MemoryPool:
    """This process's parsed in-memory connections (thread-safe).

    One per process, so one per pytest-xdist worker; a forked child (seen by its pid)
    starts with none and never touches its parent's. Keyed by the store's options, so a
    pooled connection has had exactly the set-up a new one with those options has. At
    most :attr:`MAX_IDLE` wait per options; a connection that cannot be shown to be
    back at the image (see :meth:`release`) is closed instead.
    """

    MAX_IDLE = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._template: _MemoryTemplate | None = None
        self._idle: dict[ConnectionOptions, list[_Pooled]] = {}

    def _check_fork(self) -> None:
        """(Under the lock.) In a forked child, forget the parent's connections: never
        use nor close them (their SQLite state may be mid-call in a parent thread)."""
        if self._pid != os.getpid():
            _abandoned.append((self._template, self._idle))
            self._template = None
            self._idle = {}
            self._pid = os.getpid()

    def template(self, options: ConnectionOptions) -> _MemoryTemplate:
        """The template, built on first use (by whichever options come first)."""
        with self._lock:
            return self._template_locked(options)

    def _template_locked(self, options: ConnectionOptions) -> _MemoryTemplate:
        """(Under the lock.) :meth:`template`."""
        self._check_fork()
        template = self._template
        if template is None:
            template = self._template = _MemoryTemplate(options)
            if template.poolable:
                self._idle.setdefault(options, []).append(_Pooled(template.first))
            else:
                template.first.close()
        return template

    def acquire(self, options: ConnectionOptions) -> tuple[apsw.Connection, _Pooled | None]:
        """A connection holding exactly what a new in-memory store holds, and its pool
        entry if it is pooled (then inside the store's transaction, see :meth:`release`)."""
        pooled: _Pooled | None = None
        with self._lock:  # once: the template and an idle connection
            template = self._template_locked(options)
            if template.poolable:
                idle = self._idle.get(options)
                if idle:
                    pooled = idle.pop()  # last in, first out: the one most likely cached
        if pooled is not None:
            conn = pooled.conn
        else:
            conn = open_connection(MEMORY, "writer", options, image=template.image)
            if template.poolable:
                pooled = _Pooled(conn)
        try:
            stamp_memory_store(conn if pooled is None else pooled.cursor, begin=pooled is not None)
        except apsw.Error as exc:
            conn.close()
            raise storage_error(exc, MEMORY) from exc
        except BaseException:
            conn.close()
            raise
        return conn, pooled

    def release(self, options: ConnectionOptions, pooled: _Pooled) -> None:
        """Take back a closed store's connection: roll its transaction back and pool it,
        or close it if it is not provably what a new store's is. A forked child closing
        a store its parent opened leaves the connection be: its SQLite state may be
        mid-call in a parent thread, and the parent still owns it."""
        if pooled.pid != os.getpid():
            _abandoned.append(pooled)
            return
        template = self._template
        conn = pooled.conn
        try:
            reusable = (
                template is not None
                and not pooled.watch.committed  # the store's transaction never ended
                and not conn.get_autocommit()  # and still runs
                and not pooled.pragmas.changed  # nor did SQL change a setting
                and conn.exec_trace is None
                and conn.row_trace is None
                and conn.authorizer is pooled.pragmas
            )
            if reusable:
                assert template is not None
                state = _pool_state(conn, pooled.cursor, _ROLLBACK_AND_STATE_SQL)
                conn.set_last_insert_rowid(0)
                reusable = state == template.state
        except apsw.Error as exc:
            _log.debug("in-memory connection not reusable, closed: %s", exc)
            reusable = False
        if reusable:
            with self._lock:
                idle = self._idle.setdefault(options, [])
                if len(idle) < self.MAX_IDLE:  # (this process's: checked above)
                    idle.append(pooled)
                    return
        with contextlib.suppress(apsw.Error):
            conn.close()

    def idle_count(self) -> int:
        """How many connections wait in the pool (tests read it)."""
        with self._lock:
            return sum(len(idle) for idle in self._idle.values())


#: What forked children inherited and must neither use nor close (kept, so that no
#: destructor closes it either): the parent's template and idle connections, and the
#: connections of stores the parent opened and the child closed.
_abandoned: list[object] = []
_POOL = _MemoryPool()


def _memory_template(options: ConnectionOptions) -> bytes:
    """The serialised empty store new in-memory connections start from."""
    return _POOL.template(options).image


class _ReaderBox:
    """One thread's read connection; closed by the database (or when the thread ends).

    ``lock`` is held by the owning thread while it reads (re-entrant: reads nest), and by
    :meth:`Database.rekey` while it re-encrypts the file: a rekey closes idle readers and
    waits for busy ones; a closed reader is opened again, with the new key, on next use.
    """

    __slots__ = ("__weakref__", "conn", "depth", "lock", "thread_name")

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn: apsw.Connection | None = conn
        self.lock = threading.RLock()
        self.depth = 0
        self.thread_name = threading.current_thread().name

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(apsw.Error):
                self.conn.close()
            self.conn = None

    def __del__(self) -> None:
        self.close()


class Database:
    """The connections of one store, and the transaction discipline over them.

    Thread-safe: one ``Database`` may be shared by many threads.
    """

    def __init__(self, path: str, options: ConnectionOptions) -> None:
        """Open (creating if new, mode 0600) the store at ``path``, or ``":memory:"``."""
        self.path = path
        self.options = options
        self.is_memory = path == MEMORY
        if not self.is_memory:
            file = Path(path)
            if file.is_dir():
                raise StorageError(f"{path} is a directory, not a store file")
            with translated(path):
                try:
                    _create_private_file(file)
                except PermissionError as exc:
                    raise ReadOnlyStoreError(
                        f"cannot create the store file {path}: {exc.strerror}"
                    ) from exc
                except OSError as exc:
                    raise StorageError(f"cannot create the store file {path}: {exc}") from exc
            self._conn = open_connection(path, "writer", options)
            _remove_rekey_copy(path)  # left by a rekey that was killed (we are open: none runs)
            self._checkpointer: _Checkpointer | None = _Checkpointer(path, options)
            self._conn.set_wal_hook(self._checkpointer.wal_hook)
            self._local = threading.local()
            self._readers: weakref.WeakSet[_ReaderBox] | None = weakref.WeakSet()
            #: The pool entry of a connection that runs in a pool transaction (see
            #: :class:`_MemoryPool`); None for file stores, unpoolable schemas, and a
            #: memory store whose transaction lend() committed.
            self._lease: _Pooled | None = None
        else:
            self._conn, self._lease = _POOL.acquire(options)
            self._checkpointer = None
            self._readers = None  # one connection, shared under the lock
        self._lock = threading.RLock()
        self._closed = False
        #: How deep this store is in :meth:`write` (its own thread only: under the lock).
        self._writing = 0
        #: Whether :meth:`lend` handed the connection out (a memory one is then closed).
        self._lent = False
        self._after_commit: list[Callable[[], None]] = []
        self._changes: list[tuple[str, ChangeOrigin]] = []
        self._feed: ChangeFeed | None = None

    @property
    def feed(self) -> ChangeFeed:
        """Change notifications: :meth:`note_change` inside a write, published after it.

        Made on first use: most stores (a test's) are never watched.
        """
        feed = self._feed
        if feed is None:
            with self._lock:
                feed = self._feed
                if feed is None:
                    feed = self._feed = ChangeFeed()
                    if self._closed:
                        feed.close()
        return feed

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def close(self) -> None:
        """Stop the checkpointer and close every connection. Safe to call twice.

        A pooled in-memory store's connection goes back to the process's pool, its
        transaction rolled back (unless the store is closed from inside its own write
        block: then it is closed, as is any in-memory connection not pooled).
        """
        if self._closed:
            return
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._feed is not None:
            self._feed.close()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.is_memory:
                if self._lease is not None and not self._writing and not self._lent:
                    _POOL.release(self.options, self._lease)
                else:
                    with contextlib.suppress(apsw.Error):
                        self._conn.close()
                return
            for box in list(self._readers or ()):
                box.close()
            self._local = threading.local()
            with contextlib.suppress(apsw.Error):
                self._conn.pragma("optimize")
            self._conn.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the store is closed")

    def write(self) -> contextlib.AbstractContextManager[apsw.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction on the writer connection; commits on success.

        Anything raised inside rolls the whole transaction back. apsw errors come out
        as StorageError subclasses. Callbacks queued with :meth:`after_commit` inside
        the block run after a successful commit, outside the lock. No network I/O in here.
        Inside :func:`writes_only_if`, the caller is asked (after the locks are taken,
        before the block runs) whether it still wants the write.

        A pooled store's write is a savepoint in its transaction (rolled back when it
        closes); a write inside a write is refused by ``BEGIN``, as in any store.
        """
        return _Write(self)

    def note_change(self, task_id: str, origin: ChangeOrigin) -> None:
        """The current write changes ``task_id``: watchers hear of it after the commit."""
        if self._feed is not None and self._feed.watched:
            self._changes.append((task_id, origin))

    def note_changes(self, task_ids: Iterable[str], origin: ChangeOrigin) -> None:
        """:meth:`note_change` for many tasks."""
        if self._feed is not None and self._feed.watched:
            self._changes.extend((task_id, origin) for task_id in task_ids)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the current write transaction has committed."""
        self._after_commit.append(callback)

    def read(self) -> contextlib.AbstractContextManager[apsw.Connection]:
        """A connection for reading. File stores: this thread's own ``query_only`` reader,
        never blocked by writers (WAL). Memory stores: the one connection, under the lock.
        """
        return _MemoryRead(self) if self.is_memory else self._file_read()

    @contextlib.contextmanager
    def _file_read(self) -> Iterator[apsw.Connection]:
        self._check_open()
        box: _ReaderBox | None = getattr(self._local, "box", None)
        if box is None:
            box = self._new_reader()
        with box.lock:
            if box.conn is None:  # closed by a rekey: open it again, with the new key
                self._check_open()
                box.conn = open_connection(self.path, "reader", self.options)
            box.depth += 1
            try:
                yield box.conn
            except apsw.Error as exc:
                raise storage_error(exc, self.path) from exc
            finally:
                box.depth -= 1

    @contextlib.contextmanager
    def lend(self) -> Iterator[apsw.Connection]:
        """:meth:`read`, for code outside the library (``TaskStore.read``).

        Such code may do anything with the connection (``BEGIN``, a pragma, a function,
        a temp table). A pooled in-memory store's transaction is committed first, so the
        connection behaves exactly as an unpooled store's; it is then closed with the
        store, never pooled again.
        """
        if self._lease is not None:
            with self._lock:
                self._check_open()
                self._lent = True
                self._conn.authorizer = None  # the pool's watch: not for code outside
                if not self._writing:
                    with translated(self.path):
                        self._conn.execute("COMMIT")
                    self._lease = None
        with self.read() as conn:
            yield conn

    def _new_reader(self) -> _ReaderBox:
        box = _ReaderBox(open_connection(self.path, "reader", self.options))
        self._local.box = box  # closed with the thread's locals, or by close()
        assert self._readers is not None  # (file stores only)
        with self._lock:
            self._readers.add(box)
        return box

    @property
    def encrypted(self) -> bool:
        """Whether the store's connections are keyed (encrypted at rest)."""
        return self.options.encrypted

    def rekey(self, key: KeyProvider | None) -> None:
        """Re-encrypt the store for ``key``'s provider (``None``: decrypt it), exclusively.

        Exclusive in this process: under the writer's lock, every other thread's reader
        is closed once idle (a reader still busy after ``busy_timeout`` makes the rekey
        refuse with :class:`StoreLockedError`, naming that thread); those threads read
        again, with the new key, afterwards. Exclusive across processes: the file leaves
        WAL mode, which SQLite refuses while any other connection has it open (again
        :class:`StoreLockedError`, nothing changed), and stays locked until done.

        Crash-safe by copy and rename: the pages are copied (SQLite backup) into a
        private file beside the store, that copy is re-encrypted and verified, and only
        then renamed over the store. A SIGKILL at any point leaves the store openable
        with the old key (before the rename) or the new one (after); needs free disk
        space for one more copy.
        """
        if self.is_memory:
            raise ValidationError.single(
                "key", "an in-memory store is never on disk, so it cannot be encrypted"
            )
        new_options = attrs.evolve(self.options, key=key)
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._lock:
            try:
                self._check_open()
                if not self._conn.get_autocommit():
                    raise StorageError("rekey cannot run inside a write transaction")
                held = self._take_readers()
                try:
                    self._conn = rekey_file(self._conn, self.path, self.options, new_options)
                    self.options = new_options
                finally:
                    for box in held:
                        box.lock.release()
            finally:
                self._checkpointer = _Checkpointer(self.path, self.options)
                try:
                    self._conn.set_wal_hook(self._checkpointer.wal_hook)
                except apsw.Error:  # the new writer could not be opened after the rename
                    self._closed = True

    def _take_readers(self) -> list[_ReaderBox]:
        """Lock and close every reader (waiting for busy ones up to the busy timeout)."""
        held: list[_ReaderBox] = []
        busy: list[str] = []
        for box in list(self._readers or ()):
            if box.lock.acquire(timeout=self.options.busy_timeout):
                if box.depth:  # this very thread is inside a read() block
                    box.lock.release()
                    busy.append(box.thread_name)
                    continue
                held.append(box)
                box.close()
            else:
                busy.append(box.thread_name)
        if busy:
            for box in held:
                box.lock.release()
            names = ", ".join(repr(name) for name in sorted(busy))
            raise StoreLockedError(
                f"rekey needs the store to itself, but a read is still running in thread(s) "
                f"{names} after the busy timeout; retry when they are done. Nothing changed."
            )
        return held

    def optimize(self) -> None:
        """Refresh the query planner's statistics (``PRAGMA optimize``) on the writer."""
        with self._lock:
            self._check_open()
            with translated(self.path):
                self._conn.pragma("optimize")

    def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check`` problems; an empty list means the file is sound.

        Runs on this thread's reader, in one read transaction that first opens a cursor
        on every FTS5 table. FTS5 keeps a copy of its index's structure per connection
        and refreshes it only when a statement opens a cursor on the table; its integrity
        check opens none and checks the index against the copy as it is. A reader whose
        copy predates later commits (by the writer or another process) would report
        segments merged away since as ``fts5: corruption found reading blob ...`` on a
        sound file. (Searches open cursors, so they always see the current index.)
        """
        with self.read() as conn:
            own = conn.get_autocommit()
            if own:
                conn.execute("BEGIN")  # the refresh and the check see one snapshot
            try:
                for table in _fts5_tables(conn):
                    # A damaged index fails here too: the check below says how.
                    with contextlib.suppress(apsw.CorruptError):
                        fetch_all(conn, f"SELECT rowid FROM {_quote(table)} WHERE rowid = 0")
                rows = conn.execute("PRAGMA integrity_check").fetchall()
            finally:
                if own and not conn.get_autocommit():
                    conn.execute("COMMIT")
        problems = [str(r[0]) for r in rows]
        return [] if problems == ["ok"] else problems

    def schema_version(self) -> int:
        """The schema version stamped in the file (``PRAGMA user_version``)."""
        with self.read() as conn:
            return int(conn.pragma("user_version"))

    def table_counts(self) -> dict[str, int]:
        """Row count of every table."""
        with self.read() as conn:
            names = [
                str(r[0])
                for r in fetch_all(
                    conn,
                    "SELECT name FROM sqlite_schema WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%' ORDER BY name",
                )
            ]
            counts: dict[str, int] = {}
            for name in names:
                # Names come from sqlite_schema, not from input.
                quoted = '"' + name.replace('"', '""') + '"'
                counts[name] = int(fetch_all(conn, f"SELECT count(*) FROM {quoted}")[0][0])
        return counts


class _Write:
    """``Database.write()``: its lock, transaction (or savepoint), commit and rollback.

    A plain class rather than a ``contextlib.contextmanager`` (which, with the two
    ``translated`` blocks it needed inside, was three generators per write): a fixture
    store's every create goes through here, and with the CPU caches cold, as between two
    pytest tests, that machinery cost more than the empty write's own SQL.
    """

    __slots__ = ("_conn", "_db", "_savepoint")

    def __init__(self, db: Database) -> None:
        self._db = db

    def __enter__(self) -> apsw.Connection:
        db = self._db
        still_wanted = _still_wanted.get()
        db._lock.acquire()
        try:
            db._check_open()
            conn = self._conn = db._conn
            # A pooled store's write: a savepoint, on the connection's own cursor.
            lease = None if db._writing else db._lease
            savepoint = self._savepoint = None if lease is None else lease.cursor
            try:
                if savepoint is not None:
                    savepoint.execute(_SAVEPOINT)
                else:
                    conn.execute("BEGIN IMMEDIATE")
            except apsw.Error as exc:
                raise storage_error(exc, db.path) from exc
        except BaseException:
            db._lock.release()
            raise
        db._writing += 1
        if still_wanted is not None:
            # Asked only now that both locks are held: a caller that gave up while
            # waiting for them (this process's writer or another process's) never writes.
            try:
                if not still_wanted():
                    raise WriteAbandonedError("the caller gave up before the write started")
            except BaseException:
                self._undo()
                raise
        return conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        db = self._db
        if exc is None:
            try:
                if self._savepoint is not None:
                    self._savepoint.execute(_RELEASE)
                else:
                    self._conn.execute("COMMIT")
            except BaseException as failure:
                self._undo()
                if isinstance(failure, apsw.Error):
                    raise storage_error(failure, db.path) from failure
                raise
            db._writing -= 1
            callbacks, db._after_commit = db._after_commit, []
            changes, db._changes = db._changes, []
            db._lock.release()
            if changes:
                db.feed.publish(changes)
            for callback in callbacks:
                callback()
            return
        self._undo()
        if isinstance(exc, apsw.Error):  # no apsw error escapes the block either
            raise storage_error(exc, db.path) from exc

    def _undo(self) -> None:
        """Roll the write back, forget its callbacks and changes, and release the lock.

        (A store closed inside the block closed its connection: nothing to undo.)
        """
        db = self._db
        conn = self._conn
        try:
            with contextlib.suppress(apsw.Error):
                if self._savepoint is not None:
                    self._savepoint.execute(_ROLLBACK_TO)
                elif not conn.get_autocommit():
                    conn.execute("ROLLBACK")
            db._after_commit.clear()
            db._changes.clear()
        finally:
            db._writing -= 1
            db._lock.release()


class _MemoryRead:
    """``Database.read()`` of a memory store: the one connection, under the lock.

    What a ``contextlib.contextmanager`` would do, as a plain class: a fixture store's
    every search and get goes through here, and the generator machinery cost about
    half of an empty read with the CPU caches cold (as between two pytest tests).
    """

    __slots__ = ("_db",)

    def __init__(self, db: Database) -> None:
        self._db = db

    def __enter__(self) -> apsw.Connection:
        db = self._db
        db._lock.acquire()
        try:
            db._check_open()  # under the lock: a closed store's connection is pooled
        except BaseException:
            db._lock.release()
            raise
        return db._conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        db = self._db
        db._lock.release()
        if isinstance(exc, apsw.Error):
            raise storage_error(exc, db.path) from exc
