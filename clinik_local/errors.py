"""Every error clinik-local raises, in one tree rooted at :class:`ClinikError`.

Catch ``ClinikError`` to handle anything the library reports; catch a subclass for one
kind of problem. Each class also inherits the builtin it resembles, so code written
against builtins keeps working (``except LookupError`` catches a missing task,
``except ValueError`` catches bad input, ``except OSError`` catches storage trouble).
No ``apsw``, ``cattrs`` or ``httpx`` exception escapes the public API unwrapped; the
original is kept as ``__cause__``.

::

    ClinikError
    ├── ValidationError(ValueError)          bad input; .errors lists every problem
    ├── NotFoundError(LookupError)           no task with that id
    ├── ConflictError
    │   ├── VersionConflictError             if_match did not match the stored version
    │   ├── TaskExistsError                  create with an id that is already in use
    │   └── IllegalTransitionError(ValueError)  status change the Task lifecycle forbids
    ├── StorageError(OSError)                the SQLite file could not do what was asked
    │   ├── StoreLockedError(TimeoutError)   another writer held the lock past the timeout
    │   ├── CorruptStoreError                the file is damaged or not SQLite at all
    │   ├── ForeignFileError                 a SQLite file, but not a clinik-local store
    │   ├── NewerSchemaError                 written by a newer clinik-local; upgrade to open
    │   ├── EncryptionKeyError               the key does not open this encrypted store
    │   │   └── KeyRequiredError             the store is encrypted and no key was given
    │   ├── NotEncryptedError                a key was given for a plaintext store
    │   ├── EncryptionUnavailableError       this environment's apsw cannot encrypt
    │   ├── ReadOnlyStoreError(PermissionError)  file or directory is not writable
    │   └── StoreFullError                   disk (or max_page_count) is full
    └── SyncError                            talking to the remote service failed
        ├── TransportError(ConnectionError)  network, TLS or HTTP-level failure
        └── AuthError(PermissionError)       the token provider's token was refused
"""

from __future__ import annotations

import reprlib

import attrs

__all__ = [
    "AuthError",
    "ClinikError",
    "ConflictError",
    "CorruptStoreError",
    "EncryptionKeyError",
    "EncryptionUnavailableError",
    "FieldError",
    "ForeignFileError",
    "IllegalTransitionError",
    "KeyRequiredError",
    "NewerSchemaError",
    "NotEncryptedError",
    "NotFoundError",
    "ReadOnlyStoreError",
    "StorageError",
    "StoreFullError",
    "StoreLockedError",
    "SyncError",
    "TaskExistsError",
    "TransportError",
    "ValidationError",
    "VersionConflictError",
]

_MAX_SHOWN_VALUE = 80


def _digits(value: int) -> int:
    """How many decimal digits ``abs(value)`` has, without converting it to text."""
    count = max(1, int(abs(value).bit_length() * 0.30103))  # log10(2): never too many
    while abs(value) >= 10**count:
        count += 1
    return count


def shorten(value: object) -> str:
    """A printable, truncated form of any value; never raises.

    An integer too long for ``repr`` (Python refuses more than 4,300 digits) is shown
    by its size; a value nested too deep, or with a broken ``__repr__``, by reprlib,
    and if even that fails, by its type.
    """
    if type(value) is int and value.bit_length() > 10_000:
        return f"<an integer of {_digits(value)} digits>"
    try:
        text = repr(value)
    except Exception:  # too deep (RecursionError), an int too long, a broken __repr__
        try:
            text = reprlib.repr(value)  # depth-limited
        except Exception:  # an integer too long to print, inside a container
            text = f"<{type(value).__name__}>"
    if len(text) > _MAX_SHOWN_VALUE:
        text = text[: _MAX_SHOWN_VALUE - 3] + "..."
    return text


class ClinikError(Exception):
    """Root of every error clinik-local raises."""


