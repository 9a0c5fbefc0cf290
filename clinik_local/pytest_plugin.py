"""pytest plugin (entry point ``pytest11``): fixtures for testing code that uses clinik-local.

The library is imported lazily, inside the fixtures, so merely having clinik-local
installed costs a pytest session nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from clinik_local import TaskStore


@pytest.fixture
def task_store() -> Iterator[TaskStore]:
    """A fresh, empty in-memory TaskStore, closed after the test."""
    from clinik_local import TaskStore

    store = TaskStore.open(":memory:")
    try:
        yield store
    finally:
        store.close()
