"""Every SQLite connection of a store is made here, by one pipeline of set-up steps.

apsw's best practice, as data: :data:`SETUP` is an ordered tuple of small named
functions, each with a docstring saying why it exists. :func:`open_connection` runs the
steps that apply to the connection's *role*:

``writer``        the one connection that writes (identity check, schema, WAL, ...);
``reader``        one per thread on a file store, ``PRAGMA query_only`` (it cannot write);
``checkpointer``  the background thread's connection that runs WAL checkpoints;
``backup``        a connection that only copies pages (``Connection.backup``).

A step added to :data:`SETUP` reaches every role by editing that one tuple; a step
that concerns only some roles says so in its :class:`Step` entry. The first step keys
the connection (encryption at rest, see :mod:`.encryption`): it must come before
SQLite reads a page. :class:`ConnectionOptions` carries what the steps need
(durability, busy timeout, the key provider).

Errors: anything apsw raises comes out as the library's
:class:`~clinik_local.errors.StorageError` subclass for it (:func:`storage_error`,
:func:`translated`); this module is where that mapping lives, once.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import apsw
import attrs

from .. import timestamps
from ..errors import (
    CorruptStoreError,
    ForeignFileError,
    NewerSchemaError,
    ReadOnlyStoreError,
    StorageError,
    StoreFullError,
    StoreLockedError,
    ValidationError,
)
from .encryption import KeyProvider, key_connection
from .migrations import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, schema_sql

__all__ = [
    "ALL_ROLES",
    "MEMORY",
    "SETUP",
    "ConnectionOptions",
    "Durability",
    "Opening",
    "Role",
    "Step",
    "fetch_all",
    "fetch_among",
    "meta_value",
    "meta_values",
    "open_connection",
    "set_meta",
    "stamp_memory_store",
    "storage_error",
    "translated",
    "write_fresh_meta",
]

MEMORY = ":memory:"
Durability = Literal["normal", "full"]
Role = Literal["writer", "reader", "checkpointer", "backup"]
ALL_ROLES: frozenset[Role] = frozenset({"writer", "reader", "checkpointer", "backup"})
_WRITER: frozenset[Role] = frozenset({"writer"})
_READER: frozenset[Role] = frozenset({"reader"})
DEFAULT_BUSY_TIMEOUT = 5.0


def _check_durability(_instance: object, _attribute: object, value: object) -> None:
    if value not in ("normal", "full"):
        raise ValidationError.single("durability", "is not an allowed value", value, "normal, full")


def _check_busy_timeout(_instance: object, _attribute: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= 3600):
        raise ValidationError.single(
            "busy_timeout", "must be a number of seconds", value, "0..3600"
        )


def _check_key(_instance: object, _attribute: object, value: KeyProvider | None) -> None:
    if value is not None and not callable(value):
        # The value is not shown: it may well be the key itself, passed by mistake.
        raise ValidationError.single(
            "key",
            f"must be a callable returning the key, not a {type(value).__name__}",
            allowed="a callable returning str or bytes (e.g. lambda: keyring_lookup()), or None",
        )


@attrs.frozen(kw_only=True)
class ConnectionOptions:
    """What the set-up steps need to know, the same for every connection of a store.

    ``durability``: ``"normal"`` (a crash of the app loses nothing committed) or
    ``"full"`` (every commit synced to disk). ``busy_timeout``: seconds a connection
    waits for another's lock before :class:`~clinik_local.errors.StoreLockedError`.
    ``key``: the encryption key's provider, or ``None`` for a plaintext store; never
    in the repr (a ``functools.partial`` would show its arguments).
    """

    durability: Durability = attrs.field(default="normal", validator=_check_durability)
    busy_timeout: float = attrs.field(default=DEFAULT_BUSY_TIMEOUT, validator=_check_busy_timeout)
    key: KeyProvider | None = attrs.field(default=None, validator=_check_key, repr=False, eq=False)

    @property
    def encrypted(self) -> bool:
        """Whether connections are keyed (the store is encrypted at rest)."""
        return self.key is not None

    @property
    def busy_timeout_ms(self) -> int:
        """The busy timeout in milliseconds, as SQLite takes it."""
        return int(self.busy_timeout * 1000)


# --- errors ---------------------------------------------------------------------------


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


@contextlib.contextmanager
def translated(path: str = "") -> Iterator[None]:
    """Re-raise any apsw error inside the block as the matching StorageError."""
    try:
        yield
    except apsw.Error as exc:
        raise storage_error(exc, path) from exc


#: Ids bound in one statement by :func:`fetch_among` (SQLite allows 32,766 parameters).
IDS_PER_STATEMENT = 5000


def fetch_all(
    conn: apsw.Connection, sql: str, params: tuple[object, ...] = ()
) -> list[tuple[Any, ...]]:
    """Run one statement and drain it (apsw rows typed loosely for callers)."""
    rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
    return rows


def fetch_among(conn: apsw.Connection, sql: str, ids: Sequence[str]) -> list[tuple[Any, ...]]:
    """The rows a query finds for a list of ids, the list bound where ``sql`` holds
    ``{ids}`` (``... WHERE id IN ({ids})``, as often as it needs): each becomes a
    placeholder per id, so every value stays bound. A long list is asked in chunks of
    :data:`IDS_PER_STATEMENT` (the rows of all chunks, in order)."""
    uses = sql.count("{ids}")
    found: list[tuple[Any, ...]] = []
    for start in range(0, len(ids), IDS_PER_STATEMENT):
        part = tuple(ids[start : start + IDS_PER_STATEMENT])
        marks = ",".join("?" * len(part))
        found.extend(fetch_all(conn, sql.replace("{ids}", marks), part * uses))
    return found


def ids_among(conn: apsw.Connection, sql: str, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` a query finds (its first column, as strings): :func:`fetch_among`."""
    return {str(r[0]) for r in fetch_among(conn, sql, ids)}


