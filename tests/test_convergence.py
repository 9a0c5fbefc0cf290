"""Convergence: three devices with their own file stores, engines and scopes, one
reference server with faults, random interleaved edits, SIGKILLs; after healing every
device holds exactly the server's tasks for its scope, no edit is silently gone, and
every write was applied once (issue 12, "Show it").

The devices: ``everything`` (scope None), ``owner`` (``ownerId`` = one practitioner) and
``patients`` (``patientId`` in two patients). Each device's sync engine runs in its own
child process (tests/converge_child.py) that a sync step may SIGKILL after a random short
delay: mid-bootstrap, mid-page, mid-push (the server answers slowly often enough that a
kill lands inside a request). Local edits happen in this process on the same file,
through a store opened without sync, so one engine at most runs on a file at any time.
Edits on the server itself come through ``ReferenceServer.update_task``/``put_task``/
``delete_task`` (another client), and ``compact_log`` makes the devices' cursors expire
(``410``: bootstrap again, with pending changes).

The model keeps every write with a logical clock: who wrote it, the task and the fields
it set (or a delete). Healing (teardown): faults off, every child gone, each device opened
here with sync, flushed, its conflicts resolved by the device's policy (``local``,
``remote`` or a field-wise merge), round after round until a round changes nothing. Then:

- each device holds exactly the server's tasks in its scope, field by field, and has
  nothing pending, in flight, dead or in conflict;
- every write (by a device or on the server) is on the server, or was superseded by a
  later write of that field (or a later delete), or put back a value the field had
  before another writer changed it (A-B-A: no net change to merge), or was shown in a
  recorded conflict whose resolution chose otherwise (a reason on that field, or the
  writing device took the server's task); never silently gone;
- every idempotency key was applied once; the server's log has one entry per applied
  write and per server edit; no client write left the task as it was (a replayed edit).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
from hypothesis import Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from clinik_local import ReferenceServer, SyncConfig, TaskStore
from clinik_local.codec import encode_task
from clinik_local.lifecycle import TRANSITIONS
from clinik_local.model import TaskStatus
from clinik_local.server import FaultKind
from clinik_local.sync import SyncConflict

HERE = Path(__file__).resolve().parent
CHILD = HERE / "converge_child.py"
BOOKKEEPING = ("versionId", "lastModified")
OWNERS = ("prac_a", "prac_b", "prac_c")
PATIENTS = ("pt_1", "pt_2", "pt_3")
SCOPES: tuple[dict[str, list[str]] | None, ...] = (
    None,
    {"ownerId": ["prac_a"]},
    {"patientId": ["pt_1", "pt_2"]},
)
WRITERS = ("everything", "owner", "patients")
POLICIES = ("local", "remote", "merge")
# A fault is drawn uniformly from these (``slow`` twice: more kills land inside a request).
WRITE_FAULTS: tuple[FaultKind, ...] = (
    "drop_before",
    "drop_after",
    "error_5xx",
    "rate_limit",
    "slow",
    "slow",
)
READ_FAULTS: tuple[FaultKind, ...] = (*WRITE_FAULTS, "short_page")
FAULT_RATE = 0.3  # of writes, and separately of reads (log pages, listings, GETs)
NOTES = st.text(alphabet="abxy", min_size=1, max_size=3)
EDITABLE: dict[str, st.SearchStrategy[str]] = {
    "note": NOTES,
    "priority": st.sampled_from(("routine", "urgent", "asap", "stat")),
    "ownerId": st.sampled_from(OWNERS),
    "patientId": st.sampled_from(PATIENTS),
    "status": st.just("next"),  # a transition the lifecycle allows, drawn at the edit
}
#: Which task (and which allowed status) an edit picks, modulo what there is: the draws
#: never depend on what the devices hold (that depends on timing and kills).
PICK = st.integers(0, 2**20)
#: One to five fields of a task changed at once.
EDITS = st.one_of(
    *(
        st.fixed_dictionaries(
            {name: values}, optional={k: v for k, v in EDITABLE.items() if k != name}
        )
        for name, values in EDITABLE.items()
    )
)


def _strip(task: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in task.items() if k not in BOOKKEEPING}


def _in_scope(scope: dict[str, list[str]] | None, task: dict[str, Any]) -> bool:
    return all(task.get(name) in values for name, values in (scope or {}).items())


def _local_tasks(store: TaskStore) -> dict[str, dict[str, Any]]:
    page = store.tasks.search(limit=1000)
    assert not page.meta["nextCursor"]
    return {str(t.id): _strip(encode_task(t)) for t in page.data}


@attrs.define
class Write:
    """One write of the model: logical time, writer, task, the fields it set (None: a delete)."""

    clock: int
    writer: str
    task_id: str
    fields: dict[str, Any] | None


@attrs.define
class Resolution:
    """A conflict found while healing, and what the device's policy chose."""

    device: str
    conflict: SyncConflict
    choice: str


