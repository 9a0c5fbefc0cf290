"""TaskStore: the local SQLite file (or memory) behind ``store.tasks``.

Connection set-up follows apsw's best practice, as small named steps in a fixed order:
busy timeout -> identity check (application_id and user_version: an empty file, or a
clinik-local store at a version we know; anything else is refused *before* any pragma
writes, so a foreign or newer file is left byte-for-byte as it was) -> WAL ->
synchronous -> foreign keys -> no double-quoted string literals.

One ``TaskStore`` may be shared by many threads. Writes go through one connection in
``BEGIN IMMEDIATE`` transactions, serialised by a lock; reads on a file store use one
connection per thread, so in WAL mode they never wait for a writer (in this process or
another). Several processes may open the same file; a writer waiting for another
waits up to ``busy_timeout`` and only then raises :class:`StoreLockedError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import apsw

from . import timestamps
from .errors import (
    CorruptStoreError,
    ForeignFileError,
    NewerSchemaError,
    ReadOnlyStoreError,
    StorageError,
    StoreFullError,
    StoreLockedError,
    ValidationError,
)
from .storage.migrations import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, schema_sql

if TYPE_CHECKING:
    from .sync import SyncConfig, SyncEngine
    from .tasks import TasksResource

__all__ = ["MEMORY", "Durability", "TaskStore"]

MEMORY = ":memory:"
Durability = Literal["normal", "full"]
_DEFAULT_BUSY_TIMEOUT_MS = 5000


def storage_error(exc: BaseException, path: str = "") -> StorageError:
    """Translate an apsw exception into the library's StorageError subclass for it."""
    where = f" ({path})" if path and path != MEMORY else ""
    message = f"{exc}{where}"
    if isinstance(exc, (apsw.BusyError, apsw.LockedError)):
        return StoreLockedError(
            f"the store is locked by another connection beyond the busy timeout{where}: {exc}"
        )
    if isinstance(exc, apsw.FullError):
        return StoreFullError(f"the store is full (disk or page limit){where}: {exc}")
    if isinstance(exc, (apsw.ReadOnlyError, apsw.PermissionsError)):
        return ReadOnlyStoreError(f"the store cannot be written{where}: {exc}")
    if isinstance(exc, apsw.CantOpenError):
        return ReadOnlyStoreError(
            f"the store file cannot be opened or created{where}: check the path and the "
            f"permissions of the file and its directory ({exc})"
        )
    if isinstance(exc, apsw.NotADBError):
        return CorruptStoreError(f"the file is not a SQLite database, or is damaged{where}")
    if isinstance(exc, apsw.CorruptError):
        return CorruptStoreError(f"the store file is damaged{where}: {exc}")
    if isinstance(exc, apsw.IOError):
        return StorageError(f"I/O error on the store{where}: {exc}")
    return StorageError(message)


def fetch_all(
    conn: apsw.Connection, sql: str, params: tuple[object, ...] = ()
) -> list[tuple[Any, ...]]:
    """Run one statement and drain it (apsw rows typed loosely for callers)."""
    rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
    return rows


@contextlib.contextmanager
def translated(path: str = "") -> Iterator[None]:
    """Re-raise any apsw error inside the block as the matching StorageError."""
    try:
        yield
    except apsw.Error as exc:
        raise storage_error(exc, path) from exc


# --- connection set-up, in apsw best-practice order -------------------------------------


def _set_busy_timeout(conn: apsw.Connection, timeout_ms: int) -> None:
    conn.set_busy_timeout(timeout_ms)


def _check_identity(conn: apsw.Connection, path: str) -> int:
    """The file's schema version (0 for a new, empty file); refuses anything not ours.

    Reads only: nothing here writes to the file.
    """
    app_id = conn.pragma("application_id")
    version = conn.pragma("user_version")
    if app_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"{path} was written by a newer clinik-local (schema version {version}; this "
                f"release knows up to {SCHEMA_VERSION}); upgrade clinik-local to open it. "
                "The file was not changed."
            )
        return int(version)
    objects = conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()[0][0]
    if app_id == 0 and version == 0 and objects == 0:
        return 0
    raise ForeignFileError(
        f"{path} is a SQLite database of another program (application_id {app_id:#x}, "
        f"{objects} schema objects), not a clinik-local store. The file was not changed."
    )


def _set_wal(conn: apsw.Connection) -> None:
    mode = conn.pragma("journal_mode", "wal")
    if mode != "wal":
        raise StorageError(f"could not switch the store to WAL mode (got {mode!r})")


def _set_synchronous(conn: apsw.Connection, durability: Durability) -> None:
    conn.pragma("synchronous", "FULL" if durability == "full" else "NORMAL")


def _set_foreign_keys(conn: apsw.Connection) -> None:
    conn.pragma("foreign_keys", "ON")


def _disable_dqs(conn: apsw.Connection) -> None:
    conn.config(apsw.SQLITE_DBCONFIG_DQS_DML, 0)
    conn.config(apsw.SQLITE_DBCONFIG_DQS_DDL, 0)