# --- the set-up steps -----------------------------------------------------------------


@attrs.define
class Opening:
    """One connection being set up: what the steps read, and what they learn on the way."""

    path: str
    role: Role
    options: ConnectionOptions
    #: A prepared database image an in-memory writer starts from (see database.py).
    image: bytes | None = None
    #: The file's schema version, as the identity check found it (writer only).
    schema_version: int = 0

    @property
    def memory(self) -> bool:
        """Whether this is an in-memory database (no file: no WAL, no sync settings)."""
        return self.path == MEMORY


def apply_key(conn: apsw.Connection, opening: Opening) -> None:
    """Key the connection from the provider and prove the key, before anything else.

    SQLite must have the key before it reads a page; the proof reads the schema, so a
    wrong key is :class:`~clinik_local.errors.EncryptionKeyError` here, and a plaintext
    file given a key (or an encrypted one given none) its own error, with the file
    untouched. Without a key on a plaintext file this only reads 24 bytes of header.
    """
    probe = _immutable_connection if opening.role == "writer" else None
    key_connection(conn, opening.path, opening.options.key, probe)


def _immutable_connection(path: str) -> apsw.Connection:
    """A read-only connection that ignores (and never touches) ``-wal`` and ``-shm``:
    proves a key without SQLite writing read marks into another process's ``-shm``."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?immutable=1"
    return apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)


def set_busy_timeout(conn: apsw.Connection, opening: Opening) -> None:
    """Wait for another connection's lock instead of failing at once.

    First (it does no I/O), so that every later step that touches the file, the key's
    proof included, already waits politely.
    """
    conn.set_busy_timeout(opening.options.busy_timeout_ms)


def load_memory_image(conn: apsw.Connection, opening: Opening) -> None:
    """Start an in-memory store from a prepared image instead of running schema.sql.

    Deserialising costs microseconds, the schema script hundreds of them: this is what
    makes a fresh store per test affordable.
    """
    if opening.image is not None:
        conn.deserialize("main", opening.image)


#: The page size of in-memory stores (files keep SQLite's 4096).
MEMORY_PAGE_SIZE = 1024


def size_memory_pages(conn: apsw.Connection, opening: Opening) -> None:
    """1 KiB pages for an in-memory store (its image is made with them, so every copy
    has them too).

    A memory store is mostly a store per test, a few tasks in a transaction rolled back
    at close (``database._MemoryPool``): the journal copies each page a write touches
    before changing it, and copies it back at the rollback. A create touches about 30
    pages of an empty store (a root page per index), so the page size is most of that
    copying: the fixture's whole test, open + create + search + close, counts 733k
    instructions with 4 KiB pages and 634k with 1 KiB (cachegrind, 400 vs 0 loops).
    Measured no slower in bulk: ``create_many`` of 20,000 tasks and 600 searches on
    them took the same time within noise, in 10% more memory. Files keep 4 KiB pages:
    shallower b-trees on disk, and full-text segments (about 4 KB each) fit a page.
    """
    if opening.image is None:  # a new, empty database: the size can still be chosen
        conn.pragma("page_size", MEMORY_PAGE_SIZE)


def check_identity(conn: apsw.Connection, opening: Opening) -> None:
    """Refuse a file that is not ours, or ours from a newer release, before any write.

    Reads only (``application_id``, ``user_version``, the schema's size): a foreign or
    newer file is left byte-for-byte as it was. An empty file is version 0.
    """
    path = opening.path
    app_id = conn.pragma("application_id")
    version = conn.pragma("user_version")
    if app_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"{path} was written by a newer clinik-local (schema version {version}; this "
                f"release knows up to {SCHEMA_VERSION}); upgrade clinik-local to open it. "
                "The file was not changed."
            )
        opening.schema_version = int(version)
        return
    objects = conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()[0][0]
    if app_id == 0 and version == 0 and objects == 0:
        opening.schema_version = 0
        return
    raise ForeignFileError(
        f"{path} is a SQLite database of another program (application_id {app_id:#x}, "
        f"{objects} schema objects), not a clinik-local store. The file was not changed."
    )


def set_wal(conn: apsw.Connection, opening: Opening) -> None:
    """WAL: readers never wait for the writer, and a commit appends instead of rewriting.

    Persistent in the file, so the writer sets it once and every other connection finds it.
    """
    mode = conn.pragma("journal_mode", "wal")
    if mode != "wal":
        raise StorageError(f"could not switch the store to WAL mode (got {mode!r})")


def meta_value(conn: apsw.Connection, key: str) -> str | None:
    """The ``meta`` row ``key``'s value, or None when there is none.

    ``meta`` is one key/value table shared by several owners of keys (the store's
    identity here, the pull state in replica.py, the sync lease in lease.py, the engine's
    last success in outbox.py); its SQL is written only here.
    """
    found = fetch_all(conn, "SELECT value FROM meta WHERE key = ?", (key,))
    return str(found[0][0]) if found else None


def meta_values(conn: apsw.Connection, prefix: str) -> dict[str, str]:
    """Every ``meta`` row whose key starts with ``prefix`` (exactly, case and all)."""
    return {
        str(k): str(v)
        for k, v in fetch_all(
            conn,
            "SELECT key, value FROM meta WHERE substr(key, 1, length(?1)) = ?1",
            (prefix,),
        )
    }


def set_meta(conn: apsw.Connection, key: str, value: str | None) -> None:
    """Set the ``meta`` row ``key`` (None removes it), on the caller's write."""
    if value is None:
        conn.execute("DELETE FROM meta WHERE key = ?", (key,))
    else:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def write_fresh_meta(conn: apsw.Connection) -> None:
    """Write the ``meta`` rows a brand-new store has, with values made now (one statement).

    The one list of them: a new file gets them in :func:`install_schema` (so does the
    image every in-memory store starts from), and every in-memory store writes its
    ``created_at`` again when it opens (:func:`stamp_memory_store`: the image and a
    pooled connection were made earlier), so its ``created_at`` is its own.
    """
    conn.execute(_FRESH_META_SQL, ("created_at", timestamps.now(), *_FIXED_META))


#: meta rows whose value is the same in every new store of this release.
_FIXED_META = ("schema_created", str(SCHEMA_VERSION))
_FRESH_META_SQL = "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?), (?, ?)"
_CREATED_AT_SQL = "INSERT OR REPLACE INTO meta(key, value) VALUES ('created_at', ?)"
_BEGIN_AND_CREATED_AT_SQL = "BEGIN; " + _CREATED_AT_SQL


def stamp_memory_store(conn: apsw.Connection | apsw.Cursor, *, begin: bool) -> None:
    """An in-memory store's opening write: its own ``created_at`` (made now), after a
    ``BEGIN`` of its pool transaction when ``begin`` (one call into SQLite for both).

    Its connection holds an image made by :func:`install_schema`, which wrote every
    row of :func:`write_fresh_meta`; the others' values are the same in every new store
    of this release (and a pooled connection's are back at the image's after the
    rollback), so only ``created_at`` is written again. Per store, on a test's set-up
    path: one row and one statement fewer than :func:`write_fresh_meta`.
    """
    conn.execute(_BEGIN_AND_CREATED_AT_SQL if begin else _CREATED_AT_SQL, (timestamps.now(),))


def install_schema(conn: apsw.Connection, opening: Opening) -> None:
    """Create (version 0) or migrate the schema, all in one IMMEDIATE transaction.

    The version is read again inside the write lock: another process may have just
    done this. Stamps ``application_id`` and ``user_version`` last, in the same
    transaction, so a half-made store is never recognised as ours.
    """
    if opening.schema_version >= SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.pragma("user_version")
        if current == 0 and opening.schema_version == 0:
            conn.execute(schema_sql())
            write_fresh_meta(conn)
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
    opening.schema_version = SCHEMA_VERSION


def size_writer_cache(conn: apsw.Connection, opening: Opening) -> None:
    """A 64 MiB page cache for the writer, which touches many index pages per task.

    SQLite's default 2 MiB makes bulk imports re-read pages as the file grows
    (measured: 1,478 -> 149 tasks/s from 0 to 40k tasks; with 64 MiB above 500/s).
    """
    conn.pragma("cache_size", -65536)


def refresh_statistics(conn: apsw.Connection, opening: Opening) -> None:
    """Let SQLite refresh planner statistics it finds stale (apsw's advice for long-lived
    connections; cheap when nothing changed).

    Opportunistic: it may need the write lock, and opening must neither wait for (or
    fail on) another process's long write, nor fail on a read-only file.
    """
    conn.set_busy_timeout(0)
    with contextlib.suppress(apsw.BusyError, apsw.ReadOnlyError):
        conn.pragma("optimize", 0x10002)
    conn.set_busy_timeout(opening.options.busy_timeout_ms)


def set_synchronous(conn: apsw.Connection, opening: Opening) -> None:
    """``synchronous=NORMAL`` (crash-safe in WAL) or ``FULL`` (power-loss safe), per
    the store's durability; per connection, so every role gets it."""
    conn.pragma("synchronous", "FULL" if opening.options.durability == "full" else "NORMAL")


def set_foreign_keys(conn: apsw.Connection, opening: Opening) -> None:
    """Enforce the schema's foreign keys (SQLite leaves them off per connection)."""
    conn.pragma("foreign_keys", "ON")


def disable_double_quoted_strings(conn: apsw.Connection, opening: Opening) -> None:
    """A misspelt ``"column"`` is an error, not silently a string literal."""
    conn.config(apsw.SQLITE_DBCONFIG_DQS_DML, 0)
    conn.config(apsw.SQLITE_DBCONFIG_DQS_DDL, 0)


def plan_once(conn: apsw.Connection, opening: Opening) -> None:
    """The query planner stability guarantee: a statement's plan never depends on the
    values bound to it, so a cached statement is planned once, not at every call.

    Without it this SQLite re-plans a statement every time a value is bound to a
    parameter it looked at while planning (``LIMIT ?``, ``col = ? ... ORDER BY``): every
    search, on every call (measured: the patientId page statement, 7.5-10.5 µs against
    1.5-2.1 µs, empty store). The library's SQL spells every constant a plan depends on
    (partial-index terms, statuses) as a literal, so no plan needs a bound value;
    ``tests/test_plans.py`` pins the plans.
    """
    conn.config(apsw.SQLITE_DBCONFIG_ENABLE_QPSG, 1)


def set_query_only(conn: apsw.Connection, opening: Opening) -> None:
    """Readers cannot write: a bug that writes on a read path fails loudly instead of
    taking a write lock outside the writer's ``BEGIN IMMEDIATE`` discipline."""
    conn.pragma("query_only", 1)


@attrs.frozen
class Step:
    """One set-up step: the function (its docstring says why) and where it applies."""

    run: Callable[[apsw.Connection, Opening], None]
    roles: frozenset[Role] = ALL_ROLES
    #: Whether it applies to in-memory databases (which have no file, WAL or sync).
    memory: bool = True
    #: Whether it applies to files.
    files: bool = True

    def applies(self, opening: Opening) -> bool:
        """Whether this step runs for that connection."""
        if opening.role not in self.roles:
            return False
        return self.memory if opening.memory else self.files


#: The set-up pipeline, in apsw best-practice order. Add a step here and it reaches
#: every connection of its roles. The key is the first thing that touches the file, on
#: every role of a file store; only the busy timeout (no I/O) comes before it, so that
#: proving the key waits politely for another process's lock (a rekey in progress).
SETUP: tuple[Step, ...] = (
    Step(set_busy_timeout),
    Step(apply_key, memory=False),
    Step(plan_once),
    Step(load_memory_image, _WRITER, files=False),
    Step(size_memory_pages, _WRITER, files=False),
    Step(check_identity, _WRITER),
    Step(set_wal, _WRITER, memory=False),
    Step(install_schema, _WRITER),
    Step(size_writer_cache, _WRITER, memory=False),
    Step(refresh_statistics, _WRITER, memory=False),
    Step(set_synchronous, memory=False),
    Step(set_foreign_keys),
    Step(disable_double_quoted_strings),
    Step(set_query_only, _READER),
)


def open_connection(
    path: str, role: Role, options: ConnectionOptions, *, image: bytes | None = None
) -> apsw.Connection:
    """A connection to ``path`` for ``role``, set up by :data:`SETUP`.

    The only place the library makes an ``apsw.Connection``. apsw errors come out as
    StorageError subclasses; a connection whose set-up failed is closed.
    """
    opening = Opening(path, role, options, image)
    with translated(path):
        conn = apsw.Connection(path)
        try:
            for step in SETUP:
                if step.applies(opening):
                    step.run(conn, opening)
        except BaseException:
            conn.close()
            raise
    return conn
