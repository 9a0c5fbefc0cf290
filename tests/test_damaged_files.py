"""Damaged, foreign, full, locked and read-only store files.

Each case uses a real file in ``tmp_path`` and checks three things: the specific
documented :class:`StorageError` subclass is raised (never another exception type),
the file's bytes are exactly as they were, and the library did not delete, truncate or
recreate it. Where the store can stay usable (a page limit raised, a lock released)
writes resume.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from clinik_local import TaskStore
from clinik_local.errors import (
    CorruptStoreError,
    ForeignFileError,
    NewerSchemaError,
    ReadOnlyStoreError,
    StorageError,
    StoreFullError,
    StoreLockedError,
)
from clinik_local.storage.migrations import APPLICATION_ID, SCHEMA_VERSION

PAGE_SIZE_OFFSET = 16


def _request(n: int, description: str = "") -> dict[str, object]:
    return {
        "status": "requested",
        "intent": "order",
        "code": "lab-order",
        "patientId": f"pt_{n % 7}",
        "description": description or f"task {n}",
    }


def _populated_store(path: Path, tasks: int = 60) -> None:
    """A valid store with some tasks, checkpointed so the main file holds everything."""
    with TaskStore.open(path) as store:
        store.tasks.create_many([_request(n, "x" * 400) for n in range(tasks)])
    conn = apsw.Connection(str(path))
    conn.pragma("wal_checkpoint", "TRUNCATE")
    conn.close()
    for suffix in ("-wal", "-shm"):
        assert not Path(f"{path}{suffix}").exists() or Path(f"{path}{suffix}").stat().st_size == 0


def _snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_ino


def _assert_untouched(path: Path, before: tuple[bytes, int]) -> None:
    assert path.exists(), "the library deleted the file"
    data, inode = before
    assert path.stat().st_ino == inode, "the library recreated the file"
    assert path.stat().st_size == len(data), "the library changed the file's length"
    assert path.read_bytes() == data, "the library changed the file's bytes"


def _expect_corrupt(path: Path) -> None:
    """Opening, a full search or integrity_check reports the damage as CorruptStoreError.

    A store that opens must either raise CorruptStoreError on reading every task or
    report problems from ``integrity_check``; any other exception type fails the test.
    """
    try:
        store = TaskStore.open(path)
    except CorruptStoreError:
        return
    try:
        raised = False
        try:
            cursor: object = None
            while True:
                page = store.tasks.search(limit=1000, cursor=cursor)
                cursor = page.meta["nextCursor"]
                if cursor is None:
                    break
        except CorruptStoreError:
            raised = True
        try:
            problems = store.integrity_check()
        except CorruptStoreError:
            raised = True
            problems = []
        assert raised or problems, "damage went unreported"
    finally:
        store.close()


def test_random_bytes_over_pages_raise_corrupt_store_error_and_leave_file_unchanged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "clinic.db"
    _populated_store(path)
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[PAGE_SIZE_OFFSET : PAGE_SIZE_OFFSET + 2], "big")
    pages = len(data) // page_size
    assert pages > 4
    rng = random.Random(7)
    for page in range(1, pages):  # every page but the header page
        start = page * page_size
        data[start : start + page_size] = rng.randbytes(page_size)
    path.write_bytes(bytes(data))
    before = _snapshot(path)
    _expect_corrupt(path)
    _assert_untouched(path, before)


def test_truncated_file_raises_corrupt_store_error_and_is_not_shortened_further(
    tmp_path: Path,
) -> None:
    path = tmp_path / "clinic.db"
    _populated_store(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = _snapshot(path)
    _expect_corrupt(path)
    _assert_untouched(path, before)


def test_non_sqlite_file_raises_corrupt_store_error_and_is_left_as_it_was(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"Patient list, do not delete\n" * 500)
    before = _snapshot(path)
    with pytest.raises(CorruptStoreError):
        TaskStore.open(path)
    _assert_untouched(path, before)


def test_foreign_sqlite_file_raises_foreign_file_error_and_is_left_as_it_was(
    tmp_path: Path,
) -> None:
    path = tmp_path / "other.db"
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE patients(id TEXT PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO patients VALUES ('p1', 'Ada')")
    conn.close()
    before = _snapshot(path)
    with pytest.raises(ForeignFileError):
        TaskStore.open(path)
    _assert_untouched(path, before)


def test_file_of_newer_schema_raises_newer_schema_error_and_is_left_as_it_was(
    tmp_path: Path,
) -> None:
    path = tmp_path / "clinic.db"
    _populated_store(path, tasks=3)
    conn = apsw.Connection(str(path))
    assert conn.pragma("application_id") == APPLICATION_ID
    conn.pragma("user_version", SCHEMA_VERSION + 1)
    conn.close()
    before = _snapshot(path)
    with pytest.raises(NewerSchemaError):
        TaskStore.open(path)
    _assert_untouched(path, before)


def test_page_limit_full_raises_store_full_error_writes_nothing_and_resumes_when_raised(
    tmp_path: Path,
) -> None:
    path = tmp_path / "clinic.db"
    with TaskStore.open(path) as store:
        store.tasks.create(_request(0))
        counts = store.table_counts()
        with store._db.write() as conn:
            pages = int(conn.pragma("page_count"))
            conn.pragma("max_page_count", pages + 2)
        big = [_request(n, "d" * 16000) for n in range(40)]
        with pytest.raises(StoreFullError):
            store.tasks.create_many(big)
        assert store.table_counts() == counts
        assert store.integrity_check() == []
        with store._db.write() as conn:
            conn.pragma("max_page_count", 1_000_000)
        created = store.tasks.create_many(big).data
        assert len(created) == 40
        assert store.tasks.count().data == 41
    with TaskStore.open(path) as store:
        assert store.tasks.count().data == 41


LOCK_HOLDER = textwrap.dedent(
    """
    import sys, apsw
    conn = apsw.Connection(sys.argv[1])
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("ROLLBACK")
    conn.close()
    print("released", flush=True)
    """
)


def test_write_lock_held_by_another_process_raises_store_locked_error_then_writes_resume(
    tmp_path: Path,
) -> None:
    path = tmp_path / "clinic.db"
    with TaskStore.open(path) as store:
        store.tasks.create(_request(0))
    with TaskStore.open(path, busy_timeout=0.2) as store:
        with subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            try:
                assert child.stdout is not None
                assert child.stdin is not None
                assert child.stdout.readline().strip() == "locked"
                counts = store.table_counts()
                with pytest.raises(StoreLockedError):
                    store.tasks.create(_request(1))
                # Readers are not blocked by the other process's write lock.
                assert store.tasks.count().data == 1
                assert store.table_counts() == counts
                child.stdin.write("\n")
                child.stdin.flush()
                assert child.stdout.readline().strip() == "released"
                assert child.wait(timeout=30) == 0
            finally:
                if child.poll() is None:
                    child.kill()
        store.tasks.create(_request(2))
        assert store.tasks.count().data == 2


AS_NOBODY = textwrap.dedent(
    """
    import os, sys
    import clinik_local.tasks
    from clinik_local import TaskStore
    os.setuid(65534)  # after the imports: the interpreter lives under /root
    try:
        store = TaskStore.open(sys.argv[1])
        try:
            store.tasks.create({"status": "requested", "intent": "order"})
        finally:
            store.close()
    except Exception as exc:
        print(type(exc).__name__)
    else:
        print("no error")
    """
)


def _run_as_nobody(path: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory (mode 0755, owned by root) that uid 65534 can reach.

    pytest's ``tmp_path`` sits under a 0700 directory nobody else may enter.
    """
    assert os.geteuid() == 0, "these cases drop to uid 65534 and need to start as root"
    base = Path(tempfile.mkdtemp(prefix="clinik-ro-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def test_read_only_file_raises_read_only_store_error_and_is_left_as_it_was(
    shared_dir: Path,
) -> None:
    directory = shared_dir / "ro_file"
    directory.mkdir()
    directory.chmod(0o777)  # the directory is writable: only the file is not
    path = directory / "clinic.db"
    _populated_store(path, tasks=3)
    path.chmod(0o644)
    before = _snapshot(path)
    name = _run_as_nobody(path)
    assert name == ReadOnlyStoreError.__name__
    _assert_untouched(path, before)


def test_read_only_directory_raises_read_only_store_error_and_leaves_file_as_it_was(
    shared_dir: Path,
) -> None:
    directory = shared_dir / "ro_dir"
    directory.mkdir()
    path = directory / "clinic.db"
    _populated_store(path, tasks=3)
    path.chmod(0o666)  # the file is writable: only the directory is not
    directory.chmod(0o755)
    before = _snapshot(path)
    name = _run_as_nobody(path)
    assert name == ReadOnlyStoreError.__name__
    _assert_untouched(path, before)


def test_new_store_in_read_only_directory_raises_read_only_store_error_and_creates_nothing(
    shared_dir: Path,
) -> None:
    directory = shared_dir / "ro_new"
    directory.mkdir()
    directory.chmod(0o755)
    name = _run_as_nobody(directory / "clinic.db")
    assert name == ReadOnlyStoreError.__name__
    assert list(directory.iterdir()) == []


def test_new_store_file_is_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "clinic.db"
    with TaskStore.open(path) as store:
        store.tasks.create(_request(0))
    assert path.stat().st_mode & 0o777 == 0o600


def test_every_storage_failure_class_is_a_storage_error() -> None:
    for cls in (
        CorruptStoreError,
        ForeignFileError,
        NewerSchemaError,
        ReadOnlyStoreError,
        StoreFullError,
        StoreLockedError,
    ):
        assert issubclass(cls, StorageError)
