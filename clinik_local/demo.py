"""``clinik-local demo``: the seed's lab order, N realistic tasks, each search, a deep page.

What it shows a new user in one run: the library answers in microseconds from a local
SQLite file (``./clinik-demo.db`` by default), every change left an outbox entry for
sync, paging stays cheap at any depth, and changes made offline reach a server once it
is up. Each step's line is printed as soon as the step is done, terminal or not.

The sync part runs on a second, in-memory store: delivering the first part's N tasks
through the reference server would take longer than the whole demo should (it
delivers about 800 changes a second on a small machine), so the report names the
store every number is about.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from .model import TaskIntent, TaskPriority, TaskStatus
from .progress import Progress
from .storage.encryption import KeyProvider
from .store import TaskStore
from .testing.server import ReferenceServer

__all__ = ["SEED_LAB_ORDER", "generate_requests", "run_demo"]

#: The example request of the remote API reference (docs/seed-api.md), as a wire mapping.
SEED_LAB_ORDER: dict[str, Any] = {
    "status": "requested",
    "intent": "order",
    "priority": "urgent",
    "code": "lab-order",
    "description": "Order CBC and CMP for pre-operative assessment",
    "patientId": "pt_abc123",
    "encounterId": "enc_xyz789",
    "requesterId": "prac_def456",
    "ownerId": "prac_lab_tech",
    "executionPeriod": {"start": "2025-02-01T08:00:00Z", "end": "2025-02-01T17:00:00Z"},
    "input": [
        {"type": "lab-panel", "valueString": "CBC"},
        {"type": "lab-panel", "valueString": "CMP"},
    ],
    "note": "Patient is NPO after midnight. Draw labs before 10am.",
}

_CODES = {
    "lab-order": (
        "Order {panel} for {why}",
        "lab-panel",
        ["CBC", "CMP", "HbA1c", "Lipid panel", "TSH"],
    ),
    "imaging-order": (
        "{panel} imaging for {why}",
        "modality",
        ["X-ray", "CT", "MRI", "Ultrasound"],
    ),
    "referral-follow-up": (
        "Follow up referral to {panel} for {why}",
        "specialty",
        ["cardiology", "dermatology", "orthopedics", "neurology"],
    ),
    "medication-review": (
        "Review {panel} dosing for {why}",
        "medication",
        ["metformin", "warfarin", "lisinopril", "insulin"],
    ),
    "care-coordination": (
        "Coordinate {panel} for {why}",
        "service",
        ["home care", "transport", "social work", "physio"],
    ),
    "vaccination": (
        "Administer {panel} vaccine for {why}",
        "vaccine",
        ["influenza", "tetanus", "hepatitis B", "pneumococcal"],
    ),
}
_WHY = [
    "pre-operative assessment",
    "annual check-up",
    "chronic disease monitoring",
    "post-discharge follow-up",
    "new symptoms",
    "screening",
]
_NOTES = [
    "Patient is NPO after midnight.",
    "Interpreter needed.",
    "Call before visit.",
    "Wheelchair access.",
    "Fasting required.",
    None,
    None,
]


def generate_requests(count: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """``count`` realistic, valid wire requests: many patients, owners and codes, every
    status and priority, authored over the last year. Deterministic for a seed.
    """
    rng = random.Random(seed)
    statuses = [s.value for s in TaskStatus]
    intents = [i.value for i in TaskIntent]
    priorities = [p.value for p in TaskPriority] + [None]
    patients = max(count // 20, 1)
    base = datetime(2025, 1, 1, tzinfo=UTC)
    for n in range(count):
        code = rng.choice(list(_CODES))
        template, io_type, values = _CODES[code]
        panel = rng.choice(values)
        authored = base + timedelta(seconds=rng.randrange(365 * 86400))
        start = authored + timedelta(hours=rng.randrange(1, 72))
        request: dict[str, Any] = {
            "status": rng.choice(statuses),
            "intent": rng.choice(intents),
            "code": code,
            "description": template.format(panel=panel, why=rng.choice(_WHY)),
            "patientId": f"pt_{rng.randrange(patients):06d}",
            "requesterId": f"prac_{rng.randrange(300):03d}",
            "authoredOn": authored.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "executionPeriod": {
                "start": start.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "end": (start + timedelta(hours=rng.randrange(1, 240))).strftime(
                    "%Y-%m-%dT%H:%M:%S.000Z"
                ),
            },
            "input": [{"type": io_type, "valueString": panel}],
        }
        priority = rng.choice(priorities)
        if priority is not None:
            request["priority"] = priority
        if rng.random() < 0.85:
            request["ownerId"] = f"prac_{rng.randrange(200):03d}"
        if rng.random() < 0.6:
            request["encounterId"] = f"enc_{n:07d}"
        note = rng.choice(_NOTES)
        if note is not None:
            request["note"] = note
        yield request


def _timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    best = float("inf")
    result: object = None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def _cursor_at_depth(store: TaskStore, depth: int) -> str | None:
    """The cursor that resumes the default order after ``depth`` tasks."""
    cursor: str | None = None
    seen = 0
    while seen < depth:
        page = store.tasks.search(limit=min(1000, depth - seen), cursor=cursor)
        seen += len(page.data)
        next_cursor = page.meta["nextCursor"]
        if not isinstance(next_cursor, str):
            return None
        cursor = next_cursor
    return cursor


def _server_task_count(server: ReferenceServer) -> int:
    count = 0
    query: dict[str, str] = {"limit": "1000"}
    while True:
        page = server.search(query)
        data = page["data"]
        meta = page["meta"]
        assert isinstance(data, list)
        assert isinstance(meta, dict)
        count += len(data)
        if not meta["hasMore"]:
            return count
        query["cursor"] = str(meta["nextCursor"])


_STEP = 42
_RESULT = 40


class _Report:
    """The demo's table, printed row by row as each step finishes (and flushed)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def line(self, text: str = "") -> None:
        print(text, file=self._out, flush=True)

    def header(self, title: str) -> None:
        self.line()
        self.line(title)
        self.line(f"  {'step':<{_STEP}}  {'result':<{_RESULT}} {'time':>12}")
        self.line(f"  {'-' * _STEP}  {'-' * _RESULT} {'-' * 12}")

    def row(self, step: str, result: str, seconds: float | None = None) -> None:
        if seconds is None:
            shown = ""
        elif seconds < 0.01:
            shown = f"{seconds * 1e6:,.0f} µs"
        else:
            shown = f"{seconds * 1e3:,.1f} ms"
        self.line(f"  {step:<{_STEP}}  {result:<{_RESULT}} {shown:>12}")


