"""Issue 3: one error tree rooted at ClinikError, as documented, and nothing else escapes."""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import apsw
import pytest

import clinik_local
from clinik_local import (
    ClinikError,
    CorruptStoreError,
    FieldError,
    NotFoundError,
    StorageError,
    StoreLockedError,
    TaskStore,
    ValidationError,
    decode_task,
    errors,
)
from tests.strategies import minimal_request

_LINE = re.compile(r"^(?P<indent>[ │]*)[├└]── (?P<name>\w+)(?:\((?P<builtin>\w+)\))?")


def _documented_tree() -> dict[str, tuple[str, str | None]]:
    """``name -> (documented parent, documented builtin)`` from the errors module docstring."""
    doc = errors.__doc__ or ""
    tree: dict[str, tuple[str, str | None]] = {}
    stack = ["ClinikError"]
    for line in doc.splitlines():
        match = _LINE.match(line.removeprefix("    "))
        if match is None:
            continue
        depth = len(match["indent"]) // 4
        del stack[depth + 1 :]
        tree[match["name"]] = (stack[depth], match["builtin"])
        stack.append(match["name"])
    return tree


def test_the_documented_tree_names_every_error_class() -> None:
    documented = set(_documented_tree())
    classes = {
        name
        for name in errors.__all__
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), Exception)
    }
    assert documented == classes - {"ClinikError"}
    assert len(documented) >= 15


@pytest.mark.parametrize("name", sorted(_documented_tree()))
def test_each_error_class_has_the_documented_parent_and_builtin(name: str) -> None:
    parent, builtin = _documented_tree()[name]
    cls = getattr(errors, name)
    library_bases = [b for b in cls.__bases__ if issubclass(b, ClinikError)]
    builtin_bases = [b for b in cls.__bases__ if not issubclass(b, ClinikError)]
    assert [b.__name__ for b in library_bases] == [parent]
    if builtin is None:
        assert builtin_bases == []
    else:
        assert builtin_bases == [getattr(builtins, builtin)]


def test_errors_inherit_the_builtins_they_resemble() -> None:
    assert issubclass(clinik_local.ValidationError, ValueError)
    assert issubclass(clinik_local.NotFoundError, LookupError)
    assert issubclass(clinik_local.IllegalTransitionError, clinik_local.ConflictError)
    assert issubclass(clinik_local.IllegalTransitionError, ValueError)
    assert issubclass(clinik_local.StorageError, OSError)
    assert issubclass(clinik_local.StoreLockedError, TimeoutError)
    assert issubclass(clinik_local.ReadOnlyStoreError, PermissionError)
    assert issubclass(clinik_local.TransportError, ConnectionError)
    assert issubclass(clinik_local.AuthError, PermissionError)


def test_every_exported_exception_is_rooted_at_clinik_error() -> None:
    exported = [getattr(clinik_local, n) for n in clinik_local.__all__]
    exceptions = [o for o in exported if isinstance(o, type) and issubclass(o, BaseException)]
    assert len(exceptions) >= 15
    assert all(issubclass(e, ClinikError) for e in exceptions)


def test_validation_error_items_carry_path_message_value_and_allowed() -> None:
    error = ValidationError([FieldError("input[1].valueString", "expected a string", "5", "text")])
    assert error.paths == ("input[1].valueString",)
    assert (
        str(error)
        == "1 invalid field: input[1].valueString: expected a string (got 5); allowed: text"
    )
    single = ValidationError.single("priority", "is not an allowed value", "x" * 200, "routine")
    (item,) = single.errors
    assert item.value is not None
    assert len(item.value) <= 80


def test_missing_task_is_catchable_as_lookup_error() -> None:
    with TaskStore.open(":memory:") as store, pytest.raises(LookupError) as caught:
        store.tasks.get("task_missing")
    assert isinstance(caught.value, NotFoundError)


# --- no apsw or cattrs exception escapes the public API ---------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        {("tuple", "key"): 1},
        {"status": "draft", "intent": "order", 5: "int key"},
        {"status": "draft", "intent": "order", "basedOn": {"a", "b"}},
        {"status": "draft", "intent": "order", "input": [None, 3, "x"]},
        {"status": "draft", "intent": "order", "restriction": [1]},
        {"status": "draft", "intent": "order", "executionPeriod": {1: 2}},
        {"status": object(), "intent": object()},
    ],
)
def test_odd_inputs_raise_validation_error_never_a_cattrs_error(request_: object) -> None:
    with pytest.raises(ClinikError) as caught:
        decode_task(request_)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValidationError)
    assert "cattrs" not in type(caught.value).__module__


def test_a_damaged_file_is_a_corrupt_store_error_not_an_apsw_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database, just text that a user renamed" * 100)
    before = path.read_bytes()
    with pytest.raises(CorruptStoreError) as caught:
        TaskStore.open(path)
    assert not isinstance(caught.value, apsw.Error)
    assert path.read_bytes() == before


def test_a_writer_blocked_past_the_busy_timeout_gets_store_locked_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    with TaskStore.open(path, busy_timeout=0.05) as store:
        blocker = apsw.Connection(str(path))
        blocker.execute("BEGIN IMMEDIATE")
        try:
            before = store.table_counts()
            with pytest.raises(StoreLockedError) as caught:
                store.tasks.create(minimal_request())
            assert isinstance(caught.value, TimeoutError)
            assert isinstance(caught.value, StorageError)
            assert not isinstance(caught.value, apsw.Error)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert store.table_counts() == before
        store.tasks.create(minimal_request())  # usable again once the lock is gone
        assert store.tasks.count().data == 1


def test_a_closed_store_raises_storage_error() -> None:
    store = TaskStore.open(":memory:")
    store.close()
    with pytest.raises(StorageError):
        store.tasks.get("task_x")
    with pytest.raises(StorageError):
        store.tasks.search()
