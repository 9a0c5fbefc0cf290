"""Crash harness: a real child process writes to a store file and is SIGKILLed at random.

Run as a script (``python tests/crash_child.py PATH SEED DURABILITY``), this is the
child: a seeded, random mix of creates, updates and deletes (and small create_many
batches) on a real file. Before each call it prints ``{"intent": ...}``; after the
call has *returned* it prints ``{"done": ...}`` with the task's exact wire form. Each
line is flushed, so the parent knows every write the child saw committed, and the one
write (at most) that was under way when it was killed.

Imported, :func:`run_trial` is the parent side: start the child, let it report a
seeded number of writes, SIGKILL it, read what it had reported, reopen the file and
:func:`check_store` it. ``tests/test_crash.py`` runs 20 trials; the soak
(``benchmarks/soak_crash.py``) runs as many as asked.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

HERE = Path(__file__).resolve()

_WORDS = ["cbc", "cmp", "npo", "urgent", "x'; DROP TABLE tasks;--", "50%_off", '"q"', "ß"]


def search_word(task_id: str) -> str:
    """A word only this task's description holds (the ``x`` ends it: no prefix of another)."""
    return "tok" + task_id.replace("_", "") + "x"


def _request(rng: random.Random, task_id: str) -> dict[str, Any]:
    request: dict[str, Any] = {
        "id": task_id,
        "status": rng.choice(["draft", "requested", "ready"]),
        "intent": "order",
        # A per-task word, so the full-text index can be checked for every task.
        "description": f"{search_word(task_id)} {rng.choice(_WORDS)}",
    }
    if rng.random() < 0.5:
        request["patientId"] = f"pt_{rng.randrange(5)}"
    if rng.random() < 0.5:
        request["input"] = [{"type": "lab-panel", "valueString": rng.choice(_WORDS)}]
    if rng.random() < 0.3:
        request["note"] = rng.choice(_WORDS) * rng.randrange(1, 200)
    return request


def _changes(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(4)
    if kind == 0:
        return {"note": f"note {rng.random()!r}"}
    if kind == 1:
        return {"priority": rng.choice(["routine", "urgent", "asap", "stat"])}
    if kind == 2:
        return {"ownerId": rng.choice([None, "prac_1", "prac_2"]), "note": None}
    return {"businessStatus": rng.choice(_WORDS), "basedOn": [f"sr_{rng.randrange(9)}"]}


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, ensure_ascii=True) + "\n")
    sys.stdout.flush()


def child_main(path: str, seed: int, durability: str) -> None:
    """The child: write forever (until killed), reporting each write around the call."""
    from clinik_local import TaskStore, encode_task

    rng = random.Random(seed)
    store = TaskStore.open(path, durability="full" if durability == "full" else "normal")
    _emit({"ready": True})
    live: list[str] = []
    n = 0
    while True:
        roll = rng.random()
        if not live or roll < 0.4:
            task_id = f"t_{n}"
            n += 1
            request = _request(rng, task_id)
            _emit({"intent": {"op": "create", "id": task_id}})
            task = store.tasks.create(request).data
            live.append(task_id)
            _emit({"done": {"op": "create", "id": task_id, "task": encode_task(task)}})
        elif roll < 0.45:
            ids = [f"t_{n + k}" for k in range(rng.randrange(2, 6))]
            n += len(ids)
            _emit({"intent": {"op": "create_many", "ids": ids}})
            tasks = store.tasks.create_many([_request(rng, i) for i in ids]).data
            live.extend(ids)
            for task in tasks:
                _emit({"done": {"op": "create", "id": task.id, "task": encode_task(task)}})
        elif roll < 0.85:
            task_id = rng.choice(live)
            _emit({"intent": {"op": "update", "id": task_id}})
            task = store.tasks.update(task_id, _changes(rng)).data
            _emit({"done": {"op": "update", "id": task_id, "task": encode_task(task)}})
        else:
            task_id = live.pop(rng.randrange(len(live)))
            _emit({"intent": {"op": "delete", "id": task_id}})
            store.tasks.delete(task_id)
            _emit({"done": {"op": "delete", "id": task_id}})


