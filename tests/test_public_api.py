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
    "ChangeEvent",
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
    "FhirR4Remote",
    "HapiLikeFhirServer",
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


#: What ``import clinik_local`` must not load: every public name loads on first use, so an
#: app (and every CLI call) pays only for what it touches (issue 15 item 9).
NOT_LOADED_BY_IMPORT = (
    "httpx",
    "http.server",
    "asyncio",
    "ssl",
    "argparse",
    "cattrs",
    "apsw",
    "clinik_local.fhir",
    "clinik_local.search",
    "clinik_local.store",
    "clinik_local.sync",
    "clinik_local.aio",
)


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(out.split())


def test_importing_the_package_loads_none_of_the_heavy_modules() -> None:
    loaded = _loaded_after("import clinik_local")
    assert "clinik_local" in loaded
    assert loaded.isdisjoint(NOT_LOADED_BY_IMPORT), loaded & set(NOT_LOADED_BY_IMPORT)


def test_a_public_name_loads_its_module_on_first_use() -> None:
    loaded = _loaded_after("import clinik_local; clinik_local.TaskStore")
    assert {"clinik_local.store", "apsw"} <= loaded
    assert loaded.isdisjoint({"httpx", "asyncio", "clinik_local.fhir", "cattrs"})


def test_the_cli_version_loads_neither_the_store_nor_the_codec() -> None:
    loaded = _loaded_after(
        "import contextlib, io, clinik_local.cli as c\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):"
        " c.main(['--version'])"
    )
    assert "clinik_local.cli" in loaded
    assert loaded.isdisjoint({"clinik_local.store", "clinik_local.codec", "cattrs", "apsw"})


def test_star_import_gives_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from clinik_local import *", namespace)
    assert set(clinik_local.__all__) <= set(namespace)


def test_package_ships_a_py_typed_marker() -> None:
    from importlib import resources

    assert resources.files("clinik_local").joinpath("py.typed").is_file()
