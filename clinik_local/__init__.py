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

if TYPE_CHECKING:
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
    from .events import ChangeEvent
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
    from .remotes.fhir import FhirR4Remote
    from .storage.encryption import KeyProvider
    from .store import TaskStore
    from .sync import DeadLetter, SyncConfig, SyncConflict, SyncEngine, SyncStatus
    from .tasks import TasksResource
    from .testing.fhir_server import HapiLikeFhirServer
    from .testing.server import Faults, ReferenceServer

# Every public name loads on first use (PEP 562), from the module that defines it, so
# `import clinik_local` costs almost nothing and a program (the CLI, an app that never
# syncs, uses asyncio or FHIR) pays only for the modules it touches: asyncio, cattrs,
# httpx, http.server and apsw are loaded by the calls that need them.
_MODULE_OF = {
    "AsyncTaskStore": "aio",
    **dict.fromkeys(("MAX_LIST_ITEMS", "TEXT_LIMITS", "decode_task", "encode_task"), "codec"),
    **dict.fromkeys(
        (
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
        ),
        "errors",
    ),
    **dict.fromkeys(("export_ndjson", "from_fhir", "import_ndjson", "to_fhir"), "fhir"),
    "new_task_id": "ids",
    "ChangeEvent": "events",
    **dict.fromkeys(
        ("TERMINAL", "TRANSITIONS", "can_transition", "transition_problem"), "lifecycle"
    ),
    **dict.fromkeys(
        (
            "ApiResponse",
            "Period",
            "Restriction",
            "Task",
            "TaskInputOutput",
            "TaskIntent",
            "TaskPriority",
            "TaskStatus",
            "TaskVersion",
            "ValueKind",
        ),
        "model",
    ),
    "FhirR4Remote": "remotes.fhir",
    "KeyProvider": "storage.encryption",
    "TaskStore": "store",
    **dict.fromkeys(
        ("DeadLetter", "SyncConfig", "SyncConflict", "SyncEngine", "SyncStatus"), "sync"
    ),
    "TasksResource": "tasks",
    **dict.fromkeys(("Faults", "ReferenceServer"), "testing.server"),
    "HapiLikeFhirServer": "testing.fhir_server",
}


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'clinik_local' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"

__all__ = [
    "MAX_LIST_ITEMS",
    "TERMINAL",
    "TEXT_LIMITS",
    "TRANSITIONS",
    "ApiResponse",
    "AsyncTaskStore",
    "AuthError",
    "ChangeEvent",
    "ClinikError",
    "ConflictError",
    "CorruptStoreError",
    "DeadLetter",
    "EncryptionKeyError",
    "EncryptionUnavailableError",
    "Faults",
    "FhirR4Remote",
    "FieldError",
    "ForeignFileError",
    "HapiLikeFhirServer",
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