# --- the parent side ----------------------------------------------------------------------


@attrs.frozen
class Reported:
    """What the child said before it died."""

    #: task id -> latest reported wire form, or None once reported deleted.
    latest: dict[str, dict[str, Any] | None]
    #: every reported version: (task id, versionId) -> wire form.
    versions: dict[tuple[str, str], dict[str, Any]]
    #: the write announced but not reported done (under way at the kill), if any.
    in_flight: dict[str, Any] | None
    writes: int


def parse_report(lines: list[str]) -> Reported:
    """Fold the child's output into what must be in the file (a torn last line is ignored:
    the child can die in the middle of printing it)."""
    latest: dict[str, dict[str, Any] | None] = {}
    versions: dict[tuple[str, str], dict[str, Any]] = {}
    in_flight: dict[str, Any] | None = None
    writes = 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # only the last line can be torn
        if "intent" in record:
            in_flight = record["intent"]
        elif "done" in record:
            done = record["done"]
            writes += 1
            if done["op"] == "delete":
                latest[done["id"]] = None
            else:
                latest[done["id"]] = done["task"]
                versions[(done["id"], done["task"]["versionId"])] = done["task"]
            if in_flight is not None and (
                in_flight["op"] != "create_many" or done["id"] == in_flight["ids"][-1]
            ):
                in_flight = None
    return Reported(latest, versions, in_flight, writes)


@attrs.frozen
class TrialResult:
    seed: int
    durability: str
    writes: int
    tasks: int
    killed_in_flight: bool
    problems: list[str]


