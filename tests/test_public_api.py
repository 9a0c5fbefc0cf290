"""The public surface: exactly these names are exported, and each one resolves."""

from __future__ import annotations

import subprocess
import sys

import clinik_local

#: The pinned public surface. To export a new name, add it to clinik_local.__all__ AND here.
EXPORTED = {
    # the store and its resource
    "TaskStore",
    "TasksResource",
    "KeyProvider",
    "ApiResponse",
    # the model
    "Task",
    "Period",
    "Restriction",
    "TaskInputOutput",
    "TaskVersion",
    "TaskStatus",
    "TaskIntent",
    "TaskPriority",
    "ValueKind",
    # codec and rules
    "decode_task",
    "encode_task",
    "new_task_id",
    "TEXT_LIMITS",
    "MAX_LIST_ITEMS",
    "TRANSITIONS",
    "TERMINAL",
    "can_transition",
    "transition_problem",
    # errors
    "ClinikError",
    "ValidationError",
    "FieldError",
    "NotFoundError",
    "ConflictError",
    "VersionConflictError",
    "TaskExistsError",
    "IllegalTransitionError",
    "StorageError",
    "StoreLockedError",
    "CorruptStoreError",
    "ForeignFileError",
    "NewerSchemaError",
    "ReadOnlyStoreError",
    "StoreFullError",
    "EncryptionKeyError",
    "KeyRequiredError",
    "NotEncryptedError",
    "EncryptionUnavailableError",
    "SyncError",
    "TransportError",
    "AuthError",
    # sync and the reference server
    "SyncConfig",
    "SyncStatus",
    "SyncEngine",
    "DeadLetter",
    "SyncConflict",
    "ReferenceServer",
    "Faults",
    # FHIR and asyncio
    "to_fhir",
    "from_fhir",
    "export_ndjson",
    "import_ndjson",
    "AsyncTaskStore",
    "__version__",
}


def test_all_lists_exactly_the_public_names() -> None:
    assert set(clinik_local.__all__) == EXPORTED
    assert len(clinik_local.__all__) == len(set(clinik_local.__all__))


def test_nothing_public_is_left_out_of_all() -> None:
    import types

    public = {
        name
        for name, value in vars(clinik_local).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - {"annotations", "TYPE_CHECKING"} <= EXPORTED


def test_every_exported_name_resolves() -> None:
    for name in clinik_local.__all__:
        assert getattr(clinik_local, name) is not None, name


def test_importing_the_package_does_not_load_the_network_stack() -> None:
    code = "import sys, clinik_local; print('httpx' in sys.modules, 'http.server' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == ["False", "False"]


def test_package_ships_a_py_typed_marker() -> None:
    from importlib import resources

    assert resources.files("clinik_local").joinpath("py.typed").is_file()