def _install_schema(conn: apsw.Connection, from_version: int) -> None:
    """Create (version 0) or migrate the schema, all in one IMMEDIATE transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read inside the write lock: another process may have just done this.
        current = conn.pragma("user_version")
        if current == 0 and from_version == 0:
            conn.execute(schema_sql())
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('created_at', ?), ('schema_created', ?)",
                (timestamps.now(), str(SCHEMA_VERSION)),
            )
        else:
            for version in range(int(current) + 1, SCHEMA_VERSION + 1):
                conn.execute(MIGRATIONS[version])
        conn.pragma("application_id", APPLICATION_ID)
        conn.pragma("user_version", SCHEMA_VERSION)
        conn.execute("COMMIT")
    except BaseException:
        if not conn.get_autocommit():
            conn.execute("ROLLBACK")
        raise


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
    file stays bounded.
    """

    THRESHOLD_PAGES = 1000
    WRITER_FALLBACK_PAGES = 20 * THRESHOLD_PAGES

    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_ms = busy_timeout_ms
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def wal_hook(self, conn: apsw.Connection, name: str, pages: int) -> int:
        if pages >= self.WRITER_FALLBACK_PAGES:
            with contextlib.suppress(apsw.Error):
                conn.wal_checkpoint(name, apsw.SQLITE_CHECKPOINT_PASSIVE)
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
        conn = apsw.Connection(self._path)
        conn.set_busy_timeout(self._busy_ms)
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                # A failed checkpoint (e.g. disk full) is retried at the next wake-up;
                # committed data is safe in the WAL meanwhile.
                with contextlib.suppress(apsw.Error):
                    conn.wal_checkpoint(None, apsw.SQLITE_CHECKPOINT_PASSIVE)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join()


_memory_image: bytes | None = None
_memory_image_lock = threading.Lock()


def _memory_template() -> bytes:
    """A serialised empty store, built once per process; new memory stores copy it.

    Deserialising an image costs a few microseconds, running the schema script a few
    hundred; this is what makes a fresh store per test affordable.
    """
    global _memory_image
    if _memory_image is None:
        with _memory_image_lock:
            if _memory_image is None:
                conn = apsw.Connection(MEMORY)
                _install_schema(conn, 0)
                _memory_image = bytes(conn.serialize("main"))
                conn.close()
    return _memory_image


def _open_connection(
    path: str, durability: Durability, busy_timeout_ms: int, *, is_writer: bool
) -> apsw.Connection:
    if path == MEMORY:
        conn = apsw.Connection(MEMORY)
        conn.deserialize("main", _memory_template())
        _set_foreign_keys(conn)
        _disable_dqs(conn)
        return conn
    conn = apsw.Connection(path)
    try:
        _set_busy_timeout(conn, busy_timeout_ms)
        if is_writer:
            version = _check_identity(conn, path)
            _set_wal(conn)
            if version < SCHEMA_VERSION:
                _install_schema(conn, version)
            # The writer touches many index pages per task; SQLite's default 2 MiB page cache
            # makes bulk imports re-read pages as the file grows (measured: 1,478 -> 149
            # tasks/s from 0 to 40k tasks; with 64 MiB it stayed above 500/s).
            conn.pragma("cache_size", -65536)
            # Long-lived connection: let SQLite refresh planner statistics it finds stale
            # (cheap when nothing changed; apsw's best practice for such connections).
            # Opportunistic: it may need the write lock, and opening must not wait for
            # (or fail on) another process's long write, nor fail on a read-only file.
            conn.set_busy_timeout(0)
            with contextlib.suppress(apsw.BusyError, apsw.ReadOnlyError):
                conn.pragma("optimize", 0x10002)
            _set_busy_timeout(conn, busy_timeout_ms)
        _set_synchronous(conn, durability)
        _set_foreign_keys(conn)
        _disable_dqs(conn)
    except BaseException:
        conn.close()
        raise
    return conn


