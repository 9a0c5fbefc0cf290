"""store.tasks.watch(callback) and `async for event in astore.tasks.watch()`: the tasks a
commit changed, local or pulled, after the commit, never under a lock, never breaking."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clinik_local import ChangeEvent, ReferenceServer, TaskStore, ValidationError
from clinik_local.aio import AsyncTaskStore
from tests.pull_support import REQUEST, config, wait_for


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token="watch-token") as srv:
        yield srv


def test_callbacks_get_the_ids_of_each_commit_with_local_origin(tmp_path: Path) -> None:
    events: list[ChangeEvent] = []
    with TaskStore.open(tmp_path / "w.db") as store:
        unsubscribe = store.tasks.watch(events.append)
        one = str(store.tasks.create(REQUEST).data.id)
        many = [str(t.id) for t in store.tasks.create_many([REQUEST, REQUEST]).data]
        store.tasks.update(one, {"note": "changed"})
        store.tasks.update(one, {"note": "changed"})  # no change: no event
        store.tasks.delete(many[0])
        assert wait_for(lambda: len(events) == 4)
        time.sleep(0.05)
        assert events == [
            ChangeEvent((one,), "local"),
            ChangeEvent(tuple(sorted(many)), "local"),
            ChangeEvent((one,), "local"),
            ChangeEvent((many[0],), "local"),
        ]
        unsubscribe()
        store.tasks.create(REQUEST)
        time.sleep(0.05)
        assert len(events) == 4


def test_a_refused_write_notifies_nothing(tmp_path: Path) -> None:
    events: list[ChangeEvent] = []
    with TaskStore.open(tmp_path / "w.db") as store:
        store.tasks.watch(events.append)
        with pytest.raises(ValidationError):
            store.tasks.create({"status": "bogus", "intent": "order"})
        store.tasks.create(REQUEST)
        assert wait_for(lambda: len(events) == 1)
        time.sleep(0.05)
        assert len(events) == 1


def test_a_callback_runs_after_the_commit_outside_the_write_lock(tmp_path: Path) -> None:
    seen: list[tuple[int, bool]] = []
    done = threading.Event()
    with TaskStore.open(tmp_path / "w.db") as store:

        def on_change(event: ChangeEvent) -> None:
            if event.task_ids == ("task_first",):
                # The change is committed (another connection reads it), and this
                # callback may write: it holds no lock of the store.
                seen.append((store.tasks.count().data, store._db._lock._is_owned()))  # type: ignore[attr-defined]
                store.tasks.create({**REQUEST, "id": "task_from_callback"})
                done.set()

        store.tasks.watch(on_change)
        store.tasks.create({**REQUEST, "id": "task_first"})
        assert done.wait(10)
        assert seen == [(1, False)]
        assert store.tasks.get("task_from_callback").data.id == "task_from_callback"


def test_an_exception_in_a_callback_is_logged_and_breaks_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    later: list[ChangeEvent] = []

    def broken(event: ChangeEvent) -> None:
        raise RuntimeError("a screen's bug")

    with caplog.at_level(logging.ERROR, logger="clinik_local.events"):
        with TaskStore.open(tmp_path / "w.db") as store:
            store.tasks.watch(broken)
            store.tasks.watch(later.append)
            store.tasks.create(REQUEST)
            store.tasks.create(REQUEST)
            assert wait_for(lambda: len(later) == 2)
            assert store.tasks.count().data == 2
        assert "a watch callback failed" in caplog.text


def test_pulled_changes_are_reported_as_pulled_and_local_ones_as_local(
    tmp_path: Path, server: ReferenceServer
) -> None:
    events: list[ChangeEvent] = []
    with TaskStore.open(tmp_path / "w.db", sync=config(server)) as store:
        assert store.sync.flush(timeout=10)
        store.tasks.watch(events.append)
        mine = str(store.tasks.create(REQUEST).data.id)
        assert store.sync.flush(timeout=10)  # delivered: no event (nothing changed here)
        server.put_task({**REQUEST, "id": "task_from_clinic"})
        server.update_task(mine, {"note": "written at the clinic"})
        assert store.sync.flush(timeout=10)
        assert wait_for(lambda: len(events) >= 2)
        time.sleep(0.05)
        assert events[0] == ChangeEvent((mine,), "local")
        pulled = [e for e in events[1:] if e.origin == "pulled"]
        assert {i for e in pulled for i in e.task_ids} == {mine, "task_from_clinic"}
        assert all(not e.local for e in pulled)
        assert len(events) == 1 + len(pulled)


def test_a_callback_may_call_sync_without_deadlocking(
    tmp_path: Path, server: ReferenceServer
) -> None:
    statuses: list[str] = []
    with TaskStore.open(tmp_path / "w.db", sync=config(server)) as store:
        store.sync.start()

        def on_change(event: ChangeEvent) -> None:
            if event.origin == "pulled":
                statuses.append(store.sync.run_once().state)

        store.tasks.watch(on_change)
        server.put_task({**REQUEST, "id": "task_pulled"})
        assert wait_for(lambda: bool(statuses))


def test_the_async_twin_yields_the_same_events_and_unsubscribes_on_exit(tmp_path: Path) -> None:
    async def main() -> list[ChangeEvent]:
        async with await AsyncTaskStore.open(str(tmp_path / "a.db")) as astore:
            got: list[ChangeEvent] = []

            async def watch() -> None:
                async for event in astore.tasks.watch():
                    got.append(event)
                    if len(got) == 2:
                        break

            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0.05)  # subscribed
            await astore.tasks.create({**REQUEST, "id": "task_a1"})
            await astore.tasks.create({**REQUEST, "id": "task_a2"})
            await asyncio.wait_for(watcher, 10)
            assert not astore.store._db.feed.watched  # left the loop: unsubscribed
            return got

    assert asyncio.run(main()) == [
        ChangeEvent(("task_a1",), "local"),
        ChangeEvent(("task_a2",), "local"),
    ]


def test_watch_refuses_a_callback_that_is_not_one(tmp_path: Path) -> None:
    with TaskStore.open(tmp_path / "w.db") as store, pytest.raises(ValidationError):
        store.tasks.watch("not callable")  # type: ignore[arg-type]