def run_trial(
    path: Path, seed: int, *, max_writes: int = 150, timeout: float = 60.0
) -> TrialResult:
    """One crash trial: the child writes, is SIGKILLed after a seeded number of reported
    writes (0..max_writes), and the file is checked. Repeatable from ``seed``."""
    rng = random.Random(seed)
    durability = rng.choice(["normal", "normal", "full"])
    kill_after = rng.randrange(max_writes + 1)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    lines: list[str] = []
    done = 0
    with subprocess.Popen(
        [sys.executable, str(HERE), str(path), str(seed), durability],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        assert child.stdout is not None
        assert child.stderr is not None
        try:
            first = child.stdout.readline()
            if '"ready"' not in first:
                raise AssertionError(f"child did not start: {first!r} {child.stderr.read()}")
            while done < kill_after:
                line = child.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if line.startswith('{"done"'):
                    done += 1
            child.send_signal(signal.SIGKILL)
            # Read through the same buffered reader (communicate() would skip its buffer).
            rest = child.stdout.read()
            err = child.stderr.read()
            child.wait(timeout=timeout)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    lines.extend(rest.splitlines(keepends=True))
    if child.returncode != -signal.SIGKILL:
        raise AssertionError(f"child ended by itself ({child.returncode}): {err[-2000:]}")
    reported = parse_report(lines)
    problems, count = check_store(path, reported)
    return TrialResult(
        seed, durability, reported.writes, count, reported.in_flight is not None, problems
    )


def check_store(path: Path, reported: Reported) -> tuple[list[str], int]:
    """Every problem found in the file after the crash; ``([], live task count)`` when sound.

    * ``PRAGMA integrity_check`` is ok;
    * each reported write is there, exactly: the latest reported version of each task is
      its current form (or, for the one write under way at the kill, the version after it);
      a reported delete stays deleted;
    * no half-written task: every task has its history row for its current version with
      the same body; history and outbox hold one row per change, with the same ops in the
      same order; the derived search data (refs, full-text) matches the task;
    * the store opens for writing again.
    """
    from clinik_local import NotFoundError, TaskStore, encode_task
    from clinik_local.storage.connection import fetch_all
    from clinik_local.storage.outbox import PAYLOAD

    problems: list[str] = []
    with TaskStore.open(path) as store:
        problems.extend(f"integrity_check: {p}" for p in store.integrity_check())
        in_flight_ids: set[str] = set()
        if reported.in_flight is not None:
            flight = reported.in_flight
            in_flight_ids = set(flight["ids"]) if flight["op"] == "create_many" else {flight["id"]}
        for task_id, wire in reported.latest.items():
            try:
                current: dict[str, Any] | None = encode_task(store.tasks.get(task_id).data)
            except NotFoundError:
                current = None
            if current == wire:
                continue
            if task_id in in_flight_ids and _one_step_after(store, task_id, wire, current):
                continue
            problems.append(f"{task_id}: reported {wire!r}, file has {current!r}")
        with store.read() as conn:
            rows = fetch_all(conn, "SELECT id, version, body FROM tasks")
            history = fetch_all(
                conn,
                # The current version's body is kept once, in tasks (schema.sql).
                "SELECT h.task_id, h.version, h.op, coalesce(h.body, t.body) "
                "FROM task_history AS h LEFT JOIN tasks AS t "
                "ON t.id = h.task_id AND h.body IS NULL ORDER BY h.task_id, h.version",
            )
            outbox = fetch_all(
                conn, f"SELECT o.task_id, o.op, {PAYLOAD} FROM outbox AS o ORDER BY o.seq"
            )
            refs = fetch_all(conn, "SELECT count(*) FROM task_refs")[0][0]
        known = {tid for tid, _ in reported.versions} | set(reported.latest)
        for task_id, _version, _body in rows:
            if task_id not in known and task_id not in in_flight_ids:
                problems.append(f"{task_id}: in the file but never announced by the child")
        by_key = {(h[0], h[1]): h for h in history}
        for task_id, version, body in rows:
            row = by_key.get((task_id, version))
            if row is None or row[3] != body or row[2] == "delete":
                problems.append(f"{task_id}: no history row for current version {version}")
        history_ops: dict[str, list[tuple[str, str | None]]] = {}
        for task_id, _version, op, body in history:
            history_ops.setdefault(task_id, []).append((op, None if op == "delete" else body))
        outbox_ops: dict[str, list[tuple[str, str | None]]] = {}
        for task_id, op, payload in outbox:
            outbox_ops.setdefault(task_id, []).append((op, payload))
        if history_ops != outbox_ops:
            problems.append("outbox does not hold exactly one row per history row, in order")
        for task_id, _version, _body in rows:
            last = history_ops.get(task_id, [("", None)])[-1]
            if last[0] == "delete":
                problems.append(f"{task_id}: present although its last change is a delete")
        for (task_id, version), wire in reported.versions.items():
            row = by_key.get((task_id, int(version)))
            if row is None or json.loads(row[3]) != wire:
                problems.append(f"{task_id}: reported version {version} missing from history")
        expected_refs = sum(len(set(json.loads(b).get("basedOn", []))) for _, _, b in rows)
        if refs != expected_refs:
            problems.append(f"task_refs has {refs} rows, the tasks list {expected_refs}")
        for task_id, _version, _body in rows[:: max(1, len(rows) // 25)]:
            word = search_word(str(task_id))
            found = [t.id for t in store.tasks.search(text=word, limit=5).data]
            if found != [task_id]:
                problems.append(f"{task_id}: text search for {word} found {found}")
        count = len(rows)
        try:
            store.tasks.create({"id": "after_crash", "status": "draft", "intent": "order"})
            store.tasks.delete("after_crash")
        except Exception as exc:  # any failure here is the finding
            problems.append(f"store not writable after the crash: {exc!r}")
    return problems, count


def _one_step_after(
    store: Any, task_id: str, before: dict[str, Any] | None, now: dict[str, Any] | None
) -> bool:
    """Whether ``now`` is the state one write after ``before`` (the unreported last write
    committed before the kill); its history must then end with that write."""
    from clinik_local import encode_task

    history = store.tasks.history(task_id).data
    if before is None:
        return False  # nothing follows a reported delete
    version = int(before["versionId"])
    if now is None:
        return bool(history[-1].op == "delete" and history[-1].version == version + 1)
    return bool(
        int(now["versionId"]) == version + 1
        and history[-1].version == version + 1
        and encode_task(history[-1].task) == now
    )


if __name__ == "__main__":
    child_main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
