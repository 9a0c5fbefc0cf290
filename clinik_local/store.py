"""TaskStore: the local SQLite file (or memory) behind ``store.tasks``, and ``store.sync``.

This is the one module that wires the layers together (see docs/architecture.md):
a :class:`~clinik_local.storage.database.Database` (the connections and the
transaction discipline), the :class:`~clinik_local.tasks.TasksResource` on it, and,
when configured, a :class:`~clinik_local.sync.SyncEngine` on the same database that
every committed local edit wakes. Nothing below imports this module.

One ``TaskStore`` may be shared by many threads. Writes go through one connection in
``BEGIN IMMEDIATE`` transactions, serialised by a lock; reads on a file store use one
``query_only`` connection per thread, so in WAL mode they never wait for a writer (in
this process or another). Several processes may open the same file; a writer waiting
for another waits up to ``busy_timeout`` and only then raises :class:`StoreLockedError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

import apsw

from .errors import SyncError, ValidationError
from .storage.connection import DEFAULT_BUSY_TIMEOUT, MEMORY, ConnectionOptions, Durability
from .storage.database import Database
from .storage.encryption import KeyProvider
from .tasks import TasksResource

if TYPE_CHECKING:
    from .sync import SyncConfig, SyncEngine

__all__ = ["MEMORY", "Durability", "TaskStore"]

_DEFAULT_OPTIONS = ConnectionOptions()


def _file_path(path: object) -> str:
    """``path`` as text: a ValidationError naming ``path`` for anything that is not a
    file path (``str`` or a ``str`` ``os.PathLike``) or that SQLite could not open by
    name (a NUL character)."""
    # (str first: the common case skips the ABC check, a few hundred ns per open)
    text = path if type(path) is str or not isinstance(path, os.PathLike) else os.fspath(path)
    if not isinstance(text, str):
        raise ValidationError.single(
            "path", "expected a file path (str or os.PathLike) or ':memory:'", type(text)
        )
    if "\x00" in text:
        raise ValidationError.single("path", "contains a NUL character", text)
    return text


def _sync_config_type() -> type[SyncConfig]:
    from .sync import SyncConfig

    return SyncConfig


class TaskStore:
    """A local clinik Tasks store on one SQLite file, or in memory.

    Open with :meth:`open`; use as a context manager or call :meth:`close`. Tasks are
    at ``store.tasks`` (the same calls as the remote SDK's ``clinik.tasks``); sync, when
    configured, at ``store.sync``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        sync: SyncConfig | None = None,
        key: KeyProvider | None = None,
    ) -> None:
        """Prefer :meth:`TaskStore.open`; the arguments are the same."""
        path = _file_path(path)  # the one check, for open() and a direct call alike
        if sync is not None and not isinstance(sync, _sync_config_type()):
            raise ValidationError.single("sync", "expected a SyncConfig, or None", type(sync))
        if key is not None and path == MEMORY:
            raise ValidationError.single(
                "key",
                "an in-memory store is never written to disk, so it is not encrypted",
                allowed="key=None for ':memory:', or a file path",
            )
        if durability == "normal" and busy_timeout == DEFAULT_BUSY_TIMEOUT and key is None:
            options = _DEFAULT_OPTIONS  # validated once (most opens, every test's store)
        else:
            options = ConnectionOptions(durability=durability, busy_timeout=busy_timeout, key=key)
        self.path = path
        self.durability: Durability = durability
        self._db = Database(path, options)
        self._sync: SyncEngine | None = None
        # Only a syncing store has anyone to wake. Without sync there is no callback,
        # and so no cycle store -> tasks -> bound method -> store: a closed store is
        # freed at once by its reference count, not left to the cyclic GC (a test's
        # store per test would otherwise add to every collection's work).
        on_change = self._local_change if sync is not None else None
        self.tasks: TasksResource = TasksResource(self._db, on_change=on_change)
        if sync is not None:
            from .sync import SyncEngine

            try:
                self._sync = SyncEngine(self._db, sync)
            except BaseException:
                self._db.close()  # a store that failed to open holds no connection
                raise
        if path != MEMORY and (sync is None or not sync.pulls):
            self._restore_search_indexes()

    def _restore_search_indexes(self) -> None:
        """A bootstrap that loaded without the search indexes and will not finish now
        (this store does not pull): build them, so no search is left scanning."""
        from .storage import replica, rows

        with self._db.read() as conn:
            if replica.dropped_indexes(conn) is None:
                return
        with self._db.write() as conn:
            rows.restore_search_indexes(conn)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] = MEMORY,
        *,
        durability: Durability = "normal",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        sync: SyncConfig | None = None,
        key: KeyProvider | None = None,
    ) -> TaskStore:
        """Open (creating if new, mode 0600) the store at ``path``, or ``":memory:"``.

        ``durability="normal"`` (default): a crash of the app loses nothing committed;
        a power loss may lose the last transactions. ``"full"`` syncs every commit to
        disk (slower writes; nothing committed is lost on power loss). ``busy_timeout``
        is how long, in seconds, a write waits for another process's lock.

        ``key``: a callable returning the encryption key (``str`` passphrase or
        ``bytes``); the file is then encrypted at rest (docs/encryption.md). It is called
        for each connection the store makes and the key is never kept, logged or shown.
        A wrong key is :class:`~clinik_local.errors.EncryptionKeyError`; an encrypted
        file opened without one :class:`~clinik_local.errors.KeyRequiredError`; a
        plaintext file opened with one :class:`~clinik_local.errors.NotEncryptedError`;
        each leaves the file untouched. ``":memory:"`` with a key is a ValidationError.
        """
        return cls(path, durability=durability, busy_timeout=busy_timeout, sync=sync, key=key)

    def _local_change(self) -> None:
        """A local edit committed: wake the sync worker, if there is one."""
        if self._sync is not None:
            self._sync.notify_change()

    # --- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Stop sync (if running) and close every connection. Safe to call twice."""
        if self._db.closed:
            return
        if self._sync is not None:
            self._sync.close()
        self._db.close()

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
        state = "closed" if self.closed else "open"
        encrypted = " encrypted" if self.encrypted else ""
        return f"<TaskStore {self.path!r}{encrypted} {state}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._db.closed

    @property
    def sync(self) -> SyncEngine:
        """The sync engine; only on a store opened with ``sync=SyncConfig(...)``."""
        if self._sync is None:
            raise SyncError(
                "this store was opened without sync; pass sync=SyncConfig(base_url=..., "
                "token_provider=...) to TaskStore.open"
            )
        return self._sync

    # --- the file ----------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self) -> Iterator[apsw.Connection]:
        """A read-only (``query_only``) connection, for inspection and tools.

        File stores: this thread's own reader, never blocked by writers (WAL). Memory
        stores: the one connection, under the lock (then closed with the store, not
        pooled for the next in-memory store). Writes go through ``store.tasks``.
        """
        with self._db.lend() as conn:
            yield conn

    @property
    def encrypted(self) -> bool:
        """Whether the store file is encrypted at rest (opened with a key)."""
        return self._db.encrypted

    def rekey(self, key: KeyProvider | None) -> None:
        """Re-encrypt the store file for ``key``'s provider; ``None`` decrypts it.

        On a store opened without a key this encrypts it in place; with one, it changes
        the key (or, with ``None``, removes encryption). From then on the store (and
        every later :meth:`open`) uses the new key. Exclusive: it waits for this store's
        reads in other threads (up to ``busy_timeout``, then
        :class:`~clinik_local.errors.StoreLockedError` naming them) and refuses with
        StoreLockedError while another process has the file open; nothing changes then.
        Crash-safe: killed at any point, the file opens with the old key or the new one,
        nothing lost. Needs free disk space for one more copy of the store.
        """
        self._db.rekey(key)

    def optimize(self) -> None:
        """Refresh the query planner's statistics (``PRAGMA optimize``).

        Run at close and after bulk imports; cheap when nothing changed much.
        """
        self._db.optimize()

    def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check`` problems; an empty list means the file is sound."""
        return self._db.integrity_check()

    def schema_version(self) -> int:
        """The schema version stamped in the file (``PRAGMA user_version``)."""
        return self._db.schema_version()

    def table_counts(self) -> dict[str, int]:
        """Row count of every table: tests and ``clinik-local check`` use it."""
        return self._db.table_counts()
