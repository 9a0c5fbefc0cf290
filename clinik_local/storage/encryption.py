"""Encryption at rest: SQLite3 Multiple Ciphers through apsw, the key from a provider.

The runtime dependency is ``apsw-sqlite3mc``: apsw built with SQLite3 Multiple Ciphers,
the same API, imported as ``apsw`` (docs/encryption.md says why it replaces plain apsw).
Its ``apsw.mc_version`` tells it apart from a plain build.

What this module decides, once, for every connection of a store:

* **The key comes from a provider**, a callable returning ``str`` or ``bytes``. It is
  called each time a connection is made (writer, each thread's reader, checkpointer,
  rekey copies) and the key is dropped right after keying: it is never stored, logged,
  shown in a repr, a status or an error. It reaches SQLite as ``PRAGMA hexkey`` in a
  statement that is not kept in apsw's statement cache.
* **The cipher**: :data:`CIPHER`, SQLite3MC's AEGIS-256 with an Argon2id key derivation
  (a random salt per file). Every page is authenticated, so a flipped byte is a
  :class:`~clinik_local.errors.CorruptStoreError`, never wrong data. Set explicitly,
  not left to the build's default, because a file can only be opened with the
  settings it was written with.
* **What kind of file it is**, from its first 100 bytes, before anything is keyed:
  a plaintext SQLite file starts with ``SQLite format 3\\0``; an encrypted one starts
  with its salt and keeps bytes 16-23 of the SQLite header readable (page size, format
  versions, reserved bytes per page for the authentication tag), the rest is
  ciphertext (a plaintext file whose first bytes were damaged still shows its text
  encoding and SQLite version further on, and is "unknown"). SQLite itself says
  "file is not a database" for a wrong key, for no key on an encrypted file and for a
  key on a plaintext file alike; the header tells the three apart.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import apsw

from ..errors import (
    EncryptionKeyError,
    EncryptionUnavailableError,
    KeyRequiredError,
    NotEncryptedError,
    ValidationError,
)

__all__ = [
    "CIPHER",
    "SQLITE_MAGIC",
    "FileKind",
    "KeyProvider",
    "cipher_available",
    "file_kind",
    "key_connection",
    "rekey_connection",
]

#: A callable returning the store's key (a passphrase ``str`` or raw ``bytes``).
KeyProvider = Callable[[], str | bytes]

#: The SQLite3MC settings every encrypted store is written and read with, in order.
#: (name, value) pairs for ``PRAGMA name = value``, set before the key. AEGIS-256
#: (authenticated encryption on the CPU's AES instructions) with an Argon2id key
#: derivation (2 passes, 19 MiB, 1 lane: OWASP's minimum for Argon2id). Measured
#: against ChaCha20-Poly1305 and AES-CBC in benchmarks/bench_encryption.py.
CIPHER: tuple[tuple[str, str], ...] = (
    ("cipher", "'aegis'"),
    ("algorithm", "'aegis-256'"),
    ("tcost", "2"),
    ("mcost", "19456"),
    ("pcost", "1"),
)

SQLITE_MAGIC = b"SQLite format 3\x00"
FileKind = Literal["empty", "plain", "encrypted", "unknown"]

_REPAIR = (
    "the installed apsw is a build without encryption (plain `apsw`, installed over "
    "`apsw-sqlite3mc`, which clinik-local depends on). Repair the environment with: "
    "pip uninstall -y apsw apsw-sqlite3mc && pip install --force-reinstall apsw-sqlite3mc"
)


def cipher_available() -> bool:
    """Whether the imported apsw is the SQLite3 Multiple Ciphers build."""
    return hasattr(apsw, "mc_version")


def file_kind(path: str) -> FileKind:
    """What the file at ``path`` holds, from its first 100 bytes (nothing is written).

    ``empty``: missing or zero length (a new store); ``plain``: a plaintext SQLite
    file; ``encrypted``: a SQLite3MC-encrypted file; ``unknown``: neither (damaged, or
    not a database at all).
    """
    try:
        with open(path, "rb") as file:
            head = file.read(100)
    except FileNotFoundError:
        return "empty"
    except OSError:
        return "unknown"  # unreadable: SQLite reports it when it tries
    if not head:
        return "empty"
    if head.startswith(SQLITE_MAGIC):
        return "plain"
    if len(head) < 24:
        return "unknown"
    page_size = int.from_bytes(head[16:18], "big")
    versions_ok = head[18] in (1, 2) and head[19] in (1, 2)
    size_ok = page_size == 1 or (512 <= page_size <= 32768 and page_size & (page_size - 1) == 0)
    if not (size_ok and versions_ok and head[21:24] == b"\x40\x20\x20"):
        return "unknown"
    if len(head) == 100 and _plaintext_header_rest(head):
        return "unknown"  # a plaintext file whose first bytes were damaged
    return "encrypted"


def _plaintext_header_rest(head: bytes) -> bool:
    """Whether bytes 24-99 read as a plaintext SQLite header (in an encrypted file they
    are ciphertext): the text encoding (1-3) and the writing SQLite's version (3.x)."""
    encoding = int.from_bytes(head[56:60], "big")
    version = int.from_bytes(head[96:100], "big")
    return encoding in (1, 2, 3) and 3_000_000 <= version < 4_000_000


