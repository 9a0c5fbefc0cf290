"""Encryption at rest (issue 14): keyed connections, refusals that leave the file alone,
no patient text on disk, authenticated pages, rekey (exclusive, crash-safe), the CLI."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from clinik_local import (
    CorruptStoreError,
    EncryptionKeyError,
    EncryptionUnavailableError,
    KeyRequiredError,
    NotEncryptedError,
    ReferenceServer,
    StorageError,
    StoreLockedError,
    SyncConfig,
    TaskStore,
    ValidationError,
    cli,
    export_ndjson,
)
from clinik_local.demo import SEED_LAB_ORDER
from clinik_local.storage import connection
from clinik_local.storage.encryption import file_kind
from clinik_local.testing.pytest_plugin import TaskFactory

ROOT = Path(__file__).resolve().parent.parent
#: A key no code path has any business printing: scanned for everywhere.
SENTINEL = "sentinel-key-7f3a9c-do-not-print"
SECRETS = (
    SENTINEL.encode(),
    SENTINEL.encode().hex().encode(),
    SENTINEL.encode().hex().upper().encode(),
)
#: The seed lab order's patient text, which must never be on disk in the clear.
PATIENT_TEXT = (
    SEED_LAB_ORDER["patientId"],
    SEED_LAB_ORDER["note"],
    SEED_LAB_ORDER["description"],
    SEED_LAB_ORDER["encounterId"],
)
SUFFIXES = ("", "-wal", "-shm", "-journal")


def key(text: str = SENTINEL) -> Callable[[], str]:
    """A provider whose repr shows the key (a functools.partial): a leak would show."""
    return functools.partial(str, text)


def files_of(path: Path) -> dict[str, bytes]:
    """The store file and its companions, as bytes (those that exist)."""
    found = {}
    for suffix in SUFFIXES:
        file = Path(str(path) + suffix)
        if file.exists():
            found[suffix or "main"] = file.read_bytes()
    return found


def hashes(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files_of(path).items()}


def assert_no_secret(text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for secret in SECRETS:
        assert secret not in data


@pytest.fixture
def encrypted(tmp_path: Path) -> Iterator[TaskStore]:
    with TaskStore.open(tmp_path / "e.db", key=key()) as store:
        yield store


def _make_store(path: Path, provider: Callable[[], str] | None, tasks: int = 20) -> list[str]:
    with TaskStore.open(path, key=provider) as store:
        store.tasks.create(SEED_LAB_ORDER)
        store.tasks.create_many(TaskFactory().many(tasks - 1))
        return [str(t.id) for t in store.tasks.search(limit=1000).data]


# --- no patient text, and no key, on disk -------------------------------------------------


def test_no_patient_text_in_the_file_wal_or_shm_after_writes_and_after_a_checkpoint(
    tmp_path: Path,
) -> None:
    path = tmp_path / "e.db"
    plain = tmp_path / "p.db"
    for target, provider in ((path, key()), (plain, None)):
        with TaskStore.open(target, key=provider) as store:
            lab = store.tasks.create(SEED_LAB_ORDER).data
            store.tasks.update(str(lab.id), {"status": "accepted", "ownerId": "prac_lab_tech"})
            store.tasks.create_many(TaskFactory().many(50))
            on_disk = files_of(target)
            assert "-wal" in on_disk
            if provider is not None:
                for name, data in on_disk.items():
                    for text in PATIENT_TEXT:
                        assert text.encode() not in data, (name, text)
                    assert_no_secret(data)
                with store.read() as conn:
                    conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
                for name, data in files_of(target).items():
                    for text in PATIENT_TEXT:
                        assert text.encode() not in data, (name, text)
            else:  # the scan can fail: the plaintext store shows the same text
                assert any(SEED_LAB_ORDER["note"].encode() in data for data in on_disk.values())
    assert file_kind(str(path)) == "encrypted"
    assert file_kind(str(plain)) == "plain"


def test_the_key_is_never_in_a_repr_status_log_record_or_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "e.db"
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        with TaskStore.open(path, key=key(), busy_timeout=0.2) as store:
            store.tasks.create(SEED_LAB_ORDER)
            texts += [repr(store), repr(store._db.options), str(store.table_counts())]
            texts.append(repr(store.integrity_check()))
            other = key("another-key")
            store.rekey(other)
            store.rekey(key())
            texts.append(repr(store))
        for provider, error in (
            (key("wrong"), EncryptionKeyError),
            (None, KeyRequiredError),
        ):
            with pytest.raises(error) as info:
                TaskStore.open(path, key=provider)
            texts += [str(info.value), repr(info.value)]
        with pytest.raises(ValidationError) as bad:
            TaskStore.open(path, key=SENTINEL)  # type: ignore[arg-type]
        texts += [str(bad.value), repr(bad.value.errors)]
        with pytest.raises(ValidationError) as memory:
            TaskStore.open(":memory:", key=key())
        texts.append(str(memory.value))
        plain = tmp_path / "p.db"
        TaskStore.open(plain).close()
        with pytest.raises(NotEncryptedError) as not_enc:
            TaskStore.open(plain, key=key())
        texts.append(str(not_enc.value))
    texts += [record.getMessage() for record in caplog.records]
    for text in texts:
        assert_no_secret(text)
    for data in files_of(path).values():
        assert_no_secret(data)


def test_the_sync_status_of_an_encrypted_store_shows_no_key(tmp_path: Path) -> None:
    with ReferenceServer(token="t") as server:
        config = SyncConfig(base_url=server.url, token_provider=lambda: "t", timeout=5.0)
        with TaskStore.open(tmp_path / "s.db", key=key(), sync=config) as store:
            store.tasks.create(SEED_LAB_ORDER)
            assert store.sync.flush(timeout=20)
            status = store.sync.status()
            assert status.pending == 0
            assert_no_secret(repr(status))
            assert_no_secret(repr(store.sync))


# --- the key on every connection ---------------------------------------------------------


def test_every_connection_role_is_keyed_before_its_first_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def after_key(conn: apsw.Connection, opening: connection.Opening) -> None:
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()  # keyed, or it raises
        seen.append(opening.role)

    steps = list(connection.SETUP)
    assert [s.run for s in steps[:2]] == [connection.set_busy_timeout, connection.apply_key]
    steps.insert(2, connection.Step(after_key, memory=False))
    monkeypatch.setattr(connection, "SETUP", tuple(steps))
    with (
        caplog.at_level(logging.WARNING, "clinik_local"),
        TaskStore.open(tmp_path / "e.db", key=key()) as store,
    ):
        store.tasks.create_many(TaskFactory().many(300))
        worker = threading.Thread(target=lambda: store.tasks.count())
        worker.start()
        worker.join()
        checkpointer = store._db._checkpointer
        assert checkpointer is not None
        checkpointer._ensure_thread()
        checkpointer._wake.set()
        deadline = time.monotonic() + 10
        while "checkpointer" not in seen:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        store.rekey(key("second"))  # its private copy is opened as a "backup" connection
        assert store.tasks.count().data == 300
    assert {"writer", "reader", "checkpointer", "backup"} <= set(seen)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_readers_of_other_threads_and_the_checkpointer_work_on_an_encrypted_store(
    encrypted: TaskStore,
) -> None:
    created = encrypted.tasks.create_many(TaskFactory().many(40)).data
    results: list[int] = []

    def read() -> None:
        results.append(len(encrypted.tasks.search(limit=100).data))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [len(created)] * 4


# --- refusals leave the file alone ---------------------------------------------------------


@pytest.fixture
def encrypted_file_with_wal(tmp_path: Path) -> Iterator[Path]:
    """An encrypted store left with a -wal and -shm: a second connection keeps them."""
    path = tmp_path / "e.db"
    _make_store(path, key())
    holder = TaskStore.open(path, key=key())
    holder.tasks.create(SEED_LAB_ORDER)
    try:
        yield path
    finally:
        holder.close()


@pytest.mark.parametrize(
    ("provider", "error"),
    [
        (key("a wrong key"), EncryptionKeyError),
        (lambda: b"\x00" * 32, EncryptionKeyError),
        (None, KeyRequiredError),
    ],
    ids=["wrong-passphrase", "wrong-bytes", "no-key"],
)
def test_a_wrong_or_missing_key_is_refused_and_the_files_are_byte_for_byte_unchanged(
    encrypted_file_with_wal: Path, provider: Callable[[], str | bytes] | None, error: type
) -> None:
    path = encrypted_file_with_wal
    before = hashes(path)
    assert {"main", "-wal", "-shm"} <= set(before)
    with pytest.raises(error) as info:
        TaskStore.open(path, key=provider)
    assert isinstance(info.value, EncryptionKeyError)
    assert isinstance(info.value, StorageError)
    assert "not changed" in str(info.value)
    assert hashes(path) == before


def test_a_plaintext_store_opened_with_a_key_is_refused_and_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    _make_store(path, None)
    before = hashes(path)
    with pytest.raises(NotEncryptedError, match="plaintext") as info:
        TaskStore.open(path, key=key())
    assert not isinstance(info.value, EncryptionKeyError)
    assert "encrypt" in str(info.value)
    assert hashes(path) == before


def test_a_non_database_file_is_corrupt_with_or_without_a_key(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(random.Random(3).randbytes(8192))
    before = hashes(path)
    for provider in (None, key()):
        with pytest.raises(CorruptStoreError):
            TaskStore.open(path, key=provider)
    assert hashes(path) == before


def test_a_flipped_byte_in_an_encrypted_page_is_corrupt_never_wrong_data(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    _make_store(path, key(), tasks=200)
    with TaskStore.open(path, key=key()) as store:
        original = _dump(store)
    data = path.read_bytes()
    page = 4096
    pages = len(data) // page
    assert pages > 10
    tested = random.Random(5).sample(range(1, pages), 12)  # page 0 (the header) excluded
    refused = 0
    for index in tested:
        flipped = bytearray(data)
        flipped[index * page + 100] ^= 0x01
        path.write_bytes(bytes(flipped))
        try:
            with TaskStore.open(path, key=key()) as store:
                problems = store.integrity_check()
                found = _dump(store)
        except CorruptStoreError:
            refused += 1
            continue
        # Not refused: the damaged page is one the dump does not read (an index), and
        # the check names it; everything that was read is authentic.
        assert problems
        assert found == original
    assert refused >= len(tested) // 2


def test_provider_mistakes_are_clear_errors_without_the_value(tmp_path: Path) -> None:
    path = tmp_path / "e.db"

    def failing() -> str:
        raise RuntimeError("keychain locked")

    with pytest.raises(EncryptionKeyError, match="RuntimeError"):
        TaskStore.open(path, key=failing)
    for returned in ("", b"", 42):
        with pytest.raises(ValidationError) as info:
            TaskStore.open(path, key=lambda value=returned: value)  # type: ignore[misc]
        assert info.value.paths == ("key",)
    with pytest.raises(ValidationError) as info:
        TaskStore.open(path, key=b"raw bytes, not a callable")  # type: ignore[arg-type]
    assert "raw bytes" not in str(info.value)


def test_a_key_for_a_memory_store_is_a_validation_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        TaskStore.open(":memory:", key=key())
    assert info.value.paths == ("key",)
    with TaskStore.open(":memory:") as store, pytest.raises(ValidationError):
        store.rekey(key())


def test_plain_apsw_without_ciphers_says_how_to_repair_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(apsw, "mc_version")
    with pytest.raises(EncryptionUnavailableError, match="pip install") as info:
        TaskStore.open(tmp_path / "e.db", key=key())
    assert "apsw-sqlite3mc" in str(info.value)
    with TaskStore.open(tmp_path / "p.db") as store:  # plaintext stores keep working
        store.tasks.create(SEED_LAB_ORDER)
        with pytest.raises(EncryptionUnavailableError):
            store.rekey(key())
        assert store.tasks.count().data == 1


# --- rekey -------------------------------------------------------------------------------------


def _dump(store: TaskStore) -> dict[str, list[tuple[Any, ...]]]:
    tables = ("tasks", "task_history", "outbox", "task_sync", "meta")
    with store.read() as conn:
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def test_encrypt_rekey_and_decrypt_in_place_keep_every_row(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _make_store(path, None, tasks=30)
    with TaskStore.open(path) as store:
        before = _dump(store)
        store.rekey(key("first"))
        assert store.encrypted
        assert file_kind(str(path)) == "encrypted"
        assert _dump(store) == before
        store.tasks.create(SEED_LAB_ORDER)  # the store goes on working, with the new key
        before = _dump(store)
    with TaskStore.open(path, key=key("first")) as store:
        store.rekey(key("second"))
        assert _dump(store) == before
    with pytest.raises(EncryptionKeyError):
        TaskStore.open(path, key=key("first"))
    with TaskStore.open(path, key=key("second")) as store:
        store.rekey(None)
        assert not store.encrypted
    assert file_kind(str(path)) == "plain"
    with TaskStore.open(path) as store:
        assert _dump(store) == before
    assert not Path(str(path) + ".rekey-tmp").exists()
    assert (path.stat().st_mode & 0o777) == 0o600


def test_rekey_closes_idle_readers_of_other_threads_which_reopen_with_the_new_key(
    encrypted: TaskStore,
) -> None:
    encrypted.tasks.create(SEED_LAB_ORDER)
    go, done = threading.Event(), threading.Event()
    counts: list[int] = []

    def reader() -> None:
        counts.append(encrypted.tasks.count().data)  # opens this thread's reader
        go.wait()
        counts.append(encrypted.tasks.count().data)  # after the rekey: reopened
        done.set()

    thread = threading.Thread(target=reader, name="ward-reader")
    thread.start()
    while not counts:
        time.sleep(0.005)
    encrypted.rekey(key("next"))
    go.set()
    thread.join()
    assert counts == [1, 1]


def test_rekey_waits_for_a_busy_reader_then_refuses_naming_its_thread(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    with TaskStore.open(path, key=key(), busy_timeout=0.3) as store:
        store.tasks.create(SEED_LAB_ORDER)
        inside, release = threading.Event(), threading.Event()

        def long_read() -> None:
            with store.read():
                inside.set()
                release.wait()

        thread = threading.Thread(target=long_read, name="report-export")
        thread.start()
        inside.wait()
        before = hashes(path)
        try:
            with pytest.raises(StoreLockedError, match="report-export"):
                store.rekey(key("next"))
        finally:
            release.set()
            thread.join()
        assert hashes(path)["main"] == before["main"]
        assert store.tasks.count().data == 1  # still the old key, still working
    with TaskStore.open(path, key=key()) as again:
        assert again.tasks.count().data == 1


def test_rekey_inside_a_read_of_the_same_thread_is_refused(encrypted: TaskStore) -> None:
    encrypted.tasks.create(SEED_LAB_ORDER)
    with encrypted.read(), pytest.raises(StoreLockedError):
        encrypted.rekey(key("next"))
    assert encrypted.tasks.count().data == 1


_HOLDER = """
import sys, time
from clinik_local import TaskStore
store = TaskStore.open(sys.argv[1], key=lambda: sys.argv[2])
store.tasks.count()
print("open", flush=True)
time.sleep(60)
"""


def test_rekey_is_refused_while_another_process_has_the_store_open(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    _make_store(path, key("k1"))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), "k1"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "open"
        with TaskStore.open(path, key=key("k1"), busy_timeout=0.2) as store:
            before = _dump(store)
            with pytest.raises(StoreLockedError, match="another"):
                store.rekey(key("k2"))
            assert _dump(store) == before
            store.tasks.create(SEED_LAB_ORDER)  # still working, still WAL, old key
            with store.read() as conn:
                assert conn.pragma("journal_mode") == "wal"
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    with TaskStore.open(path, key=key("k1")) as store:
        assert store.tasks.count().data == 21


def test_a_leftover_rekey_copy_is_removed_at_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    _make_store(path, key())
    leftover = Path(str(path) + ".rekey-tmp")
    leftover.write_bytes(b"half a copy")
    with TaskStore.open(path, key=key()) as store:
        assert store.tasks.count().data == 20
    assert not leftover.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("old", "new"), [("k1", "k2"), ("-", "k2"), ("k1", "-")], ids=["rekey", "encrypt", "decrypt"]
)
def test_sigkill_during_rekey_leaves_a_store_that_opens_with_the_old_or_the_new_key(
    tmp_path: Path, old: str, new: str
) -> None:
    base = tmp_path / "base.db"

    def provider(text: str) -> Callable[[], str] | None:
        return None if text == "-" else key(text)

    _make_store(base, provider(old), tasks=3000)
    with TaskStore.open(base, key=provider(old)) as store:
        expected = _dump(store)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(f"{old}{new}")
    # How long a whole rekey takes here, to spread the kills over it.
    first = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "rekey_child.py"), str(base), old, new],
        check=True,
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
    )
    whole = float(first.stdout.split()[-1])
    old, new = new, old  # base now has the new key: the trials rekey it back
    outcomes: list[str] = []
    for trial in range(6):
        path = tmp_path / f"t{trial}.db"
        path.write_bytes(base.read_bytes())
        child = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "rekey_child.py"), str(path), old, new],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "rekeying"
        time.sleep(rng.uniform(0, whole * 1.1))
        child.kill()
        child.wait()
        child.stdout.close()
        opened = None
        for name in (old, new):
            try:
                store = TaskStore.open(path, key=provider(name))
            except (EncryptionKeyError, NotEncryptedError):
                continue
            opened = name
            with store:
                assert store.integrity_check() == []
                assert _dump(store) == expected
            break
        assert opened is not None, f"trial {trial}: opens with neither key"
        outcomes.append(opened)
        assert not Path(str(path) + ".rekey-tmp").exists()  # removed by that open
    print("rekey", whole, "s; opened with", outcomes)  # which key: timing (-s shows it)


# --- sync, export, the CLI, the pytest fixtures ------------------------------------------


@pytest.mark.slow
def test_encrypt_in_place_of_10000_tasks_with_pending_outbox_keeps_all_and_sync_delivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "clinic.db"
    factory = TaskFactory()
    with TaskStore.open(path) as store:
        for _ in range(10):
            store.tasks.create_many(factory.many(1000))
        first = store.tasks.search(limit=10).data
        for task in first:
            store.tasks.update(str(task.id), {"status": "accepted", "ownerId": "prac_1"})
        before = _dump(store)
    assert len(before["tasks"]) == 10_000
    assert len(before["outbox"]) == 10_010  # every change pending
    monkeypatch.setenv(cli.KEY_ENV, SENTINEL)
    assert cli.main(["encrypt", "--db", str(path)]) == 0
    assert "10,000 tasks" in capsys.readouterr().out
    assert file_kind(str(path)) == "encrypted"
    with pytest.raises(KeyRequiredError):
        TaskStore.open(path)
    with ReferenceServer(token="t") as server:
        config = SyncConfig(base_url=server.url, token_provider=lambda: "t", timeout=10.0)
        with TaskStore.open(path, key=key(), sync=config) as store:
            assert _dump(store) == before
            assert store.sync.flush(timeout=300)
            assert store.sync.status().pending == 0
        assert len(server.tasks()) == 10_000
    for data in files_of(path).values():
        assert_no_secret(data)


def test_export_of_an_encrypted_store_matches_its_plaintext_export(tmp_path: Path) -> None:
    outputs = []
    with TaskStore.open(tmp_path / "s.db") as store:
        store.tasks.create(SEED_LAB_ORDER)
        store.tasks.create_many(TaskFactory().many(30))
        for provider in (key(), None):
            stream = io.StringIO()
            assert export_ndjson(store, stream, "R4") == 31
            outputs.append(stream.getvalue())
            if provider is not None:
                store.rekey(provider)
                assert store.encrypted
    assert outputs[0] == outputs[1]
    assert SEED_LAB_ORDER["note"] in outputs[1]


def test_the_pytest_fixtures_work_on_an_encrypted_store(
    tmp_path: Path, task_factory: TaskFactory, remote_server: ReferenceServer
) -> None:
    config = SyncConfig(
        base_url=remote_server.url, token_provider=lambda: remote_server.token, timeout=5.0
    )
    with TaskStore.open(tmp_path / "e.db", key=key(), sync=config) as store:
        store.tasks.create_many(task_factory.many(25))
        assert store.sync.flush(timeout=30)
    assert len(remote_server.tasks()) == 25


@pytest.fixture
def cli_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "c.db"
    _make_store(path, key())
    monkeypatch.setattr(cli, "_interactive", lambda: False)
    monkeypatch.delenv(cli.KEY_ENV, raising=False)
    monkeypatch.delenv(cli.NEW_KEY_ENV, raising=False)
    return path


def _commands(path: Path, tmp_path: Path) -> list[list[str]]:
    ndjson = tmp_path / "in.ndjson"
    ndjson.write_text('{"status": "draft", "intent": "order"}\n', encoding="utf-8")
    db = ["--db", str(path)]
    return [
        ["tasks", "search", *db, "limit=3"],
        ["tasks", "history", *db, "task_01J0000000000000000000000A"],
        ["check", *db],
        ["export", *db, "--format", "r4", "--out", str(tmp_path / "out.ndjson")],
        ["import", *db, str(ndjson)],
        ["sync", "status", *db],
    ]


def test_every_db_command_takes_the_key_from_the_environment(
    cli_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for argv in _commands(cli_store, tmp_path):
        monkeypatch.delenv(cli.KEY_ENV, raising=False)
        code = cli.main(argv)
        assert code == cli.EXIT_STORAGE, argv  # no key: KeyRequiredError
        monkeypatch.setenv(cli.KEY_ENV, SENTINEL)
        code = cli.main(argv)
        assert code in (cli.EXIT_OK, cli.EXIT_NOT_FOUND), argv  # history: unknown id


def test_cli_prompts_for_the_key_at_a_terminal_and_never_takes_it_from_argv(
    cli_store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[str] = []
    monkeypatch.setattr(cli, "_interactive", lambda: True)

    def prompt(text: str) -> str:
        asked.append(text)
        return SENTINEL

    monkeypatch.setattr(cli, "_prompt", prompt)
    assert cli.main(["check", "--db", str(cli_store)]) == 0
    assert len(asked) == 1
    assert str(cli_store) in asked[0]
    captured = capsys.readouterr()
    assert "integrity      ok" in captured.out
    assert_no_secret(captured.out + captured.err)
    with pytest.raises(SystemExit) as exit_info:  # there is no option to pass a key in argv
        cli.main(["check", "--db", str(cli_store), "--key", "typed-in-argv"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "unrecognized arguments: --key" in capsys.readouterr().err


def test_cli_encrypt_with_two_different_typed_keys_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.db"
    _make_store(path, None)
    before = hashes(path)
    typed = iter(["one", "two"])
    monkeypatch.delenv(cli.KEY_ENV, raising=False)
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    monkeypatch.setattr(cli, "_prompt", lambda prompt: next(typed))
    assert cli.main(["encrypt", "--db", str(path)]) == cli.EXIT_USAGE
    assert hashes(path) == before


def test_cli_encrypt_rekey_decrypt_round_trip(
    cli_store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = ["--db", str(cli_store)]
    assert cli.main(["encrypt", *db]) == cli.EXIT_USAGE  # already encrypted
    monkeypatch.setenv(cli.KEY_ENV, SENTINEL)
    assert cli.main(["rekey", *db]) == cli.EXIT_USAGE  # no new key, no terminal
    monkeypatch.setenv(cli.NEW_KEY_ENV, "the-new-key")
    assert cli.main(["rekey", *db, "--json"]) == 0
    assert '"encrypted":true' in capsys.readouterr().out
    assert cli.main(["decrypt", *db]) == cli.EXIT_STORAGE  # the old key no longer opens it
    monkeypatch.setenv(cli.KEY_ENV, "the-new-key")
    assert cli.main(["decrypt", *db]) == 0
    assert file_kind(str(cli_store)) == "plain"
    monkeypatch.delenv(cli.KEY_ENV)
    assert cli.main(["tasks", "search", *db]) == 0
    captured = capsys.readouterr()
    assert_no_secret(captured.out + captured.err)