@attrs.frozen
class FieldError:
    """One problem with one field of a request.

    ``path`` is the wire path (``executionPeriod.end``, ``input[1].valueString``);
    ``value`` a printable, truncated form of what was given; ``allowed`` what would
    have been accepted.
    """

    path: str
    message: str
    value: str | None = None
    allowed: str | None = None

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}"
        if self.value is not None:
            text += f" (got {self.value})"
        if self.allowed is not None:
            text += f"; allowed: {self.allowed}"
        return text


class ValidationError(ClinikError, ValueError):
    """A request, filter or argument was refused; nothing was written.

    ``errors`` holds every problem found in the request, not only the first.
    """

    def __init__(self, errors: list[FieldError] | tuple[FieldError, ...]) -> None:
        self.errors: tuple[FieldError, ...] = tuple(errors)
        count = len(self.errors)
        head = f"{count} invalid field{'s' if count != 1 else ''}: "
        super().__init__(head + "; ".join(str(e) for e in self.errors))

    @classmethod
    def single(
        cls,
        path: str,
        message: str,
        value: object = attrs.NOTHING,
        allowed: str | None = None,
    ) -> ValidationError:
        """An error about one field (``value`` omitted when it adds nothing)."""
        shown = None if value is attrs.NOTHING else shorten(value)
        return cls([FieldError(path, message, shown, allowed)])

    @property
    def paths(self) -> tuple[str, ...]:
        """The wire paths of every invalid field, in the order found."""
        return tuple(e.path for e in self.errors)


class NotFoundError(ClinikError, LookupError):
    """No task has the requested id (or it was deleted)."""


class ConflictError(ClinikError):
    """The change conflicts with the task's current state."""


class VersionConflictError(ConflictError):
    """``if_match`` named a version other than the stored one."""

    def __init__(self, task_id: str, expected: str, actual: str) -> None:
        self.task_id = task_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"task {task_id!r} is at versionId {actual!r}, not {expected!r} as if_match said; "
            "get it again and reapply the change"
        )


class TaskExistsError(ConflictError):
    """A task with that id exists, or existed and was deleted; nothing was written."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"a task with id {task_id!r} already exists (or existed and was deleted)")


class IllegalTransitionError(ConflictError, ValueError):
    """The Task lifecycle does not allow this status change."""

    def __init__(self, task_id: str, old: str, new: str, reason: str) -> None:
        self.task_id = task_id
        self.old = old
        self.new = new
        self.reason = reason
        super().__init__(f"task {task_id!r}: status {old!r} -> {new!r} is not allowed: {reason}")


class StorageError(ClinikError, OSError):
    """The SQLite file could not do what was asked."""


class StoreLockedError(StorageError, TimeoutError):
    """Another connection held the write lock longer than the busy timeout."""


class CorruptStoreError(StorageError):
    """The file is damaged, truncated, or not a SQLite database."""


class ForeignFileError(StorageError):
    """The file is a SQLite database but not a clinik-local store; it was left untouched."""


class NewerSchemaError(StorageError):
    """The file was written by a newer clinik-local; it was left untouched."""


class EncryptionKeyError(StorageError):
    """The key does not open this encrypted store (a wrong key); the file was left untouched.

    Its message never contains the key.
    """


class KeyRequiredError(EncryptionKeyError):
    """The store file is encrypted and was opened without a key; it was left untouched."""


class NotEncryptedError(StorageError):
    """A key was given for a store file that is not encrypted; it was left untouched.

    Encrypt it in place first (``store.rekey(provider)`` on a store opened without a
    key, or ``clinik-local encrypt --db PATH``), or open it without ``key=``.
    """


class EncryptionUnavailableError(StorageError):
    """The installed ``apsw`` is a build without encryption (plain ``apsw`` instead of
    ``apsw-sqlite3mc``); the message says how to repair the environment."""


class ReadOnlyStoreError(StorageError, PermissionError):
    """The file or its directory cannot be written."""


class StoreFullError(StorageError):
    """The disk, or the store's page limit, is full; the write was rolled back."""


class SyncError(ClinikError):
    """Talking to the remote clinik service failed."""


class TransportError(SyncError, ConnectionError):
    """A network, TLS or HTTP-level failure reaching the remote service."""


class AuthError(SyncError, PermissionError):
    """The remote service refused the token, also after asking the provider again."""
