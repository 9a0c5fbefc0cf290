"""Shared fixtures: a TaskStore on a real SQLite file in the test's own tmp_path.

(``task_store``, a fresh ``:memory:`` store, comes from clinik-local's own pytest plugin.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from clinik_local import TaskStore

# No per-example deadline: many properties here open real files, and CI machines are
# shared; a slow example is not a failure (the suite's own timeout bounds the run).
settings.register_profile("clinik-local", deadline=None)
settings.load_profile("clinik-local")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """Where ``file_store`` keeps its file (reopen it to check what persisted)."""
    return tmp_path / "clinic.db"


@pytest.fixture
def file_store(store_path: Path) -> Iterator[TaskStore]:
    """A new, empty TaskStore on a real file, closed after the test."""
    with TaskStore.open(store_path) as store:
        yield store
