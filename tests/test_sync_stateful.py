"""Hypothesis interleaves local writes, sync passes, server faults and restarts.

The model is what the server must end up holding: after a final flush with the
faults switched off, exactly the tasks the model holds (field by field), every
idempotency key applied once, and each task's changes applied in the order made.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from clinik_local import TaskStore
from clinik_local.codec import encode_task
from clinik_local.server import FaultKind, ReferenceServer
from clinik_local.sync import SyncConfig

FAULTS: tuple[FaultKind, ...] = (
    "drop_before",
    "drop_after",
    "error_5xx",
    "rate_limit",
    "token_expiry",
)
STATUSES = ("requested", "received", "accepted", "in-progress", "on-hold")
NOTES = st.text(alphabet="abcxyz ", min_size=1, max_size=8)


def _strip(task: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in task.items() if k not in ("versionId", "lastModified")}


class SyncMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="clinik-sync-"))
        self.path = self.dir / "m.db"
        self.server = ReferenceServer(token="tok").start()
        self.model: dict[str, dict[str, Any]] = {}
        self.changes = 0
        self.store = self._open()

    def _open(self) -> TaskStore:
        config = SyncConfig(
            base_url=self.server.url,
            token_provider=lambda: self.server.token,
            backoff_base=0.0005,
            backoff_cap=0.002,
            timeout=2.0,
        )
        return TaskStore.open(self.path, sync=config)

    @rule(note=NOTES, status=st.sampled_from(("draft", "requested")))
    def create(self, note: str, status: str) -> None:
        task = self.store.tasks.create({"status": status, "intent": "order", "note": note}).data
        self.model[str(task.id)] = _strip(encode_task(task))
        self.changes += 1

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), note=NOTES)
    def update(self, data: st.DataObject, note: str) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.model)))
        task = self.store.tasks.update(task_id, {"note": note}, admin_override="test").data
        before = self.model[task_id]
        self.model[task_id] = _strip(encode_task(task))
        if self.model[task_id] != before:
            self.changes += 1

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.model)))
        self.store.tasks.delete(task_id)
        del self.model[task_id]
        self.changes += 1

    @rule(kinds=st.lists(st.sampled_from(FAULTS), min_size=1, max_size=4))
    def server_faults(self, kinds: list[FaultKind]) -> None:
        self.server.faults.script.extend(kinds)

    @rule()
    def sync_pass(self) -> None:
        status = self.store.sync.run_once()
        assert status.dead == 0
        assert status.conflicts == 0

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = self._open()

    @rule()
    def crash_mid_flight(self) -> None:
        # What a crash between sending and recording leaves behind: rows in_flight.
        with self.store._db.write() as conn:
            conn.execute("UPDATE outbox SET state = 'in_flight' WHERE state = 'pending'")
        self.store.close()
        self.store = self._open()

    @invariant()
    def never_applied_twice(self) -> None:
        assert set(self.server.applied_counts().values()) <= {1}

    def teardown(self) -> None:
        try:
            self.server.faults.script.clear()
            assert self.store.sync.flush(timeout=20) or self._resume_and_flush()
            status = self.store.sync.status()
            assert (status.pending, status.in_flight, status.dead, status.conflicts) == (0, 0, 0, 0)
            held = {k: _strip(v) for k, v in self.server.tasks().items()}
            assert held == self.model
            counts = self.server.applied_counts()
            assert set(counts.values()) <= {1}
            assert len(counts) == self.changes
            per_task: dict[str, list[str]] = {}
            for key, task_id, _ in self.server.applied_log():
                per_task.setdefault(task_id, []).append(key)
            assert all(keys == sorted(keys) for keys in per_task.values())
        finally:
            self.store.close()
            self.server.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _resume_and_flush(self) -> bool:
        self.store.sync.notify_online()  # an auth pause from two expiries in a row
        return self.store.sync.flush(timeout=20)


SyncMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=20, deadline=None, derandomize=True
)
TestSyncAgainstModel = SyncMachine.TestCase
