"""AsyncTaskStore: same results as the sync API, and the event loop keeps running."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from clinik_local import NotFoundError, TaskStore, ValidationError
from clinik_local.aio import AsyncTaskStore


def test_async_crud_round_trip_matches_the_sync_store(tmp_path: Path) -> None:
    path = str(tmp_path / "tasks.db")

    async def main() -> None:
        async with await AsyncTaskStore.open(path) as astore:
            created = (await astore.tasks.create({"status": "requested", "intent": "order"})).data
            assert created.id is not None
            got = (await astore.tasks.get(created.id)).data
            assert got == created
            updated = (
                await astore.tasks.update(created.id, {"status": "accepted"}, if_match="1")
            ).data
            assert updated.status.value == "accepted"
            assert (await astore.tasks.count(status="accepted")).data == 1
            assert [t.id for t in (await astore.tasks.search(status="accepted")).data] == [
                created.id
            ]
            assert len((await astore.tasks.history(created.id)).data) == 2
            await astore.tasks.delete(created.id)
            with pytest.raises(NotFoundError):
                await astore.tasks.get(created.id)
        assert astore.closed

    asyncio.run(main())
    with TaskStore.open(path) as store:
        assert store.tasks.count().data == 0


def test_async_errors_are_the_library_errors_and_write_nothing() -> None:
    async def main() -> int:
        astore = await AsyncTaskStore.open(":memory:")
        try:
            with pytest.raises(ValidationError) as info:
                await astore.tasks.create({"status": "bogus", "intent": "order"})
            assert info.value.paths == ("status",)
            return (await astore.tasks.count()).data
        finally:
            await astore.aclose()

    assert asyncio.run(main()) == 0


def test_big_create_many_does_not_block_the_event_loop() -> None:
    requests = [
        {"status": "requested", "intent": "order", "description": f"bulk task {n}"}
        for n in range(10_000)
    ]

    async def main() -> tuple[int, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        async with await AsyncTaskStore.open(":memory:") as astore:
            tick_task = asyncio.create_task(ticker())
            await asyncio.sleep(0)  # let the ticker start
            before = ticks
            created = await astore.tasks.create_many(requests)
            during = ticks - before
            done.set()
            await tick_task
            assert (await astore.tasks.count()).data == len(created.data)
        return during, len(created.data)

    during, count = asyncio.run(main())
    assert count == 10_000
    # a blocked loop would tick at most once while create_many ran
    assert during >= 5, during


def test_concurrent_awaits_on_one_file_store_all_land_exactly_once(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        async with await AsyncTaskStore.open(str(tmp_path / "tasks.db")) as astore:
            created = await asyncio.gather(
                *(
                    astore.tasks.create({"status": "draft", "intent": "plan", "id": f"t_{n}"})
                    for n in range(30)
                )
            )
            counts = await asyncio.gather(*(astore.tasks.count() for _ in range(5)))
            assert {c.data for c in counts} <= set(range(31))
            return len({r.data.id for r in created}), (await astore.tasks.count()).data

    assert asyncio.run(main()) == (30, 30)


def test_wrapping_an_open_store_shares_it_and_aclose_closes_it() -> None:
    store = TaskStore.open(":memory:")

    async def main() -> None:
        astore = AsyncTaskStore(store)
        await astore.tasks.create({"status": "draft", "intent": "plan", "id": "shared_1"})
        assert store.tasks.get("shared_1").data.id == "shared_1"  # the same store
        await astore.aclose()

    asyncio.run(main())
    assert store.closed