class Device:
    """A file store, its scope and (while it lives) the child process running its engine."""

    def __init__(self, name: str, path: Path, scope: dict[str, list[str]] | None) -> None:
        self.name = name
        self.path = path
        self.scope = scope
        self.store = TaskStore.open(path)  # edits only: no engine in this process
        self.child: subprocess.Popen[str] | None = None
        self.kills = 0

    def _spawn(self, server: ReferenceServer) -> subprocess.Popen[str]:
        scope = json.dumps(self.scope)
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(self.path), server.url, server.token, scope],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
        )
        assert self._line(child, 30) == "ready"
        return child

    @staticmethod
    def _line(child: subprocess.Popen[str], timeout: float) -> str:
        assert child.stdout is not None
        readable, _, _ = select.select([child.stdout], [], [], timeout)
        assert readable, "the device's child did not answer"
        return child.stdout.readline().strip()

    def sync(self, server: ReferenceServer, kill_after: float | None) -> None:
        """One flush in the child; SIGKILL it ``kill_after`` seconds into it."""
        if self.child is None:
            self.child = self._spawn(server)
        assert self.child.stdin is not None
        self.child.stdin.write("flush 2.0\n")
        self.child.stdin.flush()
        if kill_after is None:
            assert self._line(self.child, 30).startswith("done")
            return
        assert self.child.stdout is not None
        readable, _, _ = select.select([self.child.stdout], [], [], kill_after)
        if readable:  # the flush ended first: the kill lands between passes
            assert self._line(self.child, 1).startswith("done")
            event("kill: after the flush")
        else:
            event("kill: during a flush")
        self.kill()

    def bootstrap_killed(self, server: ReferenceServer) -> bool:
        """A flush SIGKILLed as soon as a bootstrap page (not the last) is committed;
        whether that happened before the flush ended."""
        if self.child is None:
            self.child = self._spawn(server)
        assert self.child.stdin is not None
        assert self.child.stdout is not None
        self.child.stdin.write("flush 2.0\n")
        self.child.stdin.flush()
        mid = False
        while not mid:
            readable, _, _ = select.select([self.child.stdout], [], [], 0.005)
            if readable:
                assert self._line(self.child, 1).startswith("done")
                break
            mid = self._bootstrapping()
        self.kill()
        return mid

    def _bootstrapping(self) -> bool:
        with self.store.read() as conn:
            found = conn.execute("SELECT 1 FROM meta WHERE key = 'sync.bootstrap.next'").fetchall()
        return bool(found)

    def kill(self) -> None:
        if self.child is not None:
            self.child.send_signal(signal.SIGKILL)
            self.child.wait(timeout=10)
            for pipe in (self.child.stdin, self.child.stdout):
                if pipe is not None:
                    pipe.close()
            self.child = None
            self.kills += 1


