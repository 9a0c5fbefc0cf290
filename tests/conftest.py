"""Shared fixtures: a TaskStore on a real SQLite file in the test's own tmp_path, and the
Medplum FHIR R4 peer (one Node.js child process for the whole session).

(``task_store``, a fresh ``:memory:`` store, comes from clinik-local's own pytest plugin.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from clinik_local import TaskStore
from tests.peers.medplum import MedplumPeer, run_medplum_peer

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


@pytest.fixture(scope="session")
def medplum_peer() -> Iterator[MedplumPeer]:
    """Medplum's FHIR engine on 127.0.0.1 (started once; ``peer.base_url`` ends in /fhir/R4).

    Shared by every test of the session: give each test its own ids (or call
    ``peer.reset()`` when a test needs an empty server). Fails, never skips, when the peer
    is not installed (``npm ci --prefix tests/peers/medplum``).
    """
    with run_medplum_peer() as peer:
        yield peer
