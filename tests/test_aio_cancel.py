"""A cancelled AsyncTaskStore write: not started means never written; started means settled.

Issue 15 item 4: ``asyncio.wait_for(astore.tasks.create(...), 0.2)`` timed out while
another thread held the write lock, the create committed later anyway and the app's
retry made a second, identical lab order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import apsw
import pytest

from clinik_local import AsyncTaskStore, NotFoundError, TaskExistsError, new_task_id
from clinik_local.storage import rows

ORDER = {"status": "requested", "intent": "order", "description": "lab order: CBC"}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "clinic.db"


def _hold_writer(astore: AsyncTaskStore) -> tuple[threading.Event, threading.Event]:
    """A real second thread inside a write transaction of the store until released."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with astore.store._db.write():
            holding.set()
            release.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    assert holding.wait(10)
    return holding, release


def _count(astore: AsyncTaskStore) -> int:
    return astore.store.tasks.count().data


def test_create_timed_out_while_another_thread_writes_is_never_written(db_path: Path) -> None:
    async def main() -> None:
        async with await AsyncTaskStore.open(str(db_path)) as astore:
            _, release = _hold_writer(astore)
            task_id = new_task_id()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(astore.tasks.create({**ORDER, "id": task_id}), 0.2)
            release.set()
            # the worker now gets the lock; it must give up instead of writing
            second = await astore.tasks.create({**ORDER, "description": "after"})
            assert second.data.id != task_id
            with pytest.raises(NotFoundError):
                await astore.tasks.get(task_id)
            assert _count(astore) == 1
            # the retry with the same id succeeds: the first attempt left nothing behind
            retried = await astore.tasks.create({**ORDER, "id": task_id})
            assert retried.data.id == task_id
            assert _count(astore) == 2

    asyncio.run(main())


def test_id_less_create_and_update_delete_cancelled_before_start_write_nothing(
    db_path: Path,
) -> None:
    async def main() -> None:
        async with await AsyncTaskStore.open(str(db_path)) as astore:
            task = (await astore.tasks.create(ORDER)).data
            assert task.id is not None
            _, release = _hold_writer(astore)
            calls = [
                astore.tasks.create(ORDER),
                astore.tasks.create_many([ORDER, ORDER]),
                astore.tasks.update(task.id, {"status": "accepted"}),
                astore.tasks.delete(task.id),
            ]
            for call in calls:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(call, 0.05)
            release.set()
            after = (await astore.tasks.create({**ORDER, "description": "after"})).data
            assert _count(astore) == 2
            current = (await astore.tasks.get(task.id)).data
            assert current.status.value == "requested"
            assert len((await astore.tasks.history(task.id)).data) == 1
            assert after.id != task.id

    asyncio.run(main())


def test_create_cancelled_while_another_process_holds_the_file_lock_is_never_written(
    db_path: Path,
) -> None:
    async def main() -> None:
        async with await AsyncTaskStore.open(str(db_path), busy_timeout=10) as astore:
            other = apsw.Connection(str(db_path))  # a second writer, as another process
            other.execute("BEGIN IMMEDIATE")
            task_id = new_task_id()
            try:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(astore.tasks.create({**ORDER, "id": task_id}), 0.2)
            finally:
                other.execute("ROLLBACK")
                other.close()
            await astore.tasks.create({**ORDER, "description": "after"})
            with pytest.raises(NotFoundError):
                await astore.tasks.get(task_id)
            assert _count(astore) == 1

    asyncio.run(main())


@pytest.fixture
def slow_insert(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Make the insert of a create pause inside its transaction until released."""
    inside, release = threading.Event(), threading.Event()
    real = rows.insert_local

    def paused(*args: Any, **kwargs: Any) -> None:
        inside.set()
        release.wait(30)
        real(*args, **kwargs)

    monkeypatch.setattr(rows, "insert_local", paused)
    yield inside, release
    release.set()


async def _expire_once_inside(
    deadline: asyncio.Timeout, inside: threading.Event, release: threading.Event
) -> None:
    """Time the call out while its insert runs, then let the insert finish.

    No race with the clock: the timeout fires only once the worker is inside its
    transaction, and the insert is released only after the cancellation was delivered
    (asyncio runs the cancelled task's wake-up before a later timer).
    """
    assert await asyncio.to_thread(inside.wait, 30)
    deadline.reschedule(asyncio.get_running_loop().time())
    await asyncio.sleep(0.05)
    release.set()


async def _create_timed_out_inside(
    astore: AsyncTaskStore,
    request: Mapping[str, object],
    inside: threading.Event,
    release: threading.Event,
) -> None:
    """``create(request)`` under a timeout that expires while its insert runs."""
    async with asyncio.timeout(None) as deadline:
        watcher = asyncio.create_task(_expire_once_inside(deadline, inside, release))
        try:
            await astore.tasks.create(request)
        finally:
            await watcher


@pytest.mark.parametrize("own_id", [True, False], ids=["client-id", "generated-id"])
def test_create_timed_out_after_it_started_is_committed_and_retrievable_by_id(
    db_path: Path, slow_insert: tuple[threading.Event, threading.Event], own_id: bool
) -> None:
    inside, release = slow_insert

    async def main() -> None:
        async with await AsyncTaskStore.open(str(db_path)) as astore:
            task_id = new_task_id()
            request = {**ORDER, "id": task_id} if own_id else dict(ORDER)
            with pytest.raises(TimeoutError) as caught:
                await _create_timed_out_inside(astore, request, inside, release)
            assert inside.is_set()
            cancelled = caught.value.__cause__ or caught.value.__context__
            assert isinstance(cancelled, asyncio.CancelledError)
            message = str(cancelled)
            assert "after it started" in message
            if not own_id:
                task_id = message.split("create of task ")[1].split(" ")[0]
            # settled when the timeout arrived: no waiting, no polling
            found = astore.store.tasks.get(task_id).data
            assert found.description == ORDER["description"]
            assert _count(astore) == 1
            with pytest.raises(TaskExistsError):  # a retry with the same id cannot duplicate
                await astore.tasks.create({**ORDER, "id": task_id})

    asyncio.run(main())


def test_uncancelled_calls_behave_as_the_synchronous_api(db_path: Path) -> None:
    async def main() -> None:
        async with await AsyncTaskStore.open(str(db_path)) as astore:
            created = await astore.tasks.create(ORDER)
            assert created.data.id is not None
            assert (await astore.tasks.get(created.data.id)).data == created.data
            assert (await astore.tasks.count()).data == 1
            with pytest.raises(TaskExistsError):
                await astore.tasks.create({**ORDER, "id": created.data.id})

    asyncio.run(main())
