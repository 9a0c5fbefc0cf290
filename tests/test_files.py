"""Store files: opening and creating them (stamps, modes, durability, odd paths), and
damaged, foreign, newer, read-only, full and locked files: each is refused with its
documented StorageError subclass, left byte for byte as it was (never deleted,
truncated or recreated), and the store stays usable where that is possible.

Read-only cases: the tests run as root, and root ignores file modes. So the open runs
in a child process that imports clinik-local as root, then drops to uid/gid 65534
(nobody) before touching the store: the kernel then enforces the modes exactly as
for any unprivileged user. Disk full is the store's page limit (``max_page_count``),
the same SQLITE_FULL a full disk gives.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from clinik_local import (
    CorruptStoreError,
    ForeignFileError,
    NewerSchemaError,
    ReadOnlyStoreError,
    StorageError,
    StoreFullError,
    StoreLockedError,
    TaskStore,
    ValidationError,
)
from clinik_local.storage.migrations import APPLICATION_ID, SCHEMA_VERSION

PAGE = 4096
TASKS = 200


def _request(n: int) -> dict[str, object]:
    return {
        "id": f"t_{n}",
        "status": "requested",
        "intent": "order",
        "patientId": f"pt_{n % 7}",
        "description": f"order {n} " + "cbc cmp " * 20,
        "input": [{"type": "lab-panel", "valueString": f"v{n}"}],
    }


@pytest.fixture(scope="module")
def store_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a closed store holding TASKS tasks (built once for the module)."""
    path = tmp_path_factory.mktemp("image") / "image.db"
    with TaskStore.open(path) as store:
        store.tasks.create_many([_request(n) for n in range(TASKS)])
    return path.read_bytes()


def _snapshot(path: Path) -> tuple[bytes, int, list[str]]:
    """What must not change: the file's bytes, its inode, and the directory's names."""
    return path.read_bytes(), path.stat().st_ino, sorted(os.listdir(path.parent))


def _use_everything(store: TaskStore) -> None:
    """Read every task several ways (raises whatever the store raises)."""
    cursor = None
    while True:
        page = (
            store.tasks.search(limit=1000, cursor=cursor)
            if cursor
            else store.tasks.search(limit=1000)
        )
        for task in page.data:
            assert task.id is not None
            store.tasks.get(task.id)
        cursor = page.meta["nextCursor"]
        if not cursor:
            break
    store.tasks.search(text="cbc", limit=5)
    store.tasks.search(patientId="pt_3", limit=5)
    store.tasks.search(input="lab-panel|v1", limit=5)


def _damage_is_reported_as_corrupt(path: Path) -> str:
    """Open the damaged file and use it; the damage must surface as CorruptStoreError
    (at open, from integrity_check, or from a read), never as another exception; a file
    refused at open is untouched. Returns where the damage surfaced."""
    before = _snapshot(path)
    try:
        store = TaskStore.open(path)
    except CorruptStoreError:
        assert _snapshot(path) == before
        return "open"
    found = ""
    with store:
        try:
            problems = store.integrity_check()
        except CorruptStoreError:
            problems = ["raised"]
        if problems:
            found = "integrity_check"
        try:
            _use_everything(store)
        except CorruptStoreError:
            found = found or "read"
    return found