def _remove_store_file(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


def _sync_demo(changes: int, seed: int, report: _Report) -> None:
    """Offline -> online, on a second store (in memory): changes queued, then drained.

    A reference server (the sync contract, on 127.0.0.1) is started on a port that
    first refuses connections, so the store really is offline while staff work.
    """
    from .sync import SyncConfig

    probe = ReferenceServer()
    port = probe.port
    probe.stop()  # the port now refuses connections: the service is "down"
    token = "demo-token"  # noqa: S105 - the demo server's throwaway token
    config = SyncConfig(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        token_provider=lambda: token,
        timeout=2.0,
        backoff_base=0.05,
        backoff_cap=0.5,
    )
    report.header(
        f"sync: a second store (in memory) works offline, then syncs to a reference "
        f"server on 127.0.0.1:{port}"
    )
    with TaskStore.open(":memory:", sync=config) as store:
        store.sync.start()
        t0 = time.perf_counter()
        created = store.tasks.create_many(list(generate_requests(changes, seed + 1))).data
        rng = random.Random(seed)
        for task in rng.sample(created, k=len(created) // 10):
            store.tasks.update(task.id or "", {"note": "Called the patient; confirmed time."})
        for task in rng.sample(created, k=len(created) // 20):
            store.tasks.delete(task.id or "")
        offline_seconds = time.perf_counter() - t0
        waiting = store.sync.status()
        report.row(
            "sync store, offline: create/update/delete",
            f"{waiting.pending:,} changes queued ({waiting.state})",
            offline_seconds,
        )
        with ReferenceServer(port=port, token=token) as server:
            t0 = time.perf_counter()
            store.sync.notify_online()
            with Progress("outbox draining", waiting.pending) as bar:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    if store.sync.flush(timeout=0.2):
                        bar.advance(waiting.pending - bar.done)
                        break
                    bar.advance(waiting.pending - store.sync.status().pending - bar.done)
            drained = time.perf_counter() - t0
            final = store.sync.status()
            settle = time.monotonic() + 2  # the worker finishes its pass after the last answer
            while final.state == "uploading" and time.monotonic() < settle:
                time.sleep(0.01)
                final = store.sync.status()
            local = store.tasks.count().data
            remote = _server_task_count(server)
        report.row(
            "sync store, online: outbox drained",
            f"{waiting.pending / max(drained, 1e-9):,.0f} changes/s, now {final.state}",
            drained,
        )
        report.row(
            "sync store: outbox after sync",
            f"pending {final.pending}, dead {final.dead}, conflicts {final.conflicts}",
        )
        report.row("sync store tasks = server tasks", f"{local:,} = {remote:,}")


DEFAULT_DB = "clinik-demo.db"


def run_demo(
    db: str = DEFAULT_DB,
    tasks: int = 20_000,
    seed: int = 7,
    out: TextIO | None = None,
    sync_changes: int = 1_000,
    *,
    replace: bool = True,
    key: KeyProvider | None = None,
) -> int:
    """Run the demo and print its report to ``out`` as it goes; returns the exit code (0).

    ``db`` is the store file (``":memory:"`` allowed). With ``replace`` (the CLI sets it
    for the default file only) an existing file there is removed first, so every run
    starts from an empty store; otherwise the demo adds to what the file holds.
    ``key`` encrypts the store file (see :meth:`TaskStore.open`).
    """
    out = out if out is not None else sys.stdout
    report = _Report(out)
    started = time.perf_counter()
    if db != ":memory:" and replace:
        _remove_store_file(db)
    where = "in memory" if db == ":memory:" else os.path.abspath(db)
    report.line(
        f"clinik-local demo: the seed's lab order and {tasks:,} generated tasks in a local "
        "SQLite store"
    )
    report.line(
        f"store: {where}" + (" (replaced on each run)" if replace and db != ":memory:" else "")
    )
    with TaskStore.open(db, key=key) as store:
        report.header(f"local store {db}: create, get, search")
        seconds, response = _timed(lambda: store.tasks.create(SEED_LAB_ORDER))
        lab_order = response.data  # type: ignore[attr-defined]
        report.row("create the seed's lab order", f"id {lab_order.id}", seconds)
        seconds, _ = _timed(lambda: store.tasks.get(lab_order.id), repeat=5)
        report.row("get it back by id", "1 task", seconds)

        chunk = 5_000
        generated = generate_requests(tasks, seed)
        t0 = time.perf_counter()
        with Progress("creating tasks", tasks) as bar:
            done = 0
            while done < tasks:
                batch = [next(generated) for _ in range(min(chunk, tasks - done))]
                store.tasks.create_many(batch)
                done += len(batch)
                bar.advance(len(batch))
        bulk = time.perf_counter() - t0
        report.row(f"bulk create {tasks:,} tasks", f"{tasks / max(bulk, 1e-9):,.0f} tasks/s", bulk)

        searches: list[tuple[str, dict[str, object]]] = [
            ("patientId", {"patientId": "pt_000042"}),
            ("ownerId", {"ownerId": "prac_007"}),
            ("requesterId", {"requesterId": "prac_123"}),
            ("status", {"status": "in-progress"}),
            ("priority", {"priority": "stat"}),
            ("code", {"code": "lab-order"}),
        ]
        for name, filters in searches:
            search = functools.partial(store.tasks.search, filters, limit=50)
            seconds, page = _timed(search, repeat=5)
            found = len(page.data)  # type: ignore[attr-defined]
            total = store.tasks.count(filters).data
            report.row(f"search {name}, first page of 50", f"{found} of {total:,}", seconds)

        # A deep page: walk the default order with keyset cursors to the far end, then
        # time one page of 50 there beside the first page of 50.
        first_seconds, _ = _timed(lambda: store.tasks.search(limit=50), repeat=5)
        report.row("first page of 50 (newest first)", "50 tasks", first_seconds)
        depth = max(tasks - 100, 0)
        cursor = _cursor_at_depth(store, depth)
        if cursor is not None:
            deep_seconds, _ = _timed(lambda: store.tasks.search(limit=50, cursor=cursor), repeat=5)
            report.row(f"page of 50 at depth {depth:,}", "via keyset cursor", deep_seconds)

        counts = store.table_counts()
    report.line()
    report.line(
        f"local store {db}: tasks {counts['tasks']:,} · history rows "
        f"{counts['task_history']:,} · outbox {counts['outbox']:,} changes waiting for sync"
    )
    report.line(
        "  (no service is configured for this store, so its changes stay queued; "
        "the sync part below uses its own store)"
        if sync_changes > 0
        else "  (no service is configured for this store, so its changes stay queued)"
    )
    if sync_changes > 0:
        _sync_demo(sync_changes, seed, report)
    report.line()
    report.line(f"total {time.perf_counter() - started:.1f} s")
    return 0