def _key_bytes(provider: KeyProvider) -> bytes:
    """Call the provider and check what it returned (the value itself is never shown)."""
    try:
        key = provider()
    except Exception as exc:
        raise EncryptionKeyError(
            f"the key provider raised {type(exc).__name__}; the store was not opened"
        ) from exc
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, bytes):
        raise ValidationError.single(
            "key",
            f"the provider returned a {type(key).__name__}",
            allowed="a non-empty str or bytes",
        )
    if not key:
        raise ValidationError.single(
            "key", "the provider returned an empty key", allowed="a non-empty str or bytes"
        )
    return key


def _set_key(conn: apsw.Connection, pragma: str, key: bytes) -> None:
    """Apply the cipher settings and ``PRAGMA <pragma>`` (hexkey or hexrekey) for ``key``."""
    for name, value in CIPHER:
        conn.execute(f"PRAGMA {name} = {value}", can_cache=False).fetchall()
    # The key goes in as hex, in a statement apsw does not cache; the local names die here.
    conn.execute(f"PRAGMA {pragma} = '{key.hex()}'", can_cache=False).fetchall()


def key_connection(
    conn: apsw.Connection,
    path: str,
    provider: KeyProvider | None,
    immutable: Callable[[str], apsw.Connection] | None = None,
) -> None:
    """Key a fresh connection to ``path`` (or refuse the file), then prove the key.

    Runs before SQLite reads any page. Reads only: on any refusal the file, its
    ``-wal`` and ``-shm`` are left as they were when ``immutable`` is given (the
    store's first connection, its writer): ``immutable(path)`` makes a read-only
    connection that never touches ``-wal`` or ``-shm``, to prove the key on first when
    they exist. Later connections of an open store (readers, checkpointer) get the key
    the writer already proved, and skip that extra key derivation.
    """
    kind = file_kind(path)
    if provider is None:
        if kind == "encrypted":
            raise KeyRequiredError(
                f"{path} is an encrypted store and no key was given: open it with "
                "TaskStore.open(path, key=provider) (CLI: set CLINIK_DB_KEY). "
                "The file was not changed."
            )
        return
    if not cipher_available():
        raise EncryptionUnavailableError(f"cannot open {path} with a key: {_REPAIR}")
    if kind == "plain":
        raise NotEncryptedError(
            f"{path} is a plaintext (unencrypted) store, but a key was given: open it "
            "without key=, or encrypt it first (store.rekey(provider), or "
            "`clinik-local encrypt --db PATH`). The file was not changed."
        )
    if kind == "unknown":
        from ..errors import CorruptStoreError

        raise CorruptStoreError(
            f"{path} is neither a SQLite database nor an encrypted store, or is damaged. "
            "The file was not changed."
        )
    key = _key_bytes(provider)
    companions = any(os.path.exists(path + s) for s in ("-wal", "-shm"))
    if immutable is not None and kind == "encrypted" and companions:
        # SQLite opens the WAL index (and writes read marks into -shm) before it decrypts
        # page 1; prove the key first on a connection that touches the main file only.
        # It reads page 1 only: the rest of the main file may be stale (newer pages are in
        # the WAL it ignores); a wrong key fails on page 1 already.
        probe = immutable(path)
        try:
            _prove_key(probe, path, key, "PRAGMA user_version")
        except apsw.CorruptError:
            pass  # page 1 decrypted and authenticated; the keyed connection decides
        finally:
            probe.close()
    _prove_key(conn, path, key, "SELECT count(*) FROM sqlite_schema")


def _prove_key(conn: apsw.Connection, path: str, key: bytes, query: str) -> None:
    """Key ``conn`` and run ``query``; a key that does not decrypt is EncryptionKeyError."""
    _set_key(conn, "hexkey", key)
    try:
        conn.execute(query).fetchall()
    except apsw.NotADBError:
        raise EncryptionKeyError(
            f"the key does not open {path} (a wrong key for this encrypted store). "
            "The file was not changed."
        ) from None


def rekey_connection(conn: apsw.Connection, provider: KeyProvider | None) -> None:
    """Re-encrypt the database of ``conn`` (rollback-journal mode) for ``provider``'s key.

    ``None`` decrypts it. Used only on the private copy a rekey makes (see
    :meth:`~clinik_local.storage.database.Database.rekey`), never on a live store file.
    """
    if provider is None:
        conn.execute("PRAGMA rekey = ''", can_cache=False).fetchall()
        return
    if not cipher_available():
        raise EncryptionUnavailableError(f"cannot encrypt: {_REPAIR}")
    _set_key(conn, "hexrekey", _key_bytes(provider))


def fsync_directory(path: str) -> None:
    """Make a rename in ``path``'s directory durable (POSIX; a no-op where unsupported)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