@pytest.mark.parametrize("pages", ["one", "all"])
@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_over_a_page_are_reported_as_corrupt_and_nothing_else(
    tmp_path: Path, store_image: bytes, seed: int, pages: str
) -> None:
    """Random bytes over one page, or over every page but the header: the damage is
    reported as CorruptStoreError; with every page damaged the file also keeps its
    bytes and inode (a store that opens on one bad page may write to it)."""
    rng = random.Random(seed)
    damaged = bytearray(store_image)
    count = len(store_image) // PAGE
    for page in [rng.randrange(1, count)] if pages == "one" else range(1, count):
        damaged[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
    path = tmp_path / "damaged.db"
    path.write_bytes(bytes(damaged))
    before = path.read_bytes(), path.stat().st_ino
    assert _damage_is_reported_as_corrupt(path) != ""
    if pages == "all":
        assert (path.read_bytes(), path.stat().st_ino) == before


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("schema page body", lambda b: b[:100] + random.Random(1).randbytes(PAGE - 100) + b[PAGE:]),
        ("header magic", lambda b: b"SQLite format 4\x00" + b[16:]),
        ("half the file", lambda b: b[: len(b) // 2]),
        ("one page", lambda b: b[:PAGE]),
        ("fifty bytes", lambda b: b[:50]),
    ],
)
def test_truncated_or_mangled_file_is_refused_as_corrupt_and_left_as_it_was(
    tmp_path: Path, store_image: bytes, name: str, damage: Callable[[bytes], bytes]
) -> None:
    path = tmp_path / "damaged.db"
    path.write_bytes(damage(store_image))
    before = _snapshot(path)
    with pytest.raises(CorruptStoreError):
        TaskStore.open(path)
    assert _snapshot(path) == before, name


@pytest.mark.parametrize(
    "content",
    [
        b"name,dob\nJane,1970-01-01\n" * 300,
        random.Random(3).randbytes(3 * PAGE),
        b"\x00" * (2 * PAGE) + b"x",
        b"%PDF-1.7\n" + b"\xff" * 5000,
        b"Patient list, do not delete\n" * 500,
    ],
    ids=["csv", "random", "zeros", "pdf", "text"],
)
def test_a_non_sqlite_file_is_refused_as_corrupt_and_never_overwritten(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "patients.csv"
    path.write_bytes(content)
    before = _snapshot(path)
    with pytest.raises(CorruptStoreError):
        TaskStore.open(path)
    assert _snapshot(path) == before


@pytest.mark.parametrize(
    ("journal", "table"), [("delete", "patients"), ("wal", "patients"), ("wal", "tasks")]
)
def test_a_foreign_sqlite_file_is_refused_and_left_byte_for_byte(
    tmp_path: Path, journal: str, table: str
) -> None:
    """Another program's SQLite file (even one with a table named like ours)."""
    path = tmp_path / "other.db"
    conn = apsw.Connection(str(path))
    conn.pragma("journal_mode", journal)
    conn.execute(f"CREATE TABLE {table}(id TEXT PRIMARY KEY, name TEXT)")
    conn.execute(f"INSERT INTO {table} VALUES ('p1', 'Ada')")
    conn.close()
    before = _snapshot(path)
    with pytest.raises(ForeignFileError) as caught:
        TaskStore.open(path)
    assert "another program" in str(caught.value)
    assert isinstance(caught.value, StorageError)
    assert _snapshot(path) == before


def test_a_file_with_another_application_id_is_foreign_even_when_empty(tmp_path: Path) -> None:
    path = tmp_path / "stamped.db"
    conn = apsw.Connection(str(path))
    conn.pragma("application_id", 0x12345678)
    conn.close()
    before = _snapshot(path)
    with pytest.raises(ForeignFileError):
        TaskStore.open(path)
    assert _snapshot(path) == before


def test_a_newer_schema_file_is_refused_and_left_byte_for_byte(
    tmp_path: Path, store_image: bytes
) -> None:
    path = tmp_path / "newer.db"
    path.write_bytes(store_image)
    conn = apsw.Connection(str(path))
    assert conn.pragma("application_id") == APPLICATION_ID
    conn.pragma("user_version", SCHEMA_VERSION + 1)
    conn.close()
    before = _snapshot(path)
    with pytest.raises(NewerSchemaError) as caught:
        TaskStore.open(path)
    assert str(SCHEMA_VERSION + 1) in str(caught.value)
    assert "newer" in str(caught.value)
    assert "not changed" in str(caught.value)
    assert _snapshot(path) == before
    check = apsw.Connection(str(path))
    assert check.pragma("application_id") == APPLICATION_ID
    check.close()


# --- read-only file and directory, as an unprivileged user --------------------------------

_UNPRIVILEGED = r"""
import json, os, sys
from clinik_local import TaskStore, StorageError
import clinik_local.tasks, clinik_local.search, clinik_local.codec  # before the uid drop
clinik_local.codec.converter  # cattrs loads on first use: now, while the stdlib is readable
os.setgid(65534)
os.setuid(65534)
path, result = sys.argv[1], {}
try:
    store = TaskStore.open(path)
except StorageError as exc:
    result["open"] = type(exc).__name__
else:
    result["open"] = "ok"
    try:
        result["read"] = store.tasks.get("t_1").data.id
    except StorageError as exc:
        result["read"] = type(exc).__name__
    try:
        store.tasks.create({"status": "draft", "intent": "order"})
        result["write"] = "ok"
    except StorageError as exc:
        result["write"] = type(exc).__name__
    store.close()
print(json.dumps(result))
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged child can reach (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="clinik-ro-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _as_nobody(path: Path) -> dict[str, str]:
    import json

    done = subprocess.run(
        [sys.executable, "-c", _UNPRIVILEGED, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_a_read_only_file_opens_for_reading_and_refuses_writes(
    shared_dir: Path, store_image: bytes
) -> None:
    shared_dir.chmod(0o777)  # the directory is writable: only the file is read-only
    path = shared_dir / "ro.db"
    path.write_bytes(store_image)
    path.chmod(0o644)  # owned by root: read-only for nobody
    before = path.read_bytes(), path.stat().st_ino
    result = _as_nobody(path)
    assert result == {"open": "ok", "read": "t_1", "write": "ReadOnlyStoreError"}
    assert (path.read_bytes(), path.stat().st_ino) == before


@pytest.mark.parametrize("mode", [0o644, 0o666], ids=["file-read-only", "file-writable"])
def test_a_read_only_file_in_a_read_only_directory_is_refused_as_read_only(
    shared_dir: Path, store_image: bytes, mode: int
) -> None:
    """The directory is read-only for nobody; the file too, or writable by all (then
    the store still cannot make its -wal and -shm beside it)."""
    path = shared_dir / "ro.db"
    path.write_bytes(store_image)
    path.chmod(mode)
    before = _snapshot(path)
    assert _as_nobody(path) == {"open": "ReadOnlyStoreError"}
    assert _snapshot(path) == before


def test_a_new_store_in_a_read_only_directory_is_refused_and_nothing_is_created(
    shared_dir: Path,
) -> None:
    assert _as_nobody(shared_dir / "new.db") == {"open": "ReadOnlyStoreError"}
    assert os.listdir(shared_dir) == []


def test_every_storage_failure_is_a_storage_error_and_the_os_error_it_resembles() -> None:
    for cls in (
        CorruptStoreError,
        ForeignFileError,
        NewerSchemaError,
        ReadOnlyStoreError,
        StoreFullError,
        StoreLockedError,
    ):
        assert issubclass(cls, StorageError)
    assert issubclass(ReadOnlyStoreError, PermissionError)
    assert issubclass(StoreLockedError, TimeoutError)


# --- disk full ----------------------------------------------------------------------------


def _limit_pages(store: TaskStore, extra: int | None) -> None:
    with store._db.write() as conn:
        pages = int(conn.pragma("page_count"))
        conn.pragma("max_page_count", pages + extra if extra is not None else 1 << 30)


def test_a_full_store_refuses_writes_whole_and_resumes_when_space_frees(
    tmp_path: Path,
) -> None:
    with TaskStore.open(tmp_path / "full.db") as store:
        store.tasks.create_many([_request(n) for n in range(20)])
        _limit_pages(store, 3)
        written = 0
        full: StoreFullError | None = None
        for n in range(100, 200):
            try:
                store.tasks.create({**_request(n), "note": "x" * 9000})
            except StoreFullError as exc:
                full = exc
                break
            written += 1
        assert full is not None
        counts = store.table_counts()
        assert counts["tasks"] == 20 + written
        assert counts["outbox"] == counts["task_history"] == counts["tasks"]
        with pytest.raises(StoreFullError):
            store.tasks.update("t_1", {"note": "y" * 16_000})
        assert store.tasks.get("t_1").data.note is None
        with pytest.raises(StoreFullError):
            store.tasks.create_many([{**_request(n), "note": "z" * 9000} for n in range(300, 310)])
        assert store.table_counts() == counts
        assert store.tasks.count().data == 20 + written  # reads still work
        assert store.integrity_check() == []  # a refused write leaves nothing half-done
        _limit_pages(store, None)  # space frees up
        store.tasks.create({**_request(500), "note": "x" * 9000})
        store.tasks.update("t_1", {"note": "y" * 16_000})
        assert store.tasks.get("t_500").data.note == "x" * 9000
        assert store.integrity_check() == []
        again = store.tasks.create_many(
            [{**_request(n), "note": "z" * 9000} for n in range(300, 310)]
        )
        assert len(again.data) == 10  # the batch refused whole now goes in whole
    with TaskStore.open(tmp_path / "full.db") as reopened:
        assert reopened.tasks.count().data == 31 + written


# --- a lock held by another process -------------------------------------------------------

_LOCKER = r"""
import sys, apsw
conn = apsw.Connection(sys.argv[1])
conn.set_busy_timeout(5000)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO meta(key, value) VALUES ('locker', 'x')")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
print("released", flush=True)
sys.stdin.readline()
"""


def test_a_lock_held_past_the_timeout_raises_store_locked_and_writes_resume_after(
    tmp_path: Path, store_image: bytes
) -> None:
    path = tmp_path / "locked.db"
    path.write_bytes(store_image)
    with subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as locker:
        assert locker.stdin is not None
        assert locker.stdout is not None
        try:
            assert locker.stdout.readline().strip() == "locked"
            # Opening needs no write lock: it would raise StoreLockedError if it did.
            store = TaskStore.open(path, busy_timeout=0.3)
            with store:
                before = store.table_counts()
                assert store.tasks.get("t_1").data.id == "t_1"  # reads are not blocked
                started = time.perf_counter()
                with pytest.raises(StoreLockedError):
                    store.tasks.create(_request(1000))
                waited = time.perf_counter() - started
                assert 0.25 <= waited < 3.0
                with pytest.raises(StoreLockedError):
                    store.tasks.update("t_1", {"note": "n"})
                assert store.table_counts() == before
                locker.stdin.write("\n")
                locker.stdin.flush()
                assert locker.stdout.readline().strip() == "released"
                store.tasks.create(_request(1000))
                store.tasks.update("t_1", {"note": "n"})
                assert store.table_counts()["tasks"] == before["tasks"] + 1
                assert store.integrity_check() == []
        finally:
            locker.stdin.write("\n")
            locker.stdin.flush()
            locker.wait(timeout=30)
    assert issubclass(StoreLockedError, TimeoutError)


# --- file modes ---------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_store_file_and_its_wal_and_shm_are_created_0600(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "private.db"
    old = os.umask(umask)
    try:
        with TaskStore.open(path) as store:
            store.tasks.create(_request(1))
            with store.read() as conn:  # a reader holds the WAL open: both sidecars exist
                conn.execute("SELECT count(*) FROM tasks").fetchall()
                modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
    assert modes == {"private.db": 0o600, "private.db-wal": 0o600, "private.db-shm": 0o600}


# --- creating and opening -------------------------------------------------------------------


def test_new_store_file_is_created_0600_and_stamped(tmp_path: Path) -> None:
    path = tmp_path / "clinic.db"
    old_umask = os.umask(0)  # even a permissive umask must not widen it
    try:
        store = TaskStore.open(path)
    finally:
        os.umask(old_umask)
    with store:
        store.tasks.create(_request(1))
        assert store.schema_version() == SCHEMA_VERSION
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    conn = apsw.Connection(str(path))
    try:
        assert conn.pragma("application_id") == APPLICATION_ID
        assert conn.pragma("user_version") == SCHEMA_VERSION
        assert conn.pragma("journal_mode") == "wal"
    finally:
        conn.close()


def test_an_existing_empty_file_becomes_a_store(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    with TaskStore.open(path) as store:
        assert store.schema_version() == SCHEMA_VERSION


@pytest.mark.parametrize(
    "name", ["with space.db", "naïve-ünïcode-病歴.db", "semi;colon'quote.db", "no-suffix"]
)
@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_a_store_opens_at_an_odd_path_given_as_a_path_or_a_str(
    tmp_path: Path, name: str, as_str: bool
) -> None:
    path = tmp_path / name
    with TaskStore.open(str(path) if as_str else path) as store:
        store.tasks.create(_request(1))
    with TaskStore.open(path) as reopened:
        assert reopened.tasks.get("t_1").data.patient_id == "pt_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_directory_is_not_a_store(tmp_path: Path) -> None:
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(StorageError):
        TaskStore.open(tmp_path)
    assert sorted(os.listdir(tmp_path)) == before


def test_memory_stores_are_independent() -> None:
    stores = [TaskStore.open(":memory:") for _ in range(50)]
    try:
        stores[0].tasks.create(_request(1))
        assert stores[0].tasks.count().data == 1
        assert all(s.tasks.count().data == 0 for s in stores[1:])
    finally:
        for s in stores:
            s.close()


# --- durability settings ------------------------------------------------------------------


@pytest.mark.parametrize(("durability", "level"), [("normal", 1), ("full", 2)])
def test_durability_sets_synchronous_on_the_writer_and_every_reader(
    tmp_path: Path, durability: str, level: int
) -> None:
    with TaskStore.open(tmp_path / "d.db", durability=durability) as store:  # type: ignore[arg-type]
        assert store.durability == durability
        store.tasks.create(_request(1))
        with store._db.write() as conn:
            assert conn.pragma("synchronous") == level
            assert conn.pragma("journal_mode") == "wal"
        with store.read() as conn:
            assert conn.pragma("synchronous") == level


def test_durability_full_is_an_option_and_bad_options_are_refused(tmp_path: Path) -> None:
    with TaskStore.open(tmp_path / "normal.db") as store:
        assert store.durability == "normal"  # the default
    bad: dict[str, Any]
    for bad in ({"durability": "fast"}, {"busy_timeout": -1}, {"busy_timeout": "5"}):
        with pytest.raises(ValidationError) as caught:
            TaskStore.open(tmp_path / "x.db", **bad)
        assert set(caught.value.paths) & set(bad), (bad, caught.value.paths)
    assert not (tmp_path / "x.db").exists()  # refused before any file is made