class TaskStore:
    """A local clinik Tasks store on one SQLite file, or in memory.

    Open with :meth:`open`; use as a context manager or call :meth:`close`. Tasks are
    at ``store.tasks`` (the same calls as the remote SDK's ``clinik.tasks``); sync, when
    configured, at ``store.sync``.
    """

    def __init__(
        self,
        path: str,
        *,
        durability: Durability = "normal",
        busy_timeout: float = _DEFAULT_BUSY_TIMEOUT_MS / 1000,
        sync: SyncConfig | None = None,
    ) -> None:
        """Prefer :meth:`TaskStore.open`; the arguments are the same."""
        if durability not in ("normal", "full"):
            raise ValidationError.single(
                "durability", "is not an allowed value", durability, "normal, full"
            )
        if (
            isinstance(busy_timeout, bool)
            or not isinstance(busy_timeout, (int, float))
            or not (0 <= busy_timeout <= 3600)
        ):
            raise ValidationError.single(
                "busy_timeout", "must be a number of seconds", busy_timeout, "0..3600"
            )
        self.path = path
        self.durability: Durability = durability
        self._busy_ms = int(busy_timeout * 1000)
        self._is_memory = path == MEMORY
        if not self._is_memory:
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
        with translated(path):
            self._conn = _open_connection(path, durability, self._busy_ms, is_writer=True)
        self._checkpointer: _Checkpointer | None = None
        if not self._is_memory:
            self._checkpointer = _Checkpointer(path, self._busy_ms)
            self._conn.set_wal_hook(self._checkpointer.wal_hook)
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: weakref.WeakSet[_ReaderBox] = weakref.WeakSet()
        self._closed = False
        self._after_commit: list[Callable[[], None]] = []

        from .tasks import TasksResource

        self.tasks: TasksResource = TasksResource(self)
        self._sync_config = sync
        self._sync: SyncEngine | None = None
        if sync is not None:
            from .sync import SyncEngine

            self._sync = SyncEngine(self, sync)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] = MEMORY,
        *,
        durability: Durability = "normal",
        busy_timeout: float = _DEFAULT_BUSY_TIMEOUT_MS / 1000,
        sync: SyncConfig | None = None,
    ) -> TaskStore:
        """Open (creating if new, mode 0600) the store at ``path``, or ``":memory:"``.

        ``durability="normal"`` (default): a crash of the app loses nothing committed;
        a power loss may lose the last transactions. ``"full"`` syncs every commit to
        disk (slower writes; nothing committed is lost on power loss). ``busy_timeout``
        is how long, in seconds, a write waits for another process's lock.
        """
        return cls(os.fspath(path), durability=durability, busy_timeout=busy_timeout, sync=sync)

    # --- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Stop sync (if running) and close every connection. Safe to call twice."""
        if self._closed:
            return
        if self._sync is not None:
            self._sync.stop()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._lock:
            self._closed = True
            for box in list(self._readers):
                box.close()
            self._local = threading.local()
            with contextlib.suppress(apsw.Error):
                if not self._is_memory:
                    self._conn.pragma("optimize")
            self._conn.close()

    def __enter__(self) -> TaskStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TaskStore {self.path!r} {state}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    @property
    def sync(self) -> SyncEngine:
        """The sync engine; only on a store opened with ``sync=SyncConfig(...)``."""
        if self._sync is None:
            from .errors import SyncError

            raise SyncError(
                "this store was opened without sync; pass sync=SyncConfig(base_url=..., "
                "token_provider=...) to TaskStore.open"
            )
        return self._sync

    # --- transactions ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the store is closed")

    @contextlib.contextmanager
    def write(self) -> Iterator[apsw.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction on the writer connection; commits on success.

        Anything raised inside rolls the whole transaction back. apsw errors come out
        as StorageError subclasses. Callbacks queued with :meth:`after_commit` inside
        the block run after a successful commit, outside the lock.
        """
        callbacks: list[Callable[[], None]]
        with self._lock:
            self._check_open()
            conn = self._conn
            with translated(self.path):
                conn.execute("BEGIN IMMEDIATE")
            try:
                with translated(self.path):  # no apsw error escapes the block either
                    yield conn
                    conn.execute("COMMIT")
            except BaseException:
                if not conn.get_autocommit():
                    with contextlib.suppress(apsw.Error):
                        conn.execute("ROLLBACK")
                self._after_commit.clear()
                raise
            callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the current write transaction has committed."""
        self._after_commit.append(callback)

    @contextlib.contextmanager
    def read(self) -> Iterator[apsw.Connection]:
        """A connection for reading. File stores: this thread's own reader, never
        blocked by writers (WAL). Memory stores: the one connection, under the lock.
        """
        if self._closed:
            raise StorageError("the store is closed")
        if self._is_memory:
            with self._lock:
                try:
                    yield self._conn
                except apsw.Error as exc:
                    raise storage_error(exc, self.path) from exc
            return
        try:
            conn = self._local.conn
        except AttributeError:
            conn = self._new_reader()
        try:
            yield conn
        except apsw.Error as exc:
            raise storage_error(exc, self.path) from exc

    def _new_reader(self) -> apsw.Connection:
        with translated(self.path):
            conn = _open_connection(self.path, self.durability, self._busy_ms, is_writer=False)
        box = _ReaderBox(conn)
        self._local.box = box  # closed with the thread's locals, or by close()
        self._local.conn = conn
        with self._lock:
            self._readers.add(box)
        return conn

    def optimize(self) -> None:
        """Refresh the query planner's statistics (``PRAGMA optimize``).

        Run at close and after bulk imports; cheap when nothing changed much.
        """
        with self._lock:
            self._check_open()
            with translated(self.path):
                self._conn.pragma("optimize")

    def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check`` problems; an empty list means the file is sound."""
        with self.read() as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        problems = [str(r[0]) for r in rows]
        return [] if problems == ["ok"] else problems

    def schema_version(self) -> int:
        """The schema version stamped in the file (``PRAGMA user_version``)."""
        with self.read() as conn:
            return int(conn.pragma("user_version"))

    def table_counts(self) -> dict[str, int]:
        """Row count of every table: tests and ``clinik-local check`` use it."""
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


class _ReaderBox:
    """One thread's read connection; closed by the store (or when the thread ends)."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn: apsw.Connection | None = conn

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(apsw.Error):
                self.conn.close()
            self.conn = None

    def __del__(self) -> None:
        self.close()
