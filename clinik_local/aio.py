"""``AsyncTaskStore``: the TaskStore API for asyncio programs, never blocking the loop.

Every call runs the synchronous :class:`~clinik_local.store.TaskStore` method in a
worker thread (:func:`asyncio.to_thread`); a TaskStore is safe to share between
threads, so concurrent awaits are fine. Arguments, results and errors are exactly
those of the synchronous API.

>>> import asyncio
>>> async def main() -> str:
...     async with await AsyncTaskStore.open(":memory:") as astore:
...         task = (await astore.tasks.create({"status": "draft", "intent": "order"})).data
...         return (await astore.tasks.get(task.id)).data.status.value
>>> asyncio.run(main())
'draft'
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .model import ApiResponse, Task, TaskVersion

if TYPE_CHECKING:
    from .store import TaskStore

__all__ = ["AsyncTaskStore", "AsyncTasksResource"]


class AsyncTasksResource:
    """The Tasks resource with coroutine methods, as ``TasksResource`` has them."""

    def __init__(self, store: TaskStore) -> None:
        self._tasks = store.tasks

    async def create(self, request: Mapping[str, object]) -> ApiResponse[Task]:
        """Create a task (see ``TasksResource.create``)."""
        return await asyncio.to_thread(self._tasks.create, request)

    async def create_many(
        self, requests: Iterable[Mapping[str, object]], *, synced: bool = False
    ) -> ApiResponse[list[Task]]:
        """Create many tasks in one transaction (see ``TasksResource.create_many``)."""
        return await asyncio.to_thread(self._tasks.create_many, requests, synced=synced)

    async def get(self, task_id: str) -> ApiResponse[Task]:
        """Read one task (see ``TasksResource.get``)."""
        return await asyncio.to_thread(self._tasks.get, task_id)

    async def update(
        self,
        task_id: str,
        changes: Mapping[str, object],
        *,
        if_match: str | int | None = None,
        admin_override: str | None = None,
    ) -> ApiResponse[Task]:
        """Partially update a task (see ``TasksResource.update``)."""
        return await asyncio.to_thread(
            self._tasks.update,
            task_id,
            changes,
            if_match=if_match,
            admin_override=admin_override,
        )

    async def delete(
        self, task_id: str, *, if_match: str | int | None = None
    ) -> ApiResponse[dict[str, object]]:
        """Delete a task (see ``TasksResource.delete``)."""
        return await asyncio.to_thread(self._tasks.delete, task_id, if_match=if_match)

    async def search(
        self, filters: Mapping[str, object] | None = None, /, **keywords: object
    ) -> ApiResponse[list[Task]]:
        """One page of matching tasks (see ``TasksResource.search``)."""
        return await asyncio.to_thread(self._tasks.search, filters, **keywords)

    async def count(
        self,
        filters: Mapping[str, object] | None = None,
        /,
        *,
        at_most: int | None = None,
        **keywords: object,
    ) -> ApiResponse[int]:
        """How many tasks match, up to ``at_most`` if given (see ``TasksResource.count``)."""
        return await asyncio.to_thread(self._tasks.count, filters, at_most=at_most, **keywords)

    async def history(self, task_id: str) -> ApiResponse[list[TaskVersion]]:
        """Every recorded version of a task (see ``TasksResource.history``)."""
        return await asyncio.to_thread(self._tasks.history, task_id)


class AsyncTaskStore:
    """An asyncio facade over a :class:`~clinik_local.store.TaskStore`.

    Open with ``await AsyncTaskStore.open(path, **options)`` (the options of
    ``TaskStore.open``); use as ``async with``; ``await astore.aclose()`` to close.
    The wrapped synchronous store is :attr:`store` (e.g. for ``store.sync``).
    """

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.tasks = AsyncTasksResource(store)

    @classmethod
    async def open(cls, path: str = ":memory:", **options: Any) -> AsyncTaskStore:
        """Open (in a worker thread) the store at ``path``; options as ``TaskStore.open``."""
        from .store import TaskStore

        store = await asyncio.to_thread(TaskStore.open, path, **options)
        return cls(store)

    @property
    def closed(self) -> bool:
        """Whether the store has been closed."""
        return self.store.closed

    async def aclose(self) -> None:
        """Close the store (stops sync, closes connections) in a worker thread."""
        await asyncio.to_thread(self.store.close)

    async def __aenter__(self) -> AsyncTaskStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncTaskStore({self.store!r})"
