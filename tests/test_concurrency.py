"""Issue 4: threads sharing one store, processes sharing one file: all present, none raised."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from clinik_local import TaskStore
from tests.strategies import minimal_request

THREADS, WRITES = 8, 500


def test_eight_threads_making_500_mixed_writes_each_on_one_file_store(
    file_store: TaskStore,
) -> None:
    errors: list[BaseException] = []
    survivors: list[set[str]] = [set() for _ in range(THREADS)]
    start = threading.Barrier(THREADS)

    def work(n: int) -> None:
        try:
            mine: list[str] = []
            start.wait(timeout=30)
            for i in range(WRITES):
                if i % 5 == 4 and mine:
                    file_store.tasks.update(mine[-1], {"note": f"t{n} i{i}"})
                elif i % 7 == 6 and mine:
                    file_store.tasks.delete(mine.pop(0))
                elif i % 11 == 10:
                    made = file_store.tasks.create_many(
                        [minimal_request(patientId=f"pt_{n}") for _ in range(3)]
                    )
                    mine.extend(t.id or "" for t in made.data)
                else:
                    mine.append(
                        file_store.tasks.create(minimal_request(patientId=f"pt_{n}")).data.id or ""
                    )
                if i % 50 == 0:  # reads interleaved with everyone's writes
                    assert all(
                        t.patient_id == f"pt_{n}"
                        for t in file_store.tasks.search(patientId=f"pt_{n}").data
                    )
            survivors[n] = set(mine)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for n in range(THREADS):
        stored = {t.id for t in file_store.tasks.search(patientId=f"pt_{n}", limit=1000).data}
        assert stored == survivors[n]
    counts = file_store.table_counts()
    assert counts["tasks"] == sum(len(s) for s in survivors)
    assert counts["outbox"] == counts["task_history"]
    assert counts["outbox"] >= THREADS * WRITES
    assert file_store.integrity_check() == []


_CHILD = """
import sys
from clinik_local import TaskStore
path, n = sys.argv[1], sys.argv[2]
with TaskStore.open(path) as store:
    for i in range(1000):
        store.tasks.create({"status": "draft", "intent": "order", "patientId": f"pt_{n}",
                            "note": f"{n}:{i}"})
print("done")
"""


def test_four_processes_creating_1000_tasks_each_on_one_file(store_path: Path) -> None:
    TaskStore.open(store_path).close()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(store_path), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        assert out.strip() == "done"
        assert err == ""
    with TaskStore.open(store_path) as store:
        for n in range(4):
            notes = {t.note for t in store.tasks.search(patientId=f"pt_{n}", limit=1000).data}
            assert notes == {f"{n}:{i}" for i in range(1000)}
        counts = store.table_counts()
        assert counts["tasks"] == counts["outbox"] == counts["task_history"] == 4000
        assert store.integrity_check() == []


def test_a_reader_is_not_blocked_by_another_process_holding_the_write_lock(
    file_store: TaskStore, store_path: Path
) -> None:
    import apsw

    task = file_store.tasks.create(minimal_request()).data
    writer = apsw.Connection(str(store_path))
    writer.execute("BEGIN IMMEDIATE")
    try:
        writer.execute("UPDATE meta SET value = value WHERE key = 'created_at'")
        assert file_store.tasks.get(task.id or "").data == task  # WAL: reads go on
        assert file_store.tasks.count().data == 1
    finally:
        writer.execute("ROLLBACK")
        writer.close()