class Convergence(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="clinik-converge-"))
        self.server = ReferenceServer(token="tok").start()
        faults = self.server.faults
        faults.rate = faults.read_rate = FAULT_RATE
        faults.kinds = WRITE_FAULTS
        faults.read_kinds = READ_FAULTS
        faults.slow_seconds = 0.1
        self.devices = [
            Device(name, self.dir / f"{name}.db", scope)
            for name, scope in zip(WRITERS, SCOPES, strict=True)
        ]
        self.policies = dict.fromkeys(WRITERS, "local")
        self.writes: list[Write] = []
        self.server_writes = 0
        self.clock = 0
        self.created = 0
        self.seen_log: dict[str, dict[str, Any]] = {}  # log entries read before compacting

    def _note(self, writer: str, task_id: str, fields: dict[str, Any] | None) -> None:
        self.clock += 1
        self.writes.append(Write(self.clock, writer, task_id, fields))

    @initialize(
        policies=st.tuples(*(st.sampled_from(POLICIES) for _ in WRITERS)),
        seed=st.integers(0, 2**16),
        tasks=st.lists(st.tuples(st.sampled_from(OWNERS), st.sampled_from(PATIENTS)), max_size=8),
    )
    def start(self, policies: tuple[str, ...], seed: int, tasks: list[tuple[str, str]]) -> None:
        """Each device's conflict policy, the fault sequence, and the server's first tasks
        (so a first bootstrap spans several pages)."""
        self.policies = dict(zip(WRITERS, policies, strict=True))
        self.server.faults.reseed(seed)
        for owner, patient in tasks:
            self.server_create(owner, patient, "seed")

    # --- edits on a device ---------------------------------------------------------------

    @rule(
        device=st.integers(0, 2),
        owner=st.sampled_from(OWNERS),
        patient=st.sampled_from(PATIENTS),
        note=NOTES,
    )
    def create(self, device: int, owner: str, patient: str, note: str) -> None:
        dev = self.devices[device]
        request = {"status": "requested", "intent": "order", "code": "lab-order"}
        request |= {"ownerId": owner, "patientId": patient, "note": note}
        task = _strip(encode_task(dev.store.tasks.create(request).data))
        self._note(dev.name, str(task["id"]), task)

    @rule(device=st.integers(0, 2), pick=PICK, edits=EDITS)
    def update(self, device: int, pick: int, edits: dict[str, Any]) -> None:
        dev = self.devices[device]
        local = _local_tasks(dev.store)
        if not local:
            return
        task_id = sorted(local)[pick % len(local)]
        changes = self._with_status(local[task_id], edits, pick // 7)
        if not changes:
            return
        after = _strip(encode_task(dev.store.tasks.update(task_id, changes).data))
        changed = {k: v for k, v in after.items() if local[task_id].get(k) != v}
        if changed:
            self._note(dev.name, task_id, changed)

    @rule(device=st.integers(0, 2), pick=PICK)
    def delete(self, device: int, pick: int) -> None:
        dev = self.devices[device]
        local = _local_tasks(dev.store)
        if local:
            task_id = sorted(local)[pick % len(local)]
            dev.store.tasks.delete(task_id)
            self._note(dev.name, task_id, None)

    @staticmethod
    def _with_status(task: dict[str, Any], edits: dict[str, Any], pick: int) -> dict[str, Any]:
        """The edits, with ``status`` a transition the lifecycle allows (or dropped)."""
        changes = dict(edits)
        if changes.pop("status", None) is not None:
            allowed = sorted(s.value for s in TRANSITIONS[TaskStatus(task["status"])])
            if allowed:
                changes["status"] = allowed[pick % len(allowed)]
        return changes

    # --- edits on the server (another client) --------------------------------------------

    @rule(owner=st.sampled_from(OWNERS), patient=st.sampled_from(PATIENTS), note=NOTES)
    def server_create(self, owner: str, patient: str, note: str) -> None:
        self.created += 1
        request = {"id": f"srv_{self.created}", "status": "requested", "intent": "order"}
        request |= {"ownerId": owner, "patientId": patient, "note": note}
        task = _strip(self.server.put_task(request))
        self.server_writes += 1
        self._note("server", str(task["id"]), task)

    @rule(pick=PICK, edits=EDITS)
    def server_update(self, pick: int, edits: dict[str, Any]) -> None:
        held = self.server.tasks()
        if not held:
            return
        task_id = sorted(held)[pick % len(held)]
        changes = self._with_status(held[task_id], edits, pick // 7)
        if not changes:
            return
        after = _strip(self.server.update_task(task_id, changes))
        self.server_writes += 1
        changed = {k: v for k, v in after.items() if held[task_id].get(k) != v}
        self._note("server", task_id, changed)

    @rule(pick=PICK)
    def server_delete(self, pick: int) -> None:
        held = self.server.tasks()
        if held:
            task_id = sorted(held)[pick % len(held)]
            self.server.delete_task(task_id)
            self.server_writes += 1
            self._note("server", task_id, None)

    @rule(keep=st.integers(0, 3))
    def expire_log(self, keep: int) -> None:
        """The server drops old log entries: older cursors get 410 and bootstrap again."""
        self.seen_log |= {item["versionId"]: item for item in self._log()}
        self.server.compact_log(keep_last=keep)

    # --- sync and crashes ----------------------------------------------------------------

    @rule(device=st.integers(0, 2))
    def sync(self, device: int) -> None:
        self.devices[device].sync(self.server, None)

    @rule(device=st.integers(0, 2), kill_after=st.floats(0.0, 0.05) | st.floats(0.0, 0.3))
    def sync_killed(self, device: int, kill_after: float) -> None:
        """A flush SIGKILLed after ``kill_after`` seconds (mid-bootstrap, mid-page, ...)."""
        self.devices[device].sync(self.server, kill_after)

    @rule()
    def sync_all(self) -> None:
        for dev in self.devices:
            dev.sync(self.server, None)

    @rule(device=st.integers(0, 2))
    def sync_killed_mid_bootstrap(self, device: int) -> None:
        """The log expires (410 for every device behind its head), and a flush that
        bootstraps again is SIGKILLed right after one of its listing pages committed."""
        self.expire_log(0)
        if self.devices[device].bootstrap_killed(self.server):
            event("kill: mid-bootstrap")

    @precondition(lambda self: any(d.child is not None for d in self.devices))
    @rule(device=st.integers(0, 2))
    def kill_idle(self, device: int) -> None:
        """SIGKILL a device's engine between flushes (its worker may be mid-pull)."""
        self.devices[device].kill()

    # --- healing and the checks ----------------------------------------------------------

    def teardown(self) -> None:
        try:
            for dev in self.devices:
                dev.kill()
                dev.store.close()
            self.server.faults.rate = self.server.faults.read_rate = 0.0
            self.server.faults.script.clear()
            self.server.faults.read_script.clear()
            injected = {**self.server.faults.injected}
            for kind, n in self.server.faults.injected_reads.items():
                injected[f"read {kind}"] = n
            event("faults injected", sum(injected.values()))
            resolutions = self._heal()
            event("conflicts resolved", len(resolutions))
            self._check(resolutions)
        finally:
            for dev in self.devices:
                dev.kill()
                dev.store.close()
            self.server.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _config(self, scope: dict[str, list[str]] | None) -> SyncConfig:
        return SyncConfig(
            base_url=self.server.url,
            token_provider=lambda: self.server.token,
            scope=scope,
            backoff_base=0.001,
            backoff_cap=0.01,
            timeout=5.0,
            pull_limit=50,
        )

    def _heal(self) -> list[Resolution]:
        """Every device syncs and settles its conflicts until a round changes nothing."""
        resolutions: list[Resolution] = []
        stores = [TaskStore.open(d.path, sync=self._config(d.scope)) for d in self.devices]
        try:
            for _ in range(8):
                head = self.server.changes_cursor()
                found = False
                for dev, store in zip(self.devices, stores, strict=True):
                    assert store.sync.flush(timeout=30), (dev.name, store.sync.status())
                    for conflict in store.sync.conflicts():
                        found = True
                        resolutions.append(self._resolve(dev.name, store, conflict))
                if not found and head == self.server.changes_cursor():
                    break
            else:
                raise AssertionError("healing did not settle in 8 rounds")
            for dev, store in zip(self.devices, stores, strict=True):
                status = store.sync.status()
                assert (status.pending, status.in_flight, status.dead, status.conflicts) == (
                    0,
                    0,
                    0,
                    0,
                ), (dev.name, status, store.sync.dead_letters())
                held = {
                    k: _strip(v) for k, v in self.server.tasks().items() if _in_scope(dev.scope, v)
                }
                local = _local_tasks(store)
                assert local.keys() == held.keys(), (dev.name, local.keys() ^ held.keys())
                for task_id, task in held.items():
                    assert local[task_id] == task, (dev.name, task_id, local[task_id], task)
        finally:
            for store in stores:
                store.close()
        return resolutions

    def _resolve(self, device: str, store: TaskStore, conflict: SyncConflict) -> Resolution:
        choice = self.policies[device]
        keep: Any = choice
        if choice == "merge":
            if conflict.server is None or conflict.local is None or conflict.base is None:
                keep = choice = "local"
            else:
                keep = self._merged(conflict.base, conflict.server, conflict.local)
        store.sync.resolve(conflict.task_id, keep, local_version=conflict.local_version)
        return Resolution(device, conflict, choice)

    @staticmethod
    def _merged(
        base: dict[str, Any], server: dict[str, Any], local: dict[str, Any]
    ) -> dict[str, Any]:
        """An app's field-wise merge: the server's task, with every field only this device
        changed since the base taken from the local task (the fields changed on both
        sides keep the server's value)."""
        merged = dict(server)
        for name in (set(local) | set(base)) - {"id", *BOOKKEEPING}:
            if local.get(name) != base.get(name) and server.get(name) == base.get(name):
                merged.pop(name, None)
                if name in local:
                    merged[name] = local[name]
        return merged

    def _check(self, resolutions: list[Resolution]) -> None:
        counts = self.server.applied_counts()
        assert set(counts.values()) <= {1}, {k: n for k, n in counts.items() if n != 1}
        self.seen_log |= {item["versionId"]: item for item in self._log()}
        log = [self.seen_log[v] for v in sorted(self.seen_log, key=int)]
        head = int(self.server.changes_cursor().rsplit("-", 1)[1])
        assert [int(item["versionId"]) for item in log] == list(range(1, head + 1))
        assert head == len(self.server.applied_log()) + self.server_writes
        previous: dict[str, dict[str, Any] | None] = {}
        for item in log:
            task = item.get("task")
            body = None if task is None else _strip(task)
            if item["changeId"] is not None:
                assert body is None or body != previous.get(item["id"]), ("a no-op write", item)
            previous[item["id"]] = body
        final = {k: _strip(v) for k, v in self.server.tasks().items()}
        for write in self.writes:
            self._check_kept(write, final, resolutions)

    def _log(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        query: dict[str, str] = {"limit": "1000"}
        while True:
            page = self.server.changes(query)
            items += page["data"]  # type: ignore[arg-type]
            meta: dict[str, Any] = page["meta"]  # type: ignore[assignment]
            if not meta["hasMore"]:
                return items
            query["since"] = meta["nextCursor"]

    def _restored(self, write: Write, name: str, value: Any) -> bool:
        """Whether the edit put back a value the field had before another writer changed
        it: the device's net change of the field is none, so a three-way merge rightly
        keeps the other writer's value (A-B-A)."""
        earlier = [
            (w.clock, w.writer, w.fields[name])
            for w in self.writes
            if w.task_id == write.task_id
            and w.clock < write.clock
            and w.fields is not None
            and name in w.fields
        ]
        return any(
            writer != write.writer and any(c < clock and v == value for c, _, v in earlier)
            for clock, writer, _ in earlier
        )

    def _check_kept(
        self, write: Write, final: dict[str, dict[str, Any]], resolutions: list[Resolution]
    ) -> None:
        """The write is on the server, superseded later, or shown in a conflict."""
        task = final.get(write.task_id)
        later = [w for w in self.writes if w.task_id == write.task_id and w.clock > write.clock]
        shown = [r for r in resolutions if r.conflict.task_id == write.task_id]
        if write.fields is None:
            assert task is None or later or shown, ("a delete was lost", write, task)
            return
        for name, value in write.fields.items():
            if task is not None and task.get(name) == value:
                continue
            superseded = any(w.fields is None or name in w.fields for w in later)
            superseded = superseded or self._restored(write, name, value)
            in_conflict = any(
                reason.field in (None, name) for r in shown for reason in r.conflict.reasons
            ) or any(not r.conflict.reasons for r in shown)
            # The device took the server's task for its conflict: its own edits of the
            # task were shown (conflict.local) and dropped by that choice.
            in_conflict = in_conflict or any(
                r.device == write.writer and r.choice == "remote" for r in shown
            )
            assert superseded or in_conflict, (
                f"an edit was lost: {write.writer} set {write.task_id}.{name}={value!r} at "
                f"{write.clock}; the server has {task}; conflicts: "
                + "; ".join(f"{r.device} {r.choice} {r.conflict.reasons}" for r in shown)
            )


# CI: 10 derandomized examples of 25 steps (~60 s on a loaded 2-core machine). A soak to
# hunt for bugs: CONVERGE_RANDOM=1 CONVERGE_EXAMPLES=50 CONVERGE_NOSHRINK=1 (shrinking a
# run with child processes takes minutes; the failing steps are printed unshrunk).
Convergence.TestCase.settings = settings(
    max_examples=int(os.environ.get("CONVERGE_EXAMPLES", "10")),
    stateful_step_count=25,
    deadline=None,
    derandomize=not os.environ.get("CONVERGE_RANDOM"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate]
    + ([] if os.environ.get("CONVERGE_NOSHRINK") else [Phase.shrink]),
)
TestDevicesConvergeUnderFaultsAndKills = Convergence.TestCase
