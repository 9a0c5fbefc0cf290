"""clinik-local: clinik Tasks in a local SQLite file, synced through a transactional outbox.

Everything a user may touch is exported here; every other name is private.

>>> from clinik_local import TaskStore
>>> with TaskStore.open(":memory:") as store:
...     task = store.tasks.create({"status": "requested", "intent": "order"}).data
...     store.tasks.get(task.id).data.status.value
'requested'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .aio import AsyncTaskStore
from .codec import MAX_LIST_ITEMS, TEXT_LIMITS, decode_task, encode_task
from .errors import (
    AuthError,
    ClinikError,
    ConflictError,
    CorruptStoreError,
    EncryptionKeyError,
    EncryptionUnavailableError,
    FieldError,
    ForeignFileError,
    IllegalTransitionError,
    KeyRequiredError,
    NewerSchemaError,
    NotEncryptedError,
    NotFoundError,
    ReadOnlyStoreError,
    StorageError,
    StoreFullError,
    StoreLockedError,
    SyncError,
    TaskExistsError,
    TransportError,
    ValidationError,
    VersionConflictError,
)
from .fhir import export_ndjson, from_fhir, import_ndjson, to_fhir
from .ids import new_task_id
from .lifecycle import TERMINAL, TRANSITIONS, can_transition, transition_problem
from .model import (
    ApiResponse,
    Period,
    Restriction,
    Task,
    TaskInputOutput,
    TaskIntent,
    TaskPriority,
    TaskStatus,
    TaskVersion,
    ValueKind,
)
from .storage.encryption import KeyProvider
from .store import TaskStore
from .tasks import TasksResource

if TYPE_CHECKING:
    from .sync import DeadLetter, SyncConfig, SyncConflict, SyncEngine, SyncStatus
    from .testing.server import Faults, ReferenceServer

# Sync and the reference server pull in httpx and http.server; they load on first use
# so that `import clinik_local` stays cheap for apps (and test suites) that never sync.
_LAZY = {
    "DeadLetter": "sync",
    "SyncConfig": "sync",
    "SyncConflict": "sync",
    "SyncEngine": "sync",
    "SyncStatus": "sync",
    "Faults": "testing.server",
    "ReferenceServer": "testing.server",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clinik_local' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "MAX_LIST_ITEMS",
    "TERMINAL",
    "TEXT_LIMITS",
    "TRANSITIONS",
    "ApiResponse",
    "AsyncTaskStore",
    "AuthError",
    "ClinikError",
    "ConflictError",
    "CorruptStoreError",
    "DeadLetter",
    "EncryptionKeyError",
    "EncryptionUnavailableError",
    "Faults",
    "FieldError",
    "ForeignFileError",
    "IllegalTransitionError",
    "KeyProvider",
    "KeyRequiredError",
    "NewerSchemaError",
    "NotEncryptedError",
    "NotFoundError",
    "Period",
    "ReadOnlyStoreError",
    "ReferenceServer",
    "Restriction",
    "StorageError",
    "StoreFullError",
    "StoreLockedError",
    "SyncConfig",
    "SyncConflict",
    "SyncEngine",
    "SyncError",
    "SyncStatus",
    "Task",
    "TaskExistsError",
    "TaskInputOutput",
    "TaskIntent",
    "TaskPriority",
    "TaskStatus",
    "TaskStore",
    "TaskVersion",
    "TasksResource",
    "TransportError",
    "ValidationError",
    "ValueKind",
    "VersionConflictError",
    "__version__",
    "can_transition",
    "decode_task",
    "encode_task",
    "export_ndjson",
    "from_fhir",
    "import_ndjson",
    "new_task_id",
    "to_fhir",
    "transition_problem",
]
